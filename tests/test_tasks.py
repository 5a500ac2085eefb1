"""Tests for tasks.py, the benchmarks: prompt formats (golden strings), MMLU's subject categories, GSM8K answer
extraction, pass@k, the seeded prefix-stable item selection and per-task limits, the one-line error for missing or
corrupt benchmark data, and MMLU scoring: its batched log-likelihoods equal a brute-force forward per choice on a tiny
random model. Slow: the same scoring, batched generation and a short run on the real SmolLM2-135M model.
"""
import gzip
import math
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
from conftest import broken_data, smol_tokenizer, tiny_model  # noqa: E402

# the tiny model fed real prompts: tiny_model(vocab=tok.n_vocab, **TINY) with tok = smol_tokenizer()
TINY = dict(n_ffn=64, max_seq_len=4096, name="tiny")  # MMLU 5-shot prompts reach ~2.3k tokens


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


def test_per_task_limits_and_mmlu_per_subject():
    args = E.parse_args(["--limit", "3", "gsm8k=7", "--mmlu-per-subject", "2", "--mmlu-shots", "0"])
    assert args.limits == {"*": 3, "gsm8k": 7}
    assert TS.limit_for(args, "gsm8k") == 7 and TS.limit_for(args, "humaneval") == 3
    assert TS.limit_for(E.parse_args([]), "mmlu") is None
    for bad in (["--limit", "nope=3"], ["--limit", "gsm8k=0"], ["--limit", "x"]):
        with pytest.raises(M.UserError, match="--limit"):
            E.parse_args(bad)
    tok = smol_tokenizer()
    model = tiny_model(vocab=tok.n_vocab, **TINY)
    rt = TS.Runtime(model, tok, args)
    items = TS.prepare("mmlu", rt).items
    per = {}
    for it in items:
        per[it["doc"]["subject"]] = per.get(it["doc"]["subject"], 0) + 1
    assert len(per) == 57 and set(per.values()) == {2}  # every subject, K items each
    assert len(TS.prepare("gsm8k", rt).items) == 7 and len(TS.prepare("humaneval", rt).items) == 3


# ----------------------------------------------------------------------------- data errors

@pytest.mark.parametrize("case", ["missing", "truncated_gzip", "bad_json", "missing_field"])
def test_corrupt_or_missing_data_is_a_one_line_user_error(tmp_path, case, monkeypatch):
    args = E.parse_args(["--data-dir", str(broken_data(tmp_path, case)), "--tasks", "mmlu"])
    monkeypatch.setenv("FREE_MOE_CACHE", str(tmp_path / "cache"))  # missing: not in the cache, and offline (no
    monkeypatch.setenv("FREE_MOE_DATA_URL", "http://127.0.0.1:9")  # server on port 9), so not fetched (data.py)
    with pytest.raises(M.UserError) as e:
        TS.check_data(args)
    assert "test.jsonl.gz" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- MMLU scoring (tiny model)

@torch.no_grad()
def brute_loglik(model, ctx, cont):
    logits = model(torch.tensor([ctx + cont]))[0]  # (T, V), one unpadded forward per choice
    logp = F.log_softmax(logits[len(ctx) - 1:-1].float(), -1)
    return logp[torch.arange(len(cont)), torch.tensor(cont)].sum().item()


def test_mmlu_scoring_equals_brute_force_per_choice_forward():
    tok = smol_tokenizer()
    model = tiny_model(vocab=tok.n_vocab, **TINY)
    # 2 shots: prompts of unequal lengths (some > 1000 tokens), so several padded forwards of mixed rows
    args = E.parse_args(["--limit", "5", "--mmlu-shots", "2", "--batch-tokens", "1500"])
    rt = TS.Runtime(model, tok, args)
    task = TS.prepare("mmlu", rt)
    recs = TS.run_choices(rt, E.System("dense"), task.items, task.domain)
    for it, rec in zip(task.items, recs):
        ctx, cloze = tok.encode(it["prompt"]), tok.encode(it["cloze"])
        letters = [brute_loglik(model, ctx, tok.encode(f" {L}")) for L in "ABCD"]
        clozes = [brute_loglik(model, cloze, tok.encode(f" {c}")) for c in it["doc"]["choices"]]
        assert rec["loglik_letters"] == pytest.approx(letters, abs=1e-4)
        assert rec["loglik_cloze"] == pytest.approx(clozes, rel=1e-6, abs=1e-4)  # sums of ~1e3 in float32
        per_char = [x / len(c) for x, c in zip(rec["loglik_cloze"], it["doc"]["choices"])]  # harness acc_norm
        assert rec["correct_cloze"] == float(max(range(4), key=per_char.__getitem__) == it["doc"]["answer"])
        assert rec["prediction"] == "ABCD"[max(range(4), key=letters.__getitem__)]


def test_medmcqa_items_are_the_second_corpus_questions_scored_like_mmlu():
    rows = data.load_medmcqa()
    assert len(rows) == 996 and all(len(r["choices"]) == 4 and r["answer"] in range(4) for r in rows)
    # every question and its right option are in the knowledge domain's second corpus, never in its calibration
    corpus = "\n\n".join(data.shift_documents("knowledge"))
    for r in rows[::97]:
        assert f"Question: {r['question']}\n" in corpus
        assert f"Answer: {'ABCD'[r['answer']]}. {r['choices'][r['answer']]}" in corpus
    assert [sum(r["answer"] == a for r in rows) for a in range(4)] == [312, 270, 266, 148]
    tok = smol_tokenizer()
    args = E.parse_args(["--tasks", "medmcqa", "--limit", "3"])
    rt = TS.Runtime(tiny_model(vocab=tok.n_vocab, **TINY), tok, args)
    task = TS.prepare("medmcqa", rt)
    assert task.domain == "knowledge" and task.settings == {"shots": 0} and len(task.items) == 3
    assert task.items[0]["prompt"].startswith("The following are multiple choice questions (with answers) about "
                                              "medicine.\n\n") and task.items[0]["prompt"].endswith("\nD. "
                                              + task.items[0]["doc"]["choices"][3] + "\nAnswer:")
    recs = TS.run_choices(rt, E.System("dense"), task.items, task.domain)
    cols = TS.columns_of(task, recs)
    assert set(cols) == {"medmcqa", "medmcqa_cloze"}
    assert list(cols["medmcqa"][0]) == [r["correct"] for r in recs] and "bucket" not in recs[0]


def test_a_corrupt_medmcqa_item_is_a_one_line_user_error(tmp_path, monkeypatch):
    bad = tmp_path / "corpora" / "medical_medmcqa.txt.gz"
    bad.parent.mkdir()
    bad.write_bytes(gzip.compress(b"Question: Which?\nA. x\nB. y\nC. z\nAnswer: B. y\nExplanation: none\n\n"))
    monkeypatch.setattr(data, "data_file", lambda name, data_dir=None: bad)  # the pinned file parses; this one not
    with pytest.raises(M.UserError, match="bad item 'Question: Which") as e:
        data.load_medmcqa()
    assert "\n" not in str(e.value)


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
    recs = TS.run_choices(rt, E.System("dense"), task.items, task.domain)
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
