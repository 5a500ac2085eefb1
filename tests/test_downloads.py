"""Tests for downloads.py: one deadline covers connect, headers and body (servers on 127.0.0.1 that trickle either
one byte at a time), a normal download is whole, and leaving a Deadline wakes every read still blocked."""
import sys
import threading
import time
import urllib.error
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import downloads  # noqa: E402
from conftest import TrickleServer  # noqa: E402

BODY = bytes(range(256)) * 40


@pytest.fixture
def server(request):
    servers = []

    def start(trickle, **kw):
        servers.append(TrickleServer({"/f": BODY}, trickle, **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def fetch(url, seconds):
    parts = []
    with downloads.Deadline(seconds) as deadline:
        downloads.download(url, parts.append, deadline)
    return b"".join(parts)


@pytest.mark.parametrize("trickle", ["headers", "body"])
def test_a_trickling_server_is_given_up_at_the_deadline(server, trickle):
    s = server(trickle)
    t0 = time.monotonic()
    with pytest.raises(downloads.TooSlow, match="not done after 1 s"):
        fetch(s.url + "/f", 1.0)
    assert 0.9 < time.monotonic() - t0 < 4


def test_a_prompt_server_gives_the_whole_body_and_errors_pass_through(server):
    s = server("body", fast=("/f",))
    assert fetch(s.url + "/f", 5) == BODY
    with pytest.raises(urllib.error.HTTPError) as e:
        fetch(s.url + "/missing", 5)
    assert e.value.code == 404


def test_leaving_the_deadline_wakes_every_blocked_read(server):
    """A failure in one thread (or Ctrl-C in the main one) leaves the block; readers in other threads end at once."""
    s = server("headers")
    errors = []

    def reader(deadline):
        try:
            downloads.download(s.url + "/f", lambda chunk: None, deadline)
        except downloads.TooSlow as e:
            errors.append(e)
    with downloads.Deadline(60) as deadline:
        threads = [threading.Thread(target=reader, args=(deadline,)) for _ in range(3)]
        for t in threads:
            t.start()
        assert s.started.wait(5)
        time.sleep(0.2)
    t0 = time.monotonic()
    for t in threads:
        t.join(5)
    assert time.monotonic() - t0 < 3 and len(errors) == 3


def test_allowed_seconds_grows_with_the_size():
    assert downloads.allowed_seconds(0) == downloads.GRACE
    assert downloads.allowed_seconds(10 * downloads.MIN_RATE) == downloads.GRACE + 10
