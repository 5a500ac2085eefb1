"""evaluate.py — score dense vs Free-MoE vs baselines on MMLU, GSM8K, HumanEval, MBPP and domain perplexity.

Pipeline position: the last stage
    model.py  ->  purify.py (DOWP, DSS-Experts)  ->  train_router.py / router.py  ->  evaluate.py

What goes in:  a model (--model, default SmolLM2-135M-Instruct), the shared benchmark data (<shared>/data, or
               --data-dir), and for the sparse systems the experts file from purify.py (--experts) and the
               router from train_router.py (--router).
What comes out (under --out, default results/):
    items/<system>/<task>.jsonl  one line per item (prompt hash, prediction, reference, correct, timing), appended
                                 and flushed as it goes; a re-run resumes and skips finished items (its first
                                 line: model, settings and, for sparse systems, the experts/router identity; a
                                 resume with different ones is refused, so a table never mixes two experts files)
    results.json                 every score with a 95% bootstrap interval and its difference to dense; no timings,
                                 so an interrupted-and-resumed run writes the same bytes as an uninterrupted one
    timings.json                 tokens/s per system and task (wall clock: differs run to run)
    results.md                   the table: rows = systems, columns = tasks, Δ vs dense in each cell

    python evaluate.py --systems dense --tasks mmlu gsm8k humaneval ppl --limit 50
    python evaluate.py --model PATH --systems dense freemoe general random --experts experts.pt \
        --router router.pt --tasks mmlu gsm8k humaneval ppl --limit 200 --out results/

Tasks (every system sees the same items: --limit picks a seeded, prefix-stable subset of each task):
    mmlu       k-shot (dev split) in the lm-evaluation-harness format, scored by the log-likelihood of
               " A".." D"; also a cloze variant (lm-evaluation-harness `mmlu_continuation`: log-likelihood of the
               answer text, acc_norm = normalised per character of the answer) because small models sit at chance
               on letters. Reported: accuracy, per subject, per category, macro.
               Only the test items of purify.py's "eval" bucket (70%): the other 30% calibrate or validate experts.
    gsm8k      k-shot chain of thought (train split), greedy, stop at the next "Question:"; the answer is the
               number after "####" or else the last number; exact match after normalising "," "$" and ".0".
    humaneval  greedy completion with the usual stop sequences; pass@1 (pass@k, unbiased, with --samples n).
    mbpp       3-shot "[BEGIN] ... [DONE]" prompts on the test split (task ids 11-510), same scoring.
    ppl        perplexity and bits per byte on purify.py's held-out split of each domain (general, code, math,
               knowledge), in non-overlapping windows of --seq-len tokens.
    integrated the paper's mixed-domain setting: all selected accuracy items of the tasks above pooled into one
               number. Every system picks its FFNs per prompt, so the pooled score over the union is the
               score of the shuffled mixture (order cannot change a per-prompt decision).

Systems (all at the same active FFN fraction as freemoe, except dense):
    dense      the original model (mlps=None)
    freemoe    router + DSS-Experts              oracle     the expert of the item's true domain
    mixed      one expert purified on all domains general    the general-domain expert for every item
    random     random neurons                    magnitude  neurons with the largest weight norms
    The non-dense systems load the experts file of purify.py (and train_router.py's router) in `build_systems`;
    each row reports the active FFN fraction it actually ran at, averaged over items.

Code execution: every HumanEval / MBPP program runs in sandbox.py (see its docstring for what it covers).

Shape legend: B batch (rows), T time (tokens), C width, V vocab.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

import purify
import router
import sandbox
from cli import (ArgumentParser, UserError, add_common_args, int_at_least, locked_dir, nonneg_float, nonneg_int,
                 positive_float, positive_int, run_cli, write_atomic)
from data import (LETTERS, gsm8k_prompt, heldout_text, humaneval_program, load_gsm8k, load_humaneval, load_mbpp,
                  load_mmlu, mbpp_program, mbpp_prompt, mmlu_bucket, mmlu_cloze_prompt, mmlu_prompt)
from model import generate, load_for_cli

ALL_TASKS = ("mmlu", "gsm8k", "humaneval", "mbpp", "ppl")
ALL_SYSTEMS = ("dense", "freemoe", "oracle", "mixed", "general", "random", "magnitude")
PPL_DOMAINS = ("general", "code", "math", "knowledge")
TASK_DOMAIN = {"mmlu": "knowledge", "gsm8k": "math", "humaneval": "code", "mbpp": "code"}  # for the oracle system

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

# Stop sequences. The chat-model end markers are there because an instruct model may close its turn in text.
END_MARKERS = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>"]
GSM8K_STOPS = ["Question:", "\n\n\n"] + END_MARKERS
HUMANEVAL_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "] + END_MARKERS
MBPP_STOPS = ["[DONE]", "\n[BEGIN]"] + END_MARKERS


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


# ----------------------------------------------------------------------------- completions

def cut_at_stops(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def prompt_sha(text) -> str:
    return hashlib.sha256(str(text).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- GSM8K answers

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
    """The first number after the last "####" if there is one, else the last number in the text; None if none."""
    if "####" in text:
        after = numbers_in(text.rsplit("####", 1)[1])
        if after:
            return after[0]
    found = numbers_in(text)
    return found[-1] if found else None


def gsm8k_reference(doc: dict) -> str:
    return normalize_number(doc["answer"].rsplit("####", 1)[1])


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a stable product."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ----------------------------------------------------------------------------- model scoring

HEAD_ROWS = 1024  # scored positions per LM-head call: bounds the (rows, V) float32 logits to ~200 MB at V = 49k


def default_batch_tokens(device) -> int:
    """Padded tokens per scoring forward: small on a CPU (memory, no gain beyond a few thousand), large on a GPU,
    where a forward of a few thousand tokens of a 135M model is too short to keep it busy."""
    return 32768 if torch.device(device).type == "cuda" else 4096


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host -> device without making the host wait for the GPU: pinned memory, asynchronous copy."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], mlps=None,
                   batch_tokens: int | None = None) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) request.

    Requests whose inputs (context + continuation minus its last token) are the same share one row, so the
    four MMLU letters cost one forward, not four. Rows are right-padded: with causal attention a real token
    never sees the padding after it, so no mask is needed. Over-long inputs keep their end (left truncation).
    Batches hold at most batch_tokens padded tokens (default_batch_tokens: by device).

    Built so the device never waits on Python: per batch one host->device copy of the tokens and one of the
    indices of the scored positions, the blocks (only the final residual stream is kept), one gather of the
    positions that predict a continuation token (each once, however many requests score it), the LM head on
    those rows only, then per token logit[target] - logsumexp(logits), summed per request on the device. One
    device->host copy at the very end; no `.item()` per request.
    """
    max_len = model.config.max_seq_len
    device = model.tok_emb.weight.device
    batch_tokens = batch_tokens or default_batch_tokens(device)
    rows: dict[tuple, int] = {}
    users: list[list[int]] = []  # row -> indices of the requests it serves
    for r, (ctx, cont) in enumerate(requests):
        if not cont or not ctx:
            raise ValueError(f"request {r} has an empty {'continuation' if not cont else 'context'}")
        if len(cont) > max_len:
            raise ValueError(f"request {r}: continuation of {len(cont)} tokens exceeds max_seq_len {max_len}")
        inp = tuple((ctx + cont)[-(max_len + 1):-1])
        if inp not in rows:
            rows[inp] = len(rows)
            users.append([])
        users[rows[inp]].append(r)
    inputs = list(rows)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))  # longest first: little padding
    sums, served = [], []  # per batch: (requests,) float64 on the device, and the request ids they belong to
    start = 0
    while start < len(order):
        width = len(inputs[order[start]])
        batch = order[start:start + max(1, batch_tokens // width)]
        start += len(batch)
        # Host side: which flat position (row * width + column) predicts each continuation token, its target,
        # and which request (numbered within this batch) it counts for. A position is gathered once.
        where: dict[int, int] = {}  # flat position -> its row in the gathered (U, C)
        unique, targets, ids = [], [], []  # targets: (gathered row, token id, request within batch)
        for b, i in enumerate(batch):
            n = len(inputs[i])
            for r in users[i]:
                cont = requests[r][1]
                for j, t in enumerate(cont):
                    flat = b * width + n - len(cont) + j
                    if flat not in where:
                        where[flat] = len(unique)
                        unique.append(flat)
                    targets.append((where[flat], t, len(ids)))
                ids.append(r)
        targets.sort()  # by gathered row, so each LM-head chunk scores a contiguous run of targets
        idx = torch.tensor([list(inputs[i]) + [0] * (width - len(inputs[i])) for i in batch])  # (B, T) right padded
        meta = torch.tensor([[u for u, _, _ in targets], [t for _, t, _ in targets], [o for _, _, o in targets]])
        idx, meta, unique_d = to_device(idx, device), to_device(meta, device), to_device(torch.tensor(unique), device)
        x, rope, mask = model.embed(idx)
        h = model.run_layers(x, rope, mask, mlps=mlps)  # (B, T, C) final residual stream, before the final norm
        h = h.reshape(-1, h.shape[-1])[unique_d]  # (U, C): one gather of every scored position
        token_logp = torch.empty(len(targets), dtype=torch.float64, device=device)  # (N,)
        lo = 0
        for a in range(0, len(unique), HEAD_ROWS):
            hi = lo
            while hi < len(targets) and targets[hi][0] < a + HEAD_ROWS:
                hi += 1
            logits = model.head(h[a:a + HEAD_ROWS])  # (u, V) float32
            u, t = meta[0, lo:hi] - a, meta[1, lo:hi]
            token_logp[lo:hi] = logits[u, t] - logits.logsumexp(-1)[u]  # = log_softmax(logits)[u, t]
            lo = hi
        sums.append(torch.zeros(len(ids), dtype=torch.float64, device=device).index_add_(0, meta[2], token_logp))
        served += ids
    out = [0.0] * len(requests)
    for r, v in zip(served, torch.cat(sums).tolist() if sums else []):  # the one device->host copy
        out[r] = v
    return out


def complete(rt: "Runtime", prompts: list[str], stops: list[str], max_new_tokens: int, mlps=None,
             temperature: float = 0.0, seed: int | None = None) -> tuple[list[str], int]:
    """Batched generation (left-padded, KV cache, via model.generate); texts cut at the first stop string.
    Returns (texts, tokens processed = prompt + generated)."""
    tok = rt.tokenizer
    ids = [tok.encode(p)[-(rt.model.config.max_seq_len - max_new_tokens):] for p in prompts]
    new = generate(rt.model, ids, max_new_tokens, temperature=temperature, stop_strings=stops, tokenizer=tok,
                   mlps=mlps, seed=seed)
    texts = [cut_at_stops(tok.decode(row), stops) for row in new]
    return texts, sum(map(len, ids)) + sum(map(len, new))


# ----------------------------------------------------------------------------- systems

@dataclass
class System:
    """One way of running the model. `pick(prompts, domain)` gives (per-layer FFNs for model(..., mlps=), active
    FFN fraction) for a batch of prompts (token ids) from a task of `domain`; (None, 1.0) is the dense model.
    A routed system (a router deciding per input) also has `route_key(prompt) -> key`: batches only hold prompts with
    the same key, i.e. the same routing decision, so one set of FFNs serves the whole batch."""
    name: str
    pick: Callable[[list[list[int]], str], tuple[list | None, float]] = lambda prompts, domain: (None, 1.0)
    route_key: Callable[[list[int]], object] | None = None
    uses: str = ""  # what it runs besides the model (experts identity, router checksum): part of the items' header


# system name -> what it runs from the experts file (purify.py names the general-text Wanda baseline
# "baseline.general", because "general" is also the general-domain expert)
BASELINE_OF = {"general": "baseline.general", "mixed": "mixed", "random": "random", "magnitude": "magnitude"}


def build_systems(args, model) -> list[System]:
    """dense needs nothing; the others need the experts file of purify.py, freemoe also the router of
    train_router.py. Each row reports the active FFN fraction it actually ran at (averaged over items).

    Same compute budget: with a router given, a pruning baseline scoring an item of domain d keeps the fraction of
    FFN neurons that Free-MoE's decision for d runs (level 2 leaves some layers dense, so it is above the file's
    keep); the baseline is rebuilt at that keep from the statistics in the experts file. Without a router it runs
    at the file's keep."""
    systems, experts, moe = [], None, None
    uses_experts = uses_router = ""  # identities for the items' header: other experts or router, other items
    for name in args.systems:
        if name not in ALL_SYSTEMS:
            raise UserError(f"unknown system {name!r} (expected one of {', '.join(ALL_SYSTEMS)})")
        if name == "dense":
            systems.append(System("dense"))
            continue
        if not args.experts:
            raise UserError(f"system {name} needs --experts FILE (run purify.py first)")
        if name == "freemoe" and not args.router:
            raise UserError("system freemoe needs --router FILE (run train_router.py first)")
        if experts is None:
            experts = purify.load_experts(args.experts, model)
            uses_experts = f"experts {router.experts_identity(experts)[:16]}"
        if args.router and moe is None:
            moe = router.load_router(args.router, model, experts)
            uses_router = f"{uses_experts}, router {moe.checksum[:16]}"
        if name == "freemoe":
            systems.append(routed_system(name, moe, uses_router))
        elif name == "oracle":
            def pick(prompts, domain, e=experts):
                return e.mlps(domain), purify.kept_fraction(e.index_sets(domain), model)
            systems.append(System(name, pick, uses=uses_experts))
        elif moe is not None and experts.stats:  # its budget comes from the router's decisions
            systems.append(System(name, budget_matched(name, model, experts, moe), uses=uses_router))
        else:
            key = BASELINE_OF[name]
            mlps, frac = experts.mlps(key), purify.kept_fraction(experts.index_sets(key), model)
            systems.append(System(name, lambda prompts, domain, m=mlps, f=frac: (m, f), uses=uses_experts))
    return systems


def routed_system(name: str, moe, uses: str = "") -> System:
    """Free-MoE as a System: every prompt is routed on its own (level 1 + level 2 on the prompt itself, memoised),
    and evaluate_task batches prompts that got the same decision."""
    decisions: dict = {}

    def decide(prompt):
        key = tuple(prompt)
        if key not in decisions:
            decisions[key] = moe.route([prompt])[0]
        return decisions[key]

    def pick(prompts, domain):
        chosen = [decide(p) for p in prompts]
        if len({d.key for d in chosen}) != 1:
            raise RuntimeError("a batch of a routed system mixes routing decisions")
        return moe.mlps_for(chosen[0]), chosen[0].active_fraction
    return System(name, pick, route_key=lambda prompt: decide(prompt).key, uses=uses)


def budget_matched(name: str, model, experts, moe):
    """A pruning baseline as `pick(prompts, domain)`, rebuilt per domain at Free-MoE's active fraction there."""
    cache = {}

    def pick(prompts, domain):
        if domain not in cache:
            frac = moe.decision_for((domain,)).active_fraction
            idx = purify.baseline_indices(BASELINE_OF[name].removeprefix("baseline."), model, experts, frac)
            cache[domain] = purify.materialize(model, idx), purify.kept_fraction(idx, model)
        return cache[domain]
    return pick


# ----------------------------------------------------------------------------- tasks

@dataclass
class Runtime:
    model: object
    tokenizer: object
    args: argparse.Namespace


@dataclass
class Task:
    """A task = its items (selected once, shared by all systems), the settings that define its results (stored
    in the JSONL header: a resume with other settings is refused), and a function scoring a batch of items."""
    name: str
    domain: str
    items: list[dict]  # each has "id" and "prompt" (text, or token ids for ppl)
    settings: dict
    run_batch: Callable  # (rt, system, items) -> list of records


def prepare_mmlu(rt: Runtime) -> Task:
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
        if mmlu_bucket(d) != "eval":  # purify.py calibrates on 20% of MMLU test and holds out 10%
            continue
        shots = dev.get(d["subject"], [])[:k]  # harness "first_n": the first k dev items of the subject
        test.append({"id": f"{d['subject']}/{i}", "doc": d, "prompt": mmlu_prompt(d, shots),
                     "cloze": mmlu_cloze_prompt(d, shots)})
    if rt.args.mmlu_per_subject:  # stratified: K from every subject, in dataset order
        chosen = {it["id"] for subject in MMLU_SUBJECT_CATEGORY
                  for it in select([t for t in test if t["doc"]["subject"] == subject], rt.args.mmlu_per_subject,
                                   rt.args.seed)}
        picked = [it for it in test if it["id"] in chosen]
    else:
        picked = select(test, limit_for(rt.args, "mmlu"), rt.args.seed)
    return Task("mmlu", "knowledge", picked, {"shots": k, "items": "eval bucket"}, run_mmlu)


def run_mmlu(rt: Runtime, system: System, items: list[dict]) -> list[dict]:
    tok, reqs = rt.tokenizer, []
    for it in items:
        ctx, cloze = tok.encode(it["prompt"]), tok.encode(it["cloze"])
        reqs += [(ctx, tok.encode(f" {L}", bos=False)) for L in LETTERS]
        reqs += [(cloze, tok.encode(f" {c}", bos=False)) for c in it["doc"]["choices"]]
    mlps, frac = system.pick([tok.encode(it["prompt"]) for it in items], "knowledge")
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
                        "tokens": len(reqs[8 * j][0]) + len(reqs[8 * j + 4][0]) + 4})
    return records


def prepare_gsm8k(rt: Runtime) -> Task:
    k = rt.args.gsm8k_shots
    train = load_gsm8k("train", rt.args.data_dir)
    shots = select(train, k, rt.args.seed) if k else []  # the same k shots for every question
    test = [{"id": str(i), "doc": d, "prompt": gsm8k_prompt(d, shots)}
            for i, d in enumerate(load_gsm8k("test", rt.args.data_dir))]
    return Task("gsm8k", "math", select(test, limit_for(rt.args, "gsm8k"), rt.args.seed),
                {"shots": k, "max_new_tokens": rt.args.gsm8k_max_tokens}, run_gsm8k)


def run_gsm8k(rt: Runtime, system: System, items: list[dict]) -> list[dict]:
    prompts = [it["prompt"] for it in items]
    mlps, frac = system.pick([rt.tokenizer.encode(p) for p in prompts], "math")
    texts, n_tok = complete(rt, prompts, GSM8K_STOPS, rt.args.gsm8k_max_tokens, mlps)
    records = []
    for it, text in zip(items, texts):
        pred, ref = extract_gsm8k_answer(text), gsm8k_reference(it["doc"])
        records.append({"id": it["id"], "prompt_sha": prompt_sha(it["prompt"]), "prediction": pred, "reference": ref,
                        "correct": float(pred == ref), "completion": text, "tokens": n_tok / len(items),
                        "active_fraction": frac})
    return records


def prepare_humaneval(rt: Runtime) -> Task:
    items = [{"id": d["task_id"], "doc": d, "prompt": d["prompt"]} for d in load_humaneval(rt.args.data_dir)]
    return Task("humaneval", "code", select(items, limit_for(rt.args, "humaneval"), rt.args.seed), _code_settings(rt),
                run_humaneval)


def prepare_mbpp(rt: Runtime) -> Task:
    rows = {d["task_id"]: d for d in load_mbpp(rt.args.data_dir)}
    shots = [rows[i] for i in (2, 3, 4) if i in rows]  # the standard prompt split is task ids 1-10
    items = [{"id": str(i), "doc": rows[i], "prompt": mbpp_prompt(rows[i], shots)} for i in range(11, 511) if i in rows]
    return Task("mbpp", "code", select(items, limit_for(rt.args, "mbpp"), rt.args.seed), _code_settings(rt), run_mbpp)


def _code_settings(rt: Runtime) -> dict:
    a = rt.args
    return {"samples": a.samples, "temperature": a.temperature,
            "max_new_tokens": a.code_max_tokens, "timeout": a.timeout}


def _run_code(rt, system, items, stops, to_program) -> list[dict]:
    a = rt.args
    n, temperature = a.samples, a.temperature
    prompts = [it["prompt"] for it in items]
    mlps, frac = system.pick([rt.tokenizer.encode(p) for p in prompts], "code")
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
                        "statuses": [r.status for r in res], "n": n, "c": c, "correct": c / n,
                        "tokens": n_tok / len(items), "active_fraction": frac})
    return records


def run_humaneval(rt, system, items):
    return _run_code(rt, system, items, HUMANEVAL_STOPS, lambda it, c: humaneval_program(it["doc"], c))


def run_mbpp(rt, system, items):
    return _run_code(rt, system, items, MBPP_STOPS, lambda it, c: mbpp_program(it["doc"], c))


def prepare_ppl(rt: Runtime) -> Task:
    """Windows of --seq-len tokens; the first token of a window has no context and is not scored."""
    n = rt.args.seq_len
    items = []
    for domain in rt.args.ppl_domains:
        ids = rt.tokenizer.encode(heldout_text(domain, rt.args.data_dir), bos=False)
        bos = [rt.tokenizer.bos_id] if rt.tokenizer.add_bos else []  # Gemma: every window starts with <bos>
        w = n - len(bos)  # text tokens per window
        windows = [bos + ids[i:i + w] for i in range(0, len(ids) - 1, w) if len(bos + ids[i:i + w]) > 1]
        picked = select(list(enumerate(windows)), rt.args.ppl_windows or limit_for(rt.args, "ppl"), rt.args.seed)
        items += [{"id": f"{domain}/{i}", "domain": domain, "prompt": w} for i, w in picked]
    return Task("ppl", "mixed", items, {"seq_len": n, "domains": list(rt.args.ppl_domains)}, run_ppl)


def run_ppl(rt: Runtime, system: System, items: list[dict]) -> list[dict]:
    records = []
    for domain in sorted({it["domain"] for it in items}):  # one domain per forward (matters for the oracle)
        group = [it for it in items if it["domain"] == domain]
        mlps, frac = system.pick([it["prompt"] for it in group], domain)
        reqs = [(it["prompt"][:1], it["prompt"][1:]) for it in group]
        ll = loglikelihoods(rt.model, reqs, mlps, rt.args.batch_tokens)
        for it, x in zip(group, ll):
            n_bytes = len(rt.tokenizer.decode(it["prompt"][1:]).encode("utf-8"))
            records.append({"id": it["id"], "prompt_sha": prompt_sha(it["prompt"]), "domain": domain,
                            "nll": -x, "scored_tokens": len(it["prompt"]) - 1, "bytes": n_bytes,
                            "tokens": len(it["prompt"]), "active_fraction": frac})
    return records


def check_data(args):
    """Read every data file the requested tasks need, so a missing or corrupt file is reported in a second,
    before the model loads."""
    for t in args.tasks:
        if t == "mmlu":
            load_mmlu("dev", args.data_dir), load_mmlu("test", args.data_dir)
        elif t == "gsm8k":
            load_gsm8k("train", args.data_dir), load_gsm8k("test", args.data_dir)
        elif t == "humaneval":
            load_humaneval(args.data_dir)
        elif t == "mbpp":
            load_mbpp(args.data_dir)
        elif t == "ppl":
            for d in args.ppl_domains:
                heldout_text(d, args.data_dir)


PREPARE = {"mmlu": prepare_mmlu, "gsm8k": prepare_gsm8k, "humaneval": prepare_humaneval, "mbpp": prepare_mbpp,
           "ppl": prepare_ppl}


# ----------------------------------------------------------------------------- results store (resume)

def read_records(path: Path, header: dict) -> dict[str, dict]:
    """Finished records of one (system, task) JSONL. A line cut off by a kill is dropped (and truncated away);
    a file written with other settings is refused rather than silently mixed."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    complete_len = data.rfind(b"\n") + 1
    if complete_len < len(data):  # a partial last line from an interrupted write
        with open(path, "r+b") as f:
            f.truncate(complete_len)
    try:
        lines = data[:complete_len].decode("utf-8").splitlines()
        first = json.loads(lines[0]) if lines else {}
        records = [json.loads(line) for line in lines[1:]]
    except ValueError as e:  # not JSON, or not UTF-8
        raise UserError(f"{path} is corrupt ({e}); delete it to re-run that system and task") from None
    if not lines:  # killed before the header reached the disk
        return {}
    bad = [i + 2 for i, r in enumerate(records) if not isinstance(r, dict) or "id" not in r]
    if not isinstance(first, dict) or bad:
        raise UserError(f"{path} is corrupt (line {bad[0] if bad else 1} is not a record); delete it to re-run "
                        "that system and task")
    if first.get("header") != header:
        raise UserError(f"{path} was written with other settings ({first.get('header')} != {header}); "
                        "use another --out or delete it")
    done = {}
    for r in records:
        done.setdefault(r["id"], r)
    return done


def prompt_ids(rt: Runtime, item: dict) -> list[int]:
    """An item's prompt as token ids (ppl items already hold ids; the others hold text)."""
    return item["prompt"] if isinstance(item["prompt"], list) else rt.tokenizer.encode(item["prompt"])


def warm_up(rt: Runtime, system: System, task: Task, batches: list[list[dict]]):
    """Build what a system makes lazily (materialised experts, budget-matched baselines) before the clock starts:
    the timings measure running the FFNs, not building them. One `pick` per (routing decision, domain)."""
    seen = set()
    for batch in batches:
        ids = prompt_ids(rt, batch[0])
        decision = system.route_key(ids) if system.route_key else None  # a batch holds one routing decision
        for domain in dict.fromkeys(it.get("domain", task.domain) for it in batch):  # ppl items carry their own
            if (decision, domain) not in seen:
                seen.add((decision, domain))
                system.pick([ids], domain)


def evaluate_task(rt: Runtime, system: System, task: Task, out: Path, header: dict) -> dict[str, dict]:
    """Run one system on one task, resuming. Batches are fixed slices of the length-sorted item list (for a routed
    system, of each routing decision's share of it), and a batch with any unfinished item is recomputed whole:
    every item is always scored in the same company of padded rows, so its numbers are bitwise the same whether
    or not the run was interrupted."""
    path = out / "items" / system.name / f"{task.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_records(path, header)
    size = rt.args.batch_size
    ordered = sorted(task.items, key=lambda it: (len(it["prompt"]), it["id"]))
    groups = {None: ordered}
    if system.route_key is not None:  # a routed system: one batch = one routing decision
        groups = {}
        for it in tqdm(ordered, desc=f"{system.name}/{task.name} routing", leave=False):
            groups.setdefault(system.route_key(prompt_ids(rt, it)), []).append(it)
    batches = [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]
    todo = [b for b in batches if any(it["id"] not in done for it in b)]
    warm_up(rt, system, task, todo)
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write(json.dumps({"header": header}, sort_keys=True) + "\n")
            f.flush()
        bar = tqdm(total=len(task.items), initial=len(task.items) - sum(len(b) for b in todo),
                   desc=f"{system.name}/{task.name}", leave=False)
        for batch in todo:
            t0 = time.perf_counter()
            records = task.run_batch(rt, system, batch)
            seconds = (time.perf_counter() - t0) / len(batch)
            for rec in records:
                if rec["id"] not in done:
                    rec["seconds"] = seconds
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
                    f.flush()  # a kill loses at most the line being written
                    done[rec["id"]] = rec
            bar.update(len(batch))
        bar.close()
    return done


# ----------------------------------------------------------------------------- statistics and reports

def bootstrap(num: np.ndarray, den: np.ndarray, seed: int, n_boot: int = 1000, ref=None) -> list[float]:
    """95% percentile interval of sum(num)/sum(den) over items resampled with replacement. With ref=(num, den)
    of a second system on the same items, the interval of the paired difference (this - ref)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))  # (n_boot, n)
    stat = num[idx].sum(1) / den[idx].sum(1)
    if ref is not None:
        stat = stat - ref[0][idx].sum(1) / ref[1][idx].sum(1)
    lo, hi = np.percentile(stat, [2.5, 97.5])
    return [round(float(lo), 6), round(float(hi), 6)]


def columns_of(task: Task, records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The headline numbers of a task as (numerator, denominator) per item: a score is sum(num) / sum(den)."""
    ones = np.ones(len(records))
    if task.name == "mmlu":
        return {"mmlu": (np.array([r["correct"] for r in records]), ones),
                "mmlu_cloze": (np.array([r["correct_cloze"] for r in records]), ones)}
    if task.name == "ppl":
        cols = {}
        for d in task.settings["domains"]:
            rs = [r for r in records if r["domain"] == d]
            bits = np.array([r["nll"] / math.log(2) for r in rs])
            cols[f"bpb_{d}"] = (bits, np.array([float(r["bytes"]) for r in rs]))
        return cols
    return {task.name: (np.array([r["correct"] for r in records]), ones)}


def task_details(task: Task, records: list[dict]) -> dict:
    """Breakdowns reported next to the headline numbers."""
    if task.name == "mmlu":
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
    if task.name == "ppl":
        out = {}
        for d in task.settings["domains"]:
            rs = [r for r in records if r["domain"] == d]
            nll, toks = sum(r["nll"] for r in rs), sum(r["scored_tokens"] for r in rs)
            out[d] = {"ppl": round(math.exp(nll / toks), 6), "tokens": toks, "bytes": sum(r["bytes"] for r in rs)}
        return out
    if task.name in ("humaneval", "mbpp"):
        n = records[0]["n"]
        return {f"pass@{k}": round(float(np.mean([pass_at_k(r["n"], r["c"], k) for r in records])), 6)
                for k in (1, 10, 100) if k <= n}
    return {}


LOWER_IS_BETTER = ("bpb_",)


def summarize(tasks: list[Task], systems: list[System], records: dict, args, model) -> dict:
    """results.json: deterministic (no wall-clock numbers), items in selection order."""
    cols: dict[str, dict[str, tuple]] = {}
    result = {"model": {"name": model.config.name, "fingerprint": model.fingerprint},
              "settings": {"limit": args.limits, "mmlu_per_subject": args.mmlu_per_subject, "seed": args.seed,
                           "tasks": {t.name: t.settings for t in tasks},
                           "n_items": {t.name: len(t.items) for t in tasks}},
              "systems": {}}
    if any(t.name in ("humaneval", "mbpp") for t in tasks):  # how generated code ran; UNSANDBOXED is said here
        result["settings"]["sandbox"] = sandbox.sandbox_config(args.allow_unsandboxed).describe()
    for s in systems:
        cols[s.name] = {}
        entry = {"tasks": {}, "details": {}}
        pooled, fractions = [], []
        for t in tasks:
            recs = [records[s.name, t.name][it["id"]] for it in t.items]
            fractions += [r["active_fraction"] for r in recs]
            cols[s.name].update(columns_of(t, recs))
            entry["details"][t.name] = task_details(t, recs)
            if t.name != "ppl":  # the integrated set pools accuracy items (MMLU by letters)
                pooled += [(f"{t.name}/{r['id']}", r["correct"]) for r in recs]
        if pooled:
            random.Random(args.seed).shuffle(pooled)  # the mixed-domain order (a mean does not depend on it)
            v = np.array([c for _, c in pooled])
            cols[s.name]["integrated"] = (v, np.ones(len(v)))
        entry["active_fraction"] = round(float(np.mean(fractions)), 6)  # per item, over all tasks
        result["systems"][s.name] = entry
    base = cols.get("dense")
    for s in systems:
        entry = result["systems"][s.name]
        for col, (num, den) in cols[s.name].items():
            value = float(num.sum() / den.sum())
            e = {"n": len(num), "value": round(value, 6), "ci95": bootstrap(num, den, args.seed)}
            if base is not None and s.name != "dense":
                ref = base[col]
                e["delta_vs_dense"] = round(value - float(ref[0].sum() / ref[1].sum()), 6)
                e["delta_ci95"] = bootstrap(num, den, args.seed, ref=ref)
            entry["tasks"][col] = e
    return result


def timings_of(tasks, systems, records) -> dict:
    out = {}
    for s in systems:
        per = {}
        for t in tasks:
            recs = list(records[s.name, t.name].values())
            tok, sec = sum(r["tokens"] for r in recs), sum(r["seconds"] for r in recs)
            per[t.name] = {"tokens": round(tok), "seconds": round(sec, 3),
                           "tokens_per_s": round(tok / max(sec, 1e-9), 1)}
        tok, sec = sum(v["tokens"] for v in per.values()), sum(v["seconds"] for v in per.values())
        out[s.name] = {"tasks": per, "tokens_per_s": round(tok / max(sec, 1e-9), 1)}
    return out


def markdown_table(result: dict, timings: dict) -> str:
    cols = list(next(iter(result["systems"].values()))["tasks"])
    head = ["system", "active FFN"] + cols + ["tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in result["systems"].items():
        cells = [name, f"{s['active_fraction']:.2f}"]
        for c in cols:
            e, pct = s["tasks"][c], not c.startswith(LOWER_IS_BETTER)
            f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
            cell = f"{f(e['value'])} [{f(e['ci95'][0])}, {f(e['ci95'][1])}]"
            if "delta_vs_dense" in e:
                d = e["delta_vs_dense"]
                cell += f" (Δ {'+' if d >= 0 else '-'}{f(abs(d))})"
            cells.append(cell)
        cells.append(f"{timings[name]['tokens_per_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = ("\nAccuracies in %, with 95% bootstrap intervals over items; bpb = bits per byte (lower is better); "
             "Δ = difference to dense (paired). Items per task: "
             + ", ".join(f"{k} {v}" for k, v in result["settings"]["n_items"].items()) + ".\n")
    if "sandbox" in result["settings"]:
        notes += f"Generated code ran in: {result['settings']['sandbox']}.\n"
    mmlu = {name: s["details"]["mmlu"] for name, s in result["systems"].items() if s["details"].get("mmlu")}
    if mmlu:  # MMLU by category (mean over the subjects present), letters / cloze
        cats = list(MMLU_CATEGORIES)
        notes += "\n| MMLU letters / cloze | " + " | ".join(cats) + " | macro over subjects |\n|"
        notes += "---|" * (len(cats) + 2)
        for name, d in mmlu.items():
            cells = [f"{100 * d['letters']['categories'][c]:.1f} / {100 * d['cloze']['categories'][c]:.1f}"
                     if c in d["letters"]["categories"] else "-" for c in cats]
            cells.append(f"{100 * d['letters']['macro_subjects']:.1f} / {100 * d['cloze']['macro_subjects']:.1f}")
            notes += f"\n| {name} | " + " | ".join(cells) + " |"
        notes += "\n"
    return "\n".join(lines) + "\n" + notes


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for details.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out_default="results")
    p.add_argument("--systems", nargs="+", default=["dense"], help=f"systems to score ({', '.join(ALL_SYSTEMS)})")
    p.add_argument("--tasks", nargs="+", default=["mmlu", "gsm8k", "humaneval", "ppl"],
                   help=f"tasks ({', '.join(ALL_TASKS)})")
    p.add_argument("--limit", nargs="+", default=None, metavar="N|TASK=N",
                   help="items per task: N for every task and/or TASK=N for one (e.g. 100 humaneval=164); default all; "
                        "ppl: see --ppl-windows")
    p.add_argument("--mmlu-per-subject", type=positive_int, default=None, metavar="K",
                   help="MMLU: K seeded items from each of the 57 subjects (instead of --limit)")
    p.add_argument("--experts", default=None, help="experts file from purify.py (all systems but dense)")
    p.add_argument("--router", default=None, help="router file from train_router.py (freemoe)")
    p.add_argument("--mmlu-shots", type=nonneg_int, default=5)
    p.add_argument("--gsm8k-shots", type=nonneg_int, default=8)
    p.add_argument("--gsm8k-max-tokens", type=positive_int, default=256, help="generation budget per GSM8K answer")
    p.add_argument("--code-max-tokens", type=positive_int, default=384,
                   help="generation budget per HumanEval/MBPP answer")
    p.add_argument("--samples", type=positive_int, default=1,
                   help="samples per code problem (n of pass@k; >1 needs --temperature)")
    p.add_argument("--temperature", type=nonneg_float, default=0.0,
                   help="sampling temperature of code samples (0 = greedy)")
    p.add_argument("--ppl-domains", nargs="+", default=list(PPL_DOMAINS), help="held-out domains for perplexity")
    p.add_argument("--seq-len", type=int_at_least(2), default=512, help="tokens per perplexity window")
    p.add_argument("--ppl-windows", type=positive_int, default=None,
                   help="windows per domain (default: --limit, else all)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="items per batch (default: 8 on a CPU, 64 on a GPU, where a batch of 64 decodes about as fast "
                        "as one of 8)")
    p.add_argument("--batch-tokens", type=positive_int, default=None,
                   help="padded tokens per scoring forward (memory; default: 4096 on a CPU, 32768 on a GPU)")
    p.add_argument("--timeout", type=positive_float, default=10.0, help="seconds per sandboxed program")
    p.add_argument("--workers", type=positive_int, default=2, help="sandboxed programs run in parallel")
    p.add_argument("--allow-unsandboxed", action="store_true",
                   help="run generated code without isolation when unshare cannot isolate it (network, host "
                        "processes and files reachable); named in the results")
    args = p.parse_args(argv)
    args.out = Path(args.out)
    for t in args.tasks:
        if t not in ALL_TASKS:
            raise UserError(f"unknown task {t!r} (expected one of {', '.join(ALL_TASKS)})")
    for d in args.ppl_domains:
        if d not in PPL_DOMAINS:
            raise UserError(f"unknown perplexity domain {d!r} (expected one of {', '.join(PPL_DOMAINS)})")
    args.limits = parse_limits(args.limit)
    if args.samples > 1 and args.temperature <= 0:
        raise UserError(f"--samples {args.samples} draws identical greedy answers: pass --temperature > 0 (e.g. 0.8)")
    return args


def run(args, model, tokenizer) -> dict:
    """Everything after loading the model: prepare tasks, score every system, write the reports."""
    gpu = model.tok_emb.weight.device.type == "cuda"
    if args.batch_size is None:
        args.batch_size = 64 if gpu else 8
    if args.batch_tokens is None:
        args.batch_tokens = default_batch_tokens(model.tok_emb.weight.device)
    rt = Runtime(model, tokenizer, args)
    tasks = [PREPARE[name](rt) for name in dict.fromkeys(args.tasks)]  # data errors surface before any scoring
    systems = build_systems(args, model)
    if any(t.name in ("humaneval", "mbpp") for t in tasks):
        print(f"sandbox: {sandbox.sandbox_config(args.allow_unsandboxed).describe()}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    records = {}
    for s in systems:
        for t in tasks:
            header = {"task": t.name, "system": s.name, "model": model.fingerprint, "settings": t.settings,
                      "seed": args.seed, **({"uses": s.uses} if s.uses else {})}  # other experts: other items
            records[s.name, t.name] = evaluate_task(rt, s, t, args.out, header)
    result = summarize(tasks, systems, records, args, model)
    timings = timings_of(tasks, systems, records)
    table = markdown_table(result, timings)
    write_atomic(args.out / "results.json", json.dumps(result, indent=1, sort_keys=True) + "\n")
    write_atomic(args.out / "timings.json", json.dumps(timings, indent=1, sort_keys=True) + "\n")
    write_atomic(args.out / "results.md", table)
    print(table)
    return result


def main(argv=None):
    args = parse_args(argv)
    check_data(args)
    with locked_dir(args.out, "another evaluate.py run"):  # two runs on one --out would both append every item
        t0 = time.perf_counter()
        model, tokenizer = load_for_cli(args)
        print(f"loaded {model.config.name} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        run(args, model, tokenizer)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'} "
          f"({time.perf_counter() - t0:.0f}s in all)", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
