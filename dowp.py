"""dowp.py — the DOWP library: what Domain-Oriented Weight Purification computes about FFN neurons.

Used by purify.py (the command line that builds DSS-Experts), purify_sweep.py and experts.py (baselines rebuilt from
saved statistics). No file is written here; purify.py caches and saves.

    DOWP step 2  statistics: `collect_stats`, one streamed pass per domain through recording FFNs
                 (`model(idx, mlps=[...])`): for every layer l and neuron j the mean |a_j|, mean a_j^2, firing rate
                 and max |a_j|, plus ||W_down[:, j]||; memory O(L x F), never O(tokens). `loss_aware_stats`: the
                 first-order change of the domain's loss when a neuron (or one FFN weight) is removed.
    DOWP step 3  scores (`score_neurons`): dowp = `domain_importance` (structured Wanda on the domain's text),
                 optionally contrasted with the other domains (`score_dowp`, λ = --contrast); taylor = the loss-aware
                 estimate, which has a sign; baselines random, magnitude, general, mixed.
    DOWP step 4  budget: `select_neurons` keeps the top round(keep_l x F) of every layer, `allocate_keep` moves
                 budget between layers by measured sensitivity, `select_above` cuts at one global threshold;
                 `super_neurons` are always kept. (search.py chooses a budget by validation loss.)

All choices in one place:
    score (dowp)  S_d = I~_d * (I~_d / mean_e I~_e) ** λ, where I~_d is domain_importance I_d divided by its layer
                  mean (so a domain with larger activations overall does not dominate the contrast). λ = 0 is plain
                  Wanda on the domain's text, the default: own-domain perplexity gets worse with every λ > 0
                  (docs/method.md has the sweep). A neuron that matters for every domain has ratio ~1 and keeps
                  its full importance; one that matters only for other domains has ratio << 1 and is purified.
    score (taylor) dL_j ~ -sum_t a_j,t * dL/da_j,t / n: first-order change of the mean next-token loss L on the
                  domain's calibration text when neuron j is removed (a_j = 0). One backward per batch, gradients
                  w.r.t. the activations only. Unlike dowp it has a sign: dL_j < 0 means removal should lower L.
    baselines     random (uniform scores, seeded), magnitude (weights only: ||[W_up; W_gate][j]|| * ||W_down[:, j]||),
                  general (Wanda on general text only), mixed (Wanda on all domains' calibration text pooled).
                  Each is ONE mask for every input, at the same per-layer budget; mixed is the fair comparison.
    super neurons neuron j of layer l is protected when its max |a_j| over all calibration tokens exceeds
                  PROTECT_FACTOR x the median over the layer's neurons of max |a|. They are kept by every method.
    firing rate   a neuron "fires" on a token when |a_j| > FIRE_REL x the token's RMS activation over the layer.
    budget        k_l = round(keep_l * F), at least 1; sensitivity allocation moves budget between layers
                  (`allocate_keep`) keeping the mean keep fraction.

Shape legend: B batch, T time, C width, L layers, F FFN neurons, D domains, k kept neurons, N windows.
"""
from __future__ import annotations

import torch
import torch.nn as nn

import model as M
from cli import UserError, progress
from scoring import next_token_nll

BASELINES = ("random", "magnitude", "general", "mixed")
SCORES = ("dowp", "taylor", "taylor_abs") + BASELINES
STATS = ("mean_abs", "mean_sq", "fire_rate", "max_abs", "down_norm")  # each (L, F); plus "count" (tokens)
DEFAULT_CONTRAST = 0.0  # λ of score_dowp: 0 = plain Wanda on the domain text (docs/method.md: why 0)
PROTECT_FACTOR = 50.0  # super neuron: max |a| above this many times the layer's median max |a|
FIRE_REL = 0.1  # "fires" = |a_j| above this fraction of the token's RMS activation

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
        """x (B, T, C) -> the wrapped FFN's output (B, T, C), unchanged. On the way, for the B*T tokens: count += B*T,
        and per neuron j (float64 sums): sum_abs += sum |a_j|, sum_sq += sum a_j^2, n_fire += the number of tokens
        where |a_j| > FIRE_REL x that token's RMS over the layer's F activations; max_abs = max(max_abs, max |a_j|).
        a = self.mlp.neurons(x), computed once and projected (self.mlp.project) once."""
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
    down_norm = ||W_down[:, j]||; expectations over every token of every window. Each batch of `batch_size`
    windows runs through `model(batch, mlps=[RecordingMLP per layer], last_only=True)`; the result does not depend
    on batch_size. Windows that are not a non-empty (N, T) tensor: UserError."""
    if windows.ndim != 2 or windows.numel() == 0:
        raise UserError(f"need (N, T) token windows, got shape {tuple(windows.shape)}")
    recorders = [RecordingMLP(blk.mlp) for blk in model.layers]
    device = model.tok_emb.weight.device
    for i in progress(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
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

    The neuron's output norm averaged over the tokens: how much it writes into the residual stream. The baselines
    `general` and `mixed` use this fixed score, so editing `domain_importance` never moves them."""
    return stats["mean_sq"].sqrt() * stats["down_norm"]  # (L, F)


def domain_importance(stats: dict) -> torch.Tensor:
    """DOWP step 3: how much neuron (l, j) matters on one domain's text, (L, F); higher = keep first.

    The score a DSS-Expert is built from, and the one to edit to try another (docs/course.md, lab 1). Today it is the
    structured Wanda importance of the domain's statistics, the same formula the one-mask baselines use."""
    return wanda_importance(stats)


def score_dowp(stats_by_domain: dict[str, dict], domain: str, contrast: float = DEFAULT_CONTRAST) -> torch.Tensor:
    """DOWP: S_d = I~_d * (I~_d / mean_e I~_e) ** λ   with I~_e = I_e / mean_j I_e(l, j)  (layer-normalised),
    I = domain_importance.

    λ = 0: Wanda on domain d alone. λ > 0: neurons relatively more important for d than on average across
    all domains gain rank; a neuron equally important everywhere keeps its plain importance; one important
    only for other domains is pushed down (purified). Computed in log space for stability: I~ and the reference
    clamped at 1e-12 before their logs. Returns (L, F). A domain without statistics, or λ < 0: UserError."""
    if domain not in stats_by_domain:
        raise UserError(f"no statistics for domain {domain!r} (have {', '.join(stats_by_domain)})")
    if contrast < 0:
        raise UserError(f"--contrast must be >= 0, got {contrast}")
    eps = 1e-12
    norm = {d: domain_importance(s) for d, s in stats_by_domain.items()}
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
        """x (B, T, C) -> the wrapped FFN's output, unchanged. Keeps its activations a = self.mlp.neurons(x) in
        self.a with their gradient retained (a.retain_grad(); where a needs no gradient yet, as in the first layer
        of a frozen model, a.requires_grad_() first), adds sum over tokens of x_c^2 to in_sq (float64) and B*T to
        count."""
        a = self.mlp.neurons(x)  # (B, T, F)
        if not a.requires_grad:  # first layer of a frozen model: nothing before it needs a gradient, the graph
            a.requires_grad_()  # starts at these activations
        a.retain_grad()
        self.a = a
        self.in_sq += x.detach().float().pow(2).sum((0, 1)).double()
        self.count += x.shape[0] * x.shape[1]
        return self.mlp.project(a)

    def after_backward(self):
        """After loss.backward(): taylor_j -= sum over this batch's tokens of a_j * dL/da_j (float64); self.a = None."""
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
            for i in progress(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
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
    """Scores (L, F) by `method` (dowp, taylor and taylor_abs need `domain`); higher = keep first. taylor_abs is
    |taylor|: how much removing the neuron is estimated to change the loss, either way (the usual first-order
    importance); taylor keeps its sign, so the neurons estimated to help most when removed go first."""
    if method == "random":
        return score_random(model, seed)
    if method == "magnitude":
        return score_magnitude(model)
    if not stats_by_domain:
        raise UserError(f"score {method!r} needs calibration statistics")
    if method in ("dowp", "taylor", "taylor_abs") and domain is None:
        raise ValueError(f"score {method!r} needs a domain")
    if method == "dowp":
        return score_dowp(stats_by_domain, domain, contrast)
    if method in ("taylor", "taylor_abs"):
        if "taylor" not in stats_by_domain.get(domain, {}):
            raise UserError(f"score {method!r} needs the loss-aware statistics of domain {domain!r} (loss_aware_stats)")
        taylor = stats_by_domain[domain]["taylor"]
        return taylor if method == "taylor" else taylor.abs()
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

    keep: a float for every layer, or a list of L floats. protected: (L, F) bool or None. The budget of layer l is
    k = round(keep_l * F) (Python's round), at least 1 and at most F; protected neurons count towards it. Returns
    L long tensors of sorted indices. UserError: a keep outside (0, 1], a list of the wrong length, or more
    protected neurons in a layer than its budget."""
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
