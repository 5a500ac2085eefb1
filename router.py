"""router.py — the multi-level Free-MoE router and `FreeMoE`, the routed model used for scoring and generation.

Pipeline position: loaded by evaluate.py / bench.py; trained by train_router.py
    model.py  ->  purify.py (DOWP, DSS-Experts)  ->  train_router.py / router.py  ->  evaluate.py

What goes in:  a dense `model.Transformer`, the DSS-Experts of purify.py (`Experts`: .domains, .indices[domain][layer]),
               and a router checkpoint written by train_router.py (the only trained parameters; the LLM is frozen).
What comes out: per-prompt routing decisions, the per-layer FFN modules to run (`mlps_for`, passed as
model(..., mlps=)),
               the active FFN fraction of each request, and routed generation / scoring.

    python router.py --experts experts/experts.safetensors --router runs/router/router.safetensors \
        --prompt "def fibonacci(n):" --max-new-tokens 32

The router has two levels (a third, token-level one is left out; see README / report for the measurement note):

  Level 1, domain (per sequence). A truncated forward runs only the first `route_layer` blocks (default L//4) on the
      prompt; each token's residual vector is RMS-normalised (so the attention-sink token with a huge norm does not
      dominate), then mean-pooled over the real tokens and standardised with the training set's per-dimension mean/std.
      A small head (linear, or one hidden layer with GELU) gives domain probabilities. If the top probability is below
      `threshold`, the request falls back: fallback="dense" runs the dense model, fallback="top2" runs the union of the
      two most likely experts' neurons.
  Level 2, layer. Per (domain, layer) a learned logit says whether that layer runs the purified subnetwork (logit > 0)
      or the full FFN, so that layers where purification hurts stay dense. The global `budget` knob (target fraction of
      active FFN neurons) overrides the sign rule: layers are switched to the expert in decreasing logit order until
      the active fraction is at or below the budget. For the top-2 union a layer uses the union only if both domains'
      gates would (the smaller of the two logits), because either expert alone was judged unsafe otherwise.

Generation routes once on the prompt, inside the prefill (the first `route_layer` blocks that level 1 reads are the
prefill's own first blocks, so routing adds only the router head), then prefills the remaining layers and decodes with
the materialized compact FFNs (`MLP.select`: real smaller matmuls). Compact FFNs are cached per (expert set, layer),
so every gate pattern of an expert reuses them.
No re-routing during decoding: the decision is fixed per request.

Shape legend: B batch, T time, C width, L layers, F FFN neurons, D domains, k kept neurons, N prompts, H head width.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

import checkpoints as ckpt
import generate as G
import model as M
from experts import experts_identity, load_experts
from scoring import window_nll
from cli import (ArgumentParser, UserError, add_common_args, fraction, positive_int, probability, progress, run_cli,
                 token_sparsity)

ROUTER_FORMAT = "free-moe-router/1"


# ----------------------------------------------------------------------------- config

@dataclass
class RouterConfig:
    domains: list[str]                 # D expert names, in the order of the head's outputs
    n_layer: int                       # L layers of the model the router was built for
    n_embd: int                        # C residual width (input of the domain head)
    route_layer: int                   # level 1 reads the residual stream entering this layer (0 = embeddings)
    hidden: int = 128                  # H width of the domain head's hidden layer; 0 = a linear head
    threshold: float = 0.5             # below this top-1 probability the request falls back
    fallback: str = "dense"            # "dense" (run the dense FFNs) or "top2" (union of the two best experts)
    max_route_tokens: int = 512        # routing reads at most the last this-many prompt tokens (bounded cost)
    level3: bool = False               # level 3 thresholds calibrated (train_router.py does it)

    def __post_init__(self):
        if self.fallback not in ("dense", "top2"):
            raise UserError(f"fallback must be 'dense' or 'top2', got {self.fallback!r}")
        if not 0 <= self.route_layer <= self.n_layer:
            raise UserError(f"route_layer must be in [0, {self.n_layer}], got {self.route_layer}")
        if not 0.0 <= self.threshold <= 1.0:
            raise UserError(f"threshold must be in [0, 1], got {self.threshold}")


def default_route_layer(n_layer: int) -> int:
    return max(1, n_layer // 4)


# ----------------------------------------------------------------------------- level 1 features

def prefix_hidden(model: M.Transformer, idx, valid, n_layers: int):
    """A truncated forward: the residual stream entering layer `n_layers` (B, T, C), without running the rest.

    Same positions, mask and RoPE as `Transformer.forward` (no KV cache), so it equals
    `model(idx, valid=valid, return_hidden=True)[1][n_layers]` exactly — tests check it."""
    x, rope, mask = model.embed(idx, 0, valid)  # (B, T, C), RoPE, (B, 1, T, T) or None
    return model.run_layers(x, rope, mask, stop=n_layers)  # (B, T, C)


def pooled(hidden, valid):
    """Level 1 input: RMS-normalise each token (B, T, C), then mean over the real tokens -> (B, C) float32."""
    h = hidden.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)  # (B, T, C)
    w = valid.float()[..., None] if valid is not None else torch.ones_like(h[..., :1])  # (B, T, 1)
    return (h * w).sum(1) / w.sum(1).clamp(min=1)  # (B, C)


@torch.no_grad()
def prompt_features(model: M.Transformer, prompts: list[list[int]], route_layer: int, max_tokens: int = 512,
                    batch_tokens: int = 4096, show: bool = False):
    """Pooled early-layer features of each prompt (N, C). Prompts are batched by length (little padding)."""
    device = model.tok_emb.weight.device
    if any(len(p) == 0 for p in prompts):
        raise UserError("cannot route an empty prompt")
    prompts = [list(p)[-max_tokens:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = torch.empty(len(prompts), model.config.n_embd)  # (N, C)
    batches, cur = [], []
    for i in order:  # greedy: grow a batch while (rows x longest) stays within the token budget
        if cur and (len(cur) + 1) * len(prompts[i]) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    it = batches
    if show:
        it = progress(batches, desc="route features", leave=False)
    for rows in it:
        T = max(len(prompts[i]) for i in rows)
        # built on the host, then one copy each to the model's device
        idx = torch.tensor([[0] * (T - len(prompts[i])) + prompts[i] for i in rows]).to(device)  # (B, T) left padded
        valid = torch.tensor([[False] * (T - len(prompts[i])) + [True] * len(prompts[i]) for i in rows])  # (B, T)
        padded = not valid.all()
        valid = valid.to(device)
        h = prefix_hidden(model, idx, valid if padded else None, route_layer)  # (B, T, C)
        out[rows] = pooled(h, valid).cpu()
    return out


# ----------------------------------------------------------------------------- the router (the only trained params)

class Router(nn.Module):
    """Level 1 domain head + level 2 per-(domain, layer) gate logits. Everything else is the frozen LLM."""

    def __init__(self, cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        C, D, H = cfg.n_embd, len(cfg.domains), cfg.hidden
        # Feature standardisation, set from the training features (buffers: saved, not trained).
        self.register_buffer("feat_mean", torch.zeros(C))
        self.register_buffer("feat_std", torch.ones(C))
        self.head = nn.Linear(C, D) if H == 0 else nn.Sequential(nn.Linear(C, H), nn.GELU(), nn.Linear(H, D))
        # Level 2: logit > 0 = run the purified expert in that layer. Init 0: undecided (p = 0.5).
        self.gate_logits = nn.Parameter(torch.zeros(D, cfg.n_layer))  # (D, L)
        # Level 3: |gate activation| thresholds per (domain, layer, target sparsity); row D is the dense model on
        # every domain's text, for decisions without an expert. Calibrated, not trained (a buffer).
        self.register_buffer("level3", torch.zeros(D + 1, cfg.n_layer, LEVEL3_STEPS))  # (D + 1, L, S)

    def domain_logits(self, feats):
        feats = feats.to(self.feat_mean.device)  # features may come from a cache on the host
        return self.head((feats - self.feat_mean) / self.feat_std)  # (N, C) -> (N, D)

    def domain_probs(self, feats):
        return self.domain_logits(feats).softmax(-1)  # (N, D)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------- decisions and the routed model

@dataclass(frozen=True)
class Decision:
    """What the router chose for one request."""
    domains: tuple[str, ...]           # () = dense model; one expert; or two (top-2 union fallback)
    use_expert: tuple[bool, ...]       # per layer: True = purified subnetwork, False = full FFN
    probs: tuple[float, ...]           # level 1 probabilities, in the router's domain order
    active_fraction: float             # FFN neurons used per token / all FFN neurons
    fell_back: bool = False            # top-1 probability was below the threshold

    @property
    def domain(self) -> str | None:
        return self.domains[0] if len(self.domains) == 1 else None

    @property
    def key(self):
        return (self.domains, self.use_expert)


class FreeMoE:
    """The routed model: `route` prompts, then run `mlps_for(decision)` through the unchanged dense model."""

    def __init__(self, model: M.Transformer, experts, router: Router, budget: float | None = None,
                 threshold: float | None = None, fallback: str | None = None, token_sparsity: float = 0.0):
        cfg = router.cfg
        if list(experts.domains) != list(cfg.domains):
            raise UserError(f"router domains {cfg.domains} differ from the experts' domains {list(experts.domains)}")
        if cfg.n_layer != model.config.n_layer or cfg.n_embd != model.config.n_embd:
            raise UserError(f"router built for L={cfg.n_layer}, C={cfg.n_embd}; model has "
                              f"L={model.config.n_layer}, C={model.config.n_embd}")
        if budget is not None and not 0.0 <= budget <= 1.0:
            raise UserError(f"budget must be in [0, 1], got {budget}")
        self.model, self.experts, self.router = model, experts, router.to(model.tok_emb.weight.device).eval()
        self.budget = budget
        if not 0.0 <= token_sparsity < 1.0:
            raise UserError(f"token sparsity must be in [0, 1), got {token_sparsity}")
        if token_sparsity > 0 and not cfg.level3:
            raise UserError("this router has no level 3 thresholds: train it again with train_router.py")
        self.token_sparsity = token_sparsity
        self.last_level3: list = []  # the level 3 FFNs mlps_for made last (their counters: what they ran)
        self.threshold = cfg.threshold if threshold is None else threshold
        self.fallback = cfg.fallback if fallback is None else fallback
        if self.fallback not in ("dense", "top2"):
            raise UserError(f"fallback must be 'dense' or 'top2', got {self.fallback!r}")
        self._layer_cache: dict = {}   # (domains, layer) -> compact MLP
        self._sizes: dict = {}         # domains -> per-layer kept-neuron counts
        self.checksum = ""             # the router file's content sha256 (set by load_router; evaluate's headers)

    # --- level 1 + level 2 -> a decision
    @torch.no_grad()
    def route(self, prompts: list[list[int]], show: bool = False) -> list[Decision]:
        cfg = self.router.cfg
        feats = prompt_features(self.model, prompts, cfg.route_layer, cfg.max_route_tokens, show=show)
        probs = self.router.domain_probs(feats.to(self.router.feat_mean.device)).cpu()  # (N, D)
        return [self.decide(p) for p in probs]

    def decide(self, probs) -> Decision:
        """Level 1 probabilities (D,) -> Decision (threshold fallback, then the level 2 gate pattern)."""
        probs = torch.as_tensor(probs, dtype=torch.float32)
        top = probs.argsort(descending=True).tolist()
        names = self.router.cfg.domains
        fell_back = float(probs[top[0]]) < self.threshold
        if not fell_back:
            domains = (names[top[0]],)
        elif self.fallback == "top2" and len(top) >= 2:
            domains = tuple(sorted((names[top[0]], names[top[1]])))
        else:
            domains = ()
        return self.decision_for(domains, probs.tolist(), fell_back)

    def decision_for(self, domains: tuple[str, ...], probs=(), fell_back: bool = False,
                     use_expert: tuple[bool, ...] | None = None) -> Decision:
        """Build a decision for given expert(s) (the true domain in training and the comparison, tests); the gate
        pattern comes from level 2 unless `use_expert` forces one."""
        L = self.model.config.n_layer
        for d in domains:
            if d not in self.router.cfg.domains:
                raise UserError(f"unknown domain {d!r} (router has {', '.join(self.router.cfg.domains)})")
        if not domains:
            use_expert = (False,) * L
        elif use_expert is None:
            use_expert = self.gate_pattern(domains)
        if len(use_expert) != L:
            raise ValueError(f"use_expert must have {L} entries, got {len(use_expert)}")
        use_expert = tuple(bool(u) for u in use_expert)
        return Decision(tuple(domains), use_expert, tuple(float(p) for p in probs),
                        self.active_fraction(domains, use_expert), fell_back)

    def gate_pattern(self, domains: tuple[str, ...]) -> tuple[bool, ...]:
        """Level 2: which layers run the purified expert, a tuple of L bools.

        The logit of a layer for a set of domains is the smallest of their gate logits (a union needs every gate
        open). Without a budget: open where that logit > 0. With self.budget set: start with every layer dense and
        open layers in order of falling logit (the safest first, whatever its sign), stopping as soon as
        self.active_fraction(domains, use) <= budget (possibly with none open, or with all open)."""
        rows = [self.router.cfg.domains.index(d) for d in domains]
        logits = self.router.gate_logits.detach()[rows].min(0).values.cpu()  # (L,) a union needs both gates open
        if self.budget is None:
            return tuple(bool(v > 0) for v in logits)
        use = [False] * len(logits)
        for layer in logits.argsort(descending=True).tolist():  # safest layers to purify first
            if self.active_fraction(domains, use) <= self.budget:
                break
            use[layer] = True
        return tuple(use)

    # --- compute accounting
    def kept_per_layer(self, domains: tuple[str, ...]) -> list[int]:
        """Per-layer number of neurons the expert (set) keeps; F for a layer the experts leave dense."""
        if domains not in self._sizes:
            Fn = self.model.config.n_ffn
            self._sizes[domains] = [Fn if idx is None else len(idx) for idx in self._union_indices(domains)]
        return self._sizes[domains]

    def active_fraction(self, domains, use_expert) -> float:
        """FFN neurons a token runs through under (domains, per-layer gates), over all FFN neurons."""
        Fn, L = self.model.config.n_ffn, self.model.config.n_layer
        if not domains:
            return 1.0
        kept = self.kept_per_layer(tuple(domains))
        return sum(k if u else Fn for k, u in zip(kept, use_expert)) / (L * Fn)

    # --- materialized experts
    def _union_indices(self, domains: tuple[str, ...]) -> list:
        """Per layer: the kept neurons of one expert, or the sorted union over several (None = layer left dense)."""
        per = [self.experts.indices[d] for d in domains]
        out = []
        for layer in range(self.model.config.n_layer):
            sets = [p[layer] for p in per]
            if any(s is None for s in sets):
                out.append(None)
            elif len(sets) == 1:
                out.append(torch.as_tensor(sets[0], dtype=torch.long))
            else:
                out.append(torch.unique(torch.cat([torch.as_tensor(s, dtype=torch.long) for s in sets])))  # sorted
        return out

    def expert_mlp(self, domains: tuple[str, ...], layer: int):
        """The compact FFN of `domains` in `layer` (cached): a real smaller MLP built with MLP.select."""
        key = (tuple(domains), layer)
        if key not in self._layer_cache:
            idx = self._union_indices(tuple(domains))[layer]
            dense = self.model.layers[layer].mlp
            self._layer_cache[key] = dense if idx is None else dense.select(idx)
        return self._layer_cache[key]

    def mlps_for(self, decision: Decision) -> list:
        """Per-layer FFN modules for `model(..., mlps=...)`: compact expert where the gate says so, else dense;
        with token_sparsity > 0 each wrapped in level 3 (a SkippingMLP with the decision's thresholds)."""
        mlps = self.static_mlps(decision)
        if self.token_sparsity == 0:
            return mlps
        thresholds = self.level3_for(decision.domains)
        self.last_level3 = [SkippingMLP(m, t) for m, t in zip(mlps, thresholds.tolist())]  # read by the CLI
        return self.last_level3

    def static_mlps(self, decision: Decision) -> list:
        """Levels 1 and 2 only: the compact expert where the gate says so, else the dense FFN."""
        return [self.expert_mlp(decision.domains, i) if u else blk.mlp
                for i, (blk, u) in enumerate(zip(self.model.layers, decision.use_expert))]

    def level3_for(self, domains: tuple[str, ...]) -> torch.Tensor:
        """Level 3 thresholds (L,) at self.token_sparsity (rounded to a step of 1 / LEVEL3_STEPS): the expert's row
        for one domain, the dense row for no expert or a union of two."""
        names = self.router.cfg.domains
        row = names.index(domains[0]) if len(domains) == 1 else len(names)
        step = min(LEVEL3_STEPS - 1, round(self.token_sparsity * LEVEL3_STEPS))
        return self.router.level3[row, :, step].detach().cpu()  # (L,)

    # --- convenience: generation and scoring
    def generate(self, prompts: list[list[int]], max_new_tokens: int, **kw) -> tuple[list[list[int]], list[Decision]]:
        """Route each prompt, then prefill and decode with the compact FFNs of its decision.
        Returns (new tokens per prompt, decisions).

        Routing rides on the prefill (`_routed_prefill`): level 1 needs the residual stream after the first
        `route_layer` blocks, which the prefill computes anyway, so routing costs only the router head. When the
        prompts of one batch get different decisions, each group is generated on its own (a batch runs one set of
        FFNs)."""
        if max(len(p) for p in prompts) > self.router.cfg.max_route_tokens:
            return self._generate_grouped(prompts, self.route(prompts), max_new_tokens, **kw)  # route() truncates
        decided: list = []
        try:
            out = G.generate(self.model, prompts, max_new_tokens, prefill=lambda idx, valid:
                             self._routed_prefill(idx, valid, decided), **kw)
        except _SplitBatch:
            return self._generate_grouped(prompts, decided, max_new_tokens, **kw)
        return out, decided

    def _routed_prefill(self, idx, valid, decided: list):
        """Prefill with routing inside it, for generate.generate's `prefill` hook (the KV cache is set up).

        Layers below `route_layer` run dense (that is what level 1 reads); they are kept as they are unless the
        decision's gates purify one of them, in which case the prefill is redone from that layer on, or level 3 is
        on (it changes every layer's FFN), in which case it is redone whole."""
        model, r = self.model, self.router.cfg.route_layer
        x, rope, mask = model.embed(idx, 0, valid)  # (B, T, C)
        hiddens = [x]
        for i in range(r):  # dense, writing the KV cache of layers < r
            x = model.run_layers(x, rope, mask, i, i + 1)
            hiddens.append(x)
        feats = pooled(x, valid[:, :idx.shape[1]] if valid is not None else None)  # (B, C)
        probs = self.router.domain_probs(feats.to(self.router.feat_mean.device)).cpu()  # (B, D)
        decided.extend(self.decide(p) for p in probs)
        if len({d.key for d in decided}) > 1:
            raise _SplitBatch
        mlps = self.mlps_for(decided[0])
        first = next((i for i in range(r) if decided[0].use_expert[i]), r)  # first layer the prefix got wrong
        if self.token_sparsity:
            first = 0  # level 3 changes every layer's FFN, the dense ones too: the whole prefill runs again
        x = model.run_layers(hiddens[first], rope, mask, start=first, mlps=mlps)
        return model.head(x[:, -1:]), mlps  # (B, 1, V)

    def _generate_grouped(self, prompts, decisions, max_new_tokens, **kw):
        """Generate each group of prompts that share a decision in one batch (routing already done)."""
        out: list = [None] * len(prompts)
        groups: dict = {}
        for i, d in enumerate(decisions):
            groups.setdefault(d.key, []).append(i)
        for rows in groups.values():
            mlps = self.mlps_for(decisions[rows[0]])
            new = G.generate(self.model, [prompts[i] for i in rows], max_new_tokens, mlps=mlps, **kw)
            for i, r in zip(rows, new):
                out[i] = r
        return out, decisions

    def score(self, windows, batch_size: int = 8) -> tuple[torch.Tensor, list[Decision]]:
        """Mean next-token NLL of each window (N,), each window routed on itself (its tokens are its prompt);
        the windows of one decision are scored together (scoring.window_nll)."""
        windows = torch.as_tensor(windows, dtype=torch.long)  # (N, T)
        decisions = self.route(windows.tolist())
        nll = torch.empty(len(windows), dtype=torch.float64)
        groups: dict = {}
        for i, d in enumerate(decisions):
            groups.setdefault(d.key, []).append(i)
        for rows in groups.values():
            nll[rows] = window_nll(self.model, windows[rows], self.mlps_for(decisions[rows[0]]), batch_size)
        return nll / (windows.shape[1] - 1), decisions


class _SplitBatch(Exception):
    """Raised inside the routed prefill when one batch's prompts were routed differently."""


# ----------------------------------------------------------------------------- level 3: skip quiet neurons per token
#
# Per token and layer, the FFN that runs (dense or an expert's) computes its gate activations g = act(gate x) first
# and skips every neuron with |g_j| below the layer's threshold: its up row and down column are never read, its
# activation is 0. Training-free: the thresholds are quantiles of |g| on calibration text (`level3_thresholds`),
# one per (domain, layer) and target: skipping a fraction s of the neurons means the s-quantile. The router file
# keeps them for s = 0, 0.01, ..., 0.99; `--token-sparsity s` picks one (FreeMoE(token_sparsity=s)).

LEVEL3_STEPS = 100  # thresholds stored per (domain, layer) for s = i / LEVEL3_STEPS, i = 0 .. 99
GATHER_ROWS = 1  # inputs of at most this many tokens (a batch-1 decode step) take the gathered path, which reads
# less; a gathered token costs about what a dense one does at half the neurons skipped (bench.py --sections
# level3), so two or more tokens are faster as one masked matmul


def measured_active_fraction(mlps: list, n_ffn: int) -> float:
    """What level 3 ran, over everything since the SkippingMLPs were made: FFN neurons read per token over all
    of the model's (L x n_ffn)."""
    tokens = sum(m.tokens for m in mlps)  # (a layer may have run fewer tokens than another)
    return float(sum(m.reads for m in mlps)) / (tokens * n_ffn) if tokens else float("nan")


class SkippingMLP(nn.Module):
    """Level 3 around one FFN: neurons with |gate_acts| < threshold are skipped, token by token.

    A decode step (B*T <= GATHER_ROWS, no autograd, not inside a CUDA graph capture) runs `MLP.active_forward`
    per token and reads only the active neurons' weights; a prefill or a scored batch computes the same values
    masked (every byte is read once anyway, and one big matmul beats many small ones). `reads` / `tokens` counts
    the neurons that ran per token: the measured active FFN."""

    def __init__(self, mlp: M.MLP, threshold: float):
        super().__init__()
        self.mlp, self.threshold = mlp, float(threshold)
        self.reads, self.tokens = 0, 0

    def forward(self, x):
        B, T, C = x.shape
        if B * T <= GATHER_ROWS and not torch.is_grad_enabled() and not (
                x.is_cuda and torch.cuda.is_current_stream_capturing()):
            rows = [self.one_token(xi) for xi in x.reshape(B * T, C)]
            return (rows[0] if len(rows) == 1 else torch.stack(rows)).view(B, T, C)
        g = self.mlp.gate_acts(x)  # (B, T, k) k = neurons of this FFN
        keep = g.abs() >= self.threshold  # (B, T, k)
        self.reads = self.reads + keep.sum()  # a tensor: counting never waits for the device
        self.tokens += B * T
        return self.mlp.masked(x, g, keep)

    def one_token(self, x):
        """x (C,) -> (C,): the gathered path, on 1-D tensors throughout and nothing else: every op costs a few
        microseconds of dispatch, against ~0.8 ms for a layer's FFN (SmolLM2, one CPU thread), and the gain to
        protect is small (bench.py --sections level3)."""
        g = self.mlp.gate_acts(x)  # (k,)
        active = (g.abs() >= self.threshold).nonzero().flatten()  # (a,) the neurons that run
        self.reads = self.reads + active.numel()  # nonzero has its size already: an int, no wait
        self.tokens += 1
        return self.mlp.active_forward(x, g, active)


@torch.no_grad()
def level3_thresholds(model: M.Transformer, windows: torch.Tensor, mlps=None, samples: int = 1 << 20):
    """Thresholds (L, LEVEL3_STEPS) of |gate_acts| on `windows` (N, T) run through `mlps` (None = dense): row l,
    column i is the (i / LEVEL3_STEPS)-quantile of |g| over layer l's tokens and neurons, so skipping below it
    skips that fraction there. Quantiles of at most `samples` values per layer, drawn evenly (seeded)."""
    seen: list[list[torch.Tensor]] = [[] for _ in model.layers]

    class Record(nn.Module):  # the FFN as it is, keeping |g| of every token
        def __init__(self, mlp, l):
            super().__init__()
            self.mlp, self.l = mlp, l

        def forward(self, x):
            seen[self.l].append(self.mlp.gate_acts(x).abs().flatten().float().cpu())
            return self.mlp(x)

    run = [Record(m if m is not None else blk.mlp, l)
           for l, (blk, m) in enumerate(zip(model.layers, mlps or [None] * len(model.layers)))]
    device = model.tok_emb.weight.device
    for i in range(0, len(windows), 8):
        model(windows[i:i + 8].to(device), mlps=run, last_only=True)
    g = torch.Generator().manual_seed(0)
    levels = torch.arange(LEVEL3_STEPS, dtype=torch.float64) / LEVEL3_STEPS  # (S,)
    out = []
    for values in seen:
        v = torch.cat(values)
        if len(v) > samples:
            v = v[torch.randperm(len(v), generator=g)[:samples]]
        v = v.double().sort().values
        out.append(v[(levels * (len(v) - 1)).round().long()])  # (S,) nearest-rank quantiles
    out = torch.stack(out).float()  # (L, S)
    out[:, 0] = 0.0  # s = 0 skips nothing, also on text whose |g| goes below the calibration's least
    return out


def calibrate_level3(moe: FreeMoE, windows: dict[str, torch.Tensor]):
    """Fill the router's level 3 thresholds: domain d's row from its windows (N, T) run the way Free-MoE runs d
    (its expert where level 2 opens it), the dense row from every domain's windows through the dense model.
    Call it after level 2: the thresholds belong to the gates they were measured under."""
    r = moe.router
    with torch.no_grad():
        for i, d in enumerate(r.cfg.domains):
            r.level3[i] = level3_thresholds(moe.model, windows[d], moe.static_mlps(moe.decision_for((d,))))
        r.level3[len(r.cfg.domains)] = level3_thresholds(moe.model, torch.cat(list(windows.values())))
    r.cfg.level3 = True


# ----------------------------------------------------------------------------- level 2 in training: the relaxed gate
#
# The level-2 gate in one place: FreeMoE.gate_pattern is its rule at inference (logit > 0, or the budget rule);
# in training (train_router.train_level2) the same logits pass through `relaxed_gates` and each layer runs
# `MixedMLP`, and `expected_fraction` is the compute the gates cost. Changing the gate means changing these.

def relaxed_gates(logits, tau: float, relax: str, generator):
    """Relaxed Bernoulli gates (L,): sigmoid((logit + logistic noise) / tau); "st" = hard 0/1 forward with the
    sigmoid's gradient (straight-through), so training sees the model inference runs; "soft" = the relaxed value.
    The noise is drawn on the host and moved: the same draws on any device. Exactly: u = torch.rand(logits.shape,
    generator=generator) clamped to [1e-6, 1 - 1e-6]; noise = log u - log(1 - u); hard = 1 where soft > 0.5."""
    u = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(logits.device)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    if relax == "soft":
        return soft
    hard = (soft > 0.5).float()
    return hard + soft - soft.detach()


def expected_fraction(g, kept: torch.Tensor, n_ffn: int):
    """Active FFN fraction for gates g (L,), differentiable in g: layer l costs k_l neurons (kept (L,)) with the
    expert open (g_l = 1) and n_ffn without; a relaxed g_l in between costs g_l k_l + (1 - g_l) n_ffn. The sum
    over layers, divided by L * n_ffn."""
    return (g * kept + (1 - g) * n_ffn).sum() / (len(kept) * n_ffn)


class MixedMLP(nn.Module):
    """Level 2 relaxation used only in training: out = g * expert(x) + (1 - g) * dense(x).

    `g` is a 0-dim tensor set before each forward (a relaxed gate); with g = 0 the output is exactly dense(x)."""

    def __init__(self, expert: nn.Module, dense: nn.Module):
        super().__init__()
        self.expert, self.dense = expert, dense
        self.g = torch.tensor(0.0)

    def forward(self, x):
        """g * expert(x) + (1 - g) * dense(x), differentiable in g."""
        return self.g * self.expert(x) + (1 - self.g) * self.dense(x)


# ----------------------------------------------------------------------------- checkpoint

def save_router(path, router: Router, model: M.Transformer, experts, hparams: dict | None = None):
    """Write the router (safetensors + metadata). The metadata names the model and the experts it belongs to, and
    a content checksum covers the tensors and the metadata (a flipped bit must not reroute prompts silently)."""
    meta = {"format": ROUTER_FORMAT, "fingerprint": model.fingerprint, "experts_identity": experts_identity(experts),
            "config": json.dumps(asdict(router.cfg)), "hparams": json.dumps(hparams or {}),
            "n_params": str(router.num_params())}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_safetensors(Path(path), {k: v.detach().cpu() for k, v in router.state_dict().items()}, meta,
                           checksum=True)


def read_router(path) -> tuple[Router, dict]:
    """Read a router file without checking what it belongs to (load_router does the checks)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"router file {path} not found (run train_router.py first)")
    tensors, meta = ckpt.read_safetensors(path, with_metadata=True)
    if meta.get("format") != ROUTER_FORMAT:
        raise UserError(f"{path} is not a router file (format {meta.get('format')!r}, expected {ROUTER_FORMAT!r})")
    ckpt.verify_checksum(path, tensors, meta)
    try:
        router = Router(RouterConfig(**json.loads(meta["config"])))
        state = {"level3": router.level3, **tensors}  # a router file without level 3 (level3 = False) has none
        router.load_state_dict({k: v.clone() for k, v in state.items()})
    except (KeyError, TypeError, RuntimeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: corrupt router file ({type(e).__name__}: {str(e)[:160]})") from None
    return router, meta


def load_router(path, model: M.Transformer, experts, **kw) -> FreeMoE:
    """Load a router for (model, experts); a router trained for another model or other experts is refused.

    Keyword args (budget, threshold, fallback) override the trained defaults."""
    router, meta = read_router(path)
    if meta.get("fingerprint") != model.fingerprint:
        raise UserError(f"{path} was trained for model fingerprint {meta.get('fingerprint')}, but the loaded model "
                          f"is {model.fingerprint}: retrain it with train_router.py for this model")
    ident = experts_identity(experts)
    if meta.get("experts_identity") != ident:
        raise UserError(f"{path} was trained for experts {meta.get('experts_identity')}, but the given experts are "
                          f"{ident}: retrain it with train_router.py --experts for these experts")
    moe = FreeMoE(model, experts, router.to(model.tok_emb.weight.device), **kw)
    moe.checksum = meta.get(ckpt.CHECKSUM_KEY, "")
    return moe


# ----------------------------------------------------------------------------- CLI: route and generate one prompt

def main():
    p = ArgumentParser(description="Route a prompt with a trained Free-MoE router and generate with the "
                                   "chosen DSS-Expert.")
    add_common_args(p, out_default=None)
    p.add_argument("--experts", required=True, help="experts file from purify.py")
    p.add_argument("--router", required=True, help="router file from train_router.py")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--budget", type=fraction, default=None, help="target active FFN fraction (default: trained gates)")
    p.add_argument("--threshold", type=probability, default=None,
                   help="confidence threshold (default: the trained one)")
    p.add_argument("--fallback", choices=["dense", "top2"], default=None)
    p.add_argument("--token-sparsity", type=token_sparsity, default=0.0, metavar="S",
                   help="level 3: skip this fraction of FFN neurons per token (calibrated thresholds; 0 = off)")
    args = p.parse_args()
    model, tok = M.load_for_cli(args)
    experts = load_experts(args.experts, model)
    moe = load_router(args.router, model, experts, budget=args.budget, threshold=args.threshold,
                      fallback=args.fallback, token_sparsity=args.token_sparsity)
    ids = tok.encode(tok.chat_prompt(args.prompt) if args.chat else args.prompt)
    t0 = time.perf_counter()
    (out,), (dec,) = moe.generate([ids], args.max_new_tokens, tokenizer=tok, seed=args.seed)
    dt = time.perf_counter() - t0
    probs = ", ".join(f"{d}={p:.2f}" for d, p in zip(moe.router.cfg.domains, dec.probs))
    print(f"route: {'+'.join(dec.domains) or 'dense'} ({probs}); {sum(dec.use_expert)}/{len(dec.use_expert)} layers "
          f"purified; active FFN fraction {dec.active_fraction:.3f}", file=sys.stderr)
    if args.token_sparsity:
        ran = measured_active_fraction(moe.last_level3, model.config.n_ffn)
        print(f"level 3 (token sparsity {args.token_sparsity:g}): active FFN fraction {ran:.3f} per token, measured",
              file=sys.stderr)
    print(tok.decode(out))
    print(f"[{len(out)} tokens in {dt:.2f}s]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
