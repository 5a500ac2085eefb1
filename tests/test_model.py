"""Tests for model.py: our from-scratch Transformer and its loaders against `transformers` as the oracle. Tiny random
transformers models (seeded; GPT-2, Llama with Llama-3 RoPE scaling, GQA and MQA, Qwen2 with biases; tied and untied)
are saved with `save_pretrained` and loaded back with our `load_model`: logits agree to 1e-4 in float32, the other
forward paths (chunked prefill over the KV cache, last_only, return_hidden, MLP.select) equal the plain one, bf16
loading keeps the RoPE frequencies in float32, and a hub id downloads (from a fake hub) then loads again offline.
Slow tests (`-m slow`) load the real SmolLM2-135M-Instruct GGUF: its shape and fingerprint, logits equal to
transformers loading the same GGUF, and its wikitext-2 perplexity (FREE_MOE_PPL_TOKENS=400000 with `-s -k perplexity`
measures all of wikitext-2 test, FREE_MOE_PPL_WINDOW sets the window). The checkpoint builders (build_hf, save_hf,
TINY_CASES) are in conftest.py: test_generate.py and test_checkpoints.py build the same checkpoints. Shape legend:
B batch, T time, V vocab.
"""
import copy
import dataclasses
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import generate as G  # noqa: E402
import model as M  # noqa: E402
from conftest import (RAW_PROMPTS, TINY_CASES, TOL, TrickleServer, one_line_error, random_ids,  # noqa: E402
                      smol_hf_tokenizer, tiny_case)

transformers = pytest.importorskip("transformers")

SMOL_HF_TOK = smol_hf_tokenizer()  # ../shared's, else written from the GGUF


# ============================================================================ tiny random models vs transformers

@pytest.fixture(scope="module", params=list(TINY_CASES))
def tiny(request, tmp_path_factory):
    return tiny_case(request.param, tmp_path_factory)


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


# ============================================================================ loading: dtype, one-line errors, the hub

def test_bf16_load_keeps_rope_frequencies_float32(tiny_llama_dir):
    m, _ = M.load_model(tiny_llama_dir, dtype=torch.bfloat16)
    assert m.tok_emb.weight.dtype == m.layers[0].mlp.up.weight.dtype == torch.bfloat16
    assert m.inv_freq.dtype == torch.float32 and torch.equal(m.inv_freq, M.rope_inv_freq(m.config))
    assert len(G.generate(m, [[1, 2, 3]], 4, stop_ids=set())[0]) == 4


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
    files = [{"type": "file", "path": f.name, "size": f.stat().st_size,  # the file list, with sizes and hashes
              "lfs": {"oid": hashlib.sha256(f.read_bytes()).hexdigest(), "size": f.stat().st_size}}
             for f in served.iterdir()]
    routes = {"/api/models/someorg/tiny/tree/main": json.dumps(files).encode(),
              **{f"/someorg/tiny/resolve/main/{f.name}": f.read_bytes() for f in served.iterdir()}}
    hub_server = TrickleServer(routes, "body", fast=tuple(routes))  # a local hub that answers at once
    monkeypatch.setenv("FREE_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.chdir(tmp_path)
    try:
        hub_model, hub_tok = M.load_model("someorg/tiny")
    finally:
        hub_server.close()
    assert any(p.endswith("/config.json") for p in hub_server.requested)
    assert any(p.endswith("/model.safetensors") for p in hub_server.requested)
    local_model, _ = M.load_model(served)
    ids = random_ids(1, 12)
    with torch.no_grad():
        assert torch.equal(hub_model(ids), local_model(ids))
    assert hub_tok.eos_id == 2 and hub_tok.chat_format == "chatml"  # tokenizer_config + chat template fetched
    # the network gone: the hub's port is closed now
    again, _ = M.load_model("someorg/tiny")
    assert again.fingerprint == hub_model.fingerprint


# ============================================================================ real weights (SmolLM2-135M GGUF)

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
