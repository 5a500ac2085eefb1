"""Tests for router.py and train_router.py: fast, exact checks on tiny random models with hand-made DSS-Expert index
sets (decisions, gates and budgets, fallbacks, routing inside the prefill, the router file, both training levels);
slow checks on the real SmolLM2-135M model (level 1 accuracy on held-out domain prompts, the sparsity-weight
sweep of level 2).
"""
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import checkpoints as ckpt  # noqa: E402
import generate as G  # noqa: E402
import model as M  # noqa: E402
import scoring as SC  # noqa: E402
import router as R  # noqa: E402
from conftest import tiny_model  # noqa: E402

DOMAINS = ["general", "code", "math", "knowledge"]
TINY = dict(vocab=512, n_layer=4, n_embd=64, n_ffn=256, name="tiny")  # the router tests' model: tiny_model(**TINY)


def tiny_experts(model, keep=0.5, seed=0):
    """Hand-made experts: a random sorted index set per (domain, layer)."""
    g = torch.Generator().manual_seed(seed)
    Fn, k = model.config.n_ffn, int(keep * model.config.n_ffn)
    indices = {d: [torch.randperm(Fn, generator=g)[:k].sort().values for _ in range(model.config.n_layer)]
               for d in DOMAINS}
    return SimpleNamespace(domains=list(DOMAINS), indices=indices, meta={"keep": keep})


def tiny_moe(model, experts, hidden=16, **kw):
    cfg = R.RouterConfig(domains=list(DOMAINS), n_layer=model.config.n_layer, n_embd=model.config.n_embd,
                         route_layer=1, hidden=hidden)
    torch.manual_seed(1)
    return R.FreeMoE(model, experts, R.Router(cfg), **kw)


def ids(B=3, T=12, seed=0):
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- exact checks, tiny model

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_hidden_equals_full_forward(arch):
    m = tiny_model(arch, **TINY)
    x = ids()
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[0, :5] = False  # a left-padded row
    with torch.no_grad():
        for v in (None, valid):
            _, hs = m(x, valid=v, return_hidden=True)
            for n in (0, 1, 3):
                assert torch.equal(R.prefix_hidden(m, x, v, n), hs[n])


def test_dense_decision_equals_dense_model():
    m = tiny_model(**TINY)
    moe = tiny_moe(m, tiny_experts(m))
    x = ids()
    dense = m(x)
    for dec in (moe.decision_for(()), moe.decision_for(("math",), use_expert=(False,) * 4)):
        assert dec.active_fraction == 1.0
        assert torch.equal(m(x, mlps=moe.mlps_for(dec)), dense)


def test_forced_domain_equals_materialized_expert():
    m = tiny_model(**TINY)
    ex = tiny_experts(m)
    moe = tiny_moe(m, ex)
    x = ids()
    ref = m(x, mlps=[blk.mlp.select(idx) for blk, idx in zip(m.layers, ex.indices["code"])])
    dec = moe.decision_for(("code",), use_expert=(True,) * 4)
    assert torch.equal(m(x, mlps=moe.mlps_for(dec)), ref)
    assert dec.active_fraction == pytest.approx(0.5)
    # a mixed gate pattern: expert where the gate says so, dense elsewhere
    pattern = (True, False, True, False)
    ref = m(x, mlps=[blk.mlp.select(idx) if u else blk.mlp
                     for blk, idx, u in zip(m.layers, ex.indices["code"], pattern)])
    dec = moe.decision_for(("code",), use_expert=pattern)
    assert torch.equal(m(x, mlps=moe.mlps_for(dec)), ref)
    assert dec.active_fraction == pytest.approx((2 * 128 + 2 * 256) / (4 * 256))


def test_compact_modules_are_cached_and_smaller():
    m = tiny_model(**TINY)
    moe = tiny_moe(m, tiny_experts(m))
    a = moe.mlps_for(moe.decision_for(("math",), use_expert=(True,) * 4))
    b = moe.mlps_for(moe.decision_for(("math",), use_expert=(True, False, True, True)))
    assert a[0] is b[0] and a[2] is b[2]  # same (expert, layer) -> same module
    assert a[0].n_neurons == 128 and b[1] is m.layers[1].mlp


def test_mixed_mlp_endpoints_exact():
    m = tiny_model(**TINY)
    x = torch.randn(2, 5, 64)
    dense = m.layers[0].mlp
    expert = dense.select(torch.arange(0, 256, 2))
    mix = R.MixedMLP(expert, dense)
    mix.g = torch.tensor(0.0)
    assert torch.equal(mix(x), dense(x))
    mix.g = torch.tensor(1.0)
    assert torch.equal(mix(x), expert(x))


def test_router_is_under_one_percent_of_model():
    m = tiny_model(**TINY)
    moe = tiny_moe(m, tiny_experts(m))
    n_router, n_model = moe.router.num_params(), m.num_params()
    print(f"router params {n_router} = {100 * n_router / n_model:.3f}% of the tiny model's {n_model}")
    assert 0 < n_router < 0.01 * n_model
    # and for the real model's shape with the default head (no weights needed)
    real = R.Router(R.RouterConfig(domains=DOMAINS, n_layer=30, n_embd=576, route_layer=7))
    print(f"router params at SmolLM2-135M shape: {real.num_params()} = {100 * real.num_params() / 134.5e6:.3f}%")
    assert real.num_params() < 0.01 * 134.5e6


def test_gate_sign_and_budget_rule():
    m = tiny_model(**TINY)
    moe = tiny_moe(m, tiny_experts(m))
    with torch.no_grad():
        moe.router.gate_logits.copy_(torch.tensor([[1.0, -1.0, 2.0, -3.0]] * 4))
    assert moe.gate_pattern(("math",)) == (True, False, True, False)
    fracs = []
    for budget in (1.0, 0.9, 0.75, 0.6, 0.5, 0.0):
        moe.budget = budget
        dec = moe.decision_for(("math",))
        assert dec.active_fraction <= budget or all(dec.use_expert)
        fracs.append(dec.active_fraction)
    assert fracs == sorted(fracs, reverse=True) and fracs[0] == 1.0 and fracs[-1] == 0.5
    moe.budget = 0.75  # two of four layers purified: the two with the largest logits (2.0 and 1.0)
    assert moe.decision_for(("math",)).use_expert == (True, False, True, False)


def test_threshold_fallbacks():
    m = tiny_model(**TINY)
    ex = tiny_experts(m)
    moe = tiny_moe(m, ex, threshold=0.9)
    with torch.no_grad():
        moe.router.gate_logits.fill_(1.0)
    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    dec = moe.decide(probs)
    assert dec.fell_back and dec.domains == () and dec.active_fraction == 1.0
    moe.fallback = "top2"
    dec = moe.decide(probs)
    assert dec.fell_back and dec.domains == ("code", "math")
    union = [torch.unique(torch.cat([a, b])) for a, b in zip(ex.indices["code"], ex.indices["math"])]
    assert dec.active_fraction == pytest.approx(sum(len(u) for u in union) / (4 * 256))
    x = ids()
    assert torch.equal(m(x, mlps=moe.mlps_for(dec)), m(x, mlps=[b.mlp.select(u) for b, u in zip(m.layers, union)]))
    moe.threshold = 0.4
    assert moe.decide(probs).domains == ("code",) and not moe.decide(probs).fell_back


def test_route_is_padding_invariant_and_generate_matches():
    m = tiny_model(**TINY)
    moe = tiny_moe(m, tiny_experts(m))
    with torch.no_grad():
        moe.router.gate_logits.fill_(1.0)
    prompts = [[5, 6, 7], [9, 1, 2, 3, 4, 8, 8, 1], [300, 2]]
    together = moe.route(prompts)
    alone = [moe.route([p])[0] for p in prompts]
    for a, b in zip(together, alone):
        assert torch.allclose(torch.tensor(a.probs), torch.tensor(b.probs), atol=1e-5)
    for threshold in (moe.threshold, 0.0):  # all dense (one batch) / three different experts (split into groups)
        moe.threshold = threshold
        out, decs = moe.generate(prompts, 5)
        assert len({d.key for d in decs}) == (1 if threshold else 3)
        for p, o, d in zip(prompts, out, decs):
            assert o == G.generate(m, [p], 5, mlps=moe.mlps_for(d))[0]
    nll, decs = moe.score(ids(4, 10))
    assert nll.shape == (4,) and torch.isfinite(nll).all() and len(decs) == 4


@pytest.mark.parametrize("gate", [-1.0, 1.0])  # -1: the prefix layers are reused; +1: layer 0 is purified, redone
def test_routing_inside_the_prefill_is_exact(gate):
    """generate() routes on the prefill's own first layers; tokens and decisions equal route() + plain generate."""
    m = tiny_model(**TINY)
    moe = tiny_moe(m, tiny_experts(m))
    with torch.no_grad():
        moe.router.gate_logits.fill_(gate)
        moe.router.head[-1].bias.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0]))  # every prompt -> code, one batch
    prompts = [[5, 6, 7, 9, 1, 2], [9, 1, 2, 3, 4, 8, 8, 1], [300, 2, 17, 4, 4, 4, 4, 4]]
    out, decs = moe.generate(prompts, 6)
    ref = moe.route(prompts)
    assert [d.key for d in decs] == [d.key for d in ref] and decs[0].domains == ("code",)
    assert decs[0].use_expert[0] == (gate > 0)
    assert out == G.generate(m, prompts, 6, mlps=moe.mlps_for(ref[0]))
    for a, b in zip(decs, ref):
        assert torch.allclose(torch.tensor(a.probs), torch.tensor(b.probs), atol=1e-5)


def test_checkpoint_roundtrip_and_refusals(tmp_path):
    m = tiny_model(**TINY)
    ex = tiny_experts(m)
    moe = tiny_moe(m, ex)
    with torch.no_grad():
        moe.router.gate_logits.normal_()
        moe.router.feat_mean.normal_()
    path = tmp_path / "router.safetensors"
    R.save_router(path, moe.router, m, ex, {"sparsity_weight": 0.5})
    back = R.load_router(path, m, ex)
    for k, v in moe.router.state_dict().items():
        assert torch.equal(back.router.state_dict()[k], v)
    assert back.router.cfg == moe.router.cfg
    # another model (different weights -> different fingerprint)
    with pytest.raises(M.UserError, match="trained for model fingerprint"):
        R.load_router(path, tiny_model(seed=1, **TINY), ex)
    # another experts file (one index changed)
    ex2 = tiny_experts(m)
    ex2.indices["math"][2] = ex2.indices["math"][2].clone()
    ex2.indices["math"][2][0] = (set(range(256)) - set(ex2.indices["math"][2].tolist())).pop()
    ex2.indices["math"][2] = ex2.indices["math"][2].sort().values
    with pytest.raises(M.UserError, match="trained for experts"):
        R.load_router(path, m, ex2)
    # not a router file at all
    bad = tmp_path / "bad.safetensors"
    ckpt.write_safetensors(bad, {"x": torch.zeros(1)}, {"format": "something"})
    with pytest.raises(M.UserError, match="not a router file"):
        R.load_router(bad, m, ex)


def test_level2_training_changes_only_gate_logits():
    import train_router as TR
    m = tiny_model(**TINY)
    m.requires_grad_(False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    moe = tiny_moe(m, tiny_experts(m))
    head_before = {k: v.clone() for k, v in moe.router.head.state_dict().items()}
    calib = {"math": ids(4, 16, seed=3), "code": ids(4, 16, seed=4)}
    logs = []
    TR.train_level2(moe, calib, sparsity_weight=1.0, epochs=2, lr=0.3, tau=1.0, relax="st", batch_size=2, seed=0,
                    log=logs.append)
    assert len(logs) == 2 and logs[0].startswith("level2 epoch   1 | kl ")
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # the LLM is frozen
    assert all(torch.equal(v, head_before[k]) for k, v in moe.router.head.state_dict().items())
    g = moe.router.gate_logits.detach()
    rows = [DOMAINS.index(d) for d in calib]
    assert g[rows].abs().sum() > 0  # trained domains moved
    assert g[[DOMAINS.index("general"), DOMAINS.index("knowledge")]].abs().sum() == 0  # untrained stay at init


@pytest.mark.slow
def test_level2_nll_target_can_prefer_an_expert_that_fits_better():
    """With --l2-target kl the gates can only approach dense (KL is least there); with nll they open
    where the expert predicts the domain's own text better than dense."""
    import train_router as TR
    m = tiny_model(**TINY)
    m.requires_grad_(False)
    with torch.no_grad():
        m.lm_head.weight.mul_(4)  # sharper (tied) logits: the expert's and dense predictions differ clearly
    moe = tiny_moe(m, tiny_experts(m))
    expert_everywhere = moe.mlps_for(moe.decision_for(("math",), use_expert=(True,) * m.config.n_layer))
    x = ids(4, 4, seed=3)  # "math" text = the math expert's own greedy continuations of random prompts
    with torch.no_grad():
        for _ in range(28):
            x = torch.cat([x, m(x, mlps=expert_everywhere)[:, -1:].argmax(-1)], 1)  # (4, 32)
    dense_ppl = SC.perplexity(m, x)
    assert SC.perplexity(m, x, expert_everywhere) < dense_ppl
    chosen = {}
    for target in ("kl", "nll"):
        with torch.no_grad():
            moe.router.gate_logits.zero_()
        TR.train_level2(moe, {"math": x}, sparsity_weight=0.0, epochs=10, lr=0.3, tau=1.0, relax="st",
                        batch_size=2, seed=0, target=target, log=lambda s: None)
        chosen[target] = moe.decision_for(("math",))
    assert not any(chosen["kl"].use_expert)  # without a sparsity reward, matching dense means being dense
    assert any(chosen["nll"].use_expert)
    assert SC.perplexity(m, x, moe.mlps_for(chosen["nll"])) < dense_ppl


def test_level1_training_learns_separable_features():
    import train_router as TR
    torch.manual_seed(0)
    centers = torch.randn(4, 64) * 3
    y = torch.arange(4).repeat(50)
    feats = centers[y] + torch.randn(200, 64)
    cfg = R.RouterConfig(domains=DOMAINS, n_layer=4, n_embd=64, route_layer=1, hidden=16)
    r = R.Router(cfg)
    logs = []
    acc = TR.train_level1(r, feats[:160], y[:160], feats[160:], y[160:], epochs=20, lr=3e-3, seed=0, log=logs.append)
    assert acc == 1.0 and "heldout loss" in logs[-1]
    conf = TR.confusion(r.domain_probs(feats[160:]).argmax(-1), y[160:], 4)
    assert torch.equal(conf, torch.diag(torch.bincount(y[160:], minlength=4)))


# ----------------------------------------------------------------------------- real model (slow, kept cheap)

@pytest.fixture(scope="module")
def real(real_model):
    return real_model  # tests/conftest.py


@pytest.mark.slow
def test_level1_accuracy_on_heldout_domain_prompts(real, tmp_path):
    """Level 1 on the real model: >= 90% on held-out windows, snippets and benchmark prompts
    (MMLU -> knowledge, GSM8K -> math, HumanEval -> code); confusion matrix printed and saved."""
    import train_router as TR
    m, tok = real
    tr_p, tr_y, _ = TR.level1_prompts(DOMAINS, tok, None, "calib", 40, 30, 0, seed=0, max_len=128)
    va_p, va_y, va_src = TR.level1_prompts(DOMAINS, tok, None, "heldout", 12, 12, 16, seed=0, max_len=128)
    cfg = R.RouterConfig(domains=DOMAINS, n_layer=m.config.n_layer, n_embd=m.config.n_embd,
                         route_layer=R.default_route_layer(m.config.n_layer))
    tr_f = R.prompt_features(m, tr_p, cfg.route_layer)
    va_f = R.prompt_features(m, va_p, cfg.route_layer)
    torch.manual_seed(0)
    router = R.Router(cfg)
    acc = TR.train_level1(router, tr_f, tr_y, va_f, va_y, epochs=60, lr=3e-3, seed=0)
    with torch.no_grad():
        pred = router.domain_probs(va_f).argmax(-1)
    conf = TR.confusion(pred, va_y, len(DOMAINS))
    table = TR.confusion_markdown(conf, DOMAINS)
    bench = torch.tensor([s == "bench" for s in va_src])
    bench_acc = float((pred[bench] == va_y[bench]).float().mean())
    print(f"\nlevel 1 held-out accuracy {acc:.3f} ({len(va_y)} prompts; benchmark prompts {bench_acc:.3f})\n{table}")
    out = tmp_path  # the table is printed above; the files stay out of the repository
    (out / "router_level1_confusion.md").write_text(f"held-out accuracy {acc:.3f}, benchmark prompts {bench_acc:.3f}"
                                                     f"\n\n{table}\n")
    (out / "router_level1_confusion.json").write_text(json.dumps({"domains": DOMAINS, "confusion": conf.tolist(),
                                                                  "accuracy": acc, "bench_accuracy": bench_acc}))
    assert acc >= 0.9 and bench_acc >= 0.9
    assert int(conf.sum()) == len(va_y)


def magnitude_experts(m, keep=0.5):
    """Cheap stand-in experts for the sparsity-weight sweep (no statistics pass): the neurons with the largest
    weight norms."""
    up = torch.stack([torch.cat(blk.mlp.up_weights(), 1).norm(dim=1) for blk in m.layers])  # (L, F)
    down = torch.stack([blk.mlp.down_weight().norm(dim=0) for blk in m.layers])  # (L, F)
    k = int(keep * m.config.n_ffn)
    idx = [s.topk(k).indices.sort().values for s in up * down]
    return SimpleNamespace(domains=list(DOMAINS), indices={d: idx for d in DOMAINS}, meta={})


@pytest.mark.slow
def test_sparsity_weight_sweep_lowers_active_fraction(real):
    """Level 2 on the real model: a larger sparsity weight w gives a smaller (never larger) active fraction;
    the perplexity cost of each point is reported."""
    import train_router as TR
    m, tok = real
    experts = magnitude_experts(m)
    calib = {"math": data.load_domain_tokens("math", tok, None, "calib", 4 * 48, 1, 48)}  # (4, 48)
    heldout = data.load_domain_tokens("math", tok, None, "heldout", 2 * 128, 0, 128)  # (2, 128)
    dense_ppl = SC.perplexity(m, heldout)
    rows = []
    for w in (0.0, 0.3, 3.0):
        cfg = R.RouterConfig(domains=DOMAINS, n_layer=m.config.n_layer, n_embd=m.config.n_embd, route_layer=7)
        moe = R.FreeMoE(m, experts, R.Router(cfg))
        TR.train_level2(moe, calib, w, epochs=2, lr=0.3, tau=1.0, relax="st", batch_size=2, seed=0,
                        log=lambda s: None)
        dec = moe.decision_for(("math",))
        ppl = SC.perplexity(m, heldout, moe.mlps_for(dec))
        rows.append((w, dec.active_fraction, ppl))
    print("\n| w | active FFN | held-out math ppl | dense ppl |\n|---|---|---|---|")
    for w, frac, ppl in rows:
        print(f"| {w} | {frac:.3f} | {ppl:.2f} | {dense_ppl:.2f} |")
    fracs = [r[1] for r in rows]
    assert fracs[0] >= fracs[1] >= fracs[2] and fracs[0] > fracs[2]
    assert all(math.isfinite(r[2]) for r in rows)


# ----------------------------------------------------------------------------- level 3

@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_gathered_ffn_equals_the_masked_one(arch):
    m = tiny_model(arch, vocab=64, n_layer=2, n_embd=32, n_ffn=48)
    mlp = m.layers[0].mlp
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    g = mlp.gate_acts(x)
    keep = torch.rand(g.shape, generator=torch.Generator().manual_seed(1)) < 0.4  # (B, T, F) random pattern
    ref = mlp.masked(x, g, keep)  # (B, T, C)
    for b in range(3):
        for t in range(5):
            got = mlp.active_forward(x[b, t], g[b, t], keep[b, t].nonzero().flatten())
            torch.testing.assert_close(got, ref[b, t], rtol=1e-5, atol=1e-6)
    every = torch.ones_like(keep)
    torch.testing.assert_close(mlp.masked(x, g, every), mlp(x), rtol=1e-5, atol=1e-6)  # nothing skipped = dense
    one = mlp.active_forward(x[0, 0], g[0, 0], torch.arange(48))
    torch.testing.assert_close(one, mlp(x)[0, 0], rtol=1e-5, atol=1e-6)
    none = mlp.active_forward(x[0, 0], g[0, 0], torch.zeros(0, dtype=torch.long))  # every neuron skipped
    torch.testing.assert_close(none, mlp.down.bias if mlp.down.bias is not None else torch.zeros(32))


def test_skipping_mlp_counts_and_both_paths_agree():
    m = tiny_model("llama", vocab=64, n_layer=2, n_embd=32, n_ffn=48)
    mlp = m.layers[1].mlp
    x = torch.randn(1, 3, 32, generator=torch.Generator().manual_seed(2))
    thr = float(mlp.gate_acts(x).abs().median()) + 1e-4  # between two values: no borderline neuron
    small = R.SkippingMLP(mlp, thr)
    gathered = torch.cat([small(x[:, t:t + 1]) for t in range(3)], 1)  # one token at a time: the gathered path
    assert small.tokens == 3 and int(small.reads) == int((mlp.gate_acts(x).abs() >= thr).sum())
    wide = R.SkippingMLP(mlp, thr)
    masked = wide(x)  # 3 tokens: above GATHER_ROWS, the masked path
    torch.testing.assert_close(gathered, masked, rtol=1e-5, atol=1e-6)
    everything = R.SkippingMLP(mlp, 0.0)
    torch.testing.assert_close(everything(x), mlp(x), rtol=1e-5, atol=1e-6)  # threshold 0 = dense
    assert R.measured_active_fraction([everything], 48) == 1.0
    assert R.measured_active_fraction([small], 48) == int(small.reads) / (3 * 48)


def test_skipping_mlp_runs_on_meta():
    m = tiny_model("llama", vocab=64, n_layer=2, n_embd=32, n_ffn=48).to("meta")
    out = R.SkippingMLP(m.layers[0].mlp, 0.1)(torch.empty(2, 7, 32, device="meta"))  # the masked path: no data
    assert out.shape == (2, 7, 32) and out.device.type == "meta"


def test_thresholds_skip_the_target_fraction_on_their_own_text():
    m = tiny_model(**TINY)
    w = ids(B=6, T=20, seed=3)
    thr = R.level3_thresholds(m, w)  # (L, S)
    assert thr.shape == (4, R.LEVEL3_STEPS) and (thr[:, 0] == 0).all()
    assert (thr[:, 1:] >= thr[:, :-1]).all()  # quantiles rise with the target
    for step in (25, 40, 50, 90):
        mlps = [R.SkippingMLP(b.mlp, float(thr[l, step])) for l, b in enumerate(m.layers)]
        with torch.no_grad():
            m(w, mlps=mlps)
        skipped = 1 - R.measured_active_fraction(mlps, m.config.n_ffn)
        assert skipped == pytest.approx(step / R.LEVEL3_STEPS, abs=0.01)


def test_level3_in_the_routed_model_and_the_router_file(tmp_path):
    m = tiny_model(**TINY)
    experts = tiny_experts(m)
    moe = tiny_moe(m, experts)
    with torch.no_grad():
        moe.router.gate_logits.copy_(torch.tensor([[1.0, -1.0, 2.0, -3.0]] * 4))
    with pytest.raises(R.UserError, match="no level 3"):
        R.FreeMoE(m, experts, moe.router, token_sparsity=0.5)
    windows = {d: ids(B=3, T=16, seed=i) for i, d in enumerate(DOMAINS)}
    R.calibrate_level3(moe, windows)
    assert moe.router.cfg.level3 and (moe.router.level3[:, :, 1:] > 0).all()
    dec = moe.decision_for(("math",))
    assert all(not isinstance(f, R.SkippingMLP) for f in moe.mlps_for(dec))  # token sparsity 0: levels 1-2 only
    moe.token_sparsity = 0.5
    mlps = moe.mlps_for(dec)
    assert [f.threshold for f in mlps] == moe.router.level3[DOMAINS.index("math"), :, 50].tolist()
    assert [f.mlp for f in mlps] == moe.static_mlps(dec)  # level 3 wraps the FFNs levels 1-2 chose
    assert [f.threshold for f in moe.mlps_for(moe.decision_for(()))] == moe.router.level3[4, :, 50].tolist()
    path = tmp_path / "router.safetensors"
    R.save_router(path, moe.router, m, experts)
    back = R.load_router(path, m, experts, token_sparsity=0.5)
    assert torch.equal(back.router.level3, moe.router.level3) and back.router.cfg.level3
    assert [f.threshold for f in back.mlps_for(dec)] == [f.threshold for f in mlps]


def test_a_router_file_without_level3_still_loads(tmp_path):
    m = tiny_model(**TINY)
    experts = tiny_experts(m)
    moe = tiny_moe(m, experts)
    state = {k: v for k, v in moe.router.state_dict().items() if k != "level3"}  # as written before level 3
    meta = {"format": R.ROUTER_FORMAT, "fingerprint": m.fingerprint, "experts_identity": R.experts_identity(experts),
            "config": json.dumps({k: v for k, v in vars(moe.router.cfg).items() if k != "level3"}),
            "hparams": "{}", "n_params": "1"}
    path = tmp_path / "old.safetensors"
    ckpt.write_safetensors(path, state, meta, checksum=True)
    back = R.load_router(path, m, experts)
    assert not back.router.cfg.level3 and torch.equal(back.router.gate_logits, moe.router.gate_logits)
    with pytest.raises(R.UserError, match="no level 3"):
        R.load_router(path, m, experts, token_sparsity=0.25)


def test_level3_decode_reads_less_and_decodes_the_same_tokens(monkeypatch):
    m = tiny_model(**TINY, emb_scale=4.0)
    thr = R.level3_thresholds(m, ids(B=4, T=16, seed=5))
    prompt = ids(B=1, T=6, seed=6)[0].tolist()

    def run():
        mlps = [R.SkippingMLP(b.mlp, float(thr[l, 40])) for l, b in enumerate(m.layers)]
        return G.generate(m, [prompt], 8, mlps=mlps, stop_ids=set())[0], mlps

    gathered, mlps = run()
    assert 0.5 < R.measured_active_fraction(mlps, m.config.n_ffn) < 0.7  # ~40% skipped
    monkeypatch.setattr(R, "GATHER_ROWS", 0)  # every step masked: the reference
    masked, _ = run()
    assert gathered == masked


def test_routed_generation_with_level3_equals_the_decisions_ffns():
    """Routing inside the prefill with level 3 on: the same tokens as generating with the decision's level-3 FFNs
    from the start (level 3 changes every layer, so the prefill is redone whole)."""
    m = tiny_model(**TINY, emb_scale=4.0)
    experts = tiny_experts(m)
    moe = tiny_moe(m, experts, threshold=0.0)
    with torch.no_grad():
        moe.router.gate_logits.copy_(torch.tensor([[-1.0, -1.0, 2.0, -3.0]] * 4))  # an early layer stays dense
    R.calibrate_level3(moe, {d: ids(B=2, T=16, seed=i) for i, d in enumerate(DOMAINS)})
    moe.token_sparsity = 0.3
    prompt = ids(B=1, T=9, seed=8)[0].tolist()
    m.setup_cache(1, 16)
    decided = []
    with torch.no_grad():
        logits, _ = moe._routed_prefill(torch.tensor([prompt]), None, decided)
    m.clear_cache()
    with torch.no_grad():
        reference = m(torch.tensor([prompt]), mlps=moe.mlps_for(decided[0]))[:, -1:]
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)  # layer 0 ran level 3 too
    (routed,), (dec,) = moe.generate([prompt], 6, stop_ids=set())
    direct = G.generate(m, [prompt], 6, mlps=moe.mlps_for(dec), stop_ids=set())[0]
    assert routed == direct
    assert 0.5 < R.measured_active_fraction(moe.last_level3, m.config.n_ffn) < 0.8
