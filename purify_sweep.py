"""purify_sweep.py — does any purification beat the model it came from, is the gain stable, and what does saving
compute cost? The measurements behind docs/beat-dense.md.

For each domain this script measures held-out perplexity of the dense model against the model purified for that
domain, by every score and budget (--systems picks some of them by pattern):

    neuron level   (real DSS-Experts, materialize: compact FFNs, real compute savings)
        dowp        purify's default score (structured Wanda on the domain's text)
        taylor      loss-aware: the estimated change of the domain's loss when the neuron is removed
                    (loss_aware_stats), signed: the neurons estimated to help most when removed go first
        taylor_abs  |taylor|: the usual first-order importance (fixed keeps only)
                    each at --keeps (the same fraction of every layer); dowp and taylor also "auto" (purify --auto
                    threshold: one global threshold chosen on split B), "greedy" (purify --auto greedy: layer by layer,
                    a removal is kept only if it lowers the loss on split B) and, for the domains with a task,
                    "greedy-task" (the same search validated by the answers of --task-tokens of (prompt, answer) pairs
                    of the calibration split: MMLU cloze answers, GSM8K worked answers; data.task_pairs)
        frontier    --frontier REMOVE: that fraction of the FFN removed where it costs least, on top of the taylor
                    greedy removals: each layer's validation-loss cost of losing its least important neurons by
                    |taylor| is measured on split B, and the removals are placed where they cost least
                    (search.budgeted_removal): how much compute can be saved, and at what quality
    weight level   (reference: no speedup: masks inside full-size FFN matrices; no weight changes value)
        wanda       |W_ij| * ||x_j|| (x: the matrix's input), per output row, as in Wanda
        taylor      -W_ij * dL/dW_ij: the first-order change of the loss when weight ij is removed (signed:
                    weights whose removal is estimated to help go first)
        taylor_abs  |W_ij * dL/dW_ij| (the usual first-order Taylor importance, sign dropped)
                    each removes the --sparsities fraction of the lowest-scoring weights of every row; and
                    taylor "greedy" (`greedy_weights`): layer by layer, the weights estimated to hurt most, kept
                    removed only if the loss on split B drops
                    (per-weight scores are computed only when a weight-level system is asked for)

Every number has a 95% bootstrap interval over held-out windows, and every purified model the paired interval of
its change against dense on the same windows ("beats dense" = that whole interval below 0).
`--check-neurons` also tests the Taylor estimate against the truth: it removes each of ~200 neurons alone and
measures the calibration loss change exactly (rank correlation with the estimate).
Stability: --tokens with several sizes and --draws N run one sweep per (size, draw), each draw on calibration text
shuffled with another seed, and stability.md says per size how the held-out change varies across draws.

Data protocol (no held-out text is ever used to choose anything): each domain's calibration split (--tokens) is cut
into A = the first 3/4 of its windows (every score and statistic) and B = the last 1/4 (the auto, greedy and frontier
choices only); the held-out split of purify.py / evaluate.py gives the reported numbers.

What comes out (under --out, or one folder tokens{N}.seed{S} per sweep when there are several; every step is
cached, a killed run resumes):
    scores.{domain}.safetensors   statistics + loss-aware pass on A (with the per-weight Taylor scores)
    check.json                    Taylor estimate vs exact removal
    results.json                  per-window held-out NLL of every system (the cache of the sweep)
    choices.json                  what auto and greedy chose (a new --heldout-tokens reuses it, no new search)
    frontier.json                 the measured per-layer removal costs of the frontier systems
    report.md / report.json       the tables; report.png (held-out ppl vs fraction kept) when matplotlib is present
    stability.md / .json          with several sweeps: how each result varies across draws
    experts.{score}.{keep}.safetensors   with --write-experts: files evaluate.py runs (system "oracle" = the
                                  purified expert of each item's domain), e.g. for MMLU and bits per byte

    python purify_sweep.py --threads 1 --tokens 8192 --heldout-tokens 4096 --out results/sweep
    python purify_sweep.py --tokens 2048 8192 32768 --draws 3 --systems neuron:taylor:greedy --out results/stability
    python evaluate.py --systems dense oracle --tasks mmlu ppl \
        --experts results/sweep/experts.taylor.greedy.safetensors

Shape legend: B batch, T time, C width, L layers, F FFN neurons, N windows.
"""
from __future__ import annotations

import argparse
import fnmatch
from dataclasses import dataclass, field
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import data
import model as M
from cache import RowCache, load_tensors, save_tensors
from cli import (ArgumentParser, DefaultsHelpFormatter, UserError, add_common_args, locked_dir, positive_int, progress,
                 pyplot, run_cli, save_figure, write_atomic)
from dowp import (BASELINES, PROTECT_FACTOR, STATS, collect_stats, loss_aware_stats, score_neurons, select_above,
                  select_neurons, super_neurons)
from experts import kept_fraction, materialize, save_experts
from scoring import next_token_nll, ppl_intervals, window_nll
from search import (FRONTIER_STEPS, GREEDY_BLOCKS, auto_threshold, budgeted_removal, greedy_by_layer, greedy_layers,
                    removal_costs, task_windows)

NEURON_SCORES = ("dowp", "taylor", "taylor_abs")
SEARCHES = ("auto", "greedy", "greedy-task")  # budgets chosen by validation (taylor_abs: fixed keeps only)
WEIGHT_SCORES = ("wanda", "taylor", "taylor_abs")


# ----------------------------------------------------------------------------- scores (cached per domain)

def domain_scores(model, windows: torch.Tensor, path: Path, key: dict, batch_size: int, weights: bool = True) -> dict:
    """Statistics (collect_stats) and the loss-aware pass on `windows` (with weights=True also the per-weight scores,
    320 MB for SmolLM2), cached in `path`. Returns {"stats": {...}, "taylor": (L, F), "in_norm": (L, C),
    "taylor_w": {"{l}.{name}": W's shape} or {}}."""
    tensors = load_tensors(path, key)
    if tensors is not None and (not weights or any(k.startswith("taylor_w.") for k in tensors)):
        return unpack(tensors)  # a file with the per-weight scores also serves a sweep that needs none
    t0 = time.perf_counter()
    stats = collect_stats(model, windows, batch_size, desc=f"stats {path.stem}")
    loss = loss_aware_stats(model, windows, max(1, batch_size // 4), weights=weights, desc=f"taylor {path.stem}")
    print(f"{path.stem}: statistics + loss-aware pass on {windows.numel()} tokens in {time.perf_counter() - t0:.0f}s",
          file=sys.stderr)
    tensors = {**{f"stats.{k}": v.reshape(1) if k == "count" else v for k, v in stats.items()},
               "taylor": loss["taylor"], "in_norm": loss["in_norm"],
               **{f"taylor_w.{k}": v for k, v in loss.get("taylor_w", {}).items()}}
    save_tensors(path, key, tensors)
    return unpack(tensors)


def unpack(tensors: dict) -> dict:
    stats = {k[6:]: v.reshape(()) if k == "stats.count" else v for k, v in tensors.items() if k.startswith("stats.")}
    return {"stats": stats, "taylor": tensors["taylor"], "in_norm": tensors["in_norm"],
            "taylor_w": {k[9:]: v for k, v in tensors.items() if k.startswith("taylor_w.")}}


# ----------------------------------------------------------------------------- weight-level purification

def weight_scores(model, method: str, sc: dict, layer: int) -> dict[str, torch.Tensor]:
    """Per-weight scores of one layer's FFN matrices, {"up"|"gate"|"down": same shape as the weight}; higher = keep."""
    mlp = model.layers[layer].mlp
    names = ("up", "gate", "down") if mlp.gated else ("up", "down")
    if method == "wanda":  # |W_ij| * ||x_j||: up/gate read the FFN input, down reads the activations a
        norm = {"up": sc["in_norm"][layer], "gate": sc["in_norm"][layer], "down": sc["stats"]["mean_sq"][layer].sqrt()}
        return {n: getattr(mlp, n).weight.detach().float().abs() * norm[n] for n in names}
    if method not in ("taylor", "taylor_abs"):
        raise UserError(f"unknown weight score {method!r} (expected one of {', '.join(WEIGHT_SCORES)})")
    t = {n: sc["taylor_w"][f"{layer}.{n}"] for n in names}
    return t if method == "taylor" else {n: v.abs() for n, v in t.items()}


def weight_masked(mlp: M.MLP, scores: dict[str, torch.Tensor], sparsity: float) -> M.MLP:
    """reference: no speedup. A copy of the FFN in which, in every row of each matrix, the `sparsity` fraction of
    weights with the lowest scores is zeroed (removed); every other weight keeps its value."""
    out = mlp.select(torch.arange(mlp.n_neurons))  # a full copy: the model's own weights stay untouched
    with torch.no_grad():
        for name, s in scores.items():
            w = getattr(out, name).weight  # (out, in)
            k = round(sparsity * w.shape[1])
            if k:
                w.scatter_(1, torch.topk(s.to(w.device), k, dim=1, largest=False).indices, 0.0)
    return out


def greedy_weights(model, sc: dict, val_windows: torch.Tensor, batch_size: int) -> tuple[list, list[dict]]:
    """Weight-level counterpart of greedy_layers with the signed Taylor score (reference: no speedup): layer by
    layer, zero the GREEDY_BLOCKS fraction of the layer's FFN weights (up, gate and down together) with the most
    negative estimate -W dL/dW, kept only if the loss on `val_windows` drops. Returns per-layer FFNs (None = dense)."""
    def propose(l):
        scores = weight_scores(model, "taylor", sc, l)
        flat = torch.cat([v.flatten() for v in scores.values()])  # the layer's weights, matrix after matrix
        order = flat.argsort()
        for frac in GREEDY_BLOCKS:
            drop = order[:round(frac * len(flat))]
            drop = drop[flat[drop] < 0]
            if len(drop) == 0:
                return
            keep = torch.ones(len(flat), dtype=torch.bool)
            keep[drop] = False
            mlp, start = model.layers[l].mlp.select(torch.arange(model.config.n_ffn)), 0  # a copy to mask
            with torch.no_grad():
                for name, v in scores.items():
                    w = getattr(mlp, name).weight
                    w.mul_(keep[start:start + v.numel()].view(w.shape).to(w))
                    start += v.numel()
            yield drop, mlp

    chosen, trials = greedy_by_layer(model, val_windows, propose, batch_size)
    return [c[1] if c else None for c in chosen], trials


# ----------------------------------------------------------------------------- held-out NLL

def mean_nll(model, windows: torch.Tensor, mlps=None, batch_size: int = 8) -> list[float]:
    """Mean next-token NLL of each window (N,) (scoring.window_nll per predicted token; ppl = exp of their mean)."""
    return (window_nll(model, windows, mlps, batch_size) / (windows.shape[1] - 1)).tolist()


# ----------------------------------------------------------------------------- check: Taylor vs exact removal

def ranks(v: torch.Tensor) -> torch.Tensor:
    return v.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1])


@torch.no_grad()
def removal_deltas(model, windows: torch.Tensor, neurons: list[tuple[int, int]], done: dict, save) -> dict:
    """Exact change of the mean NLL on `windows` (one batch) when neuron (l, j) alone is removed, for each pair.
    The residual stream entering layer l is computed once (layers before l do not change); `done` is resumed."""
    todo = [(l, j) for l, j in neurons if f"{l}.{j}" not in done]
    if not todo:
        return done
    device, L = model.tok_emb.weight.device, model.config.n_layer
    x = windows.to(device)  # (B, T)
    loss = lambda logits: float(next_token_nll(logits.double(), x))
    h, rope, mask = model.embed(x)
    hidden = [h]  # hidden[l]: (B, T, C) entering layer l
    for l in range(L):
        hidden.append(model.run_layers(hidden[l], rope, mask, l, l + 1))
    base = loss(model.head(hidden[L]))
    for n, (l, j) in enumerate(progress(todo, desc="exact removals", leave=False)):
        mlps = [None] * L
        mlps[l] = model.layers[l].mlp.select(torch.cat([torch.arange(j), torch.arange(j + 1, model.config.n_ffn)]))
        done[f"{l}.{j}"] = loss(model.head(model.run_layers(hidden[l], rope, mask, l, None, mlps=mlps))) - base
        if n % 10 == 9:
            save(done)
    save(done)
    return done


def check_taylor(model, windows: torch.Tensor, n_random: int, n_lowest: int, path: Path, key: dict, seed: int) -> dict:
    """Estimate vs truth on one batch of calibration windows: `n_random` neurons sampled evenly over layers, plus the
    `n_lowest` neurons with the most negative estimate (the ones the purification removes first). Cached in `path`
    as rows "estimate" (L, F), "exact" {"l.j": change} (saved as it grows) and "result"."""
    saved = RowCache(path, key)
    est = torch.tensor(saved.get("estimate", lambda: loss_aware_stats(model, windows, 2, desc="taylor (check)")
                                 ["taylor"].tolist()))  # (L, F)
    L, n_ffn = est.shape
    g = torch.Generator().manual_seed(seed)
    random = [(l, int(j)) for l in range(L) for j in torch.randperm(n_ffn, generator=g)[:max(1, n_random // L)]]
    lowest = [(int(i) // n_ffn, int(i) % n_ffn) for i in est.flatten().argsort()[:n_lowest]]
    exact = removal_deltas(model, windows, list(dict.fromkeys(random + lowest)), saved.rows.get("exact", {}),
                           lambda done: saved.put("exact", done))
    pick = lambda pairs: (torch.tensor([est[l, j].item() for l, j in pairs], dtype=torch.float64),
                          torch.tensor([exact[f"{l}.{j}"] for l, j in pairs], dtype=torch.float64))
    e_r, x_r = pick(random)
    e_l, x_l = pick(lowest)
    result = {"tokens": windows.numel(), "n_random": len(random), "n_lowest": len(lowest),
              "spearman_random": spearman(e_r, x_r),
              "pearson_random": float(torch.corrcoef(torch.stack([e_r, x_r]))[0, 1]),
              "sign_agreement_random": float(((e_r < 0) == (x_r < 0)).double().mean()),
              "estimated_negative_random": int((e_r < 0).sum()), "truly_negative_random": int((x_r < 0).sum()),
              "lowest_truly_negative": int((x_l < 0).sum()), "lowest_estimate_mean": float(e_l.mean()),
              "lowest_exact_mean": float(x_l.mean()), "spearman_lowest": spearman(e_l, x_l),
              "estimated_negative_all": int((est < 0).sum()), "neurons_all": est.numel()}
    saved.put("result", result)
    return result


# ----------------------------------------------------------------------------- the sweep

@dataclass
class Sweep:
    """What every step of one sweep reads: the settings, the model, the three splits of each domain's text, the
    cached scores, and the row caches the steps fill. Splits: A (3/4 of the calibration windows) gives the scores and
    statistics, B (the last 1/4) validates the searches, held-out measures every system."""
    args: argparse.Namespace
    model: M.Transformer
    tok: object
    split_a: dict[str, torch.Tensor]  # {domain: (N, T) windows}
    split_b: dict[str, torch.Tensor]
    heldout: dict[str, torch.Tensor]
    scores: dict[str, dict]  # {domain: domain_scores(...)}
    stats: dict[str, dict]  # {domain: statistics with "taylor"}, what score_neurons reads
    protected: torch.Tensor  # (L, F) super neurons, kept by every neuron-level method
    results: RowCache  # "{domain}|{system}" -> held-out NLL per window and the active fraction
    choices: RowCache  # what the searches chose: kept when only the held-out text changes
    frontier_costs: RowCache  # measured removal costs per domain
    experts: dict[str, dict] = field(default_factory=dict)  # "score:keep" -> {domain: index sets}, --write-experts


def wanted(args, system: str) -> bool:
    """Whether --systems asks for `system` (shell-style patterns)."""
    return any(fnmatch.fnmatchcase(system, p) for p in args.systems)


def sweep(args, model, tok) -> tuple[dict, dict]:
    """Every system --systems asks for, on every domain: its held-out NLL (cached rows), then the cross-domain rows,
    the Taylor check and --write-experts. Returns the rows and what the report says about the data."""
    sw = prepare(args, model, tok)
    t0 = time.perf_counter()
    for d in args.domains:
        domain_rows(sw, d)
        print(f"{d}: done ({time.perf_counter() - t0:.0f}s so far)", file=sys.stderr)
    cross_rows(sw)
    check = taylor_check(sw) if args.check_neurons else None
    for spec in args.write_experts or []:
        write_experts(Path(args.out), spec, sw.experts, model, args, sw.stats, sw.protected)
    return sw.results.rows, {"check": check, "n_protected": int(sw.protected.sum()),
                             "tokens": {"A": {d: w.numel() for d, w in sw.split_a.items()},
                                        "B": {d: w.numel() for d, w in sw.split_b.items()},
                                        "heldout": {d: w.numel() for d, w in sw.heldout.items()}}}


def sweep_key(args, model) -> dict:
    """What the scores and the searches depend on (the held-out text is added where rows depend on it)."""
    return {"fingerprint": model.fingerprint, "tokens": args.tokens, "seed": args.seed, "seq_len": args.seq_len,
            "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch.")}  # resolved: auto is bf16 or fp32


def prepare(args, model, tok) -> Sweep:
    """Load the splits, score every domain (cached per domain) and open the row caches."""
    out = Path(args.out)
    calib = {d: data.load_domain_tokens(args.specs[d], tok, args.data_dir, "calib", args.tokens, args.seed,
                                        args.seq_len) for d in args.domains}
    if min(len(w) for w in calib.values()) < 2:
        raise UserError(f"need at least 2 calibration windows per domain (--tokens >= {2 * args.seq_len})")
    n_b = {d: max(1, len(w) // 4) for d, w in calib.items()}
    split_a = {d: w[:len(w) - n_b[d]] for d, w in calib.items()}  # A: scores and statistics
    split_b = {d: w[len(w) - n_b[d]:] for d, w in calib.items()}  # B: the --auto threshold only
    heldout = {d: data.load_domain_tokens(args.specs[d], tok, args.data_dir, "heldout", args.heldout_tokens, 0,
                                          args.seq_len) for d in args.domains}
    key = sweep_key(args, model)
    weights = any(wanted(args, f"weight:{w}:{s}") for w in WEIGHT_SCORES for s in [*args.sparsities, "greedy"])
    sc = {d: domain_scores(model, split_a[d], out / f"scores.{d}.safetensors", {**key, "domain": args.specs[d]},
                           args.batch_size, weights) for d in args.domains}
    stats = {d: {**s["stats"], "taylor": s["taylor"]} for d, s in sc.items()}
    return Sweep(args, model, tok, split_a, split_b, heldout, sc, stats,
                 protected=super_neurons(stats),  # (L, F): kept by every neuron-level method, as in purify.py
                 results=RowCache(out / "results.json", {**key, "heldout_tokens": args.heldout_tokens, "format": 2}),
                 choices=RowCache(out / "choices.json", key),
                 frontier_costs=RowCache(out / "frontier.json", {**key, "steps": list(FRONTIER_STEPS)}))


def domain_rows(sw: Sweep, d: str):
    """Every wanted system of domain d on its own held-out text: dense, the neuron-level keeps and searches, the
    frontier, the weight-level masks."""
    args, results = sw.args, sw.results
    results.get(f"{d}|dense", lambda: {"nll": mean_nll(sw.model, sw.heldout[d], None, args.batch_size),
                                       "active_fraction": 1.0})
    for score in NEURON_SCORES:
        for keep in [*args.keeps, *(SEARCHES if score != "taylor_abs" else ())]:
            if keep == "greedy-task" and d not in data.TASK_DOMAINS:
                continue
            if wanted(args, f"neuron:{score}:{keep}"):
                results.get(f"{d}|neuron:{score}:{keep}", neuron_row(sw, d, score, keep))
    for target in args.frontier:
        if wanted(args, f"neuron:frontier:{target}"):
            results.get(f"{d}|neuron:frontier:{target}", frontier_row(sw, d, target))
    for score in WEIGHT_SCORES:
        for s in args.sparsities:
            if wanted(args, f"weight:{score}:{s}"):
                results.get(f"{d}|weight:{score}:{s}", lambda: weight_row(sw, d, score, s))
    if wanted(args, "weight:taylor:greedy"):
        results.get(f"{d}|weight:taylor:greedy", lambda: weight_greedy_row(sw, d))


def held_out_row(sw: Sweep, d: str, idx: list, **extra) -> dict:
    """A neuron-level system's row: held-out NLL of domain d's text with the compact FFNs of `idx`."""
    return {"nll": mean_nll(sw.model, sw.heldout[d], materialize(sw.model, idx), sw.args.batch_size),
            "active_fraction": kept_fraction(idx, sw.model), **extra}


def searched(sw: Sweep, name: str, search) -> dict:
    """A search's choice: saved by an earlier sweep (its choices, or its row), else search() now and saved."""
    row = sw.results.rows.get(name)
    saved = {k: row[k] for k in ("threshold", "removed", "trials") if k in row} if row else None
    return sw.choices.get(name, lambda: saved or search())


def neuron_row(sw: Sweep, d: str, score: str, keep):
    """Choose the kept neurons of one neuron-level system now (the experts need them even when its row is cached);
    returns the computation of its row."""
    name, s = f"{d}|neuron:{score}:{keep}", score_neurons(sw.stats, sw.model, score, d)
    if keep == "auto":  # one global threshold, chosen on split B
        extra = searched(sw, name, lambda: dict(zip(("threshold", "trials"), auto_threshold(
            sw.model, s, sw.split_b[d], sw.protected, sw.args.batch_size))))
        idx = select_above(s, extra["threshold"], sw.protected)
    elif keep in ("greedy", "greedy-task"):  # layer-wise removals, each kept only if the validation loss drops
        extra = searched(sw, name, lambda: greedy_search(sw, d, s, keep))
        kept = torch.ones(sw.model.config.n_layer, sw.model.config.n_ffn, dtype=torch.bool)  # (L, F)
        for l, js in extra["removed"].items():
            kept[int(l), js] = False
        idx = [r.nonzero().flatten() for r in kept]
    else:
        idx, extra = select_neurons(s, keep, sw.protected), {}
    sw.experts.setdefault(f"{score}:{keep}", {})[d] = idx
    return lambda: held_out_row(sw, d, idx, **extra)


def greedy_search(sw: Sweep, d: str, s: torch.Tensor, keep: str) -> dict:
    """The greedy layer-wise search on scores s (L, F): validated on split B, every token of the text ("greedy"), or
    by the task: the answers' tokens of --task-tokens of (prompt, answer) pairs ("greedy-task")."""
    model, args = sw.model, sw.args
    if keep == "greedy":
        idx, trials = greedy_layers(model, s, sw.split_b[d], sw.protected, args.batch_size)
    else:
        windows, weights = task_windows(sw.tok, data.task_pairs(d, args.seed, args.data_dir), args.seq_len,
                                        args.task_tokens)
        idx, trials = greedy_layers(model, s, windows, sw.protected, args.batch_size, loss_weights=weights)
    gone = {str(l): sorted(set(range(model.config.n_ffn)) - set(i.tolist())) for l, i in enumerate(idx)}
    return {"removed": {l: js for l, js in gone.items() if js}, "trials": trials}


def frontier_row(sw: Sweep, d: str, target: float):
    """|taylor| removals on top of the validated greedy ones, placed by measured cost; returns the computation of
    its row."""
    model, bs, L = sw.model, sw.args.batch_size, sw.model.config.n_layer
    base = sw.experts.get("taylor:greedy", {}).get(d)
    order = score_neurons(sw.stats, model, "taylor_abs", d).argsort(dim=1)  # (L, F) least important first
    costs = torch.tensor(sw.frontier_costs.get(d, lambda: removal_costs(
        model, order, sw.split_b[d], base or [None] * L, FRONTIER_STEPS, bs).tolist()))
    idx, info = budgeted_removal(model, order, sw.split_b[d], target, base, sw.protected, bs, costs)
    sw.experts.setdefault(f"frontier:{target}", {})[d] = idx
    return lambda: held_out_row(sw, d, idx, per_layer=info["per_layer"])


def weight_row(sw: Sweep, d: str, score: str, sparsity: float) -> dict:
    """A weight-level mask at a fixed sparsity (reference: no speedup) on domain d's held-out text."""
    model = sw.model
    mlps = [weight_masked(model.layers[l].mlp, weight_scores(model, score, sw.scores[d], l), sparsity)
            for l in range(model.config.n_layer)]
    return {"nll": mean_nll(model, sw.heldout[d], mlps, sw.args.batch_size), "active_fraction": 1 - sparsity}


def weight_greedy_row(sw: Sweep, d: str) -> dict:
    """The weight-level greedy search (reference: no speedup) on domain d's held-out text."""
    model = sw.model
    mlps, trials = greedy_weights(model, sw.scores[d], sw.split_b[d], sw.args.batch_size)
    total = sum(w.numel() for blk in model.layers for w in (*blk.mlp.up_weights(), blk.mlp.down_weight()))
    removed = sum(t["removed"] for t in trials if t["accepted"])
    return {"nll": mean_nll(model, sw.heldout[d], mlps, sw.args.batch_size), "active_fraction": 1 - removed / total,
            "trials": trials}


def cross_rows(sw: Sweep):
    """--cross: each system purified for domain d, measured on every other domain's held-out text e."""
    for system in [c for c in sw.args.cross if wanted(sw.args, c)]:
        score, keep = system.split(":")[1:] if system.count(":") == 2 else ("", "")
        if f"{score}:{keep}" not in sw.experts:
            raise UserError(f"--cross {system!r}: not a neuron-level system of this sweep (e.g. neuron:taylor:greedy)")
        for d in sw.args.domains:
            idx = sw.experts[f"{score}:{keep}"][d]
            for e in sw.args.domains:
                if e != d:
                    sw.results.get(f"cross|{d}|{system}|{e}", lambda: held_out_row(sw, e, idx))


def taylor_check(sw: Sweep) -> dict:
    """check_taylor on the first --check-tokens of split A of --check-domain."""
    args = sw.args
    d = args.check_domain or args.domains[0]
    w = sw.split_a[d][:max(1, args.check_tokens // args.seq_len)]
    check = check_taylor(sw.model, w, args.check_neurons, args.check_lowest, Path(args.out) / "check.json",
                         {**sweep_key(args, sw.model), "domain": d, "n": w.numel(), "random": args.check_neurons,
                          "lowest": args.check_lowest}, args.seed)
    check["domain"] = d
    return check


def write_experts(out: Path, spec: str, experts: dict, model, args, stats, protected):
    """One experts file (save_experts format) holding each domain's purified expert for `spec` = SCORE:KEEP,
    with the statistics and the one-mask baselines (at the experts' mean kept fraction), as purify.py writes them,
    so train_router.py and evaluate.py (mixed, general, random, magnitude at equal compute) can use it."""
    if spec not in experts:
        raise UserError(f"--write-experts {spec!r}: not a neuron-level system of this sweep "
                        f"(have {', '.join(experts)})")
    cfg = model.config
    score, keep = spec.split(":")
    chosen = dict(experts[spec])
    filled = [d for d in args.domains if d not in chosen]  # greedy-task: the domains without a task
    if filled and "taylor:greedy" not in experts:
        raise UserError(f"--write-experts {spec!r} has no expert for {', '.join(filled)}: also run "
                        "neuron:taylor:greedy, which fills them")
    chosen = {d: chosen[d] if d in chosen else experts["taylor:greedy"][d] for d in args.domains}
    fraction = sum(kept_fraction(e, model) for e in chosen.values()) / len(chosen)
    baselines = {b: select_neurons(score_neurons(stats, model, b, seed=args.seed), fraction, protected)
                 for b in BASELINES if b != "general" or "general" in stats}
    meta = {"fingerprint": model.fingerprint, "model": cfg.name, "n_layer": cfg.n_layer, "n_ffn": cfg.n_ffn,
            "score": score, "contrast": 0.0, "keep": fraction, "alloc": keep if keep in ("auto", "greedy") else
            "uniform", "protect": PROTECT_FACTOR, "n_protected": int(protected.sum()), "seed": args.seed,
            "seq_len": args.seq_len, "domain_specs": {d: args.specs[d] for d in chosen},
            "tokens": {d: int(stats[d]["count"]) for d in chosen}, "source": "purify_sweep.py (split A)",
            **({"filled_from_taylor_greedy": filled} if filled else {})}
    path = out / f"experts.{score}.{keep}.safetensors"
    save_experts(path, chosen, meta, baselines, {d: {k: stats[d][k] for k in (*STATS, "count")} for d in chosen})
    print(f"wrote {path}", file=sys.stderr)


# ----------------------------------------------------------------------------- report

def num(v: float, sign: str = "") -> str:
    """2 decimals; huge values (a destroyed model) in scientific notation, so tables stay readable."""
    return f"{v:{sign}.2f}" if abs(v) < 1e5 else f"{v:{sign}.1e}"


def delta_text(r: dict) -> str:
    return f"{num(r['delta'], '+')} [{num(r['delta_ci'][0], '+')}, {num(r['delta_ci'][1], '+')}]"


def report(rows: dict, info: dict, args) -> tuple[str, dict]:
    table, summary = {}, {}
    for d in args.domains:
        dense = rows[f"{d}|dense"]["nll"]
        table[d] = {}
        for name, row in rows.items():
            dom, system = name.split("|", 1)
            if dom == d:
                table[d][system] = {"active_fraction": row["active_fraction"],
                                    **ppl_intervals(row["nll"], None if system == "dense" else dense)}
        nll = np.asarray(dense)
        table[d]["dense"]["se_pct"] = 100 * math.expm1(nll.std(ddof=1) / math.sqrt(len(nll)))  # 1 SE of dense
        purified = {s: r for s, r in table[d].items() if s != "dense"}
        best = min(purified, key=lambda s: purified[s]["ppl"])
        within = [s for s, r in purified.items()
                  if s.startswith("neuron:") and r["delta"] <= table[d]["dense"]["se_pct"]]
        cheapest = min(within, key=lambda s: purified[s]["active_fraction"]) if within else None
        summary[d] = {"best": best, **purified[best], "cheapest_within_1se": cheapest,
                      "beats_dense": [s for s, r in purified.items() if r["delta_ci"][1] < 0]}
    md = ["# Does any purification beat dense? (held-out perplexity, own domain)", "",
          f"Scores from {info['tokens']['A']} calibration tokens (split A), auto and greedy choices from "
          f"{info['tokens']['B']} (split B), held-out {info['tokens']['heldout']} tokens in windows of {args.seq_len}. "
          f"Intervals: 95% bootstrap over held-out windows; Δ = paired change of perplexity against dense. "
          f"{info['n_protected']} super neurons kept by every neuron-level system.", ""]
    for d in args.domains:
        md += [f"## {d}", "", "| system | active FFN | held-out ppl [95%] | Δ vs dense % [95%] |",
               "|---|---|---|---|"]
        for system, r in table[d].items():
            delta = "" if system == "dense" else delta_text(r)
            if system.endswith(":auto"):
                system += f" (threshold {rows[f'{d}|{system}']['threshold']:.3g})"
            md.append(f"| {system} | {r['active_fraction']:.4f} | {num(r['ppl'])} [{num(r['ppl_ci'][0])}, "
                      f"{num(r['ppl_ci'][1])}] | {delta} |")
        md.append("")
    md += ["## Summary", "",
           "| domain | dense ppl | best purified system | its ppl | Δ % [95%] | systems beating dense "
           "| least FFN within 1 SE of dense (neuron level) |", "|---|---|---|---|---|---|---|"]
    for d, s in summary.items():
        c = s["cheapest_within_1se"]
        cheap = f"{c}: {table[d][c]['active_fraction']:.3f} kept, Δ {num(table[d][c]['delta'], '+')}%" if c else "none"
        md.append(f"| {d} | {num(table[d]['dense']['ppl'])} | {s['best']} | {num(s['ppl'])} | {delta_text(s)} "
                  f"| {', '.join(s['beats_dense']) or 'none'} | {cheap} (1 SE = {table[d]['dense']['se_pct']:.1f}%) |")
    for system in [c for c in args.cross if all(c in table[d] for d in args.domains)]:
        md += ["", f"## {system} on every domain's held-out text (rows: the domain it was purified for; cells: "
                   "Δ perplexity % against dense on that text [95%])", "",
               "| purified for \\ held-out | " + " | ".join(args.domains) + " |",
               "|---" * (len(args.domains) + 1) + "|"]
        for d in args.domains:
            cells = []
            for e in args.domains:
                r = table[d][system] if e == d else ppl_intervals(rows[f"cross|{d}|{system}|{e}"]["nll"],
                                                                   rows[f"{e}|dense"]["nll"])
                cells.append(delta_text(r))
            md.append(f"| {d} | " + " | ".join(cells) + " |")
    c = info["check"]
    if c:
        md += ["", f"## Taylor estimate vs exact removal ({c['domain']}, {c['tokens']} calibration tokens)", "",
               f"- {c['n_random']} neurons sampled evenly over layers: Spearman {c['spearman_random']:.3f}, Pearson "
               f"{c['pearson_random']:.3f}, sign agreement {c['sign_agreement_random']:.3f}; estimated negative "
               f"{c['estimated_negative_random']}, truly negative {c['truly_negative_random']}",
               f"- the {c['n_lowest']} neurons with the most negative estimate: {c['lowest_truly_negative']} "
               f"truly lower the loss when removed; mean estimate {c['lowest_estimate_mean']:.2e}, mean exact change "
               f"{c['lowest_exact_mean']:.2e} (Spearman {c['spearman_lowest']:.3f})",
               f"- over all neurons, {c['estimated_negative_all']} of {c['neurons_all']} have a negative estimate"]
    return "\n".join(md) + "\n", {"table": table, "summary": summary, **info}


def domain_panels(domains: list[str]):
    """A figure with one panel per domain, and its axes; (None, None) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None, None
    fig, axes = plt.subplots(1, len(domains), figsize=(3.6 * len(domains), 3.4), squeeze=False)
    return fig, list(axes[0])


def plot(table: dict, domains: list[str], path: Path) -> bool:
    """Held-out ppl vs fraction of FFN weights removed (log scale: the greedy choices remove 0.01-0.5%), one panel
    per domain, one line per score, dense dashed. The y axis stops at 3x dense: what leaves the top is far worse."""
    fig, axes = domain_panels(domains)
    if fig is None:
        return False
    for ax, d in zip(axes, domains):
        dense = table[d]["dense"]["ppl"]
        lines: dict[str, list] = {}
        for system, r in table[d].items():
            if system != "dense" and not system.endswith((":auto", ":greedy")):
                lines.setdefault(system.rsplit(":", 1)[0], []).append((1 - r["active_fraction"], r["ppl"]))
        for i, (name, pts) in enumerate(sorted(lines.items())):
            pts.sort()
            ax.plot(*zip(*pts), marker="o", ms=3, lw=1, color=f"C{i}", label=name,
                    ls="-" if name.startswith("neuron") else ":")
            for mode, marker in (("auto", "*"), ("greedy", "D")):
                r = table[d].get(f"{name}:{mode}")
                if r and r["active_fraction"] < 1:  # an auto threshold that removed nothing is dense itself
                    ax.plot(1 - r["active_fraction"], r["ppl"], marker=marker, ms=7, color=f"C{i}", ls="none")
        ax.axhline(dense, color="k", ls="--", lw=1, label="dense")
        low = min(r["ppl"] for r in table[d].values())
        ax.set(title=d, xlabel="fraction of FFN weights removed", xscale="log", yscale="log",
               ylim=(0.9 * low, 3 * dense))
    axes[0].set_ylabel("held-out perplexity")
    axes[-1].legend(fontsize=7)
    fig.suptitle("purified for its own domain vs dense (◆ = greedy, ★ = auto threshold; off the top: > 3x dense)",
                 fontsize=9)
    return save_figure(fig, path, dpi=90)


def plot_frontier(table: dict, domains: list[str], path: Path) -> bool:
    """Quality against compute: held-out Δ perplexity % vs dense against the fraction of FFN neurons removed, per
    domain, for uniform keeps by dowp and |taylor|, the validated greedy removals and the frontier; the band is
    one standard error of dense."""
    fig, axes = domain_panels(domains)
    if fig is None:
        return False
    for ax, d in zip(axes, domains):
        se = table[d]["dense"]["se_pct"]
        ax.axhspan(-se, se, color="0.9", label="dense ± 1 SE")
        lines = (("neuron:dowp:", "dowp, uniform"), ("neuron:taylor_abs:", "|taylor|, uniform"),
                 ("neuron:frontier:", "frontier (placed by cost)"))
        for i, (name, label) in enumerate(lines):
            pts = sorted((1 - r["active_fraction"], r["delta"]) for s, r in table[d].items()
                         if s.startswith(name) and s.rsplit(":", 1)[1][0].isdigit())
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1, color=f"C{i}", label=label)
        g = table[d].get("neuron:taylor:greedy")
        if g:
            ax.plot(1 - g["active_fraction"], g["delta"], marker="D", ms=6, color="C3", ls="none",
                    label="taylor greedy")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(title=d, xlabel="fraction of FFN neurons removed", ylim=(-15, 60))
    axes[0].set_ylabel("held-out perplexity vs dense, %")
    axes[-1].legend(fontsize=7)
    fig.suptitle("what a compute saving costs (off the top: > +60%)", fontsize=9)
    return save_figure(fig, path, dpi=90)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = ArgumentParser(description="Held-out perplexity of every purification score and budget vs dense.",
                       formatter_class=DefaultsHelpFormatter)
    add_common_args(p, out_default="results/purify_sweep")
    data.add_domains_arg(p)
    p.add_argument("--tokens", type=positive_int, nargs="+", default=[8192],
                   help="calibration tokens per domain (A = 3/4, B = 1/4); several: one sweep per size")
    p.add_argument("--draws", type=positive_int, default=1,
                   help="sweeps per size on other draws of the calibration text (seeds --seed, --seed + 1, ...); "
                        "with more than one sweep, stability.md says how the results vary")
    p.add_argument("--heldout-tokens", type=int, default=4096, help="held-out tokens per domain")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward (the backward uses a quarter)")
    p.add_argument("--keeps", type=float, nargs="+", default=[0.99, 0.98, 0.95, 0.9, 0.75, 0.5])
    p.add_argument("--frontier", type=float, nargs="*", default=[0.05, 0.1, 0.2, 0.3], metavar="REMOVE",
                   help="neuron:frontier:REMOVE: that fraction of the FFN removed where the validation loss says it "
                        "costs least, on top of the validated greedy removals (search.budgeted_removal)")
    p.add_argument("--task-tokens", type=positive_int, default=8192,
                   help="neuron:*:greedy-task: tokens of (prompt, answer) pairs from the calibration split that "
                        f"validate the search by the answers alone ({', '.join(data.TASK_DOMAINS)})")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5])
    p.add_argument("--check-neurons", type=int, default=180,
                   help="neurons removed exactly, evenly over layers (0 = off)")
    p.add_argument("--check-lowest", type=int, default=30, help="plus this many with the most negative estimate")
    p.add_argument("--check-tokens", type=int, default=2048, help="calibration tokens (split A) the check runs on")
    p.add_argument("--check-domain", default=None, help="domain of the check (default: the first)")
    p.add_argument("--write-experts", nargs="*", default=None, metavar="SCORE:KEEP",
                   help="write these neuron-level systems as experts files for evaluate.py (e.g. taylor:0.99)")
    p.add_argument("--cross", nargs="*", default=["neuron:taylor:greedy", "neuron:dowp:greedy"],
                   help="neuron-level systems also measured on the other domains' held-out text")
    p.add_argument("--systems", nargs="+", default=["*"], metavar="PATTERN",
                   help="run only the systems matching these patterns, e.g. neuron:taylor:greedy or 'weight:*' "
                        "(dense always runs)")
    p.add_argument("--plot", action="store_true", help="also write report.png (needs matplotlib)")
    args = p.parse_args(argv)
    args.specs = data.domain_specs(args.domains)  # name -> spec, every name and path checked
    args.domains = list(args.specs)
    bad = [k for k in args.keeps if not 0 < k <= 1] + [s for s in args.sparsities if not 0 <= s < 1]
    if bad:
        raise UserError(f"--keeps must be in (0, 1] and --sparsities in [0, 1), got {bad}")
    if min(args.tokens) < 2 * args.seq_len or args.heldout_tokens < args.seq_len:
        raise UserError(f"--tokens must be >= 2 x --seq-len and --heldout-tokens >= --seq-len ({args.seq_len})")
    return args


def run_dirs(args) -> list[tuple[int, int, Path]]:
    """(calibration tokens, calibration seed, output folder) of every sweep: one per --tokens x --draws (draw i shuffles
    the calibration documents with seed --seed + i, so it scores other windows); a single sweep writes into --out."""
    runs = [(t, args.seed + i) for t in args.tokens for i in range(args.draws)]
    if len(runs) == 1:
        return [(*runs[0], Path(args.out))]
    return [(t, s, Path(args.out) / f"tokens{t}.seed{s}") for t, s in runs]


def stability(results: dict, args) -> tuple[str, dict]:
    """Across draws of the calibration text, per calibration size, domain and purified system: the held-out change
    against dense (mean, spread, range), the fraction removed, and in how many draws its interval excludes zero."""
    table = {}
    for tokens in args.tokens:
        runs = [r for (t, _), r in results.items() if t == tokens]
        for d in args.domains:
            systems = [s for s in runs[0]["table"][d] if s != "dense" and all(s in r["table"][d] for r in runs)]
            for system in systems:
                rows = [r["table"][d][system] for r in runs]
                deltas = np.array([r["delta"] for r in rows])
                table[f"{tokens}|{d}|{system}"] = {
                    "tokens": tokens, "domain": d, "system": system, "draws": len(rows),
                    "delta_mean": float(deltas.mean()), "delta_sd": float(deltas.std(ddof=1)) if len(rows) > 1 else 0.0,
                    "delta_min": float(deltas.min()), "delta_max": float(deltas.max()),
                    "removed_mean": float(np.mean([1 - r["active_fraction"] for r in rows])),
                    "better": sum(r["delta_ci"][1] < 0 for r in rows), "worse": sum(r["delta_ci"][0] > 0 for r in rows),
                    "dense_ppl": float(np.mean([r2["table"][d]["dense"]["ppl"] for r2 in runs]))}
    md = ["# Stability over draws of the calibration text (held-out perplexity, own domain)", "",
          f"Each draw shuffles the calibration documents with another seed ({args.draws} draws from seed {args.seed});"
          f" held-out text is the same {args.heldout_tokens} tokens per domain in every draw. Δ = paired change of "
          "perplexity against dense, %; better / worse = draws whose 95% interval lies below / above zero.", "",
          "| calibration tokens | domain | system | Δ % mean ± sd | range | 1 − active FFN, % "
          "| better / worse / n.s. |",
          "|---|---|---|---|---|---|---|"]
    for r in table.values():
        ns = r["draws"] - r["better"] - r["worse"]
        md.append(f"| {r['tokens']} | {r['domain']} | {r['system']} | {r['delta_mean']:+.1f} ± {r['delta_sd']:.1f} | "
                  f"{r['delta_min']:+.1f} .. {r['delta_max']:+.1f} | {100 * r['removed_mean']:.2f} | "
                  f"{r['better']} / {r['worse']} / {ns} |")
    return "\n".join(md) + "\n", {"table": table, "draws": args.draws, "seed": args.seed}


def main(argv=None):
    args = parse_args(argv)
    with locked_dir(args.out, "another purify_sweep.py run"):  # two sweeps on one --out would race on its caches
        run(args)


def run(args):
    model, tok = M.load_for_cli(args)
    t0 = time.perf_counter()
    results = {}
    for tokens, seed, out in run_dirs(args):
        one = argparse.Namespace(**{**vars(args), "tokens": tokens, "seed": seed, "out": str(out)})
        out.mkdir(parents=True, exist_ok=True)
        rows, info = sweep(one, model, tok)
        md, results[tokens, seed] = report(rows, info, one)
        if args.plot:
            table = results[tokens, seed]["table"]
            if plot(table, args.domains, out / "report.png"):
                md += "\n![held-out ppl vs kept fraction](report.png)\n"
                if any(s.startswith("neuron:frontier:") for s in table[args.domains[0]]):
                    plot_frontier(table, args.domains, out / "frontier.png")
                    md += "\n![what a compute saving costs](frontier.png)\n"
            else:
                md += "\n(--plot: matplotlib is not installed, no PNG written)\n"
        write_atomic(out / "report.json", json.dumps(results[tokens, seed], indent=1))
        write_atomic(out / "report.md", md)
        print(md)
    if len(results) > 1:
        md, summary = stability(results, args)
        write_atomic(Path(args.out) / "stability.json", json.dumps(summary, indent=1))
        write_atomic(Path(args.out) / "stability.md", md)
        print(md)
    print(f"{time.perf_counter() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
