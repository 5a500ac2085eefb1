"""purify.py — DOWP (Domain-Oriented Weight Purification): score every FFN neuron per domain, keep the relevant
ones, and save the kept index sets as DSS-Experts (Domain-Specific Subnetwork Experts) that really run faster.

Pipeline position: the second stage
    model.py  ->  purify.py (DOWP, DSS-Experts)  ->  train_router.py / router.py  ->  evaluate.py

What goes in:  a model (--model, default SmolLM2-135M-Instruct GGUF) and one text source per domain: the built-in
               general / code / math / knowledge corpora from <shared>/data (see DOMAIN DATA below), or your own
               files with --domain NAME=path.txt|.jsonl.
What comes out (under --out, default experts/):
    experts.safetensors   per-domain, per-layer kept-neuron index sets ("{domain}.{layer}", int64, sorted), the
                          baselines at the same budget ("baseline.{name}.{layer}"), the per-domain neuron statistics
                          ("stats.{domain}.{stat}", so any baseline at any keep can be rebuilt later) and JSON
                          metadata (model fingerprint, domains, score, keep, token counts, date, checksum)
    stats.{domain}.safetensors   the statistics of one domain, reused by a re-run (a killed run resumes)
    report.md / report.json      cross-domain perplexity matrix, per-layer Jaccard overlap, protected neurons
    report.png                   the perplexity matrix as a heatmap (--plot, only if matplotlib is installed)

    python purify.py --domains general code math knowledge --keep 0.5 --out experts/
    python purify.py --keep 0.5 --domain legal=my_contracts.txt --out experts_legal/
    python purify.py --keep 0.5 --export exported/code --export-domain code

The method, step by step (each step is named in the comments below):
    DOWP step 1  domain calibration: token windows per domain, a held-out split kept apart for evaluation
    DOWP step 2  statistics: one streamed pass per domain through recording FFNs (`model(idx, mlps=[...])`):
                 for every layer l and neuron j the mean |a_j|, mean a_j^2, firing rate and max |a_j|, plus
                 ||W_down[:, j]||; memory O(L x F), never O(tokens)
    DOWP step 3  scores: structured Wanda importance I_d(l, j) = sqrt(mean_d a_j^2) * ||W_down[:, j]||, made
                 domain-oriented by contrasting it with the other domains (`score_dowp`, knob --contrast)
    DOWP step 4  budget: keep a fraction of neurons per layer (uniform, or allocated by measured layer
                 sensitivity); super neurons (massive activations) are always kept (--protect)
    DOWP step 5  DSS-Experts: the kept index sets; `materialize` gathers them into compact MLPs (`MLP.select`)
                 whose matmuls are (k, C) and (C, k): real compute savings, not masks
    DOWP step 6  export one expert as a normal HF checkpoint (intermediate_size = k) that transformers loads
    DOWP step 7  report: perplexity of every expert and baseline on every domain's held-out text

All choices in one place:
    score (dowp)  S_d = I~_d * (I~_d / mean_e I~_e) ** lam, where I~_d is I_d divided by its layer mean (so a domain
                  with larger activations overall does not dominate the contrast). lam = 0 is plain Wanda on the
                  domain's text. A neuron that matters for every domain has ratio ~1 and keeps its full importance
                  (kept when important); one that matters only for other domains has ratio << 1 and is purified.
                  Only the ranking inside a layer matters, so S_d is a geometric tilt of I_d towards d.
                  DEFAULT_CONTRAST was picked by held-out perplexity on the real model (see the report).
    baselines     random (uniform scores, seeded), magnitude (weights only: ||[W_up; W_gate][j]|| * ||W_down[:, j]||),
                  general (Wanda on general text only), mixed (Wanda on all domains' calibration text pooled).
                  Each is ONE mask for every input, at the same per-layer budget; mixed is the fair comparison.
    super neurons neuron j of layer l is protected when its max |a_j| over all calibration tokens exceeds
                  PROTECT_FACTOR x the median over the layer's neurons of max |a|. They are kept by every method.
    firing rate   a neuron "fires" on a token when |a_j| > FIRE_REL x the token's RMS activation over the layer.
    budget        k_l = round(keep_l * F), at least 1; sensitivity allocation moves budget between layers
                  (`allocate_keep`) keeping the mean keep fraction.
    perplexity    exp(mean next-token NLL) over non-overlapping windows of --seq-len tokens of held-out text.

DOMAIN DATA (built-in; all paths under <shared>/data; every document split is deterministic):
    general    calib: WikiText-2 valid (articles)          held-out: WikiText-2 test (articles)
    code       calib: CPython stdlib corpus, all but the last files   held-out: the last files (>= 10% of bytes)
               (the files are split at their "# ===== file:" header lines; disjoint from HumanEval / MBPP)
    math       calib: GSM8K train corpus (first 5526 train problems)
               held-out: GSM8K train problems 5527..7473 (not in the corpus; disjoint from GSM8K test,
               which evaluate.py scores)
    knowledge  MMLU items as "question / A.-D. options / Answer: X. text". Each test item goes to one bucket by
               sha256(subject + question): 0-1 of 10 -> calib, 2 -> held-out, 3-9 -> "eval" (never used here,
               left for benchmarks; `mmlu_bucket` lets evaluate.py skip the calib/held-out items).
               calib = dev (285 items) + calib-bucket test items; held-out = held-out-bucket test items.
    NAME=path  a .txt (documents = blank-line-separated paragraphs) or .jsonl (the "text" field, else all string
               fields joined); the last 10% of documents are the held-out split.
Within a split, documents are shuffled with --seed (calib) or seed 0 (held-out, canonical), joined with a blank
line, tokenized and cut into windows of --seq-len tokens.

Shape legend: B batch, T time, C width, L layers, F FFN neurons, D domains, k kept neurons, N windows.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import json
import math
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import model as M

BUILTIN_DOMAINS = ("general", "code", "math", "knowledge")
BASELINES = ("random", "magnitude", "general", "mixed")
SCORES = ("dowp",) + BASELINES
STATS = ("mean_abs", "mean_sq", "fire_rate", "max_abs", "down_norm")  # each (L, F); plus "count" (tokens)
DEFAULT_CONTRAST = 1.0  # lam of score_dowp; chosen by held-out perplexity, see the report in the module docstring
PROTECT_FACTOR = 50.0  # super neuron: max |a| above this many times the layer's median max |a|
FIRE_REL = 0.1  # "fires" = |a_j| above this fraction of the token's RMS activation
HELDOUT_FRACTION = 0.1  # user domains: last 10% of documents are held out
EXPERTS_FORMAT = "free-moe-experts/1"
NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
LETTERS = "ABCD"


# ----------------------------------------------------------------------------- DOWP step 1: domain calibration

def read_text(path: Path) -> str:
    if not path.exists():
        raise M.UserError(f"data file {path} does not exist (set --data-dir or $FREE_MOE_SHARED)")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(read_text(path).split("\n")):  # not splitlines: items hold U+2028
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise M.UserError(f"{path}: line {i + 1} is not JSON ({e})") from None
    return rows


def mmlu_text(row: dict) -> str:
    """One MMLU item as plain text: the knowledge domain's document unit."""
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"]))
    a = int(row["answer"])
    return f"{row['question'].strip()}{options}\nAnswer: {LETTERS[a]}. {row['choices'][a]}"


def mmlu_bucket(row: dict) -> str:
    """Which use an MMLU test item is reserved for: "calib", "heldout" or "eval" (free for benchmarks)."""
    h = int(hashlib.sha256((row["subject"] + "\n" + row["question"]).encode()).hexdigest(), 16) % 10
    return "calib" if h < 2 else "heldout" if h == 2 else "eval"


def gsm8k_text(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer: {row['answer']}"


def wikitext_articles(text: str) -> list[str]:
    """Split WikiText at its top-level headings (" = Title = "); undo its @-@ style number/hyphen splitting."""
    text = text.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    parts = re.split(r"\n(?= = [^=].* = \n)", "\n" + text)
    return [p.strip("\n") for p in parts if p.strip()]


def code_files(text: str) -> list[str]:
    parts = re.split(r"(?m)^(?=# ===== file: )", text)
    return [p for p in parts if p.strip()]


def builtin_documents(domain: str, split: str, root: Path) -> list[str]:
    """The documents of a built-in domain's split (see DOMAIN DATA in the module docstring)."""
    corpora = root / "corpora"
    if domain == "general":
        name = "english_wikitext2_valid.txt.gz" if split == "calib" else "english_wikitext2_test.txt.gz"
        return wikitext_articles(read_text(corpora / name))
    if domain == "code":
        files = code_files(read_text(corpora / "code_python.txt.gz"))
        total, tail, cut = sum(map(len, files)), 0, len(files)
        while tail < HELDOUT_FRACTION * total:  # held-out = the last whole files covering >= 10% of the bytes
            cut -= 1
            tail += len(files[cut])
        return files[:cut] if split == "calib" else files[cut:]
    if domain == "math":
        corpus = read_text(corpora / "math_gsm8k_train.txt.gz")
        problems = [p.strip("\n") for p in re.split(r"\n\n(?=Question: )", corpus) if p.strip()]
        if split == "calib":
            return problems
        rows = read_jsonl(root / "gsm8k" / "train.jsonl")  # the train problems the corpus stops before
        if gsm8k_text(rows[len(problems) - 1]) != problems[-1]:
            raise M.UserError(f"{corpora / 'math_gsm8k_train.txt.gz'}: corpus does not end at GSM8K train row "
                              f"{len(problems)}; cannot derive a disjoint held-out split")
        return [gsm8k_text(r) for r in rows[len(problems):]]
    if domain == "knowledge":
        test = read_jsonl(root / "mmlu" / "test.jsonl.gz")
        docs = [mmlu_text(r) for r in test if mmlu_bucket(r) == split]
        if split == "calib":
            docs = [mmlu_text(r) for r in read_jsonl(root / "mmlu" / "dev.jsonl.gz")] + docs
        return docs
    raise M.UserError(f"unknown domain {domain!r} (built-in: {', '.join(BUILTIN_DOMAINS)}; or NAME=path.txt|.jsonl)")


def user_documents(path: Path) -> list[str]:
    """A user corpus: .jsonl rows ("text" field, else every string field) or .txt paragraphs."""
    if not path.exists():
        raise M.UserError(f"domain file {path} does not exist")
    if path.suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        docs = []
        for row in read_jsonl(path):
            if not isinstance(row, dict):
                raise M.UserError(f"{path}: each line must be a JSON object")
            text = row.get("text") if isinstance(row.get("text"), str) else \
                "\n".join(v for v in row.values() if isinstance(v, str))
            docs.append(text)
    else:
        docs = re.split(r"\n\s*\n", read_text(path))
    return [d.strip() for d in docs if d.strip()]


def parse_domain(spec: str) -> tuple[str, Path | None]:
    """"code" -> ("code", None); "legal=docs.txt" -> ("legal", Path("docs.txt"))."""
    name, _, path = spec.partition("=")
    name = name.strip()
    if not NAME_RE.match(name) or name == "baseline" or name == "stats":
        raise M.UserError(f"bad domain name {name!r} (lowercase letters, digits, _ or -; not 'baseline'/'stats')")
    if path:
        return name, Path(path)
    if name not in BUILTIN_DOMAINS:
        raise M.UserError(f"unknown domain {name!r} (built-in: {', '.join(BUILTIN_DOMAINS)}; or NAME=path.txt|.jsonl)")
    return name, None


def domain_documents(domain: str, split: str = "calib", data_dir=None) -> list[str]:
    """Documents of `domain` ("general" or "NAME=path") for split "calib" or "heldout", in file order."""
    if split not in ("calib", "heldout"):
        raise ValueError(f"split must be 'calib' or 'heldout', got {split!r}")
    name, path = parse_domain(domain)
    if path is None:
        docs = builtin_documents(name, split, M.shared_dir(data_dir) / "data")
    else:
        all_docs = user_documents(path)
        if len(all_docs) < 2:
            raise M.UserError(f"domain {name}: {path} has {len(all_docs)} documents; need at least 2 "
                              "(one for calibration, one held out)")
        cut = len(all_docs) - max(1, round(HELDOUT_FRACTION * len(all_docs)))
        docs = all_docs[:cut] if split == "calib" else all_docs[cut:]
    if not docs:
        raise M.UserError(f"domain {name}: the {split} split is empty")
    return docs


def shuffled(docs: list[str], seed: int) -> list[str]:
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs


def heldout_text(domain: str, root=None) -> str:
    """The canonical held-out text of a domain (documents shuffled with seed 0, blank-line separated).
    `root` is the data dir (<shared>/data) as evaluate.py passes it, or None for the default."""
    data_dir = Path(root).parent if root is not None else None
    return "\n\n".join(shuffled(domain_documents(domain, "heldout", data_dir), 0))


def load_domain_tokens(domain: str, tokenizer, data_dir=None, split: str = "calib", n_tokens: int = 32768,
                       seed: int = 0, seq_len: int = 512) -> torch.Tensor:
    """DOWP step 1: token windows of one domain, (N, T) long with N = n_tokens // seq_len (at least 1).

    calib: documents shuffled by `seed`; heldout: shuffled by seed 0 always (the canonical split evaluate.py
    uses). Documents are joined by a blank line and tokenized only until the budget is reached."""
    if n_tokens < seq_len:
        raise M.UserError(f"token budget {n_tokens} is smaller than one window of {seq_len} tokens")
    docs = shuffled(domain_documents(domain, split, data_dir), seed if split == "calib" else 0)
    need = n_tokens // seq_len * seq_len
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc + "\n\n")
        if len(ids) >= need:
            break
    n = len(ids) // seq_len
    if n == 0:
        raise M.UserError(f"domain {domain}: the {split} split has only {len(ids)} tokens, fewer than one "
                          f"window of {seq_len}")
    return torch.tensor(ids[:min(n * seq_len, need)], dtype=torch.long).view(-1, seq_len)  # (N, T)


# ----------------------------------------------------------------------------- DOWP step 2: statistics

class RecordingMLP(nn.Module):
    """Wraps an FFN: computes exactly what it computes, and accumulates per-neuron sums of its activations.

    Passed to `model(idx, mlps=[...])`, so statistics need no hooks. Sums are float64 (many tokens)."""

    def __init__(self, mlp: M.MLP):
        super().__init__()
        self.mlp = mlp
        n = mlp.n_neurons
        dev = mlp.up.weight.device
        self.count = 0
        self.sum_abs = torch.zeros(n, dtype=torch.float64, device=dev)
        self.sum_sq = torch.zeros(n, dtype=torch.float64, device=dev)
        self.n_fire = torch.zeros(n, dtype=torch.float64, device=dev)
        self.max_abs = torch.zeros(n, dtype=torch.float32, device=dev)

    def forward(self, x):
        a = self.mlp.neurons(x)  # (B, T, F)
        flat = a.detach().reshape(-1, a.shape[-1]).float()  # (B*T, F)
        mag = flat.abs()
        sq = mag * mag
        rms = sq.mean(-1, keepdim=True).sqrt()  # (B*T, 1) per-token scale for the firing threshold
        self.count += flat.shape[0]
        self.sum_abs += mag.sum(0)
        self.sum_sq += sq.sum(0)
        self.n_fire += (mag > FIRE_REL * rms).sum(0)
        torch.maximum(self.max_abs, mag.amax(0), out=self.max_abs)
        return self.mlp.project(a)


def down_norms(model: M.Transformer) -> torch.Tensor:
    """||W_down[:, j]|| per layer and neuron: (L, F)."""
    return torch.stack([blk.mlp.down_weight().detach().float().norm(dim=0) for blk in model.layers]).cpu()


@torch.no_grad()
def collect_stats(model: M.Transformer, windows: torch.Tensor, batch_size: int = 8, desc: str = "stats") -> dict:
    """DOWP step 2: one streamed pass over `windows` (N, T); returns {stat: (L, F) float32} + "count" (tokens).

    mean_abs = E|a_j|, mean_sq = E a_j^2, fire_rate = P(|a_j| > FIRE_REL * rms_token), max_abs = max |a_j|,
    down_norm = ||W_down[:, j]||; expectations over every token of every window."""
    if windows.ndim != 2 or windows.numel() == 0:
        raise M.UserError(f"need (N, T) token windows, got shape {tuple(windows.shape)}")
    recorders = [RecordingMLP(blk.mlp) for blk in model.layers]
    device = model.tok_emb.weight.device
    for i in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", leave=False):
        model(windows[i:i + batch_size].to(device), mlps=recorders)
    n = recorders[0].count
    stack = lambda f: torch.stack([f(r) for r in recorders]).float().cpu()  # (L, F)
    return {"mean_abs": stack(lambda r: r.sum_abs / n), "mean_sq": stack(lambda r: r.sum_sq / n),
            "fire_rate": stack(lambda r: r.n_fire / n), "max_abs": stack(lambda r: r.max_abs),
            "down_norm": down_norms(model), "count": torch.tensor(n, dtype=torch.int64)}


def pool_stats(stats_by_domain: dict[str, dict]) -> dict:
    """All domains' calibration tokens as one corpus: token-weighted means, max of maxes."""
    ss = list(stats_by_domain.values())
    n = torch.stack([s["count"] for s in ss]).double()  # (D,)
    w = (n / n.sum()).float()
    mean = lambda k: sum(wi * s[k] for wi, s in zip(w, ss))
    return {"mean_abs": mean("mean_abs"), "mean_sq": mean("mean_sq"), "fire_rate": mean("fire_rate"),
            "max_abs": torch.stack([s["max_abs"] for s in ss]).amax(0), "down_norm": ss[0]["down_norm"],
            "count": n.sum().long()}


# ----------------------------------------------------------------------------- DOWP step 3: scores

def wanda_importance(stats: dict) -> torch.Tensor:
    """Structured Wanda: I(l, j) = sqrt(E a_j^2) * ||W_down[:, j]||  (= ||a_j||_2 / sqrt(n_tokens) * ||W_down[:, j]||).

    The neuron's output norm averaged over the domain's tokens: how much it writes into the residual stream."""
    return stats["mean_sq"].sqrt() * stats["down_norm"]  # (L, F)


def score_dowp(stats_by_domain: dict[str, dict], domain: str, contrast: float = DEFAULT_CONTRAST) -> torch.Tensor:
    """DOWP: S_d = I~_d * (I~_d / mean_e I~_e) ** lam   with I~_e = I_e / mean_j I_e(l, j)  (layer-normalised).

    lam = 0: Wanda on domain d alone. lam > 0: neurons relatively more important for d than on average across
    all domains gain rank; a neuron equally important everywhere keeps its plain importance; one important
    only for other domains is pushed down (purified). Computed in log space for stability."""
    if domain not in stats_by_domain:
        raise M.UserError(f"no statistics for domain {domain!r} (have {', '.join(stats_by_domain)})")
    if contrast < 0:
        raise M.UserError(f"--contrast must be >= 0, got {contrast}")
    eps = 1e-12
    norm = {d: wanda_importance(s) for d, s in stats_by_domain.items()}
    norm = {d: I / I.mean(1, keepdim=True).clamp_min(eps) for d, I in norm.items()}  # (L, F) each, layer mean 1
    ref = torch.stack(list(norm.values())).mean(0)  # (L, F) the all-domain reference
    log_i = norm[domain].clamp_min(eps).log()
    return ((1 + contrast) * log_i - contrast * ref.clamp_min(eps).log()).exp()  # (L, F)


def score_random(model: M.Transformer, seed: int = 0) -> torch.Tensor:
    """Baseline: uniform random scores (seeded) -> a random subset of each layer's neurons."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(model.config.n_layer, model.config.n_ffn, generator=g)  # (L, F)


def score_magnitude(model: M.Transformer) -> torch.Tensor:
    """Baseline, weights only: ||[W_up; W_gate][j, :]|| * ||W_down[:, j]|| (input-row norm times output-column norm)."""
    rows = []
    for blk in model.layers:
        w_in = torch.cat([w.detach().float() for w in blk.mlp.up_weights()], dim=1)  # (F, C or 2C)
        rows.append(w_in.norm(dim=1) * blk.mlp.down_weight().detach().float().norm(dim=0))
    return torch.stack(rows).cpu()  # (L, F)


def score_neurons(stats_by_domain: dict[str, dict] | None, model: M.Transformer, method: str, domain: str | None = None,
                  contrast: float = DEFAULT_CONTRAST, seed: int = 0) -> torch.Tensor:
    """Scores (L, F) by `method` (dowp needs `domain`); higher = keep first."""
    if method == "random":
        return score_random(model, seed)
    if method == "magnitude":
        return score_magnitude(model)
    if not stats_by_domain:
        raise M.UserError(f"score {method!r} needs calibration statistics")
    if method == "dowp":
        if domain is None:
            raise ValueError("score 'dowp' needs a domain")
        return score_dowp(stats_by_domain, domain, contrast)
    if method == "general":
        if "general" not in stats_by_domain:
            raise M.UserError("baseline 'general' needs statistics of the general domain")
        return wanda_importance(stats_by_domain["general"])
    if method == "mixed":
        return wanda_importance(pool_stats(stats_by_domain))
    raise M.UserError(f"unknown score {method!r} (expected one of {', '.join(SCORES)})")


# ----------------------------------------------------------------------------- DOWP step 4: budget

def super_neurons(stats_by_domain: dict[str, dict], factor: float = PROTECT_FACTOR) -> torch.Tensor:
    """(L, F) bool: neurons whose max |a| (over every domain's tokens) exceeds `factor` x the layer median.

    These few "super neurons" carry massive activations (attention-sink style); dropping one wrecks the model
    for every input, so every method keeps them. factor <= 0 disables protection."""
    peak = torch.stack([s["max_abs"] for s in stats_by_domain.values()]).amax(0)  # (L, F)
    if factor <= 0:
        return torch.zeros_like(peak, dtype=torch.bool)
    return peak > factor * peak.median(dim=1, keepdim=True).values


def select_neurons(scores: torch.Tensor, keep, protect: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per layer, the indices (sorted) of the round(keep_l * F) highest-scoring neurons; protected ones first.

    keep: a float for every layer, or a list of L floats. protect: (L, F) bool or None."""
    L, n = scores.shape
    keeps = [float(keep)] * L if isinstance(keep, (int, float)) else [float(k) for k in keep]
    if len(keeps) != L:
        raise M.UserError(f"keep has {len(keeps)} entries for {L} layers")
    out = []
    for l, kf in enumerate(keeps):
        if not 0 < kf <= 1:
            raise M.UserError(f"keep must be in (0, 1], got {kf} (layer {l})")
        k = max(1, min(n, round(kf * n)))
        s = scores[l].float().clone()
        if protect is not None and protect[l].any():
            n_prot = int(protect[l].sum())
            if n_prot > k:
                raise M.UserError(f"layer {l}: {n_prot} protected neurons exceed the budget of {k}; "
                                  "raise --keep or --protect")
            s[protect[l]] = float("inf")
        idx = torch.topk(s, k, sorted=False).indices  # ties broken by topk, deterministic on CPU
        out.append(idx.sort().values.long())
    return out


def allocate_keep(sensitivity: torch.Tensor, keep: float, lo: float = 0.1, hi: float = 1.0) -> list[float]:
    """Per-layer keep fractions with mean `keep`: keep_l = clip(c * sensitivity_l, lo, hi), c found by bisection.

    More sensitive layers (bigger loss increase when purified) keep more neurons."""
    s = sensitivity.double().clamp_min(1e-9)
    s = s / s.mean()
    lo_c, hi_c = 0.0, 1e6
    for _ in range(200):
        c = (lo_c + hi_c) / 2
        if (c * s).clamp(lo, hi).mean() < keep:
            lo_c = c
        else:
            hi_c = c
    return [float(v) for v in (hi_c * s).clamp(lo, hi)]


# ----------------------------------------------------------------------------- DOWP step 5: DSS-Experts

def materialize(model: M.Transformer, indices: list) -> list[nn.Module]:
    """Compact per-layer FFNs (MLP.select: gathered rows/columns, smaller matmuls) to pass as `mlps=`.

    A None entry, or an index set holding every neuron, keeps that layer's original dense MLP."""
    if len(indices) != model.config.n_layer:
        raise M.UserError(f"{len(indices)} index sets for a model with {model.config.n_layer} layers")
    out = []
    for blk, idx in zip(model.layers, indices):
        if idx is None or len(idx) == blk.mlp.n_neurons:
            out.append(blk.mlp)
        else:
            out.append(blk.mlp.select(idx))
    return out


class MaskedMLP(nn.Module):
    """reference: no speedup. The same expert as a 0/1 mask over the full FFN's activations (for teaching and
    for the equivalence test: it must equal the compact `materialize`d MLP)."""

    def __init__(self, mlp: M.MLP, idx: torch.Tensor):
        super().__init__()
        self.mlp = mlp
        mask = torch.zeros(mlp.n_neurons, dtype=mlp.up.weight.dtype, device=mlp.up.weight.device)
        mask[idx] = 1
        self.register_buffer("mask", mask)  # (F,)

    def forward(self, x):
        return self.mlp.project(self.mlp.neurons(x) * self.mask)


def active_fraction(indices: list, model: M.Transformer) -> float:
    """Fraction of the model's FFN neurons an index set keeps (None = dense layer)."""
    F_ = model.config.n_ffn
    kept = sum(F_ if idx is None else len(idx) for idx in indices)
    return kept / (F_ * model.config.n_layer)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / max(1, len(sa | sb))


# --- the experts file

def _content_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode() + str(t.dtype).encode() + str(list(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_experts(path, experts: dict[str, list[torch.Tensor]], meta: dict, baselines: dict | None = None,
                 stats: dict[str, dict] | None = None):
    """Write one safetensors file: "{domain}.{layer}", "baseline.{name}.{layer}" (int64 sorted indices),
    "stats.{domain}.{stat}" (float32 (L, F)); metadata "free_moe" = JSON (meta + domains + checksum)."""
    tensors = {}
    for d, idxs in experts.items():
        for l, idx in enumerate(idxs):
            tensors[f"{d}.{l}"] = torch.as_tensor(idx, dtype=torch.int64)
    for b, idxs in (baselines or {}).items():
        for l, idx in enumerate(idxs):
            tensors[f"baseline.{b}.{l}"] = torch.as_tensor(idx, dtype=torch.int64)
    for d, st in (stats or {}).items():
        for k, v in st.items():
            tensors[f"stats.{d}.{k}"] = v if k == "count" else v.float()
    meta = dict(meta, format=EXPERTS_FORMAT, domains=list(experts), baselines=list(baselines or {}),
                stats_domains=list(stats or {}), content_sha256=_content_hash(tensors))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    M.write_safetensors(path, tensors, {"free_moe": json.dumps(meta)})


@dataclass
class Experts:
    """A loaded experts file, validated against `model`. `.mlps(name)` gives compact per-layer FFNs:
    a domain name -> that domain's DSS-Expert; otherwise a stored baseline (random, magnitude, mixed, and the
    general-text Wanda baseline as "baseline.general" since "general" names the general-domain expert)."""
    domains: list[str]
    indices: dict[str, list[torch.Tensor]]
    meta: dict
    baselines: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    stats: dict[str, dict] = field(default_factory=dict)
    model: M.Transformer | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def index_sets(self, name: str) -> list[torch.Tensor]:
        if name in self.indices:
            return self.indices[name]
        key = name.removeprefix("baseline.")
        if key in self.baselines:
            return self.baselines[key]
        raise M.UserError(f"experts file has no expert or baseline {name!r} "
                          f"(domains: {', '.join(self.domains)}; baselines: {', '.join(self.baselines) or 'none'})")

    def mlps(self, name: str) -> list[nn.Module]:
        if name not in self._cache:
            self._cache[name] = materialize(self.model, self.index_sets(name))
        return self._cache[name]

    @property
    def active_fraction(self) -> float:
        return sum(active_fraction(self.indices[d], self.model) for d in self.domains) / len(self.domains)


def load_experts(path, model: M.Transformer) -> Experts:
    """Read and validate an experts file against `model`: format, fingerprint, layer count, width, every index
    set (1-D, sorted, unique, in range, all layers present) and the content checksum. A mismatch is a UserError."""
    path = Path(path)
    if not path.exists():
        raise M.UserError(f"experts file {path} does not exist (run purify.py first)")
    try:
        tensors, md = M.read_safetensors(path, with_metadata=True)
    except M.UserError:
        raise
    except Exception as e:  # a damaged file can fail in many ways inside the parser
        raise M.UserError(f"{path}: not a readable experts file ({type(e).__name__}: {e})") from None
    try:
        meta = json.loads(md["free_moe"])
    except (KeyError, json.JSONDecodeError):
        raise M.UserError(f"{path}: no free-moe metadata (not an experts file from purify.py)") from None
    if meta.get("format") != EXPERTS_FORMAT:
        raise M.UserError(f"{path}: format {meta.get('format')!r}, expected {EXPERTS_FORMAT!r}")
    cfg = model.config
    if meta.get("fingerprint") != model.fingerprint:
        raise M.UserError(f"{path}: built for model fingerprint {meta.get('fingerprint')}, but the loaded model is "
                          f"{model.fingerprint} ({cfg.name}); re-run purify.py for this model")
    if meta.get("n_layer") != cfg.n_layer or meta.get("n_ffn") != cfg.n_ffn:
        raise M.UserError(f"{path}: built for {meta.get('n_layer')} layers x {meta.get('n_ffn')} neurons, "
                          f"model has {cfg.n_layer} x {cfg.n_ffn}")
    if _content_hash(tensors) != meta.get("content_sha256"):
        raise M.UserError(f"{path}: checksum mismatch: the file is corrupted or was edited")

    def index_list(prefix: str) -> list[torch.Tensor]:
        out = []
        for l in range(cfg.n_layer):
            t = tensors.get(f"{prefix}.{l}")
            if t is None:
                raise M.UserError(f"{path}: missing index set {prefix}.{l}")
            if t.dtype != torch.int64 or t.ndim != 1 or len(t) == 0:
                raise M.UserError(f"{path}: index set {prefix}.{l} must be non-empty 1-D int64")
            if int(t.min()) < 0 or int(t.max()) >= cfg.n_ffn or not bool((t[1:] > t[:-1]).all()):
                raise M.UserError(f"{path}: index set {prefix}.{l} is not sorted unique indices in [0, {cfg.n_ffn})")
            out.append(t.clone())
        return out

    indices = {d: index_list(d) for d in meta["domains"]}
    baselines = {b: index_list(f"baseline.{b}") for b in meta.get("baselines", [])}
    stats = {}
    for d in meta.get("stats_domains", []):
        st = {k: tensors.get(f"stats.{d}.{k}") for k in STATS + ("count",)}
        missing = [k for k, v in st.items() if v is None]
        if missing:
            raise M.UserError(f"{path}: statistics of {d} lack {', '.join(missing)}")
        for k in STATS:
            if tuple(st[k].shape) != (cfg.n_layer, cfg.n_ffn):
                raise M.UserError(f"{path}: stats.{d}.{k} has shape {tuple(st[k].shape)}, "
                                  f"expected {(cfg.n_layer, cfg.n_ffn)}")
        stats[d] = {k: v.clone() for k, v in st.items()}
    return Experts(list(meta["domains"]), indices, meta, baselines, stats, model)


def baseline_indices(method: str, model: M.Transformer, stats, keep, seed: int = 0,
                     protect: float | None = None) -> list[torch.Tensor]:
    """A baseline's index sets at ANY keep, rebuilt from saved statistics (`stats`: an experts file path, an
    Experts, or {domain: stats}). protect: super-neuron factor (None = the one the file was built with)."""
    if isinstance(stats, (str, Path)):
        stats = load_experts(stats, model)
    if isinstance(stats, Experts):
        if protect is None:
            protect = float(stats.meta.get("protect", PROTECT_FACTOR))
        stats = stats.stats
    if method not in BASELINES:
        raise M.UserError(f"unknown baseline {method!r} (expected one of {', '.join(BASELINES)})")
    protect = PROTECT_FACTOR if protect is None else protect
    mask = super_neurons(stats, protect) if stats else None
    return select_neurons(score_neurons(stats, model, method, seed=seed), keep, mask)


# ----------------------------------------------------------------------------- DOWP step 7: perplexity

@torch.no_grad()
def perplexity(model: M.Transformer, windows: torch.Tensor, mlps=None, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over all windows (N, T); every position but the first of a window is predicted."""
    device = model.tok_emb.weight.device
    total, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x = windows[i:i + batch_size].to(device)  # (B, T)
        logits = model(x, mlps=mlps)  # (B, T, V)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        n += x[:, 1:].numel()
    return math.exp(total / n)
