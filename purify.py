"""purify.py — DOWP from the command line: score every FFN neuron per domain, keep the relevant ones, and save the
kept index sets as DSS-Experts (Domain-Specific Subnetwork Experts) that really run faster.

Pipeline position: the second stage
    generate.py / model.py  ->  purify.py (DOWP, DSS-Experts)  ->  train_router.py  ->  evaluate.py

What goes in:  a model (--model, default SmolLM2-135M-Instruct GGUF) and one text source per domain: the built-in
               general / code / math / knowledge corpora (data.py), or your own files with --domain NAME=path.
What comes out (under --out, default experts/):
    experts.safetensors   the DSS-Experts, the one-mask baselines at the same budget and the neuron statistics
                          (the file format is in experts.py's docstring)
    stats.{domain}.safetensors   the statistics of one domain, reused by a re-run (a killed run resumes)
    report.md / report.json      cross-domain perplexity matrix, per-layer Jaccard overlap, protected neurons
    report.rows.json             the matrix's finished cells (a killed report resumes)
    report.png                   the perplexity matrix as a heatmap (--plot, only if matplotlib is installed)

    python purify.py --domains general code math knowledge --keep 0.5 --out experts/
    python purify.py --keep 0.5 --domain legal=my_contracts.txt --out experts_legal/
    python purify.py --keep 0.5 --export exported/code --export-domain code

The method, step by step (the library functions live in dowp.py, search.py and experts.py):
    DOWP step 1  domain calibration: token windows per domain (data.load_domain_tokens); a held-out split is kept
                 apart for the report only
    DOWP step 2  statistics (dowp.collect_stats, cached per domain here); with --score taylor also the loss-aware
                 pass (dowp.loss_aware_stats)
    DOWP step 3  scores (dowp.score_neurons: dowp, taylor, and the baselines)
    DOWP step 4  budget: --keep per layer (uniform or --alloc sensitivity), or --auto threshold|greedy chosen by the
                 loss on the last quarter of the calibration windows (search.py); super neurons always kept
    DOWP step 5  DSS-Experts: the kept index sets, saved (experts.save_experts); experts.materialize turns them
                 into compact MLPs whose matmuls are (k, C) and (C, k): real compute savings, not masks
    DOWP step 6  --export: one expert as an ordinary HF checkpoint (intermediate_size = k) that transformers loads
    DOWP step 7  report: perplexity of every expert and baseline on every domain's held-out text (scoring.perplexity:
                 exp of the mean next-token NLL over non-overlapping windows of --seq-len tokens)

Shape legend: B batch, T time, C width, L layers, F FFN neurons, D domains, k kept neurons, N windows.
"""
from __future__ import annotations

import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch

import data
import model as M
from cache import RowCache, load_tensors, save_tensors
from cli import (ArgumentParser, DefaultsHelpFormatter, UserError, add_common_args, fraction, int_at_least,
                 locked_dir, markdown_table, nonneg_float, out_dir, positive_int, progress, pyplot, run_cli,
                 save_figure, write_atomic)
from dowp import (BASELINES, DEFAULT_CONTRAST, PROTECT_FACTOR, SCORES, STATS, allocate_keep, collect_stats,
                  loss_aware_stats, score_neurons, score_random, select_above, select_neurons, super_neurons)
from experts import (EXPORT_DTYPES, export_hf, gguf_tokenizer_files, index_hash, jaccard, kept_fraction, materialize,
                     save_experts)
from scoring import perplexity
from search import auto_threshold, greedy_layers, layer_sensitivity


# ----------------------------------------------------------------------------- DOWP step 2: statistics, cached

def load_or_collect_stats(model, windows, spec: str, out_dir: Path, batch_size: int, key: dict) -> dict:
    """Statistics of one domain, cached in out_dir/stats.{name}.safetensors: a re-run with the same model, data
    and budget reuses them (so a killed run resumes after the last finished domain)."""
    name = data.parse_domain(spec)[0]
    path = out_dir / f"stats.{name}.safetensors"
    cached = load_tensors(path, key)  # checksummed: a damaged cache would silently change every expert built from it
    shape = (model.config.n_layer, model.config.n_ffn)
    if (cached is not None and all(k in cached for k in STATS + ("count",))
            and all(tuple(cached[k].shape) == shape for k in STATS)):
        return {k: cached[k].reshape(()) if k == "count" else cached[k] for k in STATS + ("count",)}
    t0 = time.perf_counter()
    stats = collect_stats(model, windows, batch_size, desc=f"stats {name}")
    print(f"stats {name}: {int(stats['count'])} tokens in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    save_tensors(path, key, {**stats, "count": stats["count"].reshape(1)})
    return stats


# ----------------------------------------------------------------------------- DOWP step 7: report

def matrix_markdown(matrix: dict[str, dict[str, float]], domains: list[str], fractions: dict[str, float]) -> str:
    """Rows = systems, columns = held-out domains; the best non-dense value of each column in bold."""
    best = {d: min(v[d] for r, v in matrix.items() if r != "dense") for d in domains}
    rows = []
    for r, v in matrix.items():
        cells = [f"**{v[d]:.2f}**" if r != "dense" and v[d] == best[d] else f"{v[d]:.2f}" for d in domains]
        rows.append([r, f"{fractions[r]:.3f}"] + cells)
    return markdown_table(["system \\ held-out", "active FFN"] + domains, rows)


def plot_matrix(matrix: dict, domains: list[str], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    names = list(matrix)
    vals = torch.tensor([[math.log(matrix[r][d]) for d in domains] for r in names])
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(domains), 1 + 0.45 * len(names)))
    ax.imshow(vals.numpy(), cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(domains)), domains)
    ax.set_yticks(range(len(names)), names)
    for i, r in enumerate(names):
        for j, d in enumerate(domains):
            ax.text(j, i, f"{matrix[r][d]:.1f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title("held-out perplexity (columns) of each expert / baseline (rows)")
    return save_figure(fig, path, dpi=120)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    p = ArgumentParser(description="DOWP: purify FFN neurons per domain into DSS-Experts.",
                       formatter_class=DefaultsHelpFormatter)
    add_common_args(p, out_default="experts")
    data.add_domains_arg(p)
    p.add_argument("--domain", action="append", default=[], metavar="NAME=PATH",
                   help="an extra user domain (repeatable)")
    p.add_argument("--keep", type=fraction, default=0.5, help="fraction of FFN neurons kept (per layer, or on average)")
    p.add_argument("--alloc", choices=("uniform", "sensitivity"), default="uniform",
                   help="per-layer budget: the same keep everywhere, or more for layers measured to be sensitive")
    p.add_argument("--auto", choices=("threshold", "greedy"), default=None,
                   help="instead of --keep/--alloc: choose what to remove by the loss on a quarter of the "
                        "calibration text (see the docstring)")
    p.add_argument("--score", choices=SCORES, default="dowp", help="score used to build the domain experts")
    p.add_argument("--contrast", type=float, default=DEFAULT_CONTRAST, help="DOWP contrast lambda (0 = plain Wanda)")
    p.add_argument("--sweep-contrast", type=float, nargs="*", default=None, metavar="LAM",
                   help="also report the perplexity matrix of the domain experts for each of these lambdas")
    p.add_argument("--protect", type=nonneg_float, default=PROTECT_FACTOR,
                   help="super neurons: max|a| > this x layer median are always kept (0 = off)")
    p.add_argument("--tokens", type=positive_int, default=32768, help="calibration tokens per domain")
    p.add_argument("--heldout-tokens", type=positive_int, default=16384,
                   help="held-out tokens per domain for the report")
    p.add_argument("--seq-len", type=int_at_least(2), default=512, help="tokens per window")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    p.add_argument("--no-report", action="store_true", help="skip the perplexity report")
    p.add_argument("--plot", action="store_true", help="also write report.png (needs matplotlib)")
    p.add_argument("--export", type=out_dir, default=None, metavar="DIR",
                   help="write one domain expert as an HF checkpoint here")
    p.add_argument("--export-domain", default=None, help="which domain to export (default: the first)")
    p.add_argument("--export-dtype", choices=("auto", *EXPORT_DTYPES), default="auto",
                   help="precision of the exported weights; auto = what the source checkpoint stores (bfloat16 for a "
                        "quantized GGUF)")
    args = p.parse_args(argv)
    if args.auto and args.alloc != "uniform":
        raise UserError("--auto chooses the budget itself; it does not combine with --alloc")
    if args.tokens < args.seq_len or args.heldout_tokens < args.seq_len:
        raise UserError(f"--tokens/--heldout-tokens must be at least --seq-len ({args.seq_len})")
    by_name = data.domain_specs(list(args.domains) + list(args.domain))  # every name and path checked, nothing loaded
    specs, names = list(by_name.values()), list(by_name)
    if args.export_domain is not None and args.export_domain not in names:
        raise UserError(f"--export-domain {args.export_domain!r} is not one of the domains {names}")
    args.specs, args.names = specs, names
    return args


def build_experts(stats, model, names, score, keep, contrast, protected, seed):
    return {d: select_neurons(score_neurons(stats, model, score, d, contrast, seed), keep, protected) for d in names}


def main(argv=None):
    args = parse_args(argv)
    with locked_dir(args.out, "another purify.py run"):  # two runs on one --out would overwrite each other's files
        run(args)


def run(args):
    out_dir = Path(args.out)
    model, tok = M.load_for_cli(args)
    cfg = model.config

    # DOWP step 1: calibration windows (and held-out windows, kept apart, for the report)
    calib = {n: data.load_domain_tokens(s, tok, args.data_dir, "calib", args.tokens, args.seed, args.seq_len)
             for n, s in zip(args.names, args.specs)}
    val = {}  # --auto: the last quarter of each domain's calibration windows chooses the threshold, the rest scores
    if args.auto:
        if min(len(w) for w in calib.values()) < 2:
            raise UserError(f"--auto needs at least 2 calibration windows per domain (--tokens >= {2 * args.seq_len})")
        val = {n: w[len(w) - max(1, len(w) // 4):] for n, w in calib.items()}
        calib = {n: w[:len(w) - len(val[n])] for n, w in calib.items()}
    # DOWP step 2: statistics, one streamed pass per domain (cached per domain)
    stats = domain_statistics(args, model, calib, out_dir)

    # DOWP step 4: protection and budget
    protected = super_neurons(stats, args.protect)  # (L, F) bool: the super neurons every method keeps
    n_protected = int(protected.sum())
    print(f"protected super neurons: {n_protected} "
          f"({', '.join(f'L{l}:{int(c)}' for l, c in enumerate(protected.sum(1)) if c)})", file=sys.stderr)
    keep = args.keep
    sens = None
    if args.alloc == "sensitivity":
        probe = torch.cat([w[:2] for w in calib.values()])  # (2D, T) a little of every domain
        sens = layer_sensitivity(model, probe, score_neurons(stats, model, "mixed"), args.keep, protected,
                                 args.batch_size)
        keep = allocate_keep(sens, args.keep)

    # DOWP step 3 + 5: scores -> DSS-Experts; baselines at the same per-layer budget
    auto = {}
    if args.auto:  # chosen per domain on that domain's validation windows
        experts, auto = auto_experts(args, model, stats, val, protected)
        keep = sum(kept_fraction(e, model) for e in experts.values()) / len(experts)  # baselines: the mean budget
    else:
        experts = build_experts(stats, model, args.names, args.score, keep, args.contrast, protected, args.seed)
    baselines = {b: select_neurons(score_neurons(stats, model, b, seed=args.seed), keep, protected)
                 for b in BASELINES if b != "general" or "general" in stats}
    meta = {"fingerprint": model.fingerprint, "model": cfg.name, "n_layer": cfg.n_layer, "n_ffn": cfg.n_ffn,
            "score": args.score, "contrast": args.contrast, "keep": keep if args.auto else args.keep,
            "alloc": f"auto {args.auto}" if args.auto else args.alloc, "auto": auto,
            "keep_per_layer": keep if isinstance(keep, list) else [keep] * cfg.n_layer,
            "protect": args.protect, "n_protected": n_protected, "seed": args.seed, "seq_len": args.seq_len,
            "domain_specs": dict(zip(args.names, args.specs)),
            "tokens": {n: int(stats[n]["count"]) for n in args.names},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    experts_path = out_dir / "experts.safetensors"
    save_experts(experts_path, experts, meta, baselines, stats)
    print(f"wrote {experts_path}: {len(experts)} experts, active FFN "
          f"{kept_fraction(next(iter(experts.values())), model):.3f}", file=sys.stderr)

    if args.export:  # DOWP step 6
        export_expert(args, model, experts, meta)

    if not args.no_report:
        report(args, model, tok, stats, experts, baselines, protected, keep, sens, meta, out_dir)


def domain_statistics(args, model, calib: dict[str, torch.Tensor], out_dir: Path) -> dict[str, dict]:
    """DOWP step 2: each domain's statistics (cached), and with --score taylor / taylor_abs the loss-aware pass."""
    stats = {}
    for n, s in zip(args.names, args.specs):
        key = {"fingerprint": model.fingerprint, "domain": s, "tokens": args.tokens, "seed": args.seed,
               "seq_len": args.seq_len, "n_windows": len(calib[n]),
               "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch.")}  # resolved: auto is bf16 or fp32
        stats[n] = load_or_collect_stats(model, calib[n], s, out_dir, args.batch_size, key)
        if args.score in ("taylor", "taylor_abs"):  # the loss-aware pass (a forward + backward per batch; not cached)
            t0 = time.perf_counter()
            stats[n]["taylor"] = loss_aware_stats(model, calib[n], max(1, args.batch_size // 4), desc=f"taylor {n}")[
                "taylor"]
            print(f"taylor {n}: {calib[n].numel()} tokens in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return stats


def auto_experts(args, model, stats: dict, val: dict[str, torch.Tensor], protected) -> tuple[dict, dict]:
    """--auto: each domain's expert chosen on its validation windows (one global threshold, or the greedy layer-wise
    search). Returns the experts and, per domain, what the search chose ({"threshold", "trials"} or {"trials"})."""
    experts, auto = {}, {}
    for d in args.names:
        scores = score_neurons(stats, model, args.score, d, args.contrast, args.seed)
        if args.auto == "threshold":
            tau, trials = auto_threshold(model, scores, val[d], protected, args.batch_size)
            experts[d], auto[d] = select_above(scores, tau, protected), {"threshold": tau, "trials": trials}
        else:
            experts[d], trials = greedy_layers(model, scores, val[d], protected, args.batch_size)
            auto[d] = {"trials": trials}
        print(f"auto {d}: removes {1 - kept_fraction(experts[d], model):.4f} of the neurons", file=sys.stderr)
    return experts, auto


def export_expert(args, model, experts: dict, meta: dict):
    """DOWP step 6: --export-domain's expert as an HF checkpoint, with the tokenizer of --model beside it."""
    d = args.export_domain or args.names[0]
    tok_dir, tok_files = None, None
    path = M.default_model_path() if args.model is None else Path(args.model)
    if path.is_dir():
        tok_dir = path
    elif path.suffix == ".gguf" and path.is_file():  # the tokenizer lives inside the GGUF: write it out
        tok_files = gguf_tokenizer_files(path)
    info = export_hf(model, experts[d], args.export, tok_dir, {"domain": d, **meta}, tok_files,
                     None if args.export_dtype == "auto" else args.export_dtype)
    print(f"exported expert {d} to {args.export}: model.safetensors {info['bytes'] / 1e6:.0f} MB in "
          f"{info['dtype']}; tokenizer files: {', '.join(info['tokenizer_files']) or 'none'}", file=sys.stderr)


def report(args, model, tok, stats, experts, baselines, protected, keep, sens, meta, out_dir: Path):
    """DOWP step 7: cross-domain perplexity matrix, expert overlap, protection ablation; markdown + JSON."""
    names = args.names
    heldout = {n: data.load_domain_tokens(s, tok, args.data_dir, "heldout", args.heldout_tokens, 0, args.seq_len)
               for n, s in zip(args.names, args.specs)}
    cache = RowCache(out_dir / "report.rows.json", {"fingerprint": model.fingerprint, "specs": args.specs,
                                                    "heldout_tokens": args.heldout_tokens, "seq_len": args.seq_len})

    def ppl_row(indices, domains) -> dict[str, float]:  # {domain: perplexity}, each cell cached as it finishes
        mlps = []
        def cell(d):
            if not mlps:
                mlps.append(materialize(model, indices))
            return perplexity(model, heldout[d], mlps[0], bs)
        return {d: cache.get(f"{index_hash(indices)}|{d}", lambda: cell(d)) for d in domains}

    bs = args.batch_size
    systems = {f"expert:{d}": experts[d] for d in names}
    systems["dense"] = [None] * model.config.n_layer
    systems.update({f"baseline:{b}": idx for b, idx in baselines.items()})
    if args.protect > 0:  # the protection ablation: random at the same budget without its super neurons
        systems["baseline:random (unprotected)"] = select_neurons(score_random(model, args.seed), keep, None)
    # baselines and dense first: they do not depend on the DOWP knobs, so a re-run with another --contrast
    # finds them in the cache
    order = sorted(systems, key=lambda r: r.startswith("expert:"))
    done = {r: ppl_row(systems[r], names) for r in progress(order, desc="ppl matrix")}
    matrix = {r: done[r] for r in systems}  # (display order)
    fractions = {r: kept_fraction(idx, model) for r, idx in systems.items()}

    sweep = {}  # the contrast sweep scores each expert on its own domain only (D runs per lambda, not D x D)
    for contrast in args.sweep_contrast or []:
        ex = build_experts(stats, model, names, "dowp", keep, contrast, protected, args.seed)
        sweep[str(contrast)] = {d: ppl_row(ex[d], [d])[d] for d in names}

    L = model.config.n_layer
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    jac = {f"{a}|{b}": [jaccard(experts[a][l], experts[b][l]) for l in range(L)] for a, b in pairs}
    diag_ok = {d: all(matrix[f"expert:{d}"][d] < matrix[f"expert:{e}"][d] for e in names if e != d) for d in names}
    # "same" when the expert IS the baseline (at contrast 0 the general expert equals the general baseline)
    vs = lambda b: {d: "same" if index_hash(experts[d]) == index_hash(baselines[b]) else
                    matrix[f"expert:{d}"][d] < matrix[f"baseline:{b}"][d] for d in names}
    summary = {"diagonal_best": diag_ok, **{f"beats_{b}": vs(b) for b in baselines}}
    result = {"meta": meta, "heldout_tokens": {d: int(w.numel()) for d, w in heldout.items()},
              "matrix": matrix, "active_fraction": fractions, "summary": summary, "jaccard_per_layer": jac,
              "protected_per_layer": protected.sum(1).tolist(), "n_protected": int(protected.sum()),
              "contrast_sweep": sweep, "layer_sensitivity": sens.tolist() if sens is not None else None}
    write_atomic(out_dir / "report.json", json.dumps(result, indent=1))

    md = [f"# DOWP report: {meta['model']} (fingerprint {meta['fingerprint']})", "",
          f"score `{meta['score']}` (contrast λ = {meta['contrast']}), keep {meta['keep']} ({meta['alloc']}), "
          f"protect factor {meta['protect']} -> {result['n_protected']} super neurons always kept; "
          f"calibration tokens {meta['tokens']}; held-out tokens {result['heldout_tokens']}.", "",
          "## Held-out perplexity (rows: system, columns: held-out text; bold = best non-dense)", "",
          matrix_markdown(matrix, names, fractions), ""]
    yes_no = lambda v: v if isinstance(v, str) else "yes" if v else "NO"
    md += ["## Summary (expert of domain d vs the others / each baseline, on d's held-out text)", "",
           markdown_table(["check"] + names, [[k] + [yes_no(v[d]) for d in names] for k, v in summary.items()]), ""]
    if sweep:
        md += ["## Contrast sweep (each domain expert on its own held-out text; λ = 0 is plain Wanda per domain)", ""]
        rows = []
        for contrast, per in sweep.items():
            diag = [per[d] for d in names]
            rows.append([contrast] + diag + [math.exp(sum(map(math.log, diag)) / len(diag))])
        md += [markdown_table(["λ"] + [f"{d} on {d}" for d in names] + ["geo-mean"], rows), ""]
    md += ["## Expert overlap (Jaccard of kept sets, mean over layers)", ""]
    md += [markdown_table([""] + names, [[a] + [1.0 if a == b else sum(jac.get(f"{a}|{b}", jac.get(f"{b}|{a}", [0])))
                                                / L for b in names] for a in names]), ""]
    per_layer = [sum(v[l] for v in jac.values()) / max(1, len(jac)) for l in range(L)]
    md += ["Mean pairwise Jaccard per layer: " + " ".join(f"{v:.2f}" for v in per_layer), ""]
    md += ["Protected neurons per layer: " + ", ".join(f"L{l}: {c}" for l, c in
                                                        enumerate(result["protected_per_layer"]) if c), ""]
    if args.plot:
        md += ["![matrix](report.png)" if plot_matrix(matrix, names, out_dir / "report.png")
               else "(--plot: matplotlib is not installed, no PNG written)", ""]
    write_atomic(out_dir / "report.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    run_cli(main)