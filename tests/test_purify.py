"""Tests for purify.py: DOWP statistics, scores, neuron selection, the experts file, compact experts, HF export.

Tiny random models (seeded) give exact checks: statistics equal a brute-force recomputation from stored
activations, a masked FFN equals its materialized compact FFN, keep=1.0 is exactly the dense model, the experts
file round-trips and a mismatched or corrupted file is refused, an exported expert loads in transformers with
the same logits. Slow tests use the real SmolLM2-135M model with small token budgets (one model load, one
statistics pass per domain for the whole module).

    python -m pytest -q tests/test_purify.py
    python -m pytest -q -m "not slow" tests/test_purify.py

Shape legend: B batch, T time, C width, L layers, F FFN neurons, V vocab, k kept neurons.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import checkpoints as ckpt  # noqa: E402
import model as M  # noqa: E402
import cli  # noqa: E402
import dowp  # noqa: E402
import experts as EX  # noqa: E402
import scoring as SC  # noqa: E402
import search  # noqa: E402
from conftest import smol_hf_tokenizer  # noqa: E402

SMOL_HF_TOK = smol_hf_tokenizer()


def tiny(arch="llama", seed=0, tie=True, n_ffn=48) -> M.Transformer:
    torch.manual_seed(seed)
    cfg = M.Config(arch=arch, vocab_size=96, n_layer=3, n_head=4, n_kv_head=2 if arch == "llama" else 4, n_embd=32,
                   n_ffn=n_ffn, max_seq_len=64, tie_embeddings=tie, name=f"tiny-{arch}")
    m = M.Transformer(cfg).eval().requires_grad_(False)
    with torch.no_grad():  # non-trivial norm weights / biases so the export map is really exercised
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    m.fingerprint = M.fingerprint(m)
    return m


def windows(n=6, T=16, V=96, seed=1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))  # (N, T)


class StoreAll(torch.nn.Module):
    """Keeps every activation (brute force, O(tokens)): the oracle for the streamed statistics."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp, self.acts = mlp, []

    def forward(self, x):
        a = self.mlp.neurons(x)
        self.acts.append(a.reshape(-1, a.shape[-1]).clone())
        return self.mlp.project(a)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stats_equal_brute_force(arch):
    m, w = tiny(arch), windows()
    stats = dowp.collect_stats(m, w, batch_size=4)  # two batches of unequal size: the streaming must add up
    store = [StoreAll(b.mlp) for b in m.layers]
    with torch.no_grad():
        logits = m(w, mlps=store)
        assert torch.equal(logits, m(w))  # recording FFNs compute exactly the dense FFN
    for l, s in enumerate(store):
        a = torch.cat(s.acts).double()  # (N*T, F)
        rms = a.pow(2).mean(1, keepdim=True).sqrt()
        assert int(stats["count"]) == a.shape[0] == w.numel()
        torch.testing.assert_close(stats["mean_abs"][l].double(), a.abs().mean(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats["mean_sq"][l].double(), a.pow(2).mean(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats["max_abs"][l].double(), a.abs().amax(0), rtol=1e-6, atol=0)
        torch.testing.assert_close(stats["fire_rate"][l].double(), (a.abs() > dowp.FIRE_REL * rms).double().mean(0),
                                   rtol=0, atol=1.5 / a.shape[0])  # at most a borderline token differs
        torch.testing.assert_close(stats["down_norm"][l], m.layers[l].mlp.down.weight.norm(dim=0))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masked_equals_compact(arch):
    m, w = tiny(arch), windows()
    scores = dowp.score_random(m, seed=3)
    idx = dowp.select_neurons(scores, 0.4)
    assert all(len(i) == round(0.4 * 48) for i in idx)
    compact = EX.materialize(m, idx)
    masked = [EX.MaskedMLP(b.mlp, i) for b, i in zip(m.layers, idx)]
    for c, k in zip(compact, idx):
        assert c.n_neurons == len(k) and c.up.weight.shape == (len(k), 32)  # really smaller matmuls
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert (compact[0](x) - masked[0](x)).abs().max() <= 1e-5
        assert (m(w, mlps=compact) - m(w, mlps=masked)).abs().max() <= 1e-5
        assert (m(w, mlps=compact) - m(w)).abs().max() > 1e-3  # and purifying really changed the model


def test_keep_one_is_exactly_dense():
    m, w = tiny(), windows()
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
    mixed = dowp.score_neurons(stats, tiny(n_ffn=4), "mixed")
    torch.testing.assert_close(mixed, (0.5 * code ** 2 + 0.5 * math_ ** 2).sqrt())


# --- loss-aware (Taylor) scores

class ScaledNeuron(torch.nn.Module):
    """The FFN with neuron j's activation multiplied by `factor` (factor 0 = the neuron removed)."""

    def __init__(self, mlp, j, factor):
        super().__init__()
        self.mlp, self.j, self.factor = mlp, j, factor

    def forward(self, x):
        a = self.mlp.neurons(x).clone()  # (B, T, F)
        a[..., self.j] *= self.factor
        return self.mlp.project(a)


def mean_nll(m, w, mlps=None) -> float:
    with torch.no_grad():
        logits = m(w, mlps=mlps)  # (B, T, V) float32: the loss itself is taken in float64
    return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), w[:, 1:].flatten()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_taylor_equals_finite_difference(arch):
    """dL_j = -sum_t a_j dL/da_j is -d/ds L(a_j -> s a_j) at s = 1: check it against a central difference, and the
    per-weight form against it (removing neuron j = removing column j of W_down, so the column sums agree)."""
    m, w = tiny(arch).double(), windows()
    est = dowp.loss_aware_stats(m, w, batch_size=4, weights=True)  # two batches: the sums must add up
    h = 0.03
    for l, j in [(0, 3), (1, 17), (2, 40)]:
        mlps = lambda f: [ScaledNeuron(b.mlp, j, f) if i == l else b.mlp for i, b in enumerate(m.layers)]
        fd = -(mean_nll(m, w, mlps(1 + h)) - mean_nll(m, w, mlps(1 - h))) / (2 * h)
        assert abs(est["taylor"][l, j].item() - fd) <= 1e-3 * abs(fd) + 2e-5, (l, j, est["taylor"][l, j], fd)
    torch.testing.assert_close(torch.stack([est["taylor_w"][f"{l}.down"].sum(0) for l in range(3)]), est["taylor"],
                               rtol=1e-4, atol=1e-7)
    # one up-projection weight: -W dL/dW against a central difference on that weight alone
    up = m.layers[1].mlp.up.weight
    fd_w = []
    for f in (1 + h, 1 - h):
        with torch.no_grad():
            old, up[5, 7] = up[5, 7].clone(), up[5, 7] * f
            fd_w.append(mean_nll(m, w))
            up[5, 7] = old
    fd = -(fd_w[0] - fd_w[1]) / (2 * h)
    assert abs(est["taylor_w"]["1.up"][5, 7].item() - fd) <= 1e-3 * abs(fd) + 2e-6
    assert not any(p.requires_grad or p.grad is not None for p in m.parameters())  # the model stays frozen


def harmful_model():
    """A tiny GPT-2 whose neuron 5 of the last layer fires at ~3 on every token and writes the LM-head direction of
    token 95, which never occurs in the text (tokens < 48): removing it provably lowers the loss."""
    m = tiny("gpt2")
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


def test_select_above_keeps_protected_and_never_empties_a_layer():
    scores = torch.tensor([[-1.0, 2.0, -3.0], [-5.0, -4.0, -6.0]])  # (L, F)
    protect = torch.tensor([[False, False, True], [False, False, False]])
    idx = dowp.select_above(scores, 0.0, protect)
    assert idx[0].tolist() == [1, 2] and idx[1].tolist() == [1]  # layer 1: its best neuron stays


def test_weight_level_masks():
    import purify_sweep as S
    m, w = tiny(), windows()
    stats = dowp.collect_stats(m, w)
    sc = {"stats": stats, **dowp.loss_aware_stats(m, w, weights=True)}
    for method in S.WEIGHT_SCORES:
        scores = S.weight_scores(m, method, sc, 1)
        assert set(scores) == {"up", "gate", "down"}
        masked = S.weight_masked(m.layers[1].mlp, scores, 0.25)
        for name, s in scores.items():
            w0, w1 = getattr(m.layers[1].mlp, name).weight, getattr(masked, name).weight
            removed = w1 == 0
            assert (removed.sum(1) == round(0.25 * w0.shape[1])).all()  # the same fraction of every row
            assert torch.equal(w1[~removed], w0[~removed])  # kept weights keep their values
            lowest = torch.topk(s, round(0.25 * w0.shape[1]), dim=1, largest=False).indices
            assert removed.gather(1, lowest).all()  # and the removed ones are the lowest-scoring
        dense = [S.weight_masked(b.mlp, S.weight_scores(m, method, sc, l), 0.0) for l, b in enumerate(m.layers)]
        with torch.no_grad():
            assert torch.equal(m(w, mlps=dense), m(w))  # sparsity 0 is exactly dense
    wanda = S.weight_scores(m, "wanda", sc, 0)
    torch.testing.assert_close(wanda["down"], m.layers[0].mlp.down.weight.abs() * stats["mean_sq"][0].sqrt())
    nll = torch.tensor([1.0, 2.0, 3.0, 2.5])
    iv = SC.ppl_intervals(nll, nll)
    assert iv["delta"] == 0 and iv["delta_ci"] == [0, 0] and iv["ppl_ci"][0] <= iv["ppl"] <= iv["ppl_ci"][1]


def test_experts_file_roundtrip_and_refusals(tmp_path):
    m, w = tiny(), windows()
    stats = {"general": dowp.collect_stats(m, w), "code": dowp.collect_stats(m, windows(seed=5))}
    experts = {d: dowp.select_neurons(dowp.score_neurons(stats, m, "dowp", d), 0.5) for d in stats}
    baselines = {b: EX.baseline_indices(b, m, stats, 0.5) for b in dowp.BASELINES}
    meta = {"fingerprint": m.fingerprint, "n_layer": 3, "n_ffn": 48, "score": "dowp", "keep": 0.5, "protect": 50.0}
    path = tmp_path / "experts.safetensors"
    EX.save_experts(path, experts, meta, baselines, stats)
    ex = EX.load_experts(path, m)
    assert ex.domains == ["general", "code"] and ex.meta["keep"] == 0.5
    for d in stats:
        assert all(torch.equal(a, b) for a, b in zip(ex.indices[d], experts[d]))
        for k in dowp.STATS:
            assert torch.equal(ex.stats[d][k], stats[d][k])
    for b in dowp.BASELINES:
        assert all(torch.equal(x, y) for x, y in zip(ex.baselines[b], baselines[b]))
        # a baseline rebuilt from the saved statistics (at the file's keep) is the stored one
        assert all(torch.equal(x, y) for x, y in zip(EX.baseline_indices(b, m, path, 0.5), baselines[b]))
    assert len(EX.baseline_indices("mixed", m, ex, 0.25)[0]) == 12  # any keep
    assert all(EX.kept_fraction(ex.indices[d], m) == 0.5 for d in ex.domains)
    assert ex.mlps("code")[0].n_neurons == 24
    assert all(torch.equal(a, b) for a, b in zip(ex.index_sets("general"), experts["general"]))  # domain first
    assert all(torch.equal(a, b) for a, b in zip(ex.index_sets("baseline.general"), baselines["general"]))
    with pytest.raises(M.UserError, match="no expert or baseline"):
        ex.mlps("legal")

    other = tiny(seed=1)  # same shapes, other weights -> other fingerprint
    with pytest.raises(M.UserError, match="fingerprint"):
        EX.load_experts(path, other)
    wide = tiny(n_ffn=64)
    EX.save_experts(tmp_path / "wide.safetensors", experts, {**meta, "fingerprint": wide.fingerprint})
    with pytest.raises(M.UserError, match="neurons"):
        EX.load_experts(tmp_path / "wide.safetensors", wide)

    raw = bytearray(path.read_bytes())
    bad = tmp_path / "flipped.safetensors"
    raw_flip = bytearray(raw)
    raw_flip[-5] ^= 0x40  # one bit inside the tensor data
    bad.write_bytes(bytes(raw_flip))
    with pytest.raises(M.UserError, match="checksum|corrupt"):
        EX.load_experts(bad, m)
    bad.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(M.UserError, match="truncated"):
        EX.load_experts(bad, m)
    ckpt.write_safetensors(bad, {"x": torch.zeros(3)}, {"hello": "world"})
    with pytest.raises(M.UserError, match="not an experts file"):
        EX.load_experts(bad, m)
    with pytest.raises(M.UserError, match="does not exist"):
        EX.load_experts(tmp_path / "missing.safetensors", m)
    # an index set out of range, saved with a valid checksum, is refused by the range check
    broken = {d: [i.clone() for i in v] for d, v in experts.items()}
    broken["code"][1][-1] = 48
    EX.save_experts(bad, broken, meta)
    with pytest.raises(M.UserError, match="code.1"):
        EX.load_experts(bad, m)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("gpt2", True)])
def test_export_loads_in_transformers(tmp_path, arch, tie):
    transformers = pytest.importorskip("transformers")
    m, w = tiny(arch, tie=tie), windows()
    idx = dowp.select_neurons(dowp.score_random(m, 7), 0.5)
    out = tmp_path / "exp"
    copied = EX.export_hf(m, idx, out, SMOL_HF_TOK if SMOL_HF_TOK.exists() else None, {"domain": "x"})
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.intermediate_size if arch == "llama" else hf.config.n_inner == 24
    with torch.no_grad():
        ours = m(w, mlps=EX.materialize(m, idx))  # (N, T, V)
        theirs = hf(w).logits
    assert (ours - theirs).abs().max() <= 1e-4
    if copied:  # our own loader reads the exported dir too
        m2, _ = M.load_model(out)
        with torch.no_grad():
            assert (m2(w) - ours).abs().max() <= 1e-5
    with pytest.raises(M.UserError, match="same number of kept neurons"):
        EX.export_hf(m, [idx[0], idx[1], idx[2][:5]], tmp_path / "bad")


def test_cli_user_errors_are_one_line():
    for argv in (["--domains", "poetry"], ["--keep", "0"], ["--domain", "x=/no/such/file.txt"]):
        r = subprocess.run([sys.executable, str(REPO / "purify.py"), *argv], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr


def test_cli_end_to_end_on_tiny_model(tmp_path):
    """The whole script on a tiny random Llama with the real tokenizer and data: files written, experts load,
    a re-run reuses the cached statistics, the export loads."""
    if not SMOL_HF_TOK.exists():
        pytest.skip("needs the shared SmolLM2 tokenizer")
    torch.manual_seed(0)
    cfg = M.Config(arch="llama", vocab_size=49152, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_ffn=40,
                   max_seq_len=512, name="tiny-cli")
    m = M.Transformer(cfg).eval().requires_grad_(False)
    EX.export_hf(m, [None, None], tmp_path / "tiny", SMOL_HF_TOK)  # keep everything: a plain HF checkpoint
    out = tmp_path / "out"
    argv = [sys.executable, str(REPO / "purify.py"), "--model", str(tmp_path / "tiny"), "--domains", "general", "code",
            "--tokens", "256", "--heldout-tokens", "128", "--seq-len", "128", "--keep", "0.5", "--out", str(out),
            "--export", str(tmp_path / "exp"), "--export-domain", "code", "--plot"]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stats general" in r.stderr
    model, _ = M.load_model(tmp_path / "tiny")
    ex = EX.load_experts(out / "experts.safetensors", model)
    assert ex.domains == ["general", "code"] and set(ex.baselines) == set(dowp.BASELINES)
    assert all(EX.kept_fraction(ex.indices[d], m) == 0.5 for d in ex.domains)
    assert ex.meta["tokens"] == {"general": 256, "code": 256}
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["matrix"]) >= {"expert:general", "expert:code", "dense", "baseline:mixed"}
    if cli.pyplot() is not None:
        assert (out / "report.png").read_bytes()[:4] == b"\x89PNG" and "![matrix](report.png)" in (
            out / "report.md").read_text()
    assert all(v > 1 for row in rep["matrix"].values() for v in row.values())
    assert "| dense |" in (out / "report.md").read_text()
    r2 = subprocess.run(argv + ["--no-report"], capture_output=True, text=True)
    assert r2.returncode == 0 and "stats general" not in r2.stderr  # statistics reused from the cache
    exported, _ = M.load_model(tmp_path / "exp")
    assert exported.config.n_ffn == 20
    w = windows(2, 16)
    with torch.no_grad():
        assert (exported(w) - model(w, mlps=ex.mlps("code"))).abs().max() <= 1e-5


def test_cli_taylor_auto_and_sweep_on_tiny_model(tmp_path):
    """purify.py --score taylor --auto writes loadable experts with the chosen thresholds; purify_sweep.py runs every
    score and budget, the check and --write-experts, and a re-run reuses every cached row."""
    if not SMOL_HF_TOK.exists():
        pytest.skip("needs the shared SmolLM2 tokenizer")
    torch.manual_seed(0)
    cfg = M.Config(arch="llama", vocab_size=49152, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_ffn=40,
                   max_seq_len=512, name="tiny-cli")
    EX.export_hf(M.Transformer(cfg).eval().requires_grad_(False), [None, None], tmp_path / "tiny", SMOL_HF_TOK)
    common = ["--model", str(tmp_path / "tiny"), "--domains", "general", "code", "--tokens", "512", "--seq-len", "128",
              "--threads", "1"]
    r = subprocess.run([sys.executable, str(REPO / "purify.py"), *common, "--score", "taylor", "--auto", "threshold",
                        "--no-report", "--out", str(tmp_path / "auto")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "taylor general" in r.stderr and "auto code: removes" in r.stderr
    model, _ = M.load_model(tmp_path / "tiny")
    ex = EX.load_experts(tmp_path / "auto" / "experts.safetensors", model)
    assert ex.meta["alloc"] == "auto threshold" and set(ex.meta["auto"]) == {"general", "code"}
    assert ex.meta["tokens"] == {"general": 384, "code": 384}  # 3 of the 4 windows score, the 4th validates
    argv = [sys.executable, str(REPO / "purify_sweep.py"), *common, "--heldout-tokens", "256", "--keeps", "0.9",
            "--sparsities", "0.1", "--check-neurons", "4", "--check-lowest", "2", "--check-tokens", "128",
            "--write-experts", "taylor:greedy", "--plot", "--out", str(tmp_path / "sweep")]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "sweep" / "report.json").read_text())
    if cli.pyplot() is not None:  # matplotlib is a dev extra: with it, the plot is drawn
        assert (tmp_path / "sweep" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    systems = {"dense", "weight:wanda:0.1", "weight:taylor:0.1", "weight:taylor_abs:0.1", "weight:taylor:greedy",
               *(f"neuron:{s}:{k}" for s in ("dowp", "taylor") for k in ("0.9", "auto", "greedy"))}
    assert set(rep["table"]["code"]) == systems and rep["check"]["n_random"] == 4
    assert rep["table"]["code"]["neuron:taylor:0.9"]["active_fraction"] == 0.9
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "## Summary" in md and "## neuron:taylor:greedy on every domain's held-out text" in md
    ex = EX.load_experts(tmp_path / "sweep" / "experts.taylor.greedy.safetensors", model)
    assert ex.domains == ["general", "code"] and set(ex.baselines) == set(dowp.BASELINES)  # for evaluate's baselines
    assert set(ex.stats) == {"general", "code"}
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0 and "loss-aware pass" not in r.stderr and "exact removals" not in r.stderr


# ============================================================================ real model (slow)

REAL_CALIB, REAL_HELDOUT, REAL_T = 4096, 512, 256  # tokens per domain: small, so the module stays cheap


@pytest.fixture(scope="module")
def real(real_model):
    model, tok = real_model  # tests/conftest.py
    stats = {d: dowp.collect_stats(model, data.load_domain_tokens(d, tok, n_tokens=REAL_CALIB, seq_len=REAL_T))
             for d in data.BUILTIN_DOMAINS}
    heldout = {d: data.load_domain_tokens(d, tok, split="heldout", n_tokens=REAL_HELDOUT, seq_len=REAL_T)
               for d in data.BUILTIN_DOMAINS}
    protect = dowp.super_neurons(stats)
    experts = {d: dowp.select_neurons(dowp.score_neurons(stats, model, "dowp", d), 0.5, protect)
               for d in data.BUILTIN_DOMAINS}
    return {"model": model, "tok": tok, "stats": stats, "heldout": heldout, "protect": protect, "experts": experts,
            "ppl": {}}


def real_ppl(real, name, indices, domain):
    """Perplexity of a system on a domain's held-out windows, memoised across the module's tests."""
    key = (name, domain)
    if key not in real["ppl"]:
        real["ppl"][key] = SC.perplexity(real["model"], real["heldout"][domain], EX.materialize(real["model"], indices))
    return real["ppl"][key]


@pytest.mark.slow
def test_real_domain_expert_is_best_on_its_own_domain(real):
    """keep=0.5: in each held-out column, the expert built for that domain has the lowest perplexity."""
    table = {(e, d): real_ppl(real, f"expert:{e}", real["experts"][e], d)
             for e in data.BUILTIN_DOMAINS for d in data.BUILTIN_DOMAINS}
    print("\n" + "\n".join(f"{e:>10}: " + " ".join(f"{table[e, d]:8.2f}" for d in data.BUILTIN_DOMAINS)
                           for e in data.BUILTIN_DOMAINS))
    for d in data.BUILTIN_DOMAINS:
        others = {e: table[e, d] for e in data.BUILTIN_DOMAINS if e != d}
        assert table[d, d] < min(others.values()), (d, table[d, d], others)


@pytest.mark.slow
def test_real_dowp_beats_random_and_magnitude(real):
    model = real["model"]
    for b in ("random", "magnitude"):
        idx = dowp.select_neurons(dowp.score_neurons(real["stats"], model, b), 0.5, real["protect"])
        for d in data.BUILTIN_DOMAINS:
            ours, theirs = real_ppl(real, f"expert:{d}", real["experts"][d], d), real_ppl(real, b, idx, d)
            assert ours < theirs, (b, d, ours, theirs)


@pytest.mark.slow
def test_real_protection_and_stats_sanity(real):
    stats, protect = real["stats"], real["protect"]
    assert 0 < int(protect.sum()) < 0.01 * protect.numel()  # a few super neurons, not a large fraction
    for d, s in stats.items():
        assert int(s["count"]) == REAL_CALIB
        assert (s["mean_sq"] >= s["mean_abs"] ** 2 * (1 - 1e-4)).all()  # Jensen: E a^2 >= (E|a|)^2
        assert ((s["fire_rate"] >= 0) & (s["fire_rate"] <= 1)).all()
        assert (s["max_abs"] >= s["mean_abs"]).all()


@pytest.mark.slow
def test_real_export_matches_transformers(real, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tok = real["model"], real["tok"]
    idx = real["experts"]["code"]
    # the tokenizer files are written from the GGUF's own vocabulary, as `purify.py --export` does
    copied = EX.export_hf(model, idx, tmp_path / "code", None, {"domain": "code"},
                         EX.gguf_tokenizer_files(M.default_model_path()))
    assert copied == ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "code")
    text = "def fibonacci(n):\n    if n < 2:\n        return n  # ü 日本 <|im_end|>"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("<|im_end|>", "<|im_end|>")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "code", dtype=torch.float32).eval()
    assert hf.config.intermediate_size == len(idx[0]) == 768  # keep 0.5 of 1536
    ids = torch.tensor([tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return")])  # (1, T)
    with torch.no_grad():
        ours = model(ids, mlps=EX.materialize(model, idx))
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    ours_loaded, _ = M.load_model(tmp_path / "code")
    with torch.no_grad():
        assert (ours_loaded(ids) - ours).abs().max() <= 1e-4
