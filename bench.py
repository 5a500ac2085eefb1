"""bench.py — how fast, and how close to the machine's limits: dense vs transformers, DSS-Experts, FreeMoE.

Pipeline position: a side measurement of every stage's product
    model.py  ->  purify.py (DOWP, DSS-Experts)  ->  train_router.py / router.py  ->  evaluate.py
                                   bench.py measures the cost of the dense model, each expert and the routed model.

What goes in:  the model (--model, default SmolLM2-135M-Instruct GGUF); optionally an experts file from purify.py
               (--experts) and a router from train_router.py (--router).
What comes out: markdown tables on stdout and a JSON file (--out, default results/bench.json), written after every
               section (atomically), so a killed run keeps what it measured. A rerun measures again: timings of
               another moment are not worth resuming.

    python bench.py --quick                      # ~5 min on 2 CPU cores
    python bench.py --threads 2 --out results/bench.json
    python bench.py --device cuda --compile      # the GPU table (sizes up to batch 64), with the fused decode too
    python bench.py --experts experts/k050/experts.safetensors --router runs/router/router.safetensors

Sections (each skipped with a note when what it needs is missing):
  1. ceilings    the machine's own limits in the model's dtype: matmul GFLOP/s (prefill is compute-bound) and
                 streaming read bandwidth GB/s (batch-1 decode is bandwidth-bound: every weight is read once per token).
                 CUDA: also the bf16 and fp32 tensor-core ceilings (8192^3) and HBM bandwidth (a 1 GiB buffer).
  2. dense       prefill and decode tokens/s of our model vs `transformers` on identical weights, dtype and threads,
                 run interleaved (ours, theirs, ours, ...) so both see the same machine load. transformers is the
                 reference: imported lazily here, built from our own HF export (export_hf) in a temp dir, its
                 column skipped with a note if it is not installed. Greedy tokens of both are compared. Decode runs
                 as generate.generate does: CPU the dynamic step, CUDA the CUDA graph, next to the same step
                 launched op by op ("ours eager"). What bounds a step: torch.profiler's CPU op times (CPU), or the
                 CUDA profiler's kernel time against the step's wall time (CUDA: a busy GPU is kernel-bound, an idle
                 one launch-bound).
  2b. scoring    MMLU-shaped requests through scoring.loglikelihoods: tokens/s and the fraction of the forward
                 ceiling (achieved FLOP/s over the matmul ceiling).
  3. experts     each materialized DSS-Expert (materialize) vs dense: measured speedup next to the ideal one
                 from FLOPs (attention + kept FFN + LM head), batch-1 decode and batch-8 prefill. Without an experts
                 file, a random keep-0.5 index set stands in (speed does not depend on which neurons are kept).
  4. freemoe     the routed model (router.FreeMoE): routed request vs the same FFNs unrouted (router overhead), and
                 speedup.
  5. stats       collect_stats cost vs a plain forward over the same windows (both last_only).
  6. memory      peak memory of each system, each in its own subprocess. CPU: peak resident set (VmHWM from
                 /proc/self/status, reset through /proc/self/clear_refs after loading) minus the RSS of the loaded
                 dense model, i.e. the extra memory the run needs (KV cache, activations, compact expert weights).
                 tracemalloc would not see torch's allocations. CUDA: torch.cuda.max_memory_allocated.
  6b. level3    level 3 (router.SkippingMLP, per-token neuron skipping) at batch 1: the FFN alone, dense vs the
                 gathered path (MLP.active_forward) with random active sets of (1 - s) F neurons per layer, s = 25, 40,
                 50, 70%, every layer once per timing (30 layers of weights do not stay in a CPU cache, as in a real
                 step); then whole greedy decode steps, dense vs level 3 with thresholds from
                 router.level3_thresholds on windows of this repository's README. Each speedup next to its ideal
                 from bytes read (gate read fully, up and down only for the active neurons), and torch.profiler's top
                 ops of each FFN at s = 50%; the two gathers alone over half the rows, contiguous, every second
                 and scattered (what scattering costs per byte); and on real active sets (README tokens after the
                 calibration windows), the neurons as stored against hot-first (`hot_first`: most often active
                 first), with the mean run of consecutive active neurons: does a layout of the weights make the
                 reads contiguous?
  7. goals       the speed targets (GOALS), each as measured vs target, met or missed by how much (the GPU
                 targets on CUDA only).

Every time is the median of `--reps` runs after one warm-up run, with min and max. Prefill = one forward filling the
KV cache and returning the last position's logits (what generation does). Decode = greedy steps from a prefilled
cache, one token per sequence per step. FLOPs count 2 per multiply-add, causal attention only over visible keys.

Shape legend: B batch, T time (prompt tokens), N new tokens, S key length, C width, H query heads, K kv heads,
D head dim, F FFN neurons, k kept neurons, V vocab, L layers.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

import generate as G
import model as M
import router
from dowp import collect_stats
from experts import export_hf, kept_fraction, load_experts, materialize
from measure import (ceilings, decode_bytes, decode_flops, forward_flops, matmul_probe, rate, read_probe,
                     side_by_side, sync, timed)
from scoring import default_batch_tokens, loglikelihoods, shared_contexts
from cli import (ArgumentParser, UserError, add_common_args, fraction, locked_dir, positive_int, progress,
                 resolve_device, resolve_dtype, run_cli, write_atomic)

FULL = {"sizes": [(1, 128), (1, 512), (8, 128), (8, 512)], "new_tokens": 128, "reps": 3, "stats_windows": (16, 256),
        "scoring_items": 8}
QUICK = {"sizes": [(1, 128), (8, 128)], "new_tokens": 32, "reps": 3, "stats_windows": (8, 128), "scoring_items": 2}
# On a GPU: batch 64 as well (decode is nearly free per extra row there), more tokens and items (it is fast)
GPU_FULL = {"sizes": [(1, 128), (1, 512), (8, 512), (64, 512)], "new_tokens": 128, "reps": 5,
            "stats_windows": (64, 512), "scoring_items": 256}
GPU_QUICK = {"sizes": [(1, 128), (8, 128), (64, 128)], "new_tokens": 64, "reps": 3, "stats_windows": (16, 256),
             "scoring_items": 64}
SECTIONS = ("dense", "scoring", "experts", "stats", "memory", "level3")
GOALS = {  # the speed targets this reference holds itself to
    "decode_b1_vs_hf": 1.5, "decode_b1_of_bandwidth": 0.8, "prefill_vs_hf": 1.1, "prefill_of_matmul": 0.75,
    "decode_b8_vs_hf": 1.2, "expert_of_ideal": 0.9, "router_overhead_pct": 3.0, "stats_cost": 1.2,
    # on a GPU
    "gpu_decode_b1_vs_hf": 10.0, "gpu_decode_b64_vs_eager": 3.0, "gpu_scoring_of_forward": 0.5,
}


# ----------------------------------------------------------------------------- our model: prefill and decode

def ours_prefill(model, idx, mlps=None):
    """Fill a fresh KV cache with idx (B, T), return the seconds it took (cache allocation included)."""
    B, T = idx.shape
    sync(idx.device)
    t0 = time.perf_counter()
    model.setup_cache(B, T + 1)
    model(idx, 0, None, mlps, last_only=True)  # (B, 1, V)
    sync(idx.device)
    dt = time.perf_counter() - t0
    model.clear_cache()
    return dt, None


def ours_decode(model, idx, n_new, mlps=None, decode="auto", around_steps=contextlib.nullcontext):
    """Prefill idx (B, T) (not timed), then n_new greedy steps (timed), decoded as generate.generate does: "dynamic"
    (the forward over the cache so far, the CPU default) or the static-shape step, eager ("static") or replayed as a
    CUDA graph ("graph", the CUDA default: captured in side_by_side's warm-up run, then kept by the model's decode
    slot). Each step reads its tokens on the host, as generate does to check stops. around_steps: a context manager
    wrapped around the timed steps only (profile_cuda's profiler). -> (seconds, tokens (B, n_new))"""
    B, T = idx.shape
    if decode == "auto":
        decode = "graph" if idx.device.type == "cuda" else "dynamic"
    slot = G.decode_slot(model, B, T + n_new) if decode != "dynamic" else None
    if slot is None:
        model.setup_cache(B, T + n_new)
    logits = model(idx, 0, None, mlps, last_only=True)[:, -1]  # (B, V)
    if slot is not None:
        slot.start(None, [T] * B, T)
    tokens = []
    sync(idx.device)
    with around_steps():
        t0 = time.perf_counter()
        for step in range(n_new):
            nxt = logits.argmax(-1)  # (B,)
            tokens.append(nxt.tolist())
            if slot is None:
                logits = model(nxt[:, None], T + step, None, mlps)[:, -1]  # (B, V)
            else:
                logits = slot.step(model, nxt, mlps, decode)  # (B, V)
        sync(idx.device)
        dt = time.perf_counter() - t0
    model.clear_cache()
    return dt, torch.tensor(tokens).T  # (B, n_new)


# ----------------------------------------------------------------------------- transformers (the reference only)

def load_hf(model, device, dtype):
    """Our loaded weights in transformers, or (None, why not). Built from our own HF export (export_hf with
    every neuron kept) in a temp dir, so it needs neither the `gguf` package nor the original files, and both columns
    run exactly the same weights (for a GGUF model: our dequantization, checked against gguf's in the tests)."""
    if importlib.util.find_spec("transformers") is None:
        return None, "transformers is not installed (pip install -r requirements-dev.txt)"
    import tempfile

    from transformers import AutoModelForCausalLM
    try:
        with tempfile.TemporaryDirectory(prefix="bench-hf-") as d:
            export_hf(model, [None] * model.config.n_layer, d, dtype="float32")  # exactly our weights
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    except Exception as e:  # an architecture transformers lacks, ...
        return None, f"transformers could not load our HF export: {type(e).__name__}: {e}"
    return hf.to(device).eval(), None


def hf_prefill(hf, idx):
    return timed(lambda: hf(idx, use_cache=True, logits_to_keep=1), idx.device)[0], None


def hf_decode(hf, idx, n_new):
    """The same greedy loop as ours_decode, through transformers' own KV cache."""
    out = hf(idx, use_cache=True, logits_to_keep=1)
    logits, cache, tokens = out.logits, out.past_key_values, []
    sync(idx.device)
    t0 = time.perf_counter()
    for _ in range(n_new):
        nxt = logits[:, -1].argmax(-1)  # (B,)
        tokens.append(nxt.tolist())  # read on the host each step, as ours (and transformers' generate) does
        out = hf(nxt[:, None], past_key_values=cache, use_cache=True)
        logits, cache = out.logits, out.past_key_values
    sync(idx.device)
    return time.perf_counter() - t0, torch.tensor(tokens).T  # (B, n_new)


# ----------------------------------------------------------------------------- work counts

def neurons_per_layer(model, mlps) -> list[int]:
    return [blk.mlp.n_neurons if mlps is None else mlps[i].n_neurons for i, blk in enumerate(model.layers)]


# ----------------------------------------------------------------------------- 1. machine ceilings

# ----------------------------------------------------------------------------- 2. dense vs transformers

def bench_dense(model, hf, plan, device, compiled: bool = False) -> list[dict]:
    """Ours vs transformers per (B, T). On a shared machine the load changes by the minute, so the ceilings that
    the fractions divide by are measured again inside the same interleaved rounds (FFN-shape matmul, gemv).
    On CUDA "ours" decodes with the CUDA graph and "ours eager" with the step launched op by op, so the graph's
    gain is measured in the same rounds; with compiled=True (--compile) also "ours compiled",
    the graph of the torch.compile-fused step (its compilation happens in the warm-up run, untimed)."""
    cfg, rows, dtype = model.config, [], model.tok_emb.weight.dtype
    kept = neurons_per_layer(model, None)
    gen = torch.Generator().manual_seed(0)
    gpu = device.type == "cuda"
    mib, inner = (1024, 10) if gpu else (256, 1)
    read_ref, read_bytes = read_probe("gemv", device, dtype, mib, inner)
    for B, T in progress(plan["sizes"], desc="dense vs transformers", unit="size"):
        idx = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(device)  # (B, T) random prompt tokens
        N = plan["new_tokens"]
        pre = {"ours": lambda: ours_prefill(model, idx),
               "ceiling": matmul_probe(B * T, cfg.n_embd, cfg.n_ffn, device, dtype, inner)}
        dec = {"ours": lambda: ours_decode(model, idx, N), "ceiling": read_ref}
        if gpu:
            dec["ours eager"] = lambda: ours_decode(model, idx, N, decode="dynamic")
        if gpu and compiled:
            dec["ours compiled"] = lambda: ours_decode(model, idx, N, decode="compiled")
        if hf is not None:
            pre["transformers"] = lambda: hf_prefill(hf, idx)
            dec["transformers"] = lambda: hf_decode(hf, idx, N)
        p, d = side_by_side(pre, plan["reps"]), side_by_side(dec, plan["reps"])
        matmul_gflops = 2 * B * T * cfg.n_embd * cfg.n_ffn / p["ceiling"]["median"] / 1e9
        read_gbs = read_bytes / d["ceiling"]["median"] / 1e9
        row = {"batch": B, "prompt": T, "new_tokens": N, "ceiling_matmul_gflops": matmul_gflops,
               "ceiling_read_gbs": read_gbs}
        dec.pop("ceiling")
        pf, df = forward_flops(cfg, kept, B, T, 0, 1), decode_flops(cfg, kept, B, T, N)
        db = decode_bytes(model, kept, B, T, N)
        for name in dec:
            pn = p[name] if name in p else p["ours"]  # "ours eager" prefills like "ours"
            row[name] = {"prefill_s": {k: v for k, v in pn.items() if k != "extra"}, "prefill_tok_s": rate(pn, B * T),
                         "decode_s": {k: v for k, v in d[name].items() if k != "extra"},
                         "decode_tok_s": rate(d[name], B * N),
                         "prefill_gflops": pf / pn["median"] / 1e9, "decode_gbs": db / d[name]["median"] / 1e9,
                         "decode_gflops": df / d[name]["median"] / 1e9}
            row[name]["prefill_of_matmul"] = row[name]["prefill_gflops"] / matmul_gflops
            row[name]["decode_of_bandwidth"] = row[name]["decode_gbs"] / read_gbs
        if gpu:
            row["decode_vs_eager"] = d["ours eager"]["median"] / d["ours"]["median"]
            row["graph_tokens_identical"] = bool(torch.equal(d["ours"]["extra"], d["ours eager"]["extra"]))
        if hf is not None:
            row["prefill_ratio"] = p["transformers"]["median"] / p["ours"]["median"]
            row["decode_ratio"] = d["transformers"]["median"] / d["ours"]["median"]
            row["tokens_identical"] = bool(torch.equal(d["ours"]["extra"], d["transformers"]["extra"]))
            # bf16 on a GPU: two implementations may part at a near tie; the share of equal tokens says how soon
            row["tokens_agree"] = float((d["ours"]["extra"] == d["transformers"]["extra"]).float().mean())
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 2b. scoring (evaluate's path)

def scoring_requests(vocab_size: int, items: int, seed: int = 4) -> list[tuple[list[int], list[int]]]:
    """MMLU-shaped requests of random tokens: per item a 5-shot-sized context (400..800 tokens) scored on four
    one-token letters (they share one row) and, as the cloze variant, a context 100 tokens shorter (no options)
    scored on four 3-token answers (the context runs once, each answer after it)."""
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(items):
        ctx = torch.randint(0, vocab_size, (int(torch.randint(400, 801, (1,), generator=g)),), generator=g).tolist()
        reqs += [(ctx, [t]) for t in torch.randperm(vocab_size, generator=g)[:4].tolist()]
        reqs += [(ctx[100:], torch.randint(0, vocab_size, (3,), generator=g).tolist()) for _ in range(4)]
    return reqs


def bench_scoring(model, plan, device, matmul_gflops: float) -> dict:
    """scoring.loglikelihoods on MMLU-shaped requests: tokens/s over every token the model runs (a shared context
    once, then each continuation on its copy of the cache), and the fraction of the forward ceiling, i.e. achieved
    FLOP/s (forward_flops, LM head on the scored positions only) over the matmul ceiling in the model's dtype."""
    cfg, kept = model.config, neurons_per_layer(model, None)
    reqs = scoring_requests(cfg.vocab_size, plan["scoring_items"])
    shared = shared_contexts(reqs, cfg.max_seq_len)
    grouped = {r for rs in shared.values() for r in rs}
    rows: dict[tuple, int] = {}  # input row -> scored positions (requests sharing a row share their positions)
    for r, (ctx, cont) in enumerate(reqs):
        if r not in grouped:
            key = tuple((ctx + cont)[:-1])
            rows[key] = max(rows.get(key, 0), len(cont))
    tokens = sum(len(r) for r in rows)
    flops = sum(forward_flops(cfg, kept, 1, len(r), 0, n) for r, n in rows.items())
    for ctx, rs in shared.items():  # the context once, then each continuation after it
        tokens += len(ctx) + sum(len(reqs[r][1]) - 1 for r in rs)
        flops += forward_flops(cfg, kept, 1, len(ctx), 0, len(rs))
        flops += sum(forward_flops(cfg, kept, 1, len(reqs[r][1]) - 1, len(ctx), len(reqs[r][1]) - 1)
                     for r in rs if len(reqs[r][1]) > 1)
    batch_tokens = default_batch_tokens(device)
    s = side_by_side({"scoring": lambda: timed(lambda: loglikelihoods(model, reqs, batch_tokens=batch_tokens),
                                               device)}, plan["reps"])["scoring"]
    gflops = flops / s["median"] / 1e9
    return {"items": plan["scoring_items"], "rows": len(rows), "tokens": tokens, "batch_tokens": batch_tokens,
            "seconds": {k: v for k, v in s.items() if k != "extra"}, "tokens_per_s": rate(s, tokens),
            "gflops": gflops, "of_forward_ceiling": gflops / matmul_gflops,
            "ceiling_tokens_per_s": matmul_gflops * 1e9 / (flops / tokens)}


# ----------------------------------------------------------------------------- 3./4. experts and FreeMoE

def expert_systems(model, args) -> tuple[dict, str | None]:
    """{name: per-layer mlps} of each DSS-Expert at keep 0.5, built by materialize, or (_, why skipped)."""
    if args.experts:
        ex = load_experts(args.experts, model)
        keeps = {d: kept_fraction(ex.indices[d], model) for d in ex.domains}
        note = None if all(abs(k - args.keep) < 0.02 for k in keeps.values()) else \
            f"experts file keeps {keeps}, not {args.keep}: measured as stored"
        return {f"expert:{d}": materialize(model, ex.indices[d]) for d in ex.domains}, note
    g = torch.Generator().manual_seed(args.seed)
    k = round(args.keep * model.config.n_ffn)
    idx = [torch.randperm(blk.mlp.n_neurons, generator=g)[:k].sort().values for blk in model.layers]
    return {f"random_k{args.keep:g}": materialize(model, idx)}, \
        f"no --experts file: a random keep-{args.keep:g} index set stands in (speed does not depend on which neurons)"


def load_freemoe(model, args):
    if not (args.router and args.experts):
        return None, "FreeMoE needs --experts and --router (train_router.py output): rows skipped"
    return router.load_router(args.router, model, load_experts(args.experts, model)), None


def bench_systems(model, systems: dict, plan, device) -> list[dict]:
    """Dense vs each {name: mlps}: batch-1 decode and batch-8 prefill, interleaved, with ideal speedups from FLOPs."""
    cfg, N, rows = model.config, plan["new_tokens"], []
    T = max(t for _, t in plan["sizes"])
    gen = torch.Generator().manual_seed(1)
    idx1 = torch.randint(0, cfg.vocab_size, (1, T), generator=gen).to(device)  # (1, T)
    idx8 = torch.randint(0, cfg.vocab_size, (8, T), generator=gen).to(device)  # (8, T)
    dense = neurons_per_layer(model, None)
    for name, mlps in progress(systems.items(), desc="experts vs dense", unit="system"):
        kept = neurons_per_layer(model, mlps)
        d = side_by_side({"dense": lambda: ours_decode(model, idx1, N),
                          name: lambda: ours_decode(model, idx1, N, mlps)}, plan["reps"])
        p = side_by_side({"dense": lambda: ours_prefill(model, idx8),
                          name: lambda: ours_prefill(model, idx8, mlps)}, plan["reps"])
        row = {"system": name, "active_fraction": sum(kept) / sum(dense), "prompt": T, "new_tokens": N}
        for kind, s, ideal in (("decode_b1", d, decode_flops(cfg, dense, 1, T, N) / decode_flops(cfg, kept, 1, T, N)),
                               ("prefill_b8", p,
                                forward_flops(cfg, dense, 8, T, 0, 1) / forward_flops(cfg, kept, 8, T, 0, 1))):
            measured = s["dense"]["median"] / s[name]["median"]
            row[kind] = {"dense_s": s["dense"]["median"],
                         "system_s": {k: v for k, v in s[name].items() if k != "extra"},
                         "speedup": measured, "speedup_min": s["dense"]["min"] / s[name]["max"],
                         "speedup_max": s["dense"]["max"] / s[name]["min"], "ideal": ideal,
                         "of_ideal": measured / ideal}
        rows.append(row)
    return rows


def bench_router(model, fm, plan, device) -> dict:
    """What routing adds to a request. Side by side: the routed request `fm.generate` (routing rides on the prefill's
    first layers) and the same request with the decision's FFNs given up front (no routing at all); the difference,
    per decode step, is the router overhead. `route()` alone (a separate truncated forward) is timed too."""
    cfg, N = model.config, plan["new_tokens"]
    T = max(t for _, t in plan["sizes"])
    prompt = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(2)).tolist()  # 1 x T

    decision = fm.route(prompt)[0]
    mlps = fm.mlps_for(decision)
    s = side_by_side({
        "route": lambda: timed(lambda: fm.route(prompt)[0], device),
        "routed": lambda: timed(lambda: fm.generate(prompt, N, stop_ids=())[1][0], device),
        "unrouted": lambda: timed(lambda: G.generate(model, prompt, N, mlps=mlps, stop_ids=()), device)}, plan["reps"])
    if s["routed"]["extra"].key != decision.key:
        raise RuntimeError("routing inside the prefill chose differently from route()")
    step = s["unrouted"]["median"] / N  # the whole request per new token (prefill amortised)
    overhead = s["routed"]["median"] - s["unrouted"]["median"]
    strip = lambda r: {k: v for k, v in r.items() if k != "extra"}
    return {"route_s": strip(s["route"]), "routed_s": strip(s["routed"]), "unrouted_s": strip(s["unrouted"]),
            "decision_domain": decision.domain, "active_fraction": decision.active_fraction, "prompt": T,
            "new_tokens": N, "request_step_s": step,
            "overhead_pct_per_decode_step": 100 * (overhead / N) / step,
            "separate_route_pct_per_decode_step": 100 * (s["route"]["median"] / N) / step}


def freemoe_system(model, fm, plan) -> dict:
    """The routed model's FFNs for one prompt, as a system for bench_systems (routing itself is timed apart)."""
    T = max(t for _, t in plan["sizes"])
    prompt = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(2))
    return {"freemoe": fm.mlps_for(fm.route(prompt.tolist())[0])}


# ----------------------------------------------------------------------------- 5. statistics collection cost

def bench_stats(model, plan, device) -> dict:
    n, T = plan["stats_windows"]
    windows = torch.randint(0, model.config.vocab_size, (n, T), generator=torch.Generator().manual_seed(3))

    def plain():
        for i in range(0, n, 8):
            model(windows[i:i + 8].to(device), last_only=True)
    s = side_by_side({"plain_forward": lambda: timed(plain, device),
                      "collect_stats": lambda: timed(lambda: collect_stats(model, windows, batch_size=8),
                                                     device)},
                     plan["reps"])
    return {"windows": [n, T], "plain_s": s["plain_forward"]["median"],
            "collect_s": {k: v for k, v in s["collect_stats"].items() if k != "extra"},
            "cost_ratio": s["collect_stats"]["median"] / s["plain_forward"]["median"]}


# ----------------------------------------------------------------------------- 6. memory, one subprocess per system

def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def memory_child(args, plan, device, dtype):
    """Runs in a subprocess: load, build the system, reset the peak, run a batch-8 prefill + decode, print JSON."""
    model, _ = M.load_model(args.model, device, dtype)
    name = args.memory_child
    base = rss_kib("VmRSS") if device.type == "cpu" else torch.cuda.memory_allocated(device)
    if name == "dense":
        mlps = None
    elif name == "freemoe":
        mlps = freemoe_system(model, load_freemoe(model, args)[0], plan)["freemoe"]
    else:
        mlps = expert_systems(model, args)[0][name]
    gc.collect()
    if device.type == "cpu":
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    else:
        torch.cuda.reset_peak_memory_stats(device)
    T = max(t for _, t in plan["sizes"])
    idx = torch.randint(0, model.config.vocab_size, (8, T)).to(device)
    with torch.inference_mode():
        ours_decode(model, idx, plan["new_tokens"], mlps)
    peak = rss_kib("VmHWM") * 1024 if device.type == "cpu" else torch.cuda.max_memory_allocated(device)
    base = base * 1024 if device.type == "cpu" else base
    print(json.dumps({"system": name, "peak_mib": peak / 2**20, "over_dense_model_mib": (peak - base) / 2**20,
                      "workload": f"batch 8 x {T} prefill + {plan['new_tokens']} decode steps"}))


def bench_memory(names: list[str], argv: list[str]) -> list[dict]:
    rows = []
    for name in progress(names, desc="memory (subprocess each)", unit="system"):
        res = subprocess.run([sys.executable, __file__, *argv, "--memory-child", name], capture_output=True, text=True)
        if res.returncode != 0:
            rows.append({"system": name, "error": res.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


# ----------------------------------------------------------------------------- level 3: skipping neurons per token

LEVEL3_FFN_S = (0.25, 0.4, 0.5, 0.7)  # skipped fractions the FFN alone is timed at
LEVEL3_STEP_S = (0.25, 0.4, 0.5)  # and the whole decode step


def ffn_ideal(model, active: float) -> float:
    """The speedup of an FFN whose up and down are read only for `active` of its neurons, from bytes read: the gate
    (gated FFNs) or up (GPT-2, where it is the gate) is always read whole."""
    n = 2 if model.config.arch == "gpt2" else 3
    return n / (1 + (n - 1) * active)


def level3_ffn_runs(model, s: float, g: torch.Generator):
    """fn() -> (seconds, outputs) of every layer's FFN on one token, dense and gathered with a random active set of
    round((1 - s) F) neurons per layer. The gathered run does what SkippingMLP does for one token: the gate, a
    comparison, nonzero, active_forward (the random set is and-ed in where the threshold would decide)."""
    mlps = [blk.mlp for blk in model.layers]
    C, Fn, device = model.config.n_embd, mlps[0].n_neurons, model.tok_emb.weight.device
    xs = [torch.randn(1, 1, C, generator=g).to(device, model.tok_emb.weight.dtype) for _ in mlps]  # (1, 1, C)
    keeps = []
    for _ in mlps:
        keep = torch.zeros(Fn, dtype=torch.bool)
        keep[torch.randperm(Fn, generator=g)[:round((1 - s) * Fn)]] = True
        keeps.append(keep.to(device))  # (F,)
    for m in mlps:
        m.down_rows()  # built once per model, not per step

    def dense():
        sync(device)
        t0 = time.perf_counter()
        out = [m(x) for m, x in zip(mlps, xs)]
        sync(device)
        return time.perf_counter() - t0, out

    def gathered():
        sync(device)
        t0 = time.perf_counter()
        out = []
        for m, x, keep in zip(mlps, xs, keeps):  # as SkippingMLP.one_token
            gate = m.gate_acts(x[0, 0])  # (F,)
            active = (gate.abs() >= 0).logical_and_(keep).nonzero().flatten()  # (k,)
            out.append(m.active_forward(x[0, 0], gate, active))  # (C,)
        sync(device)
        return time.perf_counter() - t0, out

    masked = [m.masked(x, m.gate_acts(x), keep) for m, x, keep in zip(mlps, xs, keeps)]  # the reference
    return dense, gathered, masked


def level3_row_patterns(model, reps: int) -> list[dict]:
    """The two gathers of MLP.active_forward alone (up's row dot products, down's weighted sum of rows) over half of
    every layer's neurons, picked three ways: the first half, every second neuron, a random half. The same bytes
    each time: the time against the first half's is what scattering the rows costs per byte."""
    g = torch.Generator().manual_seed(1)
    mlps = [blk.mlp for blk in model.layers]
    Fn, C = mlps[0].n_neurons, model.config.n_embd
    device, dtype = model.tok_emb.weight.device, model.tok_emb.weight.dtype
    xs = [torch.randn(C, generator=g).to(device, dtype) for _ in mlps]  # (C,) per layer
    a = torch.randn(Fn // 2, generator=g).to(device, dtype)  # (F/2,) the activations weighting down's rows
    picks = {"contiguous": torch.arange(Fn // 2), "every second": torch.arange(0, 2 * (Fn // 2), 2),
             "scattered": torch.randperm(Fn, generator=g)[:Fn // 2].sort().values}

    def reads(rows):
        rows = rows.to(device)

        def fn():
            sync(device)
            t0 = time.perf_counter()
            for m, x in zip(mlps, xs):
                M.row_dots(m.up.weight, x, rows)
                torch.nn.functional.embedding_bag(rows, m.down_rows(), rows.new_zeros(1), per_sample_weights=a,
                                                  mode="sum")
            sync(device)
            return time.perf_counter() - t0, None
        return fn

    t = side_by_side({name: reads(rows) for name, rows in picks.items()}, reps)
    return [{"rows": name, "ms": 1e3 * t[name]["min"], "per_byte_vs_contiguous": t[name]["min"] /
             t["contiguous"]["min"]} for name in picks]


def profile_ops(fn, rows=5) -> list[dict]:
    """torch.profiler's CPU ops by self time over 3 calls of fn: what a variant spends its time on."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fn()
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev)
    return [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count // 3} for e in ev[:rows]]


def level3_windows(model, tok, n=8, T=128, start=0) -> torch.Tensor:
    """Calibration text for the thresholds, (n, T): windows of this repository's README from token `start` (random
    tokens without a tokenizer, e.g. a tiny test model)."""
    ids = tok.encode(Path(__file__).with_name("README.md").read_text())[start:] if tok is not None else []
    if len(ids) < n * T:
        return torch.randint(0, model.config.vocab_size, (n, T), generator=torch.Generator().manual_seed(start))
    return torch.tensor(ids[:n * T]).view(n, T)


class _KeepInputs(torch.nn.Module):
    """An FFN that keeps what comes into it, (N, C) per call."""

    def __init__(self, mlp, seen: list):
        super().__init__()
        self.mlp, self.seen = mlp, seen

    def forward(self, x):
        self.seen.append(x.reshape(-1, x.shape[-1]))
        return self.mlp(x)


@torch.no_grad()
def ffn_inputs(model, idx) -> list[torch.Tensor]:
    """Every layer's FFN input on the tokens idx (N, T) run densely: (N * T, C) per layer."""
    seen = [[] for _ in model.layers]
    model(idx, mlps=[_KeepInputs(blk.mlp, s) for blk, s in zip(model.layers, seen)])
    return [torch.cat(s) for s in seen]


def hot_first(mlp, x, threshold: float):
    """The same FFN with its neurons reordered, the ones that run most often on the tokens x (N, C) first: an MLP
    with the same output (its sums in another order), whose active sets may come in longer contiguous runs."""
    busy = (mlp.gate_acts(x).abs() >= threshold).float().mean(0)  # (F,) how often each neuron runs
    return mlp.select(busy.argsort(descending=True))


def mean_run(active: torch.Tensor) -> float:
    """Average length of the runs of consecutive indices in a sorted index set (k,): 1 = all scattered."""
    return len(active) / (1 + int((active.diff() != 1).sum())) if len(active) else 0.0


def level3_order_runs(model, thresholds, s: float, calib, text):
    """fn() -> (seconds, outputs) of every layer's FFN on each token of `text` (1, T), one token at a time: dense,
    and level 3 (SkippingMLP.one_token, real active sets from the thresholds at s) with the neurons as stored and
    hot-first by their activity on `calib` (N, T). Also the mean run length of the active sets in each order."""
    col = round(s * router.LEVEL3_STEPS)
    seen, xs = ffn_inputs(model, calib), ffn_inputs(model, text)  # L x (N * T, C), L x (T, C)
    thr = [thresholds[l, col].item() for l in range(len(model.layers))]
    stored = [router.SkippingMLP(blk.mlp, t) for blk, t in zip(model.layers, thr)]
    hot = [router.SkippingMLP(hot_first(blk.mlp, x, t), t) for blk, x, t in zip(model.layers, seen, thr)]
    for m in stored + hot:
        m.mlp.down_rows()

    def timed(step):
        def fn():
            sync(xs[0].device)
            t0 = time.perf_counter()
            out = [step(l, x) for x in zip(*xs) for l in range(len(xs))]  # token by token, layer by layer
            sync(xs[0].device)
            return time.perf_counter() - t0, out
        return fn

    with torch.no_grad():
        runs = {name: sum(mean_run((m.mlp.gate_acts(x).abs() >= m.threshold).nonzero().flatten())
                          for m, layer_x in zip(mlps, xs) for x in layer_x) / (len(xs) * len(xs[0]))
                for name, mlps in (("stored", stored), ("hot-first", hot))}
    fns = {"dense": timed(lambda l, x: model.layers[l].mlp(x[l][None, None])),
           "stored": timed(lambda l, x: stored[l].one_token(x[l])),
           "hot-first": timed(lambda l, x: hot[l].one_token(x[l]))}
    return fns, runs


def level3_order(model, thresholds, calib, text, reps: int, s: float = 0.5) -> dict:
    """The FFN alone on real active sets at s, neurons as stored vs hot-first: does a layout of the weights that puts
    the active neurons in contiguous runs read them faster?"""
    fns, runs = level3_order_runs(model, thresholds, s, calib, text)
    t = side_by_side(fns, reps)
    n = text.numel()
    out = {"skipped": s, "tokens": n, "dense_ms": 1e3 * t["dense"]["min"] / n, "rows": []}
    ref = torch.stack(t["stored"]["extra"])
    for name in ("stored", "hot-first"):
        y = torch.stack(t[name]["extra"])
        row = {"order": name, "mean_run": runs[name], "ms": 1e3 * t[name]["min"] / n,
               "speedup": t["dense"]["min"] / t[name]["min"],
               "max_rel_diff_vs_stored": ((y - ref).abs().max() / ref.abs().max()).item()}
        out["rows"].append(row)
    return out


def bench_level3(model, tok, plan, device) -> dict:
    """The FFN alone and the whole batch-1 decode step, dense vs level 3, each speedup as a fraction of its ideal."""
    g = torch.Generator().manual_seed(0)
    L, Fn, reps = model.config.n_layer, model.layers[0].mlp.n_neurons, max(plan["reps"], 5)
    ffn = []
    for s in LEVEL3_FFN_S:
        dense, gathered, masked = level3_ffn_runs(model, s, g)
        t = side_by_side({"dense": dense, "gathered": gathered}, reps)
        err = max(((y - r.flatten()).abs().max() / r.abs().max()).item()  # relative: some layers' outputs are big
                  for y, r in zip(t["gathered"]["extra"], masked))
        row = {"skipped": s, "dense_ms": 1e3 * t["dense"]["min"], "gathered_ms": 1e3 * t["gathered"]["min"],
               "speedup": t["dense"]["min"] / t["gathered"]["min"], "ideal": ffn_ideal(model, 1 - s),
               "max_rel_diff_vs_masked": err}
        row["of_ideal"] = row["speedup"] / row["ideal"]
        if s == 0.5 and device.type == "cpu":
            row["profile"] = {"dense": profile_ops(dense), "gathered": profile_ops(gathered)}
        ffn.append(row)
    patterns = level3_row_patterns(model, reps)
    # the whole step: thresholds calibrated on text, as train_router does (here with the dense model's gates)
    max_len = model.config.max_seq_len
    calib = level3_windows(model, tok, T=min(128, max_len)).to(device)  # (8, T)
    thresholds = router.level3_thresholds(model, calib)  # (L, S)
    order = level3_order(model, thresholds, calib, level3_windows(model, tok, 1, 64, calib.numel()).to(device), reps)
    n_new = plan["new_tokens"]
    T = min(64, max_len - n_new - 1)
    idx = level3_windows(model, tok, 1, T).to(device)  # (1, T): a prompt the thresholds have seen
    systems = {"dense": None}
    for s in LEVEL3_STEP_S:
        col = round(s * router.LEVEL3_STEPS)
        systems[f"level3 s={s:.2f}"] = [router.SkippingMLP(blk.mlp, thresholds[l, col].item())
                                        for l, blk in enumerate(model.layers)]
    t = side_by_side({name: (lambda m=m: ours_decode(model, idx, n_new, m)) for name, m in systems.items()}, reps)
    dense_bytes = decode_bytes(model, [Fn] * L, 1, T, n_new)
    item, C = model.tok_emb.weight.element_size(), model.config.n_embd
    n_skip_mats = 1 if model.config.arch == "gpt2" else 2  # up and down (GPT-2: down) skip; the gate never does
    step = []
    for name, mlps in systems.items():
        if mlps is None:
            continue
        active = router.measured_active_fraction(mlps, Fn)  # over warm-up and timed runs, prefill included
        saved = item * n_new * L * n_skip_mats * C * Fn * (1 - active)
        row = {"system": name, "active_fraction": active, "dense_tok_s": n_new / t["dense"]["min"],
               "tok_s": n_new / t[name]["min"], "speedup": t["dense"]["min"] / t[name]["min"],
               "ideal": dense_bytes / (dense_bytes - saved)}
        row["of_ideal"] = row["speedup"] / row["ideal"]
        step.append(row)
    return {"ffn": ffn, "patterns": patterns, "order": order, "step": step, "prompt": T, "new_tokens": n_new,
            "reps": reps,
            "note": "best of reps, interleaved; ideal = bytes read dense / bytes read with skipping; "
                    "FFN active sets random, decode-step ones from the thresholds"}


def level3_markdown(r: dict) -> list[str]:
    lines = [f"level 3, batch 1, FFN alone over all layers (random active sets; best of {r['reps']}, interleaved):",
             "", "| skipped | dense ms | gathered ms | speedup | ideal (bytes) | of ideal "
             "| max diff vs masked, of max abs |",
             "|---|---|---|---|---|---|---|"]
    for f in r["ffn"]:
        lines.append(f"| {100 * f['skipped']:.0f}% | {f['dense_ms']:.2f} | {f['gathered_ms']:.2f} "
                     f"| {f['speedup']:.2f}x | {f['ideal']:.2f}x | {100 * f['of_ideal']:.0f}% "
                     f"| {f['max_rel_diff_vs_masked']:.1e} |")
    lines += ["", "level 3, the two gathers alone over half of each layer's neurons: " + ", ".join(
        f"{p['rows']} {p['ms']:.2f} ms ({p['per_byte_vs_contiguous']:.2f}x the time of contiguous)"
        for p in r["patterns"])]
    o = r["order"]
    lines += ["", f"level 3, batch 1, FFN alone on real active sets at {100 * o['skipped']:.0f}% skipped "
              f"({o['tokens']} README tokens after the calibration windows; dense {o['dense_ms']:.2f} ms per token):",
              "",
              "| neuron order | mean run of active neurons | gathered ms per token | speedup | max diff vs stored |",
              "|---|---|---|---|---|"]
    for row in o["rows"]:
        lines.append(f"| {row['order']} | {row['mean_run']:.2f} | {row['ms']:.2f} | {row['speedup']:.2f}x "
                     f"| {row['max_rel_diff_vs_stored']:.1e} |")
    lines += ["", f"level 3, whole greedy decode step, batch 1 ({r['prompt']}-token prompt, {r['new_tokens']} new "
              "tokens; thresholds from README windows):", "",
              "| system | active FFN (measured) | tok/s | dense tok/s | speedup | ideal (bytes) | of ideal |",
              "|---|---|---|---|---|---|---|"]
    for s in r["step"]:
        lines.append(f"| {s['system']} | {100 * s['active_fraction']:.0f}% | {s['tok_s']:.1f} "
                     f"| {s['dense_tok_s']:.1f} | {s['speedup']:.2f}x | {s['ideal']:.2f}x "
                     f"| {100 * s['of_ideal']:.0f}% |")
    for f in r["ffn"]:
        for kind, ops in f.get("profile", {}).items():
            lines.append(f"- profile, FFN {kind} at {100 * f['skipped']:.0f}% skipped: " + ", ".join(
                f"{o['op']} {100 * o['share']:.0f}% ({o['calls']} calls)" for o in ops))
    return lines + [""]


# ----------------------------------------------------------------------------- profile: what bounds a missed goal

def profile_top(model, idx, n_new, rows=8) -> dict:
    """torch.profiler over a few decode steps and one prefill: the ops that take the time, and the matmul share."""
    from torch.profiler import ProfilerActivity, profile
    out = {}
    for kind in ("decode", "prefill"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours_decode(model, idx[:1], n_new) if kind == "decode" else ours_prefill(model, idx)
        ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ev)
        mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        out[kind] = {"matmul_share": mm / total,
                     "top": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count}
                             for e in ev[:rows]]}
    return out


def profile_cuda(model, idx, n_new) -> dict:
    """CUDA: what bounds a step, from the CUDA profiler's kernel times. Kernel time per step next to the step's wall
    time says whether the GPU was busy (kernel-bound: HBM or tensor cores) or idle between kernels, waiting for the
    CPU to launch the next one (launch-bound). Batch-1 decode launched op by op ("eager") and replayed as a CUDA
    graph, and one prefill of idx (B, T). Wall times here include the profiler's own CPU overhead; goals() divides
    the kernel time by the unprofiled wall time of the dense section instead."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    out = {}
    for kind, decode in (("decode_eager", "dynamic"), ("decode_graph", "graph"), ("prefill", None)):
        if decode is not None:
            ours_decode(model, idx[:1], n_new, decode=decode)  # warm-up: allocations, the graph's capture
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        if decode is not None:
            wall, _ = ours_decode(model, idx[:1], n_new, decode=decode, around_steps=lambda: prof)
            steps = n_new
        else:
            ours_prefill(model, idx)
            with prof:
                wall, _ = ours_prefill(model, idx)
            steps = 1
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        kernel_s = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
        out[kind] = {"wall_s_per_step": wall / steps, "kernel_s_per_step": kernel_s / steps,
                     "kernels_per_step": len(kernels) / steps, "gpu_busy": kernel_s / wall}
    return out


# ----------------------------------------------------------------------------- report

def fmt(r: dict, unit="") -> str:
    return f"{r['median']:.1f} [{r['min']:.1f}–{r['max']:.1f}]{unit}"


def goal(name, measured, target, higher=True, why="") -> dict:
    met = measured >= target if higher else measured <= target
    return {"goal": name, "measured": measured, "target": target, "met": met,
            "gap_pct": 0.0 if met else 100 * abs(target - measured) / target, "bound": "" if met else why}


def cuda_why(res: dict, b1: dict | None) -> tuple[str, str]:
    """What bounds decode and prefill on a GPU, from profile_cuda: kernel time against the (unprofiled) wall time."""
    prof = res.get("profile", {})

    def step(kind, wall):
        p = prof.get(kind)
        if not p:
            return f"{kind}: not profiled"
        if not p["kernels_per_step"]:
            return f"{kind}: the CUDA profiler saw no kernels"
        busy = p["kernel_s_per_step"] / wall
        bound = ("launch-bound: the GPU idles between kernels, waiting for the CPU (Python, launches, the host read of "
                 "each token)" if busy < 0.6 else "kernel-bound: the kernels themselves (weights read from HBM, "
                 "tensor-core time, and the fixed latency of many small kernels)")
        return (f"{kind}: {p['kernels_per_step']:.0f} kernels, {1e3 * p['kernel_s_per_step']:.3f} ms of GPU time in a "
                f"{1e3 * wall:.3f} ms step ({100 * busy:.0f}% busy): {bound}")
    n = b1["new_tokens"] if b1 else 1
    graph_wall = b1["ours"]["decode_s"]["median"] / n if b1 else prof.get("decode_graph", {}).get("wall_s_per_step", 1)
    eager_wall = (b1["ours eager"]["decode_s"]["median"] / n if b1 and "ours eager" in b1
                  else prof.get("decode_eager", {}).get("wall_s_per_step", 1))
    dec = "decode b1 (CUDA profiler) " + step("decode_graph", graph_wall) + "; " + step("decode_eager", eager_wall)
    pre = "CUDA profiler " + step("prefill", prof.get("prefill", {}).get("wall_s_per_step", 1))
    return dec, pre


def goals(res: dict) -> list[dict]:
    out, dense = [], {(r["batch"], r["prompt"]): r for r in res.get("dense", [])}
    b1 = dense.get((1, max(t for b, t in dense if b == 1))) if dense else None
    b8 = dense.get((8, max(t for b, t in dense if b == 8))) if any(b == 8 for b, _ in dense) else None
    b64 = dense.get((64, max(t for b, t in dense if b == 64))) if any(b == 64 for b, _ in dense) else None
    gpu = res["meta"]["device"].startswith("cuda")
    prof = res.get("profile", {})
    dec_why = (f"decode (profiled at batch 1): {100 * prof.get('decode', {}).get('matmul_share', 0):.0f}% of CPU time"
               " in matrix-vector products (memory-bound on the weights); the rest is per-op dispatch of ~40 small "
               "kernels per layer; transformers runs the same matmul kernels")
    pre_why = (f"prefill: {100 * prof.get('prefill', {}).get('matmul_share', 0):.0f}% of CPU time in matmuls; "
               "attention,"
               " norms and elementwise ops take the rest; both systems run the same kernels")
    if gpu:
        dec_why, pre_why = cuda_why(res, b1)
    if gpu and b1 and "decode_ratio" in b1:
        out.append(goal(f"decode b1x{b1['prompt']} vs transformers eager (GPU)", b1["decode_ratio"],
                        GOALS["gpu_decode_b1_vs_hf"], why=dec_why))
    if gpu and b64:
        out.append(goal(f"decode b64x{b64['prompt']} CUDA graph vs eager decode (GPU)", b64["decode_vs_eager"],
                        GOALS["gpu_decode_b64_vs_eager"], why=dec_why))
    if gpu and "scoring" in res:
        out.append(goal("MMLU-style scoring of the forward ceiling (GPU)", res["scoring"]["of_forward_ceiling"],
                        GOALS["gpu_scoring_of_forward"], why=pre_why))
    if b1 and "decode_ratio" in b1:
        out.append(goal(f"decode b1x{b1['prompt']} vs transformers", b1["decode_ratio"], GOALS["decode_b1_vs_hf"],
                        why=dec_why))
    if b1:
        out.append(goal("decode b1 of read bandwidth", b1["ours"]["decode_of_bandwidth"],
                        GOALS["decode_b1_of_bandwidth"],
                        why=dec_why))
    if b8 and "prefill_ratio" in b8:
        out.append(goal(f"prefill b8x{b8['prompt']} vs transformers", b8["prefill_ratio"], GOALS["prefill_vs_hf"],
                        why=pre_why))
        out.append(goal(f"decode b8x{b8['prompt']} vs transformers", b8["decode_ratio"], GOALS["decode_b8_vs_hf"],
                        why=dec_why))
    if b8:
        out.append(goal(f"prefill b8x{b8['prompt']} of matmul ceiling", b8["ours"]["prefill_of_matmul"],
                        GOALS["prefill_of_matmul"], why=pre_why))
    for r in res.get("systems", []):
        for kind in ("decode_b1", "prefill_b8"):
            why = ("the kept FFN is only part of the step: attention, norms, LM head and per-op overhead do not shrink;"
                   " smaller matmuls also run further from peak")
            out.append(goal(f"{r['system']} {kind} speedup of ideal", r[kind]["of_ideal"],
                            GOALS["expert_of_ideal"], why=why))
    if "router" in res:
        out.append(goal("router overhead % per decode step (amortized over the request)",
                        res["router"]["overhead_pct_per_decode_step"], GOALS["router_overhead_pct"], higher=False,
                        why="timing noise between two equal-work runs, or the router head"))
    if "stats" in res:
        out.append(goal("collect_stats cost vs plain forward", res["stats"]["cost_ratio"], GOALS["stats_cost"],
                        higher=False,
                        why="per-neuron reductions over (B*T, F) activations in every layer"))
    return out


def markdown(res: dict) -> str:
    lines = [f"## bench: {res['meta']['model']} ({res['meta']['dtype']}, {res['meta']['device']}, "
             f"{res['meta']['threads']} threads, {res['meta']['reps']} reps after 1 warm-up; median [min–max])", ""]
    c = res.get("ceilings")
    if c:
        lines += ["| machine ceiling | value |", "|---|---|"]
        for key in ("matmul_ffn_shape", "matmul_square", "matmul_bf16_square", "matmul_fp32_square"):
            if key in c:
                m, k, n = c[key]["shape"]
                lines.append(f"| matmul GFLOP/s, {c[key]['dtype']}, {m}x{k} @ {k}x{n} | {fmt(c[key]['gflops'])} |")
        mib = c["read_sum"]["bytes"] // 2**20
        lines += [f"| read GB/s, {mib} MiB gemv | {fmt(c['read_gemv']['gbs'])} |",
                  f"| read GB/s, {mib} MiB sum | {fmt(c['read_sum']['gbs'])} |", ""]
    if res.get("dense"):
        lines += ["| B x T (+N new) | system | prefill tok/s | decode tok/s | prefill GFLOP/s, of matmul ceiling "
                  "| decode GB/s, of read bandwidth |", "|---|---|---|---|---|---|"]
        for r in res["dense"]:
            lines.append(f"| {r['batch']}x{r['prompt']} | ceiling, same rounds | | | {r['ceiling_matmul_gflops']:.1f} "
                         f"| {r['ceiling_read_gbs']:.1f} |")
            for name in ("ours", "ours compiled", "ours eager", "transformers"):
                if name in r:
                    s = r[name]
                    lines.append(f"| {r['batch']}x{r['prompt']} (+{r['new_tokens']}) | {name} "
                                 f"| {fmt(s['prefill_tok_s'])} | {fmt(s['decode_tok_s'])} "
                                 f"| {s['prefill_gflops']:.1f}, {100 * s['prefill_of_matmul']:.0f}% "
                                 f"| {s['decode_gbs']:.2f}, {100 * s['decode_of_bandwidth']:.0f}% |")
            if "decode_vs_eager" in r:
                lines.append(f"| {r['batch']}x{r['prompt']} | **CUDA graph / eager** | "
                             f"| **{r['decode_vs_eager']:.2f}x** | tokens identical: {r['graph_tokens_identical']} | |")
            if "prefill_ratio" in r:
                lines.append(f"| {r['batch']}x{r['prompt']} | **ours / transformers** | **{r['prefill_ratio']:.2f}x** "
                             f"| **{r['decode_ratio']:.2f}x** | tokens identical: {r['tokens_identical']} "
                             f"({100 * r['tokens_agree']:.0f}% equal) | |")
        lines.append("")
    if "scoring" in res:
        sc = res["scoring"]
        lines += [f"MMLU-style scoring (scoring.loglikelihoods, {sc['items']} items = {sc['rows']} rows of "
                  f"{sc['tokens']} tokens, batch_tokens {sc['batch_tokens']}): {fmt(sc['tokens_per_s'])} tokens/s, "
                  f"{sc['gflops']:.1f} GFLOP/s = {100 * sc['of_forward_ceiling']:.0f}% of the forward ceiling "
                  f"({sc['ceiling_tokens_per_s']:.0f} tokens/s at the matmul ceiling)", ""]
    prof = res.get("profile", {})
    if "decode_graph" in prof:
        lines += ["| CUDA profiler | kernels per step | GPU time per step ms | wall per step ms (profiled) |",
                  "|---|---|---|---|"]
        for kind, p in prof.items():
            lines.append(f"| {kind} | {p['kernels_per_step']:.0f} | {1e3 * p['kernel_s_per_step']:.3f} "
                         f"| {1e3 * p['wall_s_per_step']:.3f} |")
        lines.append("")
    if res.get("systems"):
        lines += ["| system | active FFN | decode b1 speedup [min–max] | ideal | of ideal "
                  "| prefill b8 speedup [min–max] "
                  "| ideal | of ideal |", "|---|---|---|---|---|---|---|---|"]
        for r in res["systems"]:
            d, p = r["decode_b1"], r["prefill_b8"]
            lines.append(f"| {r['system']} | {100 * r['active_fraction']:.0f}% | {d['speedup']:.2f}x "
                         f"[{d['speedup_min']:.2f}–{d['speedup_max']:.2f}] | {d['ideal']:.2f}x "
                         f"| {100 * d['of_ideal']:.0f}% "
                         f"| {p['speedup']:.2f}x [{p['speedup_min']:.2f}–{p['speedup_max']:.2f}] | {p['ideal']:.2f}x "
                         f"| {100 * p['of_ideal']:.0f}% |")
        lines.append("")
    if "router" in res:
        r = res["router"]
        ms = lambda k: f"{1e3 * r[k]['median']:.0f} ms [{1e3 * r[k]['min']:.0f}–{1e3 * r[k]['max']:.0f}]"
        lines += [f"router ({r['prompt']}-token prompt, {r['new_tokens']} new tokens, chose "
                  f"{r['decision_domain'] or 'dense/union'} at {100 * r['active_fraction']:.0f}% active FFN): "
                  f"routed request {ms('routed_s')} vs the same FFNs unrouted {ms('unrouted_s')} = "
                  f"{r['overhead_pct_per_decode_step']:+.2f}% per decode step; a separate route() would cost "
                  f"{ms('route_s')} = {r['separate_route_pct_per_decode_step']:.1f}%", ""]
    if "stats" in res:
        s = res["stats"]
        lines += [f"collect_stats: {s['collect_s']['median']:.2f} s vs plain forward {s['plain_s']:.2f} s over "
                  f"{s['windows'][0]}x{s['windows'][1]} windows = {s['cost_ratio']:.2f}x", ""]
    if res.get("memory"):
        lines += ["| system | peak memory MiB | over the loaded dense model MiB |", "|---|---|---|"]
        for r in res["memory"]:
            lines.append(f"| {r['system']} | {r.get('peak_mib', float('nan')):.0f} | "
                         f"{r.get('over_dense_model_mib', float('nan')):.0f} |" if "error" not in r
                         else f"| {r['system']} | error: {r['error']} | |")
        lines += [f"(workload: {res['memory'][0].get('workload', '')}; {res['meta']['memory_method']})", ""]
    if "level3" in res:
        lines += level3_markdown(res["level3"])
    if res.get("goals"):
        lines += ["| goal | measured | target | met | missed by | what bounds it |", "|---|---|---|---|---|---|"]
        for g in res["goals"]:
            lines.append(f"| {g['goal']} | {g['measured']:.2f} | {g['target']:.2f} | {'yes' if g['met'] else 'no'} "
                         f"| {'' if g['met'] else '%.0f%%' % g['gap_pct']} | {g['bound']} |")
        lines.append("")
    if res.get("notes"):
        lines += ["notes:"] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines)


def save(res: dict, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(res, indent=1, default=str))  # a killed run leaves the previous complete file


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = ArgumentParser(description="Speed, memory and machine ceilings: dense vs transformers, DSS-Experts, "
                                   "FreeMoE.")
    add_common_args(p, out_default="results/bench")
    p.add_argument("--quick", action="store_true", help="fewer sizes (1x128, 8x128) and 32 new tokens")
    p.add_argument("--reps", type=positive_int, default=None, help="timed runs per figure after 1 warm-up (default 3)")
    p.add_argument("--experts", default=None, help="experts file from purify.py (default: random keep-0.5 stand-in)")
    p.add_argument("--router", default=None, help="router file from train_router.py (FreeMoE rows)")
    p.add_argument("--keep", type=fraction, default=0.5, help="keep fraction of the stand-in expert (default 0.5)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all; ceilings always run)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers column")
    p.add_argument("--compile", action="store_true", help="CUDA: also time decode with the torch.compile-fused step")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sections = set(args.sections.split(","))
    if args.sections - set(SECTIONS):
        raise UserError(f"unknown --sections {','.join(sorted(args.sections - set(SECTIONS)))} "
                          f"(expected a subset of {','.join(SECTIONS)})")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = resolve_device(args)
    dtype = resolve_dtype(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        plan = dict(GPU_QUICK if args.quick else GPU_FULL)
    else:
        plan = dict(QUICK if args.quick else FULL)
    if args.reps:
        plan["reps"] = args.reps
    torch.manual_seed(args.seed)
    if args.memory_child:
        return memory_child(args, plan, device, dtype)
    with locked_dir(args.out, "another bench.py run"):  # two benches at once would also time each other
        run(args, argv, plan, device, dtype)


def run(args, argv, plan, device, dtype):
    out = Path(args.out) / "bench.json"
    path = Path(args.model) if args.model else M.default_model_path()
    model, tok = M.load_model(path, device, dtype)
    res = {"meta": {"model": path.name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                    "threads": torch.get_num_threads(),
                    "reps": plan["reps"], "plan": plan, "torch": torch.__version__, "cpus": os.cpu_count(),
                    "argv": argv, "memory_method": "CPU: VmHWM after reset minus VmRSS of the loaded dense model"
                    if device.type == "cpu" else "CUDA: max_memory_allocated minus allocated after load"},
           "notes": []}
    with torch.inference_mode():
        res["ceilings"] = ceilings(device, dtype, model.config, max(b * t for b, t in plan["sizes"]), plan["reps"])
        save(res, out)
        if "dense" in args.sections:
            hf, why = (None, "--no-hf given") if args.no_hf else load_hf(model, device, dtype)
            if why:
                res["notes"].append(f"transformers column skipped: {why}")
            res["dense"] = bench_dense(model, hf, plan, device, compiled=args.compile)
            del hf
            gc.collect()
            T = max(t for _, t in plan["sizes"])
            idx = torch.randint(0, model.config.vocab_size, (max(b for b, _ in plan["sizes"]), T)).to(device)
            res["profile"] = profile_top(model, idx, 8) if device.type == "cpu" else profile_cuda(model, idx, 16)
            save(res, out)
        if "scoring" in args.sections:
            res["scoring"] = bench_scoring(model, plan, device, res["ceilings"]["matmul_gflops"])
            save(res, out)
        systems = {}
        if "experts" in args.sections:
            systems, why = expert_systems(model, args)
            if why:
                res["notes"].append(why)
            fm, why = load_freemoe(model, args)
            if why:
                res["notes"].append(why)
            if fm is not None:
                systems.update(freemoe_system(model, fm, plan))
                res["router"] = bench_router(model, fm, plan, device)
            if systems:
                res["systems"] = bench_systems(model, systems, plan, device)
            save(res, out)
    if "stats" in args.sections:
        with torch.no_grad():
            res["stats"] = bench_stats(model, plan, device)
    if "level3" in args.sections:
        with torch.inference_mode():
            res["level3"] = bench_level3(model, tok, plan, device)
        save(res, out)
    if "memory" in args.sections:
        res["memory"] = bench_memory(["dense"] + list(systems), argv)
    res["goals"] = goals(res)
    save(res, out)
    print(markdown(res))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    run_cli(main)
