"""Tests for generate.py: greedy decoding and sampling, stop ids and stop strings, the static-shape decode step and
its decode slots, and the generation CLI. Greedy tokens equal a full recompute without the KV cache and transformers'
generate on the tiny checkpoints of conftest.py; a left-padded batch equals one-by-one generation; the sampler's
frequencies follow softmax with temperature, top-k and top-p; the static step (what the CUDA graph replays, run
eagerly here) gives the tokens of the default dynamic decode, routed too. Slow tests use the real SmolLM2-135M GGUF
(greedy against transformers, the chat template answering "Paris", stop strings). Shape legend: B batch, T time,
V vocab.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import generate as G  # noqa: E402
import model as M  # noqa: E402
from conftest import (RAW_PROMPTS, TINY_CASES, build_hf, random_ids, save_hf, smol_hf_tokenizer, tiny_case,  # noqa: E402
                      tiny_model)

transformers = pytest.importorskip("transformers")

SMOL_HF_TOK = smol_hf_tokenizer()  # ../shared's, else written from the GGUF


@pytest.fixture(scope="module", params=list(TINY_CASES))
def tiny(request, tmp_path_factory):
    """The tiny checkpoint cases, saved and loaded by our loader (conftest.TINY_CASES)."""
    return tiny_case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llama")
    save_hf(build_hf("llama", dict(num_key_value_heads=2)), d, "safetensors")
    return d


# ============================================================================ greedy decoding

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


# ============================================================================ the generation CLI

def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "generate.py"), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_bad_model_path_one_line_exit_2(tmp_path):
    r = run_cli("--model", str(tmp_path / "no-such-model.gguf"), "--max-new-tokens", "2")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no-such-model.gguf" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_generates_with_tiny_model(tiny_llama_dir):
    r = run_cli("--model", str(tiny_llama_dir), "--prompt", "Hello", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hello") and len(r.stdout) > len("Hello")


# ============================================================================ sampling

@pytest.fixture(scope="module")
def small():
    """A plain random model built from our own Config (no checkpoint), for the sampler tests."""
    return tiny_model(emb_scale=0.15)  # tied head: logits with std about 1, so sampling is not just argmax


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
def hf_smol_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(SMOL_HF_TOK)


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


# ============================================================================ static-shape decode
# The CUDA graph replays Transformer.decode_step: fixed shapes, the whole preallocated cache, a position mask.
# On a CPU the same step runs eagerly (decode="static"); it must give the tokens of the default dynamic decode.

# tiny_model(emb_scale=0.15, **STATIC_ARCHS[kind]): random models, logits spread enough that sampling is not argmax
STATIC_ARCHS = {
    "llama-gqa": dict(arch="llama", n_kv_head=2),
    "gpt2": dict(arch="gpt2", n_kv_head=4),
    "gemma3-window": dict(arch="gemma3", n_kv_head=2, sliding_window=5, local_layers=[0]),
}


PADDED = [[5, 9, 2], [7, 1, 1, 3, 40, 12, 8, 30, 2], [3], [60, 61, 62, 63, 1, 2]]  # left padded to 9 slots


@pytest.mark.parametrize("kind", list(STATIC_ARCHS))
def test_static_decode_equals_dynamic_greedy_sampling_batched(kind):
    m = tiny_model(emb_scale=0.15, **STATIC_ARCHS[kind])
    for prompts in (PADDED[:1], PADDED):  # one row; a left-padded batch
        for kw in ({}, dict(temperature=1.0, seed=3), dict(temperature=0.8, top_k=20, top_p=0.9, seed=5)):
            dynamic = G.generate(m, prompts, 24, stop_ids=set(), **kw)
            static = G.generate(m, prompts, 24, stop_ids=set(), decode="static", **kw)
            assert static == dynamic, (kind, len(prompts), kw)
            assert all(len(r) == 24 for r in static)


@pytest.mark.parametrize("kind", list(STATIC_ARCHS))
def test_decode_step_logits_equal_the_forward(kind):
    """Step by step, the static step's logits over the whole cache equal the dynamic forward's over the prefix."""
    m = tiny_model(emb_scale=0.15, **STATIC_ARCHS[kind])
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
    m = tiny_model(emb_scale=0.15, **STATIC_ARCHS["llama-gqa"])
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
    m = tiny_model(emb_scale=0.15, **STATIC_ARCHS["llama-gqa"])
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
    m = tiny_model(emb_scale=0.15, **STATIC_ARCHS["llama-gqa"])
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
