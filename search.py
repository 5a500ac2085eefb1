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
def greedy_by_layer(model: M.Transformer, val_windows: torch.Tensor, propose, batch_size: int = 8,
                    loss_weights: torch.Tensor | None = None):
    """Layer by layer, first to last: try the candidate FFNs that `propose(l)` yields for layer l, as (label, mlp),
    and keep the first that lowers the loss on `val_windows` given the choices already kept; else keep the layer
    dense. Each step is checked exactly. Returns the kept (label, mlp) per layer (None = dense) and every trial.
    loss_weights (N, T): how much each token's prediction counts (1 for the answer tokens of a task, 0 for the
    question and the padding: `task_windows`); None = every token of the text alike.

    The loss is the mean next-token NLL; a candidate is kept only when its loss is strictly lower than the best so
    far (the dense model's loss at the start), and later layers are judged with the kept choices in place. Each
    trial is {"layer": l, "removed": len(label), "val_loss": its loss, "accepted": bool}, in the order tried.

    Cost: a trial at layer l runs layers l..L-1 only: the residual stream entering l is kept per batch."""
    L, device = model.config.n_layer, model.tok_emb.weight.device
    batches, weights = [], []
    for i in range(0, len(val_windows), batch_size):
        x, w = val_windows[i:i + batch_size], None
        if loss_weights is not None:  # cut the padding columns after the batch's last weighted token
            w = loss_weights[i:i + batch_size]
            end = int(w.sum(0).nonzero().max()) + 1 if w.any() else 2
            x, w = x[:, :end], w[:, 1:end].to(device).double()  # (B, T-1): weight of predicting token t+1
        batches.append(x.to(device))
        weights.append(w)
    state = [list(model.embed(x)) for x in batches]  # [h (B, T, C) entering the current layer, rope, mask]
    n_pred = sum(x[:, 1:].numel() if w is None else float(w.sum()) for x, w in zip(batches, weights))

    def val_loss(l, mlp):  # mean NLL with `mlp` at layer l, the kept choices before it, dense after it
        mlps = [None] * L
        mlps[l] = mlp
        total = 0.0
        for x, w, (h, rope, mask) in zip(batches, weights, state):
            logits = model.head(model.run_layers(h, rope, mask, l, None, mlps=mlps))  # (B, T, V)
            if w is None:
                total += float(next_token_nll(logits, x, reduction="sum"))
            else:
                total += float((next_token_nll(logits, x, reduction="none").view_as(w) * w).sum())
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
                  protected: torch.Tensor | None = None, batch_size: int = 8,
                  loss_weights: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[dict]]:
    """--auto greedy: layer by layer (`greedy_by_layer`), remove the layer's GREEDY_BLOCKS[0] fraction of
    lowest-scoring neurons (for a signed score such as taylor, only those estimated to help: score < 0) if that
    lowers the validation loss given the removals already kept; else try the next, smaller block; else keep the
    layer whole. Removals that interact (several layers correcting the same excess, where removing all of them at
    once overshoots) are not all taken. loss_weights: see greedy_by_layer. Returns index sets and every trial."""
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

    chosen, trials = greedy_by_layer(model, val_windows, propose, batch_size, loss_weights)
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


# ----------------------------------------------------------------------------- validating by a task

def task_windows(tokenizer, pairs: list[tuple[str, str]], seq_len: int,
                 max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, answer) pairs -> windows (N, T) right-padded with token 0 to the longest (at most seq_len; a longer
    pair keeps its end) and loss weights (N, T): 1 on the answer's tokens, 0 on the prompt's and the padding (causal
    attention: padding after a row changes nothing before it). Pairs are taken in order until max_tokens real
    tokens, then sorted longest first (greedy_by_layer cuts each batch's padding). greedy_by_layer(loss_weights=)
    then validates by the answers alone."""
    rows, masks = [], []
    for prompt, answer in pairs:
        p, a = tokenizer.encode(prompt), tokenizer.encode(answer, bos=False)
        rows.append((p + a)[-seq_len:])
        masks.append(([0] * len(p) + [1] * len(a))[-seq_len:])
        if max_tokens is not None and sum(map(len, rows)) >= max_tokens:
            break
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # similar lengths together: little padding
    T = len(rows[order[0]])
    return (torch.tensor([rows[i] + [0] * (T - len(rows[i])) for i in order]),
            torch.tensor([masks[i] + [0] * (T - len(masks[i])) for i in order], dtype=torch.float32))


# ----------------------------------------------------------------------------- a budget: cheaper within a tolerance

FRONTIER_STEPS = (0.05, 0.1, 0.2, 0.3, 0.5)  # fractions of a layer's neurons whose removal cost is measured


@torch.no_grad()
def removal_costs(model: M.Transformer, order: torch.Tensor, val_windows: torch.Tensor, base: list,
                  steps=FRONTIER_STEPS, batch_size: int = 8) -> torch.Tensor:
    """How much the validation loss grows, (L, S), when layer l alone loses the first steps[s] fraction of its
    neurons in `order` (L, F) (most removable first) on top of `base` (per-layer index sets already kept, None =
    all): each layer's sensitivity, measured. A trial at layer l runs layers l..L-1 only."""
    L, device = model.config.n_layer, model.tok_emb.weight.device
    mlps = materialize(model, base)
    batches = [val_windows[i:i + batch_size].to(device) for i in range(0, len(val_windows), batch_size)]
    n_pred = sum(x[:, 1:].numel() for x in batches)
    entering = []  # per batch: the residual stream entering each layer, and rope / mask
    for x in batches:
        h, rope, mask = model.embed(x)
        hs = [h]
        for l in range(L):
            hs.append(model.run_layers(hs[-1], rope, mask, l, l + 1, mlps=mlps))
        entering.append((hs, rope, mask))

    def loss(l, mlp):
        trial = list(mlps)
        trial[l] = mlp
        return sum(float(next_token_nll(model.head(model.run_layers(hs[l], rope, mask, l, None, mlps=trial)), x,
                                        reduction="sum")) for x, (hs, rope, mask) in zip(batches, entering)) / n_pred

    base_loss = loss(0, mlps[0])
    out = torch.zeros(L, len(steps))
    for l in progress(range(L), desc="removal costs", leave=False):
        kept = base[l] if base[l] is not None else torch.arange(model.config.n_ffn)
        keep_set = set(kept.tolist())
        ranked = [j for j in order[l].tolist() if j in keep_set]  # this layer's kept neurons, in order
        for s, frac in enumerate(steps):
            gone = set(ranked[:round(frac * model.config.n_ffn)])
            keep = torch.tensor([j for j in kept.tolist() if j not in gone], dtype=torch.long)
            out[l, s] = loss(l, model.layers[l].mlp.select(keep)) - base_loss
    return out


def allocate_removal(costs: torch.Tensor, steps, target: float) -> list[float]:
    """Per-layer fractions to remove so that the mean over layers is `target`, at the least summed measured cost:
    the steps of each layer's cost curve (costs (L, S) at `steps`, 0 at 0, linear between) are bought in the order
    of their cost per removed neuron; the last one only as far as the target needs."""
    L = costs.shape[0]
    fracs = (0.0, *steps)
    curve = torch.cat([torch.zeros(L, 1), costs.clamp_min(0)], 1)  # (L, S + 1), cost at each fraction
    taken, out = [0] * L, [0.0] * L  # per layer: the step reached, and the fraction removed
    while sum(out) / L < target - 1e-12:
        rates = {l: float(curve[l, t + 1] - curve[l, t]) / (fracs[t + 1] - fracs[t])
                 for l, t in enumerate(taken) if t + 1 < len(fracs)}
        if not rates:
            break
        l = min(rates, key=rates.get)
        taken[l] += 1
        out[l] = min(fracs[taken[l]], out[l] + (target * L - sum(out)))  # the last step only as far as needed
    return out


def budgeted_removal(model: M.Transformer, order: torch.Tensor, val_windows: torch.Tensor, target: float,
                     base: list | None = None, protected: torch.Tensor | None = None,
                     batch_size: int = 8, costs: torch.Tensor | None = None) -> tuple[list[torch.Tensor], dict]:
    """Remove about `target` of all FFN neurons where it costs least: on top of `base` (e.g. the validated greedy
    removals, which lower the loss), each layer loses the first neurons of `order` (L, F) (most removable first,
    e.g. by |taylor| ascending), as many as `allocate_removal` gives it from the measured `removal_costs`; protected
    neurons stay. Returns the index sets and {"per_layer": fractions, "costs": (L, S)} (pass costs back in to try
    another target without measuring again)."""
    L, n = model.config.n_layer, model.config.n_ffn
    base = base or [None] * L
    if protected is not None:  # protected neurons go last in every layer's order
        order = torch.stack([torch.cat([o[~protected[l][o]], o[protected[l][o]]]) for l, o in enumerate(order)])
    costs = removal_costs(model, order, val_windows, base, FRONTIER_STEPS, batch_size) if costs is None else costs
    per_layer = allocate_removal(costs, FRONTIER_STEPS, target)
    out = []
    for l in range(L):
        kept = base[l] if base[l] is not None else torch.arange(n)
        keep_set = set(kept.tolist())
        gone = set([j for j in order[l].tolist() if j in keep_set][:round(per_layer[l] * n)])
        if protected is not None:
            gone -= set(protected[l].nonzero().flatten().tolist())
        out.append(torch.tensor(sorted(keep_set - gone), dtype=torch.long))
    return out, {"per_layer": per_layer, "costs": costs}
