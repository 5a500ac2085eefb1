"""Fixtures shared by the test modules."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model as M  # noqa: E402


@pytest.fixture(scope="session")
def real_model():
    """The default real model (SmolLM2-135M-Instruct GGUF) and its tokenizer, loaded once per test run and frozen.
    Skips the test when the shared assets are not there."""
    try:
        m, tok = M.load_model()
    except M.UserError as e:
        pytest.skip(f"real model not available: {e}")
    m.requires_grad_(False)
    return m, tok
