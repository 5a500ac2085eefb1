"""Tests for bench.py: the work counts behind its fractions and ideal speedups (FLOPs against torch's own counter,
bytes per decode step), its decode loops, its router and scoring sections, and its CUDA goals and report from a
made-up result, on tiny random models. Wall-clock numbers are never asserted (they depend on the machine); what is
checked is what they are divided by."""
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
import generate as G
import scoring as SC
from conftest import tiny_model

TINY = dict(vocab=97, max_seq_len=64)  # the tiny model of the bench tests: tiny_model(arch, **TINY)


def matmul_flops(fn) -> int:
    """FLOPs of every matmul fn runs, counted by torch itself (the oracle; attention kernels are not counted on CPU)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return sum(v for k, v in fc.get_flop_counts()["Global"].items() if str(k) in ("aten.mm", "aten.addmm", "aten.bmm"))


def attention_flops(cfg, B, T, S0):
    return B * cfg.n_layer * 4 * cfg.n_head * cfg.head_dim * (T * S0 + T * (T + 1) // 2)


def test_forward_flops_match_torch_counter_dense_and_expert():
    for arch in ("llama", "gpt2"):
        m = tiny_model(arch, **TINY)
        cfg, x = m.config, torch.randint(0, 97, (3, 10))
        with torch.no_grad():
            counted = matmul_flops(lambda: m(x, last_only=True))
            assert bench.forward_flops(cfg, [48, 48], 3, 10, 0, 1) - attention_flops(cfg, 3, 10, 0) == counted
            mlps = [blk.mlp.select(torch.arange(0, 48, 2)) for blk in m.layers]  # keep 24 of 48 neurons
            counted = matmul_flops(lambda: m(x, mlps=mlps, last_only=True))
            kept = bench.neurons_per_layer(m, mlps)
            assert kept == [24, 24]
            assert bench.forward_flops(cfg, kept, 3, 10, 0, 1) - attention_flops(cfg, 3, 10, 0) == counted


def test_decode_flops_match_torch_counter_with_cache():
    m = tiny_model(**TINY)
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
    m = tiny_model(**TINY)
    weights = sum(p.numel() for n, p in m.named_parameters() if "norm" not in n)  # tied: embedding = LM head, once
    cfg = m.config
    kv = sum(1 * cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim * (5 + s + 1) for s in range(3))
    assert bench.decode_bytes(m, [48, 48], 1, 5, 3) == 4 * (3 * weights + kv)


def test_bench_decode_loop_gives_generate_tokens():
    """The timed loop must be real greedy decoding: the same tokens as generate.generate, with and without an expert."""
    m = tiny_model(**TINY)
    x = torch.randint(0, 97, (2, 6))
    mlps = [blk.mlp.select(torch.arange(30)) for blk in m.layers]
    with torch.inference_mode():
        for sub in (None, mlps):
            _, toks = bench.ours_decode(m, x, 7, sub)
            ref = G.generate(m, x.tolist(), 7, stop_ids=set(), mlps=sub)
            assert toks.tolist() == [r[:7] for r in ref]


def test_goals_report_misses_with_gap():
    g = bench.goal("x", 0.6, 0.75, why="bound")
    assert not g["met"] and abs(g["gap_pct"] - 20.0) < 1e-9 and g["bound"] == "bound"
    assert bench.goal("y", 2.0, 3.0, higher=False)["met"]


def test_router_section_compares_routed_and_unrouted_requests():
    """bench_router times fm.generate (routing inside the prefill) against the same FFNs given up front; the routed
    request must decide as route() does, and the report carries both overheads."""
    import router as R
    m = tiny_model(**TINY)
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


# ----------------------------------------------------------------------------- the GPU parts, on the CPU

def test_static_decode_loop_gives_generate_tokens():
    m = tiny_model(**TINY)
    x = torch.randint(0, 97, (2, 6))
    with torch.inference_mode():
        _, toks = bench.ours_decode(m, x, 7, decode="static")
    assert toks.tolist() == G.generate(m, x.tolist(), 7, stop_ids=set())


def test_transformers_column_comes_from_our_export():
    """The transformers model is built from our own HF export (no gguf needed): the same logits as ours."""
    for arch in ("llama", "gpt2"):
        m = tiny_model(arch, **TINY)
        m.tok_emb.weight.data.mul_(20.0)  # logits well apart, so the comparison means something
        hf, why = bench.load_hf(m, torch.device("cpu"), torch.float32)
        assert why is None, why
        x = torch.randint(0, 97, (2, 9))
        with torch.no_grad():
            assert (hf(x).logits - m(x)).abs().max() < 1e-4


def test_scoring_section_counts_rows_tokens_and_flops():
    m = tiny_model(**TINY)
    m.config.max_seq_len = 1024  # room for the 400..800-token MMLU-shaped contexts
    plan = {"scoring_items": 2, "reps": 1}
    res = bench.bench_scoring(m, plan, torch.device("cpu"), matmul_gflops=1.0)
    reqs = bench.scoring_requests(97, 2)
    shared = SC.shared_contexts(reqs, 1024)  # the cloze context of each item runs once, its 4 answers after it
    assert len(reqs) == 16 and res["rows"] == 2 and len(shared) == 2  # per item one letters row
    letters = {tuple((c + x)[:-1]) for c, x in reqs if tuple(c) not in shared}
    cloze = sum(len(c) + sum(len(reqs[r][1]) - 1 for r in rs) for c, rs in shared.items())
    assert res["tokens"] == sum(map(len, letters)) + cloze
    assert res["tokens_per_s"]["median"] > 0 and res["of_forward_ceiling"] == res["gflops"] / 1.0
    assert res["ceiling_tokens_per_s"] > 0


def fake_cuda_result():
    """A made-up CUDA bench result: what goals() and markdown() make of the GPU sections."""
    dec = lambda s: {"prefill_s": {"median": 0.01}, "prefill_tok_s": {"median": 1e4, "min": 1e4, "max": 1e4},  # noqa
                     "decode_s": {"median": s}, "decode_tok_s": {"median": 128 / s, "min": 1, "max": 1},
                     "prefill_gflops": 1.0, "prefill_of_matmul": 0.5, "decode_gbs": 1.0, "decode_of_bandwidth": 0.5}
    row = lambda b: {"batch": b, "prompt": 128, "new_tokens": 128, "ceiling_matmul_gflops": 1e5,  # noqa
                     "ceiling_read_gbs": 3e3, "ours": dec(0.256), "ours eager": dec(2.0), "transformers": dec(2.56),
                     "decode_vs_eager": 2.0 / 0.256, "graph_tokens_identical": True, "prefill_ratio": 1.2,
                     "decode_ratio": 10.0, "tokens_identical": False, "tokens_agree": 0.97}
    ceil = {k: {"shape": [8192, 8192, 8192], "dtype": "bfloat16", "gflops": {"median": 7e5, "min": 6e5, "max": 8e5}}
            for k in ("matmul_ffn_shape", "matmul_square", "matmul_bf16_square", "matmul_fp32_square")}
    ceil.update({k: {"bytes": 2**30, "gbs": {"median": 4e3, "min": 3e3, "max": 4e3}}
                 for k in ("read_gemv", "read_sum")})
    prof = {"decode_graph": {"wall_s_per_step": 0.003, "kernel_s_per_step": 0.0015, "kernels_per_step": 1200,
                             "gpu_busy": 0.5},
            "decode_eager": {"wall_s_per_step": 0.02, "kernel_s_per_step": 0.0018, "kernels_per_step": 1200,
                             "gpu_busy": 0.09},
            "prefill": {"wall_s_per_step": 0.01, "kernel_s_per_step": 0.009, "kernels_per_step": 1300, "gpu_busy": 0.9}}
    return {"meta": {"model": "m", "device": "cuda", "dtype": "bfloat16", "threads": 1, "reps": 3},
            "ceilings": ceil, "dense": [row(1), row(64)], "profile": prof,
            "scoring": {"items": 64, "rows": 320, "tokens": 190000, "batch_tokens": 32768,
                        "tokens_per_s": {"median": 5e5, "min": 4e5, "max": 6e5}, "gflops": 2e5,
                        "of_forward_ceiling": 0.3, "ceiling_tokens_per_s": 1.6e6}}


def test_cuda_goals_and_report_from_a_made_up_result():
    res = fake_cuda_result()
    res["goals"] = bench.goals(res)
    by_name = {g["goal"].split(" (")[0]: g for g in res["goals"] if g["goal"].endswith("(GPU)")}
    assert by_name["decode b1x128 vs transformers eager"]["met"]  # 10.0 >= 10
    assert by_name["decode b64x128 CUDA graph vs eager decode"]["met"]  # 7.8 >= 3
    score = by_name["MMLU-style scoring of the forward ceiling"]
    assert not score["met"] and abs(score["gap_pct"] - 40.0) < 1e-9 and "CUDA profiler prefill" in score["bound"]
    why = bench.cuda_why(res, res["dense"][0])[0]
    # graph: 1.5 ms of kernels in a 2 ms step (0.256 s / 128) = 75% busy; eager: 1.8 of 15.6 ms = 12%, launch-bound
    assert "75% busy" in why and "12% busy" in why and "launch-bound" in why
    text = bench.markdown(res)
    for line in ("matmul GFLOP/s, bfloat16, 8192x8192 @ 8192x8192", "read GB/s, 1024 MiB gemv", "| ours eager |",
                 "**CUDA graph / eager**", "(97% equal)", "MMLU-style scoring", "| decode_graph | 1200 |"):
        assert line in text, line


def test_level3_section_on_a_tiny_model():
    """The level3 section: the gathered FFN equals the masked one, the ideals come from bytes, the table prints."""
    m = tiny_model(**TINY)
    with torch.inference_mode():
        res = bench.bench_level3(m, None, {"reps": 1, "new_tokens": 3}, torch.device("cpu"))
    assert [f["skipped"] for f in res["ffn"]] == list(bench.LEVEL3_FFN_S)
    for f in res["ffn"]:
        assert f["max_rel_diff_vs_masked"] < 1e-5 and abs(f["ideal"] - 3 / (1 + 2 * (1 - f["skipped"]))) < 1e-9
    assert "profile" in res["ffn"][2] and len(res["step"]) == len(bench.LEVEL3_STEP_S)
    for s in res["step"]:
        assert 0 < s["active_fraction"] < 1 and s["ideal"] > 1 and s["tok_s"] > 0
    assert [p["rows"] for p in res["patterns"]] == ["contiguous", "every second", "scattered"]
    assert res["patterns"][0]["per_byte_vs_contiguous"] == 1.0 and all(p["ms"] > 0 for p in res["patterns"])
    order = res["order"]
    assert [r["order"] for r in order["rows"]] == ["stored", "hot-first"] and order["tokens"] == 64
    assert all(r["max_rel_diff_vs_stored"] < 1e-5 and r["mean_run"] >= 1 for r in order["rows"])
    text = "\n".join(bench.level3_markdown(res))
    assert "FFN alone" in text and "level3 s=0.50" in text and "profile, FFN gathered" in text
    assert "| hot-first |" in text and "the two gathers alone" in text


def test_hot_first_order_is_the_same_ffn_with_the_busiest_neurons_first():
    assert bench.mean_run(torch.tensor([0, 1, 2, 5, 6, 9])) == 2.0 and bench.mean_run(torch.tensor([3])) == 1.0
    mlp = tiny_model(**TINY).layers[0].mlp
    x = torch.randn(200, mlp.up.in_features, generator=torch.Generator().manual_seed(0))
    thr = mlp.gate_acts(x).abs().median().item()
    hot = bench.hot_first(mlp, x, thr)
    torch.testing.assert_close(hot(x), mlp(x), rtol=1e-5, atol=1e-6)
    busy = (hot.gate_acts(x).abs() >= thr).float().mean(0)  # (F,) in the new order
    assert bool((busy.diff() <= 0).all()) and busy[0] > busy[-1]
