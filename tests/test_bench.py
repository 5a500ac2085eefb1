"""bench.py: the work counts behind its fractions and ideal speedups, and its decode loop, on tiny random models.

Wall-clock numbers are never asserted (they depend on the machine); what is checked is what they are divided by."""
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import model as M


def tiny(arch="llama"):
    torch.manual_seed(0)
    cfg = M.Config(arch=arch, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else 4, n_embd=32,
                   n_ffn=48, max_seq_len=64)
    return M.Transformer(cfg).eval()


def matmul_flops(fn) -> int:
    """FLOPs of every matmul fn runs, counted by torch itself (the oracle; attention kernels are not counted on CPU)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return sum(v for k, v in fc.get_flop_counts()["Global"].items() if str(k) in ("aten.mm", "aten.addmm", "aten.bmm"))


def attention_flops(cfg, B, T, S0):
    return B * cfg.n_layer * 4 * cfg.n_head * cfg.head_dim * (T * S0 + T * (T + 1) // 2)


def test_forward_flops_match_torch_counter_dense_and_expert():
    for arch in ("llama", "gpt2"):
        m = tiny(arch)
        cfg, x = m.config, torch.randint(0, 97, (3, 10))
        with torch.no_grad():
            counted = matmul_flops(lambda: m(x, last_only=True))
            assert bench.forward_flops(cfg, [48, 48], 3, 10, 0, 1) - attention_flops(cfg, 3, 10, 0) == counted
            mlps = [blk.mlp.select(torch.arange(0, 48, 2)) for blk in m.layers]  # keep 24 of 48 neurons
            counted = matmul_flops(lambda: m(x, mlps=mlps, last_only=True))
            kept = bench.kept_per_layer(m, mlps)
            assert kept == [24, 24]
            assert bench.forward_flops(cfg, kept, 3, 10, 0, 1) - attention_flops(cfg, 3, 10, 0) == counted


def test_decode_flops_match_torch_counter_with_cache():
    m = tiny()
    x = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        m.setup_cache(2, 9)
        m(x, 0, last_only=True)
        counted = matmul_flops(lambda: [m(x[:, :1], 5 + s) for s in range(4)])
        m.clear_cache()
    attention = sum(attention_flops(m.config, 2, 1, 5 + s) for s in range(4))
    expected = bench.decode_flops(m.config, [48, 48], 2, 5, 4) - attention
    assert expected == counted


def test_decode_bytes_count_every_weight_once_per_step():
    m = tiny()
    weights = sum(p.numel() for n, p in m.named_parameters() if "norm" not in n)  # tied: embedding = LM head, once
    cfg = m.config
    kv = sum(1 * cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim * (5 + s + 1) for s in range(3))
    assert bench.decode_bytes(m, [48, 48], 1, 5, 3) == 4 * (3 * weights + kv)


def test_bench_decode_loop_gives_generate_tokens():
    """The timed loop must be real greedy decoding: the same tokens as model.generate, with and without an expert."""
    m = tiny()
    x = torch.randint(0, 97, (2, 6))
    mlps = [blk.mlp.select(torch.arange(30)) for blk in m.layers]
    with torch.inference_mode():
        for sub in (None, mlps):
            _, toks = bench.ours_decode(m, x, 7, sub)
            ref = M.generate(m, x.tolist(), 7, stop_ids=set(), mlps=sub)
            assert toks.tolist() == [r[:7] for r in ref]


def test_goals_report_misses_with_gap():
    g = bench.goal("x", 0.6, 0.75, why="bound")
    assert not g["met"] and abs(g["gap_pct"] - 20.0) < 1e-9 and g["bound"] == "bound"
    assert bench.goal("y", 2.0, 3.0, higher=False)["met"]


def test_router_section_compares_routed_and_unrouted_requests():
    """bench_router times fm.generate (routing inside the prefill) against the same FFNs given up front; the routed
    request must decide as route() does, and the report carries both overheads."""
    import router as R
    m = tiny()
    cfg = m.config
    g = torch.Generator().manual_seed(0)
    domains = ["general", "code"]
    experts = type("E", (), {"domains": domains, "meta": {},
                             "indices": {d: [torch.randperm(48, generator=g)[:24].sort().values for _ in range(2)]
                                         for d in domains}})()
    rcfg = R.RouterConfig(domains=domains, n_layer=2, n_embd=cfg.n_embd, route_layer=1, hidden=0, threshold=0.0)
    fm = R.FreeMoE(m, experts, R.Router(rcfg))
    with torch.no_grad():
        fm.router.gate_logits.fill_(1.0)
    res = bench.bench_router(m, fm, {"new_tokens": 3, "sizes": [(1, 8)], "reps": 1}, torch.device("cpu"))
    assert res["decision_domain"] in domains and res["active_fraction"] < 1.0 and res["prompt"] == 8
    for k in ("route_s", "routed_s", "unrouted_s"):
        assert res[k]["min"] <= res[k]["median"] <= res[k]["max"]
    assert {"overhead_pct_per_decode_step", "separate_route_pct_per_decode_step"} <= set(res)
    text = bench.markdown({"meta": {"model": "tiny", "device": "cpu", "dtype": "float32", "threads": 1, "reps": 1},
                           "router": res})
    assert "routed request" in text and "per decode step" in text
