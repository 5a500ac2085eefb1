"""tokenizer.py — text <-> token ids on tiktoken, built from whatever tokenizer files a checkpoint ships.

Formats: the vocabulary inside a GGUF file, HF `tokenizer.json` (byte-level BPE), OpenAI's GPT-2
encoder.json + vocab.bpe, and Meta's Llama-3 `tokenizer.model`; plus the chat templates (ChatML, Llama-3, Gemma).
All of them are byte-level BPE, which tiktoken runs given (regex pattern, {token bytes: merge rank}) -- except
Gemma's SentencePiece BPE, which `SentencePieceTokenizer` maps exactly onto tiktoken (see there).
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
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
        # the model expects <bos> at the start of every sequence: encode() adds it unless told otherwise. Only the
        # SentencePiece (Gemma) tokenizer sets it, from its file; without <bos> Gemma's loss is several times higher
        self.add_bos = False
        self.stop_ids = {i for i in (eos,) if i is not None}
        if chat_format == "chatml" and "<|im_end|>" in special:
            self.stop_ids.add(special["<|im_end|>"])
        if chat_format == "llama3":
            self.stop_ids |= {special[t] for t in ("<|eot_id|>", "<|end_of_text|>") if t in special}

    @property
    def n_vocab(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """bos: prepend <bos>; None = if the model expects it (add_bos). Continuations and the pieces of a longer
        stream pass bos=False."""
        # special-token strings in the text become special tokens, as with HF tokenizers
        ids = self.enc.encode(text, allowed_special="all")
        bos = self.add_bos if bos is None else bos
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
        if self.chat_format == "gemma":  # Gemma has no system role: a system prompt opens the user turn
            text = f"{system}\n\n{user}" if system else user
            return f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n"
        raise UserError("this tokenizer has no chat template; drop --chat")

    # --- constructors, one per file format

    @classmethod
    def from_gguf_meta(cls, meta: dict, path) -> "Tokenizer":
        if meta.get("tokenizer.ggml.model") == "llama":  # SentencePiece (Gemma)
            return SentencePieceTokenizer.from_gguf_meta(meta, path)
        if meta.get("tokenizer.ggml.model") != "gpt2":
            raise UserError(f"{path}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported "
                            "(byte-level BPE 'gpt2', SentencePiece 'llama')")
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
        cfg_file = path / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
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
    if "<start_of_turn>" in template:
        return {"chat_format": "gemma"}
    return {}


def hf_tokenizer_files(meta: dict) -> dict[str, str]:
    """The byte-level BPE vocabulary inside a GGUF file, written as HF `tokenizer.json`, `tokenizer_config.json`
    and `chat_template.jinja` (the inverse of `from_tokenizer_json`): an expert exported from a GGUF-only model
    then loads in `transformers` with its own tokenizer. SentencePiece vocabularies (Gemma) are not written."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise UserError(f"writing HF tokenizer files needs a byte-level BPE ('gpt2') vocabulary, not "
                        f"{meta.get('tokenizer.ggml.model')!r}")
    pattern = GGUF_PRE.get(meta.get("tokenizer.ggml.pre", "default"), GPT2_PATTERN)
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type")
    types = types if types is not None else [1] * len(tokens)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    # GPT-2's own regex is ByteLevel's built-in split; any other is an explicit Split before a regex-free ByteLevel
    pre = ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
           if pattern == GPT2_PATTERN else
           {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]})
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": {t: i for i, t in enumerate(tokens)},
             "merges": [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", [])]}
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
          "pre_tokenizer": pre, "post_processor": None,
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": model}
    name = lambda key: tokens[int(meta[key])] if key in meta else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
              "pad_token": name("tokenizer.ggml.padding_token_id"), "add_bos_token": False,
              "model_max_length": int(meta.get(f"{meta.get('general.architecture')}.context_length", 2048))}
    files = {"tokenizer.json": json.dumps(tj, ensure_ascii=False),
             "tokenizer_config.json": json.dumps({k: v for k, v in config.items() if v is not None}, indent=1)}
    if meta.get("tokenizer.chat_template"):  # its own file, as transformers >= 4.47 writes it
        files["chat_template.jinja"] = meta["tokenizer.chat_template"]
    return files


# ----------------------------------------------------------------------------- SentencePiece BPE (Gemma)

SP_SPACE = "\u2581"  # ▁, SentencePiece's visible space
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6  # GGUF token_type values (2 unknown, 5 unused)


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece BPE from a GGUF vocabulary (Gemma), computed exactly by tiktoken.

    What SentencePiece BPE does (and what `transformers` builds from a Gemma GGUF):
      1. added tokens -- control (<bos>, <start_of_turn>, <unusedN>) and user-defined ("\\n" and "\\t" runs,
         HTML tags) -- are cut out of the raw text first, leftmost-longest;
      2. in each remaining piece every space becomes ▁ (no space prefix, no regex pre-split);
      3. BPE over characters: repeatedly merge the adjacent pair whose union is the best-scoring vocabulary
         token; a character missing from the vocabulary is spelled as byte tokens <0xXX> (byte fallback).
    Gemma stores its whitespace runs (user-defined) with real spaces; they are ordinary BPE tokens spelled ▁▁..
    that merge before all others (their ids come first), as in transformers' conversion.

    tiktoken runs *byte-level* BPE: it starts from bytes and merges the adjacent pair whose union has the lowest
    rank. Three choices make it compute step 3 exactly (tests/test_gemma.py checks it against transformers):
      - characters first: every vocabulary character and every proper prefix of its UTF-8 bytes rank below all
        multi-character tokens, so all bytes become characters before any real merge (SP starts from characters);
      - then the multi-character tokens, best score first (Gemma's scores fall with the id);
      - ranks are not ids: a table maps rank -> id, and a left-over character prefix (from a character missing
        from the vocabulary that shares its first bytes with one present) becomes its byte tokens."""

    def __init__(self, name, tokens: list[str], types: list[int], scores: list[float], bos=None, eos=None,
                 pad=None, chat_format=None, default_system=None, add_bos: bool = True):
        tokens = [SP_SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]  # Gemma's whitespace runs
        runs = {i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == USER_DEFINED and not t.strip(SP_SPACE)}
        added = {t: i for i, (t, ty) in enumerate(zip(tokens, types))
                 if ty in (CONTROL, USER_DEFINED) and t and i not in runs}
        byte_id = {int(t[3:5], 16): i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == BYTE}
        if sorted(byte_id) != list(range(256)):
            raise UserError(f"{name}: SentencePiece vocabulary without its 256 byte-fallback tokens")
        pieces = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == NORMAL or i in runs}
        chars = {t: i for t, i in pieces.items() if len(t) == 1}

        ranks, rank_id = {}, []  # {bytes: rank}; rank r stands for token rank_id[r] (-1: spell it as bytes)
        for b in range(256):  # a lone byte is its ASCII character if the vocabulary has it, else its byte token
            ranks[bytes([b])] = b
            rank_id.append(chars.get(chr(b), byte_id[b]) if b < 0x80 else byte_id[b])
        for c, i in chars.items():  # characters, after the prefixes of their UTF-8 bytes
            utf8 = c.encode("utf-8")
            for k in range(2, len(utf8) + 1):
                if utf8[:k] not in ranks:
                    ranks[utf8[:k]] = len(rank_id)
                    rank_id.append(-1)
            rank_id[ranks[utf8]] = i  # (a character is never a byte prefix of another: UTF-8 is prefix-free)
        # multi-character pieces, best first: whitespace runs (by id, before every scored piece), then by score.
        # A piece holding a character that is not itself a piece can never be formed, so it gets no rank.
        multi = sorted((i not in runs, -scores[i], i, t) for t, i in pieces.items() if len(t) > 1)
        for *_, i, t in multi:
            if all(ch in chars for ch in t):
                ranks[t.encode("utf-8")] = len(rank_id)
                rank_id.append(i)
        super().__init__(name, r"(?s:.+)", ranks, {}, bos, eos, pad, chat_format, default_system)
        self.special = added  # matched whole in the text, like special tokens elsewhere
        self.add_bos = add_bos
        self.rank_id = np.array(rank_id, dtype=np.int64)
        self.byte_id = np.array([byte_id[b] for b in range(256)], dtype=np.int64)
        self.partial = {r: p for p, r in ranks.items() if rank_id[r] == -1}  # rank -> its bytes
        # added tokens as one trie regex: a 6k-way alternation tried one by one is ~60x slower
        self.added_re = re.compile(trie_regex(added)) if added else None
        # decoding: each id's bytes (▁ -> space, <0xXX> -> that byte); joined, then UTF-8 with replacement
        self.id_bytes = [t.replace(SP_SPACE, " ").encode("utf-8") for t in tokens]
        for b, i in byte_id.items():
            self.id_bytes[i] = bytes([b])
        if chat_format == "gemma" and "<end_of_turn>" in added:
            self.stop_ids.add(added["<end_of_turn>"])

    @property
    def n_vocab(self) -> int:
        return len(self.id_bytes)

    def _bpe(self, text: str) -> list[int]:
        if not text:
            return []
        ranks = self.enc.encode_ordinary(text.replace(" ", SP_SPACE))
        ids = self.rank_id[ranks]
        if (ids >= 0).all():
            return ids.tolist()
        out = []  # rare: left-over character prefixes become their byte tokens
        for r, i in zip(ranks, ids.tolist()):
            out += self.byte_id[list(self.partial[r])].tolist() if i < 0 else [i]
        return out

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        bos = self.add_bos if bos is None else bos
        out, pos = ([self.bos_id] if bos and self.bos_id is not None else []), 0
        for m in self.added_re.finditer(text) if self.added_re else ():
            out += self._bpe(text[pos:m.start()])
            out.append(self.special[m.group()])
            pos = m.end()
        return out + self._bpe(text[pos:])

    def decode(self, ids) -> str:
        return b"".join(self.id_bytes[i] for i in ids).decode("utf-8", errors="replace")

    @classmethod
    def from_gguf_meta(cls, meta: dict, path) -> SentencePieceTokenizer:
        if meta.get("tokenizer.ggml.add_space_prefix", True):
            raise UserError(f"{path}: SentencePiece with a space prefix (Llama 2, Mistral) is not supported; "
                            "only without one (Gemma)")
        tokens = meta["tokenizer.ggml.tokens"]
        get = lambda k: int(meta[k]) if k in meta else None
        return cls(Path(path).stem, tokens, [int(t) for t in meta["tokenizer.ggml.token_type"]],
                   [float(s) for s in meta["tokenizer.ggml.scores"]], bos=get("tokenizer.ggml.bos_token_id"),
                   eos=get("tokenizer.ggml.eos_token_id"), pad=get("tokenizer.ggml.padding_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                   **_chat_format(meta.get("tokenizer.chat_template", "")))


def trie_regex(words) -> str:
    """A regex matching any of `words`, the longest one where several match: a trie, so that each text position
    costs one character test instead of one per word."""
    trie = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}  # a word ends here

    def walk(node) -> str:
        alts = [re.escape(ch) + walk(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body  # greedy: the longer word is tried first

    return walk(trie)
