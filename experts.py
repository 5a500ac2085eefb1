"""experts.py — the DSS-Expert: an index set over a model's FFN neurons, its file, and the FFNs it runs.

Used by every stage after purify.py (which writes the file): train_router.py, router.py, evaluate.py, bench.py,
purify_sweep.py. A DSS-Expert is per layer l the sorted indices of the FFN neurons it keeps; nothing else.

    materialize(model, indices)      compact per-layer FFNs (MLP.select: gathered rows and columns, real savings)
    MaskedMLP                        the same expert as a 0/1 mask over the full FFN (reference: no speedup)
    kept_fraction, jaccard           how much of the FFN an index set keeps; overlap of two index sets
    save_experts / load_experts      the experts file (below); `Experts` is what load_experts returns
    experts_identity                 a content hash of the experts: a router is only valid for the experts it saw
    baseline_indices                 a one-mask baseline at ANY keep, rebuilt from the statistics in the file
    export_hf                        one expert as an ordinary HF checkpoint (intermediate_size = k)

The experts file (safetensors): "{domain}.{layer}" int64 sorted kept indices per expert; "baseline.{name}.{layer}"
for the baselines at the same budget; "stats.{domain}.{stat}" float32 (L, F) neuron statistics (dowp.STATS), so any
baseline can be rebuilt at any keep; metadata "free_moe" = JSON (model fingerprint, n_layer, n_ffn, domains,
score, keep, token counts, format, content checksum). Loading checks all of it against the model.

Shape legend: L layers, F FFN neurons, k kept neurons, C width.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

import checkpoints as ckpt
import gguf_file
import model as M
from cli import UserError
from dowp import BASELINES, PROTECT_FACTOR, STATS, score_neurons, select_neurons, super_neurons
from tokenizer import hf_tokenizer_files

EXPERTS_FORMAT = "free-moe-experts/1"

def materialize(model: M.Transformer, indices: list) -> list[nn.Module]:
    """Compact per-layer FFNs (MLP.select: gathered rows/columns, smaller matmuls) to pass as `mlps=`.

    A None entry, or an index set holding every neuron, keeps that layer's original dense MLP."""
    if len(indices) != model.config.n_layer:
        raise UserError(f"{len(indices)} index sets for a model with {model.config.n_layer} layers")
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


def kept_fraction(indices: list, model: M.Transformer) -> float:
    """Fraction of the model's FFN neurons an index set keeps (None = dense layer)."""
    F_ = model.config.n_ffn
    kept = sum(F_ if idx is None else len(idx) for idx in indices)
    return kept / (F_ * model.config.n_layer)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / max(1, len(sa | sb))


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
            tensors[f"stats.{d}.{k}"] = v.reshape(1) if k == "count" else v.float()  # safetensors: no 0-d
    meta = dict(meta, format=EXPERTS_FORMAT, domains=list(experts), baselines=list(baselines or {}),
                stats_domains=list(stats or {}), content_sha256=ckpt.content_sha256(tensors))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_safetensors(path, tensors, {"free_moe": json.dumps(meta)})


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
        raise UserError(f"experts file has no expert or baseline {name!r} "
                          f"(domains: {', '.join(self.domains)}; baselines: {', '.join(self.baselines) or 'none'})")

    def mlps(self, name: str) -> list[nn.Module]:
        if name not in self._cache:
            self._cache[name] = materialize(self.model, self.index_sets(name))
        return self._cache[name]


def load_experts(path, model: M.Transformer) -> Experts:
    """Read and validate an experts file against `model`: format, fingerprint, layer count, width, every index
    set (1-D, sorted, unique, in range, all layers present) and the content checksum. A mismatch is a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"experts file {path} does not exist (run purify.py first)")
    try:
        tensors, md = ckpt.read_safetensors(path, with_metadata=True)
    except UserError:
        raise
    except Exception as e:  # a damaged file can fail in many ways inside the parser
        raise UserError(f"{path}: not a readable experts file ({type(e).__name__}: {e})") from None
    try:
        meta = json.loads(md["free_moe"])
    except (KeyError, json.JSONDecodeError):
        raise UserError(f"{path}: no free-moe metadata (not an experts file from purify.py)") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: free-moe metadata is a JSON {type(meta).__name__}, expected an object")
    if meta.get("format") != EXPERTS_FORMAT:
        raise UserError(f"{path}: format {meta.get('format')!r}, expected {EXPERTS_FORMAT!r}")
    cfg = model.config
    if meta.get("fingerprint") != model.fingerprint:
        raise UserError(f"{path}: built for model fingerprint {meta.get('fingerprint')}, but the loaded model is "
                          f"{model.fingerprint} ({cfg.name}); re-run purify.py for this model")
    if meta.get("n_layer") != cfg.n_layer or meta.get("n_ffn") != cfg.n_ffn:
        raise UserError(f"{path}: built for {meta.get('n_layer')} layers x {meta.get('n_ffn')} neurons, "
                          f"model has {cfg.n_layer} x {cfg.n_ffn}")
    if ckpt.content_sha256(tensors) != meta.get("content_sha256"):
        raise UserError(f"{path}: checksum mismatch: the file is corrupted or was edited")
    for k in ("domains", "baselines", "stats_domains"):  # the names the tensors are looked up by
        names = meta.get(k, [] if k != "domains" else None)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or (k == "domains" and not names):
            raise UserError(f"{path}: free-moe metadata {k!r} is {names!r}, expected a list of names")

    def index_list(prefix: str) -> list[torch.Tensor]:
        out = []
        for l in range(cfg.n_layer):
            t = tensors.get(f"{prefix}.{l}")
            if t is None:
                raise UserError(f"{path}: missing index set {prefix}.{l}")
            if t.dtype != torch.int64 or t.ndim != 1 or len(t) == 0:
                raise UserError(f"{path}: index set {prefix}.{l} must be non-empty 1-D int64")
            if int(t.min()) < 0 or int(t.max()) >= cfg.n_ffn or not bool((t[1:] > t[:-1]).all()):
                raise UserError(f"{path}: index set {prefix}.{l} is not sorted unique indices in [0, {cfg.n_ffn})")
            out.append(t.clone())
        return out

    indices = {d: index_list(d) for d in meta["domains"]}
    baselines = {b: index_list(f"baseline.{b}") for b in meta.get("baselines", [])}
    stats = {}
    for d in meta.get("stats_domains", []):
        st = {k: tensors.get(f"stats.{d}.{k}") for k in STATS + ("count",)}
        missing = [k for k, v in st.items() if v is None]
        if missing:
            raise UserError(f"{path}: statistics of {d} lack {', '.join(missing)}")
        for k in STATS:
            if tuple(st[k].shape) != (cfg.n_layer, cfg.n_ffn):
                raise UserError(f"{path}: stats.{d}.{k} has shape {tuple(st[k].shape)}, "
                                  f"expected {(cfg.n_layer, cfg.n_ffn)}")
        stats[d] = {k: v.clone().reshape(()) if k == "count" else v.clone() for k, v in st.items()}
    return Experts(list(meta["domains"]), indices, meta, baselines, stats, model)


def baseline_indices(method: str, model: M.Transformer, stats, keep, seed: int = 0,
                     protect_factor: float | None = None) -> list[torch.Tensor]:
    """A baseline's index sets at ANY keep, rebuilt from saved statistics (`stats`: an experts file path, an
    Experts, or {domain: stats}). protect_factor: super-neuron factor (None = the one the file was built with)."""
    if isinstance(stats, (str, Path)):
        stats = load_experts(stats, model)
    if isinstance(stats, Experts):
        if protect_factor is None:
            protect_factor = float(stats.meta.get("protect", PROTECT_FACTOR))
        stats = stats.stats
    if method not in BASELINES:
        raise UserError(f"unknown baseline {method!r} (expected one of {', '.join(BASELINES)})")
    protect_factor = PROTECT_FACTOR if protect_factor is None else protect_factor
    protected = super_neurons(stats, protect_factor) if stats else None
    return select_neurons(score_neurons(stats, model, method, seed=seed), keep, protected)


# ----------------------------------------------------------------------------- DOWP step 6: export

def hf_state_dict(model: M.Transformer, mlps: list[M.MLP], dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Our weights, with the given per-layer FFNs in place of the dense ones, under HF names (checkpoints.to_hf)."""
    sd = {k: v for k, v in model.state_dict().items() if ".mlp." not in k}
    for i, mlp in enumerate(mlps):
        sd.update({f"layers.{i}.mlp.{k}": v for k, v in mlp.state_dict().items()})
    return ckpt.to_hf({k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}, model.config)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model")
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(model: M.Transformer, indices: list[torch.Tensor], out_dir, tokenizer_dir=None, meta: dict | None = None,
              tokenizer_files: dict[str, str] | None = None, dtype: str | None = None) -> dict:
    """DOWP step 6: write one expert as a plain HF checkpoint: config.json (intermediate_size = k) +
    model.safetensors in `dtype` (default: the precision the source checkpoint stores, model.source_dtype;
    bfloat16 for a quantized GGUF), plus tokenizer files copied from `tokenizer_dir`, or written from
    `tokenizer_files` ({name: text}, e.g. tokenizer.hf_tokenizer_files of a GGUF), when given (else none: the
    checkpoint then loads in transformers with a tokenizer from elsewhere, and in model.load_model not at all).
    Returns {"tokenizer_files": [...], "dtype": ..., "bytes": size of model.safetensors}."""
    dtype = dtype or getattr(model, "source_dtype", "float32")
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    ks = sorted({model.config.n_ffn if i is None else len(i) for i in indices})
    if len(ks) != 1:
        raise UserError(f"export needs the same number of kept neurons in every layer (HF has one "
                        f"intermediate_size), got {ks[0]}..{ks[-1]}; use uniform allocation")
    cfg = M.Config(**{**asdict(model.config), "n_ffn": ks[0]})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = ckpt.config_to_hf(cfg)
    hf["torch_dtype"] = dtype
    hf["free_moe"] = meta or {}
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    weights = out_dir / "model.safetensors"
    ckpt.write_safetensors(weights, hf_state_dict(model, materialize(model, indices), EXPORT_DTYPES[dtype]),
                           {"format": "pt"})
    copied = []
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
                copied.append(name)
    for name, text in (tokenizer_files or {}).items():
        if name not in copied:
            (out_dir / name).write_text(text, encoding="utf-8")
            copied.append(name)
    return {"tokenizer_files": copied, "dtype": dtype, "bytes": weights.stat().st_size}


def gguf_tokenizer_files(path) -> dict[str, str]:
    """HF tokenizer files for an export from a GGUF model (byte-level BPE vocabularies; none for SentencePiece)."""
    meta, _ = gguf_file.read_gguf(Path(path), tensors=False)
    try:
        return hf_tokenizer_files(meta)
    except UserError:
        return {}


def index_hash(indices: list) -> str:
    return ckpt.content_sha256({str(l): torch.as_tensor(i) for l, i in enumerate(indices) if i is not None})[:16]


def experts_identity(experts) -> str:
    """Identity of a set of DSS-Experts: sha256 over the domain names and every kept-index tensor.

    It hashes the content rather than the file bytes, so the same experts saved twice (or moved) match, and any
    change of a single index does not. A router is only valid for the experts it was trained with."""
    h = hashlib.sha256()
    for d in experts.domains:
        h.update(d.encode() + b"\0")
        for idx in experts.indices[d]:
            kept = b"dense" if idx is None else torch.as_tensor(idx, dtype=torch.int64).cpu().numpy().tobytes()
            h.update(kept + b";")
    return h.hexdigest()[:16]
