"""data.py — every data file the project reads, and the shared ways of turning it into documents and prompts.

Used by purify.py (domain calibration / held-out text), train_router.py (level-1 prompts) and evaluate.py
(benchmarks, prompts, held-out perplexity text) alike, so all three see the same splits and the same formats.

    data_file(name)        where a data file is (DATA FILES below), fetched into the user cache if need be
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
    second corpora (shift_text, SHIFT_SOURCES): per built-in domain a text from another source, never used to build
               anything: general Shakespeare, code HumanEval + MBPP solutions, math MATH, knowledge MedMCQA.
Within a split, documents are shuffled with a seed (calib) or seed 0 (held-out, canonical), joined with a blank
line, tokenized and cut into windows.

DATA FILES (FILES at the bottom: each file's pinned upstream URLs, their sha256, a build step for derived files
and the sha256 of what it builds). data_file(name) looks in
    1. <shared>/data/<name>: --data-dir, else $FREE_MOE_SHARED, else ../shared beside the repo (used as it is)
    2. the user cache: data/ under $FREE_MOE_CACHE, else under ~/.cache/free-moe
    3. else downloads into the cache: once, with a progress bar, every sha256 checked before anything is written,
       then written atomically (a killed download leaves no half file). A hash mismatch is refused by name.
Offline, step 3 is one line naming the file, its URL and where to put it by hand. $FREE_MOE_DATA_URL=<base>
fetches https://<host>/<path> from <base>/<host>/<path> instead (a mirror; the tests serve one on 127.0.0.1).
    python data.py [--verify]   fetch every file ahead of time (make data); --verify re-checks every sha256

Shape legend: N windows, T time.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import http.client
import io
import json
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch

import downloads
from cli import UserError, cache_dir, progress, run_cli, shared_dir, write_atomic
from sandbox import CodeTask, solution_names

BUILTIN_DOMAINS = ("general", "code", "math", "knowledge")
HELDOUT_FRACTION = 0.1  # user domains: last 10% of documents are held out
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
LETTERS = "ABCD"


# ----------------------------------------------------------------------------- files

def data_file(name: str, data_dir=None) -> Path:
    """The local path of data file `name` (e.g. "mmlu/test.jsonl.gz"): <shared>/data/name if there, else the
    user cache's copy, else downloaded into the cache first (DATA FILES in the module docstring). Every file is
    checked against its pinned sha256 the first time a process uses it: a cached copy that differs (edited, cut
    short) is fetched again, with a line on stderr; a shared one that differs is refused."""
    if name not in FILES:
        raise UserError(f"unknown data file {name!r} (known: {', '.join(FILES)})")
    shared = shared_dir(data_dir) / "data" / name
    if shared.is_file():
        if not verified(name, shared):
            raise UserError(f"refusing {shared}: its content differs from the pinned sha256 of data/{name} (edited or "
                            f"damaged); restore it, or remove it to let data.py fetch a verified copy")
        return shared
    cached = cache_dir() / "data" / name
    if cached.is_file() and not verified(name, cached):
        print(f"{cached} differs from the pinned sha256 of data/{name} (edited or cut short): fetching it again",
              file=sys.stderr)
        cached.unlink()
    if not cached.is_file():  # a fetched file is whole and verified: it is renamed into place after the checks
        fetch(FILES[name], cached, data_dir)
    return cached


_VERIFIED: dict[Path, tuple] = {}  # path -> (size, mtime) when its content was last found to match its pin


def verified(name: str, path: Path) -> bool:
    """verify(name, path), once per process for an unchanged file (size and modification time)."""
    st = path.stat()
    if _VERIFIED.get(path) == (st.st_size, st.st_mtime_ns):
        return True
    ok = verify(name, path)
    if ok:
        _VERIFIED[path] = (st.st_size, st.st_mtime_ns)
    return ok


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
        if not isinstance(row, dict):
            raise UserError(f"corrupt data file {path}: line {i + 1} is a JSON {type(row).__name__}, not an object")
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
        choices = r["choices"]
        if (not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices)
                or r["answer"] not in (0, 1, 2, 3) or not isinstance(r["question"], str)):
            raise UserError(f"corrupt data file {path}: bad item {str(r['question'])[:40]!r} (needs a question, "
                            "4 string choices and an answer 0-3)")
    return rows


# One item of the MedMCQA corpus (build_medmcqa writes them, blank-line separated; an explanation may hold blank
# lines itself, so items are split before each "Question: ").
MEDMCQA_ITEM = re.compile(r"(?s)Question: (.*?)\nA\. (.*?)\nB\. (.*?)\nC\. (.*?)\nD\. (.*?)\nAnswer: ([ABCD])\. .*?"
                          r"\nExplanation: (.*)")


def load_medmcqa(data_dir=None) -> list[dict]:
    """MedMCQA's questions from the knowledge domain's second corpus, as multiple-choice items with MMLU's fields:
    subject ("medicine"), question, choices (4), answer (0-3). The corpus is never used to build or choose
    anything, so these are unseen questions for every expert and router."""
    path = data_file("corpora/medical_medmcqa.txt.gz", data_dir)
    rows = []
    for item in re.split(r"\n\n(?=Question: )", read_text(path).strip("\n")):
        m = MEDMCQA_ITEM.fullmatch(item)
        if m is None:
            raise UserError(f"corrupt data file {path}: bad item {item[:40]!r} (needs a question, options A-D, "
                            "an answer letter and an explanation)")
        q, *choices, letter, _ = m.groups()
        rows.append({"subject": "medicine", "question": q, "choices": choices, "answer": "ABCD".index(letter)})
    return rows


def load_gsm8k(split: str, data_dir=None) -> list[dict]:
    path = data_file(f"gsm8k/{split}.jsonl", data_dir)
    rows = read_jsonl(path, ("question", "answer"))
    for r in rows:  # the reference is the number after "####": checked here, before any model is loaded
        if not isinstance(r["question"], str) or not isinstance(r["answer"], str) \
                or not re.search(r"####[^\n]*[0-9]", r["answer"]):
            raise UserError(f"corrupt data file {path}: the answer to {str(r['question'])[:40]!r} has no "
                            "'#### <number>' line")
    return rows


def load_humaneval(data_dir=None) -> list[dict]:
    path = data_file("humaneval/HumanEval.jsonl.gz", data_dir)
    fields = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
    rows = read_jsonl(path, fields)
    for i, r in enumerate(rows):  # checked here: a `test` that is a list would otherwise be formatted and run
        bad = [k for k in fields if not isinstance(r[k], str)]
        if bad or not r["entry_point"].isidentifier():
            why = f"{', '.join(bad)} must be text" if bad else "entry_point must be a Python name"
            raise UserError(f"corrupt data file {path}: row {i + 1} ({str(r['task_id'])[:40]!r}): {why}")
    return rows


def load_mbpp(data_dir=None) -> list[dict]:
    path = data_file("mbpp/mbpp.jsonl", data_dir)
    rows = read_jsonl(path, ("task_id", "text", "code", "test_list"))
    for i, r in enumerate(rows):
        tests = r["test_list"]
        if (type(r["task_id"]) is not int or not isinstance(r["text"], str) or not isinstance(r["code"], str)
                or not isinstance(tests, list) or not all(isinstance(t, str) for t in tests)
                or not isinstance(r.get("test_setup_code", ""), str)):
            raise UserError(f"corrupt data file {path}: row {i + 1} (task_id {str(r['task_id'])[:40]!r}) needs an "
                            "integer task_id, string text, code and test_setup_code, and a list of strings test_list")
    return rows


def load_math(data_dir=None) -> list[dict]:
    """The MATH test problems: question (the problem), answer (the worked solution, final answer in \\boxed{})."""
    path = data_file("math/test.jsonl.gz", data_dir)
    rows = read_jsonl(path, ("question", "answer"))
    if not all(isinstance(r["question"], str) and isinstance(r["answer"], str) for r in rows):
        raise UserError(f"corrupt data file {path}: question and answer must be strings")
    return rows


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
    """Cloze format, exactly lm-evaluation-harness's `mmlu_continuation` (its own description line, then
    "Question: ...\nAnswer:"); no options shown; the continuations scored are " " + each answer text."""
    header = f"The following are questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"
    examples = "".join(f"Question: {s['question'].strip()}\nAnswer: {s['choices'][s['answer']]}\n\n" for s in shots)
    return header + examples + f"Question: {doc['question'].strip()}\nAnswer:"


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


def humaneval_program(problem: dict, completion: str) -> CodeTask:
    """The candidate runs prompt + completion; the checker runs the prompt alone (its helpers, like HumanEval/32's
    `poly`, are the benchmark's), then the tests with the entry point calling the candidate's."""
    entry = problem["entry_point"]
    return CodeTask(solution=problem["prompt"] + completion, tests=f"{problem['test']}\n\ncheck({entry})\n",
                    names=(entry,), prelude=problem["prompt"])


def mbpp_program(doc: dict, code: str) -> CodeTask:
    """The candidate runs the code, then test_setup_code (it may build objects of the solution's classes: MBPP 367);
    the checker runs the test asserts, whose free names (the reference solution says which builtins among them it
    redefines) call the candidate."""
    tests = "\n".join(doc["test_list"]) + "\n"
    return CodeTask(solution=code, tests=tests, names=solution_names(tests, doc["code"]),
                    setup=doc.get("test_setup_code", ""))


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
            raise UserError(f"{data_file('corpora/math_gsm8k_train.txt.gz', data_dir)}: corpus does not end at "
                            f"GSM8K train row {len(problems)}; cannot derive a disjoint held-out split")
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


def add_domains_arg(p) -> None:
    """The --domains flag of the stages that build experts; domain_specs checks what it gets."""
    p.add_argument("--domains", nargs="+", default=list(BUILTIN_DOMAINS),
                   help="domains: built-in names and/or NAME=path.txt|.jsonl (your own text)")


def domain_specs(specs: list[str]) -> dict[str, str]:
    """--domains / --domain values -> {name: spec}, each name valid and unique and each user file present, checked
    before anything loads."""
    out = {}
    for spec in specs:
        name, path = parse_domain(spec)
        if name in out:
            raise UserError(f"duplicate domain name {name!r} in {specs}")
        if path is not None and not path.exists():
            raise UserError(f"domain file {path} does not exist")
        out[name] = spec
    return out


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


# Tasks to validate by (search.task_windows): (prompt, answer) pairs of a domain's calibration split, in the
# benchmark's own prompt format, so that a purification can be chosen by how well the model answers, not only by
# how well it predicts text.
TASK_DOMAINS = ("knowledge", "math")


def task_pairs(domain: str, seed: int = 0, data_dir=None) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of a domain's calibration documents, last first, in the order `load_domain_tokens`
    shuffles them with `seed` (its windows come from the first documents, so taking pairs from this end keeps the
    two apart unless a budget reaches across): knowledge = MMLU dev + calib-bucket items as cloze questions with the
    correct answer's text; math = GSM8K train problems of the calibration corpus with their worked answers."""
    if domain == "knowledge":
        rows = load_mmlu("dev", data_dir) + [r for r in load_mmlu("test", data_dir) if mmlu_bucket(r) == "calib"]
        pairs = [(mmlu_cloze_prompt(r, []), " " + r["choices"][r["answer"]]) for r in rows]
    elif domain == "math":
        rows = load_gsm8k("train", data_dir)[:len(builtin_documents("math", "calib", data_dir))]
        pairs = [(gsm8k_prompt(r, []), " " + r["answer"]) for r in rows]
    else:
        raise UserError(f"no task to validate domain {domain!r} by (have {', '.join(TASK_DOMAINS)})")
    return shuffled(pairs, seed)[::-1]


# A second corpus per built-in domain, from another source than its calibration and held-out text, never used to
# build or choose anything: how well an expert's gain transfers under a shift of distribution.
SHIFT_SOURCES = {
    "general": "Shakespeare's plays (tiny-shakespeare), against WikiText articles",
    "code": "HumanEval prompts with their canonical solutions and MBPP solutions, against the CPython standard library",
    "math": "MATH competition problems with worked solutions (the 5,000 test problems), against GSM8K",
    "knowledge": "MedMCQA medical exam questions with answers and explanations, against MMLU",
}


def shift_documents(domain: str, data_dir=None) -> list[str]:
    """The documents of a built-in domain's second corpus (SHIFT_SOURCES)."""
    if domain == "general":  # speeches, grouped into documents of ~20 for some context
        speeches = read_text(data_file("corpora/english_shakespeare.txt.gz", data_dir)).split("\n\n")
        return ["\n\n".join(speeches[i:i + 20]) for i in range(0, len(speeches), 20)]
    if domain == "code":
        human = [r["prompt"] + r["canonical_solution"] for r in load_humaneval(data_dir)]
        return human + [r["code"].replace("\r\n", "\n") for r in load_mbpp(data_dir)]
    if domain == "math":
        return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in load_math(data_dir)]
    if domain == "knowledge":
        return [q.strip() for q in read_text(data_file("corpora/medical_medmcqa.txt.gz", data_dir)).split("\n\n")
                if q.strip()]
    raise UserError(f"no second corpus for domain {domain!r} (have {', '.join(SHIFT_SOURCES)})")


@lru_cache(maxsize=None)
def shift_text(domain: str, data_dir=None) -> str:
    """A domain's second corpus as one text (documents shuffled with seed 0, blank-line separated), as heldout_text."""
    return "\n\n".join(shuffled(shift_documents(domain, data_dir), 0))


def load_domain_tokens(domain: str, tokenizer, data_dir=None, split: str = "calib", n_tokens: int = 32768,
                       seed: int = 0, seq_len: int = 512) -> torch.Tensor:
    """DOWP step 1: token windows of one domain, (N, T) long with N = n_tokens // seq_len (at least 1).

    calib: documents shuffled by `seed`; heldout: shuffled by seed 0 always (the canonical split evaluate.py
    uses). Documents are joined by a blank line and tokenized only until the budget is reached. A model that
    expects <bos> (tokenizer.add_bos: Gemma) gets it at the start of every window, then seq_len - 1 tokens."""
    if n_tokens < seq_len:
        raise UserError(f"token budget {n_tokens} is smaller than one window of {seq_len} tokens")
    docs = shuffled(domain_documents(domain, split, data_dir), seed if split == "calib" else 0)
    bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", False) else []
    width = seq_len - len(bos)  # text tokens per window
    need = n_tokens // seq_len * width
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc + "\n\n", bos=False)
        if len(ids) >= need:
            break
    n = len(ids) // width
    if n == 0:
        raise UserError(f"domain {domain}: the {split} split has only {len(ids)} tokens, fewer than one "
                          f"window of {seq_len}")
    rows = torch.tensor(ids[:min(n * width, need)], dtype=torch.long).view(-1, width)  # (N, T - len(bos))
    return torch.cat([torch.tensor(bos, dtype=torch.long).expand(len(rows), len(bos)), rows], 1)  # (N, T)


# ----------------------------------------------------------------------------- where each data file comes from
#
# FILES: one entry per data file, with the URLs it comes from (raw GitHub files at a fixed commit; the sources are
# those of ../shared/data/MANIFEST.md), the sha256 of those downloads and, for a derived file, the deterministic
# build step that makes it, whose output sha256 is checked too. Sizes are what is downloaded.

def github(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


GSM8K = "openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c"
WIKITEXT = "pytorch/examples", "77f55b912142e11fcfdf5b530231fb9c52f181e8"
MMLU = "HaeChan0305/MLILAB-FedLLM", "d92730e8bacd7b3a61e551e015e40588e10234b4"
CPYTHON = "python/cpython", "fa7a6f23036537567592647d15f043722c7144ad"  # tag v3.11.7

MMLU_SUBJECTS = """
abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry
college_computer_science college_mathematics college_medicine college_physics computer_security
conceptual_physics econometrics electrical_engineering elementary_mathematics formal_logic global_facts
high_school_biology high_school_chemistry high_school_computer_science high_school_european_history
high_school_geography high_school_government_and_politics high_school_macroeconomics high_school_mathematics
high_school_microeconomics high_school_physics high_school_psychology high_school_statistics
high_school_us_history high_school_world_history human_aging human_sexuality international_law jurisprudence
logical_fallacies machine_learning management marketing medical_genetics miscellaneous moral_disputes
moral_scenarios nutrition philosophy prehistory professional_accounting professional_law professional_medicine
professional_psychology public_relations security_studies sociology us_foreign_policy virology world_religions
""".split()

# The code corpus: these CPython 3.11.7 Lib/*.py files, in this order: what "sorted paths; test suites, idlelib,
# lib2to3, tkinter, unittest, ensurepip and files over 150 kB left out; stop after 2 MB" picks, listed so that no
# directory listing is needed. ../shared's copy, made from an installed Python, also holds
# Lib/_sysconfigdata__linux_x86_64-linux-gnu.py, which `make install` writes on the build machine (no public
# source): the corpus built here leaves it out, so code-domain numbers can differ slightly from ../shared's.
CPYTHON_FILES = """
__future__ __hello__ __phello__/__init__ __phello__/spam _aix_support _bootsubprocess _collections_abc
_compat_pickle _compression _markupbase _osx_support _py_abc _pyio _sitebuiltins _strptime
_threading_local _weakrefset abc aifc antigravity argparse ast asynchat asyncio/__init__
asyncio/__main__ asyncio/base_events asyncio/base_futures asyncio/base_subprocess asyncio/base_tasks
asyncio/constants asyncio/coroutines asyncio/events asyncio/exceptions asyncio/format_helpers
asyncio/futures asyncio/locks asyncio/log asyncio/mixins asyncio/proactor_events asyncio/protocols
asyncio/queues asyncio/runners asyncio/selector_events asyncio/sslproto asyncio/staggered
asyncio/streams asyncio/subprocess asyncio/taskgroups asyncio/tasks asyncio/threads asyncio/timeouts
asyncio/transports asyncio/trsock asyncio/unix_events asyncio/windows_events asyncio/windows_utils
asyncore base64 bdb bisect bz2 cProfile calendar cgi cgitb chunk cmd code codecs codeop
collections/__init__ collections/abc colorsys compileall concurrent/__init__ concurrent/futures/__init__
concurrent/futures/_base concurrent/futures/process concurrent/futures/thread configparser contextlib
contextvars copy copyreg crypt csv ctypes/__init__ ctypes/_aix ctypes/_endian ctypes/macholib/__init__
ctypes/macholib/dyld ctypes/macholib/dylib ctypes/macholib/framework ctypes/util ctypes/wintypes
curses/__init__ curses/ascii curses/has_key curses/panel curses/textpad dataclasses datetime
dbm/__init__ dbm/dumb dbm/gnu dbm/ndbm decimal difflib dis distutils/__init__ distutils/_msvccompiler
distutils/archive_util distutils/bcppcompiler distutils/ccompiler distutils/cmd
distutils/command/__init__ distutils/command/bdist distutils/command/bdist_dumb
distutils/command/bdist_rpm distutils/command/build distutils/command/build_clib
""".split()


# Build steps: the downloads ({source: bytes}, in table order) -> the file's text (gzipped on write for a .gz).

def build_text(blobs: dict[str, bytes]) -> bytes:
    (text,) = blobs.values()
    return text


def build_mmlu(blobs: dict[str, bytes]) -> bytes:
    """57 `<subject>_<split>.csv` (question,choice0-3,answer) -> one JSONL row per question, file order kept."""
    rows = []
    for url, text in blobs.items():
        subject = url.rsplit("/", 1)[1].rsplit("_", 1)[0]
        table = list(csv.reader(io.StringIO(text.decode("utf-8"), newline="")))[1:]  # [1:]: the header
        rows += [{"subject": subject, "question": q, "choices": [a, b, c, d], "answer": int(ans)}
                 for q, a, b, c, d, ans in table]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def build_gsm8k_corpus(blobs: dict[str, bytes], limit: int = 3_000_000) -> bytes:
    """`Question: …\\nAnswer: …\\n\\n` per GSM8K train problem, in file order, stopping before `limit` bytes."""
    (text,) = blobs.values()
    out, size = [], 0
    for r in map(json.loads, filter(None, text.decode("utf-8").split("\n"))):  # not splitlines: U+2028
        item = f"Question: {r['question']}\nAnswer: {r['answer']}\n\n".encode()
        if size + len(item) > limit:
            break
        out.append(item)
        size += len(item)
    return b"".join(out)


def build_medmcqa(blobs: dict[str, bytes]) -> bytes:
    """MedMCQA rows (question, opa-opd, cop 1-4, exp) -> question, lettered options, answer, explanation."""
    (text,) = blobs.values()
    out = []
    for r in map(json.loads, filter(None, text.decode("utf-8").split("\n"))):  # not splitlines: U+2028
        options = [r["opa"], r["opb"], r["opc"], r["opd"]]
        out.append(f"Question: {r['question']}\n" + "".join(f"{c}. {o}\n" for c, o in zip(LETTERS, options))
                   + f"Answer: {LETTERS[r['cop'] - 1]}. {options[r['cop'] - 1]}\nExplanation: {r['exp']}\n\n")
    return "".join(out).encode()


def build_code(blobs: dict[str, bytes]) -> bytes:
    """Python files, each after a `# ===== file: Lib/<path> =====` line and followed by a newline."""
    return "".join(f"# ===== file: Lib/{url.split('/Lib/', 1)[1]} =====\n{text.decode('utf-8')}\n"
                   for url, text in blobs.items()).encode()


@dataclass(frozen=True)
class DataFile:
    name: str                  # path under data/, as ../shared/data lays it out
    sources: tuple             # URLs pinned to a commit, or names of other entries, in this order
    sha256: str                # of the sources' bytes, concatenated in order
    size: int                  # bytes downloaded from the URLs
    build: Callable | None = None      # sources -> the file's text; None: the file is the download itself
    built_sha256: str | None = None    # of build's output, before gzip (another zlib may compress differently)
    also_accepted: tuple = ()          # sha256 of other known-good builds of the same file


def _table() -> list[DataFile]:
    mmlu = {split: tuple(github(*MMLU, f"data/mmlu/{split}/{s}_{split}.csv") for s in MMLU_SUBJECTS)
            for split in ("dev", "test")}
    wikitext = "word_language_model/data/wikitext-2/"
    return [
        DataFile("gsm8k/test.jsonl", (github(*GSM8K, "grade_school_math/data/test.jsonl"),),
                 "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", 749738),
        DataFile("gsm8k/train.jsonl", (github(*GSM8K, "grade_school_math/data/train.jsonl"),),
                 "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", 4166206),
        DataFile("humaneval/HumanEval.jsonl.gz",
                 (github("openai/human-eval", "6d43fb980f9fee3c892a914eda09951f772ad10d", "data/HumanEval.jsonl.gz"),),
                 "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef", 44877),
        DataFile("mbpp/mbpp.jsonl",  # OpenCompass's copy: 974 rows, not byte-equal to google's (MANIFEST.md)
                 (github("FormulaMonks/llm-benchmarker-suite", "5d3c8009ab8f5adab4899c34dd203cbf7afcb372",
                         "data/mbpp/mbpp.jsonl"),),
                 "0b5e07b5b40fedd01c57b7c9177b79f8b2eebd72c304c928605d91a7237d2f33", 563742),
        DataFile("mmlu/dev.jsonl.gz", mmlu["dev"],
                 "c42b6f36b1fe4b2f5b6b641dad3319944bffd6940d22392bd76b56923ba2f5cd", 115601,
                 build_mmlu, "071a8344f0bfe8e13a2a056fd45825c8ab8ff40ff793c8396f51cbde9ea911c5"),
        DataFile("mmlu/test.jsonl.gz", mmlu["test"],
                 "beb70992dc542f455829a80d5f9122ef438ce720c64b74ce28fa0714d6229c39", 6362009,
                 build_mmlu, "fdcfe0b7c447753ab85f1f7686f87d201d4521814501d5252502282ef0237ff2"),
        DataFile("corpora/english_wikitext2_valid.txt.gz", (github(*WIKITEXT, wikitext + "valid.txt"),),
                 "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8", 1121681,
                 build_text, "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
        DataFile("corpora/english_wikitext2_test.txt.gz", (github(*WIKITEXT, wikitext + "test.txt"),),
                 "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0", 1256449,
                 build_text, "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
        DataFile("corpora/english_shakespeare.txt.gz",
                 (github("karpathy/char-rnn", "6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e",
                         "data/tinyshakespeare/input.txt"),),
                 "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1115394,
                 build_text, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
        DataFile("corpora/math_gsm8k_train.txt.gz", ("gsm8k/train.jsonl",),  # built from the entry above
                 "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465", 0,
                 build_gsm8k_corpus, "f834f5fab09c8983851c0ef36c26357c2f01c85f89a1a7eacc446cc6ad61a683"),
        DataFile("math/test.jsonl.gz",
                 (github("LightChen233/ECM", "aac9ae2f22e312fac2de44f20e4227922649b5f4", "data/math/test.jsonl"),),
                 "9f498cfae760f977c582e5e325eca3d39e6f1fe9472cef8b5b62d9358f5d8915", 4078333,
                 build_text, "9f498cfae760f977c582e5e325eca3d39e6f1fe9472cef8b5b62d9358f5d8915"),
        DataFile("corpora/medical_medmcqa.txt.gz",
                 (github("LightChen233/ECM", "aac9ae2f22e312fac2de44f20e4227922649b5f4", "data/med_prob/test.jsonl"),),
                 "4a65e4f652e9c91a1d3ca22993aee53edab834e36803e2ff751804aa4f3f5e9d", 661287,
                 build_medmcqa, "ac8275c192db16eed012ec33fa122de1585ef124eafafb17713237de2eae301a"),
        DataFile("corpora/code_python.txt.gz", tuple(github(*CPYTHON, f"Lib/{p}.py") for p in CPYTHON_FILES),
                 "20e694363266289907add809c2a84c26e89a4766ca0c76f8297e94be41e075e3", 1958399,
                 build_code, "c55386254153c36837855b79f9b0d089a916369eb16490544920f0f753e44741",
                 # the copy made from an installed CPython, which also holds the file `make install` generates
                 also_accepted=("24efd71d0a17a4cf38f124690cad6f2284f4978425c45f337adc6bada13893c2",)),
    ]


FILES = {f.name: f for f in _table()}


# ----------------------------------------------------------------------------- download, verify, cache

class DataUnavailable(UserError):
    """A data file that is neither here nor downloadable now (offline): the tests skip on it, scripts stop."""


def source_url(url: str) -> str:
    """The URL requested: the pinned one, or its copy under $FREE_MOE_DATA_URL (laid out as <base>/<host>/<path>)."""
    base = os.environ.get("FREE_MOE_DATA_URL")
    return f"{base.rstrip('/')}/{url.split('://', 1)[1]}" if base else url


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gzip_bytes(data: bytes) -> bytes:
    """gzip as ../shared stores it (level 9, mtime 0, no file name): the same text gives the same bytes."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(data)
    return buf.getvalue()


def download(url: str, bar, name: str, dest: Path, deadline: downloads.Deadline) -> bytes:
    """The bytes at url, within the deadline (downloads.py): connect, headers and body together, so a server that
    trickles a byte now and then cannot hang the run."""
    url, parts = source_url(url), []
    take = lambda chunk: (parts.append(chunk), bar.update(len(chunk)))  # noqa: E731
    try:
        downloads.download(url, take, deadline)
    except downloads.TooSlow:
        raise DataUnavailable(f"downloading data/{name} from {url} is too slow ({sum(map(len, parts))} bytes, "
                              f"not done in {deadline.seconds:.0f} s): giving up; put data/{name} at {dest} by "
                              f"hand, or set --data-dir / $FREE_MOE_SHARED") from None
    except (OSError, http.client.HTTPException) as e:  # offline, DNS, 404, a reset: one line, what to do by hand
        why = getattr(e, "reason", e)
        raise DataUnavailable(f"cannot download data/{name} from {url} ({why}); put data/{name} at {dest} by hand "
                              f"(`python data.py` makes it where there is network), or set --data-dir / "
                              f"$FREE_MOE_SHARED to a folder holding data/{name}") from None
    return b"".join(parts)


def fetch(f: DataFile, dest: Path, data_dir=None):
    """Download f's sources, check them, build, check again, and only then write dest (atomically): an interrupted
    or refused fetch leaves no file that could later look whole."""
    urls = [s for s in f.sources if "://" in s]
    if urls:
        print(f"downloading data/{f.name} ({f.size / 1e6:.2f} MB) into {dest.parent}", file=sys.stderr)
    # one deadline for all of the file's URLs; leaving the block (a failure, Ctrl-C, SIGTERM) shuts every
    # connection still open, so the threads still reading end at once
    with progress(total=f.size, unit="B", unit_scale=True, desc=f.name) as bar, \
            downloads.Deadline(downloads.allowed_seconds(f.size)) as deadline:
        ex = ThreadPoolExecutor(8)  # 8 at a time: MMLU is 57 small files
        try:
            got = dict(zip(urls, ex.map(lambda u: download(u, bar, f.name, dest, deadline), urls)))
        except BaseException:
            deadline.expire()  # before waiting for the threads below
            raise
        finally:
            ex.shutdown(cancel_futures=True)  # after a failure (offline), do not wait for the rest to time out
    blobs = {s: got[s] if s in got else data_file(s, data_dir).read_bytes() for s in f.sources}
    if (digest := sha256(b"".join(blobs.values()))) != f.sha256:
        raise UserError(f"refusing data/{f.name}: its download has sha256 {digest}, pinned {f.sha256} "
                        f"(changed upstream, a cut-short download or a bad mirror); nothing was written")
    data = blobs[f.sources[0]]
    if f.build:
        data = f.build(blobs)
        if (digest := sha256(data)) != f.built_sha256:
            raise UserError(f"refusing data/{f.name}: the built file has sha256 {digest}, pinned {f.built_sha256}; "
                            f"nothing was written")
        data = gzip_bytes(data) if f.name.endswith(".gz") else data
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(dest, data)


def verify(name: str, path: Path) -> bool:
    """Does the file at path hold what FILES pins (for a built .gz: after gunzip)?"""
    f, data = FILES[name], path.read_bytes()
    if f.build is None:
        return sha256(data) == f.sha256
    try:
        digest = sha256(gzip.decompress(data) if name.endswith(".gz") else data)
    except (OSError, EOFError):  # a cut-short or not-gzip file
        return False
    return digest in (f.built_sha256, *f.also_accepted)


def main():
    p = argparse.ArgumentParser(description="Fetch, build and verify every data file ahead of time (make data).")
    p.add_argument("--data-dir", default=None, help="shared assets dir (default: $FREE_MOE_SHARED or ../shared)")
    p.add_argument("--verify", action="store_true", help="re-check the sha256 of every file found, shared ones too")
    args = p.parse_args()
    print(f"{sum(f.size for f in FILES.values()) / 1e6:.1f} MB when nothing is local; cache: {cache_dir() / 'data'}")
    for name in FILES:
        path = data_file(name, args.data_dir)
        status = ("ok      " if verify(name, path) else "DIFFERS ") if args.verify else ""
        print(f"{status}{name:40s} {path}")


if __name__ == "__main__":
    run_cli(main)
