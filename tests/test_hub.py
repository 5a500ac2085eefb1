"""Tests for hub.py's downloads under their deadline: a hub (on 127.0.0.1) that trickles its file list or a file,
in the headers or the body, is given up in one line, and a download cut by the deadline or by SIGTERM leaves no
.part file in the cache. Hashes, shards and offline reuse: test_robustness.py."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import downloads  # noqa: E402
import hub  # noqa: E402
from cli import UserError  # noqa: E402
from conftest import TrickleServer  # noqa: E402

CONFIG = b'{"model_type": "llama"}' * 200
LISTING = json.dumps([{"type": "file", "path": "config.json", "size": len(CONFIG),
                       "oid": hub.hashlib.sha1(b"blob %d\0" % len(CONFIG) + CONFIG).hexdigest()}]).encode()
ROUTES = {"/api/models/someorg/tiny/tree/main": LISTING, "/someorg/tiny/resolve/main/config.json": CONFIG}


@pytest.fixture
def slow_hub(monkeypatch, tmp_path):
    """Start a TrickleServer as the hub; the cache in tmp_path; a one-second deadline."""
    servers = []
    monkeypatch.setenv("FREE_MOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(downloads, "GRACE", 1.0)
    monkeypatch.setattr(downloads, "MIN_RATE", 10**9)

    def start(trickle, fast=()):
        servers.append(TrickleServer(ROUTES, trickle, fast=fast))
        monkeypatch.setenv("HF_ENDPOINT", servers[-1].url)
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def cache_files(tmp_path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


@pytest.mark.parametrize("trickle", ["headers", "body"])
def test_a_trickled_file_list_is_given_up_in_one_line(slow_hub, tmp_path, trickle):
    slow_hub(trickle)
    t0 = time.monotonic()
    with pytest.raises(UserError, match="listing the files of 'someorg/tiny' on .* is too slow") as e:
        hub.hub_download("someorg/tiny")
    assert time.monotonic() - t0 < 5 and "\n" not in str(e.value) and "--model" in str(e.value)
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize("trickle", ["headers", "body"])
def test_a_trickled_file_is_given_up_and_leaves_no_part_file(slow_hub, tmp_path, trickle):
    slow_hub(trickle, fast=tuple(ROUTES)[:1])  # the list at once, then config.json one byte at a time
    t0 = time.monotonic()
    with pytest.raises(UserError, match="downloading .*/someorg/tiny/resolve/main/config.json is too slow") as e:
        hub.hub_download("someorg/tiny")
    assert time.monotonic() - t0 < 5 and "\n" not in str(e.value) and "--model" in str(e.value)
    assert cache_files(tmp_path) == []


def test_sigterm_mid_download_leaves_no_part_file(tmp_path):
    """A script (run through cli.run_cli) killed with SIGTERM while a file trickles in: the .part file goes."""
    server = TrickleServer(ROUTES, "body", fast=tuple(ROUTES)[:1])
    env = {**os.environ, "HF_ENDPOINT": server.url, "FREE_MOE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    code = "import cli, hub; cli.run_cli(lambda: hub.hub_download('someorg/tiny'))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(name.endswith(".part") for name in cache_files(tmp_path)):
            assert time.monotonic() < deadline and proc.poll() is None, "the download never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        server.close()
    assert proc.returncode == 143 and err.decode().strip().endswith("error: terminated")
    assert cache_files(tmp_path) == []
