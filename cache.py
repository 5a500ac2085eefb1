"""cache.py — one keyed, checksummed cache for every long computation the stage scripts keep on disk.

A cache entry is a file that holds a key (a dict of every setting the content depends on: model fingerprint, data,
budget...), the content, and a sha256 of the content. Loading gives the content back only when the file exists,
was written with the same key, and still matches its sha256; otherwise the caller computes it again. So a changed
setting never reuses stale numbers, and a damaged file (a flipped bit, a cut-off write) costs a recomputation,
announced in one line on stderr, never a traceback and never a silently wrong result.

Two kinds of content:
    tensors  {name: tensor} in a safetensors file (checkpoints.write_safetensors); key and sha256 in its metadata
    rows     {name: JSON-able row} in a JSON file {"key", "content_sha256", "rows"}; `RowCache` adds rows one at a
             time, writing the file after each, so a killed job resumes after its last finished row

Every write goes through cli.write_atomic (a unique temp file renamed into place): a reader sees the old file or
the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import checkpoints as ckpt
from cli import UserError, write_atomic


def key_digest(key: dict) -> str:
    """sha256 of the key as sorted JSON: the same settings always give the same digest (for file names)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def say_recomputing(path, why: str):
    """The one stderr line of a cache that cannot be used."""
    print(f"cache {path} is {why}; recomputing", file=sys.stderr)


# ----------------------------------------------------------------------------- tensors

def save_tensors(path, key: dict, tensors: dict):
    """Write {name: tensor} with its key and a content sha256 (checkpoints.content_sha256) in the metadata."""
    ckpt.write_safetensors(Path(path), tensors, {"key": json.dumps(key, sort_keys=True)}, checksum=True)


def load_tensors(path, key: dict) -> dict | None:
    """The tensors saved under `key` at `path`, or None when the file is missing, was written with another key, or is
    damaged (one line on stderr for the last two)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        tensors, metadata = ckpt.read_safetensors(path, with_metadata=True)
    except UserError as e:  # a cut-off file or a broken header
        say_recomputing(path, f"damaged ({str(e).removeprefix(f'{path}: ')})")
        return None
    stored = {k: v for k, v in metadata.items() if k != ckpt.CHECKSUM_KEY}
    if metadata.get(ckpt.CHECKSUM_KEY) != ckpt.content_sha256(tensors, stored):
        say_recomputing(path, "damaged (checksum)")
        return None
    if metadata.get("key") != json.dumps(key, sort_keys=True):
        say_recomputing(path, "from other settings")
        return None
    return {name: t.clone() for name, t in tensors.items()}  # clones: the file may be rewritten while they live


def cached_tensors(path, key: dict, compute) -> dict:
    """The tensors saved under `key` at `path`, else `compute()` now, saved, and returned."""
    tensors = load_tensors(path, key)
    if tensors is None:
        tensors = compute()
        save_tensors(path, key, tensors)
    return tensors


# ----------------------------------------------------------------------------- rows

def rows_sha256(key: dict, rows: dict) -> str:
    """sha256 of key and rows as sorted JSON (floats round-trip exactly through JSON, so a re-read hashes the same)."""
    return hashlib.sha256(json.dumps({"key": key, "rows": rows}, sort_keys=True).encode()).hexdigest()


def save_rows(path, key: dict, rows: dict):
    write_atomic(path, json.dumps({"key": key, "content_sha256": rows_sha256(key, rows), "rows": rows}))


def load_rows(path, key: dict) -> dict | None:
    """The rows saved under `key` at `path`, or None when the file is missing, was written with another key, or is
    damaged (one line on stderr for the last two)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_bytes())
    except ValueError:  # not JSON, or not UTF-8 (UnicodeDecodeError is a ValueError)
        say_recomputing(path, "damaged (not JSON)")
        return None
    if not (isinstance(saved, dict) and isinstance(saved.get("rows"), dict) and "key" in saved):
        say_recomputing(path, "damaged (not a rows file)")
        return None
    if saved.get("content_sha256") != rows_sha256(saved["key"], saved["rows"]):
        say_recomputing(path, "damaged (checksum)")
        return None
    if saved["key"] != key:
        say_recomputing(path, "from other settings")
        return None
    return saved["rows"]


class RowCache:
    """Results of a long job, one row per name, written atomically after each row, so a killed run resumes without
    recomputing what finished. Rows saved under another key (another model, data or setting) are not reused."""

    def __init__(self, path, key: dict):
        self.path, self.key = Path(path), key
        self.rows = load_rows(self.path, key) or {}

    def get(self, name: str, compute):
        """The row called `name`: from the file, or `compute()` now and saved before it is returned."""
        if name not in self.rows:
            self.put(name, compute())
        return self.rows[name]

    def put(self, name: str, row):
        """Set the row called `name` (new or updated) and save the file."""
        self.rows[name] = row
        save_rows(self.path, self.key, self.rows)
