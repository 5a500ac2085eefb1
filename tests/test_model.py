"""Tests for model.py: our from-scratch transformer, loaders, tokenizers and generation against oracles.

Oracles (test-only imports): `transformers` (models and tokenizers), `gguf` (dequantization), `safetensors`.

Tiny tests build small *random* models with transformers (seeded), save them with `save_pretrained` into a
tmp dir and load them back with our `load_model`: logits must agree to 1e-4 in fp32, greedy decoding must be
token-identical (ours with cache == ours without cache == transformers), and a left-padded batch must equal
one-by-one generation. Slow tests (`-m slow`) use the real SmolLM2-135M-Instruct GGUF from ../shared/models.

    python -m pytest -q tests/test_model.py                 # everything (about 2-3 min on 2 cores)
    python -m pytest -q -m "not slow" tests/test_model.py   # tiny models only
    FREE_MOE_PPL_TOKENS=400000 python -m pytest -q -s tests/test_model.py -k perplexity   # all of wikitext-2 test

Shape legend: B batch, T time, V vocab.
"""
import copy
import dataclasses
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import gguf_file  # noqa: E402
import tokenizer as T  # noqa: E402
import data  # noqa: E402
import generate as G  # noqa: E402
import model as M  # noqa: E402
from conftest import smol_hf_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")

SHARED = M.shared_dir()
GPT2_TOK_DIR = SHARED / "models" / "gpt2-tokenizer"
SMOL_DIR = SHARED / "models" / "smollm2-135m-instruct"
SMOL_HF_TOK = smol_hf_tokenizer()  # ../shared's, else written from the GGUF
LLAMA3_TOK = SHARED / "models" / "llama3-tokenizer" / "tokenizer.model"

TOL = 1e-4  # max |delta logit| allowed against transformers in fp32
GPT2_VOCAB = 50257  # tiny models use the GPT-2 tokenizer, so their vocab must cover it
# Llama-3 long-context RoPE scaling with a small original context, so the test positions are affected by it
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


# ============================================================================ tiny random models vs transformers

# name -> (family, config overrides, how to save: "safetensors" | "sharded" | "bin")
TINY_CASES = {
    "gpt2-tied": ("gpt2", {}, "safetensors"),
    "llama-gqa-llama3rope-untied": ("llama", dict(num_key_value_heads=2, rope_scaling=LLAMA3_ROPE,
                                                  tie_word_embeddings=False), "safetensors"),
    "llama-mqa-tied-bin": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=True), "bin"),
    "qwen2-bias-untied-sharded": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False), "sharded"),
    "qwen2-bias-tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True), "safetensors"),
}


def build_hf(family: str, overrides: dict, seed: int = 0):
    """A 2-layer random transformers model. Every parameter (biases and norms included) is randomised,
    because transformers initialises biases to 0 and norms to 1, which would hide a dropped bias or norm."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=GPT2_VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=96, n_positions=128,
                         **overrides)
        hf = GPT2LMHeadModel(cfg)
    else:
        Cfg, Model = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config, Qwen2ForCausalLM)
        overrides = copy.deepcopy(overrides)  # transformers adds keys to the rope_scaling dict it is given
        cfg = Cfg(vocab_size=GPT2_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
                  **overrides)
        hf = Model(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            is_norm = "norm" in name or ".ln_" in name
            if is_norm and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    hf.generation_config.eos_token_id = None  # never stop early: compare full 20-token runs
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def save_hf(hf, d: Path, how: str):
    """save_pretrained writes safetensors (sharded when asked). transformers 5 no longer writes
    pytorch_model.bin, so that case is the torch.save(state_dict) that older versions wrote."""
    if how == "bin":
        hf.save_pretrained(d)
        (d / "model.safetensors").unlink()
        torch.save(hf.state_dict(), d / "pytorch_model.bin")
    else:
        hf.save_pretrained(d, **({"max_shard_size": "5MB"} if how == "sharded" else {}))
    write_tiny_tokenizer(d)


def write_tiny_tokenizer(d: Path):
    """The GPT-2 files where ../shared has them (as in CI), else SmolLM2's tokenizer written from its GGUF (a fresh
    clone): either fits the tiny models' 50,257-token vocabulary."""
    if GPT2_TOK_DIR.exists() or not SMOL_HF_TOK.exists():
        return write_gpt2_tokenizer(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(SMOL_HF_TOK / f, d / f)


def write_gpt2_tokenizer(d: Path):
    """load_model(dir) wants a tokenizer: the GPT-2 files under HF's names, into the tmp dir only."""
    shutil.copy(GPT2_TOK_DIR / "encoder.json", d / "vocab.json")
    shutil.copy(GPT2_TOK_DIR / "vocab.bpe", d / "merges.txt")


@pytest.fixture(scope="module", params=list(TINY_CASES))
def tiny(request, tmp_path_factory):
    family, overrides, how = TINY_CASES[request.param]
    hf = build_hf(family, overrides)
    d = tmp_path_factory.mktemp(request.param)
    save_hf(hf, d, how)
    ours, tok = M.load_model(d)
    return dict(name=request.param, hf=hf, ours=ours, tok=tok, dir=d, how=how, overrides=overrides)


def random_ids(B, T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, GPT2_VOCAB, (B, T), generator=g)  # (B, T)


def test_tiny_case_exercises_its_format(tiny):
    """Each case covers what its name says: the file layout, tying, GQA and biases."""
    d, cfg, name, over = tiny["dir"], tiny["ours"].config, tiny["name"], tiny["overrides"]
    files = {p.name for p in d.iterdir()}
    if tiny["how"] == "sharded":
        shards = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())
        assert len(shards) > 1 and shards <= files and "model.safetensors" not in files
    elif tiny["how"] == "bin":
        assert "pytorch_model.bin" in files and not any(f.endswith(".safetensors") for f in files)
    else:
        assert "model.safetensors" in files
    assert cfg.tie_embeddings == over.get("tie_word_embeddings", True)
    assert (tiny["ours"].lm_head.weight is tiny["ours"].tok_emb.weight) == cfg.tie_embeddings
    assert cfg.qkv_bias == name.startswith("qwen2")
    if cfg.arch == "llama":
        assert cfg.n_kv_head == over["num_key_value_heads"] < cfg.n_head  # grouped-query attention
    assert cfg.rope_scaling == over.get("rope_scaling")


def test_tiny_logits_match_transformers(tiny):
    ids = random_ids(2, 48)  # (B, T)
    with torch.no_grad():
        ref = tiny["hf"](ids).logits  # (B, T, V)
        got = tiny["ours"](ids)  # (B, T, V)
    assert got.shape == ref.shape
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, f"{tiny['name']}: max |delta logit| {diff:.2e} > {TOL}"


def test_inference_ffn_in_place_equals_the_autograd_path(tiny):
    """MLP.neurons overwrites silu's input under no_grad; with autograd on it must not. Both give the same bits,
    and the autograd path still back-propagates (train_router.py needs it)."""
    mlp = tiny["ours"].layers[0].mlp
    x = torch.randn(2, 5, tiny["ours"].config.n_embd, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast = mlp(x)
    xg = x.clone().requires_grad_(True)
    slow = mlp(xg)
    slow.sum().backward()
    assert torch.equal(fast, slow.detach()) and xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("tiny", ["llama-gqa-llama3rope-untied"], indirect=True)
def test_tiny_llama3_rope_scaling_matters(tiny):
    """The Llama-3 case would fail without the scaling: otherwise the parity test above proves nothing about it."""
    plain = copy.deepcopy(tiny["ours"])
    plain.inv_freq = M.rope_inv_freq(dataclasses.replace(plain.config, rope_scaling=None))
    ids = random_ids(1, 48)
    with torch.no_grad():
        diff = (plain(ids) - tiny["hf"](ids).logits).abs().max().item()
    assert diff > 100 * TOL, f"rope scaling made no difference ({diff:.2e}): the test positions do not exercise it"


def test_bf16_checkpoint_loads_exactly(tmp_path):
    """Hub checkpoints are usually bf16 safetensors: read, upcast to fp32, same logits as transformers'."""
    from transformers import AutoModelForCausalLM
    save_hf(build_hf("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)).to(torch.bfloat16), tmp_path,
            "safetensors")
    # reloaded rather than .float(): a module cast to bf16 keeps bf16-rounded RoPE frequencies in transformers
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours, _ = M.load_model(tmp_path)
    assert ours.tok_emb.weight.dtype == torch.float32
    ids = random_ids(2, 32)
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= TOL


def test_tiny_chunked_prefill_last_only_hidden_and_select(tiny):
    """The other forward paths agree with the plain one: a prefill split in two chunks over the KV cache,
    last_only, return_hidden (final hidden -> norm -> head = logits), and an MLP.select keeping every neuron."""
    m, ids = tiny["ours"], random_ids(2, 24)  # (B, T)
    with torch.no_grad():
        full = m(ids)  # (B, T, V)
        m.setup_cache(2, 24)
        try:
            chunked = torch.cat([m(ids[:, :10], 0), m(ids[:, 10:], 10)], dim=1)  # (B, T, V)
        finally:
            m.clear_cache()
        assert (chunked - full).abs().max() <= 1e-5
        assert (m(ids, last_only=True) - full[:, -1:]).abs().max() <= 1e-5
        logits, hiddens = m(ids, return_hidden=True)
        assert len(hiddens) == m.config.n_layer + 1 and hiddens[0].shape == (2, 24, m.config.n_embd)
        assert (m.lm_head(m.norm(hiddens[-1])) - logits).abs().max() <= 1e-5
        every = [blk.mlp.select(torch.arange(blk.mlp.n_neurons)) for blk in m.layers]
        assert (m(ids, mlps=every) - full).abs().max() <= 1e-5


def naive_greedy(model, prompt, n):
    """Greedy decoding without a KV cache: recompute the whole forward for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_tiny_greedy_cache_nocache_and_transformers_agree(tiny):
    prompt = random_ids(1, 6, seed=2)[0].tolist()
    cached = G.generate(tiny["ours"], [prompt], 20, stop_ids=set())[0]
    uncached = naive_greedy(tiny["ours"], prompt, 20)
    with torch.no_grad():
        ref = tiny["hf"].generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert len(cached) == 20
    assert cached == uncached, f"{tiny['name']}: KV-cache decoding differs from full recompute"
    assert cached == ref, f"{tiny['name']}: greedy tokens differ from transformers"


def test_tiny_batched_left_padded_equals_one_by_one(tiny):
    model = tiny["ours"]
    prompts = [random_ids(1, n, seed=10 + n)[0].tolist() for n in (3, 11, 7, 1)]
    batched = G.generate(model, prompts, 20, stop_ids=set())
    single = [G.generate(model, [p], 20, stop_ids=set())[0] for p in prompts]
    assert batched == single
    # the padded forward itself: each row's real positions match its unpadded forward
    T = max(map(len, prompts))
    idx = torch.zeros(len(prompts), T, dtype=torch.long)  # (B, T)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)  # (B, T)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):], valid[b, T - len(p):] = torch.tensor(p), True
    with torch.no_grad():
        padded = model(idx, valid=valid)  # (B, T, V)
        for b, p in enumerate(prompts):
            alone = model(torch.tensor([p]))[0]  # (T_b, V)
            diff = (padded[b, T - len(p):] - alone).abs().max().item()
            assert diff <= 1e-5, f"row {b}: padded logits differ by {diff:.2e}"


# ============================================================================ bad input

@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    save_hf(build_hf("llama", dict(num_key_value_heads=2)), d, "safetensors")
    return d


@pytest.fixture
def broken_dir(tiny_llama_dir, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, d)
    return d


def one_line_error(fn, *args) -> str:
    with pytest.raises(M.UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert msg and "\n" not in msg, f"not one line: {msg!r}"
    return msg


def test_truncated_safetensors_names_file_and_tensor(broken_dir):
    from safetensors import safe_open
    f = broken_dir / "model.safetensors"
    with safe_open(str(f), "pt") as s:
        names = set(s.keys())
    f.write_bytes(f.read_bytes()[:-1000])
    msg = one_line_error(M.load_model, broken_dir)
    assert str(f) in msg and "truncated" in msg
    named = re.search(r"tensor (\S+)", msg)
    assert named and named.group(1) in names, msg


def test_truncated_safetensors_header(broken_dir):
    f = broken_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    msg = one_line_error(M.load_model, broken_dir)
    assert str(f) in msg and "truncated" in msg


def test_unknown_model_type(broken_dir):
    cfg = json.loads((broken_dir / "config.json").read_text())
    cfg["model_type"] = "bert"
    (broken_dir / "config.json").write_text(json.dumps(cfg))
    msg = one_line_error(M.load_model, broken_dir)
    assert "'bert'" in msg and "config.json" in msg and str(broken_dir) in msg


def test_missing_tensor_named(broken_dir):
    from safetensors.torch import load_file, save_file
    f = broken_dir / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    msg = one_line_error(M.load_model, broken_dir)
    assert str(broken_dir) in msg and "missing" in msg and "layers.1.mlp.down" in msg


def test_shape_mismatch_named(broken_dir):
    from safetensors.torch import load_file, save_file
    f = broken_dir / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(sd, str(f), metadata={"format": "pt"})
    msg = one_line_error(M.load_model, broken_dir)
    assert str(broken_dir) in msg and "layers.0.mlp.up" in msg and "(95, 64)" in msg and "(96, 64)" in msg


@pytest.mark.slow
def test_truncated_gguf_names_file_and_tensor(tmp_path):
    src = M.default_model_path()
    with open(src, "rb") as f:
        head = f.read(6 << 20)  # metadata + tensor table fit in the first few MB; the data does not
    for cut, needle in ((6 << 20, "tensor token_embd.weight"), (1000, "truncated GGUF")):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(head[:cut])
        msg = one_line_error(M.load_model, bad)
        assert str(bad) in msg and needle in msg, msg


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    assert "bad magic" in one_line_error(M.load_model, bad)


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "generate.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_bad_model_path_one_line_exit_2(tmp_path):
    r = run_cli("--model", str(tmp_path / "no-such-model.gguf"), "--max-new-tokens", "2")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-model.gguf" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_bf16_load_keeps_rope_frequencies_float32(tiny_llama_dir):
    m, _ = M.load_model(tiny_llama_dir, dtype=torch.bfloat16)
    assert m.tok_emb.weight.dtype == m.layers[0].mlp.up.weight.dtype == torch.bfloat16
    assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, M.rope_inv_freq(m.config))
    assert len(G.generate(m, [[1, 2, 3]], 4, stop_ids=set())[0]) == 4


def test_cli_generates_with_tiny_model(tiny_llama_dir):
    r = run_cli("--model", str(tiny_llama_dir), "--prompt", "Hello", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and len(r.stdout) > len("Hello")


def test_offline_hub_id_fails_in_one_line(monkeypatch, tmp_path):
    def no_network(*a, **k):
        raise urllib.error.URLError("network is unreachable (simulated)")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("FREE_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # so "someorg/somemodel" is not a local path
    msg = one_line_error(M.load_model, "someorg/somemodel")
    assert "someorg/somemodel" in msg and "offline" in msg
    left = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert left == [], f"a failed download left files behind: {left}"


def test_hub_download_then_offline_reuse(monkeypatch, tmp_path, tiny_llama_dir):
    """A fake hub serves a tiny checkpoint: the download loads like the local directory, and once cached it
    loads again with the network gone (optional files that were never there must not need the network)."""
    served = tmp_path / "served"
    shutil.copytree(tiny_llama_dir, served)
    for f in ("vocab.json", "merges.txt"):  # the hub path fetches tokenizer.json (+ its config), not the GPT-2 files
        (served / f).unlink(missing_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(SMOL_HF_TOK / f, served / f)
    urls = []

    def fake_hub(url, timeout=None):
        urls.append(url)
        if url == "https://huggingface.co/api/models/someorg/tiny/tree/main":  # the file list, with sizes and hashes
            files = [{"type": "file", "path": f.name, "size": f.stat().st_size,
                      "lfs": {"oid": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size}}
                     for f in served.iterdir()]
            return io.BytesIO(json.dumps(files).encode())
        prefix = "https://huggingface.co/someorg/tiny/resolve/main/"
        f = served / url.removeprefix(prefix)
        if not url.startswith(prefix) or not f.exists():
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        return io.BytesIO(f.read_bytes())

    def no_network(url, timeout=None):
        raise urllib.error.URLError("network is unreachable (simulated)")

    monkeypatch.setenv("FREE_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", fake_hub)
    hub_model, hub_tok = M.load_model("someorg/tiny")
    assert any(u.endswith("/config.json") for u in urls) and any(u.endswith("/model.safetensors") for u in urls)
    local_model, _ = M.load_model(served)
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert torch.equal(hub_model(ids), local_model(ids))
    assert hub_tok.eos_id == 2 and hub_tok.chat_format == "chatml"  # tokenizer_config + chat template fetched
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    again, _ = M.load_model("someorg/tiny")
    assert again.fingerprint == hub_model.fingerprint


# ============================================================================ sampling

@pytest.fixture(scope="module")
def small():
    """A plain random model built from our own Config (no checkpoint), for the sampler tests."""
    torch.manual_seed(0)
    m = M.Transformer(M.Config(arch="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_ffn=48,
                               max_seq_len=128))
    with torch.no_grad():
        m.tok_emb.weight.mul_(0.15)  # tied head: logits with std about 1, so sampling is not just argmax
    return m.eval()


PROMPTS = [[5, 9, 2], [7, 1, 1, 3, 40, 12]]


def test_top_k_1_equals_greedy(small):
    greedy = G.generate(small, PROMPTS, 20, stop_ids=set())
    assert G.generate(small, PROMPTS, 20, temperature=1.0, top_k=1, stop_ids=set(), seed=3) == greedy


def test_tiny_top_p_equals_greedy(small):
    greedy = G.generate(small, PROMPTS, 20, stop_ids=set())
    assert G.generate(small, PROMPTS, 20, temperature=1.0, top_p=1e-9, stop_ids=set(), seed=3) == greedy


def test_seeded_sampling_is_reproducible(small):
    a = G.generate(small, PROMPTS, 20, temperature=1.0, stop_ids=set(), seed=7)
    b = G.generate(small, PROMPTS, 20, temperature=1.0, stop_ids=set(), seed=7)
    c = G.generate(small, PROMPTS, 20, temperature=1.0, stop_ids=set(), seed=8)
    assert a == b
    assert a != c, "different seeds gave identical samples"
    assert a != G.generate(small, PROMPTS, 20, stop_ids=set()), "sampling at temperature 1 equals greedy"


def test_stop_ids_end_a_row(small):
    greedy = G.generate(small, PROMPTS, 20, stop_ids=set())
    stop = greedy[0][4]
    first = greedy[0].index(stop)
    out = G.generate(small, PROMPTS, 20, stop_ids={stop})
    assert out[0] == greedy[0][:first]  # the stop token itself is not returned
    assert stop not in out[1]


def sample_many(logits_row, n=40000, seed=0, **kw):
    logits = torch.tensor(logits_row).expand(n, -1)  # (n, V)
    draws = G.sample_next(logits, generator=torch.Generator().manual_seed(seed), **kw)
    return torch.bincount(draws, minlength=len(logits_row)).float() / n  # (V,) empirical frequencies


ROW = [2.0, 1.0, 0.0, -1.0, -3.0]


def test_temperature_matches_softmax():
    for t in (0.5, 1.0, 2.0):
        freq = sample_many(ROW, temperature=t)
        want = torch.softmax(torch.tensor(ROW) / t, -1)
        assert (freq - want).abs().max() < 0.01, (t, freq, want)


def test_top_k_keeps_k_best_renormalised():
    freq = sample_many(ROW, temperature=1.0, top_k=2)
    want = torch.softmax(torch.tensor(ROW[:2]), -1)
    assert freq[2:].sum() == 0 and (freq[:2] - want).abs().max() < 0.01


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = torch.softmax(torch.tensor(ROW), -1)  # about [.63, .23, .09, .03, .004]
    for p in (0.5, 0.8, 0.95):
        n_keep = int((probs.cumsum(0) < p).sum()) + 1  # smallest prefix with mass >= p
        freq = sample_many(ROW, temperature=1.0, top_p=p)
        want = probs[:n_keep] / probs[:n_keep].sum()
        assert freq[n_keep:].sum() == 0, (p, freq)
        assert (freq[:n_keep] - want).abs().max() < 0.01, (p, freq, want)


def test_temperature_zero_is_argmax():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(G.sample_next(logits, 0.0, top_k=5, top_p=0.5), logits.argmax(-1))


# ============================================================================ real weights (SmolLM2-135M GGUF)

@pytest.fixture(scope="module")
def gguf_path():
    return M.default_model_path()


@pytest.fixture(scope="module")
def gguf_read(gguf_path):
    return gguf_file.read_gguf(gguf_path)  # (metadata, {gguf name: float32 tensor})


@pytest.fixture(scope="module")
def real(real_model):
    return real_model  # (model, tokenizer) of the default GGUF, tests/conftest.py


@pytest.fixture(scope="module")
def hf_real(gguf_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    return hf.eval()


@pytest.fixture(scope="module")
def hf_smol_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(SMOL_HF_TOK)


RAW_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
               "The three primary colors are", "import numpy as np\n"]


@pytest.mark.slow
def test_real_model_loads(real):
    model, tok = real
    cfg = model.config
    shape = (cfg.n_layer, cfg.n_embd, cfg.n_ffn, cfg.n_head, cfg.n_kv_head, cfg.vocab_size)
    assert shape == (30, 576, 1536, 9, 3, 49152)
    assert cfg.tie_embeddings and model.lm_head.weight is model.tok_emb.weight
    assert tok.n_vocab == 49152 and tok.eos_id == 2 and 2 in tok.stop_ids
    assert re.fullmatch(r"[0-9a-f]{16}", model.fingerprint)


@pytest.mark.slow
def test_gguf_dequantization_bit_exact(gguf_path, gguf_read):
    import gguf
    _, ours = gguf_read
    reader = gguf.GGUFReader(str(gguf_path))
    assert len(reader.tensors) == len(ours) == 272
    kinds = set()
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        mine = ours[t.name].numpy()
        kinds.add(t.tensor_type.name)
        assert mine.shape == ref.reshape(mine.shape).shape and mine.size == ref.size, t.name
        assert np.array_equal(mine.reshape(-1).view(np.uint32), ref.reshape(-1).view(np.uint32)), \
            f"{t.name} ({t.tensor_type.name}) differs from gguf.quants.dequantize"
    assert kinds == {"Q4_1", "Q8_0", "F32"}


# where each block type keeps its fp16 factors (d, and dmin / m), made finite so NaN can never hide a mismatch
FP16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82], "Q3_K": [108],
           "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", *FP16_AT])
def test_dequantize_every_supported_type_matches_gguf(kind):
    """Random blocks of every type gguf_file reads, bit for bit against the gguf package (the real files hold
    F32, Q8_0, Q4_1 (SmolLM2) and Q5_0, Q4_K, Q6_K (Gemma 3))."""
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[kind]
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    assert gguf_file.GGML_BLOCK[kind] == (block_bytes, block_size)
    rng = np.random.default_rng(0)
    if kind in FP16_AT:  # 512 random blocks, their fp16 factors finite
        raw = rng.integers(0, 256, (512, block_bytes), dtype=np.uint8)
        for at in FP16_AT[kind]:
            raw[:, at:at + 2] = rng.normal(0, 0.05, (512, 1)).astype(np.float16).view(np.uint8)
    else:  # plain floats: 256 random finite values
        vals = rng.normal(0, 1, 256).astype(np.float32)
        if kind == "F16":
            vals = vals.astype(np.float16)
        if kind == "BF16":
            vals = (vals.view(np.uint32) >> 16).astype(np.uint16)  # the top half of a float32
        raw = vals.view(np.uint8).reshape(8, -1)
    ref = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)
    ours = gguf_file.dequantize(raw.reshape(-1), kind)
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.slow
def test_real_logits_match_transformers_gguf(real, hf_real):
    model, tok = real
    worst = 0.0
    for text in RAW_PROMPTS[:3]:
        ids = torch.tensor([tok.encode(text)])  # (1, T)
        with torch.no_grad():
            diff = (model(ids) - hf_real(ids).logits).abs().max().item()
        worst = max(worst, diff)
    print(f"\nreal model: max |delta logit| vs transformers over 3 prompts = {worst:.3g}")
    assert worst <= TOL


@pytest.mark.slow
def test_real_greedy_matches_transformers(real, hf_real):
    """Raw prompts (no chat template), 16 new tokens, ours batched with left padding. Oracle: transformers'
    generate for the first prompt, and for every prompt its teacher-forced argmax (what greedy picks at each
    step, one forward instead of 16 decode steps)."""
    model, tok = real
    prompts = [tok.encode(p) for p in RAW_PROMPTS]
    ours = G.generate(model, prompts, 16, stop_ids=set())
    with torch.no_grad():
        ref = hf_real.generate(torch.tensor([prompts[0]]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                               pad_token_id=tok.pad_id)[0, len(prompts[0]):].tolist()
        assert ours[0] == ref, f"ours {tok.decode(ours[0])!r} vs transformers generate {tok.decode(ref)!r}"
        for p, got in zip(prompts, ours):
            assert len(got) == 16
            seq = torch.tensor([p + got])  # (1, T)
            picks = hf_real(seq).logits[0, len(p) - 1:-1].argmax(-1).tolist()  # greedy choice at each step
            assert got == picks, f"{tok.decode(p)!r}: ours {tok.decode(got)!r} vs transformers {tok.decode(picks)!r}"


@pytest.mark.slow
def test_chat_template_paris_and_stop_string(real, hf_smol_tok):
    model, tok = real
    question = "What is the capital of France?"
    prompt = tok.chat_prompt(question)
    ref = hf_smol_tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                          add_generation_prompt=True)
    assert prompt == ref
    ids = G.generate(model, [tok.encode(prompt)], 24, tokenizer=tok)[0]
    answer = tok.decode(ids)
    print(f"\nchat answer: {answer!r}")
    assert "Paris" in answer
    assert len(ids) < 24, "the answer did not end with <|im_end|>"
    # stop strings: generation ends at the token completing "Paris", and the text is cut before it
    cut_ids = G.generate(model, [tok.encode(prompt)], 24, tokenizer=tok, stop_strings=["Paris"])[0]
    assert len(cut_ids) < len(ids) and "Paris" in tok.decode(cut_ids)
    cut = G.generate_text(model, tok, [prompt], 24, stop_strings=[" Paris", "nowhere"])[0]
    assert cut == answer[:answer.find(" Paris")]


def wikitext_windows(tok, n_tokens: int, window: int) -> torch.Tensor:
    text = gzip.open(data.data_file("corpora/english_wikitext2_test.txt.gz"), "rt", encoding="utf-8").read()
    ids = torch.tensor(tok.encode(text))
    n = min(n_tokens, len(ids)) // window
    return ids[: n * window].view(n, window)  # (N, T) non-overlapping windows


@pytest.mark.slow
def test_wikitext2_perplexity(real, hf_real):
    """Perplexity of the real model on held-out wikitext-2 test text (non-overlapping windows, every token but
    the first of each window predicted). A small slice by default; FREE_MOE_PPL_TOKENS raises it and
    FREE_MOE_PPL_WINDOW sets the window (default 512)."""
    model, tok = real
    window = int(os.environ.get("FREE_MOE_PPL_WINDOW", 512))
    windows = wikitext_windows(tok, int(os.environ.get("FREE_MOE_PPL_TOKENS", 2 * window)), window)
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for i, x in enumerate(windows):
            logits = model(x[None])[0]  # (T, V)
            nll = F.cross_entropy(logits[:-1], x[1:], reduction="sum").item()
            if i == 0:  # the same window through transformers: same loss
                ref = F.cross_entropy(hf_real(x[None]).logits[0, :-1], x[1:], reduction="sum").item()
                assert abs(nll - ref) / (window - 1) < 1e-4, (nll, ref)
            nll_sum, count = nll_sum + nll, count + window - 1
    ppl = math.exp(nll_sum / count)
    print(f"\nwikitext-2 test perplexity: {ppl:.3f} ({count} predicted tokens, {len(windows)} windows of {window})")
    # a model that had learned nothing would score ~49152 (uniform) and a unigram model several hundred
    assert 1.0 < ppl < 100.0


# ============================================================================ tokenizers vs transformers

UNICODE = [
    "Hello world, this is GPT-2!", "This is a test sentence.", "", " ", "  two  spaces  ",
    "\t\ttabs\tand\n\nnewlines\r\n",
    "I'm, you're, we've, they'll, he'd, she's, IT'S, WE'LL", "numbers 1234567890 3.14159 1,000,000 1e-9",
    "naïve café résumé Zürich São Paulo", "Ελληνικά και ∑ ∫ ∂ √ ∞ ≈ ≠", "日本語のテキスト、漢字とかな。",
    "中文分词测试：你好，世界！",
    "한국어 텍스트", "Русский текст, ёлки-палки", "عربي: مرحبا بالعالم", "हिन्दी पाठ", "emoji 😀👍🏽👨‍👩‍👧‍👦 🇫🇷",
    "zero\u200bwidth and combining e\u0301", "code: `x = f(a, b) ** 2  # comment`", "    indented\n        more",
    "trailing spaces   \n", "\n\n\n", "a\u00a0nbsp", "$$\\frac{a}{b} = \\sqrt{x^2}$$",
    "<html><body>&amp;</body></html>",
]


def corpus_lines(name: str, n: int, stride: int = 1) -> list[str]:
    with gzip.open(data.data_file("corpora/" + name), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return lines[::stride][:n]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """About 4000 lines of prose, code, math and unicode, plus multi-line blocks (newlines and indentation)."""
    out = list(UNICODE)
    out += corpus_lines("english_wikitext2_test.txt.gz", 700, stride=5)
    out += corpus_lines("english_shakespeare.txt.gz", 500, stride=50)
    out += corpus_lines("math_gsm8k_train.txt.gz", 500, stride=50)
    out += corpus_lines("medical_medmcqa.txt.gz", 400, stride=10)
    code = corpus_lines("code_python.txt.gz", 60000)
    out += code[:40000:40]  # 1000 single lines of code
    out += ["\n".join(code[i:i + 30]) for i in range(0, 6000, 100)]  # 60 blocks of 30 lines
    with gzip.open(data.data_file("mmlu/test.jsonl.gz"), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][::20]  # 703 questions with their choices, unicode kept
    out += [r["question"] + "\n" + "\n".join(r["choices"]) for r in rows]
    return out


def assert_same_ids(ours: list[list[int]], ref: list[list[int]], texts: list[str], what: str):
    bad = [i for i, (a, b) in enumerate(zip(ours, ref)) if a != b]
    assert len(ours) == len(ref) == len(texts)
    if bad:
        i = bad[0]
        pytest.fail(f"{what}: {len(bad)}/{len(texts)} texts differ; first {texts[i][:80]!r}: "
                    f"ours {ours[i][:16]} vs reference {ref[i][:16]}")


def assert_round_trip(tok, texts):
    bad = [t for t in texts if tok.decode(tok.encode(t)) != t]
    assert not bad, f"decode(encode(x)) != x for {len(bad)} texts, first {bad[0][:80]!r}"


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(gguf_path, gguf_read, hf_smol_tok, texts):
    meta, _ = gguf_read
    specials = ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<repo_name>x<file_sep>y<|endoftext|>"]
    all_texts = texts + specials
    ref = hf_smol_tok(all_texts, add_special_tokens=False)["input_ids"]
    from_gguf = M.Tokenizer.from_gguf_meta(meta, gguf_path)
    tok_cfg = json.loads((SMOL_HF_TOK / "tokenizer_config.json").read_text())
    from_json = M.Tokenizer.from_tokenizer_json(SMOL_HF_TOK / "tokenizer.json", tok_cfg)
    for name, tok in (("GGUF tokenizer", from_gguf), ("tokenizer.json", from_json)):
        assert_same_ids([tok.encode(t) for t in all_texts], ref, all_texts, f"SmolLM2 {name}")
        assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
        assert_round_trip(tok, texts)
    assert len(texts) > 3000


@pytest.mark.slow
def test_hf_tokenizer_files_written_from_gguf(gguf_path, gguf_read, tmp_path, texts):
    """tokenizer.hf_tokenizer_files: the GGUF's vocabulary as HF files, read back by us and by transformers."""
    from transformers import AutoTokenizer
    meta, _ = gguf_read
    files = T.hf_tokenizer_files(meta)
    meta_only, no_tensors = gguf_file.read_gguf(gguf_path, tensors=False)  # what purify --export reads
    assert no_tensors == {} and T.hf_tokenizer_files(meta_only) == files
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    from_gguf, written = M.Tokenizer.from_gguf_meta(meta, gguf_path), M.Tokenizer.from_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    sample = texts[::4] + ["<|im_start|>user\nHi<|im_end|>\n"]
    ref = [from_gguf.encode(t) for t in sample]
    assert_same_ids([written.encode(t) for t in sample], ref, sample, "written tokenizer.json, ours")
    assert_same_ids(hf(sample, add_special_tokens=False)["input_ids"], ref, sample, "written tokenizer.json, HF")
    assert (written.bos_id, written.eos_id, written.pad_id, written.chat_format) == (1, 2, 2, "chatml")
    assert written.chat_prompt("Hi") == from_gguf.chat_prompt("Hi")
    with pytest.raises(M.UserError, match="byte-level BPE"):
        T.hf_tokenizer_files({"tokenizer.ggml.model": "llama"})


@pytest.mark.slow
def test_gpt2_tokenizer_matches_transformers(tmp_path, texts):
    from transformers import GPT2Tokenizer
    write_gpt2_tokenizer(tmp_path)
    hf = GPT2Tokenizer.from_pretrained(tmp_path)
    all_texts = texts + ["before<|endoftext|>after"]
    ref = hf(all_texts, add_special_tokens=False)["input_ids"]
    tok = M.Tokenizer.from_gpt2_files(GPT2_TOK_DIR / "encoder.json", GPT2_TOK_DIR / "vocab.bpe")
    assert_same_ids([tok.encode(t) for t in all_texts], ref, all_texts, "GPT-2")
    assert tok.encode("Hello world, this is GPT-2!") == [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 0]
    assert_round_trip(tok, texts)


@pytest.mark.slow
def test_llama3_tokenizer_matches_transformers(texts, tmp_path):
    from transformers.convert_slow_tokenizer import TikTokenConverter
    # Meta's special tokens, written out here independently of model.py
    specials = ["<|begin_of_text|>", "<|end_of_text|>"] + [f"<|reserved_special_token_{i}|>" for i in range(4)]
    specials += ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    specials += [f"<|reserved_special_token_{i}|>" for i in range(5, 251)]
    hf = TikTokenConverter(vocab_file=str(LLAMA3_TOK), extra_special_tokens=specials).converted()
    all_texts = texts + ["<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"]
    ref = [e.ids for e in hf.encode_batch(all_texts, add_special_tokens=False)]
    tok = M.Tokenizer.from_tiktoken_file(LLAMA3_TOK)
    assert tok.n_vocab == hf.get_vocab_size() == 128256
    assert_same_ids([tok.encode(t) for t in all_texts], ref, all_texts, "Llama-3")
    # the expected value in Meta's llama3 repository (llama/test_tokenizer.py)
    assert tok.encode("This is a test sentence.", bos=True) + [tok.eos_id] == \
        [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert {tok.special["<|eot_id|>"], tok.eos_id} <= tok.stop_ids
    assert_round_trip(tok, texts)
    # the same vocabulary as an HF tokenizer.json (Split regex + ByteLevel; several merges per token, as in
    # Meta-Llama-3's own tokenizer.json) read by our tokenizer.json path
    hf.save(str(tmp_path / "tokenizer.json"))
    from_json = M.Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    assert_same_ids([from_json.encode(t) for t in all_texts], ref, all_texts, "Llama-3 tokenizer.json")


# ============================================================================ static-shape decode (issue 14)
# The CUDA graph replays Transformer.decode_step: fixed shapes, the whole preallocated cache, a position mask.
# On a CPU the same step runs eagerly (decode="static"); it must give the tokens of the default dynamic decode.

STATIC_ARCHS = {
    "llama-gqa": dict(arch="llama", n_kv_head=2),
    "gpt2": dict(arch="gpt2", n_kv_head=4),
    "gemma3-window": dict(arch="gemma3", n_kv_head=2, sliding_window=5, local_layers=[0]),
}


def static_model(kind: str, seed: int = 0) -> M.Transformer:
    """A random model from our own Config, logits spread enough that sampling is not argmax."""
    torch.manual_seed(seed)
    m = M.Transformer(M.Config(vocab_size=64, n_layer=2, n_head=4, n_embd=32, n_ffn=48, max_seq_len=128,
                               **STATIC_ARCHS[kind])).eval()
    with torch.no_grad():
        m.tok_emb.weight.mul_(0.15)
    return m


PADDED = [[5, 9, 2], [7, 1, 1, 3, 40, 12, 8, 30, 2], [3], [60, 61, 62, 63, 1, 2]]  # left padded to 9 slots


@pytest.mark.parametrize("kind", list(STATIC_ARCHS))
def test_static_decode_equals_dynamic_greedy_sampling_batched(kind):
    m = static_model(kind)
    for prompts in (PADDED[:1], PADDED):  # one row; a left-padded batch
        for kw in ({}, dict(temperature=1.0, seed=3), dict(temperature=0.8, top_k=20, top_p=0.9, seed=5)):
            dynamic = G.generate(m, prompts, 24, stop_ids=set(), **kw)
            static = G.generate(m, prompts, 24, stop_ids=set(), decode="static", **kw)
            assert static == dynamic, (kind, len(prompts), kw)
            assert all(len(r) == 24 for r in static)


@pytest.mark.parametrize("kind", list(STATIC_ARCHS))
def test_decode_step_logits_equal_the_forward(kind):
    """Step by step, the static step's logits over the whole cache equal the dynamic forward's over the prefix."""
    m = static_model(kind)
    B, T0, N = len(PADDED), max(map(len, PADDED)), 12
    lens = [len(p) for p in PADDED]
    idx = torch.tensor([[0] * (T0 - n) + p for p, n in zip(PADDED, lens)])  # (B, T0)
    valid = torch.arange(T0 + N)[None, :] >= torch.tensor([T0 - n for n in lens])[:, None]  # (B, S)
    nxt = torch.randint(0, 64, (N, B), generator=torch.Generator().manual_seed(0))  # fed tokens, (N, B)
    with torch.inference_mode():
        m.setup_cache(B, T0 + N)
        m(idx, 0, valid, last_only=True)
        want = [m(nxt[s][:, None], T0 + s, valid)[:, -1] for s in range(N)]  # (B, V) each
        slot = G.decode_slot(m, B, T0 + N)  # a fresh zeroed cache of the same shape
        m(idx, 0, valid, last_only=True)
        slot.start(valid, lens, T0)
        got = [slot.step(m, nxt[s], None, "static") for s in range(N)]
        m.clear_cache()
    for s, (a, b) in enumerate(zip(got, want)):
        assert (a - b).abs().max() <= 1e-5, f"step {s}: {(a - b).abs().max():.2e}"


def test_decode_slots_are_reused_zeroed_and_dropped_when_the_model_moves():
    m = static_model("llama-gqa")
    first = G.generate(m, PADDED, 10, stop_ids=set(), decode="static")
    key = (len(PADDED), 9 + 10)  # (B, prompt + new tokens)
    slot = m.decode_slots[key]
    cache = slot.caches[0][0]
    again = G.generate(m, PADDED, 10, stop_ids=set(), decode="static")  # same shape: same buffers, zeroed first
    assert again == first and m.decode_slots[key] is slot and slot.caches[0][0] is cache
    assert m.layers[0].attn.cache_k is None  # the model itself holds no cache between calls
    for n in range(1, G.KEEP_SLOTS + 2):  # more shapes than are kept: the least recently used go
        G.generate(m, [[1] * n], 3, stop_ids=set(), decode="static")
    assert len(m.decode_slots) == G.KEEP_SLOTS and key not in m.decode_slots
    m.to(torch.float64)  # new weight tensors: slots (and graphs, on CUDA) built on the old ones are dropped
    assert m.decode_slots == {}
    assert G.generate(m, PADDED, 10, stop_ids=set(), decode="static") == \
        G.generate(m, PADDED, 10, stop_ids=set())


def test_decode_mode_errors():
    m = static_model("llama-gqa")
    with pytest.raises(ValueError, match="needs a CUDA model"):
        G.generate(m, [[1, 2]], 3, decode="graph")
    with pytest.raises(ValueError, match="decode must be one of"):
        G.generate(m, [[1, 2]], 3, decode="fast")
    with pytest.raises(M.UserError, match="exceeds the model's max_seq_len"):
        G.generate(m, [[1, 2]], 200, decode="static")


def test_routed_static_decode_equals_dynamic():
    """router.FreeMoE routes inside the prefill (generate's prefill hook) and decodes with compact expert FFNs;
    the static step must give the same tokens with those FFNs too (they are what a graph would capture)."""
    import router as R
    m = static_model("llama-gqa")
    g = torch.Generator().manual_seed(0)
    domains = ["code", "math"]
    experts = type("E", (), {"domains": domains, "meta": {},
                             "indices": {d: [torch.randperm(48, generator=g)[:24].sort().values for _ in range(2)]
                                         for d in domains}})()
    cfg = R.RouterConfig(domains=domains, n_layer=2, n_embd=32, route_layer=1, hidden=0, threshold=0.0)
    torch.manual_seed(1)
    moe = R.FreeMoE(m, experts, R.Router(cfg))
    with torch.no_grad():
        moe.router.gate_logits.fill_(1.0)  # every layer runs the expert
    for prompts in ([PADDED[1]], [PADDED[1], PADDED[3]]):
        dynamic, dec_d = moe.generate(prompts, 16, stop_ids=set())
        static, dec_s = moe.generate(prompts, 16, stop_ids=set(), decode="static")
        assert static == dynamic and dec_s == dec_d
        assert any(d.use_expert[0] for d in dec_s)


def test_tiny_static_decode_equals_transformers(tiny):
    """Every checkpoint family of the tiny cases (GPT-2, Llama-3 RoPE, MQA, Qwen2 biases): the static step's greedy
    tokens are transformers' tokens, unpadded and inside a left-padded batch."""
    prompt = random_ids(1, 6, seed=2)[0].tolist()
    with torch.no_grad():
        ref = tiny["hf"].generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    assert G.generate(tiny["ours"], [prompt], 20, stop_ids=set(), decode="static")[0] == ref
    other = random_ids(1, 11, seed=3)[0].tolist()
    batched = G.generate(tiny["ours"], [other, prompt], 20, stop_ids=set(), decode="static")
    assert batched[1] == ref and batched[0] == G.generate(tiny["ours"], [other], 20, stop_ids=set())[0]
