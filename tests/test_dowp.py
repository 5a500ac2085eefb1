"""Tests for dowp.py: the streamed neuron statistics, the neuron scores (DOWP's contrast rule, magnitude, mixed, the
loss-aware Taylor scores), neuron selection under a budget or a threshold, and the super neurons that selection
protects. Exact checks on tiny random models (seeded): keep=1.0 keeps every neuron for every score (exactly the
dense model), the Taylor scores equal central finite differences of the loss, per neuron and per weight. That the
streamed statistics equal a brute-force recomputation from stored activations is checked once, as the course's
graded part 3 (tests/test_parts.py). Shape legend: B batch, T time, C width, L layers, F FFN neurons, V vocab,
k kept neurons.
"""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import model as M  # noqa: E402
import dowp  # noqa: E402
import experts as EX  # noqa: E402
from conftest import TINY, ScaledNeuron, tiny_model, token_mean_nll, windows  # noqa: E402


def test_keep_one_is_exactly_dense():
    m, w = tiny_model(**TINY), windows()
    stats = {"a": dowp.collect_stats(m, w), "b": dowp.collect_stats(m, windows(seed=2))}
    stats["a"]["taylor"] = dowp.loss_aware_stats(m, w)["taylor"]
    for method in dowp.SCORES:
        s = dowp.score_neurons({**stats, "general": stats["a"]}, m, method, domain="a")
        for idx in (dowp.select_neurons(s, 1.0), dowp.select_above(s, float("-inf"))):  # --auto's "remove nothing"
            assert all(torch.equal(i, torch.arange(48)) for i in idx)
            with torch.no_grad():
                assert torch.equal(m(w, mlps=EX.materialize(m, idx)), m(w))
    assert EX.kept_fraction(idx, m) == 1.0
    assert EX.kept_fraction([None, torch.arange(12), torch.arange(24)], m) == pytest.approx((48 + 12 + 24) / 144)


def test_select_neurons_budget_and_protection():
    scores = torch.arange(30.0).view(3, 10)  # (L, F): neuron j scores j
    protect = torch.zeros(3, 10, dtype=torch.bool)
    protect[1, 0] = True  # the worst-scoring neuron of layer 1 is a super neuron
    idx = dowp.select_neurons(scores, [0.3, 0.3, 0.5], protect)
    assert idx[0].tolist() == [7, 8, 9]
    assert idx[1].tolist() == [0, 8, 9]  # protected kept, inside the same budget
    assert idx[2].tolist() == [5, 6, 7, 8, 9]
    with pytest.raises(M.UserError, match="keep must be in"):
        dowp.select_neurons(scores, 1.5)
    with pytest.raises(M.UserError, match="exceed the budget"):
        dowp.select_neurons(scores, 0.1, torch.ones(3, 10, dtype=torch.bool))


def test_select_above_keeps_protected_and_never_empties_a_layer():
    scores = torch.tensor([[-1.0, 2.0, -3.0], [-5.0, -4.0, -6.0]])  # (L, F)
    protect = torch.tensor([[False, False, True], [False, False, False]])
    idx = dowp.select_above(scores, 0.0, protect)
    assert idx[0].tolist() == [1, 2] and idx[1].tolist() == [1]  # layer 1: its best neuron stays


def test_super_neurons_rule():
    peak = torch.ones(2, 8)
    peak[0, 3] = 200.0  # a massive activation
    peak[1, 5] = 20.0  # large, but under the factor
    stats = {"a": {"max_abs": peak}, "b": {"max_abs": torch.ones(2, 8)}}
    sup = dowp.super_neurons(stats, 50.0)
    assert sup.sum() == 1 and sup[0, 3]
    assert dowp.super_neurons(stats, 0).sum() == 0


def fake_stats(importance: torch.Tensor, count=100) -> dict:
    """Stats whose Wanda importance is `importance` (L, F) (down norms = 1)."""
    return {"mean_sq": importance ** 2, "mean_abs": importance, "fire_rate": torch.ones_like(importance),
            "max_abs": importance, "down_norm": torch.ones_like(importance), "count": torch.tensor(count)}


def test_dowp_contrast_rule():
    # neuron 0: important everywhere; 1: only for code; 2: only for math; 3: weak everywhere
    code = torch.tensor([[4.0, 3.0, 0.1, 0.5]])
    math_ = torch.tensor([[4.0, 0.1, 3.0, 0.5]])
    stats = {"code": fake_stats(code), "math": fake_stats(math_)}
    s0 = dowp.score_dowp(stats, "code", contrast=0.0)
    assert torch.argsort(s0, descending=True).tolist() == torch.argsort(code, descending=True).tolist()
    for lam in (0.5, 1.0, 2.0):
        kept = dowp.select_neurons(dowp.score_dowp(stats, "code", lam), 0.5)[0].tolist()
        assert kept == [0, 1]  # shared-important kept, code-specific kept, math-only purified
        kept = dowp.select_neurons(dowp.score_dowp(stats, "math", lam), 0.5)[0].tolist()
        assert kept == [0, 2]
    # with a large contrast the specific neuron outranks the shared one, but the shared one still beats
    # the weak and the other-domain ones
    s = dowp.score_dowp(stats, "code", 2.0)[0]
    assert s[1] > s[0] > s[3] > s[2]
    with pytest.raises(M.UserError, match="contrast"):
        dowp.score_dowp(stats, "code", -1.0)
    mixed = dowp.score_neurons(stats, tiny_model(n_ffn=4, **TINY), "mixed")
    torch.testing.assert_close(mixed, (0.5 * code ** 2 + 0.5 * math_ ** 2).sqrt())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_taylor_equals_finite_difference(arch):
    """dL_j = -sum_t a_j dL/da_j is -d/ds L(a_j -> s a_j) at s = 1: check it against a central difference, and the
    per-weight form against it (removing neuron j = removing column j of W_down, so the column sums agree)."""
    m, w = tiny_model(arch, **TINY).double(), windows()
    est = dowp.loss_aware_stats(m, w, batch_size=4, weights=True)  # two batches: the sums must add up
    h = 0.03
    for l, j in [(0, 3), (1, 17), (2, 40)]:
        mlps = lambda f: [ScaledNeuron(b.mlp, j, f) if i == l else b.mlp for i, b in enumerate(m.layers)]
        fd = -(token_mean_nll(m, w, mlps(1 + h)) - token_mean_nll(m, w, mlps(1 - h))) / (2 * h)
        assert abs(est["taylor"][l, j].item() - fd) <= 1e-3 * abs(fd) + 2e-5, (l, j, est["taylor"][l, j], fd)
    torch.testing.assert_close(torch.stack([est["taylor_w"][f"{l}.down"].sum(0) for l in range(3)]), est["taylor"],
                               rtol=1e-4, atol=1e-7)
    # one up-projection weight: -W dL/dW against a central difference on that weight alone
    up = m.layers[1].mlp.up.weight
    fd_w = []
    for f in (1 + h, 1 - h):
        with torch.no_grad():
            old, up[5, 7] = up[5, 7].clone(), up[5, 7] * f
            fd_w.append(token_mean_nll(m, w))
            up[5, 7] = old
    fd = -(fd_w[0] - fd_w[1]) / (2 * h)
    assert abs(est["taylor_w"]["1.up"][5, 7].item() - fd) <= 1e-3 * abs(fd) + 2e-6
    assert not any(p.requires_grad or p.grad is not None for p in m.parameters())  # the model stays frozen
