"""measure.py — how bench.py times and counts: synchronised timers, interleaved rounds, the machine's own ceilings,
and the work (FLOPs, bytes) a forward or a decode must do.

    timed / side_by_side / rate   seconds of a call (the GPU synchronised on both sides); several systems timed in
                                  interleaved rounds so a change of machine load hits all of them alike
    ceilings                      matmul GFLOP/s and streaming read GB/s of this machine, in the model's dtype
    forward_flops / decode_*      the work counted from the config (2 FLOPs per multiply-add, causal attention only
                                  over visible keys, the FFN at its kept width)

Shape legend: B batch, T time, S0 cached tokens, C width, H query heads, K kv heads, D head dim, F FFN neurons,
k kept neurons, V vocab, L layers.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

import model as M

# ----------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # that GPU (cuda:N), not the current one


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


# ----------------------------------------------------------------------------- machine ceilings

def repeat_timed(fn, device, inner: int):
    """fn() -> (seconds per call, None), over `inner` back-to-back calls: one GPU kernel is over in microseconds,
    less than the synchronisation around it, so on CUDA a timing covers several."""
    def run():
        dt, _ = timed(lambda: [fn() for _ in range(inner)], device)
        return dt / inner, None
    return run


def matmul_probe(m, k, n, device, dtype, inner: int = 1):
    """fn() -> (seconds, None) of one (m, k) @ (k, n) matmul: 2mkn FLOPs."""
    a, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
    return repeat_timed(lambda: F.linear(a, w), device, inner)


def read_probe(kind, device, dtype, mib=256, inner: int = 1):
    """(fn() -> (seconds, None), bytes read): a matrix-vector product (the decode kernel) or a sum over `mib` MiB."""
    rows = mib * 2**20 // (1024 * torch.tensor([], dtype=dtype).element_size())
    buf, x = torch.randn(rows, 1024, device=device, dtype=dtype), torch.randn(1, 1024, device=device, dtype=dtype)
    fn = (lambda: F.linear(x, buf)) if kind == "gemv" else (lambda: buf.sum())
    return repeat_timed(fn, device, inner), buf.numel() * buf.element_size()


def ceilings(device, dtype, cfg: M.Config, big_m: int, reps: int) -> dict:
    """Matmul GFLOP/s in the model's dtype on the model's FFN shape (M x C @ C x F) and on a square, the better one
    is the ceiling. Read bandwidth: a matrix-vector product (the decode kernel) and a sum over one buffer.
    CPU: a 2048^3 square, a 256 MiB buffer. CUDA: an 8192^3 square and a 1 GiB buffer (far past the L2 cache, so
    this is HBM), 10 calls per timing, and the bf16 and fp32 (no TF32) tensor-core ceilings on their own lines."""
    gpu = device.type == "cuda"
    side, mib, inner = (8192, 1024, 10) if gpu else (2048, 256, 1)
    probes = {"ffn_shape": (big_m, cfg.n_embd, cfg.n_ffn, dtype), "square": (side, side, side, dtype)}
    if gpu:
        probes["bf16_square"] = (side, side, side, torch.bfloat16)
        probes["fp32_square"] = (side, side, side, torch.float32)
    out = {}
    for name, (m, k, n, dt) in probes.items():
        s = side_by_side({name: matmul_probe(m, k, n, device, dt, inner)}, reps + 2)[name]
        out[f"matmul_{name}"] = {"shape": [m, k, n], "dtype": str(dt).removeprefix("torch."),
                                 "gflops": rate(s, 2 * m * k * n / 1e9)}
    for name in ("gemv", "sum"):
        run, nbytes = read_probe(name, device, dtype, mib, inner)
        out[f"read_{name}"] = {"bytes": nbytes, "gbs": rate(side_by_side({name: run}, reps + 2)[name], nbytes / 1e9)}
    out["matmul_gflops"] = max(out["matmul_ffn_shape"]["gflops"]["median"], out["matmul_square"]["gflops"]["median"])
    out["read_gbs"] = max(out["read_gemv"]["gbs"]["median"], out["read_sum"]["gbs"]["median"])
    return out


# ----------------------------------------------------------------------------- work counts (FLOPs, bytes)

def forward_flops(cfg: M.Config, kept: list[int], B: int, T: int, S0: int, logit_rows: int) -> float:
    """FLOPs of one forward: B sequences, T new tokens each after S0 cached ones, LM head on logit_rows per sequence.

    Per token and layer: q/k/v and output projections, the FFN with k_l kept neurons (3 matrices if gated, else 2);
    attention QK^T and PV over the keys each query may see (causal)."""
    C, H, K, D = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    n_ffn_mats = 2 if cfg.arch == "gpt2" else 3  # llama and gemma3 FFNs are gated: gate, up, down
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
    n_ffn_mats = 2 if cfg.arch == "gpt2" else 3  # llama and gemma3 FFNs are gated: gate, up, down
    weights = sum(C * (H + 2 * K) * D + H * D * C + n_ffn_mats * C * k for k in kept) + C * cfg.vocab_size
    kv = sum(B * cfg.n_layer * 2 * K * D * (T + s + 1) for s in range(n_new))
    return item * (n_new * weights + kv)
