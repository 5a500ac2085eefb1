"""train_router.py — train the Free-MoE router (and nothing else: the LLM stays frozen, "tuning-free").

Pipeline position: the third stage
    model.py  ->  purify.py (DOWP, DSS-Experts)  ->  train_router.py / router.py  ->  evaluate.py

What goes in:  a model (--model, default SmolLM2-135M-Instruct), the experts file from purify.py (--experts) and the
               domain data of purify.py (calibration split for training, the canonical held-out split for metrics).
What comes out (in the --out directory, default runs/router):
    router.safetensors     the router parameters; metadata = model fingerprint, experts identity, config, hyper-params
    router.json / .md      level 1 held-out accuracy + confusion matrix, level 2 gates, active fraction and perplexity
    l1_features.*.safetensors   cached pooled early-layer features (a re-run with the same settings skips that pass)

    python train_router.py --experts experts/experts.safetensors --out runs/router
    python train_router.py --experts experts/experts.safetensors --sparsity-weight 0.3 --out runs/router_sw03

Training choices, all in one place:
    Level 1 (domain head). Data: per domain, random windows of 16..256 tokens (log-uniform length, so short prompts are
        as common as long ones) cut from the calibration split, plus short question-style snippets made from the
        calibration documents (a GSM8K question, an MMLU question with options, a `def` line with its docstring, a
        few Wikipedia sentences; code also gets MBPP train-split task texts 601..974), a fifth of them wrapped in the
        chat template. Features are computed once (truncated forward, router.prompt_features) and cached; the head
        is then trained on them with cross-entropy, AdamW (lr 3e-3, weight decay 0.01), batch 64, label smoothing
        0.05. Held-out split "heldout": windows and snippets from purify's held-out documents, plus benchmark-style
        prompts never used in training: MMLU held-out-bucket questions (knowledge), GSM8K test questions (math) and
        HumanEval prompts (code).
    Level 2 (per-layer gates). Loss = KL(dense || routed) per token + w * active FFN fraction (w = --sparsity-weight),
        or with --l2-target nll the routed model's next-token NLL on the domain's text instead of the KL,
        on calibration windows of --l2-seq-len tokens of each domain routed to that domain's expert (the true domain:
        level 2 learns where an expert is safe, independent of level 1 mistakes), and reported on held-out windows of
        256 tokens. Relaxation: per layer out = g * expert(x) + (1 - g) * dense(x) (router.MixedMLP, passed through
        mlps=), g from a Gumbel-sigmoid on the gate logit with temperature tau;
        "st" (default) uses the hard 0/1 gate in the forward pass and the sigmoid's gradient (straight-through), so
        training sees the same model inference runs; "soft" uses the relaxed g. The dense teacher's log-probs are
        computed once per batch and reused across epochs. AdamW on the gate logits only, lr 0.2, no weight decay.
    The threshold (default 0.5) and fallback (default dense) are stored in the checkpoint; both can be overridden at
    load time (router.load_router(..., threshold=, fallback=, budget=)).

Shape legend: B batch, T time, C width, L layers, F FFN neurons, D domains, k kept neurons, N prompts, V vocab.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import data
import generate as G
import model as M
from cache import key_digest, load_tensors, save_tensors
from cli import (ArgumentParser, DefaultsHelpFormatter, add_common_args, int_at_least, locked_dir, nonneg_float,
                 nonneg_int, positive_float, positive_int, probability, progress, run_cli, token_sparsity,
                 write_atomic)
import router as R
from experts import baseline_indices, experts_identity, kept_fraction, load_experts, materialize
from scoring import next_token_nll, perplexity


# ----------------------------------------------------------------------------- level 1 data

def random_windows(windows: torch.Tensor, n: int, rng: random.Random, lo: int = 16, hi: int = 256) -> list[list[int]]:
    """n random sub-windows of log-uniform length in [lo, hi] from token windows (N, T)."""
    out = []
    for _ in range(n):
        row = windows[rng.randrange(len(windows))].tolist()
        length = min(len(row), int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))))
        start = rng.randrange(len(row) - length + 1)
        out.append(row[start:start + length])
    return out


def question_snippet(domain: str, doc: str, rng: random.Random) -> str | None:
    """A short, question-style prompt cut from one document of a built-in domain (None if the document has none)."""
    if domain == "math":  # "Question: ...\nAnswer: ..." -> the question, as a prompt or bare
        q = doc.split("\nAnswer:")[0].removeprefix("Question: ").strip()
        return rng.choice([f"Question: {q}\nAnswer:", q])
    if domain == "knowledge":  # question + options + "Answer: X. text" -> without the answer, or the question alone
        body = doc.rsplit("\nAnswer:", 1)[0]
        return rng.choice([body + "\nAnswer:", body.split("\nA. ")[0]])
    if domain == "code":  # a def line with its docstring, or a few lines of code
        defs = re.findall(r'(?m)^[ \t]*def [^\n]*:\n[ \t]*(?:"""|\'\'\')[\s\S]{0,300}?(?:"""|\'\'\')', doc)
        if defs and rng.random() < 0.7:
            return rng.choice(defs)
        lines = [ln for ln in doc.split("\n") if ln.strip() and not ln.startswith("# =====")]
        if not lines:
            return None
        i = rng.randrange(len(lines))
        return "\n".join(lines[i:i + rng.randint(1, 6)])
    # general and user domains: one to three sentences of running text
    sents = [s for s in re.split(r"(?<=[.!?])\s+", doc.replace("\n", " ")) if len(s.split()) > 3 and "=" not in s]
    if not sents:
        return None
    i = rng.randrange(len(sents))
    return " ".join(sents[i:i + rng.randint(1, 3)])


def domain_snippets(domain: str, split: str, n: int, data_dir, rng: random.Random) -> list[str]:
    docs = data.domain_documents(domain, split, data_dir)
    out, tries = [], 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        s = question_snippet(domain, rng.choice(docs), rng)
        if s and s.strip():
            out.append(s.strip()[:1500])
    return out


def benchmark_prompts(domain: str, n: int, data_dir, rng: random.Random) -> list[str]:
    """Held-out, benchmark-style prompts (never used in training): MMLU held-out bucket, GSM8K test, HumanEval,
    in the zero-shot form of evaluate.py's prompts."""
    if domain == "knowledge":
        rows = [r for r in data.load_mmlu("test", data_dir) if data.mmlu_bucket(r) == "heldout"]
        texts = [data.mmlu_prompt(r, []) for r in rows]
    elif domain == "math":
        texts = [data.gsm8k_prompt(r, []) for r in data.load_gsm8k("test", data_dir)]
    elif domain == "code":
        texts = [r["prompt"] for r in data.load_humaneval(data_dir)]
    else:
        return []
    return rng.sample(texts, min(n, len(texts)))


def level1_prompts(domains, tok, data_dir, split: str, n_windows: int, n_snippets: int, n_bench: int, seed: int,
                   max_len: int = 256):
    """Domain-labelled prompts (token ids), labels (N,) and each prompt's source ("window", "snippet", "bench") for
    level 1; `split` is "calib" (train) or "heldout". Windows are 16..max_len tokens."""
    rng = random.Random(f"{seed}-{split}")
    prompts, labels, sources = [], [], []
    for label, d in enumerate(domains):
        windows = data.load_domain_tokens(d, tok, data_dir, split, n_tokens=max(256, n_windows * 64), seed=seed,
                                            seq_len=256)  # (N, 256)
        bos = [tok.bos_id] if tok.add_bos else []  # a window's <bos> (Gemma) stays at the start of its crops
        items = [("window", bos + p) for p in random_windows(windows[:, len(bos):], n_windows, rng, hi=max_len)]
        texts = domain_snippets(d, split, n_snippets, data_dir, rng)
        if d == "code" and split == "calib":
            texts += rng.sample(data.mbpp_texts(601, 974, data_dir), min(n_snippets // 2, 374))
        for t in texts:  # a fifth in the chat template: instruct-model prompts look like that
            t = tok.chat_prompt(t) if tok.chat_format and rng.random() < 0.2 else t
            items.append(("snippet", tok.encode(t)))
        if split == "heldout":
            items += [("bench", tok.encode(t)) for t in benchmark_prompts(d, n_bench, data_dir, rng)]
        for src, p in items:
            if p:
                prompts.append(p)
                labels.append(label)
                sources.append(src)
    return prompts, torch.tensor(labels), sources


def cached_features(model, prompts, route_layer, max_tokens, out_dir: Path, tag: str):
    """router.prompt_features, cached on disk under a key of everything that determines them; the prompts enter the
    key as their sha256 (the key stays small) and the key's digest names the file (several settings coexist)."""
    key = {"fingerprint": model.fingerprint, "route_layer": route_layer, "max_tokens": max_tokens,
           "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}
    path = out_dir / f"l1_features.{tag}.{key_digest(key)[:16]}.safetensors"
    feats = (load_tensors(path, key) or {}).get("feats")  # checksummed: wrong features would train a wrong router
    if feats is not None and tuple(feats.shape) == (len(prompts), model.config.n_embd):
        return feats
    feats = R.prompt_features(model, prompts, route_layer, max_tokens, show=True)  # (N, C)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(path, key, {"feats": feats})
    return feats


# ----------------------------------------------------------------------------- level 1 training

def train_level1(router: R.Router, feats, labels, val_feats, val_labels, epochs: int, lr: float, seed: int,
                 log=print):
    """Cross-entropy on cached features; one metric line per epoch on the named held-out split."""
    dev = router.feat_mean.device  # the features are cached on the host; the router lives on the model's device
    feats, labels, val_feats, val_labels = (t.to(dev) for t in (feats, labels, val_feats, val_labels))
    router.feat_mean.copy_(feats.mean(0))
    router.feat_std.copy_(feats.std(0).clamp(min=1e-4))  # standardise: residual dims differ by orders of magnitude
    params = list(router.head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        router.train()
        perm = torch.randperm(len(feats), generator=g).to(dev)  # drawn on the host: the same order on any device
        total, correct = 0.0, 0
        for i in range(0, len(feats), 64):
            b = perm[i:i + 64]
            logits = router.domain_logits(feats[b])  # (B, D)
            loss = F.cross_entropy(logits, labels[b], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
            correct += int((logits.argmax(-1) == labels[b]).sum())
        router.eval()
        with torch.no_grad():
            vl = router.domain_logits(val_feats)
            vloss, vacc = float(F.cross_entropy(vl, val_labels)), float((vl.argmax(-1) == val_labels).float().mean())
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs - 1:
            log(f"level1 epoch {epoch + 1:3d} | train loss {total / len(feats):.4f} acc {correct / len(feats):.3f} "
                f"| heldout loss {vloss:.4f} acc {vacc:.3f}")
    return vacc


def confusion(pred, labels, D: int) -> torch.Tensor:
    m = torch.zeros(D, D, dtype=torch.long)  # rows = true domain, columns = predicted
    for t, p in zip(labels.tolist(), pred.tolist()):
        m[t, p] += 1
    return m


def confusion_markdown(m: torch.Tensor, domains: list[str]) -> str:
    lines = ["| true \\ predicted | " + " | ".join(domains) + " | recall |", "|---" * (len(domains) + 2) + "|"]
    for i, d in enumerate(domains):
        row = m[i].tolist()
        lines.append(f"| {d} | " + " | ".join(map(str, row)) + f" | {row[i] / max(1, sum(row)):.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- level 2 training

def kl_dense_routed(dense_logp, routed_logits):
    """KL(dense || routed) averaged over tokens; dense_logp (B, T, V) log-probs, routed_logits (B, T, V)."""
    logq = routed_logits.float().log_softmax(-1)
    return (dense_logp.exp() * (dense_logp - logq)).sum(-1).mean()


def train_level2(moe: R.FreeMoE, calib: dict[str, torch.Tensor], sparsity_weight: float, epochs: int, lr: float,
                 tau: float, relax: str, batch_size: int, seed: int, target: str = "kl", log=print):
    """Learn the per-(domain, layer) gate logits; the model and the experts stay frozen.
    target "kl": stay close to the dense model (the expert can only be as good as dense, so a gate opens where the
    expert is harmless and the sparsity weight pays for it). target "nll": fit the domain's own next tokens, so a
    gate also opens where the purified expert is *better* than dense on that domain (the loss-aware greedy experts)."""
    model, router = moe.model, moe.router
    domains, Fn = router.cfg.domains, model.config.n_ffn
    mixers = {d: [R.MixedMLP(moe.expert_mlp((d,), l), blk.mlp) for l, blk in enumerate(model.layers)] for d in calib}
    device = model.tok_emb.weight.device
    kept = {d: torch.tensor(moe.kept_per_layer((d,)), dtype=torch.float32, device=device) for d in calib}
    batches = [(d, calib[d][i:i + batch_size].to(device)) for d in calib for i in range(0, len(calib[d]), batch_size)]
    teacher: dict[int, torch.Tensor] = {}  # dense log-probs per batch, computed once
    opt = torch.optim.AdamW([router.gate_logits], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order = list(range(len(batches)))
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(order)
        fit_sum, frac_sum = 0.0, 0.0
        for bi in progress(order, desc=f"level2 epoch {epoch + 1}", leave=False):
            d, x = batches[bi]
            if target == "kl" and bi not in teacher:
                with torch.no_grad():
                    teacher[bi] = model(x).log_softmax(-1).to(torch.bfloat16)  # (B, T, V)
            row = domains.index(d)
            gates = R.relaxed_gates(router.gate_logits[row], tau, relax, g)  # (L,)
            for l, mix in enumerate(mixers[d]):
                mix.g = gates[l]
            routed = model(x, mlps=mixers[d])  # (B, T, V)
            fit = (kl_dense_routed(teacher[bi].float(), routed) if target == "kl"
                   else next_token_nll(routed.float(), x))  # nll: the domain's own next tokens
            frac = R.expected_fraction(gates, kept[d], Fn)
            loss = fit + sparsity_weight * frac
            opt.zero_grad()
            loss.backward()
            opt.step()
            fit_sum, frac_sum = fit_sum + fit.item(), frac_sum + frac.item()
        hard = {d: moe.decision_for((d,)) for d in calib}
        log(f"level2 epoch {epoch + 1:3d} | {target} {fit_sum / len(order):.4f} | "
            f"sampled frac {frac_sum / len(order):.3f} | "
            + " ".join(f"{d}: {sum(h.use_expert)}/{len(h.use_expert)} layers, frac {h.active_fraction:.3f}"
                       for d, h in hard.items()))
    for mixes in mixers.values():  # drop the graph references held by the gates
        for mix in mixes:
            mix.g = torch.tensor(0.0)


@torch.no_grad()
def level2_heldout(moe: R.FreeMoE, heldout: dict[str, torch.Tensor], batch_size: int) -> dict:
    """Per domain, on held-out windows routed to that domain (the true domain): dense vs gated-expert vs full-expert
    ppl."""
    out = {}
    for d, w in heldout.items():
        gated = moe.decision_for((d,))
        full = moe.decision_for((d,), use_expert=(True,) * moe.model.config.n_layer)
        out[d] = {"dense_ppl": perplexity(moe.model, w, None, batch_size),
                  "gated_ppl": perplexity(moe.model, w, moe.mlps_for(gated), batch_size),
                  "gated_active_fraction": gated.active_fraction, "gated_layers": [int(u) for u in gated.use_expert],
                  "expert_ppl": perplexity(moe.model, w, moe.mlps_for(full), batch_size),
                  "expert_active_fraction": full.active_fraction}
    return out


# ----------------------------------------------------------------------------- comparison (README figures)

def decode_speed(model, prompt: list[int], mlps, n_new: int, repeats: int = 2) -> float:
    """Greedy decode tokens/s with the given FFNs (stop tokens disabled so every run makes n_new tokens)."""
    best = 0.0
    for _ in range(repeats):  # best of a few: the machine is shared, the minimum time is the least disturbed
        t0 = time.perf_counter()
        G.generate(model, [prompt], n_new, mlps=mlps, stop_ids=set())
        best = max(best, n_new / (time.perf_counter() - t0))
    return best


@torch.no_grad()
def compare_systems(moe: R.FreeMoE, experts, heldout: dict[str, torch.Tensor], speed_prompts: dict[str, list[int]],
                    n_new: int, batch_size: int = 4) -> dict:
    """Held-out perplexity per domain and decode tokens/s for dense, Free-MoE (routed on each window), the
    true-domain expert (the window's own domain, with the same level 2 gates) and `mixed` pruning at Free-MoE's mean
    active fraction."""
    model = moe.model
    res = {"dense": {}, "freemoe": {}, "true-domain": {}, "mixed": {}}
    fracs, hits = [], []
    for d, w in heldout.items():
        res["dense"][d] = perplexity(model, w, None, batch_size)
        nll, decs = moe.score(w, batch_size)
        res["freemoe"][d] = math.exp(float(nll.mean()))
        fracs += [x.active_fraction for x in decs]
        hits += [x.domains == (d,) for x in decs]
        res["true-domain"][d] = perplexity(model, w, moe.mlps_for(moe.decision_for((d,))), batch_size)
    frac = sum(fracs) / len(fracs)
    stats = experts.stats if getattr(experts, "stats", None) else None
    if stats:
        mixed_idx = baseline_indices("mixed", model, experts, frac)
    else:  # no statistics in the file: the stored mixed baseline at the file's keep
        mixed_idx = experts.baselines["mixed"]
    mixed = materialize(model, mixed_idx)
    for d, w in heldout.items():
        res["mixed"][d] = perplexity(model, w, mixed, batch_size)
    mlps_by_domain = {d: moe.mlps_for(moe.route([p])[0]) for d, p in speed_prompts.items()}
    speed = {"dense": [], "freemoe": [], "true-domain": [], "mixed": []}
    for d, p in speed_prompts.items():
        speed["dense"].append(decode_speed(model, p, None, n_new))
        speed["freemoe"].append(decode_speed(model, p, mlps_by_domain[d], n_new))
        speed["true-domain"].append(decode_speed(model, p, moe.mlps_for(moe.decision_for((d,))), n_new))
        speed["mixed"].append(decode_speed(model, p, mixed, n_new))
    fractions = {"dense": 1.0, "freemoe": frac,
                 "true-domain": sum(moe.decision_for((d,)).active_fraction for d in heldout) / len(heldout),
                 "mixed": kept_fraction(mixed_idx, model)}
    return {"ppl": res, "active_fraction": fractions, "tokens_per_s": {k: sum(v) / len(v) for k, v in speed.items()},
            "freemoe_routing_accuracy": sum(hits) / len(hits)}


@torch.no_grad()
def compare_fallbacks(moe: R.FreeMoE, heldout: dict[str, torch.Tensor], threshold: float = 0.9) -> dict:
    """Dense vs top-2-union fallback on mixed-domain windows (first half of one domain + second half of another,
    the case where level 1 is unsure), at a high threshold so that the fallback actually triggers."""
    names = list(heldout)
    half = min(w.shape[1] for w in heldout.values()) // 2
    mixed = torch.stack([torch.cat([heldout[a][0, :half], heldout[b][0, :half]])  # (2 * half,)
                         for a in names for b in names if a != b])  # (D(D-1), T)
    saved = (moe.threshold, moe.fallback)
    out = {}
    for fb in ("dense", "top2"):
        moe.threshold, moe.fallback = threshold, fb
        nll, decs = moe.score(mixed)
        out[fb] = {"ppl": math.exp(float(nll.mean())),
                   "active_fraction": sum(d.active_fraction for d in decs) / len(decs),
                   "fell_back": sum(d.fell_back for d in decs) / len(decs)}
    moe.threshold, moe.fallback = saved
    out["n_windows"], out["threshold"] = len(mixed), threshold
    return out


def compare_markdown(c: dict, domains: list[str]) -> str:
    lines = ["| system | " + " | ".join(f"{d} ppl" for d in domains) + " | active FFN | decode tok/s |",
             "|---" * (len(domains) + 3) + "|"]
    for s, row in c["ppl"].items():
        lines.append(f"| {s} | " + " | ".join(f"{row[d]:.2f}" for d in domains)
                     + f" | {c['active_fraction'][s]:.3f} | {c['tokens_per_s'][s]:.1f} |")
    routed = 100 * c["freemoe_routing_accuracy"]
    return "\n".join(lines) + f"\n\nFree-MoE routed {routed:.1f}% of the windows to their domain."


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = ArgumentParser(description="Train the Free-MoE router (level 1 domain head, level 2 layer gates); "
                                   "the LLM stays frozen.",
                       formatter_class=DefaultsHelpFormatter)
    add_common_args(p, out_default="runs/router")
    p.add_argument("--experts", required=True, help="experts file from purify.py")
    g = p.add_argument_group("router")
    g.add_argument("--route-layer", type=nonneg_int, default=None, help="level 1 reads the stream entering this layer "
                                                                 "(default L//4)")
    g.add_argument("--hidden", type=nonneg_int, default=128, help="domain head hidden width (0 = linear)")
    g.add_argument("--threshold", type=probability, default=0.5, help="confidence below which a request falls back")
    g.add_argument("--fallback", choices=["dense", "top2"], default="dense")
    g = p.add_argument_group("level 1")
    g.add_argument("--l1-windows", type=positive_int, default=80,
                   help="training windows (16..256 tokens) per domain")
    g.add_argument("--l1-snippets", type=positive_int, default=60, help="training question-style snippets per domain")
    g.add_argument("--l1-heldout", type=positive_int, default=30,
                   help="held-out windows, snippets and benchmark prompts (each) per domain")
    g.add_argument("--l1-epochs", type=positive_int, default=60)
    g.add_argument("--l1-lr", type=positive_float, default=3e-3)
    g = p.add_argument_group("level 2")
    g.add_argument("--sparsity-weight", type=nonneg_float, default=1.0, help="weight of the active-fraction penalty")
    g.add_argument("--l2-target", choices=["kl", "nll"], default="kl",
                   help="gate objective: kl = stay close to dense; nll = the domain's own next tokens (lets a gate "
                        "pick an expert that beats dense)")
    g.add_argument("--l2-windows", type=positive_int, default=4, help="calibration windows per domain")
    g.add_argument("--l2-seq-len", type=int_at_least(2), default=64, help="tokens per level 2 training window")
    g.add_argument("--l2-batch", type=positive_int, default=2)
    g.add_argument("--l2-epochs", type=positive_int, default=3)
    g.add_argument("--l2-lr", type=positive_float, default=0.2)
    g.add_argument("--tau", type=positive_float, default=1.0, help="Gumbel-sigmoid temperature")
    g.add_argument("--relax", choices=["st", "soft"], default="st", help="straight-through hard gates or soft mix")
    g.add_argument("--l2-heldout", type=positive_int, default=2,
                   help="held-out windows per domain for the level 2 report")
    g.add_argument("--skip-level2", action="store_true", help="train level 1 only (every layer stays dense)")
    g = p.add_argument_group("level 3")
    g.add_argument("--l3-windows", type=positive_int, default=8,
                   help="calibration windows of 256 tokens per domain for the level 3 thresholds")
    g.add_argument("--l3-report", type=token_sparsity, nargs="+", default=[0.25, 0.5], metavar="S",
                   help="target sparsities measured on the held-out text for router.md")
    g = p.add_argument_group("comparison (README figures)")
    g.add_argument("--compare", action="store_true", help="after training: held-out ppl per domain and decode "
                                                          "tokens/s for dense, freemoe, true-domain and mixed")
    g.add_argument("--compare-windows", type=positive_int, default=2, help="held-out windows of 256 tokens per domain")
    g.add_argument("--decode-tokens", type=positive_int, default=32, help="new tokens per decode-speed run")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with locked_dir(args.out, "another train_router.py run"):  # one run per --out: the router file is its product
        run(args)


def run(args):
    out_dir = Path(args.out)
    out = out_dir / "router.safetensors"  # beside it: router.json, router.md and the feature cache
    t_start = time.perf_counter()
    model, tok = M.load_for_cli(args)
    model.requires_grad_(False)  # tuning-free: only router parameters ever get gradients
    experts = load_experts(args.experts, model)
    domains = list(experts.domains)
    cfg = R.RouterConfig(domains=domains, n_layer=model.config.n_layer, n_embd=model.config.n_embd,
                         route_layer=R.default_route_layer(model.config.n_layer) if args.route_layer is None
                         else args.route_layer, hidden=args.hidden, threshold=args.threshold, fallback=args.fallback)
    router = R.Router(cfg)
    moe = R.FreeMoE(model, experts, router)
    n_model, n_router = model.num_params(), router.num_params()
    print(f"router: {n_router} params = {100 * n_router / n_model:.4f}% of the model's {n_model}; "
          f"level 1 reads layer {cfg.route_layer}/{cfg.n_layer}", file=sys.stderr)
    specs = experts.meta.get("domain_specs", {})
    domain_specs = [specs.get(d, d) for d in domains]  # user domains are stored as NAME=path

    level1, seconds = run_level1(args, model, tok, router, domain_specs, out_dir)
    heldout = {d: data.load_domain_tokens(s, tok, args.data_dir, "heldout", args.l2_heldout * 256, 0, 256)
               for d, s in zip(domains, domain_specs)}  # (N, 256) per domain: the level 2 and level 3 reports
    l2, seconds["level2_train"] = run_level2(args, moe, tok, domain_specs, heldout)
    l3, seconds["level3"] = run_level3(args, moe, tok, domain_specs, heldout)

    hparams = {k: v for k, v in vars(args).items() if k not in ("out",)}
    R.save_router(out, router, model, experts, hparams)
    seconds["train_total"] = time.perf_counter() - t_start
    comparison = None
    if args.compare:
        heldout = {d: data.load_domain_tokens(s, tok, args.data_dir, "heldout", args.compare_windows * 256, 0, 256)
                   for d, s in zip(domains, domain_specs)}
        speed_prompts = {d: w[-1, :48].tolist() for d, w in heldout.items()}  # (48,) a short real prompt per domain
        comparison = compare_systems(moe, experts, heldout, speed_prompts, args.decode_tokens)
        comparison["fallbacks"] = compare_fallbacks(moe, heldout)
    seconds["total"] = time.perf_counter() - t_start
    report = {"router": str(out), "experts": str(args.experts), "fingerprint": model.fingerprint,
              "experts_identity": experts_identity(experts), "router_params": n_router, "model_params": n_model,
              "level1": level1, "level2": l2, "level3": l3, "hparams": hparams, "seconds": seconds,
              "comparison": comparison}
    write_atomic(out.with_suffix(".json"), json.dumps(report, indent=1))
    md = report_markdown(out, report, args)
    write_atomic(out.with_suffix(".md"), md)
    print(md, end="")
    print(f"wrote {out} (+ .json, .md)", file=sys.stderr)


def run_level1(args, model, tok, router: R.Router, domain_specs: list[str], out_dir: Path) -> tuple[dict, dict]:
    """Level 1: prompts -> cached pooled features -> domain head, trained, then measured on the held-out prompts.
    Returns the report's "level1" section and the seconds of its two parts."""
    t0 = time.perf_counter()
    cfg = router.cfg
    tr_p, tr_y, _ = level1_prompts(domain_specs, tok, args.data_dir, "calib", args.l1_windows, args.l1_snippets, 0,
                                   args.seed)
    va_p, va_y, va_src = level1_prompts(domain_specs, tok, args.data_dir, "heldout", args.l1_heldout,
                                        args.l1_heldout, args.l1_heldout, args.seed)
    tr_f = cached_features(model, tr_p, cfg.route_layer, cfg.max_route_tokens, out_dir, "calib")
    va_f = cached_features(model, va_p, cfg.route_layer, cfg.max_route_tokens, out_dir, "heldout")
    t_feat = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc = train_level1(router, tr_f, tr_y, va_f, va_y, args.l1_epochs, args.l1_lr, args.seed,
                       log=lambda s: print(s, file=sys.stderr))
    t_l1 = time.perf_counter() - t0
    with torch.no_grad():
        probs = router.domain_probs(va_f).cpu()  # (N, D)
    pred = probs.argmax(-1)
    conf = confusion(pred, va_y, len(cfg.domains))
    by_source = {s: float((pred[idx] == va_y[idx]).float().mean())
                 for s in sorted(set(va_src)) for idx in [torch.tensor([i for i, x in enumerate(va_src) if x == s])]}
    fallback = float((probs.max(-1).values < cfg.threshold).float().mean())
    print(f"level 1 held-out accuracy {acc:.3f} on {len(va_y)} prompts ({len(tr_y)} training prompts); "
          f"by source {json.dumps({k: round(v, 3) for k, v in by_source.items()})}; "
          f"below threshold {fallback:.3f}", file=sys.stderr)
    level1 = {"heldout_accuracy": acc, "by_source": by_source, "n_train": len(tr_y), "n_heldout": len(va_y),
              "below_threshold": fallback, "confusion": conf.tolist(), "domains": list(cfg.domains)}
    return level1, {"level1_features": t_feat, "level1_train": t_l1}


def run_level2(args, moe: R.FreeMoE, tok, domain_specs: list[str], heldout: dict) -> tuple[dict, float]:
    """Level 2: per-layer gates with KL(dense || routed) + sparsity_weight * active fraction, then measured on the
    held-out windows. Returns the report's "level2" section ({} with --skip-level2) and the training seconds."""
    domains = list(moe.router.cfg.domains)
    if args.skip_level2:
        with torch.no_grad():
            moe.router.gate_logits.fill_(-1.0)  # level 1 only: every layer stays dense
        return {}, 0.0
    t0 = time.perf_counter()
    calib = {d: data.load_domain_tokens(s, tok, args.data_dir, "calib", args.l2_windows * args.l2_seq_len,
                                        args.seed + 1, args.l2_seq_len) for d, s in zip(domains, domain_specs)}
    train_level2(moe, calib, args.sparsity_weight, args.l2_epochs, args.l2_lr, args.tau, args.relax, args.l2_batch,
                 args.seed, args.l2_target, log=lambda s: print(s, file=sys.stderr))
    t_l2 = time.perf_counter() - t0
    return level2_heldout(moe, heldout, batch_size=4), t_l2


def run_level3(args, moe: R.FreeMoE, tok, domain_specs: list[str], heldout: dict) -> tuple[dict, float]:
    """Level 3: thresholds calibrated on --l3-windows windows of calibration text per domain (after level 2), then
    measured on the held-out windows at each --l3-report sparsity: perplexity with the true domain's gated expert and
    the active FFN it ran. Returns the report's "level3" section and the seconds."""
    t0 = time.perf_counter()
    domains = list(moe.router.cfg.domains)
    calib = {d: data.load_domain_tokens(s, tok, args.data_dir, "calib", args.l3_windows * 256, args.seed + 2, 256)
             for d, s in zip(domains, domain_specs)}
    R.calibrate_level3(moe, calib)
    out = {}
    for s in args.l3_report:
        moe.token_sparsity = s
        for d, w in heldout.items():
            mlps = moe.mlps_for(moe.decision_for((d,)))
            ppl = perplexity(moe.model, w, mlps, batch_size=4)
            out.setdefault(d, {})[f"{s:g}"] = {"ppl": ppl, "active_fraction": R.measured_active_fraction(
                mlps, moe.model.config.n_ffn)}
    moe.token_sparsity = 0.0
    return out, time.perf_counter() - t0


def report_markdown(out: Path, report: dict, args) -> str:
    """router.md: level 1 accuracy and confusion, level 2 and level 3 perplexities, the --compare table and the
    seconds."""
    n_router, n_model, l1, l2 = report["router_params"], report["model_params"], report["level1"], report["level2"]
    domains, comparison = l1["domains"], report["comparison"]
    md = [f"# router {out.name}", "", f"router params: {n_router} ({100 * n_router / n_model:.4f}% of the model)", "",
          f"## level 1: held-out accuracy {l1['heldout_accuracy']:.3f} (chance {1 / len(domains):.3f})", "",
          confusion_markdown(torch.tensor(l1["confusion"]), domains),
          "", "by source: " + ", ".join(f"{k} {v:.3f}" for k, v in l1["by_source"].items()), ""]
    if l2:
        md += [f"## level 2 (sparsity weight {args.sparsity_weight}): held-out perplexity with the true domain's "
               "expert", "",
               "| domain | dense | gated expert | active FFN | full expert | active FFN |", "|---|---|---|---|---|---|"]
        md += [f"| {d} | {r['dense_ppl']:.2f} | {r['gated_ppl']:.2f} | {r['gated_active_fraction']:.3f} | "
               f"{r['expert_ppl']:.2f} | {r['expert_active_fraction']:.3f} |" for d, r in l2.items()]
    if report["level3"]:
        steps = list(next(iter(report["level3"].values())))
        md += ["", "## level 3: held-out perplexity with the true domain's gated expert, skipping quiet neurons per "
               "token (s = the target fraction skipped)", "",
               "| domain | " + " | ".join(f"s={s} | active FFN" for s in steps) + " |",
               "|---|" + "---|---|" * len(steps)]
        md += [f"| {d} | " + " | ".join(f"{r[s]['ppl']:.2f} | {r[s]['active_fraction']:.3f}" for s in steps) + " |"
               for d, r in report["level3"].items()]
    if comparison:
        md += ["", f"## held-out perplexity and decode speed ({args.compare_windows} x 256 tokens per domain)", "",
               compare_markdown(comparison, domains), "",
               f"fallback on {comparison['fallbacks']['n_windows']} mixed-domain windows (threshold "
               f"{comparison['fallbacks']['threshold']}): " + ", ".join(
                   f"{fb}: ppl {r['ppl']:.2f}, active FFN {r['active_fraction']:.3f}, fell back {r['fell_back']:.2f}"
                   for fb, r in comparison["fallbacks"].items() if isinstance(r, dict))]
    md += ["", "seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items())]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    run_cli(main)
