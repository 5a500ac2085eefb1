"""checkpoints.py — the file formats real weights come in, and the key maps from their names to ours.

Used by model.load_model (reading) and purify.export_hf (writing an expert back in HF layout).

    safetensors   8-byte header length, JSON header, one raw buffer (read by mapping the file; written atomically)
    .bin          PyTorch's zip/pickle, read with weights_only=True (no code runs)
    GGUF          llama.cpp's format: metadata key/values, tensor table, quantized blocks (dequantised here)
    hub           an HF repo id, fetched with plain urllib into ~/.cache/free-moe

Every key map returns ({our name: tensor}, [dropped checkpoint names]) so the loader can say what it ignored.
Shape legend: C width, F FFN neurons, V vocab; GGUF dims are listed ne0 first (the contiguous axis).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
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


def read_safetensors(path: Path, with_metadata: bool = False):
    """safetensors = 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
    then one raw buffer. We map the file (copy-on-write), so tensors already in the target dtype cost no copy."""
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
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage)  # (size,) bytes of the whole file
    out = {}
    for name, info in header.items():
        start, end = (8 + n + o for o in info["data_offsets"])
        if end > size:
            raise UserError(f"{path}: truncated: tensor {name} ends at byte {end}, file has {size}")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        dt = SAFETENSORS_DTYPES[info["dtype"]]
        chunk = raw[start:end]
        if start % dt.itemsize:
            chunk = chunk.clone()  # .view(dtype) needs an aligned start
        out[name] = chunk.view(dt).reshape(info["shape"])
    return (out, metadata) if with_metadata else out


def write_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write the same format atomically (temp file + rename), so a killed run never leaves half a file."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        blob = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # pad so the data starts 8-byte aligned
    write_atomic(path, b"".join([struct.pack("<Q", len(head)), head, *blobs]))


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
GGML_BLOCK = {"F32": (4, 1), "F16": (2, 1), "BF16": (2, 1), "Q8_0": (34, 32), "Q4_0": (18, 32), "Q4_1": (20, 32)}


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
        name = r.string()
        dims = [r.scalar("<Q") for _ in range(r.scalar("<I"))]  # ne0 first: the contiguous axis
        infos.append((name, dims, r.scalar("<I"), r.scalar("<Q")))
    align = int(meta.get("general.alignment", 32))
    data_start = (r.pos + align - 1) // align * align
    tensors = {}
    for name, dims, ttype, offset in infos:
        kind = GGML_TYPES.get(ttype, f"type {ttype}")
        if kind not in GGML_BLOCK:
            raise UserError(f"{path}: tensor {name} uses quantization {kind}, which is not supported "
                            f"(supported: {', '.join(GGML_BLOCK)})")
        n = int(np.prod(dims))
        block_bytes, block_size = GGML_BLOCK[kind]
        start = data_start + offset
        end = start + n // block_size * block_bytes
        if end > len(buf):
            raise UserError(f"{path}: truncated GGUF file: tensor {name} ends at byte {end}, file has {len(buf)}")
        raw = np.frombuffer(buf, dtype=np.uint8, count=end - start, offset=start)
        w = dequantize(raw, kind)
        tensors[name] = torch.from_numpy(w.reshape(list(reversed(dims))))  # [ne0, ne1] -> (ne1, ne0) = (out, in)
    return meta, tensors


def dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
    """Bytes -> float32 weights, vectorised over all blocks at once. Block layouts (32 weights each):
    Q8_0: fp16 scale d, 32 x int8 q            -> w = d * q
    Q4_0: fp16 scale d, 16 bytes of nibbles    -> w = d * (code - 8)
    Q4_1: fp16 scale d, fp16 min m, 16 bytes   -> w = d * code + m
    In the 4-bit types byte j holds weight j in its low nibble and weight j+16 in its high nibble."""
    if kind == "F32":
        return raw.view(np.float32).copy()
    if kind == "F16":
        return raw.view(np.float16).astype(np.float32)
    if kind == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    block_bytes = GGML_BLOCK[kind][0]
    blocks = raw.reshape(-1, block_bytes)  # (n_blocks, bytes)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    if kind == "Q8_0":
        return (d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(-1)
    qs = blocks[:, -16:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
    if kind == "Q4_0":
        return (d * (codes - 8.0)).reshape(-1)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return (d * codes + m).reshape(-1)


def config_from_gguf(meta: dict, name: str) -> dict:
    """GGUF metadata -> the keyword arguments of model.Config (the caller builds the Config)."""
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2", "gpt2"):
        raise UserError(f"{name}: GGUF architecture {arch!r} is not supported (llama, qwen2, gpt2)")
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)
    n_head = int(g("attention.head_count"))
    vocab = len(meta.get("tokenizer.ggml.tokens", [])) or int(g("vocab_size"))
    return dict(arch="gpt2" if arch == "gpt2" else "llama", vocab_size=vocab, n_layer=int(g("block_count")),
                  n_head=n_head, n_kv_head=int(g("attention.head_count_kv", n_head)), n_embd=int(g("embedding_length")),
                  n_ffn=int(g("feed_forward_length")), max_seq_len=int(g("context_length")),
                  norm_eps=float(g("attention.layer_norm_rms_epsilon", g("attention.layer_norm_epsilon", 1e-5))),
                  rope_theta=float(g("rope.freq_base", 10000.0)), qkv_bias=arch == "qwen2", tie_embeddings=True,
                  name=name)


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
        out[p + "attn_norm.weight"], out[p + "mlp_norm.weight"] = get(b + "attn_norm.weight"), get(b + "ffn_norm.weight")
        out[p + "attn.wo.weight"] = get(b + "attn_output.weight")
        out[p + "mlp.up.weight"], out[p + "mlp.down.weight"] = get(b + "ffn_up.weight"), get(b + "ffn_down.weight")
        if arch == "gpt2":
            out[p + "attn.wqkv.weight"], out[p + "attn.wqkv.bias"] = get(b + "attn_qkv.weight"), get(b + "attn_qkv.bias")
            for x, y in (("attn_norm", "attn_norm"), ("ffn_norm", "mlp_norm"), ("attn_output", "attn.wo"),
                         ("ffn_up", "mlp.up"), ("ffn_down", "mlp.down")):
                out[p + y + ".bias"] = get(b + x + ".bias")
            continue
        out[p + "mlp.gate.weight"] = get(b + "ffn_gate.weight")
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
               (HF GPT-2 Linear weights are Conv1D: stored transposed, (in, out))."""
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

HF_FILES = ["config.json", "tokenizer.json", "model.safetensors.index.json", "model.safetensors"]


def hub_download(repo_id: str) -> Path:
    """Fetch an HF hub model into ~/.cache/free-moe with plain urllib (config, tokenizer, safetensors)."""
    cache = Path(os.environ.get("FREE_MOE_CACHE", Path.home() / ".cache" / "free-moe")) / repo_id.replace("/", "--")
    cache.mkdir(parents=True, exist_ok=True)

    def fetch(fname, required=True):
        dest = cache / fname
        if dest.exists():
            return dest
        url = f"https://huggingface.co/{repo_id}/resolve/main/{fname}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp, open(str(dest) + ".part", "wb") as f:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
        except urllib.error.HTTPError as e:
            if not required and e.code == 404:
                return None
            raise UserError(f"cannot download {url}: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            if not required:  # offline: an optional file that is not cached is simply absent (cached models load)
                return None
            raise UserError(f"cannot download {repo_id!r} (offline?): pass a local path with --model ({e})") from None
        os.replace(str(dest) + ".part", dest)
        return dest

    fetch("config.json")
    for optional in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # eos id, chat template
        fetch(optional, required=False)
    index = fetch("model.safetensors.index.json", required=False)
    if index:
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            fetch(shard)
    else:
        fetch("model.safetensors")
    return cache


def read_hf_state_dict(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.exists():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            if not (path / shard).exists():
                raise UserError(f"{path}: shard {shard} listed in the index is missing")
            sd.update(read_safetensors(path / shard))
        return sd
    if (path / "model.safetensors").exists():
        return read_safetensors(path / "model.safetensors")
    if (path / "pytorch_model.bin").exists():
        return read_torch_bin(path / "pytorch_model.bin")
    raise UserError(f"{path}: no model.safetensors, index or pytorch_model.bin found")


