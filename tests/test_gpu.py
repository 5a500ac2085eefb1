"""Device tests, across generate.py, scoring.py, dowp.py, experts.py, router.py, train_router.py and cli.py: every
tensor follows the model's device, and the GPU paths equal the CPU ones.

Two kinds:

* Everywhere (CPU): the pipeline on PyTorch's `meta` device. A meta tensor has a device but no data, and torch
  refuses to mix it with a CPU tensor just as it refuses to mix CUDA and CPU ("Expected all tensors to be on the
  same device"), so a tensor made without device=... (a buffer, a cache, an index, a mask, a feature cache read
  from disk) fails here as it would on a GPU. The host reads the code does on purpose (tokens for stop checks,
  the scores, logged losses) are stood in by zeros and counted, which also pins how often a path waits for the
  device: loglikelihoods once per call, generate once per step.
* `cuda`-marked, skipped without a GPU: CUDA-graph decode is token-identical to eager decode (greedy, sampling,
  left-padded, routed); the tiny pipeline purify -> train_router -> evaluate -> generate through the CLIs on cuda
  equals the same run on the CPU within tolerance; `--device auto` picks the GPU.

    python -m pytest -q tests/test_gpu.py            # the meta tests here; the cuda ones too on a GPU machine
    python -m pytest -q -m cuda tests/test_gpu.py    # only the GPU tests (make gpu-check runs them)
"""
import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import cli  # noqa: E402
import generate as G  # noqa: E402
import model as M  # noqa: E402
import dowp  # noqa: E402
import experts as EX  # noqa: E402
import scoring as SC  # noqa: E402
import router as R  # noqa: E402
import train_router as TR  # noqa: E402
from conftest import smol_hf_tokenizer, tiny_model  # noqa: E402

CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SMOL_HF_TOK = smol_hf_tokenizer()
DOMAINS = ["general", "code", "math", "knowledge"]


# the device tests' model: tiny_model(arch, **TINY) (gemma3: a window of 5 on layer 0); logits spread enough that
# sampling is not argmax
TINY = dict(vocab=512, n_layer=4, n_embd=64, n_ffn=256, name="tiny", emb_scale=0.3)


def tiny_moe(model, seed=0):
    """Hand-made experts (half the neurons of every layer) and an untrained router whose gates all say "expert"."""
    g = torch.Generator().manual_seed(seed)
    Fn, L = model.config.n_ffn, model.config.n_layer
    indices = {d: [torch.randperm(Fn, generator=g)[:Fn // 2].sort().values for _ in range(L)] for d in DOMAINS}
    experts = type("Experts", (), {"domains": list(DOMAINS), "indices": indices, "meta": {}})()
    cfg = R.RouterConfig(domains=list(DOMAINS), n_layer=L, n_embd=model.config.n_embd, route_layer=1, hidden=16,
                         threshold=0.0)
    torch.manual_seed(seed + 1)
    moe = R.FreeMoE(model, experts, R.Router(cfg))
    with torch.no_grad():
        moe.router.gate_logits.fill_(1.0)
    return moe


PROMPTS = [[5, 9, 2], [7, 1, 1, 3, 40, 12, 8, 30, 2], [3], [60, 61, 62, 63, 1, 2]]  # left padded to 9


# ----------------------------------------------------------------------------- flags

def test_device_and_dtype_flags():
    ns = lambda **kw: argparse.Namespace(**kw)  # noqa: E731
    with mock.patch.object(torch.cuda, "is_available", lambda: False):
        assert cli.resolve_device(ns(device="auto")) == torch.device("cpu")
        assert cli.resolve_dtype(ns(device="auto", dtype="auto")) == torch.float32
        with pytest.raises(cli.UserError, match="CUDA is not available"):
            cli.resolve_device(ns(device="cuda"))
    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "device_count", lambda: 2):
        assert cli.resolve_device(ns(device="auto")) == torch.device("cuda")
        assert cli.resolve_device(ns(device="cuda:1")) == torch.device("cuda:1")
        assert cli.resolve_dtype(ns(device="auto", dtype="auto")) == torch.bfloat16
        with pytest.raises(cli.UserError, match="only 2 CUDA device"):
            cli.resolve_device(ns(device="cuda:2"))
    assert cli.resolve_dtype(ns(dtype="auto"), torch.device("cuda")) == torch.bfloat16
    assert cli.resolve_dtype(ns(dtype="float32"), torch.device("cuda")) == torch.float32
    for bad in ("tpu", "gpu", "mps"):
        with pytest.raises(cli.UserError, match="--device"):
            cli.resolve_device(ns(device=bad))


# ----------------------------------------------------------------------------- every tensor follows the model (meta)

@contextlib.contextmanager
def host_reads():
    """For meta tensors: .tolist(), .cpu(), .item(), float() and int() return zeros of the right shape and are
    counted (as (kind, shape)). Anything else that needs data still raises, as does an op mixing in a CPU tensor."""
    calls = []
    real = {k: getattr(torch.Tensor, k) for k in ("tolist", "cpu", "item")}

    def stand_in(kind):
        def f(t, *a, **kw):
            if t.device.type != "meta":
                return real[kind](t, *a, **kw)
            calls.append((kind, tuple(t.shape)))
            zeros = torch.zeros(t.shape, dtype=t.dtype)
            return zeros if kind == "cpu" else real[kind](zeros)
        return f
    patches = [mock.patch.object(torch.Tensor, k, stand_in(k)) for k in real]
    patches += [mock.patch.object(torch.Tensor, "__float__", lambda t: float(torch.Tensor.item(t))),
                mock.patch.object(torch.Tensor, "__int__", lambda t: int(torch.Tensor.item(t)))]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield calls


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_generation_follows_the_model_device_and_reads_the_host_once_per_step(arch):
    m = tiny_model(arch, **TINY).to("meta")
    for decode in ("dynamic", "static"):
        for prompts in (PROMPTS[:1], PROMPTS):
            with host_reads() as calls:
                out = G.generate(m, prompts, 5, stop_ids=set(), decode=decode)
            assert [len(r) for r in out] == [5] * len(prompts)
            assert calls == [("tolist", (len(prompts),))] * 5, (decode, calls)  # the sampled tokens, once a step
    with host_reads():  # a chunked prefill over the cache builds its own causal mask
        m.setup_cache(1, 8)
        m(torch.zeros(1, 3, dtype=torch.long, device="meta"), 0)
        m(torch.zeros(1, 3, dtype=torch.long, device="meta"), 3)
        m.clear_cache()


def test_scoring_follows_the_model_device_and_copies_to_the_host_once():
    m = tiny_model(**TINY).to("meta")
    reqs = [([1, 2, 3, 4], [5]), ([1, 2, 3, 4], [6]), ([7] * 30, [8, 9, 10]), ([7] * 30, [11, 12]), ([2], [3] * 5)]
    assert list(SC.shared_contexts(reqs, 512)) == [(7,) * 30]  # both paths: rows, and a context run once
    with host_reads() as calls:
        out = SC.loglikelihoods(m, reqs, batch_tokens=40)  # several batches
    assert len(out) == len(reqs)
    assert [kind for kind, _ in calls] == ["tolist"], calls  # one device->host copy for the whole call


def test_pipeline_stages_follow_the_model_device():
    """purify's statistics and experts, routing, routed generation and scoring, perplexity, and both levels of
    router training (features come from a host-side cache; Gumbel noise is drawn on the host) on a meta model."""
    m = tiny_model(**TINY)
    moe = tiny_moe(m)  # experts and router built on the CPU, then everything moves with the model
    m.to("meta")
    moe.router.to("meta")
    x = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(0))  # (N, T) on the host
    feats, labels = torch.randn(40, 64), torch.arange(4).repeat(10)  # host-side, as cached_features returns them
    with host_reads():
        dowp.collect_stats(m, x, batch_size=2)
        EX.materialize(m, moe.experts.indices["math"])
        SC.perplexity(m, x, moe.mlps_for(moe.decision_for(("math",))))
        moe.route(x.tolist())
        for decode in ("dynamic", "static"):
            moe.generate(x.tolist(), 4, stop_ids=set(), decode=decode)
        moe.score(x)
        TR.train_level1(moe.router, feats, labels, feats, labels, epochs=1, lr=1e-3, seed=0, log=lambda s: None)
        TR.train_level2(moe, {"math": x[:2, :8]}, 1.0, 1, 0.3, 1.0, "st", 2, 0, log=lambda s: None)
    assert moe.router.feat_mean.device.type == "meta" and moe.router.gate_logits.device.type == "meta"


def test_artifacts_save_device_free(tmp_path):
    """A router saved from a model on one device loads onto the device of the model it is loaded for."""
    m = tiny_model(**TINY)
    moe = tiny_moe(m)
    R.save_router(tmp_path / "r.safetensors", moe.router, m, moe.experts)
    router, _ = R.read_router(tmp_path / "r.safetensors")
    assert all(t.device.type == "cpu" for t in router.state_dict().values())
    m.to("meta")
    assert R.load_router(tmp_path / "r.safetensors", m, moe.experts).router.feat_mean.device.type == "meta"


# ----------------------------------------------------------------------------- on a GPU

@cuda
@needs_gpu
def test_device_auto_picks_the_gpu():
    assert cli.resolve_device(argparse.Namespace(device="auto")).type == "cuda"
    assert cli.resolve_dtype(argparse.Namespace(device="auto", dtype="auto")) == torch.bfloat16


@cuda
@needs_gpu
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_decode_equals_eager(arch, dtype):
    """The CUDA graph replays the static step's kernels: the same tokens as the step launched eagerly, for greedy
    and seeded sampling, one row and a left-padded batch. In float32 also the same as the dynamic decode."""
    m = tiny_model(arch, **TINY).to("cuda", dtype)
    for prompts in (PROMPTS[:1], PROMPTS):
        for kw in ({}, dict(temperature=1.0, seed=3), dict(temperature=0.8, top_k=20, top_p=0.9, seed=5)):
            eager = G.generate(m, prompts, 24, stop_ids=set(), decode="static", **kw)
            graph = G.generate(m, prompts, 24, stop_ids=set(), decode="graph", **kw)
            again = G.generate(m, prompts, 24, stop_ids=set(), decode="graph", **kw)  # the captured graph, replayed
            assert graph == eager == again, (arch, dtype, len(prompts), kw)
            if dtype == torch.float32:
                assert graph == G.generate(m, prompts, 24, stop_ids=set(), decode="dynamic", **kw)
    assert all(len(slot.graphs) == 1 for slot in m.decode_slots.values())  # one capture per shape, then replays


@cuda
@needs_gpu
@pytest.mark.slow
def test_compiled_graph_decode_equals_eager():
    """Opt-in decode="compiled" (torch.compile's fused kernels, then our CUDA graph): the tokens of eager decode."""
    m = tiny_model(**TINY).to("cuda")
    for kw in ({}, dict(temperature=1.0, seed=3)):
        eager = G.generate(m, PROMPTS, 16, stop_ids=set(), decode="static", **kw)
        assert G.generate(m, PROMPTS, 16, stop_ids=set(), decode="compiled", **kw) == eager, kw


@cuda
@needs_gpu
def test_routed_graph_decode_equals_eager_and_cpu():
    """FreeMoE on cuda: routing inside the prefill, compact expert FFNs captured in the graph; the same tokens and
    decisions as eager decode on cuda and as the CPU run (float32)."""
    m = tiny_model(**TINY)
    moe_cpu = tiny_moe(m)
    cpu_out, cpu_dec = moe_cpu.generate([PROMPTS[1], PROMPTS[3]], 16, stop_ids=set())
    mg = tiny_model(**TINY).to("cuda")
    moe = tiny_moe(mg)
    for decode in ("static", "graph", "graph"):
        out, dec = moe.generate([PROMPTS[1], PROMPTS[3]], 16, stop_ids=set(), decode=decode)
        assert out == cpu_out and [d.key for d in dec] == [d.key for d in cpu_dec], decode
    nll_cpu, _ = moe_cpu.score(torch.tensor([PROMPTS[1]]))
    nll, _ = moe.score(torch.tensor([PROMPTS[1]]))
    assert torch.allclose(nll, nll_cpu, atol=1e-4)


@cuda
@needs_gpu
def test_scoring_on_gpu_equals_cpu():
    m = tiny_model(**TINY)
    g = torch.Generator().manual_seed(0)
    reqs = [(torch.randint(0, 512, (n,), generator=g).tolist(), torch.randint(0, 512, (k,), generator=g).tolist())
            for n, k in ((5, 1), (40, 3), (90, 2), (7, 30))]
    want = SC.loglikelihoods(m, reqs)
    got = SC.loglikelihoods(m.to("cuda"), reqs)
    assert got == pytest.approx(want, abs=1e-3)


@cuda
@needs_gpu
@pytest.mark.slow
def test_real_model_graph_decode_on_gpu(real_model):
    """SmolLM2-135M in bf16 on cuda: graph decode equals eager static decode token for token (the same kernels);
    the CPU float32 greedy answer to a plain question is the same text."""
    model, tok = real_model
    prompts = [tok.encode(tok.chat_prompt("What is the capital of France?")), tok.encode("def fibonacci(n):")]
    cpu = G.generate(model, prompts, 24, tokenizer=tok)
    gm = M.load_model(None, "cuda", torch.bfloat16)[0]
    graph = G.generate(gm, prompts, 24, tokenizer=tok, decode="graph")
    assert graph == G.generate(gm, prompts, 24, tokenizer=tok, decode="static")
    assert "Paris" in tok.decode(graph[0]) and "Paris" in tok.decode(cpu[0])


# ----------------------------------------------------------------------------- the tiny pipeline through the CLIs

def run_pipeline(tmp: Path, model_dir: Path, device: str, experts=None, router_file=None) -> dict:
    """purify -> train_router -> evaluate -> router.py generate on `device` in float32. Later stages take the given
    experts/router files (the CPU run's), so each stage is compared on the same inputs. Returns the outputs."""
    def run(script, *argv):
        r = subprocess.run([sys.executable, str(REPO / script), "--model", str(model_dir), "--device", device,
                            "--dtype", "float32", *map(str, argv)], capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{script} on {device}: {r.stderr[-3000:]}"
        return r
    out = tmp / device.replace(":", "")
    run("purify.py", "--domains", "general", "code", "math", "knowledge", "--tokens", 512, "--heldout-tokens", 128,
        "--seq-len", 128, "--keep", 0.5, "--no-report", "--out", out / "experts")
    experts = experts or out / "experts" / "experts.safetensors"
    run("train_router.py", "--experts", experts, "--out", out / "router", "--l1-windows", 6, "--l1-snippets", 6,
        "--l1-heldout", 3, "--l1-epochs", 5, "--l2-windows", 2, "--l2-seq-len", 32, "--l2-epochs", 1, "--l2-heldout", 1)
    router_file = router_file or out / "router" / "router.safetensors"
    run("evaluate.py", "--systems", "dense", "freemoe", "--experts", experts, "--router", router_file, "--tasks",
        "mmlu", "gsm8k", "ppl", "--limit", 2, "--mmlu-shots", 0, "--gsm8k-shots", 0, "--gsm8k-max-tokens", 8,
        "--seq-len", 64, "--ppl-domains", "code", "math", "--out", out / "eval")
    gen = run("router.py", "--experts", experts, "--router", router_file, "--prompt", "def add(a, b):",
              "--max-new-tokens", 12)
    items = {p.relative_to(out / "eval" / "items").as_posix(): [json.loads(x) for x in p.read_text().splitlines()[1:]]
             for p in sorted((out / "eval" / "items").rglob("*.jsonl"))}
    return {"experts": out / "experts" / "experts.safetensors", "router": out / "router" / "router.safetensors",
            "items": items, "generated": gen.stdout}


@cuda
@needs_gpu
@pytest.mark.slow
def test_tiny_pipeline_on_cuda_equals_cpu(tmp_path):
    if not SMOL_HF_TOK.exists():
        pytest.skip("needs the shared SmolLM2 tokenizer")
    model = tiny_model(vocab=49152, n_layer=4, n_embd=64, n_ffn=128, max_seq_len=2048, name="tiny-gpu")
    EX.export_hf(model, [None] * 4, tmp_path / "tiny", SMOL_HF_TOK)
    cpu = run_pipeline(tmp_path, tmp_path / "tiny", "cpu")
    gpu = run_pipeline(tmp_path, tmp_path / "tiny", "cuda", experts=cpu["experts"], router_file=cpu["router"])
    assert_same_pipeline(cpu, gpu)


def assert_same_pipeline(cpu: dict, gpu: dict):
    import checkpoints as ckpt
    # purify: the same neurons kept (ties between float sums may swap a few), statistics equal within tolerance
    a, b = ckpt.read_safetensors(cpu["experts"]), ckpt.read_safetensors(gpu["experts"])
    for k in a:
        if k.startswith("stats."):
            assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-3, atol=1e-5), k
        else:
            overlap = len(set(a[k].tolist()) & set(b[k].tolist())) / max(1, len(a[k]))
            assert overlap >= 0.95, (k, overlap)
    # train_router on the same experts: the same router within tolerance
    ra, rb = ckpt.read_safetensors(cpu["router"]), ckpt.read_safetensors(gpu["router"])
    for k in ra:
        assert torch.allclose(ra[k], rb[k], atol=2e-3), k
    # evaluate and generate with the same experts and router: the same records and text
    assert cpu["items"].keys() == gpu["items"].keys()
    for name, recs in cpu["items"].items():
        for x, y in zip(recs, gpu["items"][name]):
            assert x["id"] == y["id"] and x.get("prediction") == y.get("prediction"), (name, x["id"])
            for key in ("loglik_letters", "loglik_cloze"):
                if key in x:
                    assert x[key] == pytest.approx(y[key], abs=1e-3), (name, x["id"], key)
            if "nll" in x:
                assert x["nll"] == pytest.approx(y["nll"], rel=1e-4), (name, x["id"])
    assert gpu["generated"] == cpu["generated"]
