"""search.py — DOWP step 4 by measurement: choose what to remove by the loss on held-back calibration text.

Used by purify.py (--auto threshold|greedy, --alloc sensitivity) and purify_sweep.py. Held-out text is never used
to choose: the caller passes validation windows cut from the calibration split (purify.py: its last quarter).

    auto_threshold    one global score threshold, the candidate with the lowest validation loss
    greedy_by_layer   layer by layer, keep the first proposed smaller FFN that lowers the validation loss
    greedy_layers     greedy_by_layer over neuron removals by a score (signed scores: only estimated-helpful ones)
    layer_sensitivity how much purifying one layer alone costs, for per-layer budgets (dowp.allocate_keep)

Why validate at all: a first-order score (dowp.loss_aware_stats) ranks single removals well but adds up badly,
so cutting a fixed fraction by it alone is catastrophic; the search uses the score only to order candidates and
the real loss to accept them (docs/beat-dense.md has the measurements).

Shape legend: B batch, T time, C width, L layers, F FFN neurons, N windows.
"""
from __future__ import annotations

import math

import torch

import model as M
from cli import progress
from dowp import select_above, select_neurons
from experts import kept_fraction, materialize
from scoring import next_token_nll, perplexity

AUTO_REMOVE = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)  # --auto: candidate fractions of all neurons removed
GREEDY_BLOCKS = (0.01, 0.0025)  # --auto greedy: fractions of a layer tried for removal, largest first

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
    for l in progress(range(L), desc="greedy", leave=False):
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


def layer_sensitivity(model: M.Transformer, windows: torch.Tensor, scores: torch.Tensor, keep: float,
                      protected: torch.Tensor | None = None, batch_size: int = 8) -> torch.Tensor:
    """DOWP step 4 (optional): how much the calibration loss grows when ONLY layer l is purified to `keep`
    (by `scores`): log ppl(purified l) - log ppl(dense), one number per layer, (L,). Costs L + 1 passes."""
    base = math.log(perplexity(model, windows, None, batch_size))
    idx = select_neurons(scores, keep, protected)
    out = []
    for l in progress(range(model.config.n_layer), desc="layer sensitivity", leave=False):
        mlps = [blk.mlp for blk in model.layers]
        mlps[l] = model.layers[l].mlp.select(idx[l])
        out.append(math.log(perplexity(model, windows, mlps, batch_size)) - base)
    return torch.tensor(out)
