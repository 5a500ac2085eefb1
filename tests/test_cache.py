"""Tests for cache.py, the one keyed, checksummed cache of the stage scripts: tensors and rows come back as saved,
another key is a miss, a cut-off or bit-flipped file is recomputed after one line on stderr (never a traceback),
RowCache resumes finished rows, and a failed write leaves neither a temp file nor a changed cache.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import cache  # noqa: E402
import cli  # noqa: E402

KEY = {"fingerprint": "abc", "tokens": 8192}


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"mean": torch.randn(2, 8, generator=g), "count": torch.tensor([7], dtype=torch.int64),
            "half": torch.randn(3, generator=g).to(torch.bfloat16)}


def test_tensors_round_trip_and_another_key_misses(tmp_path, capsys):
    path = tmp_path / "stats.safetensors"
    assert cache.load_tensors(path, KEY) is None  # missing: a miss, nothing said
    cache.save_tensors(path, KEY, tensors())
    back = cache.load_tensors(path, {"tokens": 8192, "fingerprint": "abc"})  # the same key in another order
    assert back.keys() == tensors().keys() and all(torch.equal(back[k], v) and back[k].dtype == v.dtype
                                                   for k, v in tensors().items())
    assert capsys.readouterr().err == ""
    assert cache.load_tensors(path, {**KEY, "tokens": 4096}) is None
    assert capsys.readouterr().err == f"cache {path} is from other settings; recomputing\n"


def test_rows_round_trip_and_another_key_misses(tmp_path, capsys):
    path, rows = tmp_path / "results.json", {"code|dense": {"nll": [0.1, 2 / 3], "active_fraction": 1.0}}
    assert cache.load_rows(path, KEY) is None
    cache.save_rows(path, KEY, rows)
    assert cache.load_rows(path, KEY) == rows and json.loads(path.read_text())["rows"] == rows
    assert cache.load_rows(path, {**KEY, "tokens": 1}) is None
    assert capsys.readouterr().err == f"cache {path} is from other settings; recomputing\n"


def damage(path: Path, how: str):
    b = bytearray(path.read_bytes())
    if how == "truncated":
        b = b[:len(b) // 2]
    else:  # one bit of the last byte of content (a tensor's data, or inside the rows' JSON)
        pos = len(b) - 1 if path.suffix == ".safetensors" else b.rindex(b"0.1") + 2
        b[pos] ^= 0x01
    path.write_bytes(bytes(b))


@pytest.mark.parametrize("how,why", [("truncated", "damaged (truncated"), ("bit", "damaged (checksum)")])
def test_a_damaged_tensor_cache_is_recomputed_with_one_line(tmp_path, capsys, how, why):
    path, calls = tmp_path / "scores.safetensors", []
    compute = lambda: calls.append(1) or tensors()  # noqa: E731
    cache.cached_tensors(path, KEY, compute)
    damage(path, how)
    capsys.readouterr()
    again = cache.cached_tensors(path, KEY, compute)
    err = capsys.readouterr().err
    assert len(calls) == 2 and err.count("\n") == 1 and err.startswith(f"cache {path} is {why}") \
        and err.endswith("; recomputing\n"), err
    assert all(torch.equal(again[k], v) for k, v in tensors().items())
    assert cache.load_tensors(path, KEY) is not None  # rewritten whole


@pytest.mark.parametrize("how,why", [("truncated", "damaged (not JSON)"), ("bit", "damaged (checksum)")])
def test_a_damaged_row_cache_is_recomputed_with_one_line(tmp_path, capsys, how, why):
    path, calls = tmp_path / "results.json", []
    compute = lambda: calls.append(1) or {"nll": [0.1, 0.25]}  # noqa: E731
    cache.RowCache(path, KEY).get("a", compute)
    damage(path, how)
    capsys.readouterr()
    assert cache.RowCache(path, KEY).get("a", compute) == {"nll": [0.1, 0.25]} and len(calls) == 2
    assert capsys.readouterr().err == f"cache {path} is {why}; recomputing\n"
    assert cache.load_rows(path, KEY) == {"a": {"nll": [0.1, 0.25]}}


def test_row_cache_resumes_and_ignores_other_settings(tmp_path):
    path, calls = tmp_path / "rows.json", []
    compute = lambda v: lambda: calls.append(v) or {"value": v}  # noqa: E731
    rows = cache.RowCache(path, {"model": "a"})
    assert rows.get("x", compute(1)) == {"value": 1} and rows.get("x", compute(2)) == {"value": 1}
    again = cache.RowCache(path, {"model": "a"})  # a new process: the finished row is read back
    assert again.get("x", compute(3)) == {"value": 1} and calls == [1]
    other = cache.RowCache(path, {"model": "b"})  # other settings: nothing reused
    assert other.get("x", compute(4)) == {"value": 4}
    assert json.loads(path.read_text())["key"] == {"model": "b"}
    other.put("x", {"value": 5})  # a row updated in place is saved too
    assert cache.load_rows(path, {"model": "b"}) == {"x": {"value": 5}}


def test_a_failed_write_leaves_no_temp_and_the_old_cache(tmp_path, monkeypatch):
    path = tmp_path / "rows.json"
    cache.save_rows(path, KEY, {"a": 1})
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(cli.os, "replace", broken_replace)
    with pytest.raises(OSError):
        cache.save_rows(path, KEY, {"a": 2})
    with pytest.raises(OSError):
        cache.save_tensors(tmp_path / "t.safetensors", KEY, tensors())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.json"] and path.read_bytes() == before


def test_key_digest_ignores_order():
    assert cache.key_digest({"a": 1, "b": [2]}) == cache.key_digest({"b": [2], "a": 1}) != cache.key_digest({"a": 2})
