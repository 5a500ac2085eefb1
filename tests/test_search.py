"""Tests for search.py: choosing what to remove by a validation loss (auto_threshold, greedy_layers), validated by a
task's answers alone (task_windows), and a compute budget placed by measured cost (allocate_removal,
budgeted_removal). On a tiny GPT-2 with one planted harmful neuron (removing it provably lowers the loss), the
Taylor score ranks it first to remove, the automatic threshold and the layer-by-layer greedy search remove it (the
greedy search's logged losses are the real ones), and purify_sweep's weight-level greedy search finds its weights.
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
from conftest import TINY, ScaledNeuron, tiny_model, token_mean_nll  # noqa: E402


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
    assert token_mean_nll(m, calib, without) < token_mean_nll(m, calib) - 1  # the truth: removal lowers the loss a lot
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
    assert token_mean_nll(m, val, [x or b.mlp for x, b in zip(mlps, m.layers)]) < token_mean_nll(m, val) - 1
    masked = [EX.MaskedMLP(b.mlp, i) for b, i in zip(m.layers, idx)]  # the mask and the compact expert agree
    with torch.no_grad():
        assert (m(val, mlps=EX.materialize(m, idx)) - m(val, mlps=masked)).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- validating by a task

class CharTokenizer:
    """Characters as tokens: enough to build task windows without a real vocabulary."""

    def encode(self, text, bos=True):
        return [ord(c) % 96 for c in text]


def test_task_windows_weigh_the_answers_only_longest_first():
    pairs = [("Q: 1+1?\nA:", " 2"), ("Q: a long question here?\nA:", " a long answer"), ("Q?", " yes")]
    windows, weights = search.task_windows(CharTokenizer(), pairs, seq_len=24)
    lengths = [len(p + a) for p, a in pairs]
    assert windows.shape == (3, 24) and (weights.sum(1) > 0).all()
    assert sorted(weights.sum(1).tolist(), reverse=True) == [14.0, 4.0, 2.0]  # the answers' characters
    row = weights[0]  # the long pair keeps its end: 41 characters cut to 24, the answer all in
    assert row[-14:].sum() == 14 and row[:-14].sum() == 0
    assert (windows[2, min(lengths[0], lengths[2]):] == 0).all()  # padding after a short row
    few, _ = search.task_windows(CharTokenizer(), pairs, seq_len=24, max_tokens=10)
    assert len(few) == 1  # pairs are taken until the token budget is reached


def test_weighted_greedy_with_all_weights_equals_the_plain_search():
    """loss_weights of ones give the text's own loss: the same removals as the unweighted search; weights on the
    answer tokens alone change what is validated."""
    m, w = harmful_model()
    scores = dowp.loss_aware_stats(m, w(1), 2)["taylor"]
    plain, plain_trials = search.greedy_layers(m, scores, w(2), batch_size=4)
    ones, ones_trials = search.greedy_layers(m, scores, w(2), batch_size=4, loss_weights=torch.ones(8, 16))
    assert [t.tolist() for t in plain] == [t.tolist() for t in ones]
    assert [t["val_loss"] for t in plain_trials] == pytest.approx([t["val_loss"] for t in ones_trials], rel=1e-6)
    half = torch.zeros(8, 16)
    half[:, 8:] = 1  # only the second half of each window counts (and the first half is cut from no batch)
    _, half_trials = search.greedy_layers(m, scores, w(2), batch_size=4, loss_weights=half)
    assert half_trials[0]["val_loss"] != pytest.approx(plain_trials[0]["val_loss"], rel=1e-3)


# ----------------------------------------------------------------------------- the frontier: a budget placed by cost

def test_allocate_removal_buys_the_cheapest_steps_and_hits_the_target():
    steps = search.FRONTIER_STEPS
    costs = torch.tensor([[0.1, 0.3, 0.9, 2.0, 5.0],   # layer 0: moderate
                          [0.01, 0.02, 0.05, 0.1, 0.4],  # layer 1: cheap
                          [1.0, 2.0, 3.0, 4.0, 5.0]])    # layer 2: expensive
    for target in (0.05, 0.1, 0.2, 0.4):
        got = search.allocate_removal(costs, steps, target)
        assert sum(got) / 3 == pytest.approx(target)
        assert got[1] >= got[0] >= got[2]  # the cheap layer gives the most
    assert search.allocate_removal(costs, steps, 0.1) == pytest.approx([0.0, 0.3, 0.0])
    assert sum(search.allocate_removal(costs, steps, 0.9)) / 3 == pytest.approx(0.5)  # at most the last step


def test_budgeted_removal_removes_the_target_and_keeps_protected_neurons():
    m, w = harmful_model()
    taylor = dowp.loss_aware_stats(m, w(1), 2)["taylor"]
    order = taylor.abs().argsort(dim=1)  # least important first
    protected = torch.zeros(3, 48, dtype=torch.bool)
    protected[:, order[:, 0]] = True  # the most removable neuron of every layer must stay
    idx, info = search.budgeted_removal(m, order, w(2), 0.2, protected=protected, batch_size=4)
    assert EX.kept_fraction(idx, m) == pytest.approx(0.8, abs=1 / 48)
    assert all(bool(torch.isin(order[l, 0], idx[l])) for l in range(3))
    assert info["costs"].shape == (3, len(search.FRONTIER_STEPS)) and sum(info["per_layer"]) / 3 == pytest.approx(0.2)
    again, _ = search.budgeted_removal(m, order, w(2), 0.2, protected=protected, costs=info["costs"])
    assert [t.tolist() for t in again] == [t.tolist() for t in idx]  # the costs, passed back, are not measured again
    base = [torch.arange(48)[torch.arange(48) != 5] if l == 2 else None for l in range(3)]  # the harmful one gone
    on_top, _ = search.budgeted_removal(m, order, w(2), 0.2, base=base, batch_size=4)
    assert 5 not in on_top[2].tolist()  # removals come on top of the base
