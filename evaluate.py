"""evaluate.py — score dense vs Free-MoE vs baselines on MMLU, GSM8K, HumanEval, MBPP and domain perplexity.

Pipeline position: the last stage
    purify.py (DSS-Experts)  ->  train_router.py (router)  ->  evaluate.py

What goes in:  a model (--model, default SmolLM2-135M-Instruct), the benchmark data (data.py), and for the sparse
               systems the experts file of purify.py (--experts) and the router of train_router.py (--router).
What comes out (under --out, default results/):
    items/<system>/<task>.jsonl  one line per item (prompt hash, prediction, reference, correct, timing), appended
                                 and flushed as it goes; a re-run resumes and skips finished items (its first
                                 line: model, settings and, for sparse systems, the experts/router identity; a
                                 resume with different ones is refused, so a table never mixes two experts files)
    results.json                 every score with a 95% bootstrap interval and its paired difference to dense, and
                                 per group (MMLU: categories, math subjects, buckets); no timings, so an
                                 interrupted-and-resumed run writes the same bytes as an uninterrupted one
    timings.json                 tokens/s per system and task (wall clock: differs run to run)
    results.md                   the table: rows = systems, columns = tasks, Δ vs dense in each cell

    python evaluate.py --systems dense --tasks mmlu gsm8k humaneval ppl --limit 50
    python evaluate.py --systems dense freemoe oracle mixed --experts experts/experts.safetensors \
        --router runs/router/router.safetensors --tasks mmlu gsm8k humaneval ppl --limit 200 --out results/

A long run split over processes or machines: each scores every N-th batch into its own folder (--shard K/N, no
report), then a last run takes their items (--reuse DIR..., only items written with the same settings) and writes
the report without scoring anything again; the batches are the same as in one whole run, so are the numbers
(a routed system therefore routes every item in every shard: Free-MoE pays its routing pass N times).
    python evaluate.py --tasks mmlu --mmlu-items all --shard 1/2 --out results/part1    # and 2/2 into part2
    python evaluate.py --tasks mmlu --mmlu-items all --reuse results/part1 results/part2 --out results/all

The tasks, their prompts and scoring are in tasks.py. Two more numbers come from them here:
    integrated the paper's mixed-domain setting: all selected accuracy items of the tasks pooled into one number.
               Every system picks its FFNs per prompt, so the pooled score over the union is the score of the
               shuffled mixture (order cannot change a per-prompt decision).

Systems (the pruning baselines run at Free-MoE's active FFN fraction of each domain, the others at their own):
    dense      the original model (mlps=None)
    freemoe    router + DSS-Experts              oracle     the item's true-domain expert, whole
    mixed      one expert purified on all domains general    the general-domain expert for every item
    random     random neurons                    magnitude  neurons with the largest weight norms
    expert:D   domain D's expert on every item, whatever the item's domain (how an expert does off its domain)
    The non-dense systems load the experts file (and the router) in `build_systems`; each row reports the active
    FFN fraction it actually ran at, averaged over items.

Code execution: every HumanEval / MBPP program runs in sandbox.py (see its docstring for what it covers).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import router
import sandbox
from cli import (ArgumentParser, UserError, add_common_args, int_at_least, locked_dir, nonneg_float, nonneg_int,
                 positive_float, positive_int, progress, run_cli, token_sparsity, write_atomic)
from experts import baseline_indices, experts_identity, kept_fraction, load_experts, materialize
from model import load_for_cli
from scoring import bootstrap, default_batch_tokens
from tasks import (ALL_TASKS, BENCHMARKS, MMLU_CATEGORIES, MMLU_ITEMS, PPL_DOMAINS, Runtime, Task, check_data,
                   columns_of, parse_limits, prepare, task_details)

ALL_SYSTEMS = ("dense", "freemoe", "level3", "oracle", "mixed", "general", "random", "magnitude")


# ----------------------------------------------------------------------------- systems

@dataclass
class System:
    """One way of running the model. `pick(prompts, domain)` gives (per-layer FFNs for model(..., mlps=), active
    FFN fraction, route) for a batch of prompts (token ids) from a task of `domain`; (None, 1.0, "") is the dense
    model, and route names what a router chose ("" for systems without one).
    A routed system (a router deciding per input) also has `route_key(prompt) -> key`: batches only hold prompts with
    the same key, i.e. the same routing decision, so one set of FFNs serves the whole batch."""
    name: str
    pick: Callable[[list[list[int]], str], tuple[list | None, float, str]] = lambda prompts, domain: (None, 1.0, "")
    route_key: Callable[[list[int]], object] | None = None
    uses: str = ""  # what it runs besides the model (experts identity, router checksum): part of the items' header
    measured: Callable[[], float] | None = None  # level 3: the active FFN the last picked FFNs really ran


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
        if name not in ALL_SYSTEMS and not name.startswith("expert:"):
            raise UserError(f"unknown system {name!r} (expected one of {', '.join(ALL_SYSTEMS)}, or expert:DOMAIN)")
        if name == "dense":
            systems.append(System("dense"))
            continue
        if not args.experts:
            raise UserError(f"system {name} needs --experts FILE (run purify.py first)")
        if name in ("freemoe", "level3") and not args.router:
            raise UserError(f"system {name} needs --router FILE (run train_router.py first)")
        if name == "level3" and not args.token_sparsity:
            raise UserError("system level3 needs --token-sparsity S > 0 (the fraction of neurons to skip per token)")
        if experts is None:
            experts = load_experts(args.experts, model)
            uses_experts = f"experts {experts_identity(experts)[:16]}"
        if args.router and moe is None:
            moe = router.load_router(args.router, model, experts, token_sparsity=args.token_sparsity)
            uses_router = f"{uses_experts}, router {moe.checksum[:16]}"
            if args.token_sparsity:  # level 3 on: other numbers, other items
                uses_router += f", token sparsity {args.token_sparsity:g}"
        if name == "freemoe":
            systems.append(routed_system(name, moe, uses_router))
        elif name == "level3":
            systems.append(level3_system(name, moe, uses_router))
        elif name == "oracle":
            def pick(prompts, domain, e=experts):
                return e.mlps(domain), kept_fraction(e.index_sets(domain), model), ""
            systems.append(System(name, pick, uses=uses_experts))
        elif name.startswith("expert:"):  # one domain's expert on every item, whatever its domain
            d = name.removeprefix("expert:")
            mlps, frac = experts.mlps(d), kept_fraction(experts.index_sets(d), model)
            systems.append(System(name, lambda prompts, domain, m=mlps, f=frac: (m, f, ""), uses=uses_experts))
        elif moe is not None and experts.stats:  # its budget comes from the router's decisions
            systems.append(System(name, budget_matched(name, model, experts, moe), uses=uses_router))
        else:
            key = BASELINE_OF[name]
            mlps, frac = experts.mlps(key), kept_fraction(experts.index_sets(key), model)
            systems.append(System(name, lambda prompts, domain, m=mlps, f=frac: (m, f, ""), uses=uses_experts))
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
        return moe.mlps_for(chosen[0]), chosen[0].active_fraction, "+".join(chosen[0].domains) or "dense"
    return System(name, pick, route_key=lambda prompt: decide(prompt).key, uses=uses,
                  measured=level3_measure(moe) if moe.token_sparsity else None)


def level3_system(name: str, moe, uses: str = "") -> System:
    """The dense FFNs with level 3 alone: no expert, every token skips its quiet neurons at --token-sparsity
    (the router file's dense thresholds, calibrated on every domain's text)."""
    dense = moe.decision_for(())
    return System(name, lambda prompts, domain: (moe.mlps_for(dense), 1.0, ""), uses=uses,
                  measured=level3_measure(moe))


def level3_measure(moe):
    """The active FFN that the level-3 FFNs of the last pick ran (FreeMoE keeps the last ones it made)."""
    return lambda: router.measured_active_fraction(moe.last_level3, moe.model.config.n_ffn)


def budget_matched(name: str, model, experts, moe):
    """A pruning baseline as `pick(prompts, domain)`, rebuilt per domain at Free-MoE's active fraction there."""
    cache = {}

    def pick(prompts, domain):
        if domain not in cache:
            frac = moe.decision_for((domain,)).active_fraction
            idx = baseline_indices(BASELINE_OF[name].removeprefix("baseline."), model, experts, frac)
            cache[domain] = materialize(model, idx), kept_fraction(idx, model), ""
        return cache[domain]
    return pick


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
    first, records = parse_records(path, data[:complete_len])
    if first is None:  # killed before the header reached the disk
        return {}
    if first.get("header") != header:
        raise UserError(f"{path} was written with other settings ({first.get('header')} != {header}); "
                        "use another --out or delete it")
    return first_of_each(records)


def parse_records(path: Path, data: bytes) -> tuple[dict | None, list[dict]]:
    """(header line, records) of the complete lines of an items file; (None, []) when it has none."""
    try:
        lines = data.decode("utf-8").splitlines()
        first = json.loads(lines[0]) if lines else {}
        records = [json.loads(line) for line in lines[1:]]
    except ValueError as e:  # not JSON, or not UTF-8
        raise UserError(f"{path} is corrupt ({e}); delete it to re-run that system and task") from None
    if not lines:
        return None, []
    bad = [i + 2 for i, r in enumerate(records) if not isinstance(r, dict) or "id" not in r]
    if not isinstance(first, dict) or bad:
        raise UserError(f"{path} is corrupt (line {bad[0] if bad else 1} is not a record); delete it to re-run "
                        "that system and task")
    return first, records


def first_of_each(records: list[dict]) -> dict[str, dict]:
    """id -> record, the first line of each id (a batch recomputed after a kill may repeat some ids)."""
    done = {}
    for r in records:
        done.setdefault(r["id"], r)
    return done


def reusable_records(sources: list[Path], rel: Path, header: dict) -> dict[str, dict]:
    """--reuse: finished records of the same system, task and settings in other results folders (the shards of
    one run, or an earlier run that scored other systems). Read only: another run may still be appending there,
    so a partial last line is ignored, not truncated. A file written with other settings is skipped, and said."""
    found = {}
    for src in sources:
        path = src / rel
        if not path.exists():
            continue
        data = path.read_bytes()
        first, records = parse_records(path, data[:data.rfind(b"\n") + 1])
        if first is None:
            continue
        if first.get("header") != header:
            print(f"--reuse: {path} was written with other settings; not used", file=sys.stderr)
            continue
        for rid, r in first_of_each(records).items():
            found.setdefault(rid, r)
    return found


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
    rel = Path("items") / system.name / f"{task.name}.jsonl"
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_records(path, header)
    wanted = {it["id"] for it in task.items}
    borrowed = {i: r for i, r in reusable_records(rt.args.reuse, rel, header).items() if i in wanted and i not in done}
    size = rt.args.batch_size
    ordered = sorted(task.items, key=lambda it: (len(it["prompt"]), it["id"]))
    groups = {None: ordered}
    finished = wanted <= done.keys() | borrowed.keys()  # a resume or gather with nothing left routes nothing
    if system.route_key is not None and not finished:  # a routed system: one batch = one routing decision
        groups = {}
        for it in progress(ordered, desc=f"{system.name}/{task.name} routing", leave=False):
            groups.setdefault(system.route_key(prompt_ids(rt, it)), []).append(it)
    batches = [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]
    if rt.args.shard:  # every n-th batch: the same batches as a whole run, so the same numbers
        k, n = rt.args.shard
        batches = batches[k - 1::n]
    todo = [b for b in batches if any(it["id"] not in done and it["id"] not in borrowed for it in b)]
    warm_up(rt, system, task, todo)
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write(json.dumps({"header": header}, sort_keys=True) + "\n")
            f.flush()
        for rid, rec in borrowed.items():  # copied in, so this folder holds every item its report uses
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            done[rid] = rec
        f.flush()
        total = sum(len(b) for b in batches)
        bar = progress(total=total, initial=total - sum(len(b) for b in todo),
                       desc=f"{system.name}/{task.name}", leave=False)
        for batch in todo:
            t0 = time.perf_counter()
            records = task.run_batch(rt, system, batch, task.domain)
            seconds = (time.perf_counter() - t0) / len(batch)
            if system.measured is not None:  # level 3: what the batch ran, not what its pick planned
                for rec in records:
                    rec["active_fraction"] = system.measured()
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

LOWER_IS_BETTER = ("bpb_",)


def summarize(tasks: list[Task], systems: list[System], records: dict, args, model) -> dict:
    """results.json: deterministic (no wall-clock numbers), items in selection order."""
    cols: dict[str, dict[str, tuple]] = {}
    groups: dict[str, dict[str, np.ndarray]] = {}  # column -> group -> boolean item mask (same items for every system)
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
            task_cols = columns_of(t, recs)
            cols[s.name].update(task_cols)
            entry["details"][t.name] = task_details(t, recs)
            if BENCHMARKS[t.name].groups and not groups.keys() & task_cols.keys():
                names = [BENCHMARKS[t.name].groups(r) for r in recs]
                order = BENCHMARKS[t.name].group_order
                present = sorted({g for n in names for g in n}, key=lambda g: (order.index(g) if g in order else
                                                                                len(order), g))
                masks = {g: np.array([g in n for n in names]) for g in present}
                groups.update({c: masks for c in task_cols})
            if any("route" in r for r in recs):  # where a router sent the items
                entry.setdefault("routes", {})[t.name] = dict(sorted(Counter(r["route"] for r in recs).items()))
            if all("correct" in r for r in recs):  # the integrated set pools accuracy items (MMLU by letters)
                pooled += [(f"{t.name}/{r['id']}", r["correct"]) for r in recs]
        if pooled:
            random.Random(args.seed).shuffle(pooled)  # the mixed-domain order (a mean does not depend on it)
            v = np.array([c for _, c in pooled])
            cols[s.name]["integrated"] = (v, np.ones(len(v)))
        entry["active_fraction"] = round(float(np.mean(fractions)), 6)  # per item, over all tasks
        result["systems"][s.name] = entry
    base, key = cols.get(args.delta_vs), f"delta_vs_{args.delta_vs}"
    result["settings"]["delta_vs"] = args.delta_vs
    for s in systems:
        entry = result["systems"][s.name]
        for col, (num, den) in cols[s.name].items():
            ref = base[col] if base is not None and s.name != args.delta_vs else None
            entry["tasks"][col] = score_entry(num, den, ref, args.seed, key)
            for g, m in groups.get(col, {}).items():
                entry.setdefault("groups", {}).setdefault(col, {})[g] = score_entry(
                    num[m], den[m], None if ref is None else (ref[0][m], ref[1][m]), args.seed, key)
    return result


def score_entry(num, den, ref, seed: int, key: str = "delta_vs_dense") -> dict:
    """value = sum(num) / sum(den) with its 95% bootstrap interval; with `ref` (the reference system on the same
    items) the paired difference (under `key`) and its interval."""
    value = float(num.sum() / den.sum())
    e = {"n": len(num), "value": round(value, 6), "ci95": bootstrap(num, den, seed)}
    if ref is not None:
        e[key] = round(value - float(ref[0].sum() / ref[1].sum()), 6)
        e["delta_ci95"] = bootstrap(num, den, seed, ref=ref)
    return e


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


def results_table(result: dict, timings: dict) -> str:
    cols = list(next(iter(result["systems"].values()))["tasks"])
    head = ["system", "active FFN"] + cols + ["tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in result["systems"].items():
        cells = [name, f"{s['active_fraction']:.2f}"]
        for c in cols:
            e, pct = s["tasks"][c], not c.startswith(LOWER_IS_BETTER)
            f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.3f}")
            cell = f"{f(e['value'])} [{f(e['ci95'][0])}, {f(e['ci95'][1])}]"
            if "delta_ci95" in e:
                d, (lo, hi) = e[f"delta_vs_{result['settings']['delta_vs']}"], e["delta_ci95"]
                sign = lambda x: ("+" if x >= 0 else "-") + f(abs(x))  # noqa: E731
                cell += f" (Δ {sign(d)} [{sign(lo)}, {sign(hi)}])"
            cells.append(cell)
        cells.append(f"{timings[name]['tokens_per_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    notes = ("\nAccuracies in %, with 95% bootstrap intervals over items; bpb = bits per byte (lower is better); "
             f"Δ = difference to {result['settings']['delta_vs']}, paired on the same items, with its interval. "
             "Items per task: "
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
    notes += groups_markdown(result)
    return "\n".join(lines) + "\n" + notes


def groups_markdown(result: dict) -> str:
    """Per group (MMLU categories, math subjects, buckets): each system's score and its paired Δ (--delta-vs)."""
    systems = result["systems"]
    cols = list(dict.fromkeys(c for s in systems.values() for c in s.get("groups", {})))
    out = ""
    for col in cols:
        names = list(next(s["groups"][col] for s in systems.values() if col in s.get("groups", {})))
        first = next(iter(systems.values()))["groups"][col]
        out += f"\n| {col} by group | " + " | ".join(f"{g} ({first[g]['n']})" for g in names) + " |\n|"
        out += "---|" * (len(names) + 1)
        for name, s in systems.items():
            cells = []
            for g in names:
                e = s["groups"][col][g]
                cell = f"{100 * e['value']:.1f}"
                if "delta_ci95" in e:
                    lo, hi = e["delta_ci95"]
                    d = e[f"delta_vs_{result['settings']['delta_vs']}"]
                    cell += f" (Δ {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}])"
                cells.append(cell)
            out += f"\n| {name} | " + " | ".join(cells) + " |"
        out += "\n"
    return out


# ----------------------------------------------------------------------------- main

def shard_spec(text: str) -> tuple[int, int]:
    """--shard K/N -> (K, N) with 1 <= K <= N."""
    k, _, n = text.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N (e.g. 1/2), got {text!r}")
    return int(k), int(n)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for details.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, out_default="results")
    p.add_argument("--delta-vs", default="dense", metavar="SYSTEM",
                   help="the system every other one is paired against (Δ and its interval), e.g. mixed")
    p.add_argument("--systems", nargs="+", default=["dense"],
                   help=f"systems to score ({', '.join(ALL_SYSTEMS)}, or expert:DOMAIN: that expert on every item)")
    p.add_argument("--tasks", nargs="+", default=["mmlu", "gsm8k", "humaneval", "ppl"],
                   help=f"tasks ({', '.join(ALL_TASKS)})")
    p.add_argument("--limit", nargs="+", default=None, metavar="N|TASK=N",
                   help="items per task: N for every task and/or TASK=N for one (e.g. 100 humaneval=164); default all; "
                        "ppl: see --ppl-windows")
    p.add_argument("--mmlu-per-subject", type=positive_int, default=None, metavar="K",
                   help="MMLU: K seeded items from each of the 57 subjects (instead of --limit)")
    p.add_argument("--mmlu-items", choices=MMLU_ITEMS, default="eval",
                   help="MMLU test items: the eval bucket (never used to build anything) or all 14,042, each bucket "
                        "reported apart")
    p.add_argument("--experts", default=None, help="experts file from purify.py (all systems but dense)")
    p.add_argument("--router", default=None, help="router file from train_router.py (freemoe, level3)")
    p.add_argument("--token-sparsity", type=token_sparsity, default=0.0, metavar="S",
                   help="level 3: freemoe and level3 skip this fraction of FFN neurons per token (the router's "
                        "calibrated thresholds, in steps of 0.01; 0 = off)")
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
    p.add_argument("--shard", type=shard_spec, default=None, metavar="K/N",
                   help="score only every N-th batch, starting at the K-th, and write no report: run N processes "
                        "(or machines) on K = 1..N with their own --out, then once more with --reuse on their folders")
    p.add_argument("--reuse", type=Path, nargs="+", default=[], metavar="DIR",
                   help="take items already scored with the same settings from these results folders instead of "
                        "scoring them again (the shards of a run, or a run of other systems)")
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
    for d in args.reuse:
        if not (d / "items").is_dir():
            raise UserError(f"--reuse {d}: not a results folder of evaluate.py (no items/ in it)")
    if args.delta_vs != "dense" and args.delta_vs not in args.systems:
        raise UserError(f"--delta-vs {args.delta_vs}: not one of the systems scored ({', '.join(args.systems)})")
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
    tasks = [prepare(name, rt) for name in dict.fromkeys(args.tasks)]  # data errors surface before any scoring
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
    if args.shard:
        k, n = args.shard
        print(f"shard {k}/{n} scored into {args.out / 'items'}; when all {n} are done, run again without --shard "
              f"and with --reuse on their folders for the report", file=sys.stderr)
        return None
    result = summarize(tasks, systems, records, args, model)
    timings = timings_of(tasks, systems, records)
    table = results_table(result, timings)
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
    if not args.shard:
        print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'} "
              f"({time.perf_counter() - t0:.0f}s in all)", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
