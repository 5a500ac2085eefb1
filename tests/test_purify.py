"""Tests for purify.py and purify_sweep.py, the DOWP command lines: on a tiny random Llama with the real tokenizer and
data, purify.py writes experts that load, reuses its cached statistics, exports a loadable expert, chooses thresholds
with --score taylor --auto; purify_sweep.py runs every score and budget, its check and --write-experts, reuses every
cached row, and summarises several draws; its weight-level masks remove the lowest-scoring weights of every row; a
bad flag is a one-line error. Slow tests use the real SmolLM2-135M model with small token budgets (one model load, one
statistics pass per domain for the whole module): each domain's expert is best on its own domain, DOWP beats the
random and magnitude baselines, and an exported expert matches transformers. Shape legend: N windows, T time,
L layers, F FFN neurons.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cache  # noqa: E402
import data  # noqa: E402
import checkpoints as ckpt  # noqa: E402
import model as M  # noqa: E402
import cli  # noqa: E402
import dowp  # noqa: E402
import experts as EX  # noqa: E402
import scoring as SC  # noqa: E402
from conftest import TINY, smol_hf_tokenizer, tiny_model, windows  # noqa: E402

SMOL_HF_TOK = smol_hf_tokenizer()


def test_weight_level_masks():
    import purify_sweep as S
    m, w = tiny_model(**TINY), windows()
    stats = dowp.collect_stats(m, w)
    sc = {"stats": stats, **dowp.loss_aware_stats(m, w, weights=True)}
    for method in S.WEIGHT_SCORES:
        scores = S.weight_scores(m, method, sc, 1)
        assert set(scores) == {"up", "gate", "down"}
        masked = S.weight_masked(m.layers[1].mlp, scores, 0.25)
        for name, s in scores.items():
            w0, w1 = getattr(m.layers[1].mlp, name).weight, getattr(masked, name).weight
            removed = w1 == 0
            assert (removed.sum(1) == round(0.25 * w0.shape[1])).all()  # the same fraction of every row
            assert torch.equal(w1[~removed], w0[~removed])  # kept weights keep their values
            lowest = torch.topk(s, round(0.25 * w0.shape[1]), dim=1, largest=False).indices
            assert removed.gather(1, lowest).all()  # and the removed ones are the lowest-scoring
        dense = [S.weight_masked(b.mlp, S.weight_scores(m, method, sc, l), 0.0) for l, b in enumerate(m.layers)]
        with torch.no_grad():
            assert torch.equal(m(w, mlps=dense), m(w))  # sparsity 0 is exactly dense
    wanda = S.weight_scores(m, "wanda", sc, 0)
    torch.testing.assert_close(wanda["down"], m.layers[0].mlp.down.weight.abs() * stats["mean_sq"][0].sqrt())
    nll = torch.tensor([1.0, 2.0, 3.0, 2.5])
    iv = SC.ppl_intervals(nll, nll)
    assert iv["delta"] == 0 and iv["delta_ci"] == [0, 0] and iv["ppl_ci"][0] <= iv["ppl"] <= iv["ppl_ci"][1]


# ============================================================================ the command lines

def test_cli_user_errors_are_one_line():
    for argv in (["--domains", "poetry"], ["--keep", "0"], ["--domain", "x=/no/such/file.txt"]):
        r = subprocess.run([sys.executable, str(REPO / "purify.py"), *argv], capture_output=True, text=True)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr


def local_domains(tmp_path) -> list[str]:
    """Two user domains from text that ships with the repository, so the command-line tests need no download:
    prose = the docs' paragraphs, python = the source files' blocks. Returns the --domains specs."""
    prose = "\n\n".join(p.read_text() for p in sorted((REPO / "docs").glob("*.md")))
    python = "\n\n".join(p.read_text() for p in sorted(REPO.glob("*.py")))
    (tmp_path / "prose.txt").write_text(prose)
    (tmp_path / "python.txt").write_text(python)
    return [f"prose={tmp_path / 'prose.txt'}", f"python={tmp_path / 'python.txt'}"]


def test_cli_end_to_end_on_tiny_model(tmp_path):
    """The whole script on a tiny random Llama with the real tokenizer, on the repository's own text: files written,
    experts load, a re-run reuses the cached statistics, the export loads."""
    if not SMOL_HF_TOK.exists():
        pytest.skip("needs the shared SmolLM2 tokenizer")
    m = tiny_model(vocab=49152, n_ffn=40, max_seq_len=512, name="tiny-cli")
    EX.export_hf(m, [None, None], tmp_path / "tiny", SMOL_HF_TOK)  # keep everything: a plain HF checkpoint
    out = tmp_path / "out"
    argv = [sys.executable, str(REPO / "purify.py"), "--model", str(tmp_path / "tiny"), "--domains",
            *local_domains(tmp_path), "--tokens", "256", "--heldout-tokens", "128", "--seq-len", "128", "--keep", "0.5",
            "--out", str(out), "--export", str(tmp_path / "exp"), "--export-domain", "python", "--plot"]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stats prose" in r.stderr
    model, _ = M.load_model(tmp_path / "tiny")
    ex = EX.load_experts(out / "experts.safetensors", model)
    assert ex.domains == ["prose", "python"] and set(ex.baselines) == set(dowp.BASELINES) - {"general"}
    assert all(EX.kept_fraction(ex.indices[d], m) == 0.5 for d in ex.domains)
    assert ex.meta["tokens"] == {"prose": 256, "python": 256}
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["matrix"]) >= {"expert:prose", "expert:python", "dense", "baseline:mixed"}
    if cli.pyplot() is not None:
        assert (out / "report.png").read_bytes()[:4] == b"\x89PNG" and "![matrix](report.png)" in (
            out / "report.md").read_text()
    assert all(v > 1 for row in rep["matrix"].values() for v in row.values())
    assert "| dense |" in (out / "report.md").read_text()
    r2 = subprocess.run(argv + ["--no-report"], capture_output=True, text=True)
    assert r2.returncode == 0 and "stats prose" not in r2.stderr  # statistics reused from the cache
    exported, _ = M.load_model(tmp_path / "exp")
    assert exported.config.n_ffn == 20
    w = windows(2, 16)
    with torch.no_grad():
        assert (exported(w) - model(w, mlps=ex.mlps("python"))).abs().max() <= 1e-5


@pytest.mark.slow  # about 25 s: every system of the sweep, then four more sweeps for the draws
def test_cli_taylor_auto_and_sweep_on_tiny_model(tmp_path):
    """purify.py --score taylor --auto writes loadable experts with the chosen thresholds; purify_sweep.py runs every
    score and budget, the check and --write-experts, and a re-run reuses every cached row."""
    if not SMOL_HF_TOK.exists():
        pytest.skip("needs the shared SmolLM2 tokenizer")
    EX.export_hf(tiny_model(vocab=49152, n_ffn=40, max_seq_len=512, name="tiny-cli"), [None, None], tmp_path / "tiny",
                 SMOL_HF_TOK)
    domains = local_domains(tmp_path)
    common = ["--model", str(tmp_path / "tiny"), "--domains", *domains, "--tokens", "512", "--seq-len", "128",
              "--threads", "1"]
    r = subprocess.run([sys.executable, str(REPO / "purify.py"), *common, "--score", "taylor", "--auto", "threshold",
                        "--no-report", "--out", str(tmp_path / "auto")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "taylor prose" in r.stderr and "auto python: removes" in r.stderr
    model, _ = M.load_model(tmp_path / "tiny")
    ex = EX.load_experts(tmp_path / "auto" / "experts.safetensors", model)
    assert ex.meta["alloc"] == "auto threshold" and set(ex.meta["auto"]) == {"prose", "python"}
    assert ex.meta["tokens"] == {"prose": 384, "python": 384}  # 3 of the 4 windows score, the 4th validates
    argv = [sys.executable, str(REPO / "purify_sweep.py"), *common, "--heldout-tokens", "256", "--keeps", "0.9",
            "--sparsities", "0.1", "--check-neurons", "4", "--check-lowest", "2", "--check-tokens", "128",
            "--frontier", "0.1", "--write-experts", "taylor:greedy", "frontier:0.1", "--plot",
            "--out", str(tmp_path / "sweep")]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "sweep" / "report.json").read_text())
    if cli.pyplot() is not None:  # matplotlib is a dev extra: with it, the plot is drawn
        assert (tmp_path / "sweep" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    systems = {"dense", "weight:wanda:0.1", "weight:taylor:0.1", "weight:taylor_abs:0.1", "weight:taylor:greedy",
               *(f"neuron:{s}:{k}" for s in ("dowp", "taylor") for k in ("0.9", "auto", "greedy")),
               "neuron:taylor_abs:0.9", "neuron:frontier:0.1"}  # greedy-task: only the domains with a task
    assert set(rep["table"]["python"]) == systems and rep["check"]["n_random"] == 4
    assert rep["table"]["python"]["neuron:taylor:0.9"]["active_fraction"] == 0.9
    rows = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    for name, row in rows.items():  # a greedy row keeps exactly the removals its accepted trials made
        if name.endswith(":greedy") and name.split("|")[1].startswith("neuron:"):
            accepted = sum(t["removed"] for t in row["trials"] if t["accepted"])
            assert accepted == sum(map(len, row["removed"].values())) == round((1 - row["active_fraction"]) * 80)
    frontier = rep["table"]["python"]["neuron:frontier:0.1"]  # 10% removed on top of the greedy removals
    greedy = rep["table"]["python"]["neuron:taylor:greedy"]  # the text is the repository's own: its removals vary
    assert frontier["active_fraction"] == pytest.approx(greedy["active_fraction"] - 0.1, abs=1 / 80)
    assert (tmp_path / "sweep" / "experts.frontier.0.1.safetensors").exists()
    if cli.pyplot() is not None:
        assert (tmp_path / "sweep" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "## Summary" in md and "## neuron:taylor:greedy on every domain's held-out text" in md
    ex = EX.load_experts(tmp_path / "sweep" / "experts.taylor.greedy.safetensors", model)
    assert ex.domains == ["prose", "python"] and set(ex.baselines) >= {"mixed", "random"}  # evaluate's baselines
    assert set(ex.stats) == {"prose", "python"} and ex.meta["domain_specs"]["python"] == domains[1]
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0 and "loss-aware pass" not in r.stderr and "exact removals" not in r.stderr
    # other held-out text: every row is measured again, but on the choices the searches made before
    saved = json.loads((tmp_path / "sweep" / "choices.json").read_text())
    choices = saved["rows"]
    assert choices["python|neuron:taylor:greedy"]["removed"] == rows["python|neuron:taylor:greedy"]["removed"]
    marked = {n: {**c, "trials": []} for n, c in choices.items()}  # a new search would have trials
    cache.save_rows(tmp_path / "sweep" / "choices.json", saved["key"], marked)  # checksummed, as the sweep writes it
    r = subprocess.run([*argv[:-1], str(tmp_path / "sweep"), "--heldout-tokens", "128"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads((tmp_path / "sweep" / "results.json").read_text())
    assert again["key"]["heldout_tokens"] == 128 and again["rows"]["python|dense"] != rows["python|dense"]
    for name, c in choices.items():
        assert again["rows"][name]["trials"] == [] and again["rows"][name].get("removed") == c.get("removed")
    # draws: one sweep per (size, draw) in its own folder, then how the result varies across draws
    r = subprocess.run([*argv[:2], *common[:-6], "--tokens", "256", "512", "--seq-len", "128", "--threads", "1",
                        "--heldout-tokens", "256", "--draws", "2", "--systems", "neuron:taylor:greedy",
                        "--check-neurons", "0", "--out", str(tmp_path / "draws")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "draws").iterdir() if p.is_dir())
    assert runs == ["tokens256.seed0", "tokens256.seed1", "tokens512.seed0", "tokens512.seed1"]
    assert not any(k.startswith("taylor_w.") for k in  # no weight-level system asked: no per-weight scores kept
                   ckpt.read_safetensors(tmp_path / "draws" / runs[0] / "scores.python.safetensors"))
    stab = json.loads((tmp_path / "draws" / "stability.json").read_text())["table"]
    assert set(stab) == {f"{t}|{d}|neuron:taylor:greedy" for t in (256, 512) for d in ("prose", "python")}
    one = stab["512|python|neuron:taylor:greedy"]
    deltas = [json.loads((tmp_path / "draws" / f"tokens512.seed{s}" / "report.json").read_text())["table"]["python"]
              ["neuron:taylor:greedy"]["delta"] for s in (0, 1)]
    assert one["draws"] == 2 and one["delta_mean"] == pytest.approx(sum(deltas) / 2)
    assert "| 512 | python | neuron:taylor:greedy |" in (tmp_path / "draws" / "stability.md").read_text()


# ============================================================================ real model (slow)

REAL_CALIB, REAL_HELDOUT, REAL_T = 4096, 512, 256  # tokens per domain: small, so the module stays cheap


@pytest.fixture(scope="module")
def real(real_model):
    model, tok = real_model  # tests/conftest.py
    stats = {d: dowp.collect_stats(model, data.load_domain_tokens(d, tok, n_tokens=REAL_CALIB, seq_len=REAL_T))
             for d in data.BUILTIN_DOMAINS}
    heldout = {d: data.load_domain_tokens(d, tok, split="heldout", n_tokens=REAL_HELDOUT, seq_len=REAL_T)
               for d in data.BUILTIN_DOMAINS}
    protect = dowp.super_neurons(stats)
    experts = {d: dowp.select_neurons(dowp.score_neurons(stats, model, "dowp", d), 0.5, protect)
               for d in data.BUILTIN_DOMAINS}
    return {"model": model, "tok": tok, "stats": stats, "heldout": heldout, "protect": protect, "experts": experts,
            "ppl": {}}


def real_ppl(real, name, indices, domain):
    """Perplexity of a system on a domain's held-out windows, memoised across the module's tests."""
    key = (name, domain)
    if key not in real["ppl"]:
        real["ppl"][key] = SC.perplexity(real["model"], real["heldout"][domain], EX.materialize(real["model"], indices))
    return real["ppl"][key]


@pytest.mark.slow
def test_real_domain_expert_is_best_on_its_own_domain(real):
    """keep=0.5: in each held-out column, the expert built for that domain has the lowest perplexity."""
    table = {(e, d): real_ppl(real, f"expert:{e}", real["experts"][e], d)
             for e in data.BUILTIN_DOMAINS for d in data.BUILTIN_DOMAINS}
    print("\n" + "\n".join(f"{e:>10}: " + " ".join(f"{table[e, d]:8.2f}" for d in data.BUILTIN_DOMAINS)
                           for e in data.BUILTIN_DOMAINS))
    for d in data.BUILTIN_DOMAINS:
        others = {e: table[e, d] for e in data.BUILTIN_DOMAINS if e != d}
        assert table[d, d] < min(others.values()), (d, table[d, d], others)


@pytest.mark.slow
def test_real_dowp_beats_random_and_magnitude(real):
    model = real["model"]
    for b in ("random", "magnitude"):
        idx = dowp.select_neurons(dowp.score_neurons(real["stats"], model, b), 0.5, real["protect"])
        for d in data.BUILTIN_DOMAINS:
            ours, theirs = real_ppl(real, f"expert:{d}", real["experts"][d], d), real_ppl(real, b, idx, d)
            assert ours < theirs, (b, d, ours, theirs)


@pytest.mark.slow
def test_real_protection_and_stats_sanity(real):
    stats, protect = real["stats"], real["protect"]
    assert 0 < int(protect.sum()) < 0.01 * protect.numel()  # a few super neurons, not a large fraction
    for d, s in stats.items():
        assert int(s["count"]) == REAL_CALIB
        assert (s["mean_sq"] >= s["mean_abs"] ** 2 * (1 - 1e-4)).all()  # Jensen: E a^2 >= (E|a|)^2
        assert ((s["fire_rate"] >= 0) & (s["fire_rate"] <= 1)).all()
        assert (s["max_abs"] >= s["mean_abs"]).all()


@pytest.mark.slow
def test_real_export_matches_transformers(real, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tok = real["model"], real["tok"]
    idx = real["experts"]["code"]
    # the tokenizer files are written from the GGUF's own vocabulary, as `purify.py --export` does
    files = EX.gguf_tokenizer_files(M.default_model_path())
    info = EX.export_hf(model, idx, tmp_path / "code", None, {"domain": "code"}, files, dtype="float32")
    assert info["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
    default = EX.export_hf(model, idx, tmp_path / "code_bf16", None, {"domain": "code"}, files)
    assert model.source_dtype == default["dtype"] == "bfloat16"  # a quantized GGUF exports in bfloat16
    assert default["bytes"] < 0.55 * info["bytes"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "code")
    text = "def fibonacci(n):\n    if n < 2:\n        return n  # ü 日本 <|im_end|>"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert (hf_tok.eos_token, hf_tok.pad_token) == ("<|im_end|>", "<|im_end|>")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "code", dtype=torch.float32).eval()
    assert hf.config.intermediate_size == len(idx[0]) == 768  # keep 0.5 of 1536
    ids = torch.tensor([tok.encode("def fibonacci(n):\n    if n < 2:\n        return n\n    return")])  # (1, T)
    with torch.no_grad():
        ours = model(ids, mlps=EX.materialize(model, idx))
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() <= 1e-4
    ours_loaded, _ = M.load_model(tmp_path / "code")
    with torch.no_grad():
        assert (ours_loaded(ids) - ours).abs().max() <= 1e-4
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "code_bf16").eval()  # its own dtype
    assert hf16.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(hf16(ids).logits[0, -1].argmax(), ours[0, -1].argmax())
