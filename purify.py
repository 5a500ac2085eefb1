"""purify.py — DOWP (Domain-Oriented Weight Purification): score every FFN neuron per domain, keep the relevant
ones, and save the kept index sets as DSS-Experts (Domain-Specific Subnetwork Experts) that really run faster.

Pipeline position: the second stage
    model.py  ->  purify.py (DOWP, DSS-Experts)  ->  train_router.py / router.py  ->  evaluate.py

What goes in:  a model (--model, default SmolLM2-135M-Instruct GGUF) and one text source per domain: the built-in
               general / code / math / knowledge corpora from <shared>/data (see DOMAIN DATA below), or your own
               files with --domain NAME=path.txt|.jsonl.
What comes out (under --out, default experts/):
    experts.safetensors   per-domain, per-layer kept-neuron index sets ("{domain}.{layer}", int64, sorted), the
                          baselines at the same budget ("baseline.{name}.{layer}"), the per-domain neuron statistics
                          ("stats.{domain}.{stat}", so any baseline at any keep can be rebuilt later) and JSON
                          metadata (model fingerprint, domains, score, keep, token counts, date, checksum)
    stats.{domain}.safetensors   the statistics of one domain, reused by a re-run (a killed run resumes)
    report.md / report.json      cross-domain perplexity matrix, per-layer Jaccard overlap, protected neurons
    report.png                   the perplexity matrix as a heatmap (--plot, only if matplotlib is installed)

    python purify.py --domains general code math knowledge --keep 0.5 --out experts/
    python purify.py --keep 0.5 --domain legal=my_contracts.txt --out experts_legal/
    python purify.py --keep 0.5 --export exported/code --export-domain code

The method, step by step (each step is named in the comments below):
    DOWP step 1  domain calibration: token windows per domain, a held-out split kept apart for evaluation
    DOWP step 2  statistics: one streamed pass per domain through recording FFNs (`model(idx, mlps=[...])`):
                 for every layer l and neuron j the mean |a_j|, mean a_j^2, firing rate and max |a_j|, plus
                 ||W_down[:, j]||; memory O(L x F), never O(tokens)
    DOWP step 3  scores: structured Wanda importance I_d(l, j) = sqrt(mean_d a_j^2) * ||W_down[:, j]||, made
                 domain-oriented by contrasting it with the other domains (`score_dowp`, knob --contrast); or
                 loss-aware (`loss_aware_stats`, --score taylor): the estimated change of the domain's loss
                 when the neuron is removed, which can be negative (removing the neuron should help)
    DOWP step 4  budget: keep a fraction of neurons per layer (uniform, or allocated by measured layer
                 sensitivity); super neurons (massive activations) are always kept (--protect)
    DOWP step 5  DSS-Experts: the kept index sets; `materialize` gathers them into compact MLPs (`MLP.select`)
                 whose matmuls are (k, C) and (C, k): real compute savings, not masks
    DOWP step 6  export one expert as a normal HF checkpoint (intermediate_size = k) that transformers loads
    DOWP step 7  report: perplexity of every expert and baseline on every domain's held-out text

All choices in one place:
    score (dowp)  S_d = I~_d * (I~_d / mean_e I~_e) ** lam, where I~_d is I_d divided by its layer mean (so a domain
                  with larger activations overall does not dominate the contrast). lam = 0 is plain Wanda on the
                  domain's text. A neuron that matters for every domain has ratio ~1 and keeps its full importance
                  (kept when important); one that matters only for other domains has ratio << 1 and is purified.
                  Only the ranking inside a layer matters, so S_d is a geometric tilt of I_d towards d.
                  MEASURED (SmolLM2-135M, keep 0.5, 8192 calib / 2048 held-out tokens per domain, each expert on its
                  own held-out text): lam = 0: general 67.0, code 22.2, math 15.8, knowledge 37.5; lam = 0.5: 69.8,
                  23.5, 15.9, 42.2; lam = 1: 80.9, 25.1, 18.8, 46.2; lam = 2: 109.1, 33.6, 21.6, 66.3. Own-domain
                  perplexity gets worse monotonically with the contrast, so DEFAULT_CONTRAST = 0: the default DSS-Expert
                  is the structured Wanda score on the domain's own text (+ protected super neurons). The contrast
                  makes experts more specialised (worse on the other domains) but never better on their own.
    score (taylor) dL_j ~ -sum_t a_j,t * dL/da_j,t / n: first-order change of the mean next-token loss L on the
                  domain's calibration text when neuron j is removed (a_j = 0). One backward per batch, gradients
                  w.r.t. the activations only. Unlike dowp it has a sign: dL_j < 0 means removal should lower L.
    --auto MODE   instead of a fixed keep, the budget is chosen by the loss on the last quarter of the calibration
                  windows (scores come from the other three quarters; held-out text is never used). threshold:
                  remove every neuron scoring below one global threshold (AUTO_REMOVE candidates, or none).
                  greedy (`greedy_layers`): layer by layer, remove the layer's lowest-scoring block only if the
                  validation loss drops given the removals already accepted. MEASURED (see README): with taylor,
                  one-shot removal of the most negative estimates is catastrophic (estimates add up only for small
                  changes), while greedy layer-wise removal lowers held-out perplexity below dense.
    baselines     random (uniform scores, seeded), magnitude (weights only: ||[W_up; W_gate][j]|| * ||W_down[:, j]||),
                  general (Wanda on general text only), mixed (Wanda on all domains' calibration text pooled).
                  Each is ONE mask for every input, at the same per-layer budget; mixed is the fair comparison.
    super neurons neuron j of layer l is protected when its max |a_j| over all calibration tokens exceeds
                  PROTECT_FACTOR x the median over the layer's neurons of max |a|. They are kept by every method.
    firing rate   a neuron "fires" on a token when |a_j| > FIRE_REL x the token's RMS activation over the layer.
    budget        k_l = round(keep_l * F), at least 1; sensitivity allocation moves budget between layers
                  (`allocate_keep`) keeping the mean keep fraction.
    perplexity    exp(mean next-token NLL) over non-overlapping windows of --seq-len tokens of held-out text.

DOMAIN DATA: the built-in domains (general, code, math, knowledge) or NAME=path.txt|.jsonl, each with a fixed
"calib" and "heldout" split, are defined in data.py (see its docstring): calibration windows of --seq-len tokens
come from the calib split only, the report's perplexities from the held-out split only.

Shape legend: B batch, T time, C width, L layers, F FFN neurons, D domains, k kept neurons, N windows.
"""
from __future__ import annotations

import datetime
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import checkpoints as ckpt
import data
import gguf_file
import model as M
from cli import (ArgumentParser, DefaultsHelpFormatter, UserError, add_common_args, fraction, int_at_least,
                 nonneg_float, out_dir, positive_int, run_cli)
from tokenizer import hf_tokenizer_files

BASELINES = ("random", "magnitude", "general", "mixed")
SCORES = ("dowp", "taylor") + BASELINES
STATS = ("mean_abs", "mean_sq", "fire_rate", "max_abs", "down_norm")  # each (L, F); plus "count" (tokens)
DEFAULT_CONTRAST = 0.0  # lam of score_dowp; chosen by held-out perplexity (MEASURED in the module docstring)
PROTECT_FACTOR = 50.0  # super neuron: max |a| above this many times the layer's median max |a|
FIRE_REL = 0.1  # "fires" = |a_j| above this fraction of the token's RMS activation
EXPERTS_FORMAT = "free-moe-experts/1"
AUTO_REMOVE = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)  # --auto: candidate fractions of all neurons removed
GREEDY_BLOCKS = (0.01, 0.0025)  # --auto greedy: fractions of a layer tried for removal, largest first


# DOWP step 1 (calibration windows of a domain) is data.load_domain_tokens.

# ----------------------------------------------------------------------------- DOWP step 2: statistics

class RecordingMLP(nn.Module):
    """Wraps an FFN: computes exactly what it computes, and accumulates per-neuron sums of its activations.

    Passed to `model(idx, mlps=[...])`, so statistics need no hooks. Sums are float64 (many tokens)."""

    def __init__(self, mlp: M.MLP):
        super().__init__()
        self.mlp = mlp
        n = mlp.n_neurons
        dev = mlp.up.weight.device
        self.count = 0
        self.sum_abs = torch.zeros(n, dtype=torch.float64, device=dev)
        self.sum_sq = torch.zeros(n, dtype=torch.float64, device=dev)
        self.n_fire = torch.zeros(n, dtype=torch.float64, device=dev)
        self.max_abs = torch.zeros(n, dtype=torch.float32, device=dev)

    def forward(self, x):
        a = self.mlp.neurons(x)  # (B, T, F)
        flat = a.detach().reshape(-1, a.shape[-1]).float()  # (B*T, F)
        mag = flat.abs()
        sq = mag * mag
        rms = sq.mean(-1, keepdim=True).sqrt()  # (B*T, 1) per-token scale for the firing threshold
        self.count += flat.shape[0]
        self.sum_abs += mag.sum(0)
        self.sum_sq += sq.sum(0)
        self.n_fire += (mag > FIRE_REL * rms).sum(0, dtype=torch.int32)  # int32: a bool->int64 sum copies (B*T, F)
        torch.maximum(self.max_abs, mag.amax(0), out=self.max_abs)
        return self.mlp.project(a)


def down_norms(model: M.Transformer) -> torch.Tensor:
    """||W_down[:, j]|| per layer and neuron: (L, F)."""
    return torch.stack([blk.mlp.down_weight().detach().float().norm(dim=0) for blk in model.layers]).cpu()


@torch.no_grad()
def collect_stats(model: M.Transformer, windows: torch.Tensor, batch_size: int = 8, desc: str = "stats") -> dict:
    """DOWP step 2: one streamed pass over `windows` (N, T); returns {stat: (L, F) float32} + "count" (tokens).

    mean_abs = E|a_j|, mean_sq = E a_j^2, fire_rate = P(|a_j| > FIRE_REL * rms_token), max_abs = max |a_j|,
    down_norm = ||W_down[:, j]||; expectations over every token of every window."""
    if windows.ndim != 2 or windows.numel() == 0:
        raise UserError(f"need (N, T) token windows, got shape {tuple(windows.shape)}")
    recorders = [RecordingMLP(blk.mlp) for blk in model.layers]
    device = model.tok_emb.weight.device
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
        # last_only: the recorders see every token, and the unused (T, V) logits of the LM head are never computed,
        # which makes this pass cheaper than a plain perplexity forward
        model(windows[i:i + batch_size].to(device), mlps=recorders, last_only=True)
    n = recorders[0].count
    stack = lambda f: torch.stack([f(r) for r in recorders]).float().cpu()  # (L, F)
    return {"mean_abs": stack(lambda r: r.sum_abs / n), "mean_sq": stack(lambda r: r.sum_sq / n),
            "fire_rate": stack(lambda r: r.n_fire / n), "max_abs": stack(lambda r: r.max_abs),
            "down_norm": down_norms(model), "count": torch.tensor(n, dtype=torch.int64)}


def pool_stats(stats_by_domain: dict[str, dict]) -> dict:
    """All domains' calibration tokens as one corpus: token-weighted means, max of maxes."""
    ss = list(stats_by_domain.values())
    n = torch.stack([s["count"] for s in ss]).double()  # (D,)
    w = (n / n.sum()).float()
    mean = lambda k: sum(wi * s[k] for wi, s in zip(w, ss))
    return {"mean_abs": mean("mean_abs"), "mean_sq": mean("mean_sq"), "fire_rate": mean("fire_rate"),
            "max_abs": torch.stack([s["max_abs"] for s in ss]).amax(0), "down_norm": ss[0]["down_norm"],
            "count": n.sum().long()}


# ----------------------------------------------------------------------------- DOWP step 3: scores

def wanda_importance(stats: dict) -> torch.Tensor:
    """Structured Wanda: I(l, j) = sqrt(E a_j^2) * ||W_down[:, j]||  (= ||a_j||_2 / sqrt(n_tokens) * ||W_down[:, j]||).

    The neuron's output norm averaged over the domain's tokens: how much it writes into the residual stream."""
    return stats["mean_sq"].sqrt() * stats["down_norm"]  # (L, F)


def score_dowp(stats_by_domain: dict[str, dict], domain: str, contrast: float = DEFAULT_CONTRAST) -> torch.Tensor:
    """DOWP: S_d = I~_d * (I~_d / mean_e I~_e) ** lam   with I~_e = I_e / mean_j I_e(l, j)  (layer-normalised).

    lam = 0: Wanda on domain d alone. lam > 0: neurons relatively more important for d than on average across
    all domains gain rank; a neuron equally important everywhere keeps its plain importance; one important
    only for other domains is pushed down (purified). Computed in log space for stability."""
    if domain not in stats_by_domain:
        raise UserError(f"no statistics for domain {domain!r} (have {', '.join(stats_by_domain)})")
    if contrast < 0:
        raise UserError(f"--contrast must be >= 0, got {contrast}")
    eps = 1e-12
    norm = {d: wanda_importance(s) for d, s in stats_by_domain.items()}
    norm = {d: I / I.mean(1, keepdim=True).clamp_min(eps) for d, I in norm.items()}  # (L, F) each, layer mean 1
    ref = torch.stack(list(norm.values())).mean(0)  # (L, F) the all-domain reference
    log_i = norm[domain].clamp_min(eps).log()
    return ((1 + contrast) * log_i - contrast * ref.clamp_min(eps).log()).exp()  # (L, F)


def score_random(model: M.Transformer, seed: int = 0) -> torch.Tensor:
    """Baseline: uniform random scores (seeded) -> a random subset of each layer's neurons."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(model.config.n_layer, model.config.n_ffn, generator=g)  # (L, F)


def score_magnitude(model: M.Transformer) -> torch.Tensor:
    """Baseline, weights only: ||[W_up; W_gate][j, :]|| * ||W_down[:, j]|| (input-row norm times output-column norm)."""
    rows = []
    for blk in model.layers:
        w_in = torch.cat([w.detach().float() for w in blk.mlp.up_weights()], dim=1)  # (F, C or 2C)
        rows.append(w_in.norm(dim=1) * blk.mlp.down_weight().detach().float().norm(dim=0))
    return torch.stack(rows).cpu()  # (L, F)


class TaylorMLP(nn.Module):
    """Wraps an FFN for the loss-aware pass: computes exactly what it computes, keeps its activations a (B, T, F)
    for the backward and sums x_c^2 of its input (the weight-level Wanda score of purify_sweep.py reads it)."""

    def __init__(self, mlp: M.MLP):
        super().__init__()
        self.mlp, self.a = mlp, None
        dev = mlp.up.weight.device
        self.taylor = torch.zeros(mlp.n_neurons, dtype=torch.float64, device=dev)  # sum_t -a_j dL/da_j
        self.in_sq = torch.zeros(mlp.up.in_features, dtype=torch.float64, device=dev)  # sum_t x_c^2
        self.count = 0

    def forward(self, x):
        a = self.mlp.neurons(x)  # (B, T, F)
        if not a.requires_grad:  # first layer of a frozen model: nothing before it needs a gradient, the graph
            a.requires_grad_()  # starts at these activations
        a.retain_grad()
        self.a = a
        self.in_sq += x.detach().float().pow(2).sum((0, 1)).double()
        self.count += x.shape[0] * x.shape[1]
        return self.mlp.project(a)

    def after_backward(self):
        self.taylor -= (self.a.detach().float() * self.a.grad.float()).sum((0, 1)).double()
        self.a = None


def loss_aware_stats(model: M.Transformer, windows: torch.Tensor, batch_size: int = 2, weights: bool = False,
                     desc: str = "taylor") -> dict:
    """DOWP step 3 (loss-aware): first-order estimates of how the mean next-token loss L on `windows` (N, T)
    changes when one neuron (or one FFN weight) is removed. One forward + backward per batch; the model's values
    never change (weights=True only asks autograd for dL/dW of the FFN matrices, then forgets it).

        taylor (L, F)   dL_j ~ -sum_t a_j,t dL/da_j,t   (removing j takes a_j from its value to 0)
        in_norm (L, C)  sqrt(E x_c^2) of each FFN's input
        taylor_w        with weights=True: {"{l}.{up|gate|down}": -W * dL/dW, same shape as W}, one weight each
        count           predicted tokens (L is their mean)"""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise UserError(f"need (N, T >= 2) token windows, got shape {tuple(windows.shape)}")
    recorders = [TaylorMLP(blk.mlp) for blk in model.layers]
    params = {f"{l}.{n}": getattr(blk.mlp, n).weight for l, blk in enumerate(model.layers)
              for n in ("up", "gate", "down") if weights and getattr(blk.mlp, n) is not None}
    device, n_pred = model.tok_emb.weight.device, 0
    for w in params.values():
        w.requires_grad_(True)
    try:
        with torch.enable_grad():
            for i in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
                x = windows[i:i + batch_size].to(device)  # (B, T)
                logits = model(x, mlps=recorders)  # (B, T, V)
                loss = next_token_nll(logits, x, reduction="sum")
                loss.backward()  # the sum: every token's gradient counts once; divided by n_pred below
                for r in recorders:
                    r.after_backward()
                n_pred += x[:, 1:].numel()
        out = {"taylor": torch.stack([r.taylor for r in recorders]).div(n_pred).float().cpu(),
               "in_norm": torch.stack([(r.in_sq / r.count).sqrt() for r in recorders]).float().cpu(),
               "count": torch.tensor(n_pred, dtype=torch.int64)}
        if weights:
            out["taylor_w"] = {k: (-w.detach().float() * w.grad.float() / n_pred).cpu() for k, w in params.items()}
    finally:
        for w in params.values():
            w.requires_grad_(False)
            w.grad = None
    return out


def score_neurons(stats_by_domain: dict[str, dict] | None, model: M.Transformer, method: str, domain: str | None = None,
                  contrast: float = DEFAULT_CONTRAST, seed: int = 0) -> torch.Tensor:
    """Scores (L, F) by `method` (dowp and taylor need `domain`); higher = keep first."""
    if method == "random":
        return score_random(model, seed)
    if method == "magnitude":
        return score_magnitude(model)
    if not stats_by_domain:
        raise UserError(f"score {method!r} needs calibration statistics")
    if method in ("dowp", "taylor") and domain is None:
        raise ValueError(f"score {method!r} needs a domain")
    if method == "dowp":
        return score_dowp(stats_by_domain, domain, contrast)
    if method == "taylor":
        if "taylor" not in stats_by_domain.get(domain, {}):
            raise UserError(f"score 'taylor' needs the loss-aware statistics of domain {domain!r} (loss_aware_stats)")
        return stats_by_domain[domain]["taylor"]
    if method == "general":
        if "general" not in stats_by_domain:
            raise UserError("baseline 'general' needs statistics of the general domain")
        return wanda_importance(stats_by_domain["general"])
    if method == "mixed":
        return wanda_importance(pool_stats(stats_by_domain))
    raise UserError(f"unknown score {method!r} (expected one of {', '.join(SCORES)})")


# ----------------------------------------------------------------------------- DOWP step 4: budget

def super_neurons(stats_by_domain: dict[str, dict], factor: float = PROTECT_FACTOR) -> torch.Tensor:
    """(L, F) bool: neurons whose max |a| (over every domain's tokens) exceeds `factor` x the layer median.

    These few "super neurons" carry massive activations (attention-sink style); dropping one wrecks the model
    for every input, so every method keeps them. factor <= 0 disables protection."""
    peak = torch.stack([s["max_abs"] for s in stats_by_domain.values()]).amax(0)  # (L, F)
    if factor <= 0:
        return torch.zeros_like(peak, dtype=torch.bool)
    return peak > factor * peak.median(dim=1, keepdim=True).values


def select_neurons(scores: torch.Tensor, keep, protected: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per layer, the indices (sorted) of the round(keep_l * F) highest-scoring neurons; protected ones first.

    keep: a float for every layer, or a list of L floats. protected: (L, F) bool or None."""
    L, n = scores.shape
    keeps = [float(keep)] * L if isinstance(keep, (int, float)) else [float(k) for k in keep]
    if len(keeps) != L:
        raise UserError(f"keep has {len(keeps)} entries for {L} layers")
    out = []
    for l, kf in enumerate(keeps):
        if not 0 < kf <= 1:
            raise UserError(f"keep must be in (0, 1], got {kf} (layer {l})")
        k = max(1, min(n, round(kf * n)))
        s = scores[l].float().clone()
        if protected is not None and protected[l].any():
            n_prot = int(protected[l].sum())
            if n_prot > k:
                raise UserError(f"layer {l}: {n_prot} protected neurons exceed the budget of {k}; "
                                  "raise --keep or --protect")
            s[protected[l]] = float("inf")
        idx = torch.topk(s, k, sorted=False).indices  # ties broken by topk, deterministic on CPU
        out.append(idx.sort().values.long())
    return out


def allocate_keep(sensitivity: torch.Tensor, keep: float, lo: float = 0.1, hi: float = 1.0) -> list[float]:
    """Per-layer keep fractions with mean `keep`: keep_l = clip(c * sensitivity_l, lo, hi), c found by bisection.

    More sensitive layers (bigger loss increase when purified) keep more neurons."""
    s = sensitivity.double().clamp_min(1e-9)
    s = s / s.mean()
    lo_c, hi_c = 0.0, 1e6
    for _ in range(200):
        c = (lo_c + hi_c) / 2
        if (c * s).clamp(lo, hi).mean() < keep:
            lo_c = c
        else:
            hi_c = c
    return [float(v) for v in (hi_c * s).clamp(lo, hi)]


def select_above(scores: torch.Tensor, threshold: float, protected: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Remove every neuron scoring below one global `threshold`: per layer, the indices of the others (sorted), plus
    the protected ones; a layer never ends up empty (its best neuron stays)."""
    out = []
    for l in range(scores.shape[0]):
        keep = scores[l] >= threshold  # (F,) bool
        if protected is not None:
            keep |= protected[l]
        if not keep.any():
            keep[scores[l].argmax()] = True
        out.append(keep.nonzero().flatten())
    return out


def auto_threshold(model: M.Transformer, scores: torch.Tensor, val_windows: torch.Tensor,
                   protected: torch.Tensor | None = None, batch_size: int = 8) -> tuple[float, list[dict]]:
    """--auto: the global threshold whose purified model has the lowest loss on `val_windows` (calibration text
    the scores did not see; never held-out text). Candidates: -inf (remove nothing), 0 when some scores are
    negative (taylor: remove every neuron estimated to hurt), and the thresholds removing each AUTO_REMOVE
    fraction of all neurons. Returns the threshold and every trial {threshold, removed, val_loss}."""
    flat = scores.flatten().sort().values
    cands = {float("-inf"), *({0.0} if flat[0] < 0 else ()), *(float(flat[round(f * len(flat))]) for f in AUTO_REMOVE)}
    trials = []
    for tau in sorted(cands):
        idx = select_above(scores, tau, protected)
        loss = math.log(perplexity(model, val_windows, materialize(model, idx), batch_size))
        trials.append({"threshold": tau, "removed": 1 - kept_fraction(idx, model), "val_loss": loss})
    best = min(trials, key=lambda t: (t["val_loss"], t["removed"]))  # a tie goes to removing less
    return best["threshold"], trials


@torch.no_grad()
def greedy_by_layer(model: M.Transformer, val_windows: torch.Tensor, propose, batch_size: int = 8):
    """Layer by layer, first to last: try the candidate FFNs that `propose(l)` yields for layer l, as (label, mlp),
    and keep the first that lowers the loss on `val_windows` given the choices already kept; else keep the layer
    dense. Each step is checked exactly. Returns the kept (label, mlp) per layer (None = dense) and every trial.

    Cost: a trial at layer l runs layers l..L-1 only: the residual stream entering l is kept per batch."""
    L, device = model.config.n_layer, model.tok_emb.weight.device
    batches = [val_windows[i:i + batch_size].to(device) for i in range(0, len(val_windows), batch_size)]
    state = [list(model.embed(x)) for x in batches]  # [h (B, T, C) entering the current layer, rope, mask]
    n_pred = sum(x[:, 1:].numel() for x in batches)

    def val_loss(l, mlp):  # mean NLL with `mlp` at layer l, the kept choices before it, dense after it
        mlps = [None] * L
        mlps[l] = mlp
        total = 0.0
        for x, (h, rope, mask) in zip(batches, state):
            logits = model.head(model.run_layers(h, rope, mask, l, None, mlps=mlps))  # (B, T, V)
            total += float(next_token_nll(logits, x, reduction="sum"))
        return total / n_pred

    best, trials, chosen = val_loss(0, None), [], [None] * L
    for l in tqdm(range(L), desc="greedy", leave=False):
        for label, mlp in propose(l):
            loss = val_loss(l, mlp)
            trials.append({"layer": l, "removed": len(label), "val_loss": loss, "accepted": loss < best})
            if loss < best:
                chosen[l], best = (label, mlp), loss
                break
        mlps = [None] * L
        mlps[l] = chosen[l][1] if chosen[l] else None
        for st in state:  # advance the kept residual streams through layer l as decided
            st[0] = model.run_layers(st[0], st[1], st[2], l, l + 1, mlps=mlps)
    return chosen, trials


def greedy_layers(model: M.Transformer, scores: torch.Tensor, val_windows: torch.Tensor,
                  protected: torch.Tensor | None = None, batch_size: int = 8) -> tuple[list[torch.Tensor], list[dict]]:
    """--auto greedy: layer by layer (`greedy_by_layer`), remove the layer's GREEDY_BLOCKS[0] fraction of
    lowest-scoring neurons (for a signed score such as taylor, only those estimated to help: score < 0) if that
    lowers the validation loss given the removals already kept; else try the next, smaller block; else keep the
    layer whole. Removals that interact (several layers correcting the same excess, where removing all of them at
    once overshoots) are not all taken. Returns index sets and every trial."""
    L, n = scores.shape
    s = scores.float().clone()
    if protected is not None:
        s[protected] = float("inf")
    bound = 0.0 if bool((scores < 0).any()) else float("inf")  # signed score: only estimated-helpful removals

    def propose(l):
        for frac in GREEDY_BLOCKS:
            low = s[l].argsort()[:max(1, round(frac * n))]
            low = low[s[l, low] < bound]
            if len(low) == 0:
                return
            keep = torch.ones(n, dtype=torch.bool)
            keep[low] = False
            yield low, model.layers[l].mlp.select(keep.nonzero().flatten())

    chosen, trials = greedy_by_layer(model, val_windows, propose, batch_size)
    full = torch.arange(n)
    return [full if c is None else full[~torch.isin(full, c[0].cpu())] for c in chosen], trials


# ----------------------------------------------------------------------------- DOWP step 5: DSS-Experts

def materialize(model: M.Transformer, indices: list) -> list[nn.Module]:
    """Compact per-layer FFNs (MLP.select: gathered rows/columns, smaller matmuls) to pass as `mlps=`.

    A None entry, or an index set holding every neuron, keeps that layer's original dense MLP."""
    if len(indices) != model.config.n_layer:
        raise UserError(f"{len(indices)} index sets for a model with {model.config.n_layer} layers")
    out = []
    for blk, idx in zip(model.layers, indices):
        if idx is None or len(idx) == blk.mlp.n_neurons:
            out.append(blk.mlp)
        else:
            out.append(blk.mlp.select(idx))
    return out


class MaskedMLP(nn.Module):
    """reference: no speedup. The same expert as a 0/1 mask over the full FFN's activations (for teaching and
    for the equivalence test: it must equal the compact `materialize`d MLP)."""

    def __init__(self, mlp: M.MLP, idx: torch.Tensor):
        super().__init__()
        self.mlp = mlp
        mask = torch.zeros(mlp.n_neurons, dtype=mlp.up.weight.dtype, device=mlp.up.weight.device)
        mask[idx] = 1
        self.register_buffer("mask", mask)  # (F,)

    def forward(self, x):
        return self.mlp.project(self.mlp.neurons(x) * self.mask)


def kept_fraction(indices: list, model: M.Transformer) -> float:
    """Fraction of the model's FFN neurons an index set keeps (None = dense layer)."""
    F_ = model.config.n_ffn
    kept = sum(F_ if idx is None else len(idx) for idx in indices)
    return kept / (F_ * model.config.n_layer)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / max(1, len(sa | sb))


# --- the experts file

def save_experts(path, experts: dict[str, list[torch.Tensor]], meta: dict, baselines: dict | None = None,
                 stats: dict[str, dict] | None = None):
    """Write one safetensors file: "{domain}.{layer}", "baseline.{name}.{layer}" (int64 sorted indices),
    "stats.{domain}.{stat}" (float32 (L, F)); metadata "free_moe" = JSON (meta + domains + checksum)."""
    tensors = {}
    for d, idxs in experts.items():
        for l, idx in enumerate(idxs):
            tensors[f"{d}.{l}"] = torch.as_tensor(idx, dtype=torch.int64)
    for b, idxs in (baselines or {}).items():
        for l, idx in enumerate(idxs):
            tensors[f"baseline.{b}.{l}"] = torch.as_tensor(idx, dtype=torch.int64)
    for d, st in (stats or {}).items():
        for k, v in st.items():
            tensors[f"stats.{d}.{k}"] = v.reshape(1) if k == "count" else v.float()  # safetensors: no 0-d
    meta = dict(meta, format=EXPERTS_FORMAT, domains=list(experts), baselines=list(baselines or {}),
                stats_domains=list(stats or {}), content_sha256=ckpt.content_sha256(tensors))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_safetensors(path, tensors, {"free_moe": json.dumps(meta)})


@dataclass
class Experts:
    """A loaded experts file, validated against `model`. `.mlps(name)` gives compact per-layer FFNs:
    a domain name -> that domain's DSS-Expert; otherwise a stored baseline (random, magnitude, mixed, and the
    general-text Wanda baseline as "baseline.general" since "general" names the general-domain expert)."""
    domains: list[str]
    indices: dict[str, list[torch.Tensor]]
    meta: dict
    baselines: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)
    model: M.Transformer | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def index_sets(self, name: str) -> list[torch.Tensor]:
        if name in self.indices:
            return self.indices[name]
        key = name.removeprefix("baseline.")
        if key in self.baselines:
            return self.baselines[key]
        raise UserError(f"experts file has no expert or baseline {name!r} "
                          f"(domains: {', '.join(self.domains)}; baselines: {', '.join(self.baselines) or 'none'})")

    def mlps(self, name: str) -> list[nn.Module]:
        if name not in self._cache:
            self._cache[name] = materialize(self.model, self.index_sets(name))
        return self._cache[name]


def load_experts(path, model: M.Transformer) -> Experts:
    """Read and validate an experts file against `model`: format, fingerprint, layer count, width, every index
    set (1-D, sorted, unique, in range, all layers present) and the content checksum. A mismatch is a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"experts file {path} does not exist (run purify.py first)")
    try:
        tensors, md = ckpt.read_safetensors(path, with_metadata=True)
    except UserError:
        raise
    except Exception as e:  # a damaged file can fail in many ways inside the parser
        raise UserError(f"{path}: not a readable experts file ({type(e).__name__}: {e})") from None
    try:
        meta = json.loads(md["free_moe"])
    except (KeyError, json.JSONDecodeError):
        raise UserError(f"{path}: no free-moe metadata (not an experts file from purify.py)") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: free-moe metadata is a JSON {type(meta).__name__}, expected an object")
    if meta.get("format") != EXPERTS_FORMAT:
        raise UserError(f"{path}: format {meta.get('format')!r}, expected {EXPERTS_FORMAT!r}")
    cfg = model.config
    if meta.get("fingerprint") != model.fingerprint:
        raise UserError(f"{path}: built for model fingerprint {meta.get('fingerprint')}, but the loaded model is "
                          f"{model.fingerprint} ({cfg.name}); re-run purify.py for this model")
    if meta.get("n_layer") != cfg.n_layer or meta.get("n_ffn") != cfg.n_ffn:
        raise UserError(f"{path}: built for {meta.get('n_layer')} layers x {meta.get('n_ffn')} neurons, "
                          f"model has {cfg.n_layer} x {cfg.n_ffn}")
    if ckpt.content_sha256(tensors) != meta.get("content_sha256"):
        raise UserError(f"{path}: checksum mismatch: the file is corrupted or was edited")
    for k in ("domains", "baselines", "stats_domains"):  # the names the tensors are looked up by
        names = meta.get(k, [] if k != "domains" else None)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or (k == "domains" and not names):
            raise UserError(f"{path}: free-moe metadata {k!r} is {names!r}, expected a list of names")

    def index_list(prefix: str) -> list[torch.Tensor]:
        out = []
        for l in range(cfg.n_layer):
            t = tensors.get(f"{prefix}.{l}")
            if t is None:
                raise UserError(f"{path}: missing index set {prefix}.{l}")
            if t.dtype != torch.int64 or t.ndim != 1 or len(t) == 0:
                raise UserError(f"{path}: index set {prefix}.{l} must be non-empty 1-D int64")
            if int(t.min()) < 0 or int(t.max()) >= cfg.n_ffn or not bool((t[1:] > t[:-1]).all()):
                raise UserError(f"{path}: index set {prefix}.{l} is not sorted unique indices in [0, {cfg.n_ffn})")
            out.append(t.clone())
        return out

    indices = {d: index_list(d) for d in meta["domains"]}
    baselines = {b: index_list(f"baseline.{b}") for b in meta.get("baselines", [])}
    stats = {}
    for d in meta.get("stats_domains", []):
        st = {k: tensors.get(f"stats.{d}.{k}") for k in STATS + ("count",)}
        missing = [k for k, v in st.items() if v is None]
        if missing:
            raise UserError(f"{path}: statistics of {d} lack {', '.join(missing)}")
        for k in STATS:
            if tuple(st[k].shape) != (cfg.n_layer, cfg.n_ffn):
                raise UserError(f"{path}: stats.{d}.{k} has shape {tuple(st[k].shape)}, "
                                  f"expected {(cfg.n_layer, cfg.n_ffn)}")
        stats[d] = {k: v.clone().reshape(()) if k == "count" else v.clone() for k, v in st.items()}
    return Experts(list(meta["domains"]), indices, meta, baselines, stats, model)


def baseline_indices(method: str, model: M.Transformer, stats, keep, seed: int = 0,
                     protect_factor: float | None = None) -> list[torch.Tensor]:
    """A baseline's index sets at ANY keep, rebuilt from saved statistics (`stats`: an experts file path, an
    Experts, or {domain: stats}). protect_factor: super-neuron factor (None = the one the file was built with)."""
    if isinstance(stats, (str, Path)):
        stats = load_experts(stats, model)
    if isinstance(stats, Experts):
        if protect_factor is None:
            protect_factor = float(stats.meta.get("protect", PROTECT_FACTOR))
        stats = stats.stats
    if method not in BASELINES:
        raise UserError(f"unknown baseline {method!r} (expected one of {', '.join(BASELINES)})")
    protect_factor = PROTECT_FACTOR if protect_factor is None else protect_factor
    protected = super_neurons(stats, protect_factor) if stats else None
    return select_neurons(score_neurons(stats, model, method, seed=seed), keep, protected)


# ----------------------------------------------------------------------------- DOWP step 6: export

def hf_state_dict(model: M.Transformer, mlps: list[M.MLP]) -> dict[str, torch.Tensor]:
    """Our weights, with the given per-layer FFNs in place of the dense ones, under HF names (checkpoints.to_hf)."""
    sd = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i, mlp in enumerate(mlps):
        sd.update({f"layers.{i}.mlp.{k}": v for k, v in mlp.state_dict().items()})
    return ckpt.to_hf({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}, model.config)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model")


def export_hf(model: M.Transformer, indices: list[torch.Tensor], out_dir, tokenizer_dir=None, meta: dict | None = None,
              tokenizer_files: dict[str, str] | None = None):
    """DOWP step 6: write one expert as a plain HF checkpoint: config.json (intermediate_size = k) +
    model.safetensors, plus tokenizer files copied from `tokenizer_dir`, or written from `tokenizer_files`
    ({name: text}, e.g. tokenizer.hf_tokenizer_files of a GGUF), when given (else none: the checkpoint then loads
    in transformers with a tokenizer from elsewhere, and in model.load_model not at all)."""
    ks = sorted({model.config.n_ffn if i is None else len(i) for i in indices})
    if len(ks) != 1:
        raise UserError(f"export needs the same number of kept neurons in every layer (HF has one "
                          f"intermediate_size), got {ks[0]}..{ks[-1]}; use uniform allocation")
    cfg = M.Config(**{**asdict(model.config), "n_ffn": ks[0]})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = ckpt.config_to_hf(cfg)
    hf["torch_dtype"] = "float32"
    hf["free_moe"] = meta or {}
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    ckpt.write_safetensors(out_dir / "model.safetensors", hf_state_dict(model, materialize(model, indices)),
                        {"format": "pt"})
    copied = []
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
                copied.append(name)
    for name, text in (tokenizer_files or {}).items():
        if name not in copied:
            (out_dir / name).write_text(text, encoding="utf-8")
            copied.append(name)
    return copied


def gguf_tokenizer_files(path) -> dict[str, str]:
    """HF tokenizer files for an export from a GGUF model (byte-level BPE vocabularies; none for SentencePiece)."""
    meta, _ = gguf_file.read_gguf(Path(path), tensors=False)
    try:
        return hf_tokenizer_files(meta)
    except UserError:
        return {}


# ------------------------------------------------------------------------- DOWP step 7: report (held-out perplexity)

def next_token_nll(logits: torch.Tensor, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token prediction: logits (B, T, V) at positions 0..T-2 score the tokens x (B, T) at
    1..T-1 (every position but the first of a window is predicted). reduction as in F.cross_entropy."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def perplexity(model: M.Transformer, windows: torch.Tensor, mlps=None, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over all windows (N, T); every position but the first of a window is predicted."""
    device = model.tok_emb.weight.device
    total, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size].to(device)  # (B, T)
        logits = model(x, mlps=mlps)  # (B, T, V)
        total += float(next_token_nll(logits, x, reduction="sum"))
        n += x[:, 1:].numel()
    return math.exp(total / n)


def layer_sensitivity(model: M.Transformer, windows: torch.Tensor, scores: torch.Tensor, keep: float,
                      protected: torch.Tensor | None = None, batch_size: int = 8) -> torch.Tensor:
    """DOWP step 4 (optional): how much the calibration loss grows when ONLY layer l is purified to `keep`
    (by `scores`): log ppl(purified l) - log ppl(dense), one number per layer, (L,). Costs L + 1 passes."""
    base = math.log(perplexity(model, windows, None, batch_size))
    idx = select_neurons(scores, keep, protected)
    out = []
    for l in tqdm(range(model.config.n_layer), desc="layer sensitivity", leave=False):
        mlps = [blk.mlp for blk in model.layers]
        mlps[l] = model.layers[l].mlp.select(idx[l])
        out.append(math.log(perplexity(model, windows, mlps, batch_size)) - base)
    return torch.tensor(out)


# ----------------------------------------------------------------- DOWP step 7: report (the matrix, overlap, caches)

def load_or_collect_stats(model, windows, spec: str, out_dir: Path, batch_size: int, key: dict) -> dict:
    """Statistics of one domain, cached in out_dir/stats.{name}.safetensors: a re-run with the same model, data
    and budget reuses them (so a killed run resumes after the last finished domain)."""
    name = data.parse_domain(spec)[0]
    path = out_dir / f"stats.{name}.safetensors"
    if path.exists():
        try:  # checksummed: a damaged cache would silently change every expert built from it
            tensors, md = ckpt.read_safetensors(path, with_metadata=True, checksum=True)
            shape = (model.config.n_layer, model.config.n_ffn)
            if (json.loads(md.get("key", "{}")) == key and all(k in tensors for k in STATS + ("count",))
                    and all(tuple(tensors[k].shape) == shape for k in STATS)):
                return {k: tensors[k].clone().reshape(()) if k == "count" else tensors[k].clone()
                        for k in STATS + ("count",)}
        except (UserError, json.JSONDecodeError) as e:
            print(f"not reusing the statistics cache ({e}): recomputing", file=sys.stderr)
    t0 = time.perf_counter()
    stats = collect_stats(model, windows, batch_size, desc=f"stats {name}")
    print(f"stats {name}: {int(stats['count'])} tokens in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    ckpt.write_safetensors(path, {**stats, "count": stats["count"].reshape(1)}, {"key": json.dumps(key)},
                           checksum=True)
    return stats


def index_hash(indices: list) -> str:
    return ckpt.content_sha256({str(l): torch.as_tensor(i) for l, i in enumerate(indices) if i is not None})[:16]


class RowCache:
    """Perplexity rows written to a JSON file as they finish (atomically), keyed by the index sets' hash, so a
    killed report resumes without recomputing finished rows."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key = path, key
        self.rows = {}
        if path.exists():
            try:
                saved = json.loads(path.read_text())
                if saved.get("key") == key:
                    self.rows = saved["rows"]
            except (json.JSONDecodeError, KeyError):
                pass

    def get(self, model, heldout, indices, batch_size, desc) -> dict[str, float]:
        """{domain: perplexity} of one index set on the given held-out windows; only missing cells are run."""
        row = self.rows.setdefault(index_hash(indices), {})
        missing = [d for d in heldout if d not in row]
        if missing:
            mlps = materialize(model, indices)
            for d in tqdm(missing, desc=desc, leave=False):
                row[d] = perplexity(model, heldout[d], mlps, batch_size)
                tmp = self.path.with_suffix(".tmp")  # after every cell: a killed run loses at most one
                tmp.write_text(json.dumps({"key": self.key, "rows": self.rows}))
                tmp.replace(self.path)
        return {d: row[d] for d in heldout}


def markdown_table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def matrix_markdown(matrix: dict[str, dict[str, float]], domains: list[str], fractions: dict[str, float]) -> str:
    """Rows = systems, columns = held-out domains; the best non-dense value of each column in bold."""
    best = {d: min(v[d] for r, v in matrix.items() if r != "dense") for d in domains}
    rows = []
    for r, v in matrix.items():
        cells = [f"**{v[d]:.2f}**" if r != "dense" and v[d] == best[d] else f"{v[d]:.2f}" for d in domains]
        rows.append([r, f"{fractions[r]:.3f}"] + cells)
    return markdown_table(["system \\ held-out", "active"] + domains, rows)


def pyplot():
    """matplotlib.pyplot drawing to files (no display), or None: matplotlib is a dev-only extra, plots are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: Path, dpi: int) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return True


def plot_matrix(matrix: dict, domains: list[str], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    names = list(matrix)
    vals = torch.tensor([[math.log(matrix[r][d]) for d in domains] for r in names])
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(domains), 1 + 0.45 * len(names)))
    ax.imshow(vals.numpy(), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(names)), names)
    for i, r in enumerate(names):
        for j, d in enumerate(domains):
            ax.text(j, i, f"{matrix[r][d]:.1f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title("held-out perplexity (columns) of each expert / baseline (rows)")
    return save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = ArgumentParser(description="DOWP: purify FFN neurons per domain into DSS-Experts.",
                       formatter_class=DefaultsHelpFormatter)
    add_common_args(p, out_default="experts")
    p.add_argument("--domains", nargs="+", default=list(data.BUILTIN_DOMAINS),
                   help="domains: built-in names and/or NAME=path.txt|.jsonl")
    p.add_argument("--domain", action="append", default=[], metavar="NAME=PATH",
                   help="an extra user domain (repeatable)")
    p.add_argument("--keep", type=fraction, default=0.5, help="fraction of FFN neurons kept (per layer, or on average)")
    p.add_argument("--alloc", choices=("uniform", "sensitivity"), default="uniform",
                   help="per-layer budget: the same keep everywhere, or more for layers measured to be sensitive")
    p.add_argument("--auto", choices=("threshold", "greedy"), default=None,
                   help="instead of --keep/--alloc: choose what to remove by the loss on a quarter of the "
                        "calibration text (see the docstring)")
    p.add_argument("--score", choices=SCORES, default="dowp", help="score used to build the domain experts")
    p.add_argument("--contrast", type=float, default=DEFAULT_CONTRAST, help="DOWP contrast lambda (0 = plain Wanda)")
    p.add_argument("--sweep-contrast", type=float, nargs="*", default=None, metavar="LAM",
                   help="also report the perplexity matrix of the domain experts for each of these lambdas")
    p.add_argument("--protect", type=nonneg_float, default=PROTECT_FACTOR,
                   help="super neurons: max|a| > this x layer median are always kept (0 = off)")
    p.add_argument("--tokens", type=positive_int, default=32768, help="calibration tokens per domain")
    p.add_argument("--heldout-tokens", type=positive_int, default=16384,
                   help="held-out tokens per domain for the report")
    p.add_argument("--seq-len", type=int_at_least(2), default=512, help="tokens per window")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    p.add_argument("--no-report", action="store_true", help="skip the perplexity report")
    p.add_argument("--plot", action="store_true", help="also write report.png (needs matplotlib)")
    p.add_argument("--export", type=out_dir, default=None, metavar="DIR",
                   help="write one domain expert as an HF checkpoint here")
    p.add_argument("--export-domain", default=None, help="which domain to export (default: the first)")
    args = p.parse_args(argv)
    if args.auto and args.alloc != "uniform":
        raise UserError("--auto chooses the budget itself; it does not combine with --alloc")
    if args.tokens < args.seq_len or args.heldout_tokens < args.seq_len:
        raise UserError(f"--tokens/--heldout-tokens must be at least --seq-len ({args.seq_len})")
    specs = list(args.domains) + list(args.domain)
    names = [data.parse_domain(s)[0] for s in specs]  # validates every name (and path syntax) before loading anything
    if len(set(names)) != len(names):
        raise UserError(f"duplicate domain names in {names}")
    for s in specs:
        path = data.parse_domain(s)[1]
        if path is not None and not path.exists():
            raise UserError(f"domain file {path} does not exist")
    if args.export_domain is not None and args.export_domain not in names:
        raise UserError(f"--export-domain {args.export_domain!r} is not one of the domains {names}")
    args.specs, args.names = specs, names
    return args


def build_experts(stats, model, names, score, keep, contrast, protected, seed):
    return {d: select_neurons(score_neurons(stats, model, score, d, contrast, seed), keep, protected) for d in names}


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = M.load_for_cli(args)
    cfg = model.config

    # DOWP step 1: calibration windows (and held-out windows, kept apart, for the report)
    calib = {n: data.load_domain_tokens(s, tok, args.data_dir, "calib", args.tokens, args.seed, args.seq_len)
             for n, s in zip(args.names, args.specs)}
    val = {}  # --auto: the last quarter of each domain's calibration windows chooses the threshold, the rest scores
    if args.auto:
        if min(len(w) for w in calib.values()) < 2:
            raise UserError(f"--auto needs at least 2 calibration windows per domain (--tokens >= {2 * args.seq_len})")
        val = {n: w[len(w) - max(1, len(w) // 4):] for n, w in calib.items()}
        calib = {n: w[:len(w) - len(val[n])] for n, w in calib.items()}
    # DOWP step 2: statistics, one streamed pass per domain (cached per domain)
    stats = {}
    for n, s in zip(args.names, args.specs):
        key = {"fingerprint": model.fingerprint, "domain": s, "tokens": args.tokens, "seed": args.seed,
               "seq_len": args.seq_len, "n_windows": len(calib[n]),
               "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch.")}  # resolved: auto is bf16 or fp32
        stats[n] = load_or_collect_stats(model, calib[n], s, out_dir, args.batch_size, key)
        if args.score == "taylor":  # the loss-aware pass (a forward + backward per batch; not cached)
            t0 = time.perf_counter()
            stats[n]["taylor"] = loss_aware_stats(model, calib[n], max(1, args.batch_size // 4), desc=f"taylor {n}")[
                "taylor"]
            print(f"taylor {n}: {calib[n].numel()} tokens in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    # DOWP step 4: protection and budget
    protected = super_neurons(stats, args.protect)  # (L, F) bool: the super neurons every method keeps
    n_protected = int(protected.sum())
    print(f"protected super neurons: {n_protected} "
          f"({', '.join(f'L{l}:{int(c)}' for l, c in enumerate(protected.sum(1)) if c)})", file=sys.stderr)
    keep = args.keep
    sens = None
    if args.alloc == "sensitivity":
        probe = torch.cat([w[:2] for w in calib.values()])  # (2D, T) a little of every domain
        sens = layer_sensitivity(model, probe, score_neurons(stats, model, "mixed"), args.keep, protected,
                                 args.batch_size)
        keep = allocate_keep(sens, args.keep)

    # DOWP step 3 + 5: scores -> DSS-Experts; baselines at the same per-layer budget
    auto = {}
    if args.auto:  # chosen per domain on that domain's validation windows
        experts = {}
        for d in args.names:
            scores = score_neurons(stats, model, args.score, d, args.contrast, args.seed)
            if args.auto == "threshold":
                tau, trials = auto_threshold(model, scores, val[d], protected, args.batch_size)
                experts[d], auto[d] = select_above(scores, tau, protected), {"threshold": tau, "trials": trials}
            else:
                experts[d], trials = greedy_layers(model, scores, val[d], protected, args.batch_size)
                auto[d] = {"trials": trials}
            print(f"auto {d}: removes {1 - kept_fraction(experts[d], model):.4f} of the neurons", file=sys.stderr)
        keep = sum(kept_fraction(e, model) for e in experts.values()) / len(experts)  # baselines: the mean budget
    else:
        experts = build_experts(stats, model, args.names, args.score, keep, args.contrast, protected, args.seed)
    baselines = {b: select_neurons(score_neurons(stats, model, b, seed=args.seed), keep, protected)
                 for b in BASELINES if b != "general" or "general" in stats}
    meta = {"fingerprint": model.fingerprint, "model": cfg.name, "n_layer": cfg.n_layer, "n_ffn": cfg.n_ffn,
            "score": args.score, "contrast": args.contrast, "keep": keep if args.auto else args.keep,
            "alloc": f"auto {args.auto}" if args.auto else args.alloc, "auto": auto,
            "keep_per_layer": keep if isinstance(keep, list) else [keep] * cfg.n_layer,
            "protect": args.protect, "n_protected": n_protected, "seed": args.seed, "seq_len": args.seq_len,
            "domain_specs": dict(zip(args.names, args.specs)),
            "tokens": {n: int(stats[n]["count"]) for n in args.names},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    experts_path = out_dir / "experts.safetensors"
    save_experts(experts_path, experts, meta, baselines, stats)
    print(f"wrote {experts_path}: {len(experts)} experts, active fraction "
          f"{kept_fraction(next(iter(experts.values())), model):.3f}", file=sys.stderr)

    # DOWP step 6: export
    if args.export:
        d = args.export_domain or args.names[0]
        tok_dir, tok_files = None, None
        path = M.default_model_path() if args.model is None else Path(args.model)
        if path.is_dir():
            tok_dir = path
        elif path.suffix == ".gguf" and path.is_file():  # the tokenizer lives inside the GGUF: write it out
            tok_files = gguf_tokenizer_files(path)
        copied = export_hf(model, experts[d], args.export, tok_dir, {"domain": d, **meta}, tok_files)
        print(f"exported expert {d} to {args.export} (tokenizer files: {', '.join(copied) or 'none'})",
              file=sys.stderr)

    if not args.no_report:
        report(args, model, tok, stats, experts, baselines, protected, keep, sens, meta, out_dir)


def report(args, model, tok, stats, experts, baselines, protected, keep, sens, meta, out_dir: Path):
    """DOWP step 7: cross-domain perplexity matrix, expert overlap, protection ablation; markdown + JSON."""
    names = args.names
    heldout = {n: data.load_domain_tokens(s, tok, args.data_dir, "heldout", args.heldout_tokens, 0, args.seq_len)
               for n, s in zip(args.names, args.specs)}
    cache = RowCache(out_dir / "report.rows.json", {"fingerprint": model.fingerprint, "specs": args.specs,
                                                    "heldout_tokens": args.heldout_tokens, "seq_len": args.seq_len})
    bs = args.batch_size
    systems = {f"expert:{d}": experts[d] for d in names}
    systems["dense"] = [None] * model.config.n_layer
    systems.update({f"baseline:{b}": idx for b, idx in baselines.items()})
    if args.protect > 0:  # the protection ablation: random at the same budget without its super neurons
        systems["baseline:random (unprotected)"] = select_neurons(score_random(model, args.seed), keep, None)
    # baselines and dense first: they do not depend on the DOWP knobs, so a re-run with another --contrast
    # finds them in the cache
    order = sorted(systems, key=lambda r: r.startswith("expert:"))
    done = {r: cache.get(model, heldout, systems[r], bs, r) for r in tqdm(order, desc="ppl matrix")}
    matrix = {r: done[r] for r in systems}  # (display order)
    fractions = {r: kept_fraction(idx, model) for r, idx in systems.items()}

    sweep = {}  # the contrast sweep scores each expert on its own domain only (D runs per lambda, not D x D)
    for lam in args.sweep_contrast or []:
        ex = build_experts(stats, model, names, "dowp", keep, lam, protected, args.seed)
        sweep[str(lam)] = {d: cache.get(model, {d: heldout[d]}, ex[d], bs, f"lam={lam} {d}")[d] for d in names}

    L = model.config.n_layer
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    jac = {f"{a}|{b}": [jaccard(experts[a][l], experts[b][l]) for l in range(L)] for a, b in pairs}
    diag_ok = {d: all(matrix[f"expert:{d}"][d] < matrix[f"expert:{e}"][d] for e in names if e != d) for d in names}
    # "same" when the expert IS the baseline (at contrast 0 the general expert equals the general baseline)
    vs = lambda b: {d: "same" if index_hash(experts[d]) == index_hash(baselines[b]) else
                    matrix[f"expert:{d}"][d] < matrix[f"baseline:{b}"][d] for d in names}
    summary = {"diagonal_best": diag_ok, **{f"beats_{b}": vs(b) for b in baselines}}
    result = {"meta": meta, "heldout_tokens": {d: int(w.numel()) for d, w in heldout.items()},
              "matrix": matrix, "active_fraction": fractions, "summary": summary, "jaccard_per_layer": jac,
              "protected_per_layer": protected.sum(1).tolist(), "n_protected": int(protected.sum()),
              "contrast_sweep": sweep, "layer_sensitivity": sens.tolist() if sens is not None else None}
    tmp = out_dir / "report.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out_dir / "report.json")

    md = [f"# DOWP report: {meta['model']} (fingerprint {meta['fingerprint']})", "",
          f"score `{meta['score']}` (contrast λ = {meta['contrast']}), keep {meta['keep']} ({meta['alloc']}), "
          f"protect factor {meta['protect']} -> {result['n_protected']} super neurons always kept; "
          f"calibration tokens {meta['tokens']}; held-out tokens {result['heldout_tokens']}.", "",
          "## Held-out perplexity (rows: system, columns: held-out text; bold = best non-dense)", "",
          matrix_markdown(matrix, names, fractions), ""]
    yes_no = lambda v: v if isinstance(v, str) else "yes" if v else "NO"
    md += ["## Summary (expert of domain d vs the others / each baseline, on d's held-out text)", "",
           markdown_table(["check"] + names, [[k] + [yes_no(v[d]) for d in names] for k, v in summary.items()]), ""]
    if sweep:
        md += ["## Contrast sweep (each domain expert on its own held-out text; λ = 0 is plain Wanda per domain)", ""]
        rows = []
        for lam, per in sweep.items():
            diag = [per[d] for d in names]
            rows.append([lam] + diag + [math.exp(sum(map(math.log, diag)) / len(diag))])
        md += [markdown_table(["λ"] + [f"{d} on {d}" for d in names] + ["geo-mean"], rows), ""]
    md += ["## Expert overlap (Jaccard of kept sets, mean over layers)", ""]
    md += [markdown_table([""] + names, [[a] + [1.0 if a == b else sum(jac.get(f"{a}|{b}", jac.get(f"{b}|{a}", [0])))
                                                / L for b in names] for a in names]), ""]
    per_layer = [sum(v[l] for v in jac.values()) / max(1, len(jac)) for l in range(L)]
    md += ["Mean pairwise Jaccard per layer: " + " ".join(f"{v:.2f}" for v in per_layer), ""]
    md += ["Protected neurons per layer: " + ", ".join(f"L{l}: {c}" for l, c in
                                                        enumerate(result["protected_per_layer"]) if c), ""]
    if args.plot:
        md += ["![matrix](report.png)" if plot_matrix(matrix, names, out_dir / "report.png")
               else "(--plot: matplotlib is not installed, no PNG written)", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    run_cli(main)
