"""Tests for evaluate.py, the resumable evaluation runner: its command line (help, corrupt data exits 2 in one line),
the systems (dense, oracle, the pruning baselines, Free-MoE) run the experts they name and equal a direct run with
them, the baselines run at Free-MoE's per-domain budget, warm_up builds every lazily made FFN before the clock starts,
and a run SIGKILLed mid-way then resumed gives byte-identical results.json, while a resume with other settings, experts
or router is refused. The sandbox that runs HumanEval / MBPP programs has its own tests: tests/test_sandbox.py.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate as E  # noqa: E402
import tasks as TS  # noqa: E402
import model as M  # noqa: E402
import dowp  # noqa: E402
import experts as EX  # noqa: E402
import scoring as SC  # noqa: E402
from conftest import broken_data, smol_tokenizer, tiny_model  # noqa: E402

# the tiny model fed real prompts: tiny_model(vocab=tok.n_vocab, **TINY) with tok = smol_tokenizer()
TINY = dict(n_ffn=64, max_seq_len=4096, name="tiny")  # MMLU 5-shot prompts reach ~2.3k tokens


# ----------------------------------------------------------------------------- command line and systems

def _run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_help():
    r = _run_cli("--help")
    assert r.returncode == 0 and "--systems" in r.stdout and "purify" in r.stdout


def test_corrupt_data_cli_exits_2_without_traceback(tmp_path):
    root = broken_data(tmp_path, "truncated_gzip")
    r = _run_cli("--data-dir", str(root), "--tasks", "mmlu", "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def test_unknown_or_unbuilt_system_is_a_user_error():
    args = E.parse_args(["--systems", "random"])
    with pytest.raises(M.UserError, match="needs --experts FILE"):
        E.build_systems(args, None)
    with pytest.raises(M.UserError, match="unknown system"):
        E.build_systems(E.parse_args(["--systems", "sparse"]), None)


# ----------------------------------------------------------------------------- tiny model: resume

def tiny_args(out):
    return E.parse_args(["--tasks", "mmlu", "gsm8k", "humaneval", "ppl", "--limit", "4", "--batch-size", "2",
                         "--gsm8k-shots", "2", "--gsm8k-max-tokens", "6", "--code-max-tokens", "6",
                         "--seq-len", "64", "--mmlu-shots", "1", "--timeout", "5", "--out", str(out)])


def run_tiny(out, kill_after_batches=None):
    """A full evaluation on the tiny model; optionally SIGKILLs its own process after some batches."""
    tok = smol_tokenizer()
    model = tiny_model(vocab=tok.n_vocab, **TINY)
    if kill_after_batches is not None:
        count = [0]
        prep = E.prepare

        def wrapped(name, rt):
            task = prep(name, rt)
            inner = task.run_batch

            def run_batch(*a):
                if count[0] == kill_after_batches:
                    os.kill(os.getpid(), signal.SIGKILL)
                count[0] += 1
                return inner(*a)
            task.run_batch = run_batch
            return task
        E.prepare = wrapped
    return E.run(tiny_args(out), model, tok)


@pytest.mark.slow
def test_resume_after_kill_is_byte_identical(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run_tiny(whole)
    for kill_after in (3, 9):  # killed in mmlu, then again in a later task
        code = f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]; import test_evaluate as T; " \
               f"T.run_tiny({str(resumed)!r}, kill_after_batches={kill_after})"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    # a line cut in the middle of a write, as a kill during f.write would leave it
    with open(resumed / "items" / "dense" / "gsm8k.jsonl", "a") as f:
        f.write('{"id": "12", "correct": 1')
    run_tiny(resumed)
    assert (resumed / "results.json").read_bytes() == (whole / "results.json").read_bytes()
    for path in (resumed / "items" / "dense").glob("*.jsonl"):
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines()[1:]]
        assert len(ids) == len(set(ids)) and len(ids) == len(
            [json.loads(line) for line in (whole / "items" / "dense" / path.name).read_text().splitlines()[1:]])
    result = json.loads((whole / "results.json").read_text())
    assert set(result["systems"]["dense"]["tasks"]) == {"mmlu", "mmlu_cloze", "gsm8k", "humaneval", "bpb_general",
                                                         "bpb_code", "bpb_math", "bpb_knowledge", "integrated"}
    assert result["settings"]["n_items"] == {"mmlu": 4, "gsm8k": 4, "humaneval": 4, "ppl": 16}


def test_resume_with_other_settings_is_refused(tmp_path):
    tok = smol_tokenizer()
    model = tiny_model(vocab=tok.n_vocab, **TINY)
    args = E.parse_args(["--tasks", "gsm8k", "--limit", "1", "--gsm8k-max-tokens", "2", "--gsm8k-shots", "0",
                         "--out", str(tmp_path)])
    (tmp_path / "items" / "dense").mkdir(parents=True)
    (tmp_path / "items" / "dense" / "gsm8k.jsonl").write_text("")  # killed before the header was written
    E.run(args, model, tok)
    args.gsm8k_max_tokens = 3
    with pytest.raises(M.UserError, match="other settings"):
        E.run(args, model, tok)


# ----------------------------------------------------------------------------- sparse systems (tiny model)

def _tiny_artifacts(tmp_path, model, keep=0.5, stats=None):
    """An experts file (random index sets for every domain and baseline) and an untrained router for it."""
    import router as R
    g = torch.Generator().manual_seed(0)
    Fn, L = model.config.n_ffn, model.config.n_layer

    def sets():
        return [torch.randperm(Fn, generator=g)[:int(keep * Fn)].sort().values for _ in range(L)]
    path = tmp_path / "experts.safetensors"
    EX.save_experts(path, {d: sets() for d in TS.PPL_DOMAINS},
                        {"fingerprint": model.fingerprint, "n_layer": L, "n_ffn": Fn},
                        baselines={b: sets() for b in ("random", "magnitude", "general", "mixed")}, stats=stats)
    experts = EX.load_experts(path, model)
    cfg = R.RouterConfig(domains=list(TS.PPL_DOMAINS), n_layer=L, n_embd=model.config.n_embd, route_layer=1,
                         hidden=8, threshold=0.0)
    torch.manual_seed(1)
    R.save_router(tmp_path / "router.safetensors", R.Router(cfg), model, experts)
    return path, tmp_path / "router.safetensors", experts


def test_sparse_systems_run_their_experts(tmp_path):
    tok = smol_tokenizer()
    model = tiny_model(vocab=tok.n_vocab, **TINY)
    experts_path, router_path, experts = _tiny_artifacts(tmp_path, model)
    import router as R
    router, _ = R.read_router(router_path)
    with torch.no_grad():  # purify every layer, and spread the untrained head's decisions over several domains
        router.gate_logits.fill_(1.0)
        router.head[-1].weight.mul_(200.0)
    R.save_router(router_path, router, model, experts)
    args = E.parse_args(["--systems", "dense", "oracle", "random", "general", "mixed", "magnitude", "freemoe",
                         "--experts", str(experts_path), "--router", str(router_path), "--tasks", "mmlu", "ppl",
                         "--limit", "2", "--mmlu-shots", "0", "--seq-len", "32", "--ppl-domains", "code", "math",
                         "--out", str(tmp_path / "out")])
    result = E.run(args, model, tok)["systems"]
    assert set(result) == {"dense", "oracle", "random", "general", "mixed", "magnitude", "freemoe"}
    assert result["dense"]["active_fraction"] == 1.0
    for name in ("oracle", "random", "general", "mixed", "magnitude"):
        assert result[name]["active_fraction"] == 0.5
        assert "delta_vs_dense" in result[name]["tasks"]["bpb_code"]
    assert result["freemoe"]["active_fraction"] == 0.5
    # the oracle runs the expert of the item's domain: its numbers equal a direct run with that expert
    rt = TS.Runtime(model, tok, args)
    task = TS.prepare("ppl", rt)
    oracle = {json.loads(line)["id"]: json.loads(line) for line in
              (tmp_path / "out" / "items" / "oracle" / "ppl.jsonl").read_text().splitlines()[1:]}
    for it in task.items:
        direct = SC.loglikelihoods(model, [(it["prompt"][:1], it["prompt"][1:])], experts.mlps(it["domain"]))[0]
        assert oracle[it["id"]]["nll"] == pytest.approx(-direct, abs=1e-4)
    # freemoe: each item routed on its own, batched with items of the same decision; equals a direct routed run
    moe = R.load_router(router_path, model, experts)
    routed = {json.loads(line)["id"]: json.loads(line) for line in
              (tmp_path / "out" / "items" / "freemoe" / "ppl.jsonl").read_text().splitlines()[1:]}
    assert len({tuple(moe.route([it["prompt"]])[0].domains) for it in task.items}) > 1  # several decisions
    for it in task.items:
        decision = moe.route([it["prompt"]])[0]
        direct = SC.loglikelihoods(model, [(it["prompt"][:1], it["prompt"][1:])], moe.mlps_for(decision))[0]
        assert routed[it["id"]]["nll"] == pytest.approx(-direct, abs=1e-4)
        assert routed[it["id"]]["active_fraction"] == pytest.approx(decision.active_fraction)
    with pytest.raises(M.UserError, match="needs --router FILE"):
        E.build_systems(E.parse_args(["--systems", "freemoe", "--experts", str(experts_path)]), model)


def test_level3_systems_report_the_active_ffn_they_ran(tmp_path):
    """--token-sparsity: freemoe and level3 (dense + level 3) skip quiet neurons per token; each item's active FFN is
    the measured one, and its numbers equal a direct run with the same level-3 FFNs. Off (0) changes nothing."""
    import router as R
    tok = smol_tokenizer()
    model = tiny_model(vocab=tok.n_vocab, **TINY)
    experts_path, router_path, experts = _tiny_artifacts(tmp_path, model)
    moe = R.load_router(router_path, model, experts)
    with torch.no_grad():
        moe.router.gate_logits.fill_(1.0)
    rt = TS.Runtime(model, tok, E.parse_args(["--seq-len", "32", "--ppl-domains", "code", "math", "--limit", "2"]))
    R.calibrate_level3(moe, {d: torch.tensor(it["prompt"])[None] for d in moe.router.cfg.domains
                             for it in TS.prepare("ppl", rt).items[:1]})
    R.save_router(router_path, moe.router, model, experts)

    def run(systems, sparsity, out):
        args = E.parse_args(["--systems", *systems, "--experts", str(experts_path), "--router", str(router_path),
                             "--tasks", "ppl", "--limit", "2", "--seq-len", "32", "--ppl-domains", "code", "math",
                             "--token-sparsity", str(sparsity), "--out", str(tmp_path / out)])
        return E.run(args, model, tok)["systems"], args
    with pytest.raises(M.UserError, match="needs --token-sparsity"):
        run(["level3"], 0, "none")
    off, _ = run(["freemoe"], 0, "off")
    on, args = run(["dense", "freemoe", "level3"], 0.5, "on")
    assert on["dense"]["active_fraction"] == 1.0 and off["freemoe"]["active_fraction"] == 0.5
    assert 0.3 < on["level3"]["active_fraction"] < 0.7  # about half of every FFN's neurons skipped
    assert 0.1 < on["freemoe"]["active_fraction"] < 0.4  # half of the expert's half
    moe = R.load_router(router_path, model, experts, token_sparsity=0.5)
    items = {json.loads(line)["id"]: json.loads(line) for line in
             (tmp_path / "on" / "items" / "level3" / "ppl.jsonl").read_text().splitlines()[1:]}
    for it in TS.prepare("ppl", TS.Runtime(model, tok, args)).items:
        mlps = moe.mlps_for(moe.decision_for(()))
        direct = SC.loglikelihoods(model, [(it["prompt"][:1], it["prompt"][1:])], mlps)[0]
        assert items[it["id"]]["nll"] == pytest.approx(-direct, abs=1e-4)
        # the active FFN of the item's batch (items of a batch share it): close to the item's own
        assert items[it["id"]]["active_fraction"] == pytest.approx(R.measured_active_fraction(
            mlps, model.config.n_ffn), abs=0.03)


def test_resume_with_other_experts_or_router_is_refused(tmp_path):
    """Items of a sparse system belong to the experts (and router) that made them: a resume into the same --out
    with others is refused, while dense items, which need neither, are reused."""
    tok = smol_tokenizer()
    model = tiny_model(vocab=tok.n_vocab, **TINY)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    experts_path, router_path, _ = _tiny_artifacts(first, model, keep=0.5)
    other_experts, other_router, _ = _tiny_artifacts(second, model, keep=0.25)

    def args(systems, experts, router):
        return E.parse_args(["--systems", *systems, "--experts", str(experts), "--router", str(router),
                             "--tasks", "ppl", "--limit", "1", "--seq-len", "32", "--ppl-domains", "code",
                             "--out", str(tmp_path / "out")])
    E.run(args(["dense", "oracle", "freemoe"], experts_path, router_path), model, tok)
    header = json.loads((tmp_path / "out" / "items" / "freemoe" / "ppl.jsonl").read_text().splitlines()[0])
    assert header["header"]["uses"].startswith("experts ") and ", router " in header["header"]["uses"]
    for systems in (["oracle"], ["freemoe"]):
        with pytest.raises(M.UserError, match="other settings"):
            E.run(args(systems, other_experts, other_router), model, tok)
    E.run(args(["dense"], other_experts, other_router), model, tok)  # dense items stay valid


def test_baselines_run_at_freemoe_budget_per_domain(tmp_path):
    """With a router and statistics in the experts file, a pruning baseline keeps, per domain, the fraction of FFN
    neurons Free-MoE's decision for that domain runs (here: gates open in half the layers, so 0.75), and its index
    sets are the baseline rebuilt at that keep."""
    import router as R
    tok = smol_tokenizer()
    model = tiny_model(vocab=tok.n_vocab, **TINY)
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    stats = {d: dowp.collect_stats(model, windows) for d in TS.PPL_DOMAINS}
    experts_path, router_path, experts = _tiny_artifacts(tmp_path, model, stats=stats)
    router, _ = R.read_router(router_path)
    with torch.no_grad():
        router.gate_logits.copy_(torch.tensor([1.0, -1.0]).repeat(len(TS.PPL_DOMAINS), model.config.n_layer // 2))
    R.save_router(router_path, router, model, experts)
    args = E.parse_args(["--systems", "freemoe", "mixed", "--experts", str(experts_path), "--router", str(router_path)])
    experts = EX.load_experts(experts_path, model)
    freemoe, mixed = E.build_systems(args, model)
    moe = R.load_router(router_path, model, experts)
    for domain in ("code", "math"):
        mlps, frac, _ = mixed.pick(None, domain)
        assert frac == pytest.approx(moe.decision_for((domain,)).active_fraction) == pytest.approx(0.75, abs=0.01)
        want = EX.baseline_indices("mixed", model, experts, frac)
        x = torch.randint(0, model.config.vocab_size, (1, 8))
        assert torch.equal(model(x, mlps=mlps), model(x, mlps=EX.materialize(model, want)))


def test_warm_up_builds_each_decision_and_domain_once_before_timing():
    """Lazily built FFNs (budget-matched baselines, materialised experts) are made before the clock starts: one
    pick per (routing decision, domain), none per batch."""
    calls = []
    system = E.System("probe", pick=lambda prompts, domain: calls.append((len(prompts[0]), domain)) or (None, 1.0),
                      route_key=lambda ids: len(ids) % 2)
    task = TS.Task("ppl", "mixed", [], {}, run_batch=None)
    batches = [[{"id": "a", "domain": "code", "prompt": [1, 2]}, {"id": "e", "domain": "general", "prompt": [8, 9]}],
               [{"id": "b", "domain": "code", "prompt": [3, 4]}], [{"id": "c", "domain": "code", "prompt": [5]}],
               [{"id": "d", "domain": "math", "prompt": [6, 7]}]]
    rt = TS.Runtime(model=None, tokenizer=None, args=None)
    E.warm_up(rt, system, task, batches)
    assert calls == [(2, "code"), (2, "general"), (1, "code"), (2, "math")]  # every item's domain, not a batch's first


def test_all_mmlu_items_second_corpora_answer_bits_and_one_expert_everywhere(tmp_path):
    """--mmlu-items all scores every test item, each in its bucket, and reports every column per group paired against
    dense; the shift task scores each domain's second corpus; gsm8k_answer scores the reference answers; expert:D runs
    one expert on every item; a routed system's records say where each item went."""
    tok = smol_tokenizer()
    model = tiny_model(vocab=tok.n_vocab, **TINY)
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    stats = {d: dowp.collect_stats(model, windows) for d in TS.PPL_DOMAINS}
    experts_path, router_path, experts = _tiny_artifacts(tmp_path, model, stats=stats)
    args_list = ["--systems", "dense", "freemoe", "expert:code", "--tasks", "mmlu", "shift", "gsm8k_answer",
                 "--mmlu-items", "all", "--limit", "8", "--mmlu-shots", "0", "--seq-len", "32", "--ppl-windows", "2",
                 "--experts", str(experts_path), "--router", str(router_path), "--out", str(tmp_path / "out")]
    args = E.parse_args(args_list)
    TS.check_data(args)
    res = E.run(args, model, tok)
    items = {t: [json.loads(line) for line in (tmp_path / "out" / "items" / "dense" / f"{t}.jsonl").open()][1:]
             for t in ("mmlu", "shift", "gsm8k_answer")}
    assert len(items["mmlu"]) == 8 and {r["bucket"] for r in items["mmlu"]} <= {"calib", "heldout", "eval"}
    assert {r["domain"] for r in items["shift"]} == set(TS.PPL_DOMAINS) and len(items["shift"]) == 8
    dense, code = res["systems"]["dense"], res["systems"]["expert:code"]
    assert set(dense["tasks"]) == {"mmlu", "mmlu_cloze", "integrated", "bpb_gsm8k_answer",
                                   *(f"bpb_shift_{d}" for d in TS.PPL_DOMAINS)}
    groups = code["groups"]["mmlu_cloze"]
    assert [g for g in groups if g.startswith("bucket")] == [g for g in ("bucket eval", "bucket calib",
                                                                         "bucket heldout") if g in groups]
    for g, e in groups.items():  # each group's score and paired difference come from its own items
        mine = [r for r in items["mmlu"] if g in TS.mmlu_groups(r)]
        assert e["n"] == len(mine) and "delta_ci95" in e
    assert code["active_fraction"] == pytest.approx(0.5) and "routes" not in code
    assert sum(res["systems"]["freemoe"]["routes"]["mmlu"].values()) == 8
    with pytest.raises(M.UserError, match="unknown system"):
        E.build_systems(E.parse_args(["--systems", "expert"]), model)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| mmlu_cloze by group |" in md and "bpb_shift_code" in md
    # the same items paired against another system: a resume, nothing is scored again
    again = E.run(E.parse_args([*args_list, "--delta-vs", "freemoe"]), model, tok)
    shift = again["systems"]["dense"]["tasks"]["bpb_shift_code"]
    assert "delta_vs_freemoe" in shift and "delta_vs_freemoe" not in again["systems"]["freemoe"]["tasks"]["mmlu"]
    assert shift["value"] == res["systems"]["dense"]["tasks"]["bpb_shift_code"]["value"]


def test_shards_gathered_by_reuse_equal_one_whole_run(tmp_path, monkeypatch, capsys):
    """--shard K/N scores every N-th batch and writes no report; a last run with --reuse on the shard folders
    scores nothing, holds every item, and writes the same results.json as one whole run. A folder written with
    other settings is not reused (and said)."""
    tok = smol_tokenizer()
    model = tiny_model(vocab=tok.n_vocab, **TINY)
    experts_path, router_path, _ = _tiny_artifacts(tmp_path, model)
    base = ["--systems", "dense", "freemoe", "--tasks", "mmlu", "gsm8k_answer", "--mmlu-items", "all",
            "--mmlu-shots", "0", "--limit", "7", "--batch-size", "2", "--experts", str(experts_path),
            "--router", str(router_path)]
    E.run(E.parse_args([*base, "--out", str(tmp_path / "whole")]), model, tok)
    shards = [tmp_path / f"shard{k}" for k in (1, 2, 3)]
    for k, out in enumerate(shards, 1):
        assert E.run(E.parse_args([*base, "--shard", f"{k}/3", "--out", str(out)]), model, tok) is None
        assert not (out / "results.json").exists()
    for system in ("dense", "freemoe"):
        ids = [[json.loads(line)["id"] for line in (out / "items" / system / "mmlu.jsonl").read_text().splitlines()[1:]]
               for out in shards]
        assert all(ids) and sum(map(len, ids)) == 7 == len(set().union(*ids))  # disjoint, together every item

    scored = []
    prepare = E.prepare

    def counting(name, rt):
        task = prepare(name, rt)
        inner = task.run_batch
        task.run_batch = lambda *a: scored.append(name) or inner(*a)
        return task
    monkeypatch.setattr(E, "prepare", counting)
    route = E.router.FreeMoE.route
    monkeypatch.setattr(E.router.FreeMoE, "route", lambda self, *a, **k: scored.append("route") or route(self, *a, **k))
    live = shards[0] / "items" / "dense" / "mmlu.jsonl"  # a shard still writing: its partial line is left alone
    with open(live, "a") as f:
        f.write('{"id": "abstract_algebra/0", "corr')
    gathered = tmp_path / "gathered"
    E.run(E.parse_args([*base, "--reuse", *map(str, shards), "--out", str(gathered)]), model, tok)
    assert scored == []
    assert (gathered / "results.json").read_bytes() == (tmp_path / "whole" / "results.json").read_bytes()
    assert len((gathered / "items" / "freemoe" / "mmlu.jsonl").read_text().splitlines()) == 1 + 7
    assert live.read_text().endswith('"corr')

    other = [*base[:6], "--mmlu-shots", "1", *base[8:], "--reuse", str(tmp_path / "whole")]  # other settings
    E.run(E.parse_args([*other, "--systems", "dense", "--tasks", "mmlu", "--out", str(tmp_path / "other")]),
          model, tok)
    assert "written with other settings; not used" in capsys.readouterr().err and scored == ["mmlu"] * 4


@pytest.mark.parametrize("bad", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_bad_shard_or_reuse_folder_is_one_line(bad, tmp_path):
    with pytest.raises(M.UserError, match="--shard: expected K/N"):
        E.parse_args(["--shard", bad])
    with pytest.raises(M.UserError, match="not a results folder"):
        E.parse_args(["--reuse", str(tmp_path)])
