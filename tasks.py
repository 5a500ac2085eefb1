"""tasks.py — the benchmarks: which items, the one prompt of each, how an answer is scored, what is reported.

Used by evaluate.py, which runs every system on every task's items and resumes. A benchmark is one entry of
BENCHMARKS: its name, the expert domain its items belong to (written once: the oracle system runs that expert,
and budget-matched baselines spend Free-MoE's fraction of that domain), a `prepare` that selects the items and
states the settings the results depend on, a `run` that scores a batch of items for one system, and optionally the
columns and breakdowns it reports. Adding a benchmark = writing those functions and adding one entry.

    mmlu       k-shot (dev split) in the lm-evaluation-harness format, scored by the log-likelihood of
               " A".." D"; also a cloze variant (lm-evaluation-harness `mmlu_continuation`: log-likelihood of the
               answer text, acc_norm = normalised per character of the answer) because small models sit at chance
               on letters. Reported: accuracy, per subject, per category, macro. --mmlu-items eval (default) scores
               only the test items of the "eval" bucket (70%): the other 30% are the knowledge domain's
               calibration (20%) and held-out (10%) text (data.py); --mmlu-items all scores all 14,042 and reports
               each bucket apart too.
    medmcqa    MedMCQA's 996 medical exam questions (the knowledge domain's second corpus, never used to build or
               choose anything), zero-shot, scored exactly as MMLU: letters and cloze (acc_norm).
    gsm8k      k-shot chain of thought (train split), greedy, stop at the next "Question:"; the answer is the
               number after "####" or else the last number; exact match after normalising "," "$" and ".0".
    gsm8k_answer  bits per byte of each GSM8K test problem's reference worked answer given the question (zero-shot):
               how likely the model finds the right reasoning, where exact match sits at the floor for small models.
    humaneval  greedy completion with the usual stop sequences; pass@1 (pass@k, unbiased, with --samples n).
    mbpp       3-shot "[BEGIN] ... [DONE]" prompts on the test split (task ids 11-510), same scoring.
    ppl        perplexity and bits per byte on the held-out split of each domain (general, code, math,
               knowledge), in non-overlapping windows of --seq-len tokens.
    shift      the same on each domain's second corpus, from another source than anything used to build the experts
               or the router (data.SHIFT_SOURCES: Shakespeare, HumanEval + MBPP solutions, MATH, MedMCQA).
Every system sees the same items: --limit picks a seeded, prefix-stable subset of each task.

Shape legend: B batch (rows), T time (tokens).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import random
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

import sandbox
from cli import UserError
from data import (LETTERS, gsm8k_prompt, heldout_text, humaneval_program, load_gsm8k, load_humaneval, load_mbpp,
                  load_medmcqa, load_mmlu, mbpp_program, mbpp_prompt, mmlu_bucket, mmlu_cloze_prompt, mmlu_prompt,
                  shift_text)
from generate import generate
from scoring import loglikelihoods, window_nll

PPL_DOMAINS = ("general", "code", "math", "knowledge")
MMLU_ITEMS = ("eval", "all")  # --mmlu-items: the eval bucket only, or every test item (buckets reported apart)

# The standard 57-subject split into 4 categories, as in lm-evaluation-harness (mmlu/_generate_configs.py).
# (Hendrycks' original categories.py differs in one subject: anatomy is "other (health)" there.)
MMLU_CATEGORIES = {
    "STEM": ["abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
             "college_computer_science", "college_mathematics", "college_physics", "computer_security",
             "conceptual_physics", "electrical_engineering", "elementary_mathematics", "high_school_biology",
             "high_school_chemistry", "high_school_computer_science", "high_school_mathematics",
             "high_school_physics", "high_school_statistics", "machine_learning"],
    "humanities": ["formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"],
    "social sciences": ["econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"],
    "other": ["business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition",
              "professional_accounting", "professional_medicine", "virology"],
}
MMLU_SUBJECT_CATEGORY = {s: c for c, subjects in MMLU_CATEGORIES.items() for s in subjects}
# The subjects whose questions are mostly calculation: where a math expert could matter (reported as a group).
MMLU_MATH = ["abstract_algebra", "college_mathematics", "elementary_mathematics", "high_school_mathematics",
             "high_school_statistics", "college_physics", "high_school_physics", "econometrics"]

# Stop sequences. The chat-model end markers are there because an instruct model may close its turn in text.
END_MARKERS = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"]
GSM8K_STOPS = ["Question:", "\n\n\n"] + END_MARKERS
HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "] + END_MARKERS
MBPP_STOPS = ["[DONE]", "\n[BEGIN]"] + END_MARKERS




# ----------------------------------------------------------------------------- the task interface

@dataclass
class Runtime:
    """What scoring a batch needs besides the system: the model, its tokenizer and the parsed arguments."""
    model: object
    tokenizer: object
    args: argparse.Namespace


@dataclass
class Task:
    """A prepared benchmark: its items (selected once, shared by all systems), the settings that define its results
    (stored in the items' header: a resume with other settings is refused) and how a batch is scored."""
    name: str
    domain: str  # the expert domain of its items ("mixed" for ppl: each item carries its own "domain")
    items: list[dict]  # each has "id" and "prompt" (text, or token ids for ppl)
    settings: dict
    run_batch: Callable  # (rt, system, items, domain) -> list of records


@dataclass(frozen=True)
class Benchmark:
    name: str
    domain: str
    prepare: Callable  # (rt) -> (items, settings)
    run: Callable  # (rt, system, items, domain) -> records, each with "id", "correct" or its own columns
    check: Callable  # (args) -> None: reads every data file it needs (a bad file is reported before the model loads)
    columns: Callable | None = None  # (settings, records) -> {column: (num, den)}; default: accuracy of "correct"
    details: Callable | None = None  # (settings, records) -> breakdowns reported beside the columns
    groups: Callable | None = None  # (record) -> group names: each column is also reported per group, paired
    group_order: tuple = ()  # the order the groups are reported in


def prepare(name: str, rt: Runtime) -> Task:
    b = BENCHMARKS[name]
    items, settings = b.prepare(rt)
    return Task(name, b.domain, items, settings, b.run)


def columns_of(task: Task, records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The headline numbers of a task as (numerator, denominator) per item: a score is sum(num) / sum(den)."""
    b = BENCHMARKS[task.name]
    if b.columns:
        return b.columns(task.settings, records)
    return {task.name: (np.array([r["correct"] for r in records]), np.ones(len(records)))}


def task_details(task: Task, records: list[dict]) -> dict:
    b = BENCHMARKS[task.name]
    return b.details(task.settings, records) if b.details else {}



# ----------------------------------------------------------------------------- item selection

def parse_limits(values: list[str] | None) -> dict:
    """--limit 100 humaneval=164 -> {"*": 100, "humaneval": 164}: a default for every task plus per-task overrides."""
    limits = {}
    for v in values or []:
        task, _, n = v.rpartition("=")
        if task and task not in ALL_TASKS:
            raise UserError(f"--limit {v}: unknown task {task!r} (expected one of {', '.join(ALL_TASKS)})")
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"--limit {v}: expected a positive item count")
        limits[task or "*"] = int(n)
    return limits


def limit_for(args, task: str) -> int | None:
    return args.limits.get(task, args.limits.get("*"))


def select(items: list, limit: int | None, seed: int) -> list:
    """A seeded subset of `limit` items, kept in dataset order. Prefix-stable: the items chosen with --limit 50
    are among those chosen with --limit 100, so a larger run reuses a smaller one's finished items."""
    if not limit or limit >= len(items):
        return list(items)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in sorted(order[:limit])]


# ----------------------------------------------------------------------------- answers

def cut_at_stops(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def prompt_sha(text) -> str:
    return hashlib.sha256(str(text).encode()).hexdigest()[:16]


# A number: optional minus and $, digits with thousands commas, optional decimals. A minus right after a
# letter, digit or ")" is a subtraction ("12-3"), not a sign; that is decided in `numbers_in`.
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def normalize_number(s: str) -> str:
    """'$1,234.50' -> '1234.5', '7.0' -> '7', '-0' -> '0', '.5' -> '0.5'."""
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    neg = s.startswith("-")
    s = s.lstrip("-")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    s = s.lstrip("0") or "0"
    if s.startswith("."):
        s = "0" + s
    return "-" + s if neg and s != "0" else s


def numbers_in(text: str) -> list[str]:
    out = []
    for m in _NUMBER.finditer(text):
        s = m.group()
        if s.startswith("-") and m.start() > 0 and (text[m.start() - 1].isalnum() or text[m.start() - 1] in ")]"):
            s = s[1:]  # "12-3": a minus sign glued to the previous token is subtraction
        if s.strip("-$,."):
            out.append(normalize_number(s))
    return out


def extract_gsm8k_answer(text: str) -> str | None:
    """The first number after the last "####" if there is one, else the last number in the text; None if none.
    Numbers are read by `numbers_in` (commas dropped, "3.50" -> "3.5"), as the references are."""
    if "####" in text:
        after = numbers_in(text.rsplit("####", 1)[1])
        if after:
            return after[0]
    found = numbers_in(text)
    return found[-1] if found else None


def gsm8k_reference(doc: dict) -> str:
    return normalize_number(doc["answer"].rsplit("####", 1)[1])


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) of n samples of which c pass: 1 - C(n-c, k) / C(n, k), the chance that k
    samples drawn without replacement hold a passing one; computed as a product (no huge binomials). 1.0 when
    fewer than k samples fail."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))



def complete(rt: "Runtime", prompts: list[str], stops: list[str], max_new_tokens: int, mlps=None,
             temperature: float = 0.0, seed: int | None = None) -> tuple[list[str], int]:
    """Batched generation (left-padded, KV cache, via generate.generate); texts cut at the first stop string.
    Returns (texts, tokens processed = prompt + generated)."""
    tok = rt.tokenizer
    ids = [tok.encode(p)[-(rt.model.config.max_seq_len - max_new_tokens):] for p in prompts]
    new = generate(rt.model, ids, max_new_tokens, temperature=temperature, stop_strings=stops, tokenizer=tok,
                   mlps=mlps, seed=seed)
    texts = [cut_at_stops(tok.decode(row), stops) for row in new]
    return texts, sum(map(len, ids)) + sum(map(len, new))


# ----------------------------------------------------------------------------- the benchmarks

def prepare_mmlu(rt: Runtime) -> tuple[list[dict], dict]:
    k = rt.args.mmlu_shots
    dev: dict[str, list] = {}
    for d in load_mmlu("dev", rt.args.data_dir):
        dev.setdefault(d["subject"], []).append(d)
    unknown = sorted(set(dev) - set(MMLU_SUBJECT_CATEGORY))
    if unknown:
        raise UserError(f"unknown MMLU subjects in the data: {unknown[:3]}")
    test, counter = [], {}
    for d in load_mmlu("test", rt.args.data_dir):
        i = counter[d["subject"]] = counter.get(d["subject"], -1) + 1
        bucket = mmlu_bucket(d)
        if bucket != "eval" and rt.args.mmlu_items == "eval":  # 20%: knowledge calibration text, 10%: its held-out text
            continue
        shots = dev.get(d["subject"], [])[:k]  # harness "first_n": the first k dev items of the subject
        item = {"id": f"{d['subject']}/{i}", "doc": d, "prompt": mmlu_prompt(d, shots),
                "cloze": mmlu_cloze_prompt(d, shots)}
        test.append({**item, "bucket": bucket} if rt.args.mmlu_items == "all" else item)  # reported with all
    if rt.args.mmlu_per_subject:  # stratified: K from every subject, in dataset order
        chosen = {it["id"] for subject in MMLU_SUBJECT_CATEGORY
                  for it in select([t for t in test if t["doc"]["subject"] == subject], rt.args.mmlu_per_subject,
                                   rt.args.seed)}
        picked = [it for it in test if it["id"] in chosen]
    else:
        picked = select(test, limit_for(rt.args, "mmlu"), rt.args.seed)
    items = "eval bucket" if rt.args.mmlu_items == "eval" else "all"  # the value stored results carry
    return picked, {"shots": k, "items": items}


def prepare_medmcqa(rt: Runtime) -> tuple[list[dict], dict]:
    items = [{"id": f"medmcqa/{i}", "doc": d, "prompt": mmlu_prompt(d, []), "cloze": mmlu_cloze_prompt(d, [])}
             for i, d in enumerate(load_medmcqa(rt.args.data_dir))]
    return select(items, limit_for(rt.args, "medmcqa"), rt.args.seed), {"shots": 0}


def run_choices(rt: Runtime, system, items: list[dict], domain: str) -> list[dict]:
    """A multiple-choice item (MMLU's fields) scored two ways from one batch of log-likelihoods: the letters
    " A".." D" after the lettered prompt, and each answer text after the cloze prompt (MMLU, MedMCQA)."""
    tok, reqs = rt.tokenizer, []
    for it in items:
        ctx, cloze = tok.encode(it["prompt"]), tok.encode(it["cloze"])
        reqs += [(ctx, tok.encode(f" {L}", bos=False)) for L in LETTERS]
        reqs += [(cloze, tok.encode(f" {c}", bos=False)) for c in it["doc"]["choices"]]
    mlps, frac, route = system.pick([tok.encode(it["prompt"]) for it in items], domain)
    ll = loglikelihoods(rt.model, reqs, mlps, rt.args.batch_tokens)
    records = []
    for j, it in enumerate(items):
        letters, cloze = ll[8 * j:8 * j + 4], ll[8 * j + 4:8 * j + 8]
        # cloze accuracy is the harness's acc_norm: log-likelihood per character of the answer text (the choice
        # string, without the leading space), so longer answers are not penalised
        norm = [x / max(1, len(c)) for x, c in zip(cloze, it["doc"]["choices"])]
        ans = it["doc"]["answer"]
        records.append({"id": it["id"], "prompt_sha": prompt_sha(it["prompt"]), "subject": it["doc"]["subject"],
                        "prediction": LETTERS[int(np.argmax(letters))], "reference": LETTERS[ans],
                        "correct": float(np.argmax(letters) == ans), "correct_cloze": float(np.argmax(norm) == ans),
                        "loglik_letters": letters, "loglik_cloze": cloze, "active_fraction": frac,
                        **({"route": route} if route else {}), **({"bucket": it["bucket"]} if "bucket" in it else {}),
                        "tokens": len(reqs[8 * j][0]) + len(reqs[8 * j + 4][0]) + 4})
    return records


def prepare_gsm8k(rt: Runtime) -> tuple[list[dict], dict]:
    k = rt.args.gsm8k_shots
    train = load_gsm8k("train", rt.args.data_dir)
    shots = select(train, k, rt.args.seed) if k else []  # the same k shots for every question
    test = [{"id": str(i), "doc": d, "prompt": gsm8k_prompt(d, shots)}
            for i, d in enumerate(load_gsm8k("test", rt.args.data_dir))]
    settings = {"shots": k, "max_new_tokens": rt.args.gsm8k_max_tokens}
    return select(test, limit_for(rt.args, "gsm8k"), rt.args.seed), settings


def run_gsm8k(rt: Runtime, system, items: list[dict], domain: str) -> list[dict]:
    prompts = [it["prompt"] for it in items]
    mlps, frac, route = system.pick([rt.tokenizer.encode(p) for p in prompts], domain)
    texts, n_tok = complete(rt, prompts, GSM8K_STOPS, rt.args.gsm8k_max_tokens, mlps)
    records = []
    for it, text in zip(items, texts):
        pred, ref = extract_gsm8k_answer(text), gsm8k_reference(it["doc"])
        records.append({"id": it["id"], "prompt_sha": prompt_sha(it["prompt"]), "prediction": pred, "reference": ref,
                        "correct": float(pred == ref), "completion": text, "tokens": n_tok / len(items),
                        "active_fraction": frac, **({"route": route} if route else {})})
    return records


def prepare_gsm8k_answer(rt: Runtime) -> tuple[list[dict], dict]:
    """GSM8K test questions (zero-shot prompt) with their reference worked answers, to score how likely the model
    finds the right reasoning: a continuous measure where exact-match accuracy sits at the floor."""
    test = [{"id": str(i), "doc": d, "prompt": gsm8k_prompt(d, []), "answer": " " + d["answer"]}
            for i, d in enumerate(load_gsm8k("test", rt.args.data_dir))]
    return select(test, limit_for(rt.args, "gsm8k_answer"), rt.args.seed), {"shots": 0}


def run_gsm8k_answer(rt: Runtime, system, items: list[dict], domain: str) -> list[dict]:
    tok = rt.tokenizer
    mlps, frac, route = system.pick([tok.encode(it["prompt"]) for it in items], domain)
    reqs = [(tok.encode(it["prompt"]), tok.encode(it["answer"], bos=False)) for it in items]
    ll = loglikelihoods(rt.model, reqs, mlps, rt.args.batch_tokens)
    return [{"id": it["id"], "prompt_sha": prompt_sha(it["prompt"]), "nll": -x, "bytes": len(it["answer"].encode()),
             "tokens": len(c) + len(a), "active_fraction": frac, **({"route": route} if route else {})}
            for it, x, (c, a) in zip(items, ll, reqs)]


def answer_columns(settings: dict, records: list[dict]) -> dict:
    """Bits per byte of the reference answers given their questions (lower is better)."""
    return {"bpb_gsm8k_answer": (np.array([r["nll"] / math.log(2) for r in records]),
                                 np.array([float(r["bytes"]) for r in records]))}


def prepare_humaneval(rt: Runtime) -> tuple[list[dict], dict]:
    items = [{"id": d["task_id"], "doc": d, "prompt": d["prompt"]} for d in load_humaneval(rt.args.data_dir)]
    return select(items, limit_for(rt.args, "humaneval"), rt.args.seed), _code_settings(rt)


def prepare_mbpp(rt: Runtime) -> tuple[list[dict], dict]:
    rows = {d["task_id"]: d for d in load_mbpp(rt.args.data_dir)}
    shots = [rows[i] for i in (2, 3, 4) if i in rows]  # the standard prompt split is task ids 1-10
    items = [{"id": str(i), "doc": rows[i], "prompt": mbpp_prompt(rows[i], shots)} for i in range(11, 511) if i in rows]
    return select(items, limit_for(rt.args, "mbpp"), rt.args.seed), _code_settings(rt)


def _code_settings(rt: Runtime) -> dict:
    a = rt.args
    return {"samples": a.samples, "temperature": a.temperature,
            "max_new_tokens": a.code_max_tokens, "timeout": a.timeout}


def _run_code(rt, system, items, domain, stops, to_program) -> list[dict]:
    a = rt.args
    n, temperature = a.samples, a.temperature
    prompts = [it["prompt"] for it in items]
    mlps, frac, route = system.pick([rt.tokenizer.encode(p) for p in prompts], domain)
    samples, n_tok = [[] for _ in items], 0
    for s in range(n):  # sample s of every item in one batch; seeded so a re-run draws the same samples
        seed = a.seed + s if n > 1 else None
        texts, t = complete(rt, prompts, stops, a.code_max_tokens, mlps, temperature, seed=seed)
        n_tok += t
        for j, text in enumerate(texts):
            samples[j].append(text)
    programs = [to_program(it, c) for it, cs in zip(items, samples) for c in cs]
    results = sandbox.run_many(programs, a.timeout, a.workers, allow_unsandboxed=a.allow_unsandboxed)
    records = []
    for j, it in enumerate(items):
        res = results[j * n:(j + 1) * n]
        c = sum(r.passed for r in res)
        records.append({"id": it["id"], "prompt_sha": prompt_sha(it["prompt"]), "prediction": samples[j][0],
                        "reference": it["doc"].get("entry_point", it["doc"].get("code", "")),
                        "statuses": [r.status for r in res], "errors": sum(r.status == "error" for r in res),
                        "n": n, "c": c, "correct": c / n,
                        "tokens": n_tok / len(items), "active_fraction": frac,
                        **({"route": route} if route else {})})
    return records


def run_humaneval(rt, system, items, domain):
    return _run_code(rt, system, items, domain, HUMANEVAL_STOPS, lambda it, c: humaneval_program(it["doc"], c))


def run_mbpp(rt, system, items, domain):
    return _run_code(rt, system, items, domain, MBPP_STOPS, lambda it, c: mbpp_program(it["doc"], c))


def text_windows(rt: Runtime, task: str, text_of) -> list[dict]:
    """Items of --seq-len-token windows cut from `text_of(domain)` of each --ppl-domains domain; the first token of a
    window has no context and is not scored. --ppl-windows (else --limit) picks a seeded subset per domain."""
    n = rt.args.seq_len
    items = []
    for domain in rt.args.ppl_domains:
        ids = rt.tokenizer.encode(text_of(domain, rt.args.data_dir), bos=False)
        bos = [rt.tokenizer.bos_id] if rt.tokenizer.add_bos else []  # Gemma: every window starts with <bos>
        w = n - len(bos)  # text tokens per window
        windows = [bos + ids[i:i + w] for i in range(0, len(ids) - 1, w) if len(bos + ids[i:i + w]) > 1]
        picked = select(list(enumerate(windows)), rt.args.ppl_windows or limit_for(rt.args, task), rt.args.seed)
        items += [{"id": f"{domain}/{i}", "domain": domain, "prompt": w} for i, w in picked]
    return items


def prepare_ppl(rt: Runtime) -> tuple[list[dict], dict]:
    """Each domain's held-out split (data.heldout_text)."""
    return text_windows(rt, "ppl", heldout_text), {"seq_len": rt.args.seq_len, "domains": list(rt.args.ppl_domains)}


def prepare_shift(rt: Runtime) -> tuple[list[dict], dict]:
    """Each domain's second corpus (data.shift_text): the same windows and scoring as ppl, on text from another
    source than anything the experts or the router saw."""
    settings = {"seq_len": rt.args.seq_len, "domains": list(rt.args.ppl_domains), "corpus": "shift"}
    return text_windows(rt, "shift", shift_text), settings


def run_ppl(rt: Runtime, system, items: list[dict], domain: str) -> list[dict]:
    records = []
    for domain in sorted({it["domain"] for it in items}):  # one domain per forward (matters for the oracle)
        group = [it for it in items if it["domain"] == domain]
        mlps, frac, route = system.pick([it["prompt"] for it in group], domain)
        nll = window_nll(rt.model, [it["prompt"] for it in group], mlps,
                         rt.args.batch_tokens // max(len(it["prompt"]) for it in group)).tolist()
        for it, x in zip(group, nll):
            n_bytes = len(rt.tokenizer.decode(it["prompt"][1:]).encode("utf-8"))
            records.append({"id": it["id"], "prompt_sha": prompt_sha(it["prompt"]), "domain": domain,
                            "nll": x, "scored_tokens": len(it["prompt"]) - 1, "bytes": n_bytes,
                            "tokens": len(it["prompt"]), "active_fraction": frac,
                            **({"route": route} if route else {})})
    return records


def check_mmlu(args):
    load_mmlu("dev", args.data_dir), load_mmlu("test", args.data_dir)


def check_gsm8k(args):
    load_gsm8k("train", args.data_dir), load_gsm8k("test", args.data_dir)


def check_ppl(args):
    for d in args.ppl_domains:
        heldout_text(d, args.data_dir)


def check_shift(args):
    for d in args.ppl_domains:
        shift_text(d, args.data_dir)


def check_data(args):
    """Read every data file the requested tasks need, so a missing or corrupt file is reported in a second,
    before the model loads."""
    for t in args.tasks:
        BENCHMARKS[t].check(args)


# ----------------------------------------------------------------------------- columns and breakdowns

def choice_columns(name: str, records: list[dict]) -> dict:
    """A multiple-choice task's two accuracies: letters (`name`) and cloze (`name`_cloze)."""
    ones = np.ones(len(records))
    return {name: (np.array([r["correct"] for r in records]), ones),
            f"{name}_cloze": (np.array([r["correct_cloze"] for r in records]), ones)}


def mmlu_columns(settings: dict, records: list[dict]) -> dict:
    return choice_columns("mmlu", records)


def medmcqa_columns(settings: dict, records: list[dict]) -> dict:
    return choice_columns("medmcqa", records)


def ppl_columns(settings: dict, records: list[dict]) -> dict:
    """Bits per byte of each domain: total NLL in bits over the bytes of the predicted text (bpb_shift_*: the
    second corpus)."""
    cols, prefix = {}, "bpb_shift_" if settings.get("corpus") == "shift" else "bpb_"
    for d in settings["domains"]:
        rs = [r for r in records if r["domain"] == d]
        bits = np.array([r["nll"] / math.log(2) for r in rs])
        cols[f"{prefix}{d}"] = (bits, np.array([float(r["bytes"]) for r in rs]))
    return cols


def mmlu_details(settings: dict, records: list[dict]) -> dict:
    """Per subject, per category (mean over the subjects present) and the macro mean over subjects."""
    out = {}
    for key in ("correct", "correct_cloze"):
        subj = {}
        for r in records:
            subj.setdefault(r["subject"], []).append(r[key])
        subj = {s: float(np.mean(v)) for s, v in sorted(subj.items())}
        cats = {c: float(np.mean([subj[s] for s in ss if s in subj])) for c, ss in MMLU_CATEGORIES.items()
                if any(s in subj for s in ss)}
        name = "letters" if key == "correct" else "cloze"
        out[name] = {"macro_subjects": round(float(np.mean(list(subj.values()))), 6),
                     "categories": {c: round(v, 6) for c, v in cats.items()},
                     "subjects": {s: round(v, 6) for s, v in subj.items()}}
    return out


def mmlu_groups(record: dict) -> list[str]:
    """The groups an MMLU item is also reported in (item-weighted, paired against dense): its category, the
    calculation-heavy subjects, and with --mmlu-items all its bucket."""
    out = [MMLU_SUBJECT_CATEGORY[record["subject"]]] + (["math subjects"] if record["subject"] in MMLU_MATH else [])
    return out + ([f"bucket {record['bucket']}"] if "bucket" in record else [])


def ppl_details(settings: dict, records: list[dict]) -> dict:
    out = {}
    for d in settings["domains"]:
        rs = [r for r in records if r["domain"] == d]
        nll, toks = sum(r["nll"] for r in rs), sum(r["scored_tokens"] for r in rs)
        out[d] = {"ppl": round(math.exp(nll / toks), 6), "tokens": toks, "bytes": sum(r["bytes"] for r in rs)}
    return out


def code_details(settings: dict, records: list[dict]) -> dict:
    n = records[0]["n"]
    return {f"pass@{k}": round(float(np.mean([pass_at_k(r["n"], r["c"], k) for r in records])), 6)
            for k in (1, 10, 100) if k <= n}


# ----------------------------------------------------------------------------- the registry

BENCHMARKS = {b.name: b for b in [
    Benchmark("mmlu", "knowledge", prepare_mmlu, run_choices, check_mmlu, mmlu_columns, mmlu_details, mmlu_groups,
              (*MMLU_CATEGORIES, "math subjects", "bucket eval", "bucket calib", "bucket heldout")),
    Benchmark("medmcqa", "knowledge", prepare_medmcqa, run_choices, lambda a: load_medmcqa(a.data_dir),
              medmcqa_columns),
    Benchmark("gsm8k", "math", prepare_gsm8k, run_gsm8k, check_gsm8k),
    Benchmark("gsm8k_answer", "math", prepare_gsm8k_answer, run_gsm8k_answer, check_gsm8k, answer_columns),
    Benchmark("humaneval", "code", prepare_humaneval, run_humaneval, lambda a: load_humaneval(a.data_dir),
              details=code_details),
    Benchmark("mbpp", "code", prepare_mbpp, run_mbpp, lambda a: load_mbpp(a.data_dir), details=code_details),
    Benchmark("ppl", "mixed", prepare_ppl, run_ppl, check_ppl, ppl_columns, ppl_details),
    Benchmark("shift", "mixed", prepare_shift, run_ppl, check_shift, ppl_columns, ppl_details),
]}
ALL_TASKS = tuple(BENCHMARKS)
