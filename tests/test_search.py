"""Tests for search.py: choosing how many neurons to remove from their scores by the held-out loss (auto_threshold,
greedy_layers). On a tiny GPT-2 with one planted harmful neuron (removing it provably lowers the loss), the Taylor
score ranks it first to remove, the automatic threshold and the layer-by-layer greedy search remove it (the greedy
search's logged losses are the real ones), and purify_sweep's weight-level greedy search finds its weights.
"""
import math
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import dowp  # noqa: E402
import experts as EX  # noqa: E402
import scoring as SC  # noqa: E402
import search  # noqa: E402
from conftest import tiny_model  # noqa: E402
from test_dowp import TINY, ScaledNeuron, mean_nll  # noqa: E402


def harmful_model():
    """A tiny GPT-2 whose neuron 5 of the last layer fires at ~3 on every token and writes the LM-head direction of
    token 95, which never occurs in the text (tokens < 48): removing it provably lowers the loss."""
    m = tiny_model("gpt2", **TINY)
    mlp = m.layers[2].mlp
    with torch.no_grad():
        mlp.up.weight[5] = 0
        mlp.up.bias[5] = 3.0  # a = gelu(3) on every token
        v = m.tok_emb.weight[95] - m.tok_emb.weight[95].mean()  # tied head: raises token 95's logit
        mlp.down.weight[:, 5] = 10 * v / v.norm()
    w = lambda seed: torch.randint(0, 48, (8, 16), generator=torch.Generator().manual_seed(seed))  # (N, T)
    return m, w


def test_taylor_ranks_a_harmful_neuron_first_and_auto_removes_it():
    m, w = harmful_model()
    calib, val = w(1), w(2)
    without = [b.mlp for b in m.layers]
    without[2] = ScaledNeuron(without[2], 5, 0.0)
    assert mean_nll(m, calib, without) < mean_nll(m, calib) - 1  # the truth: removal lowers the loss a lot
    taylor = dowp.loss_aware_stats(m, calib)["taylor"]  # (L, F)
    assert taylor.flatten().argmin().item() == 2 * 48 + 5 and taylor[2, 5] < 0  # ranked first to remove
    assert 5 not in dowp.select_neurons(taylor, 47 / 48)[2].tolist()
    tau, trials = search.auto_threshold(m, taylor, val)  # chosen on other text of the same kind
    idx = dowp.select_above(taylor, tau)
    assert 5 not in idx[2].tolist() and trials[0]["removed"] == 0  # the "remove nothing" candidate was tried
    best = min(t["val_loss"] for t in trials)
    assert best < trials[0]["val_loss"] and EX.kept_fraction(idx, m) > 0.8
    greedy, trials = search.greedy_layers(m, taylor, val)  # layer by layer: each layer's block here is 1 neuron
    assert 5 not in greedy[2].tolist() and all(len(g) >= 47 for g in greedy)
    accepted = [t for t in trials if t["accepted"]]
    assert {"layer": 2, "removed": 1} in [{k: t[k] for k in ("layer", "removed")} for t in accepted]
    assert all(b["val_loss"] < a["val_loss"] for a, b in zip(accepted, accepted[1:]))  # each step lowers it
    exact = math.log(SC.perplexity(m, val, EX.materialize(m, greedy)))  # the cached-prefix loss is the real one
    assert accepted[-1]["val_loss"] == pytest.approx(exact, abs=1e-5)
    import purify_sweep as S  # the weight-level counterpart finds the harmful weights (neuron 5's down column)
    sc = {"stats": dowp.collect_stats(m, calib), **dowp.loss_aware_stats(m, calib, weights=True)}
    mlps, trials = S.greedy_weights(m, sc, val, 8)
    assert mlps[2] is not None and 2 in [t["layer"] for t in trials if t["accepted"]]
    assert mean_nll(m, val, [x or b.mlp for x, b in zip(mlps, m.layers)]) < mean_nll(m, val) - 1
    masked = [EX.MaskedMLP(b.mlp, i) for b, i in zip(m.layers, idx)]  # the mask and the compact expert agree
    with torch.no_grad():
        assert (m(val, mlps=EX.materialize(m, idx)) - m(val, mlps=masked)).abs().max() <= 1e-5
