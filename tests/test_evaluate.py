"""Tests for evaluate.py.

The sandbox that runs HumanEval / MBPP programs has its own tests: tests/test_sandbox.py.
Scoring: answer extraction, pass@k, prompt format (golden string), batched log-likelihood = a brute-force forward
per choice on a tiny random model, resume after a SIGKILL gives byte-identical results.json, data errors are one line.
Slow: the same machinery on the real SmolLM2-135M model.
"""
import gzip
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import evaluate as E  # noqa: E402
import tasks as TS  # noqa: E402
import model as M  # noqa: E402
import dowp  # noqa: E402
import experts as EX  # noqa: E402
import scoring as SC  # noqa: E402
from conftest import smol_hf_tokenizer  # noqa: E402

HF_TOKENIZER = smol_hf_tokenizer() / "tokenizer.json"


# ----------------------------------------------------------------------------- prompts and parsing

def test_mmlu_prompt_golden():
    shot = {"subject": "high_school_physics", "question": " What is 1+1? ", "choices": ["1", "2", "3", "4"],
            "answer": 1}
    doc = {"subject": "high_school_physics", "question": "Which is a vector?",
           "choices": ["mass", "speed", "velocity", "time"], "answer": 2}
    assert data.mmlu_prompt(doc, [shot]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is 1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "Which is a vector?\nA. mass\nB. speed\nC. velocity\nD. time\nAnswer:")
    assert data.mmlu_cloze_prompt(doc, [shot]) == (  # lm-evaluation-harness mmlu_continuation
        "The following are questions (with answers) about high school physics.\n\n"
        "Question: What is 1+1?\nAnswer: 2\n\nQuestion: Which is a vector?\nAnswer:")


def test_mmlu_categories_cover_the_data():
    subjects = {d["subject"] for d in data.load_mmlu("test")}
    assert subjects == set(TS.MMLU_SUBJECT_CATEGORY) and len(subjects) == 57
    assert [len(v) for v in TS.MMLU_CATEGORIES.values()] == [19, 13, 12, 13]


def test_gsm8k_prompt_and_reference():
    train = data.load_gsm8k("train")
    p = data.gsm8k_prompt({"question": "Q?"}, train[:1])
    assert p.startswith("Question: Natalia sold clips") and "<<" not in p and p.endswith("\n\nQuestion: Q?\nAnswer:")
    assert TS.gsm8k_reference(train[0]) == "72"


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"),
    ("She pays $1,234.00 in total.", "1234"),
    ("The temperature is -5 degrees", "-5"),
    ("so 12-3 = 9", "9"),
    ("12-3", "3"),
    ("It weighs 3.50 kg", "3.5"),
    ("He has 5 apples and 7 pears, 12 fruits.", "12"),
    ("He earns 10% of 50, which is 5.", "5"),
    ("#### 42\nQuestion: what about 7?", "42"),
    ("first 18 then #### 20 dollars and 30", "20"),
    ("#### -3", "-3"),
    ("x = -0.25", "-0.25"),
    ("1,000,000 people came", "1000000"),
    ("The answer is 7.", "7"),
    ("Answer: 0.0", "0"),
    ("costs $.5 each", "0.5"),
    ("The answer is (-4)", "-4"),
    ("#### no number, but 8 earlier", "8"),
    ("no numbers at all", None),
    ("", None),
])
def test_gsm8k_answer_extraction(text, expected):
    assert TS.extract_gsm8k_answer(text) == expected


def test_pass_at_k():
    assert TS.pass_at_k(10, 0, 1) == 0.0 and TS.pass_at_k(10, 10, 5) == 1.0
    for n, c, k in [(5, 2, 1), (10, 3, 5), (20, 1, 10), (7, 6, 2)]:
        assert TS.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_select_is_seeded_and_prefix_stable():
    items = list(range(100))
    a, b = TS.select(items, 10, 0), TS.select(items, 20, 0)
    assert a == TS.select(items, 10, 0) and set(a) <= set(b) and a == sorted(a) and a != TS.select(items, 10, 1)
    assert TS.select(items, None, 0) == items


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    x = (torch.rand(200, generator=torch.Generator().manual_seed(0)) < 0.3).double().numpy()
    ones = x * 0 + 1
    lo, hi = SC.bootstrap(x, ones, seed=0)
    assert lo < x.mean() < hi and [lo, hi] == SC.bootstrap(x, ones, seed=0)
    dlo, dhi = SC.bootstrap(x, ones, seed=0, ref=(x, ones))
    assert dlo == dhi == 0.0


# ----------------------------------------------------------------------------- data errors

def _run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_help():
    r = _run_cli("--help")
    assert r.returncode == 0 and "--systems" in r.stdout and "purify" in r.stdout


def _broken_data(tmp_path, case):
    d = tmp_path / "data"
    (d / "mmlu").mkdir(parents=True)
    good = data.data_file("mmlu/dev.jsonl.gz").read_bytes()
    (d / "mmlu" / "dev.jsonl.gz").write_bytes(good)
    test = d / "mmlu" / "test.jsonl.gz"
    if case == "truncated_gzip":
        test.write_bytes(good[: len(good) // 2])
    elif case == "bad_json":
        test.write_bytes(gzip.compress(b'{"subject": "anatomy", "question": "q"\n'))
    elif case == "missing_field":
        test.write_bytes(gzip.compress(b'{"subject": "anatomy", "question": "q", "choices": ["a","b","c","d"]}\n'))
    return tmp_path


@pytest.mark.parametrize("case", ["missing", "truncated_gzip", "bad_json", "missing_field"])
def test_corrupt_or_missing_data_is_a_one_line_user_error(tmp_path, case, monkeypatch):
    args = E.parse_args(["--data-dir", str(_broken_data(tmp_path, case)), "--tasks", "mmlu"])
    monkeypatch.setenv("FREE_MOE_CACHE", str(tmp_path / "cache"))  # missing: not in the cache, and offline (no
    monkeypatch.setenv("FREE_MOE_DATA_URL", "http://127.0.0.1:9")  # server on port 9), so not fetched (data.py)
    with pytest.raises(M.UserError) as e:
        TS.check_data(args)
    assert "test.jsonl.gz" in str(e.value) and "\n" not in str(e.value)


def test_corrupt_data_cli_exits_2_without_traceback(tmp_path):
    root = _broken_data(tmp_path, "truncated_gzip")
    r = _run_cli("--data-dir", str(root), "--tasks", "mmlu", "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr, r.stderr


def test_unknown_or_unbuilt_system_is_a_user_error():
    args = E.parse_args(["--systems", "random"])
    with pytest.raises(M.UserError, match="needs --experts FILE"):
        E.build_systems(args, None)
    with pytest.raises(M.UserError, match="unknown system"):
        E.build_systems(E.parse_args(["--systems", "sparse"]), None)


# ----------------------------------------------------------------------------- tiny model: scoring and resume

def tiny_model_and_tokenizer(seed=0):
    torch.manual_seed(seed)
    tok = M.Tokenizer.from_tokenizer_json(HF_TOKENIZER)
    cfg = M.Config(arch="llama", vocab_size=tok.n_vocab, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_ffn=64,
                   max_seq_len=4096, name="tiny")  # MMLU 5-shot prompts reach ~2.3k tokens
    model = M.Transformer(cfg).eval().requires_grad_(False)
    model.fingerprint = M.fingerprint(model)
    return model, tok


@torch.no_grad()
def brute_loglik(model, ctx, cont):
    logits = model(torch.tensor([ctx + cont]))[0]  # (T, V), one unpadded forward per choice
    logp = F.log_softmax(logits[len(ctx) - 1:-1].float(), -1)
    return logp[torch.arange(len(cont)), torch.tensor(cont)].sum().item()


def test_mmlu_scoring_equals_brute_force_per_choice_forward():
    model, tok = tiny_model_and_tokenizer()
    # 2 shots: prompts of unequal lengths (some > 1000 tokens), so several padded forwards of mixed rows
    args = E.parse_args(["--limit", "5", "--mmlu-shots", "2", "--batch-tokens", "1500"])
    rt = TS.Runtime(model, tok, args)
    task = TS.prepare("mmlu", rt)
    recs = TS.run_mmlu(rt, E.System("dense"), task.items, task.domain)
    for it, rec in zip(task.items, recs):
        ctx, cloze = tok.encode(it["prompt"]), tok.encode(it["cloze"])
        letters = [brute_loglik(model, ctx, tok.encode(f" {L}")) for L in "ABCD"]
        clozes = [brute_loglik(model, cloze, tok.encode(f" {c}")) for c in it["doc"]["choices"]]
        assert rec["loglik_letters"] == pytest.approx(letters, abs=1e-4)
        assert rec["loglik_cloze"] == pytest.approx(clozes, rel=1e-6, abs=1e-4)  # sums of ~1e3 in float32
        per_char = [x / len(c) for x, c in zip(rec["loglik_cloze"], it["doc"]["choices"])]  # harness acc_norm
        assert rec["correct_cloze"] == float(max(range(4), key=per_char.__getitem__) == it["doc"]["answer"])
        assert rec["prediction"] == "ABCD"[max(range(4), key=letters.__getitem__)]


def tiny_args(out):
    return E.parse_args(["--tasks", "mmlu", "gsm8k", "humaneval", "ppl", "--limit", "4", "--batch-size", "2",
                         "--gsm8k-shots", "2", "--gsm8k-max-tokens", "6", "--code-max-tokens", "6",
                         "--seq-len", "64", "--mmlu-shots", "1", "--timeout", "5", "--out", str(out)])


def run_tiny(out, kill_after_batches=None):
    """A full evaluation on the tiny model; optionally SIGKILLs its own process after some batches."""
    model, tok = tiny_model_and_tokenizer()
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
    model, tok = tiny_model_and_tokenizer()
    args = E.parse_args(["--tasks", "gsm8k", "--limit", "1", "--gsm8k-max-tokens", "2", "--gsm8k-shots", "0",
                         "--out", str(tmp_path)])
    (tmp_path / "items" / "dense").mkdir(parents=True)
    (tmp_path / "items" / "dense" / "gsm8k.jsonl").write_text("")  # killed before the header was written
    E.run(args, model, tok)
    args.gsm8k_max_tokens = 3
    with pytest.raises(M.UserError, match="other settings"):
        E.run(args, model, tok)


# ----------------------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def real(real_model):
    return real_model  # tests/conftest.py


@pytest.mark.slow
def test_real_model_mmlu_scoring_and_generation(real, tmp_path):
    model, tok = real
    args = E.parse_args(["--limit", "2", "--mmlu-shots", "0"])  # short prompts: this CPU is slow
    rt = TS.Runtime(model, tok, args)
    task = TS.prepare("mmlu", rt)
    recs = TS.run_mmlu(rt, E.System("dense"), task.items, task.domain)
    for it, rec in zip(task.items, recs):
        letters = [brute_loglik(model, tok.encode(it["prompt"]), tok.encode(f" {L}")) for L in "ABCD"]
        assert rec["loglik_letters"] == pytest.approx(letters, abs=1e-3)
    # greedy batched generation equals generating each prompt alone (left padding is invisible)
    prompts = ["def add(a, b):\n", "Question: What is 2 + 3?\nAnswer:"]
    batched, _ = TS.complete(rt, prompts, TS.GSM8K_STOPS, 8)
    single = [TS.complete(rt, [p], TS.GSM8K_STOPS, 8)[0][0] for p in prompts]
    assert batched == single
    # a short end-to-end run through the CLI code path
    args = E.parse_args(["--tasks", "gsm8k", "ppl", "--limit", "1", "--gsm8k-shots", "0", "--gsm8k-max-tokens", "16",
                         "--seq-len", "256", "--ppl-domains", "general", "--out", str(tmp_path)])
    result = E.run(args, model, tok)
    bpb = result["systems"]["dense"]["tasks"]["bpb_general"]["value"]
    assert 0.3 < bpb < 3.0, bpb  # a trained model compresses English text to roughly 1 bit per byte


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
    model, tok = tiny_model_and_tokenizer()
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


def test_resume_with_other_experts_or_router_is_refused(tmp_path):
    """Items of a sparse system belong to the experts (and router) that made them: a resume into the same --out
    with others is refused, while dense items, which need neither, are reused."""
    model, tok = tiny_model_and_tokenizer()
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


def test_per_task_limits_and_mmlu_per_subject():
    args = E.parse_args(["--limit", "3", "gsm8k=7", "--mmlu-per-subject", "2", "--mmlu-shots", "0"])
    assert args.limits == {"*": 3, "gsm8k": 7}
    assert TS.limit_for(args, "gsm8k") == 7 and TS.limit_for(args, "humaneval") == 3
    assert TS.limit_for(E.parse_args([]), "mmlu") is None
    for bad in (["--limit", "nope=3"], ["--limit", "gsm8k=0"], ["--limit", "x"]):
        with pytest.raises(M.UserError, match="--limit"):
            E.parse_args(bad)
    model, tok = tiny_model_and_tokenizer()
    rt = TS.Runtime(model, tok, args)
    items = TS.prepare("mmlu", rt).items
    per = {}
    for it in items:
        per[it["doc"]["subject"]] = per.get(it["doc"]["subject"], 0) + 1
    assert len(per) == 57 and set(per.values()) == {2}  # every subject, K items each
    assert len(TS.prepare("gsm8k", rt).items) == 7 and len(TS.prepare("humaneval", rt).items) == 3


def test_baselines_run_at_freemoe_budget_per_domain(tmp_path):
    """With a router and statistics in the experts file, a pruning baseline keeps, per domain, the fraction of FFN
    neurons Free-MoE's decision for that domain runs (here: gates open in half the layers, so 0.75), and its index
    sets are the baseline rebuilt at that keep."""
    import router as R
    model, tok = tiny_model_and_tokenizer()
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


# ----------------------------------------------------------------------------- loglikelihoods: batched on the device

def tiny_scorer(seed=0):
    torch.manual_seed(seed)
    cfg = M.Config(arch="llama", vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, n_ffn=48, max_seq_len=24)
    return M.Transformer(cfg).eval().requires_grad_(False)


def test_loglikelihoods_equal_brute_force_with_shared_rows_chunks_and_truncation(monkeypatch):
    """Requests that share a row (MMLU letters), a row shared by continuations of different lengths (its scored
    positions interleave), inputs longer than max_seq_len (left-truncated), several batches (batch_tokens) and
    several LM-head chunks (HEAD_ROWS): every sum equals a plain unpadded forward per request."""
    model = tiny_scorer()
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(0, 50, (n,), generator=g).tolist()  # noqa: E731
    ctx, long_ctx = ids(9), ids(30)
    reqs = [(ctx, [t]) for t in (3, 4, 5, 6)]  # one row, one position, four targets
    reqs += [(ctx[:-2], ctx[-2:] + [7]), (ctx[:-1], ctx[-1:] + [7])]  # row `ctx` again, 3 and 2 scored positions
    reqs += [(ids(n), ids(k)) for n, k in ((1, 1), (4, 3), (12, 5), (6, 1))]
    reqs += [(long_ctx, ids(3)), (ids(2), ids(22))]  # truncated to the last 24 inputs
    shared = ids(11)  # MMLU cloze: one context, several longer-than-one-token continuations (run once, cache copied)
    reqs += [(shared, ids(k)) for k in (2, 4, 3, 1)]

    def brute(c, x):
        full = (c + x)[-(model.config.max_seq_len + 1):]  # the same left truncation
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([full[:-1]]))[0], -1)  # (T, V)
        return sum(float(logp[len(full) - 1 - len(x) + j, t]) for j, t in enumerate(x))
    want = [brute(c, x) for c, x in reqs]
    monkeypatch.setattr(SC, "HEAD_ROWS", 3)
    assert list(SC.shared_contexts(reqs, model.config.max_seq_len)) == [tuple(shared)]
    for batch_tokens in (30, 4096):
        for share in (True, False):
            got = SC.loglikelihoods(model, reqs, batch_tokens=batch_tokens, share_prefix=share)
            assert got == pytest.approx(want, abs=1e-4), (batch_tokens, share)
    with pytest.raises(ValueError, match="empty continuation"):
        SC.loglikelihoods(model, [([1], [])])
    with pytest.raises(ValueError, match="empty context"):
        SC.loglikelihoods(model, [([], [1, 2])])


def test_loglikelihoods_do_not_depend_on_batching():
    """The default token budget (CPU 4096, CUDA 32768) only changes how rows are grouped, not the numbers."""
    model = tiny_scorer(1)
    g = torch.Generator().manual_seed(2)
    reqs = [(torch.randint(0, 50, (n,), generator=g).tolist(), [int(t)]) for n, t in zip(range(1, 20), range(19))]
    a = SC.loglikelihoods(model, reqs)
    b = SC.loglikelihoods(model, reqs, batch_tokens=8)
    assert a == pytest.approx(b, abs=1e-4)  # float32 matmuls of other shapes: last-bit differences only
    assert SC.default_batch_tokens("cpu") == 4096 and SC.default_batch_tokens("cuda:0") == 32768
