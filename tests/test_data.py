"""Tests for data.py: domain splits, user corpora, and the one-line errors for bad data.

    python -m pytest -q tests/test_data.py
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from cli import UserError  # noqa: E402


# ----------------------------------------------------------------------------- domain splits (real files, no model)

def test_domain_splits_disjoint_and_deterministic():
    for d in data.BUILTIN_DOMAINS:
        calib, held = data.domain_documents(d, "calib"), data.domain_documents(d, "heldout")
        assert calib and held
        assert not set(calib) & set(held), d
    assert data.heldout_text("math") == data.heldout_text("math")
    rows = data.load_gsm8k("test")
    math_docs = set(data.domain_documents("math", "calib")) | set(data.domain_documents("math", "heldout"))
    assert not math_docs & {data.gsm8k_text(r) for r in rows}  # GSM8K test (scored by evaluate.py) never used
    buckets = [data.mmlu_bucket(r) for r in data.load_mmlu("test")]
    assert 0.15 < buckets.count("calib") / len(buckets) < 0.25 and 0.05 < buckets.count("heldout") / len(buckets) < 0.15


class CharTok:
    def encode(self, text, bos=False):
        return [ord(c) % 96 for c in text]


def test_user_domain_and_errors(tmp_path):
    f = tmp_path / "legal.txt"
    f.write_text("\n\n".join(f"Clause {i}: the party of the first part shall pay." for i in range(20)))
    calib = data.load_domain_tokens(f"legal={f}", CharTok(), split="calib", n_tokens=256, seq_len=64, seed=1)
    assert calib.shape == (4, 64)
    assert torch.equal(calib, data.load_domain_tokens(f"legal={f}", CharTok(), split="calib", n_tokens=256,
                                                   seq_len=64, seed=1))  # deterministic by seed
    held = data.domain_documents(f"legal={f}", "heldout")
    assert len(held) == 2 and not set(held) & set(data.domain_documents(f"legal={f}", "calib"))
    j = tmp_path / "qa.jsonl"
    j.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(10)))
    assert data.domain_documents(f"qa={j}", "heldout") == ["doc 9"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(UserError, match="0 documents"):
        data.domain_documents(f"e={empty}")
    with pytest.raises(UserError, match="unknown domain"):
        data.domain_documents("poetry")
    with pytest.raises(UserError, match="does not exist"):
        data.domain_documents(f"x={tmp_path / 'nope.txt'}")
    with pytest.raises(UserError, match="bad domain name"):
        data.parse_domain("Bad Name=x.txt")
