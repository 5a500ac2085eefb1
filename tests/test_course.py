"""Tests for course.py, the course edition's kit (left out of the student copy, like the teacher's key): the
reference scores full points; a fresh student copy scores 0, every part failing with its own NotImplementedError,
and holds no line of a reference body; and for every part, plausible wrong implementations lose that part's points
(each mutation is applied to a copy of the reference and graded there, in a fresh process).
"""
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import course  # noqa: E402
from cli import UserError  # noqa: E402

# (part, function, the reference's text, a plausible wrong text): each must cost its part points
MUTATIONS = [
    (1, "tasks.extract_gsm8k_answer", "return found[-1] if found", "return found[0] if found"),  # first number
    (1, "tasks.extract_gsm8k_answer", 'if "####" in text:', 'if "####" in text[:0]:'),  # ignores the #### line
    (1, "tasks.pass_at_k", "np.arange(n - c + 1, n + 1)", "np.arange(n - c, n)"),  # off by one
    (2, "model.MLP.select", "small.down.weight.copy_(self.down.weight[:, idx])",
     "small.down.weight.copy_(self.down.weight[:, :len(idx)])"),  # the first k columns, not the kept ones
    (2, "model.MLP.select", "                small.down.bias.copy_(self.down.bias)\n", ""),  # down's bias lost
    (2, "model.MLP.select", "small.gate.weight.copy_(self.gate.weight[idx])",
     "small.gate.weight.copy_(self.up.weight[idx])"),  # gate rows from up
    (3, "dowp.RecordingMLP.forward", "rms = sq.mean(-1, keepdim=True).sqrt()",
     "rms = mag.mean(-1, keepdim=True)"),  # mean |a| for the RMS
    (3, "dowp.RecordingMLP.forward", "self.count += flat.shape[0]", "self.count += a.shape[0]"),  # windows, not tokens
    (3, "dowp.collect_stats", '"mean_sq": stack(lambda r: r.sum_sq / n)',
     '"mean_sq": stack(lambda r: r.sum_sq / n / len(recorders))'),  # a wrong normalisation
    (4, "dowp.score_dowp", "norm = {d: I / I.mean(1, keepdim=True).clamp_min(eps) for d, I in norm.items()}",
     "norm = dict(norm)"),  # no layer normalisation
    (4, "dowp.score_dowp", "((1 + contrast) * log_i - contrast", "((1 - contrast) * log_i + contrast"),  # flipped
    (5, "dowp.select_neurons", "k = max(1, min(n, round(kf * n)))", "k = max(1, min(n, int(kf * n)))"),  # floor
    (5, "dowp.select_neurons", 's[protected[l]] = float("inf")', "pass"),  # protection forgotten
    (5, "dowp.super_neurons", "peak.median(dim=1, keepdim=True).values", "peak.median()"),  # one median, all layers
    (5, "dowp.super_neurons", "if factor <= 0:", "if factor < 0:"),  # factor 0 protects everything above 0
    (6, "dowp.TaylorMLP.after_backward", "self.taylor -= ", "self.taylor += "),  # the sign
    (6, "dowp.loss_aware_stats", "n_pred += x[:, 1:].numel()", "n_pred += x.numel()"),  # counts unpredicted tokens
    (6, "dowp.TaylorMLP.forward", "self.in_sq += x.detach().float().pow(2).sum((0, 1)).double()",
     "self.in_sq += x.detach().float().abs().sum((0, 1)).double()"),  # |x| for x^2
    (7, "search.greedy_by_layer", '"accepted": loss < best})\n            if loss < best:',
     '"accepted": loss <= best})\n            if loss <= best:'),  # accepts a tie
    (7, "search.greedy_by_layer", "mlps[l] = chosen[l][1] if chosen[l] else None", "mlps[l] = None"),  # stream
    (7, "search.greedy_by_layer", "best, trials, chosen = val_loss(0, None), [], [None] * L",
     "best, trials, chosen = float('inf'), [], [None] * L"),  # the first proposal always wins
    (8, "router.relaxed_gates", "return hard + soft - soft.detach()", "return hard"),  # no gradient
    (8, "router.relaxed_gates", "torch.log(u) - torch.log1p(-u)", "torch.log1p(-u) - torch.log(u)"),  # noise sign
    (8, "router.MixedMLP.forward", "self.g * self.expert(x) + (1 - self.g) * self.dense(x)",
     "self.g * self.dense(x) + (1 - self.g) * self.expert(x)"),  # swapped
    (8, "router.expected_fraction", "(g * kept + (1 - g) * n_ffn)", "((1 - g) * kept + g * n_ffn)"),
    (9, "router.FreeMoE.gate_pattern", ".min(0).values", ".max(0).values"),  # a union opens on one gate
    (9, "router.FreeMoE.gate_pattern", "logits.argsort(descending=True)", "logits.argsort()"),  # least safe first
    (9, "router.FreeMoE.gate_pattern", "bool(v > 0)", "bool(v >= 0)"),
]


def grade(folder: Path, parts=None) -> dict:
    """`python course.py grade --json` in `folder`, in a fresh process: the autograder results."""
    out = folder / "graded.json"
    cmd = [sys.executable, "course.py", "grade", "--json", str(out)] + (["--part", *map(str, parts)] if parts else [])
    run = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and out.exists(), run.stdout[-2000:] + run.stderr[-2000:]
    return json.loads(out.read_text())


def points(results: dict, n: int) -> tuple[float, float]:
    mine = [t for t in results["tests"] if t["name"].startswith(f"part {n}:")]
    return sum(t["score"] for t in mine), sum(t["max_score"] for t in mine)


def plain_copy(dst: Path) -> Path:
    for f in course.repository_files(REPO):
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dst / f)
    return dst


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("student") / "copy"
    course.make_copy(out)
    return out


def test_every_part_names_functions_that_exist_and_has_tests():
    text = (REPO / course.PART_TESTS).read_text()
    for p in course.PARTS:
        for function in p.functions:
            file, qualname = course.split_name(function)
            course.find_function(ast.parse((REPO / file).read_text()), qualname)  # raises if it is gone
        assert f"@pytest.mark.{p.marker}\n" in text, p
    assert sum(p.points for p in course.PARTS) == 100
    assert {n for n, *_ in MUTATIONS} == {p.number for p in course.PARTS}
    assert all(sum(m[0] == p.number for m in MUTATIONS) >= 2 for p in course.PARTS)


def test_stub_keeps_signature_and_docstring():
    source = 'class A:\n    def f(self, x: int) -> int:\n        """Doc.\n\n        More."""\n        # a hint\n' \
             '        y = x + 1\n        return y\n\n\ndef g():\n    """G."""\n    return 2\n'
    out = course.stub_source(source, [("A.f", "part 1: A.f"), ("g", "part 2: g")])
    assert out == ('class A:\n    def f(self, x: int) -> int:\n        """Doc.\n\n        More."""\n'
                   "        raise NotImplementedError('part 1: A.f')\n\n\n"
                   "def g():\n    \"\"\"G.\"\"\"\n    raise NotImplementedError('part 2: g')\n")
    with pytest.raises(LookupError):
        course.stub_source("def h():\n    return 1\n", [("h", "part 3: h")])  # no contract, no part


@pytest.mark.slow
def test_the_reference_scores_full_points(tmp_path):
    results = grade(plain_copy(tmp_path))
    assert results["score"] == 100 and all(t["score"] == t["max_score"] for t in results["tests"])


@pytest.mark.slow
def test_the_student_copy_scores_zero_each_part_with_its_own_stub(student):
    assert not any((student / f).exists() for f in course.TEACHER_ONLY)
    assert not (student / ".git").exists()
    results = grade(student)
    assert results["score"] == 0
    for p in course.PARTS:
        mine = [t for t in results["tests"] if t["name"].startswith(f"part {p.number}:")]
        assert mine, p
        for t in mine:
            assert t["output"].startswith(f"NotImplementedError: part {p.number}: "), (p.number, t)


def test_no_reference_body_survives_in_the_student_copy(student):
    assert course.leaked_lines(student) == []
    plain = REPO / "dowp.py"
    assert "self.taylor -= " in plain.read_text()  # the check itself sees a body line where one is


def test_the_leak_check_finds_a_copied_body(student, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(student, copy)
    (copy / "notes.py").write_text((REPO / "dowp.py").read_text())  # a student pastes the reference somewhere
    assert "self.taylor -= (self.a.detach().float() * self.a.grad.float()).sum((0, 1)).double()" in \
        course.leaked_lines(copy)


def test_make_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(UserError):
        course.make_copy(tmp_path)
    with pytest.raises(UserError):
        course.make_copy(REPO / "docs" / "copy")  # inside the repository


def mutant_source(root: Path, function: str, right: str, wrong: str) -> tuple[str, str]:
    """(file, its source with `right` replaced by `wrong` inside `function`'s body, where it must stand once)."""
    file, qualname = course.split_name(function)
    source = (root / file).read_text()
    start, end = course.body_lines(course.find_function(ast.parse(source), qualname))
    lines = source.splitlines(keepends=True)
    body = "".join(lines[start - 1:end])
    assert body.count(right) == 1, f"{function}: {right!r} is not in its body once"
    lines[start - 1:end] = [body.replace(right, wrong)]
    return file, "".join(lines)


def grade_in_copy(reference: Path, variants: list[dict], numbers: list[int]) -> list[list[dict]]:
    """course.grade_variants in a fresh process in a copy of the reference: each variant's score rows."""
    (reference / "variants.json").write_text(json.dumps(variants))
    code = ("import course, json, sys; v = json.load(open('variants.json')); "
            f"print(json.dumps(course.grade_variants(v, {numbers!r})))")
    run = subprocess.run([sys.executable, "-c", code], cwd=reference, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return plain_copy(tmp_path_factory.mktemp("reference"))


@pytest.mark.slow
def test_every_wrong_implementation_loses_its_parts_points(reference):
    caught = []
    for n in sorted({m[0] for m in MUTATIONS}):  # one process per part, its mutations graded one after another
        mine = [m for m in MUTATIONS if m[0] == n]
        variants = [dict([mutant_source(REPO, function, right, wrong)]) for _, function, right, wrong in mine]
        for (_, function, _, wrong), (row,) in zip(mine, grade_in_copy(reference, variants, [n])):
            caught.append(row["score"] < row["max_score"] or f"part {n}: {wrong!r} in {function} still scores full")
    assert all(c is True for c in caught), [c for c in caught if c is not True]


@pytest.mark.slow
def test_a_stub_costs_its_own_part_only(reference):
    variants = []
    for p in course.PARTS:
        stubs = course.stubs_by_file([p])
        variants.append({f: course.stub_source((REPO / f).read_text(), s) for f, s in stubs.items()})
    rows = grade_in_copy(reference, variants, [p.number for p in course.PARTS])
    for p, got in zip(course.PARTS, rows):
        for r in got:
            assert r["score"] == (0 if r["part"] == p.number else r["max_score"]), (p.number, r)
