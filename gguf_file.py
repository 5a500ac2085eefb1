"""gguf_file.py — llama.cpp's GGUF file: metadata, tensor table, and the dequantisation of its quantized blocks.

Used by model.load_model for a .gguf path. A GGUF file is a header, metadata key/values (architecture, sizes,
the tokenizer's vocabulary), a tensor table (name, dims, type, offset) and the aligned raw tensor data.
`read_gguf` returns (metadata, {gguf name: float32 tensor}); `config_from_gguf` turns the metadata into
model.Config's keyword arguments and `map_gguf` renames the tensors to ours (returning what it dropped).
Shape legend: GGUF dims are listed ne0 first (the contiguous axis); a (ne1, ne0) tensor is torch's (out, in).
"""
from __future__ import annotations

import math
import mmap
import struct
from pathlib import Path

import numpy as np
import torch

from checkpoints import cat_rows
from cli import UserError

# --- GGUF: header, metadata key/values, tensor table, then aligned raw tensor data

GGUF_VALUE = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_STRING, GGUF_ARRAY = 8, 9
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 10: "Q2_K", 11: "Q3_K",
              12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 30: "BF16"}
# bytes per block and weights per block for the types we can dequantize
GGML_BLOCK = {"F32": (4, 1), "F16": (2, 1), "BF16": (2, 1), "Q8_0": (34, 32), "Q4_0": (18, 32), "Q4_1": (20, 32),
              "Q5_0": (22, 32), "Q5_1": (24, 32), "Q2_K": (84, 256), "Q3_K": (110, 256), "Q4_K": (144, 256),
              "Q5_K": (176, 256), "Q6_K": (210, 256)}


class _Reader:
    """Little-endian cursor over a memory-mapped file, with truncation checks."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n):
        if self.pos + n > len(self.buf):
            raise UserError(f"{self.path}: truncated GGUF file (needed byte {self.pos + n}, file has {len(self.buf)})")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype):
        if vtype == GGUF_STRING:
            return self.string()
        if vtype == GGUF_ARRAY:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in GGUF_VALUE:  # numeric arrays in one read
                fmt = GGUF_VALUE[etype]
                return list(np.frombuffer(self.take(n * struct.calcsize(fmt)), dtype=np.dtype(fmt)))
            return [self.value(etype) for _ in range(n)]
        if vtype not in GGUF_VALUE:
            raise UserError(f"{self.path}: corrupt GGUF metadata (value type {vtype})")
        return self.scalar(GGUF_VALUE[vtype])


def read_gguf(path: Path, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """Parse a GGUF file: returns (metadata, {gguf tensor name: float32 tensor in torch (out, in) layout}).
    tensors=False stops after the metadata (e.g. the tokenizer): ({...}, {}), nothing dequantized."""
    with open(path, "rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise UserError(f"{path}: empty file") from None
    r = _Reader(buf, path)
    if r.take(4) != b"GGUF":
        raise UserError(f"{path}: not a GGUF file (bad magic)")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise UserError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.scalar("<I"))
    if not tensors:
        return meta, {}
    infos = []
    for _ in range(n_tensors):
        name, n_dims = r.string(), r.scalar("<I")
        if not 1 <= n_dims <= 4:  # GGML_MAX_DIMS
            raise UserError(f"{path}: corrupt GGUF tensor table: tensor {name} has {n_dims} dimensions (1 to 4)")
        dims = [r.scalar("<Q") for _ in range(n_dims)]  # ne0 first: the contiguous axis
        infos.append((name, dims, r.scalar("<I"), r.scalar("<Q")))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, (int, np.integer)) or align <= 0 or align % 8:
        raise UserError(f"{path}: corrupt GGUF metadata: general.alignment is {align!r} (a positive multiple of 8)")
    data_start = (r.pos + align - 1) // align * align
    # Check the whole tensor table before decoding anything: every tensor inside the file, whole blocks only,
    # and no two tensors sharing bytes (GGUF allows padding between tensors, not overlap).
    plan = []
    for name, dims, ttype, offset in infos:
        kind = GGML_TYPES.get(ttype, f"type {ttype}")
        if kind not in GGML_BLOCK:
            raise UserError(f"{path}: tensor {name} uses quantization {kind}, which is not supported "
                            f"(supported: {', '.join(GGML_BLOCK)})")
        block_bytes, block_size = GGML_BLOCK[kind]
        if dims[0] % block_size:
            raise UserError(f"{path}: corrupt GGUF tensor table: tensor {name} has rows of {dims[0]} weights, "
                            f"not a multiple of the {kind} block of {block_size}")
        if offset % align:
            raise UserError(f"{path}: corrupt GGUF tensor table: tensor {name} at offset {offset} is not aligned "
                            f"to {align} bytes")
        start = data_start + offset
        end = start + math.prod(dims) // block_size * block_bytes  # Python ints: huge dims cannot overflow
        if end > len(buf):
            raise UserError(f"{path}: truncated GGUF file: tensor {name} ends at byte {end}, file has {len(buf)}")
        plan.append((start, end, name, dims, kind))
    names = [p[2] for p in plan]
    if len(set(names)) != len(names):
        raise UserError(f"{path}: corrupt GGUF tensor table: a tensor name appears twice")
    for (_, end_a, a, *_), (start_b, _, b, *_) in zip(sorted(plan), sorted(plan)[1:]):
        if start_b < end_a:
            raise UserError(f"{path}: corrupt GGUF tensor table: tensors {a} and {b} overlap")
    weights = {}
    for start, end, name, dims, kind in plan:
        raw = np.frombuffer(buf, dtype=np.uint8, count=end - start, offset=start)
        w = dequantize(raw, kind)
        weights[name] = torch.from_numpy(w.reshape(list(reversed(dims))))  # [ne0, ne1] -> (ne1, ne0) = (out, in)
    return meta, weights


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2) bytes -> (n, 1) float32: one fp16 factor per block."""
    return b.copy().view(np.float16).astype(np.float32)


def _fields(b: np.ndarray, bits: int) -> np.ndarray:
    """(n, m) bytes -> (n, 8 // bits, m): the bit fields of every byte, lowest field first.

    Packing rule shared by all types: byte j of a run holds weight j in its lowest field, weight j + m in the
    next one, and so on -- so stacking the fields along a new axis puts the weights in order."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)[None, :, None]  # (1, 8 // bits, 1)
    return (b[:, None, :] >> shifts) & np.uint8((1 << bits) - 1)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, each (n, 8).

    Bytes 0-3 hold scales 0-3 (low 6 bits), bytes 4-7 mins 0-3; scales/mins 4-7 keep their low 4 bits in
    bytes 8-11 (low / high nibble) and their top 2 bits in the spare top bits of bytes 0-3 / 4-7."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    """Bytes -> float32 weights, vectorised over all blocks at once.

    32-weight blocks (d, m: fp16; q: unsigned code):
      Q8_0  d, 32 x int8                                   w = d * q
      Q4_0  d, 16 B of nibbles                             w = d * (q - 8)
      Q4_1  d, m, 16 B of nibbles                          w = d * q + m
      Q5_0  d, 4 B high bits, 16 B nibbles                 w = d * (q - 16)      q = nibble | high bit << 4
      Q5_1  d, m, 4 B high bits, 16 B nibbles              w = d * q + m
    256-weight super-blocks:
      Q2_K  16 B scale|min nibbles, 64 B 2-bit q, d, dmin  16 x 16 weights: w = d*scale * q - dmin*min
      Q3_K  32 B high bits, 64 B 2-bit q, 12 B scales, d   16 x 16: w = d*(scale - 32) * (q - 4 if high bit clear)
      Q4_K  d, dmin, 12 B 6-bit scales|mins, 128 B nibbles  8 x 32: w = d*scale * q - dmin*min
      Q5_K  d, dmin, 12 B scales|mins, 32 B high bits, 128 B nibbles    as Q4_K with q = nibble | high bit << 4
      Q6_K  128 B low nibbles, 64 B 2-bit highs, 16 x int8 scales, d    16 x 16: w = d*scale * (q - 32)
    """
    if kind == "F32":
        return raw.view(np.float32).copy()
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32)
    if kind == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    block_bytes = GGML_BLOCK[kind][0]
    blk = raw.reshape(-1, block_bytes)  # (n, bytes)
    n = len(blk)
    if kind == "Q8_0":
        return (_f16(blk[:, 0:2]) * blk[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        d = _f16(blk[:, 0:2])  # (n, 1)
        q = _fields(blk[:, -16:], 4).reshape(n, 32)  # (n, 32) low 4 bits of each weight
        if kind in ("Q5_0", "Q5_1"):  # the 5th bits: one little-endian uint32 per block, bit j for weight j
            hi = blk[:, -20:-16].copy().view(np.uint32)  # (n, 1)
            q = q | (((hi >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4)
        if kind == "Q4_0":
            return (d * (q.astype(np.int8) - np.int8(8)).astype(np.float32)).reshape(-1)
        if kind == "Q5_0":
            return (d * (q.astype(np.int8) - np.int8(16)).astype(np.float32)).reshape(-1)
        return (d * q.astype(np.float32) + _f16(blk[:, 2:4])).reshape(-1)  # Q4_1 / Q5_1: with a min
    if kind == "Q2_K":
        s, qs = blk[:, 0:16], blk[:, 16:80]
        d, dmin = _f16(blk[:, 80:82]), _f16(blk[:, 82:84])
        dl = (d * (s & 0x0F).astype(np.float32)).reshape(n, 16, 1)
        ml = (dmin * (s >> 4).astype(np.float32)).reshape(n, 16, 1)
        # two halves of 128 weights, each 32 bytes holding four 2-bit fields -> (n, 16 sub-blocks, 16)
        q = _fields(qs.reshape(n * 2, 32), 2).reshape(n, 16, 16).astype(np.float32)
        return (dl * q - ml).reshape(-1)
    if kind == "Q3_K":
        hmask, qs, s, d = blk[:, 0:32], blk[:, 32:96], blk[:, 96:108], _f16(blk[:, 108:110])
        # 16 6-bit scales: low nibbles from bytes 0-7 (low then high nibble), top 2 bits from bytes 8-11
        lo = _fields(s[:, 0:8], 4).reshape(n, 16)
        hi = _fields(s[:, 8:12], 2).reshape(n, 16)
        scale = ((lo | (hi << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
        dl = (d * scale).reshape(n, 16, 1)
        ql = _fields(qs.reshape(n * 2, 32), 2).reshape(n, 16, 16)
        qh = _fields(hmask, 1).reshape(n, 16, 16) ^ np.uint8(1)  # a clear high bit means "subtract 4"
        q = (ql.astype(np.int8) - (qh << 2).astype(np.int8)).astype(np.float32)
        return (dl * q).reshape(-1)
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blk[:, 0:2]), _f16(blk[:, 2:4])
        sc, mn = _k_scales(blk[:, 4:16])
        dl, ml = (d * sc).reshape(n, 8, 1), (dmin * mn).reshape(n, 8, 1)
        # 4 runs of 32 bytes; run r holds sub-block 2r in low nibbles and 2r+1 in high nibbles
        q = _fields(blk[:, -128:].reshape(n * 4, 32), 4).reshape(n, 8, 32)
        if kind == "Q5_K":  # 32 bytes of 5th bits: bit i of byte j belongs to weight j of sub-block i
            q = q | (_fields(blk[:, 16:48], 1).reshape(n, 8, 32) << 4)
        return (dl * q.astype(np.float32) - ml).reshape(-1)
    if kind == "Q6_K":
        ql, qh, s, d = blk[:, 0:128], blk[:, 128:192], blk[:, 192:208], _f16(blk[:, 208:210])
        dl = (d * s.view(np.int8).astype(np.float32)).reshape(n, 16, 1)
        # per 128-weight half: 64 bytes of nibbles (low: weights 0-63, high: 64-127), 32 bytes of 2-bit highs
        lo = _fields(ql.reshape(n * 2, 64), 4).reshape(n, 8, 32)
        hi = _fields(qh.reshape(n * 2, 32), 2).reshape(n, 8, 32)
        q = ((lo | (hi << 4)).astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
        return (dl * q).reshape(-1)
    raise ValueError(f"cannot dequantize {kind}")


def config_from_gguf(meta: dict, name: str) -> dict:
    """GGUF metadata -> the keyword arguments of model.Config (the caller builds the Config)."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2", "gpt2", "gemma3"):
        raise UserError(f"{name}: GGUF architecture {arch!r} is not supported (llama, qwen2, gpt2, gemma3)")
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)

    def need(k):  # a size the model cannot be built without: a missing or broken one is named
        v = g(k)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise UserError(f"{name}: GGUF metadata {arch}.{k} is {'missing' if v is None else repr(v)}, "
                            "expected a positive integer")
        return int(v)
    n_head = need("attention.head_count")
    vocab = len(meta.get("tokenizer.ggml.tokens", [])) or need("vocab_size")
    cfg = dict(arch=arch if arch in ("gpt2", "gemma3") else "llama", vocab_size=vocab, n_layer=need("block_count"),
                  n_head=n_head, n_kv_head=int(g("attention.head_count_kv", n_head)), n_embd=need("embedding_length"),
                  n_ffn=need("feed_forward_length"), max_seq_len=need("context_length"),
                  norm_eps=float(g("attention.layer_norm_rms_epsilon", g("attention.layer_norm_epsilon", 1e-5))),
                  rope_theta=float(g("rope.freq_base", 10000.0)), qkv_bias=arch == "qwen2", tie_embeddings=True,
                  name=name)
    if arch == "gemma3":
        cfg.update(_gemma3_from_gguf(g, cfg["n_layer"], name))
    return cfg


def _gemma3_from_gguf(g, n_layer: int, name: str) -> dict:
    """Gemma 3's extra keys. Files made by llama.cpp's converter (like the 270M one) state only the window; the
    local/global pattern, the local RoPE base and the query scale are then left to model.GEMMA3_RULE."""
    if g("attn_logit_softcapping") or g("final_logit_softcapping"):
        raise UserError(f"{name}: logit soft-capping is not supported (Gemma 3 has none)")
    pattern, local = g("attention.sliding_window_pattern"), None  # every N-th layer global, or a bool per layer
    if isinstance(pattern, list):
        local = [i for i, sliding in enumerate(pattern) if sliding]
    elif pattern:
        local = [i for i in range(n_layer) if (i + 1) % int(pattern)]
    head_dim, base, scale = g("attention.key_length"), g("rope.freq_base_swa"), g("attention.scale")
    return dict(head_dim=int(head_dim) if head_dim else None, sliding_window=int(g("attention.sliding_window", 0)),
                local_layers=local, rope_local_theta=None if base is None else float(base),
                attn_scale=None if scale is None else float(scale))


# ----------------------------------------------------------------------------- key map: GGUF names -> ours

def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp stores q/k rows permuted for adjacent-pair RoPE; put them back in HF's half-split order."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def map_gguf(sd: dict, cfg, meta: dict) -> tuple[dict, list]:
    arch, used = meta["general.architecture"], set()
    get = lambda k: (used.add(k), sd.get(k))[1]
    out = {"tok_emb.weight": get("token_embd.weight"), "norm.weight": get("output_norm.weight")}
    if "output.weight" in sd:  # untied head
        cfg.tie_embeddings = False
        out["lm_head.weight"] = get("output.weight")
    if arch == "gpt2":
        out["pos_emb.weight"], out["norm.bias"] = get("position_embd.weight"), get("output_norm.bias")
    for i in range(cfg.n_layer):
        b, p = f"blk.{i}.", f"layers.{i}."
        out[p + "attn_norm.weight"] = get(b + "attn_norm.weight")
        out[p + "mlp_norm.weight"] = get(b + "ffn_norm.weight")
        out[p + "attn.wo.weight"] = get(b + "attn_output.weight")
        out[p + "mlp.up.weight"], out[p + "mlp.down.weight"] = get(b + "ffn_up.weight"), get(b + "ffn_down.weight")
        if arch == "gpt2":
            out[p + "attn.wqkv.weight"] = get(b + "attn_qkv.weight")
            out[p + "attn.wqkv.bias"] = get(b + "attn_qkv.bias")
            for x, y in (("attn_norm", "attn_norm"), ("ffn_norm", "mlp_norm"), ("attn_output", "attn.wo"),
                         ("ffn_up", "mlp.up"), ("ffn_down", "mlp.down")):
                out[p + y + ".bias"] = get(b + x + ".bias")
            continue
        out[p + "mlp.gate.weight"] = get(b + "ffn_gate.weight")
        if arch == "gemma3":  # norms are stored as the multiplier (1 + w), our convention (model.RMSNorm)
            for ours, theirs in (("attn.q_norm", "attn_q_norm"), ("attn.k_norm", "attn_k_norm"),
                                 ("post_attn_norm", "post_attention_norm"), ("post_mlp_norm", "post_ffw_norm")):
                out[p + ours + ".weight"] = get(b + theirs + ".weight")
        q, k, v = get(b + "attn_q.weight"), get(b + "attn_k.weight"), get(b + "attn_v.weight")
        if arch == "llama" and q is not None and k is not None:  # only llama-arch GGUFs are permuted
            q, k = unpermute_qk(q, cfg.n_head), unpermute_qk(k, cfg.n_kv_head)
        out[p + "attn.wqkv.weight"] = cat_rows([q, k, v], b + "attn_{q,k,v}.weight")
        if cfg.qkv_bias:
            out[p + "attn.wqkv.bias"] = cat_rows([get(b + f"attn_{x}.bias") for x in "qkv"], b + "attn_{q,k,v}.bias")
    return out, sorted(set(sd) - used)
