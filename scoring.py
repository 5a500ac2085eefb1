"""scoring.py — how well a model predicts text: the log-likelihood engine, the one held-out scorer and its intervals.

Used by every stage that measures text: purify.py's perplexity report and searches, purify_sweep.py, the router's
held-out numbers, train_router.py and evaluate.py (MMLU letters and cloze, bits per byte), bench.py.

    loglikelihoods(model, [(context ids, continuation ids), ...])   sum of log p(continuation | context) each
    window_nll(model, windows)      total next-token NLL of each window (every token but the first is predicted)
    perplexity(model, windows)      exp(NLL per predicted token) over all windows
    next_token_nll(logits, x)       the cross-entropy of next-token prediction (training objectives, searches)
    bootstrap(num, den, seed)       95% interval of sum(num) / sum(den) over resampled items, paired with `ref`
    ppl_intervals(nll, ref)         perplexity and its paired change against a reference, with intervals

Shape legend: B batch (rows), T time (tokens), C width, V vocab, N windows or items, U scored positions.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

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


def next_token_nll(logits: torch.Tensor, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token prediction: logits (B, T, V) at positions 0..T-2 score the tokens x (B, T) at
    1..T-1 (every position but the first of a window is predicted). reduction as in F.cross_entropy."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction=reduction)


# ----------------------------------------------------------------------------- the log-likelihood engine

@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], mlps=None,
                   batch_tokens: int | None = None, share_prefix: bool = True) -> list[float]:
    """Sum of log p(continuation | context) for each (context ids, continuation ids) request.

    Two ways, chosen per request, the same numbers up to float rounding (tests check it):
    - rows (`_row_loglik`): each request is one row, context + continuation minus its last token. Requests whose
      rows are identical share one (the four MMLU letters cost one forward, not four).
    - shared prefix (`_prefix_loglik`): when several continuations follow one context that is longer than each of
      them (MMLU cloze: one question, four answer texts), the context runs once, its KV cache is copied to one row
      per continuation, and only the continuations run again. share_prefix=False turns it off.
    Batches hold at most batch_tokens padded tokens (default_batch_tokens: by device)."""
    device = model.tok_emb.weight.device
    batch_tokens = batch_tokens or default_batch_tokens(device)
    for r, (ctx, cont) in enumerate(requests):
        if not cont or not ctx:
            raise ValueError(f"request {r} has an empty {'continuation' if not cont else 'context'}")
        if len(cont) > model.config.max_seq_len:
            raise ValueError(f"request {r}: continuation of {len(cont)} tokens exceeds max_seq_len "
                             f"{model.config.max_seq_len}")
    shared = shared_contexts(requests, model.config.max_seq_len) if share_prefix else {}
    in_groups = {r for rs in shared.values() for r in rs}
    single = [r for r in range(len(requests)) if r not in in_groups]
    total = torch.zeros(len(requests), dtype=torch.float64, device=device)  # (N,) summed on the device
    for ids, values in _row_loglik(model, requests, single, mlps, batch_tokens):
        total.index_add_(0, to_device(torch.tensor(ids, dtype=torch.long), device), values)
    for ids, values in _prefix_loglik(model, requests, shared, mlps, batch_tokens):
        total.index_add_(0, to_device(torch.tensor(ids, dtype=torch.long), device), values)
    return total.tolist()  # the one device->host copy


def shared_contexts(requests, max_len: int) -> dict[tuple, list[int]]:
    """Contexts worth running once: {context: request ids} where at least two different continuations of more
    than one token follow the context, every continuation is shorter than it, and everything fits max_len."""
    groups: dict[tuple, list[int]] = {}
    for r, (ctx, cont) in enumerate(requests):
        groups.setdefault(tuple(ctx), []).append(r)
    out = {}
    for ctx, rs in groups.items():
        conts = [requests[r][1] for r in rs]
        if (len({tuple(c) for c in conts}) >= 2 and max(map(len, conts)) > 1 and max(map(len, conts)) < len(ctx)
                and len(ctx) + max(map(len, conts)) - 1 <= max_len):
            out[ctx] = rs
    return out


def _head_logprobs(model, h: torch.Tensor, rows_host: list[int], targets: torch.Tensor) -> torch.Tensor:
    """log p(targets (N,) | hidden states h (U, C)) where row rows_host[n] (sorted; a host list, so that chunking
    never waits on the device) of h predicts targets[n]; the LM head runs on HEAD_ROWS positions at a time."""
    out = torch.empty(len(targets), dtype=torch.float64, device=h.device)  # (N,)
    rows = to_device(torch.tensor(rows_host, dtype=torch.long), h.device)
    lo = 0
    for a in range(0, len(h), HEAD_ROWS):
        hi = lo
        while hi < len(rows_host) and rows_host[hi] < a + HEAD_ROWS:
            hi += 1
        logits = model.head(h[a:a + HEAD_ROWS])  # (u, V) float32
        u, t = rows[lo:hi] - a, targets[lo:hi]
        out[lo:hi] = logits[u, t] - logits.logsumexp(-1)[u]  # = log_softmax(logits)[u, t]
        lo = hi
    return out


def _row_loglik(model, requests, which: list[int], mlps, batch_tokens: int):
    """One row per distinct context + continuation[:-1] (right-padded: with causal attention a real token never sees
    the padding after it, so no mask is needed); over-long rows keep their end (left truncation).

    Built so the device never waits on Python: per batch one host->device copy of the tokens and one of the
    indices of the scored positions, the blocks (only the final residual stream is kept), one gather of the
    positions that predict a continuation token (each once, however many requests score it), the LM head on
    those rows only, then per token logit[target] - logsumexp(logits), summed per request on the device. One
    device->host copy at the very end (in `loglikelihoods`); no `.item()` per request. Yields, per batch, the
    request ids and their sums (a float64 tensor on the device)."""
    max_len, device = model.config.max_seq_len, model.tok_emb.weight.device
    rows: dict[tuple, int] = {}
    users: list[list[int]] = []  # row -> indices of the requests it serves
    for r in which:
        ctx, cont = requests[r]
        inp = tuple((ctx + cont)[-(max_len + 1):-1])
        if inp not in rows:
            rows[inp] = len(rows)
            users.append([])
        users[rows[inp]].append(r)
    inputs = list(rows)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))  # longest first: little padding
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
        token_logp = _head_logprobs(model, h, [u for u, _, _ in targets], meta[1])  # (N,)
        yield ids, torch.zeros(len(ids), dtype=torch.float64, device=device).index_add_(0, meta[2], token_logp)


def _prefix_loglik(model, requests, shared: dict[tuple, list[int]], mlps, batch_tokens: int):
    """Requests that share a context (`shared_contexts`): stage 1 runs the contexts (right-padded to width W) with
    a KV cache and scores every continuation's first token from the context's last position; stage 2 copies each
    context's cache to one row per continuation and runs continuation[:-1] at cache slots W.. with a mask that
    hides the context's padding, so positions and attention are exactly those of the row on its own. Yields request
    ids and log-probabilities (device tensors) to be summed per request."""
    cfg, device = model.config, model.tok_emb.weight.device
    contexts = sorted(shared, key=len, reverse=True)  # longest first: little padding
    start = 0
    try:
        while start < len(contexts):
            W = len(contexts[start])
            T2 = max(len(requests[r][1]) - 1 for c in contexts[start:start + max(1, batch_tokens // W)]
                     for r in shared[c])
            batch = contexts[start:start + max(1, batch_tokens // (W + T2))]
            start += len(batch)
            reqs = [r for c in batch for r in shared[c]]
            if cfg.local_layers and W + T2 > cfg.sliding_window:  # Gemma: a padded gap would shift its window
                yield from _row_loglik(model, requests, reqs, mlps, batch_tokens)
                continue
            # stage 1: the contexts, writing the KV cache; each context's last position predicts cont[0]
            model.setup_cache(len(batch), W)
            idx = to_device(torch.tensor([list(c) + [0] * (W - len(c)) for c in batch]), device)  # (B, W)
            x, rope, mask = model.embed(idx)
            h = model.run_layers(x, rope, mask, mlps=mlps)  # (B, W, C)
            last = torch.tensor([b * W + len(c) - 1 for b, c in enumerate(batch) for _ in shared[c]])
            first = torch.tensor([requests[r][1][0] for r in reqs])
            h_last = h.reshape(-1, h.shape[-1])[to_device(last, device)]  # (requests, C)
            yield reqs, _head_logprobs(model, h_last, list(range(len(reqs))), to_device(first, device))
            # stage 2: one row per continuation of more than one token, on a copy of its context's cache
            parent = {r: b for b, c in enumerate(batch) for r in shared[c]}
            rest = [r for r in reqs if len(requests[r][1]) > 1]
            caches = [(blk.attn.cache_k, blk.attn.cache_v) for blk in model.layers]
            per = max(1, batch_tokens // (W + T2))
            for s in range(0, len(rest), per):
                rows = rest[s:s + per]
                yield rows, _continuations(model, requests, rows, parent, batch, caches, W, mlps)
    finally:
        model.clear_cache()


def _continuations(model, requests, rows: list[int], parent: dict, batch: list[tuple], caches, W: int, mlps):
    """Stage 2 of `_prefix_loglik` for request ids `rows`: log p(cont[1:] | context, cont[0]) of each, (R,)."""
    device = model.tok_emb.weight.device
    conts = [requests[r][1] for r in rows]
    T2 = max(len(c) - 1 for c in conts)
    src = to_device(torch.tensor([parent[r] for r in rows]), device)  # (R,) each row's context in stage 1
    for blk, (k, v) in zip(model.layers, caches):  # (R, K, W + T2, D): the context's cache, then room for cont
        blk.attn.cache_k = torch.cat([k[src], k.new_zeros(len(rows), k.shape[1], T2, k.shape[3])], 2)
        blk.attn.cache_v = torch.cat([v[src], v.new_zeros(len(rows), v.shape[1], T2, v.shape[3])], 2)
    valid = torch.zeros(len(rows), W + T2, dtype=torch.bool)  # (R, W + T2): real context and continuation slots
    for i, r in enumerate(rows):
        valid[i, :len(batch[parent[r]])] = True
        valid[i, W:W + len(conts[i]) - 1] = True
    idx = torch.tensor([c[:-1] + [0] * (T2 - len(c) + 1) for c in conts])  # (R, T2) right padded
    x, rope, mask = model.embed(to_device(idx, device), W, to_device(valid, device))
    h = model.run_layers(x, rope, mask, start_pos=W, mlps=mlps)  # (R, T2, C)
    pos = torch.tensor([i * T2 + j for i, c in enumerate(conts) for j in range(len(c) - 1)])
    owner = torch.tensor([i for i, c in enumerate(conts) for _ in range(len(c) - 1)])
    targets = torch.tensor([t for c in conts for t in c[1:]])
    logp = _head_logprobs(model, h.reshape(-1, h.shape[-1])[to_device(pos, device)], list(range(len(pos))),
                          to_device(targets, device))
    return torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, to_device(owner, device), logp)


# ----------------------------------------------------------------------------- the held-out scorer

def window_nll(model, windows, mlps=None, batch_size: int = 8) -> torch.Tensor:
    """Total next-token NLL of each window (N,) float64: the first token is the context, every later token is
    predicted. `windows`: an (N, T) tensor or a list of token lists (lengths may differ). batch_size: windows of
    the longest length per forward."""
    rows = windows.tolist() if torch.is_tensor(windows) else [list(w) for w in windows]
    if any(len(w) < 2 for w in rows):
        raise ValueError("every window needs at least 2 tokens (one context, one predicted)")
    width = max(map(len, rows), default=2)
    ll = loglikelihoods(model, [(w[:1], w[1:]) for w in rows], mlps, batch_tokens=batch_size * width)
    return -torch.tensor(ll, dtype=torch.float64)


def perplexity(model, windows, mlps=None, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every predicted token of every window."""
    rows = windows.tolist() if torch.is_tensor(windows) else windows
    return math.exp(float(window_nll(model, rows, mlps, batch_size).sum()) / sum(len(w) - 1 for w in rows))


# ----------------------------------------------------------------------------- intervals

def bootstrap(num: np.ndarray, den: np.ndarray, seed: int, n_boot: int = 1000, ref=None) -> list[float]:
    """95% percentile interval of sum(num)/sum(den) over items resampled with replacement. With ref=(num, den)
    of a second system on the same items, the interval of the paired difference (this - ref)."""
    f64 = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
    num, den = f64(num), f64(den)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(num), size=(n_boot, len(num)))  # (n_boot, n)
    stat = num[idx].sum(1) / den[idx].sum(1)
    if ref is not None:
        stat = stat - f64(ref[0])[idx].sum(1) / f64(ref[1])[idx].sum(1)
    lo, hi = np.percentile(stat, [2.5, 97.5])
    return [round(float(lo), 6), round(float(hi), 6)]


def ppl_intervals(nll, ref=None, seed: int = 0, n_boot: int = 2000) -> dict:
    """Per-window mean NLLs (N,) -> ppl = exp(mean) with its 95% bootstrap interval over windows; with `ref` (the
    reference system on the same windows) the paired change exp(mean(nll - ref)) - 1 in %, and its interval."""
    nll = np.asarray(nll, dtype=np.float64)
    ones = np.ones(len(nll))
    out = {"ppl": math.exp(nll.mean()), "ppl_ci": [math.exp(v) for v in bootstrap(nll, ones, seed, n_boot)]}
    if ref is not None:
        d = nll - np.asarray(ref, dtype=np.float64)
        out["delta"] = 100 * math.expm1(d.mean())
        out["delta_ci"] = [100 * math.expm1(v) for v in bootstrap(nll, ones, seed, n_boot, ref=(ref, ones))]
    return out
