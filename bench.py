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
    python bench.py --experts experts/k050/experts.safetensors --router runs/router.safetensors

Sections (each skipped with a note when what it needs is missing):
  1. ceilings    the machine's own limits in the model's dtype: matmul GFLOP/s (prefill is compute-bound) and
                 streaming read bandwidth GB/s (batch-1 decode is bandwidth-bound: every weight is read once per token).
  2. dense       prefill and decode tokens/s of our model vs `transformers` on identical weights, dtype and threads,
                 run interleaved (ours, theirs, ours, ...) so both see the same machine load. transformers is a test
                 oracle: imported lazily here, its column skipped with a note if it is not installed. Greedy tokens
                 of both are compared (they must be identical).
  3. experts     each materialized DSS-Expert (purify.materialize) vs dense: measured speedup next to the ideal one
                 from FLOPs (attention + kept FFN + LM head), batch-1 decode and batch-8 prefill. Without an experts
                 file, a random keep-0.5 index set stands in (speed does not depend on which neurons are kept).
  4. freemoe     the routed model (router.FreeMoE): routed request vs the same FFNs unrouted (router overhead), and speedup.
  5. stats       purify.collect_stats cost vs a plain forward over the same windows (both last_only).
  6. memory      peak memory of each system, each in its own subprocess. CPU: peak resident set (VmHWM from
                 /proc/self/status, reset through /proc/self/clear_refs after loading) minus the RSS of the loaded
                 dense model, i.e. the extra memory the run needs (KV cache, activations, compact expert weights).
                 tracemalloc would not see torch's allocations. CUDA: torch.cuda.max_memory_allocated.
  7. goals       the targets of the issue, each as measured vs target, met or missed by how much.

Every time is the median of `--reps` runs after one warm-up run, with min and max. Prefill = one forward filling the
KV cache and returning the last position's logits (what generation does). Decode = greedy steps from a prefilled
cache, one token per sequence per step. FLOPs count 2 per multiply-add, causal attention only over visible keys.

Shape legend: B batch, T time (prompt tokens), N new tokens, S key length, C width, H query heads, K kv heads,
D head dim, F FFN neurons, k kept neurons, V vocab, L layers.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model as M
import purify
import router
from cli import (ArgumentParser, UserError, add_common_args, fraction, positive_int, resolve_device, resolve_dtype,
                 run_cli, write_atomic)

FULL = {"sizes": [(1, 128), (1, 512), (8, 128), (8, 512)], "new_tokens": 128, "reps": 3, "stats_windows": (16, 256)}
QUICK = {"sizes": [(1, 128), (8, 128)], "new_tokens": 32, "reps": 3, "stats_windows": (8, 128)}
SECTIONS = ("dense", "experts", "stats", "memory")
GOALS = {  # the targets
    "decode_b1_vs_hf": 1.5, "decode_b1_of_bandwidth": 0.8, "prefill_vs_hf": 1.1, "prefill_of_matmul": 0.75,
    "decode_b8_vs_hf": 1.2, "expert_of_ideal": 0.9, "expert_of_ideal_issue4": 0.85, "router_overhead_pct": 3.0,
    "stats_cost": 1.2,
}


# ----------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, object]:
    """(seconds, result) of one call, the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": times}


def side_by_side(runs: dict, reps: int) -> dict:
    """runs: {name: fn() -> (seconds, extra)}. One warm-up each, then `reps` rounds, the systems interleaved in each
    round so that a change of machine load hits all of them alike. Returns {name: summary + last extra}."""
    for fn in runs.values():
        fn()
    times, extra = {k: [] for k in runs}, {}
    for _ in range(reps):
        for name, fn in runs.items():
            dt, extra[name] = fn()
            times[name].append(dt)
    return {k: {**summary(v), "extra": extra[k]} for k, v in times.items()}


def rate(stats: dict, work: float) -> dict:
    """work per second from a time summary: median, and min/max (the fastest run gives the max rate)."""
    return {"median": work / stats["median"], "min": work / stats["max"], "max": work / stats["min"]}


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


def ours_decode(model, idx, n_new, mlps=None):
    """Prefill idx (B, T) (not timed), then n_new greedy steps (timed). Returns (seconds, tokens (B, n_new))."""
    B, T = idx.shape
    model.setup_cache(B, T + n_new)
    logits = model(idx, 0, None, mlps, last_only=True)  # (B, 1, V)
    tokens = []
    sync(idx.device)
    t0 = time.perf_counter()
    for step in range(n_new):
        nxt = logits[:, -1].argmax(-1)  # (B,)
        tokens.append(nxt)
        logits = model(nxt[:, None], T + step, None, mlps)  # (B, 1, V)
    sync(idx.device)
    dt = time.perf_counter() - t0
    model.clear_cache()
    return dt, torch.stack(tokens, 1).cpu()


# ----------------------------------------------------------------------------- transformers (test oracle only)

def load_hf(path: Path, device, dtype):
    """The same checkpoint in transformers, or (None, why not). GGUF files are dequantized by transformers itself."""
    if importlib.util.find_spec("transformers") is None:
        return None, "transformers is not installed (pip install -r requirements-dev.txt)"
    from transformers import AutoModelForCausalLM
    try:
        if path.suffix == ".gguf":
            hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        else:
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # a missing `gguf` package, an architecture transformers lacks, ...
        return None, f"transformers could not load {path}: {type(e).__name__}: {e}"
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
        tokens.append(nxt)
        out = hf(nxt[:, None], past_key_values=cache, use_cache=True)
        logits, cache = out.logits, out.past_key_values
    sync(idx.device)
    return time.perf_counter() - t0, torch.stack(tokens, 1).cpu()


# ----------------------------------------------------------------------------- work counts (FLOPs, bytes)

def kept_per_layer(model, mlps) -> list[int]:
    return [blk.mlp.n_neurons if mlps is None else mlps[i].n_neurons for i, blk in enumerate(model.layers)]


def forward_flops(cfg: M.Config, kept: list[int], B: int, T: int, S0: int, logit_rows: int) -> float:
    """FLOPs of one forward: B sequences, T new tokens each after S0 cached ones, LM head on logit_rows per sequence.

    Per token and layer: q/k/v and output projections, the FFN with k_l kept neurons (3 matrices if gated, else 2);
    attention QK^T and PV over the keys each query may see (causal)."""
    C, H, K, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    n_ffn_mats = 3 if cfg.arch == "llama" else 2
    linear = sum(2 * C * (H + 2 * K) * D + 2 * H * D * C + 2 * n_ffn_mats * C * k for k in kept)  # per token
    visible_keys = T * S0 + T * (T + 1) // 2  # summed over the T queries
    attention = cfg.n_layer * 4 * H * D * visible_keys
    return B * (T * linear + attention + logit_rows * 2 * C * cfg.vocab_size)


def decode_flops(cfg, kept, B, T, n_new) -> float:
    return sum(forward_flops(cfg, kept, B, 1, T + s, 1) for s in range(n_new))


def decode_bytes(model, kept, B, T, n_new) -> float:
    """Bytes a decode of n_new steps must read at least: every weight once per step (the FFN: only kept neurons),
    plus the KV cache so far. Norm weights and biases are ignored (tiny)."""
    cfg, item = model.config, model.tok_emb.weight.element_size()
    C, H, K, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    n_ffn_mats = 3 if cfg.arch == "llama" else 2
    weights = sum(C * (H + 2 * K) * D + H * D * C + n_ffn_mats * C * k for k in kept) + C * cfg.vocab_size
    kv = sum(B * cfg.n_layer * 2 * K * D * (T + s + 1) for s in range(n_new))
    return item * (n_new * weights + kv)


# ----------------------------------------------------------------------------- 1. machine ceilings

def matmul_probe(m, k, n, device, dtype):
    """fn() -> (seconds, None) of one (m, k) @ (k, n) matmul: 2mkn FLOPs."""
    a, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
    return lambda: timed(lambda: F.linear(a, w), device)


def read_probe(kind, device, dtype, mib=256):
    """(fn() -> (seconds, None), bytes read): a matrix-vector product (the decode kernel) or a sum over `mib` MiB."""
    rows = mib * 2**20 // (1024 * torch.tensor([], dtype=dtype).element_size())
    buf, x = torch.randn(rows, 1024, device=device, dtype=dtype), torch.randn(1, 1024, device=device, dtype=dtype)
    fn = (lambda: F.linear(x, buf)) if kind == "gemv" else (lambda: buf.sum())
    return (lambda: timed(fn, device)), buf.numel() * buf.element_size()


def ceilings(device, dtype, cfg: M.Config, big_m: int, reps: int) -> dict:
    """Matmul GFLOP/s on the model's FFN shape (M x C @ C x F) and a 2048^3 square, the better one is the ceiling.
    Read bandwidth: a 256 MiB matrix-vector product (the decode kernel) and a sum over the same buffer."""
    out = {}
    for name, (m, k, n) in {"ffn_shape": (big_m, cfg.n_embd, cfg.n_ffn), "square_2048": (2048, 2048, 2048)}.items():
        run = matmul_probe(m, k, n, device, dtype)
        s = side_by_side({name: run}, reps + 2)[name]
        out[f"matmul_{name}"] = {"shape": [m, k, n], "gflops": rate(s, 2 * m * k * n / 1e9)}
    for name in ("gemv", "sum"):
        run, nbytes = read_probe(name, device, dtype)
        out[f"read_{name}"] = {"bytes": nbytes, "gbs": rate(side_by_side({name: run}, reps + 2)[name], nbytes / 1e9)}
    out["matmul_gflops"] = max(out["matmul_ffn_shape"]["gflops"]["median"], out["matmul_square_2048"]["gflops"]["median"])
    out["read_gbs"] = max(out["read_gemv"]["gbs"]["median"], out["read_sum"]["gbs"]["median"])
    return out


# ----------------------------------------------------------------------------- 2. dense vs transformers

def bench_dense(model, hf, plan, device) -> list[dict]:
    """Ours vs transformers per (B, T). On a shared machine the load changes by the minute, so the ceilings that
    the fractions divide by are measured again inside the same interleaved rounds (FFN-shape matmul, 256 MiB gemv)."""
    cfg, rows, dtype = model.config, [], model.tok_emb.weight.dtype
    kept = kept_per_layer(model, None)
    gen = torch.Generator().manual_seed(0)
    read_ref, read_bytes = read_probe("gemv", device, dtype)
    for B, T in tqdm(plan["sizes"], desc="dense vs transformers", unit="size"):
        idx = torch.randint(0, cfg.vocab_size, (B, T), generator=gen).to(device)  # (B, T) random prompt tokens
        N = plan["new_tokens"]
        pre = {"ours": lambda: ours_prefill(model, idx), "ceiling": matmul_probe(B * T, cfg.n_embd, cfg.n_ffn, device, dtype)}
        dec = {"ours": lambda: ours_decode(model, idx, N), "ceiling": read_ref}
        if hf is not None:
            pre["transformers"] = lambda: hf_prefill(hf, idx)
            dec["transformers"] = lambda: hf_decode(hf, idx, N)
        p, d = side_by_side(pre, plan["reps"]), side_by_side(dec, plan["reps"])
        matmul_gflops = 2 * B * T * cfg.n_embd * cfg.n_ffn / p["ceiling"]["median"] / 1e9
        read_gbs = read_bytes / d["ceiling"]["median"] / 1e9
        row = {"batch": B, "prompt": T, "new_tokens": N, "ceiling_matmul_gflops": matmul_gflops, "ceiling_read_gbs": read_gbs}
        pre.pop("ceiling")
        pf, df, db = forward_flops(cfg, kept, B, T, 0, 1), decode_flops(cfg, kept, B, T, N), decode_bytes(model, kept, B, T, N)
        for name in pre:
            row[name] = {"prefill_s": {k: v for k, v in p[name].items() if k != "extra"},
                         "prefill_tok_s": rate(p[name], B * T), "decode_s": {k: v for k, v in d[name].items() if k != "extra"},
                         "decode_tok_s": rate(d[name], B * N),
                         "prefill_gflops": pf / p[name]["median"] / 1e9, "decode_gbs": db / d[name]["median"] / 1e9,
                         "decode_gflops": df / d[name]["median"] / 1e9}
            row[name]["prefill_of_matmul"] = row[name]["prefill_gflops"] / matmul_gflops
            row[name]["decode_of_bandwidth"] = row[name]["decode_gbs"] / read_gbs
        if hf is not None:
            row["prefill_ratio"] = p["transformers"]["median"] / p["ours"]["median"]
            row["decode_ratio"] = d["transformers"]["median"] / d["ours"]["median"]
            row["tokens_identical"] = bool(torch.equal(d["ours"]["extra"], d["transformers"]["extra"]))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- 3./4. experts and FreeMoE

def expert_systems(model, args) -> tuple[dict, str | None]:
    """{name: per-layer mlps} of each DSS-Expert at keep 0.5, built by purify.materialize, or (_, why skipped)."""
    if args.experts:
        ex = purify.load_experts(args.experts, model)
        keeps = {d: purify.kept_fraction(ex.indices[d], model) for d in ex.domains}
        note = None if all(abs(k - args.keep) < 0.02 for k in keeps.values()) else \
            f"experts file keeps {keeps}, not {args.keep}: measured as stored"
        return {f"expert:{d}": purify.materialize(model, ex.indices[d]) for d in ex.domains}, note
    g = torch.Generator().manual_seed(args.seed)
    k = round(args.keep * model.config.n_ffn)
    idx = [torch.randperm(blk.mlp.n_neurons, generator=g)[:k].sort().values for blk in model.layers]
    return {f"random_k{args.keep:g}": purify.materialize(model, idx)}, \
        f"no --experts file: a random keep-{args.keep:g} index set stands in (speed does not depend on which neurons)"


def load_freemoe(model, args):
    if not (args.router and args.experts):
        return None, "FreeMoE needs --experts and --router (train_router.py output): rows skipped"
    return router.load_router(args.router, model, purify.load_experts(args.experts, model)), None


def bench_systems(model, systems: dict, plan, device) -> list[dict]:
    """Dense vs each {name: mlps}: batch-1 decode and batch-8 prefill, interleaved, with ideal speedups from FLOPs."""
    cfg, N, rows = model.config, plan["new_tokens"], []
    T = max(t for _, t in plan["sizes"])
    gen = torch.Generator().manual_seed(1)
    idx1 = torch.randint(0, cfg.vocab_size, (1, T), generator=gen).to(device)  # (1, T)
    idx8 = torch.randint(0, cfg.vocab_size, (8, T), generator=gen).to(device)  # (8, T)
    dense = kept_per_layer(model, None)
    for name, mlps in tqdm(systems.items(), desc="experts vs dense", unit="system"):
        kept = kept_per_layer(model, mlps)
        d = side_by_side({"dense": lambda: ours_decode(model, idx1, N),
                          name: lambda: ours_decode(model, idx1, N, mlps)}, plan["reps"])
        p = side_by_side({"dense": lambda: ours_prefill(model, idx8),
                          name: lambda: ours_prefill(model, idx8, mlps)}, plan["reps"])
        row = {"system": name, "active_fraction": sum(kept) / sum(dense), "prompt": T, "new_tokens": N}
        for kind, s, ideal in (("decode_b1", d, decode_flops(cfg, dense, 1, T, N) / decode_flops(cfg, kept, 1, T, N)),
                               ("prefill_b8", p, forward_flops(cfg, dense, 8, T, 0, 1) / forward_flops(cfg, kept, 8, T, 0, 1))):
            measured = s["dense"]["median"] / s[name]["median"]
            row[kind] = {"dense_s": s["dense"]["median"], "system_s": {k: v for k, v in s[name].items() if k != "extra"},
                         "speedup": measured, "speedup_min": s["dense"]["min"] / s[name]["max"],
                         "speedup_max": s["dense"]["max"] / s[name]["min"], "ideal": ideal, "of_ideal": measured / ideal}
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
        "unrouted": lambda: timed(lambda: M.generate(model, prompt, N, mlps=mlps, stop_ids=()), device)}, plan["reps"])
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
                      "collect_stats": lambda: timed(lambda: purify.collect_stats(model, windows, batch_size=8), device)},
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
    base = rss_kib("VmRSS") if device.type == "cpu" else torch.cuda.memory_allocated()
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
        torch.cuda.reset_peak_memory_stats()
    T = max(t for _, t in plan["sizes"])
    idx = torch.randint(0, model.config.vocab_size, (8, T)).to(device)
    with torch.inference_mode():
        ours_decode(model, idx, plan["new_tokens"], mlps)
    peak = rss_kib("VmHWM") * 1024 if device.type == "cpu" else torch.cuda.max_memory_allocated()
    base = base * 1024 if device.type == "cpu" else base
    print(json.dumps({"system": name, "peak_mib": peak / 2**20, "over_dense_model_mib": (peak - base) / 2**20,
                      "workload": f"batch 8 x {T} prefill + {plan['new_tokens']} decode steps"}))


def bench_memory(names: list[str], argv: list[str]) -> list[dict]:
    rows = []
    for name in tqdm(names, desc="memory (subprocess each)", unit="system"):
        res = subprocess.run([sys.executable, __file__, *argv, "--memory-child", name], capture_output=True, text=True)
        if res.returncode != 0:
            rows.append({"system": name, "error": res.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


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
                     "top": [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in ev[:rows]]}
    return out


# ----------------------------------------------------------------------------- report

def fmt(r: dict, unit="") -> str:
    return f"{r['median']:.1f} [{r['min']:.1f}–{r['max']:.1f}]{unit}"


def goal(name, measured, target, higher=True, why="") -> dict:
    met = measured >= target if higher else measured <= target
    return {"goal": name, "measured": measured, "target": target, "met": met,
            "gap_pct": 0.0 if met else 100 * abs(target - measured) / target, "bound": "" if met else why}


def goals(res: dict) -> list[dict]:
    out, dense = [], {(r["batch"], r["prompt"]): r for r in res.get("dense", [])}
    b1 = dense.get((1, max(t for b, t in dense if b == 1))) if dense else None
    b8 = dense.get((8, max(t for b, t in dense if b == 8))) if any(b == 8 for b, _ in dense) else None
    prof = res.get("profile", {})
    dec_why = (f"decode (profiled at batch 1): {100 * prof.get('decode', {}).get('matmul_share', 0):.0f}% of CPU time in "
               "matrix-vector products (memory-bound on the weights); the rest is per-op dispatch of ~40 small kernels "
               "per layer; transformers runs the same matmul kernels")
    pre_why = (f"prefill: {100 * prof.get('prefill', {}).get('matmul_share', 0):.0f}% of CPU time in matmuls; attention,"
               " norms and elementwise ops take the rest; both systems run the same kernels")
    if b1 and "decode_ratio" in b1:
        out.append(goal(f"decode b1x{b1['prompt']} vs transformers", b1["decode_ratio"], GOALS["decode_b1_vs_hf"], why=dec_why))
    if b1:
        out.append(goal("decode b1 of read bandwidth", b1["ours"]["decode_of_bandwidth"], GOALS["decode_b1_of_bandwidth"],
                        why=dec_why))
    if b8 and "prefill_ratio" in b8:
        out.append(goal(f"prefill b8x{b8['prompt']} vs transformers", b8["prefill_ratio"], GOALS["prefill_vs_hf"], why=pre_why))
        out.append(goal(f"decode b8x{b8['prompt']} vs transformers", b8["decode_ratio"], GOALS["decode_b8_vs_hf"], why=dec_why))
    if b8:
        out.append(goal(f"prefill b8x{b8['prompt']} of matmul ceiling", b8["ours"]["prefill_of_matmul"],
                        GOALS["prefill_of_matmul"], why=pre_why))
    for r in res.get("systems", []):
        for kind in ("decode_b1", "prefill_b8"):
            why = ("the kept FFN is only part of the step: attention, norms, LM head and per-op overhead do not shrink;"
                   " smaller matmuls also run further from peak")
            out.append(goal(f"{r['system']} {kind} speedup of ideal (issue 7)", r[kind]["of_ideal"], GOALS["expert_of_ideal"], why=why))
            out.append(goal(f"{r['system']} {kind} speedup of ideal (issue 4)", r[kind]["of_ideal"],
                            GOALS["expert_of_ideal_issue4"], why=why))
    if "router" in res:
        out.append(goal("router overhead % per decode step (amortized over the request)",
                        res["router"]["overhead_pct_per_decode_step"], GOALS["router_overhead_pct"], higher=False,
                        why="timing noise between two equal-work runs, or the router head"))
    if "stats" in res:
        out.append(goal("collect_stats cost vs plain forward", res["stats"]["cost_ratio"], GOALS["stats_cost"], higher=False,
                        why="per-neuron reductions over (B*T, F) activations in every layer"))
    return out


def markdown(res: dict) -> str:
    lines = [f"## bench: {res['meta']['model']} ({res['meta']['dtype']}, {res['meta']['device']}, "
             f"{res['meta']['threads']} threads, {res['meta']['reps']} reps after 1 warm-up; median [min–max])", ""]
    c = res.get("ceilings")
    if c:
        lines += ["| machine ceiling | value |", "|---|---|",
                  f"| matmul GFLOP/s, FFN shape {c['matmul_ffn_shape']['shape']} | {fmt(c['matmul_ffn_shape']['gflops'])} |",
                  f"| matmul GFLOP/s, 2048^3 | {fmt(c['matmul_square_2048']['gflops'])} |",
                  f"| read GB/s, 256 MiB gemv | {fmt(c['read_gemv']['gbs'])} |",
                  f"| read GB/s, 256 MiB sum | {fmt(c['read_sum']['gbs'])} |", ""]
    if res.get("dense"):
        lines += ["| B x T (+N new) | system | prefill tok/s | decode tok/s | prefill GFLOP/s, of matmul ceiling "
                  "| decode GB/s, of read bandwidth |", "|---|---|---|---|---|---|"]
        for r in res["dense"]:
            lines.append(f"| {r['batch']}x{r['prompt']} | ceiling, same rounds | | | {r['ceiling_matmul_gflops']:.1f} "
                         f"| {r['ceiling_read_gbs']:.1f} |")
            for name in ("ours", "transformers"):
                if name in r:
                    s = r[name]
                    lines.append(f"| {r['batch']}x{r['prompt']} (+{r['new_tokens']}) | {name} | {fmt(s['prefill_tok_s'])} "
                                 f"| {fmt(s['decode_tok_s'])} | {s['prefill_gflops']:.1f}, {100 * s['prefill_of_matmul']:.0f}% "
                                 f"| {s['decode_gbs']:.2f}, {100 * s['decode_of_bandwidth']:.0f}% |")
            if "prefill_ratio" in r:
                lines.append(f"| {r['batch']}x{r['prompt']} | **ours / transformers** | **{r['prefill_ratio']:.2f}x** "
                             f"| **{r['decode_ratio']:.2f}x** | tokens identical: {r['tokens_identical']} | |")
        lines.append("")
    if res.get("systems"):
        lines += ["| system | active FFN | decode b1 speedup [min–max] | ideal | of ideal | prefill b8 speedup [min–max] "
                  "| ideal | of ideal |", "|---|---|---|---|---|---|---|---|"]
        for r in res["systems"]:
            d, p = r["decode_b1"], r["prefill_b8"]
            lines.append(f"| {r['system']} | {100 * r['active_fraction']:.0f}% | {d['speedup']:.2f}x "
                         f"[{d['speedup_min']:.2f}–{d['speedup_max']:.2f}] | {d['ideal']:.2f}x | {100 * d['of_ideal']:.0f}% "
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
    device, dtype = resolve_device(args), resolve_dtype(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = dict(QUICK if args.quick else FULL)
    if args.reps:
        plan["reps"] = args.reps
    torch.manual_seed(args.seed)
    if args.memory_child:
        return memory_child(args, plan, device, dtype)
    out = Path(args.out) / "bench.json"
    path = Path(args.model) if args.model else M.default_model_path()
    model, _ = M.load_model(path, device, dtype)
    res = {"meta": {"model": path.name, "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
                    "reps": plan["reps"], "plan": plan, "torch": torch.__version__, "cpus": os.cpu_count(),
                    "argv": argv, "memory_method": "CPU: VmHWM after reset minus VmRSS of the loaded dense model"
                    if device.type == "cpu" else "CUDA: max_memory_allocated minus allocated after load"},
           "notes": []}
    with torch.inference_mode():
        res["ceilings"] = ceilings(device, dtype, model.config, max(b * t for b, t in plan["sizes"]), plan["reps"])
        save(res, out)
        if "dense" in args.sections:
            hf, why = (None, "--no-hf given") if args.no_hf else load_hf(path, device, dtype)
            if why:
                res["notes"].append(f"transformers column skipped: {why}")
            res["dense"] = bench_dense(model, hf, plan, device)
            del hf
            gc.collect()
            T = max(t for _, t in plan["sizes"])
            idx = torch.randint(0, model.config.vocab_size, (max(b for b, _ in plan["sizes"]), T)).to(device)
            res["profile"] = profile_top(model, idx, 8) if device.type == "cpu" else {}
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
    if "memory" in args.sections:
        res["memory"] = bench_memory(["dense"] + list(systems), argv)
    res["goals"] = goals(res)
    save(res, out)
    print(markdown(res))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    run_cli(main)
