"""generate.py — text generation: sampling, the KV-cache decode loop, and static-shape decoding with CUDA graphs.

Pipeline position: used by every stage that writes text (router.FreeMoE.generate, evaluate.py's GSM8K / HumanEval /
MBPP tasks, bench.py); its command line generates from one prompt:

    python generate.py --prompt "The capital of France is" --max-new-tokens 20
    python generate.py --chat --prompt "What is the capital of France?"

What goes in:  a `model.Transformer` and prompts as token ids. What comes out: the new tokens of each prompt.
How a step runs (`generate(decode=...)`; all give the same tokens, tests check it):
    dynamic   the model's forward over the KV cache sliced to the tokens so far (the CPU default: least work)
    static    `Transformer.decode_step`: the same shapes at every step, attending over the whole preallocated cache
              with a mask (gpt-fast's trick), so that the step can be recorded once and replayed
    graph     the static step replayed as a CUDA graph (`DecodeSlot`; the CUDA default)
    compiled  the same, after torch.compile fused its element-wise kernels (opt-in, CUDA, minutes to compile)

Shape legend: B batch, T time (prompt tokens), S cache length, V vocab.
"""
from __future__ import annotations

import sys
import time

import torch

import model as M
from cli import ArgumentParser, UserError, add_common_args, fraction, nonneg_float, positive_int, run_cli

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


# ----------------------------------------------------------------------------- static-shape decoding, CUDA graphs

DECODE_MODES = ("auto", "dynamic", "static", "graph", "compiled")
KEEP_SLOTS = 4        # (B, S) shapes whose KV cache (and graphs) stay allocated between generate calls, LRU
KEEP_GRAPHS = 8       # FFN sets (dense, each expert, ...) with a captured graph per shape, LRU
GRAPH_CACHE_ROUND = 256  # graph mode rounds the cache length up to this, so batches of similar length share a graph


class DecodeSlot:
    """The state of static-shape decoding for one (batch B, cache length S), allocated once and reused by later
    generate calls of the same shape: every layer's KV cache, the input buffers of `Transformer.decode_step`
    (tokens, cache slot, positions, valid mask), and in graph mode one captured CUDA graph per set of FFNs.

    Why a graph: a decode step of SmolLM2-135M is ~1,200 small kernels (about 40 per layer: norms, RoPE, cache
    writes, attention, four matmuls, residual adds). Launched one by one from Python, each costs microseconds of
    CPU time while the GPU waits (launch-bound); replayed as one CUDA graph they run back to back. Written out with
    torch.cuda.CUDAGraph (`_capture`, a dozen lines) rather than torch.compile(mode="reduce-overhead"): no
    compiler toolchain or minutes of compile, a new set of expert FFNs (other matmul shapes) costs one capture
    instead of a recompile, and the whole mechanism stays readable here. A graph replays fixed kernels on fixed
    addresses, hence the fixed shapes and the input buffers below. Sampling and stop checks stay outside the
    graph (Python, a few small kernels per step).
    Opt-in, mode "compiled" (generate.py --compile): the same capture of torch.compile(decode_step), so that inductor
    first fuses the element-wise kernels (fewer, larger kernels per step); each new shape or FFN set recompiles."""

    def __init__(self, model: M.Transformer, B: int, S: int):
        dev = model.tok_emb.weight.device
        model.setup_cache(B, S)
        self.caches = [(blk.attn.cache_k, blk.attn.cache_v) for blk in model.layers]  # (B, K, S, D) each
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=dev)  # (B, 1) this step's tokens
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=dev)  # (1,) the cache slot they are written to
        self.pos = torch.zeros(B, dtype=torch.long, device=dev)  # (B,) their positions (padding not counted)
        self.valid = torch.ones(B, S, dtype=torch.bool, device=dev)  # (B, S) False at left padding
        self.graphs: dict = {}  # FFN set -> (graph, logits buffer (B, V), the modules whose weights it reads)

    def install(self, model: M.Transformer):
        """Give the model this slot's caches, zeroed, so a call's result never depends on an earlier call."""
        for blk, (k, v) in zip(model.layers, self.caches):
            blk.attn.cache_k, blk.attn.cache_v = k.zero_(), v.zero_()

    def start(self, valid, lens: list[int], T0: int):
        """Inputs of the first decode step: the token after prompts of lengths `lens`, left-padded to T0."""
        if valid is None:
            self.valid.fill_(True)
        else:
            self.valid.copy_(valid)
        self.cache_pos.fill_(T0)
        self.pos.copy_(torch.tensor(lens))

    def step(self, model: M.Transformer, nxt, mlps, mode: str = "static"):
        """Feed the sampled tokens nxt (B,), run one step -> logits (B, V), then advance slot and positions.
        mode: "static" runs decode_step op by op; "graph" / "compiled" replay its CUDA graph (captured on first use)."""
        self.tok.copy_(nxt[:, None])
        if mode == "static":
            logits = model.decode_step(self.tok, self.cache_pos, self.pos, self.valid, mlps)
        else:
            key = (mode, None if mlps is None else tuple(map(id, mlps)))  # ids stay unique: entries keep the modules
            if key not in self.graphs:
                self.graphs[key] = self._capture(model, mlps, compiled=mode == "compiled")
                while len(self.graphs) > KEEP_GRAPHS:
                    self.graphs.pop(next(iter(self.graphs)))
            g, logits, _ = self.graphs[key]
            g.replay()  # every kernel of the step, no Python in between; writes `logits`
        self.cache_pos += 1
        self.pos += 1
        return logits

    def _capture(self, model: M.Transformer, mlps, compiled: bool = False):
        """Record one decode step as a CUDA graph. The warm-up runs (which the capture needs: cuBLAS workspaces,
        lazy inits and, compiled, the compilation itself must not happen inside it) compute the real current step,
        so rewriting its cache slot is harmless."""
        fn = torch.compile(model.decode_step, fullgraph=True, dynamic=False) if compiled else model.decode_step
        run = lambda: fn(self.tok, self.cache_pos, self.pos, self.valid, mlps)  # noqa: E731
        with torch.cuda.device(self.tok.device):  # the model's GPU (cuda:N), whichever is current
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    run()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                logits = run()  # (B, V): allocated in the graph's own memory, rewritten by every replay
        weights = list(model.parameters()) + [p for m in mlps or [] for p in m.parameters()]
        return g, logits, weights  # the graph reads these addresses: keep them alive


def decode_slot(model: M.Transformer, B: int, S: int) -> DecodeSlot:
    """The (B, S) slot of `model`, created on first use; the least recently used beyond KEEP_SLOTS are freed."""
    slots = model.decode_slots
    slot = slots.pop((B, S), None) or DecodeSlot(model, B, S)
    slots[(B, S)] = slot  # most recently used last
    while len(slots) > KEEP_SLOTS:
        slots.pop(next(iter(slots)))
    slot.install(model)
    return slot


@torch.inference_mode()  # not just no_grad: skips autograd/version bookkeeping on every op (~6% per decode step)
def generate(model: M.Transformer, prompts: list[list[int]], max_new_tokens: int, temperature=0.0, top_k=None,
             top_p=None, stop_ids=None, stop_strings=None, tokenizer=None, mlps=None, seed=None,
             prefill=None, decode: str = "auto") -> list[list[int]]:
    """Batched generation: left-pad the prompts, prefill once, then decode one token per step with the KV cache.

    Returns the new tokens of each prompt, without the stop token. A row stops at a stop id, or (with a
    tokenizer) once its text contains a stop string; callers cut the text there (see generate_text).
    prefill: optional `f(idx (B, T), valid) -> (last logits (B, 1, V), mlps for decoding)` that replaces the plain
    prefill forward and fills the KV cache itself (router.FreeMoE routes inside it, reusing the first layers).
    decode: how each step runs. "dynamic": the model's forward over the cache sliced to the tokens so far (the CPU
    default: least work). "static": `Transformer.decode_step`, fixed shapes over the whole cache with a mask.
    "graph": the static step replayed as a CUDA graph (see DecodeSlot; the CUDA default). "compiled": the same with
    torch.compile's kernel fusion first (opt-in, CUDA). "auto" picks by device. All give the same tokens (tests:
    static == dynamic on CPU, graph == static on CUDA)."""
    device = model.tok_emb.weight.device
    if decode == "auto":
        decode = "graph" if device.type == "cuda" else "dynamic"
    if decode not in DECODE_MODES[1:]:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode in ("graph", "compiled") and device.type != "cuda":
        raise ValueError(f"decode={decode!r} needs a CUDA model, this one is on {device}")
    B, lens = len(prompts), [len(p) for p in prompts]
    if min(lens) == 0:
        raise UserError("cannot generate from an empty prompt")
    T0 = max(lens)
    S = T0 + max_new_tokens
    if decode in ("graph", "compiled"):  # a few cache lengths instead of one per prompt length: graphs get reused
        S = min(-(-S // GRAPH_CACHE_ROUND) * GRAPH_CACHE_ROUND, max(S, model.config.max_seq_len))
    # built on the host, copied once (not one small copy per prompt)
    idx = torch.tensor([[0] * (T0 - n) + list(p) for p, n in zip(prompts, lens)], dtype=torch.long).to(device)
    valid = None
    if min(lens) != T0:  # only padded batches need the mask
        valid = (torch.arange(S)[None, :] >= torch.tensor([T0 - n for n in lens])[:, None]).to(device)  # (B, S)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop_ids = set(stop_ids if stop_ids is not None else (tokenizer.stop_ids if tokenizer else ()))
    stop_strings = list(stop_strings or [])
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer")
    tail = max((len(s) for s in stop_strings), default=0) + 4  # tokens of context for spotting a stop string

    slot = None
    if decode == "dynamic":
        model.setup_cache(B, S)
    else:
        if S > model.config.max_seq_len:
            raise UserError(f"sequence of {S} tokens exceeds the model's max_seq_len {model.config.max_seq_len}")
        slot = decode_slot(model, B, S)  # its caches, zeroed, are now the model's
    try:
        if prefill is None:
            logits = model(idx, 0, valid, mlps, last_only=True)[:, -1]  # prefill: (B, V)
        else:
            logits, mlps = prefill(idx, valid)
            logits = logits[:, -1]  # (B, V)
        if slot is not None:
            slot.start(valid, lens, T0)
        out, done = [[] for _ in range(B)], [False] * B
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, gen)  # (B,)
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
            if slot is None:
                logits = model(nxt[:, None], T0 + step, valid, mlps)[:, -1]  # decode: (B, V)
            else:
                logits = slot.step(model, nxt, mlps, decode)  # (B, V)
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

def main():
    p = ArgumentParser(description="Generate text with a model loaded from scratch (GPT-2, Llama, Qwen2, Gemma 3).")
    add_common_args(p, out_default=None)
    p.add_argument("--prompt", default="The capital of France is", help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=fraction, default=None)
    p.add_argument("--compile", action="store_true",
                   help="CUDA: fuse the decode step with torch.compile before capturing its graph (minutes to compile)")
    args = p.parse_args()
    t0 = time.perf_counter()
    model, tok = M.load_for_cli(args)
    print(f"loaded {model.config.name} ({model.num_params() / 1e6:.1f}M params) in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    prompt = tok.chat_prompt(args.prompt) if args.chat else args.prompt
    ids = tok.encode(prompt)
    t0 = time.perf_counter()
    if args.compile and model.tok_emb.weight.device.type != "cuda":
        raise UserError("--compile needs --device cuda (it fuses the kernels of the CUDA-graph decode step)")
    out = generate(model, [ids], args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   tokenizer=tok, seed=args.seed, decode="compiled" if args.compile else "auto")[0]
    dt = time.perf_counter() - t0
    print(args.prompt if not args.chat else "", end="")
    print(tok.decode(out))
    print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / dt:.1f} tokens/s]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
