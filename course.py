"""course.py — the course edition: the graded parts of the method, a student copy without their bodies, a grader.

    python course.py parts                      the graded parts, in reading order, with their points
    python course.py make --out DIR             a student copy of this repository (files only, no git history):
                                                every graded function keeps its signature and docstring, and its
                                                body becomes `raise NotImplementedError("part N: ...")`
    python course.py grade [--part N ...] [--json FILE]
                                                run each part's tests (pytest marker partN, tests/test_parts.py)
                                                and print part, tests passed / total and points; FILE is the
                                                autograder results.json that course platforms read

The parts are listed once, here (PARTS). A part's tests stand alone: they build their inputs themselves (tiny
random models, hand-made statistics, brute-force oracles), so a stub in one part costs that part only.
docs/course.md is the handout; docs/course-key.md, the teacher's key, and tests/test_course.py, the tests of this
kit, are left out of the student copy.
"""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cli import ArgumentParser, UserError, markdown_table, run_cli, write_atomic

ROOT = Path(__file__).resolve().parent
PART_TESTS = "tests/test_parts.py"
TEACHER_ONLY = ("docs/course-key.md", "tests/test_course.py")  # never copied to students
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "runs", "results", "experts", "logs", "assignment",
             ".carry"}


@dataclass(frozen=True)
class Part:
    number: int
    title: str          # what the student builds, in the paper's terms
    functions: tuple    # "module.function" or "module.Class.method": the bodies the student writes
    points: int

    @property
    def marker(self) -> str:
        return f"part{self.number}"


PARTS = (
    Part(1, "warm-up: reading a GSM8K answer, unbiased pass@k",
         ("tasks.extract_gsm8k_answer", "tasks.pass_at_k"), 5),
    Part(2, "a smaller FFN that really is smaller",
         ("model.MLP.select",), 10),
    Part(3, "streamed neuron statistics (DOWP step 2)",
         ("dowp.RecordingMLP.forward", "dowp.collect_stats"), 15),
    Part(4, "the domain contrast score (DOWP step 3)",
         ("dowp.score_dowp",), 10),
    Part(5, "budget and protection (DOWP step 4)",
         ("dowp.select_neurons", "dowp.super_neurons"), 10),
    Part(6, "the first-order loss change of removing a neuron",
         ("dowp.TaylorMLP.forward", "dowp.TaylorMLP.after_backward", "dowp.loss_aware_stats"), 15),
    Part(7, "validated removal, layer by layer",
         ("search.greedy_by_layer",), 15),
    Part(8, "training the level-2 gates: relaxed gates, their cost, the mixed FFN",
         ("router.relaxed_gates", "router.expected_fraction", "router.MixedMLP.forward"), 10),
    Part(9, "the level-2 gate at inference: sign and budget rules",
         ("router.FreeMoE.gate_pattern",), 10),
)


def part(number: int) -> Part:
    for p in PARTS:
        if p.number == number:
            return p
    raise UserError(f"no part {number} (parts are {PARTS[0].number} to {PARTS[-1].number})")


# ----------------------------------------------------------------------------- finding a graded function

def find_function(tree: ast.Module, qualname: str) -> ast.FunctionDef:
    """The def of `Class.method` or `function` in a parsed module."""
    node, *_ = [tree]
    for name in qualname.split("."):
        found = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name]
        if not found:
            raise LookupError(f"{qualname}: no {name!r} found")
        node = found[0]
    if not isinstance(node, ast.FunctionDef):
        raise LookupError(f"{qualname} is not a function")
    return node


def body_lines(fn: ast.FunctionDef) -> tuple[int, int]:
    """The 1-based line range (first, last) of what a student writes: everything after the docstring. A graded
    function must have a docstring: it is the student's contract."""
    first = fn.body[0]
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value,
                                                                                                  str)):
        raise LookupError(f"{fn.name} (line {fn.lineno}) has no docstring: a graded function needs its contract")
    return first.end_lineno + 1, fn.end_lineno


def split_name(function: str) -> tuple[str, str]:
    module, qualname = function.split(".", 1)  # "dowp.RecordingMLP.forward" -> ("dowp", "RecordingMLP.forward")
    return module + ".py", qualname


# ----------------------------------------------------------------------------- the student copy

def stub_source(source: str, stubs: list[tuple[str, str]]) -> str:
    """`source` with each (qualname, message)'s body replaced by one `raise NotImplementedError(message)`."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    cuts = []
    for qualname, message in stubs:
        fn = find_function(tree, qualname)
        start, end = body_lines(fn)
        indent = " " * fn.body[0].col_offset
        cuts.append((start, end, f"{indent}raise NotImplementedError({message!r})\n"))
    for start, end, text in sorted(cuts, reverse=True):  # bottom up: earlier line numbers stay valid
        lines[start - 1:end] = [text]
    return "".join(lines)


def repository_files(root: Path) -> list[str]:
    """The files that make the project: git's tracked files where root is a checkout, else every file outside the
    folders of runs, caches and environments."""
    try:
        listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]  # tracked + new files
        out = subprocess.run(listing, cwd=root, capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(root)) for p in root.rglob("*")
                 if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts)]
    return sorted(f for f in files if f not in TEACHER_ONLY and (root / f).is_file())


def stubs_by_file(parts=PARTS) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list] = {}
    for p in parts:
        for function in p.functions:
            file, qualname = split_name(function)
            out.setdefault(file, []).append((qualname, f"part {p.number}: {function}"))
    return out


def make_copy(out: Path, root: Path = ROOT, parts=PARTS) -> list[str]:
    """Write the student copy into `out` (a new or empty folder), with the bodies of `parts` (default: every part)
    replaced by stubs; returns the files written."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: choose a new folder for the student copy")
    if out.resolve().is_relative_to(root.resolve()) and out.resolve().parts[len(root.resolve().parts)] not in SKIP_DIRS:
        raise UserError(f"{out} is inside the repository: write the student copy outside it (or to assignment/)")
    files, stubs = repository_files(root), stubs_by_file(parts)
    for f in files:
        dst = out / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        if f in stubs:
            dst.write_text(stub_source((root / f).read_text(encoding="utf-8"), stubs[f]), encoding="utf-8")
        else:
            shutil.copy2(root / f, dst)
    return files


def leaked_lines(copy_root: Path, root: Path = ROOT, min_len: int = 16) -> list[str]:
    """Lines of a graded function's reference body that a student copy still holds anywhere. Lines that also stand
    elsewhere in the reference (outside every graded body) give nothing away and are not counted; nor are short
    ones (`return out`)."""
    graded, other = set(), []
    for file in repository_files(root):
        text = (root / file).read_text(encoding="utf-8", errors="replace")
        stubs = stubs_by_file().get(file)
        if not stubs:
            other.append(text)
            continue
        lines = text.splitlines()
        tree = ast.parse(text)
        inside = set()
        for qualname, _ in stubs:
            start, end = body_lines(find_function(tree, qualname))
            inside.update(range(start - 1, end))
        graded.update(s for i in inside if len(s := lines[i].strip()) >= min_len and not s.startswith("#"))
        other.append("\n".join(lines[i] for i in range(len(lines)) if i not in inside))
    elsewhere = {s.strip() for text in other for s in text.splitlines()}
    secret = graded - elsewhere
    found = set()
    for p in Path(copy_root).rglob("*"):
        if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(copy_root).parts):
            found.update(s.strip() for s in p.read_text(encoding="utf-8", errors="replace").splitlines())
    return sorted(secret & found)


# ----------------------------------------------------------------------------- grading

class Collector:
    """A pytest plugin: which part each test belongs to, and each test's outcome and failure text."""

    def __init__(self):
        self.part_of, self.results = {}, {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            marks = [m.name for m in item.iter_markers() if m.name.startswith("part") and m.name[4:].isdigit()]
            if marks:
                self.part_of[item.nodeid] = int(marks[0][4:])

    def pytest_runtest_logreport(self, report):
        if report.nodeid not in self.part_of:
            return
        failed = report.failed or (report.when == "call" and report.skipped)
        if report.when == "call" or failed:
            prev = self.results.get(report.nodeid, (True, ""))
            crash = getattr(report.longrepr, "reprcrash", None)  # the exception's "Type: message" line
            text = (crash.message if crash else report.longreprtext.strip()[-300:]) if failed else ""
            self.results[report.nodeid] = (prev[0] and not failed, prev[1] or text)


def run_tests(numbers: list[int]) -> dict[str, tuple[int, bool, str]]:
    """Run the tests of the given parts in this process; {test id: (part, passed, the failure's message)}."""
    import pytest
    collector = Collector()
    expr = " or ".join(f"part{n}" for n in numbers)
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-m", expr, str(ROOT / PART_TESTS)], plugins=[collector])
    if code not in (0, 1):  # 1 = some tests failed: a grade; anything else is a broken run, not a grade
        raise UserError(f"the part tests could not run (pytest exit code {code}); see the output above")
    return {t: (collector.part_of[t], ok, text) for t, (ok, text) in collector.results.items()}


def score(results: dict, numbers: list[int]) -> list[dict]:
    """Per part: tests passed / total and points (each test worth the same share of its part)."""
    rows = []
    for n in numbers:
        p = part(n)
        mine = [ok for (pn, ok, _) in results.values() if pn == n]
        passed = sum(mine)
        rows.append({"part": n, "title": p.title, "passed": passed, "total": len(mine), "max_score": p.points,
                     "score": round(p.points * passed / len(mine), 2) if mine else 0.0})
    return rows


def autograder_json(results: dict, rows: list[dict]) -> dict:
    """The results.json that autograders read: one entry per test, the part's points shared among its tests."""
    tests = []
    for test_id, (n, ok, text) in sorted(results.items()):
        share = part(n).points / next(r["total"] for r in rows if r["part"] == n)
        tests.append({"name": f"part {n}: {test_id.split('::', 1)[-1]}", "score": round(share if ok else 0.0, 4),
                      "max_score": round(share, 4), "output": "passed" if ok else text})
    return {"score": round(sum(r["score"] for r in rows), 2), "tests": tests}


def grade_variants(variants: list[dict[str, str]], numbers: list[int]) -> list[list[dict]]:
    """Grade several versions of this folder's code in one process (one torch import, not one per version): each
    variant {file: source} is written in place, its modules imported afresh and the parts `numbers` graded, then
    every file is restored. Returns each variant's `score` rows. For checking the grader on wrong implementations
    in a copy of the reference (tests/test_course.py), never in a working tree one cares about."""
    originals = {}
    out = []
    try:
        for variant in variants:
            for file, source in variant.items():
                originals.setdefault(file, (ROOT / file).read_text(encoding="utf-8"))
                (ROOT / file).write_text(source, encoding="utf-8")
            fresh_imports()
            out.append(score(run_tests(numbers), numbers))
            for file in variant:
                (ROOT / file).write_text(originals[file], encoding="utf-8")
    finally:
        for file, source in originals.items():
            (ROOT / file).write_text(source, encoding="utf-8")
    return out


def fresh_imports():
    """Forget the project's modules, the tests' and their cached bytecode, so the next import reads the sources as
    they are now (a one-character edit in the same second would otherwise reuse the old bytecode)."""
    mine = {p.stem for p in ROOT.glob("*.py")} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    for name in [m for m in sys.modules if m.split(".")[0] in mine - {"course", "cli"}]:
        del sys.modules[name]
    for folder in (ROOT / "__pycache__", ROOT / "tests" / "__pycache__"):
        shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    p = ArgumentParser(description="The course edition: the graded parts, a student copy, the grader.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("parts", help="list the graded parts")
    mk = sub.add_parser("make", help="write a student copy: graded bodies replaced by NotImplementedError")
    mk.add_argument("--out", required=True, help="a new folder for the copy")
    gr = sub.add_parser("grade", help="run the part tests and print the points")
    gr.add_argument("--part", type=int, nargs="+", default=None, help="grade only these parts (default: all)")
    gr.add_argument("--json", default=None, help="also write the autograder results.json here")
    args = p.parse_args(argv)
    if args.command == "parts":
        print(markdown_table(["part", "what", "functions", "points"],
                             [[q.number, q.title, ", ".join(q.functions), q.points] for q in PARTS]))
    elif args.command == "make":
        files = make_copy(Path(args.out))
        n = sum(len(q.functions) for q in PARTS)
        print(f"wrote {len(files)} files to {args.out}: {n} graded functions in {len(PARTS)} parts are stubs; "
              f"grade there with `make grade`")
    else:
        numbers = [part(n).number for n in (args.part or [q.number for q in PARTS])]
        results = run_tests(numbers)
        rows = score(results, numbers)
        print()
        print(markdown_table(["part", "what", "tests passed", "points"],
                             [[r["part"], r["title"], f"{r['passed']} / {r['total']}",
                               f"{r['score']:g} / {r['max_score']}"] for r in rows]))
        total, best = sum(r["score"] for r in rows), sum(r["max_score"] for r in rows)
        print(f"\ntotal: {total:g} / {best}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(args.json, json.dumps(autograder_json(results, rows), indent=2) + "\n")


if __name__ == "__main__":
    run_cli(main)
