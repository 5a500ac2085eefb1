"""Tests for tokenizer.py: our byte-level BPE tokenizers encode exactly as transformers' do (the oracle) on about 4000
lines of prose, code, math, unicode and multi-line blocks, and decode(encode(x)) == x: SmolLM2's from its GGUF and from
tokenizer.json, GPT-2's from encoder.json + vocab.bpe, Llama-3's from tiktoken's file and as an HF tokenizer.json, and
the HF tokenizer files written from a GGUF's vocabulary (hf_tokenizer_files). All slow: they read the real data files
and the real GGUF.
"""
import gzip
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import gguf_file  # noqa: E402
import tokenizer as T  # noqa: E402
import data  # noqa: E402
import model as M  # noqa: E402
from conftest import GPT2_TOK_DIR, SHARED, smol_hf_tokenizer, write_gpt2_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")

SMOL_HF_TOK = smol_hf_tokenizer()  # ../shared's, else written from the GGUF
LLAMA3_TOK = SHARED / "models" / "llama3-tokenizer" / "tokenizer.model"


@pytest.fixture(scope="module")
def hf_smol_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(SMOL_HF_TOK)


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
