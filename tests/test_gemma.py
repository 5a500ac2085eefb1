"""Tests for the second model family, Gemma 3, across model.py, checkpoints.py, gguf_file.py, tokenizer.py and hub.py:
K-quant dequantisation, the Gemma branches of the Transformer, its HF and GGUF configs, the SentencePiece tokenizer
and `--model gemma3-270m` -- each against an independent oracle.

Oracles (test-only imports): `gguf` (dequantisation), `transformers` (Gemma3ForCausalLM built from a random config;
the real GGUF loaded by transformers; transformers' own GGUF-to-tokenizer conversion).

Fast tests use random blocks, tiny random Gemma-3 configs and a tiny SentencePiece vocabulary; slow tests (`-m slow`)
use the real Gemma 3 270M Q4_K_M file, fetched like `--model gemma3-270m` (once, into the cache).

    python -m pytest -q tests/test_gemma.py                  # everything (2.5 min on 2 shared cores; the file cached)
    python -m pytest -q -m "not slow" tests/test_gemma.py    # no real model (35-55 s)

Shape legend: B batch, T time, V vocab.
"""
import gzip
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import checkpoints as ckpt  # noqa: E402
import hub  # noqa: E402
import gguf_file  # noqa: E402
import data  # noqa: E402
import generate as G  # noqa: E402
import model as M  # noqa: E402
from cli import UserError  # noqa: E402
from conftest import tiny_model  # noqa: E402
from tokenizer import SentencePieceTokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")
TOL = 1e-4  # max |delta logit| against transformers in float32


# ============================================================================ dequantisation, bit for bit

# (random blocks of the K-quants and Q5_0/Q5_1, bit for bit against gguf: tests/test_gguf.py, with every type)


# ============================================================================ tiny random Gemma 3 vs transformers

V = 512  # tiny vocab: the tiny models need no tokenizer here
TINY = {  # name -> Gemma3TextConfig overrides. Window 8 and T=48: local layers really cut; head_dim 32 != C/H = 16;
    # query_pre_attn_scalar 24 != head_dim; the local RoPE base differs from the global one
    "rule6-tied": dict(num_hidden_layers=6),  # no layer_types: transformers applies the 6-layer rule, so do we
    "explicit-untied": dict(num_hidden_layers=4, tie_word_embeddings=False,
                            layer_types=["sliding_attention", "full_attention"] + ["sliding_attention"] * 2),
}


def build_hf_gemma(overrides: dict, seed: int = 0):
    """A random Gemma3ForCausalLM: every weight random, norms too (transformers' zeros = a multiplier of 1 would
    hide a norm we forgot or a 1 we did not add)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, max_position_embeddings=256, sliding_window=8,
                           query_pre_attn_scalar=24, rms_norm_eps=1e-6, attn_implementation="eager",
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
                           **overrides)
    hf = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(0.1 * torch.randn_like(p))
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


def load_ours(d: Path) -> M.Transformer:
    """load_model's HF path without a tokenizer: config.json -> Config, safetensors -> key map -> checked load."""
    cfg = M.Config(**ckpt.config_from_hf(json.loads((d / "config.json").read_text()), d.name))
    weights, dropped = ckpt.map_hf_gemma3(ckpt.read_hf_state_dict(d), cfg)
    assert dropped == []
    m = M.Transformer(cfg)
    M.load_weights(m, weights, str(d))
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request, tmp_path_factory):
    hf = build_hf_gemma(TINY[request.param])
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return dict(name=request.param, hf=hf, ours=load_ours(d))


def ids_(B, T, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))  # (B, T)


def test_tiny_config_follows_transformers(tiny):
    cfg, hf_cfg = tiny["ours"].config, tiny["hf"].config
    assert cfg.arch == "gemma3" and cfg.head_dim == 32 and cfg.sliding_window == 8
    assert cfg.local_layers == [i for i, t in enumerate(hf_cfg.layer_types) if t == "sliding_attention"]
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.attn_scale) == (1e6, 1e4, 24 ** -0.5)
    assert cfg.tie_embeddings == hf_cfg.tie_word_embeddings


def test_tiny_logits_match_transformers(tiny):
    ids = ids_(2, 48)
    with torch.no_grad():
        diff = (tiny["ours"](ids) - tiny["hf"](ids).logits).abs().max().item()
    assert diff <= TOL, f"{tiny['name']}: max |delta logit| {diff:.2e}"


def test_tiny_every_gemma_feature_matters(tiny):
    """The parity above would not notice a feature the test inputs never exercise: switching off each one (window,
    local RoPE base, query scale, the weights of the sandwich and q/k norms) must change the logits."""
    ids, base = ids_(2, 48), tiny["ours"]
    with torch.no_grad():
        ref = base(ids)
        variants = {
            "no window": dict(sliding_window=10_000),
            "global RoPE base everywhere": dict(rope_local_theta=base.config.rope_theta),
            "default query scale": dict(attn_scale=base.config.head_dim ** -0.5),
        }
        for what, change in variants.items():
            m = M.Transformer(M.Config(**{**vars(base.config), **change}))
            m.load_state_dict(base.state_dict())
            assert (m(ids) - ref).abs().max() > 100 * TOL, what
        m = M.Transformer(base.config)
        m.load_state_dict(base.state_dict())
        for name, p in m.named_parameters():
            if "post_" in name or "q_norm" in name or "k_norm" in name:
                p.data.fill_(1.0)  # a multiplier of 1: as if the norm's weights were absent
        assert (m(ids) - ref).abs().max() > 100 * TOL, "sandwich/q-k norm weights"


def test_tiny_greedy_cache_nocache_and_transformers_agree(tiny):
    m, hf = tiny["ours"], tiny["hf"]
    prompt = ids_(1, 5)[0].tolist()
    ours = G.generate(m, [prompt], 30, stop_ids=())[0]  # 35 positions > window 8: the cache's window is exercised
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)[0, 5:].tolist()
        seq = list(prompt)
        for _ in range(30):  # no cache: the whole sequence every step
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    assert ours == ref == seq[5:]


def test_tiny_left_padded_batch_and_static_decode(tiny):
    m = tiny["ours"]
    ids = ids_(2, 20, seed=3)
    prompts = [ids[0].tolist(), ids[1, :7].tolist()]  # unequal lengths: the short one is left-padded
    batch = G.generate(m, prompts, 20, stop_ids=())
    assert batch == [G.generate(m, [p], 20, stop_ids=())[0] for p in prompts]
    assert batch == G.generate(m, prompts, 20, stop_ids=(), decode="static")


def test_tiny_export_loads_back_in_transformers(tiny, tmp_path):
    """config_to_hf + to_hf (what purify --export writes) give a checkpoint transformers loads with equal logits."""
    from transformers import Gemma3ForCausalLM
    m = tiny["ours"]
    (tmp_path / "config.json").write_text(json.dumps(ckpt.config_to_hf(m.config)))
    sd = ckpt.to_hf({k: v.contiguous() for k, v in m.state_dict().items()}, m.config)
    ckpt.write_safetensors(tmp_path / "model.safetensors", sd, {"format": "pt"})
    back = Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = ids_(1, 40)
    with torch.no_grad():
        assert (back(ids).logits - m(ids)).abs().max() <= TOL


def test_fingerprints_of_other_families_unchanged():
    """The Gemma fields enter a fingerprint only for Gemma models, so artifacts built for SmolLM2 stay valid: the
    hash is over the same config keys as before the fields existed."""
    m = tiny_model(vocab=64, n_layer=1, n_head=2, n_embd=16, n_ffn=24, max_seq_len=8192)
    cfg = {k: v for k, v in vars(m.config).items() if k != "name" and k not in M.GEMMA3_FIELDS}
    sample = m.tok_emb.weight[:16].detach().to("cpu", torch.bfloat16).float().numpy().tobytes()
    import hashlib
    assert M.fingerprint(m) == hashlib.sha256(json.dumps(cfg, sort_keys=True).encode() + sample).hexdigest()[:16]


def test_gemma3_gguf_keys_and_the_published_rule():
    """What a GGUF states wins; what it leaves out comes from GEMMA3_RULE (the 270M file states only the window)."""
    meta = {"general.architecture": "gemma3", "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
            "gemma3.block_count": 12, "gemma3.embedding_length": 640, "gemma3.feed_forward_length": 2048,
            "gemma3.context_length": 32768, "gemma3.vocab_size": 1000, "gemma3.attention.key_length": 256,
            "gemma3.attention.sliding_window": 512, "gemma3.rope.freq_base": 1e6}
    rule = M.Config(**gguf_file.config_from_gguf(meta, "x"))
    assert rule.local_layers == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10] and rule.rope_local_theta == 10000.0
    assert rule.attn_scale == 256 ** -0.5 and rule.head_dim == 256
    stated = {**meta, "gemma3.attention.sliding_window_pattern": 4, "gemma3.rope.freq_base_swa": 5e4}
    cfg = M.Config(**gguf_file.config_from_gguf(stated, "x"))
    assert cfg.local_layers == [0, 1, 2, 4, 5, 6, 8, 9, 10] and cfg.rope_local_theta == 5e4
    per_layer = {**meta, "gemma3.attention.sliding_window_pattern": [True, False] * 6}
    assert M.Config(**gguf_file.config_from_gguf(per_layer, "x")).local_layers == list(range(0, 12, 2))
    with pytest.raises(UserError, match="soft-capping"):
        gguf_file.config_from_gguf({**meta, "gemma3.final_logit_softcapping": 30.0}, "x")


# ============================================================================ SentencePiece tokenizer, tiny vocabulary

def toy_sentencepiece_vocab() -> dict:
    """A vocabulary laid out like Gemma's: control and user-defined tokens (incl. whitespace runs stored with real
    spaces), 256 byte tokens, BPE merges learned on a small text in score order, then single characters -- missing
    some, one of which shares its first UTF-8 bytes with one present (日 kept, 旦 not), so byte fallback and
    left-over character prefixes are exercised."""
    text = ("the cat sat on the mat. the dog ate the hat! naïve café über 日本語 日本 "
            "def f(x):\n    return x * 2\n  two  spaces   three ") * 3
    words = list(text.replace(" ", "\u2581").replace("\n", ""))
    merges = []
    for _ in range(60):  # a tiny BPE trainer: merge the most frequent adjacent pair
        pairs = {}
        for a, b in zip(words, words[1:]):
            pairs[a + b] = pairs.get(a + b, 0) + 1
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        out, i = [], 0
        while i < len(words):
            if i + 1 < len(words) and words[i] + words[i + 1] == best:
                out.append(best)
                i += 2
            else:
                out.append(words[i])
                i += 1
        words = out
    chars = sorted(set(text.replace(" ", "\u2581").replace("\n", "")) - {"ï"})  # ï: byte fallback
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<unused0>"]
    types = [3] * len(tokens)
    user = ["\n", "\n\n", "\t", "\t\t", "<b>", "</b>", "  ", "   "]  # the last two: whitespace runs, real spaces
    tokens += user
    types += [4] * len(user)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    normal = list(dict.fromkeys(m for m in merges if m not in tokens)) + [c for c in chars if c not in tokens]
    tokens += normal
    types += [1] * len(normal)
    scores = [-1000.0 if ty in (3, 4) else 0.0 if ty == 6 else 0.0 for ty in types]
    first = types.index(1)
    scores[first:] = [-float(i) for i in range(len(normal))]
    return {"tokens": tokens, "token_type": types, "scores": scores}


def hf_from_vocab(vocab: dict):
    """transformers' own Gemma GGUF tokenizer conversion, fed the same vocabulary."""
    from transformers.integrations.gguf import convert_gguf_tokenizer
    backend, _ = convert_gguf_tokenizer("gemma3", {"tokenizer_type": "llama", **vocab})
    return backend


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pool = (list("thecatsdogmxf().:*!2") + [" ", "  ", "   ", "    ", "\n", "\n\n", "\n\n\n", "\t", "\t\t\t"]
            + ["the ", " the", "naïve", "café", "日本", "語", "旦", "ï", "€", "🙂", "\x00", "é", "e\u0301"]
            + ["<bos>", "<start_of_turn>", "<end_of_turn>", "<b>", "</b>", "<unused0>", "<unused", "<b", "\u2581"])
    return [""] + ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def test_sentencepiece_matches_transformers_on_a_toy_vocab():
    vocab = toy_sentencepiece_vocab()
    ours = SentencePieceTokenizer("toy", vocab["tokens"], vocab["token_type"], vocab["scores"], bos=2, eos=1)
    hf = hf_from_vocab(vocab)
    for text in random_texts(2000):
        ref = hf.encode(text, add_special_tokens=False).ids
        got = ours.encode(text, bos=False)
        assert got == ref, (text, got, ref)
        assert ours.decode(got) == hf.decode(ref, skip_special_tokens=False), text
    assert ours.encode("x")[0] == 2 and ours.add_bos  # <bos> by default: Gemma expects it


# ============================================================================ named model: chunks joined once

def fake_named_model(tmp_path, monkeypatch, chunks: list[bytes]):
    """A NAMED_MODELS entry whose chunk packages are tiny local packages on sys.path."""
    import hashlib
    whole = b"".join(chunks)
    pkgs = []
    for i, c in enumerate(chunks):
        mod = tmp_path / "site" / f"fmtest_part{i + 1}"
        (mod / "data").mkdir(parents=True)
        (mod / "__init__.py").write_text("")
        (mod / "data" / f"toy.gguf.part{i:02d}").write_bytes(c)
        pkgs.append(f"fmtest-part{i + 1}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("FREE_MOE_CACHE", str(tmp_path / "cache"))
    spec = {"file": "toy.gguf", "size": len(whole), "sha256": hashlib.sha256(whole).hexdigest(), "packages": pkgs}
    monkeypatch.setitem(hub.NAMED_MODELS, "toy", spec)
    return whole, spec


def test_named_model_joins_chunks_once_and_checks_sha256(tmp_path, monkeypatch):
    whole, spec = fake_named_model(tmp_path, monkeypatch, [b"GGUF" + bytes(100), bytes(range(256)), b"tail"])
    path = hub.named_model("toy")
    assert path == tmp_path / "cache" / "toy.gguf" and path.read_bytes() == whole
    assert hub.named_model("toy") == path  # cached: found by the next run
    path.write_bytes(whole[:-1] + b"X")  # a damaged cache file is refused, not loaded
    with pytest.raises(UserError, match="sha256"):
        hub.named_model("toy")
    monkeypatch.setitem(spec, "sha256", "0" * 64)  # chunks that do not join to the expected file
    path.unlink()
    with pytest.raises(UserError, match="sha256"):
        hub.named_model("toy")
    assert not path.exists() and not list((tmp_path / "cache").glob("*.tmp"))


def test_named_model_missing_package_is_installed_or_one_line_error(tmp_path, monkeypatch):
    fake_named_model(tmp_path, monkeypatch, [b"a", b"b"])
    monkeypatch.setitem(hub.NAMED_MODELS["toy"], "packages", ["fmtest-part1", "fmtest-absent"])
    calls = []
    monkeypatch.setattr(hub.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or type("R", (), {"returncode": 1}))
    with pytest.raises(UserError, match="cannot install fmtest-absent"):
        hub.named_model("toy")
    assert calls and calls[0][-4:] == ["install", "--no-deps", "-q", "fmtest-absent"]


# ============================================================================ the real Gemma 3 270M file (slow)

@pytest.fixture(scope="module")
def gemma_path():
    try:
        return hub.named_model("gemma3-270m")
    except UserError as e:
        pytest.skip(f"gemma3-270m not available: {e}")


@pytest.fixture(scope="module")
def gemma_meta(gemma_path):
    return gguf_file.read_gguf(gemma_path)  # (metadata, {gguf name: float32 tensor})


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return M.load_model("gemma3-270m")


@pytest.fixture(scope="module")
def hf_gemma(gemma_path):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name,
                                                dtype=torch.float32).eval()


@pytest.mark.slow
def test_real_gemma_config(gemma):
    model, tok = gemma
    cfg = model.config
    assert (cfg.arch, cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_ffn) == \
        ("gemma3", 18, 640, 4, 1, 256, 2048)
    assert cfg.local_layers == [i for i in range(18) if i not in (5, 11, 17)] and cfg.sliding_window == 512
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.attn_scale) == (1e6, 1e4, 1 / 16)
    assert tok.n_vocab == cfg.vocab_size == 262144 and tok.add_bos and tok.bos_id == 2 and 1 in tok.stop_ids


@pytest.mark.slow
def test_real_gemma_dequantization_bit_exact(gemma_path, gemma_meta):
    gguf = pytest.importorskip("gguf")
    _, ours = gemma_meta
    kinds = {}
    for t in gguf.GGUFReader(str(gemma_path)).tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        assert np.array_equal(ours[t.name].numpy().reshape(-1).view(np.uint32), ref.view(np.uint32)), t.name
        kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + 1
    assert kinds == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}


@pytest.mark.slow
def test_real_gemma_logits_and_greedy_match_transformers(gemma, hf_gemma):
    """Both sides dequantise to the same float32 weights (bit-exact, above) and compute in float32: only the order of
    float operations may differ, so the tolerance is the tiny models' 1e-4 (logits here are ~30 in size; measured:
    0, the same operations in the same order). 530 tokens: past the 512-token window of the local layers."""
    model, tok = gemma
    text = gzip.open(data.data_file("corpora/english_wikitext2_test.txt.gz"), "rt", encoding="utf-8").read(6000)
    prompts = [tok.encode(text)[:530], tok.encode("The capital of France is"), tok.encode("def fibonacci(n):\n")]
    worst = 0.0
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])  # (1, T)
            worst = max(worst, (model(x) - hf_gemma(x).logits).abs().max().item())
    print(f"\ngemma3-270m: max |delta logit| vs transformers = {worst:.3g}")
    assert worst <= TOL
    # greedy, the two short prompts in one left-padded batch; oracle: transformers' argmax at every step of the
    # finished sequence (what its greedy search picks, in one forward instead of 16 decode steps)
    for ids, got in zip(prompts[1:], G.generate(model, prompts[1:], 16, stop_ids=())):
        with torch.no_grad():
            picks = hf_gemma(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1].argmax(-1).tolist()
        assert got == picks, (tok.decode(got), tok.decode(picks))


@pytest.mark.slow
def test_real_gemma_wikitext2_perplexity(gemma):
    """WikiText-2 test perplexity, windows as in tests/test_model.py but each <bos> + window - 1 text tokens (Gemma
    needs <bos>). One window of 512 by default; FREE_MOE_PPL_TOKENS / FREE_MOE_PPL_WINDOW as in test_model."""
    import math
    import os
    model, tok = gemma
    window = int(os.environ.get("FREE_MOE_PPL_WINDOW", 512))
    n = max(1, int(os.environ.get("FREE_MOE_PPL_TOKENS", window)) // window)
    text = gzip.open(data.data_file("corpora/english_wikitext2_test.txt.gz"), "rt", encoding="utf-8").read()
    ids = tok.encode(text, bos=False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            x = torch.tensor([[tok.bos_id] + ids[i * (window - 1):(i + 1) * (window - 1)]])  # (1, T)
            nll += torch.nn.functional.cross_entropy(model(x)[0, :-1], x[0, 1:], reduction="sum").item()
            count += x.shape[1] - 1
    ppl = math.exp(nll / count)
    print(f"\ngemma3-270m wikitext-2 test perplexity: {ppl:.3f} ({count} predicted tokens, {n} windows of {window})")
    assert 1.0 < ppl < 100.0  # uniform over 262,144 tokens would be 262144


def tokenizer_texts() -> list[str]:
    """~2.6k texts: code, prose, math, medical, benchmark prompts, and unicode/whitespace stress strings."""
    rng = random.Random(0)

    def chunks(name, n, hi=1500):
        text = gzip.open(data.data_file(f"corpora/{name}.txt.gz"), "rt", encoding="utf-8").read()
        starts = [rng.randrange(len(text) - hi) for _ in range(n)]
        return [text[a:a + rng.randint(10, hi)] for a in starts]
    out = chunks("code_python", 600) + chunks("english_wikitext2_test", 300) + chunks("english_shakespeare", 100)
    out += chunks("math_gsm8k_train", 300) + chunks("medical_medmcqa", 100)
    with gzip.open(data.data_file("humaneval/HumanEval.jsonl.gz"), "rt", encoding="utf-8") as f:
        out += [json.loads(line)["prompt"] for line in f]
    pool = (list("abcXYZ019 .,;:!?'\"()[]{}<>/\\=+-*_#@$%^&~`|éüßñçøåæœαβγπΣΩжизнь日本語中文漢字한국어العربيةहिन्दी")
            + ["🙂", "👍🏽", "🇫🇷", "∑", "√", "\u200b", "\u0301", "\x00", "\x1b", "\ufeff", "\U0001F9FF", "𝔘"]
            + [" " * k for k in (1, 2, 3, 5, 17, 40)] + ["\n" * k for k in (1, 2, 3, 40)] + ["\t", "\t" * 35, "\r\n"]
            + ["<start_of_turn>", "<end_of_turn>", "<bos>", "<unused12>", "<start_of", "<table>", "</div>", "> </"])
    out += ["".join(rng.choice(pool) for _ in range(rng.randint(1, 60))) for _ in range(1000)]
    out += ["".join(chr(rng.randint(0x20, 0x10FFFF)) for _ in range(rng.randint(1, 20))).encode(
        "utf-8", "replace").decode("utf-8", "replace") for _ in range(200)]
    return out


@pytest.mark.slow
def test_real_gemma_tokenizer_matches_transformers(gemma, gemma_meta):
    """Parity with transformers' conversion of the same file's vocabulary (AutoTokenizer(gguf_file=...) runs it
    after reading the file); the speed of both is printed."""
    import time
    from transformers.integrations.gguf import convert_gguf_tokenizer
    _, tok = gemma
    meta, _ = gemma_meta
    hf, _ = convert_gguf_tokenizer("gemma3", {"tokenizer_type": "llama", "tokens": meta["tokenizer.ggml.tokens"],
                                              "scores": meta["tokenizer.ggml.scores"],
                                              "token_type": meta["tokenizer.ggml.token_type"]})
    texts = tokenizer_texts()
    t0 = time.perf_counter()
    ours = [tok.encode(t, bos=False) for t in texts]
    t1 = time.perf_counter()
    ref = [hf.encode(t, add_special_tokens=False).ids for t in texts]
    t2 = time.perf_counter()
    bad = [t for t, a, b in zip(texts, ours, ref) if a != b]
    chars = sum(map(len, texts))
    print(f"\ngemma tokenizer: {len(texts) - len(bad)}/{len(texts)} texts identical; {chars / (t1 - t0) / 1e6:.2f} M "
          f"chars/s ours vs {chars / (t2 - t1) / 1e6:.2f} M chars/s transformers (one text per call)")
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[0][:80]!r}"
    assert all(tok.decode(a) == hf.decode(a, skip_special_tokens=False) for a in ours[::10])
