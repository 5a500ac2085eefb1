"""tokenizer.py — text <-> token ids on tiktoken, built from whatever tokenizer files a checkpoint ships.

Formats: the vocabulary inside a GGUF file, HF `tokenizer.json` (byte-level BPE), OpenAI's GPT-2
encoder.json + vocab.bpe, and Meta's Llama-3 `tokenizer.model`; plus the chat templates (ChatML, Llama-3).
All of them are byte-level BPE, which tiktoken runs given (regex pattern, {token bytes: merge rank}).
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import tiktoken

from cli import UserError

# Pre-tokenisation regexes: text is first split into chunks, BPE runs inside each chunk.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE = {"gpt2": GPT2_PATTERN, "smollm": GPT2_PATTERN, "default": GPT2_PATTERN,
            "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN}


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte is shown as a printable unicode char ('Ġ' is a space)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def ranks_from_byte_level(vocab: dict[str, int], merges: list) -> dict[bytes, int]:
    """Turn an HF/GGUF byte-level BPE vocab into tiktoken's {token bytes: rank}, with rank = token id.

    tiktoken merges the pair whose result has the lowest rank; HF merges by position in the merge list.
    The two agree when ids grow with merge order, which we check rather than assume. Several merges may build
    the same token (Llama-3's tokenizer.json lists every split of a token), so equal neighbours are fine."""
    dec = byte_decoder()
    to_bytes = lambda s: bytes(dec[c] for c in s)
    ids = [vocab.get("".join(m) if isinstance(m, (list, tuple)) else m.replace(" ", "", 1)) for m in merges]
    if any(i is None for i in ids) or any(a > b for a, b in zip(ids, ids[1:])):
        raise UserError("BPE vocab ids do not follow merge order; this tokenizer cannot be expressed in tiktoken")
    ranks = {}
    for tok, i in vocab.items():
        try:
            ranks[to_bytes(tok)] = i
        except KeyError:
            continue  # not a byte-level token (e.g. an added special token stored in the vocab)
    return ranks


class Tokenizer:
    """A tiktoken Encoding plus the special tokens and chat template of the model."""

    def __init__(self, name, pattern, ranks, special: dict[str, int], bos=None, eos=None, pad=None,
                 chat_format=None, default_system=None):
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        self.special = special
        self.bos_id, self.eos_id = bos, eos
        self.pad_id = pad if pad is not None else (eos if eos is not None else 0)
        self.chat_format, self.default_system = chat_format, default_system
        self.stop_ids = {i for i in (eos,) if i is not None}
        if chat_format == "chatml" and "<|im_end|>" in special:
            self.stop_ids.add(special["<|im_end|>"])
        if chat_format == "llama3":
            self.stop_ids |= {special[t] for t in ("<|eot_id|>", "<|end_of_text|>") if t in special}

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str, bos: bool = False) -> list[int]:
        # special-token strings in the text become special tokens, as with HF tokenizers
        ids = self.enc.encode(text, allowed_special="all")
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids))

    def chat_prompt(self, user: str, system: str | None = None) -> str:
        """Wrap one user turn in the model's chat template, ending where the assistant starts speaking."""
        system = system if system is not None else self.default_system
        if self.chat_format == "chatml":
            sys_part = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
            return f"{sys_part}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        if self.chat_format == "llama3":
            h = lambda role, text: f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>"
            return ("<|begin_of_text|>" + (h("system", system) if system else "") + h("user", user)
                    + "<|start_header_id|>assistant<|end_header_id|>\n\n")
        raise UserError("this tokenizer has no chat template; drop --chat")

    # --- constructors, one per file format

    @classmethod
    def from_gguf_meta(cls, meta: dict, path) -> "Tokenizer":
        if meta.get("tokenizer.ggml.model") != "gpt2":
            raise UserError(f"{path}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported "
                            "(only byte-level BPE, 'gpt2')")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE:
            raise UserError(f"{path}: pre-tokenizer {pre!r} is not supported ({', '.join(GGUF_PRE)})")
        tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type")
        types = types if types is not None else [1] * len(tokens)
        special = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)}  # control / user-defined
        vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty not in (3, 4)}
        ranks = ranks_from_byte_level(vocab, meta.get("tokenizer.ggml.merges", []))
        template = meta.get("tokenizer.chat_template", "")
        get = lambda k: int(meta[k]) if k in meta else None
        return cls(Path(path).stem, GGUF_PRE[pre], ranks, special, bos=get("tokenizer.ggml.bos_token_id"),
                   eos=get("tokenizer.ggml.eos_token_id"), pad=get("tokenizer.ggml.padding_token_id"),
                   **_chat_format(template))

    @classmethod
    def from_tokenizer_json(cls, path: Path, config: dict | None = None) -> "Tokenizer":
        """HF `tokenizer.json` with a byte-level BPE model (SmolLM2, Qwen2, Llama-3, GPT-2)."""
        try:
            tj = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read tokenizer ({e})") from None
        if tj.get("model", {}).get("type") != "BPE":
            raise UserError(f"{path}: tokenizer model {tj.get('model', {}).get('type')!r} is not supported (BPE)")
        pattern = _pattern_from_pretokenizer(tj.get("pre_tokenizer"), path)
        special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        vocab = {k: v for k, v in tj["model"]["vocab"].items() if k not in special}
        ranks = ranks_from_byte_level(vocab, tj["model"]["merges"])
        cfg = config or {}
        template = cfg.get("chat_template", "") or ""
        tid = lambda key: special.get(cfg[key]) if isinstance(cfg.get(key), str) else None
        return cls(Path(path).parent.name, pattern, ranks, special, bos=tid("bos_token"), eos=tid("eos_token"),
                   pad=tid("pad_token"), **_chat_format(template))

    @classmethod
    def from_gpt2_files(cls, encoder_json: Path, vocab_bpe: Path) -> "Tokenizer":
        """OpenAI's original GPT-2 files (HF names them vocab.json and merges.txt)."""
        encoder = json.loads(Path(encoder_json).read_text())
        merges = [ln for ln in Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:] if ln]
        special = {"<|endoftext|>": encoder.pop("<|endoftext|>", 50256)}
        ranks = ranks_from_byte_level(encoder, merges)
        eot = special["<|endoftext|>"]
        return cls("gpt2", GPT2_PATTERN, ranks, special, bos=eot, eos=eot, pad=eot)

    @classmethod
    def from_tiktoken_file(cls, path: Path) -> "Tokenizer":
        """Meta's Llama-3 `tokenizer.model`: lines of base64(token bytes) and rank, plus 256 special tokens."""
        ranks = {}
        for line in Path(path).read_text().splitlines():
            if line:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
        n = len(ranks)
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
        names += [f"<|reserved_special_token_{i}|>" for i in range(5, 256 - 5)]
        special = {t: n + i for i, t in enumerate(names)}
        return cls("llama3", LLAMA3_PATTERN, ranks, special, bos=special["<|begin_of_text|>"],
                   eos=special["<|end_of_text|>"], chat_format="llama3")

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        tok_cfg = json.loads((path / "tokenizer_config.json").read_text()) if (path / "tokenizer_config.json").exists() else {}
        if (path / "chat_template.jinja").exists():
            tok_cfg["chat_template"] = (path / "chat_template.jinja").read_text()
        if (path / "tokenizer.json").exists():
            return cls.from_tokenizer_json(path / "tokenizer.json", tok_cfg)
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            return cls.from_gpt2_files(path / "vocab.json", path / "merges.txt")
        if (path / "tokenizer.model").exists():
            return cls.from_tiktoken_file(path / "tokenizer.model")
        raise UserError(f"{path}: no tokenizer.json, vocab.json+merges.txt or tokenizer.model found")


def _pattern_from_pretokenizer(pre: dict | None, path) -> str:
    """Read the split regex out of an HF pre_tokenizer: ByteLevel(use_regex) = GPT-2's, or an explicit Split."""
    if pre is None:
        raise UserError(f"{path}: tokenizer has no pre_tokenizer")
    if pre["type"] == "ByteLevel":
        return GPT2_PATTERN
    if pre["type"] == "Sequence":
        for p in pre["pretokenizers"]:
            if p["type"] == "Split" and "Regex" in p.get("pattern", {}):
                return p["pattern"]["Regex"]
            if p["type"] == "ByteLevel" and p.get("use_regex", True):
                return GPT2_PATTERN
    raise UserError(f"{path}: pre_tokenizer {pre['type']!r} is not supported")


def _chat_format(template: str) -> dict:
    if "<|im_start|>" in template:
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template)
        return {"chat_format": "chatml", "default_system": m.group(1) if m else None}
    if "<|start_header_id|>" in template:
        return {"chat_format": "llama3"}
    return {}


