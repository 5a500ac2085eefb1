"""data.py — every data file the project reads, and the shared ways of turning it into documents and prompts.

Used by purify.py (domain calibration / held-out text), train_router.py (level-1 prompts) and evaluate.py
(benchmarks, prompts, held-out perplexity text) alike, so all three see the same splits and the same formats.

    data_file(name)        where a data file is: --data-dir / $FREE_MOE_SHARED / ../shared (its data/ folder)
    read_text, read_jsonl  (gzipped) files; a missing, truncated or malformed file is a one-line UserError
    load_mmlu/gsm8k/...    the benchmark sets, each row checked for its fields
    domain_documents       the documents of a domain's "calib" or "heldout" split (DOMAIN DATA below)
    load_domain_tokens     DOWP step 1: token windows (N, T) of a domain
    mmlu_prompt, ...       the one prompt format of each benchmark (lm-evaluation-harness style)

DOMAIN DATA (built-in domains; their splits are fixed so experts are never measured on what built them)
    general    calib: WikiText-2 valid (articles)          held-out: WikiText-2 test (articles)
    code       calib: CPython stdlib corpus, all but the last files   held-out: the last files (>= 10% of bytes)
               (the files are split at their "# ===== file:" header lines; disjoint from HumanEval / MBPP)
    math       calib: GSM8K train corpus (first 5526 train problems)
               held-out: GSM8K train problems 5527..7473 (not in the corpus; disjoint from GSM8K test,
               which evaluate.py scores)
    knowledge  MMLU items as "question / A.-D. options / Answer: X. text". Each test item goes to one bucket by
               sha256(subject + question): 0-1 of 10 -> calib, 2 -> held-out, 3-9 -> "eval" (never used to
               build or train anything, left for benchmarks: evaluate.py scores only these).
               calib = dev (285 items) + calib-bucket test items; held-out = held-out-bucket test items.
    NAME=path  a .txt (documents = blank-line-separated paragraphs) or .jsonl (the "text" field, else all string
               fields joined); the last 10% of documents are the held-out split.
Within a split, documents are shuffled with a seed (calib) or seed 0 (held-out, canonical), joined with a blank
line, tokenized and cut into windows.

Shape legend: N windows, T time.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from functools import lru_cache
from pathlib import Path

import torch

from cli import UserError, shared_dir

BUILTIN_DOMAINS = ("general", "code", "math", "knowledge")
HELDOUT_FRACTION = 0.1  # user domains: last 10% of documents are held out
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
LETTERS = "ABCD"


# ----------------------------------------------------------------------------- files

def data_file(name: str, data_dir=None) -> Path:
    """The path of data file `name` (e.g. "mmlu/test.jsonl.gz"): <shared>/data/name, where <shared> is --data-dir,
    $FREE_MOE_SHARED or ../shared beside the repository."""
    return shared_dir(data_dir) / "data" / name


@lru_cache(maxsize=None)  # evaluate.py checks every data file before the (slow) model load, then reads them again
def read_text(path: Path) -> str:
    """A (gzipped) UTF-8 text file; a missing, truncated or undecodable file is a one-line UserError."""
    if not path.exists():
        raise UserError(f"data file {path} does not exist (set --data-dir or $FREE_MOE_SHARED)")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:  # a truncated .gz or a binary file: one line, no traceback
        raise UserError(f"corrupt data file {path}: {type(e).__name__}: {e}") from None


def read_jsonl(path: Path, fields: tuple = ()) -> list[dict]:
    """Rows of a (gzipped) JSONL file, each checked for `fields`; an empty or malformed file is a one-line UserError."""
    rows = []
    for i, line in enumerate(read_text(path).split("\n")):  # not splitlines: items hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"corrupt data file {path}: line {i + 1} is not JSON ({e})") from None
        missing = [k for k in fields if k not in row]
        if missing:
            raise UserError(f"corrupt data file {path}: line {i + 1} lacks {missing}")
        rows.append(row)
    if not rows:
        raise UserError(f"corrupt data file {path}: no rows")
    return rows


# ----------------------------------------------------------------------------- benchmarks

def load_mmlu(split: str, data_dir=None) -> list[dict]:
    path = data_file(f"mmlu/{split}.jsonl.gz", data_dir)
    rows = read_jsonl(path, ("subject", "question", "choices", "answer"))
    for r in rows:
        if len(r["choices"]) != 4 or r["answer"] not in (0, 1, 2, 3):
            raise UserError(f"corrupt data file {path}: bad item {str(r['question'])[:40]!r}")
    return rows


def load_gsm8k(split: str, data_dir=None) -> list[dict]:
    return read_jsonl(data_file(f"gsm8k/{split}.jsonl", data_dir), ("question", "answer"))


def load_humaneval(data_dir=None) -> list[dict]:
    return read_jsonl(data_file("humaneval/HumanEval.jsonl.gz", data_dir),
                      ("task_id", "prompt", "canonical_solution", "test", "entry_point"))


def load_mbpp(data_dir=None) -> list[dict]:
    return read_jsonl(data_file("mbpp/mbpp.jsonl", data_dir), ("task_id", "text", "code", "test_list"))


def mbpp_texts(lo: int, hi: int, data_dir=None) -> list[str]:
    """MBPP task texts with task_id in [lo, hi] (601..974 is MBPP's train split; evaluate.py scores 11..510)."""
    return [r["text"] for r in load_mbpp(data_dir) if lo <= int(r["task_id"]) <= hi]


# ----------------------------------------------------------------------------- prompts (one format per benchmark)

def mmlu_header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_question(doc: dict) -> str:
    """lm-evaluation-harness doc_to_text: question, the four options, then "Answer:" (no trailing space)."""
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(doc["choices"]))
    return f"{doc['question'].strip()}{options}\nAnswer:"


def mmlu_prompt(doc: dict, shots: list[dict]) -> str:
    """Letter format: the continuations scored are " A", " B", " C", " D"."""
    examples = "".join(mmlu_question(s) + f" {LETTERS[s['answer']]}\n\n" for s in shots)
    return mmlu_header(doc["subject"]) + examples + mmlu_question(doc)


def mmlu_cloze_prompt(doc: dict, shots: list[dict]) -> str:
    """Cloze format: no options shown; the continuations scored are " " + each answer text."""
    examples = "".join(f"{s['question'].strip()}\nAnswer: {s['choices'][s['answer']]}\n\n" for s in shots)
    return mmlu_header(doc["subject"]) + examples + f"{doc['question'].strip()}\nAnswer:"


def strip_calculator(answer: str) -> str:
    """GSM8K answers carry calculator annotations <<48/2=24>>; the shots read better without them."""
    return re.sub(r"<<[^>]*>>", "", answer)


def gsm8k_prompt(doc: dict, shots: list[dict]) -> str:
    examples = "".join(f"Question: {s['question']}\nAnswer: {strip_calculator(s['answer'])}\n\n" for s in shots)
    return examples + f"Question: {doc['question']}\nAnswer:"


def mbpp_prompt(doc: dict, shots: list[dict]) -> str:
    """The MBPP paper's prompt: task text, three tests, code between [BEGIN] and [DONE]."""
    def block(d):
        tests = "\n".join(d["test_list"])
        return (f"You are an expert Python programmer, and here is your task: {d['text']} "
                f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")
    examples = "".join(block(s) + s["code"].replace("\r\n", "\n") + "\n[DONE]\n\n" for s in shots)
    return examples + block(doc)


def humaneval_program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def mbpp_program(doc: dict, code: str) -> str:
    tests = "\n".join(doc["test_list"])
    return f"{code}\n\n{doc.get('test_setup_code', '')}\n{tests}\n"  # setup may use the solution's names


# ----------------------------------------------------------------------------- domains (DOWP step 1: calibration text)

def mmlu_text(row: dict) -> str:
    """One MMLU item as plain text, the knowledge domain's document unit: the question as benchmarks ask it,
    followed by the answer letter and text."""
    a = int(row["answer"])
    return f"{mmlu_question(row)} {LETTERS[a]}. {row['choices'][a]}"


def mmlu_bucket(row: dict) -> str:
    """Which use an MMLU test item is reserved for: "calib", "heldout" or "eval" (free for benchmarks)."""
    h = int(hashlib.sha256((row["subject"] + "\n" + row["question"]).encode()).hexdigest(), 16) % 10
    return "calib" if h < 2 else "heldout" if h == 2 else "eval"


def gsm8k_text(row: dict) -> str:
    """One GSM8K problem with its worked answer: the math domain's document unit."""
    return f"{gsm8k_prompt(row, [])} {row['answer']}"


def wikitext_articles(text: str) -> list[str]:
    """Split WikiText at its top-level headings (" = Title = "); undo its @-@ style number/hyphen splitting."""
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    parts = re.split(r"\n(?= = [^=].* = \n)", "\n" + text)
    return [p.strip("\n") for p in parts if p.strip()]


def code_files(text: str) -> list[str]:
    parts = re.split(r"(?m)^(?=# ===== file: )", text)
    return [p for p in parts if p.strip()]


def builtin_documents(domain: str, split: str, data_dir=None) -> list[str]:
    """The documents of a built-in domain's split (see DOMAIN DATA in the module docstring)."""
    corpus = lambda name: read_text(data_file("corpora/" + name, data_dir))
    if domain == "general":
        name = "english_wikitext2_valid.txt.gz" if split == "calib" else "english_wikitext2_test.txt.gz"
        return wikitext_articles(corpus(name))
    if domain == "code":
        files = code_files(corpus("code_python.txt.gz"))
        total, tail, cut = sum(map(len, files)), 0, len(files)
        while tail < HELDOUT_FRACTION * total:  # held-out = the last whole files covering >= 10% of the bytes
            cut -= 1
            tail += len(files[cut])
        return files[:cut] if split == "calib" else files[cut:]
    if domain == "math":
        text = corpus("math_gsm8k_train.txt.gz")
        problems = [p.strip("\n") for p in re.split(r"\n\n(?=Question: )", text) if p.strip()]
        if split == "calib":
            return problems
        rows = load_gsm8k("train", data_dir)  # the train problems the corpus stops before
        if gsm8k_text(rows[len(problems) - 1]) != problems[-1]:
            raise UserError(f"{data_file('corpora/math_gsm8k_train.txt.gz', data_dir)}: corpus does not end at GSM8K train row "
                              f"{len(problems)}; cannot derive a disjoint held-out split")
        return [gsm8k_text(r) for r in rows[len(problems):]]
    if domain == "knowledge":
        test = load_mmlu("test", data_dir)
        docs = [mmlu_text(r) for r in test if mmlu_bucket(r) == split]
        if split == "calib":
            docs = [mmlu_text(r) for r in load_mmlu("dev", data_dir)] + docs
        return docs
    raise UserError(f"unknown domain {domain!r} (built-in: {', '.join(BUILTIN_DOMAINS)}; or NAME=path.txt|.jsonl)")


def user_documents(path: Path) -> list[str]:
    """A user corpus: .jsonl rows ("text" field, else every string field) or .txt paragraphs."""
    if not path.exists():
        raise UserError(f"domain file {path} does not exist")
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        docs = []
        for row in read_jsonl(path):
            if not isinstance(row, dict):
                raise UserError(f"{path}: each line must be a JSON object")
            text = row.get("text") if isinstance(row.get("text"), str) else \
                "\n".join(v for v in row.values() if isinstance(v, str))
            docs.append(text)
    else:
        docs = re.split(r"\n\s*\n", read_text(path))
    return [d.strip() for d in docs if d.strip()]


def parse_domain(spec: str) -> tuple[str, Path | None]:
    """"code" -> ("code", None); "legal=docs.txt" -> ("legal", Path("docs.txt"))."""
    name, _, path = spec.partition("=")
    name = name.strip()
    if not NAME_RE.match(name) or name == "baseline" or name == "stats":
        raise UserError(f"bad domain name {name!r} (lowercase letters, digits, _ or -; not 'baseline'/'stats')")
    if path:
        return name, Path(path)
    if name not in BUILTIN_DOMAINS:
        raise UserError(f"unknown domain {name!r} (built-in: {', '.join(BUILTIN_DOMAINS)}; or NAME=path.txt|.jsonl)")
    return name, None


def domain_documents(domain: str, split: str = "calib", data_dir=None) -> list[str]:
    """Documents of `domain` ("general" or "NAME=path") for split "calib" or "heldout", in file order."""
    if split not in ("calib", "heldout"):
        raise ValueError(f"split must be 'calib' or 'heldout', got {split!r}")
    name, path = parse_domain(domain)

    def split_docs(which: str) -> list[str]:
        if path is None:
            return builtin_documents(name, which, data_dir)
        all_docs = user_documents(path)
        if len(all_docs) < 2:
            raise UserError(f"domain {name}: {path} has {len(all_docs)} documents; need at least 2 "
                              "(one for calibration, one held out)")
        cut = len(all_docs) - max(1, round(HELDOUT_FRACTION * len(all_docs)))
        return all_docs[:cut] if which == "calib" else all_docs[cut:]

    docs = split_docs(split)
    if split == "heldout":  # a document repeated in the corpus (MMLU has duplicate items) stays out of held-out
        seen = set(split_docs("calib"))
        docs = [d for d in docs if not (d in seen or seen.add(d))]
    if not docs:
        raise UserError(f"domain {name}: the {split} split is empty")
    return docs


def shuffled(docs: list[str], seed: int) -> list[str]:
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs


@lru_cache(maxsize=None)
def heldout_text(domain: str, data_dir=None) -> str:
    """The canonical held-out text of a domain (documents shuffled with seed 0, blank-line separated): what
    purify.py and train_router.py measure experts on and evaluate.py's perplexity task scores."""
    return "\n\n".join(shuffled(domain_documents(domain, "heldout", data_dir), 0))


def load_domain_tokens(domain: str, tokenizer, data_dir=None, split: str = "calib", n_tokens: int = 32768,
                       seed: int = 0, seq_len: int = 512) -> torch.Tensor:
    """DOWP step 1: token windows of one domain, (N, T) long with N = n_tokens // seq_len (at least 1).

    calib: documents shuffled by `seed`; heldout: shuffled by seed 0 always (the canonical split evaluate.py
    uses). Documents are joined by a blank line and tokenized only until the budget is reached."""
    if n_tokens < seq_len:
        raise UserError(f"token budget {n_tokens} is smaller than one window of {seq_len} tokens")
    docs = shuffled(domain_documents(domain, split, data_dir), seed if split == "calib" else 0)
    need = n_tokens // seq_len * seq_len
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc + "\n\n")
        if len(ids) >= need:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"domain {domain}: the {split} split has only {len(ids)} tokens, fewer than one "
                          f"window of {seq_len}")
    return torch.tensor(ids[:min(n * seq_len, need)], dtype=torch.long).view(-1, seq_len)  # (N, T)
