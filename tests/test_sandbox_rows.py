"""The benchmark rows the sandbox runs: data.load_humaneval / load_mbpp refuse rows of the wrong types, naming the
file and the row, before anything is formatted into a program (a HumanEval `test` that is a list was scored)."""
import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data as D  # noqa: E402
from cli import UserError  # noqa: E402

HUMANEVAL = {"task_id": "HumanEval/0", "prompt": "def f():\n    \"\"\"One.\"\"\"\n",
             "canonical_solution": "    return 1\n", "test": "def check(candidate):\n    assert candidate() == 1\n",
             "entry_point": "f"}
MBPP = {"task_id": 11, "text": "Return one.", "code": "def f():\n    return 1", "test_setup_code": "",
        "test_list": ["assert f() == 1"], "challenge_test_list": []}


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Our own rows in place of the benchmark files (whose pinned sha256 they would not match)."""
    paths = {}
    monkeypatch.setattr(D, "data_file", lambda name, data_dir=None: paths[name])

    def write(rows, name):
        paths[name] = path = tmp_path / name.replace("/", "_")
        text = "".join(json.dumps(r) + "\n" for r in rows)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
        return path
    return write


def test_good_rows_load(files):
    files([HUMANEVAL, HUMANEVAL], "humaneval/HumanEval.jsonl.gz")
    files([MBPP, {k: v for k, v in MBPP.items() if k != "test_setup_code"}], "mbpp/mbpp.jsonl")
    assert len(D.load_humaneval()) == 2 and len(D.load_mbpp()) == 2


@pytest.mark.parametrize("field, value", [("test", ["def check(candidate):", "    assert True"]), ("prompt", None),
                                          ("canonical_solution", 1), ("task_id", 0), ("entry_point", ["f"]),
                                          ("entry_point", "f(); import os")])
def test_humaneval_rows_of_the_wrong_type_are_refused(files, field, value):
    path = files([HUMANEVAL, {**HUMANEVAL, field: value}], "humaneval/HumanEval.jsonl.gz")
    with pytest.raises(UserError, match=f"corrupt data file {path}: row 2 .*{field}"):
        D.load_humaneval()


@pytest.mark.parametrize("field, value", [("test_list", "assert f() == 1"), ("test_list", [1]), ("task_id", "11"),
                                          ("task_id", True), ("code", None), ("text", ["x"]),
                                          ("test_setup_code", ["x = 1"])])
def test_mbpp_rows_of_the_wrong_type_are_refused(files, field, value):
    path = files([MBPP, {**MBPP, field: value}], "mbpp/mbpp.jsonl")
    with pytest.raises(UserError, match=f"corrupt data file {path}: row 2 "):
        D.load_mbpp()
