"""Tests for cli.py, the plumbing every script shares, and for the Makefile that runs them: progress bars draw only on a
terminal (a log file gets no escape codes), one cache folder, and `make` picks the right Python (an active virtual
environment, a .venv/ made here when the system Python refuses pip installs, else python3) and prints the demo's table
once.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cli  # noqa: E402


def test_progress_writes_nothing_into_a_log_file(tmp_path):
    """A bar drawn into a file leaves carriage returns and escape codes; cli.progress draws only on a terminal."""
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import cli\n"
            "for _ in cli.progress(range(3), desc='outer'):\n"
            "    for _ in cli.progress(range(50), desc='inner', leave=False):\n        time.sleep(0.001)\n"
            "print('done', file=sys.stderr)\n")
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", code, str(REPO)], stderr=f, check=True, timeout=60)
    text = log.read_text()
    assert text == "done\n", repr(text)


def test_one_cache_folder(monkeypatch, tmp_path):
    import data
    import hub
    monkeypatch.setenv("FREE_MOE_CACHE", str(tmp_path))
    assert cli.cache_dir() == tmp_path and hub.cache_dir is cli.cache_dir and data.cache_dir is cli.cache_dir
    monkeypatch.delenv("FREE_MOE_CACHE")
    assert cli.cache_dir() == Path.home() / ".cache" / "free-moe"


# ----------------------------------------------------------------------------- the Makefile

def make_env() -> dict:
    """The environment without what a surrounding make (as `make test` is) or virtual environment would pass on."""
    drop = ("VIRTUAL_ENV", "PY", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    return {k: v for k, v in os.environ.items() if k not in drop}


def fake_python(folder: Path, externally_managed: bool) -> Path:
    """A `python3` on PATH that answers the Makefile's one question (is this Python externally managed?)."""
    folder.mkdir()
    script = folder / "python3"
    script.write_text(f"#!/bin/sh\nexit {0 if externally_managed else 1}\n")
    script.chmod(0o755)
    return folder


@pytest.mark.parametrize("managed,venv,want", [(True, None, ".venv/bin/python"), (False, None, "python3"),
                                               (True, "/some/venv", "python")])
def test_make_picks_the_python(tmp_path, managed, venv, want):
    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:
        pytest.skip("make is not installed")
    env = make_env()
    env["PATH"] = f"{fake_python(tmp_path / 'bin', managed)}:{env['PATH']}"
    if venv:
        env["VIRTUAL_ENV"] = venv
    r = subprocess.run(["make", "--no-print-directory", "-n", "test-fast"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f'{want} -m pytest -q -m "not slow" tests', r.stdout
    assert f'{want} -c "import torch' in r.stdout
    if managed and not venv and not (REPO / ".venv" / "bin" / "python").exists():
        assert "python3 -m venv .venv" in r.stdout  # made first, then used


def test_make_demo_prints_the_table_once():
    """evaluate.py's own copy of the table goes to a log under the demo folder; the demo target prints it once."""
    r = subprocess.run(["make", "--no-print-directory", "-n", "demo", "PY=python3", "DEMO=/tmp/free-moe-demo-dry-run"],
                       cwd=REPO, env=make_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "> /tmp/free-moe-demo-dry-run/eval/stdout.txt" in r.stdout
    assert r.stdout.count("results.md") == 1
