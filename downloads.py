"""downloads.py — the one way the project downloads a URL: under one deadline for the whole request.

Used by data.py (data files) and hub.py (hub models). A read timeout alone does not stop a server that trickles a
byte now and then, in its headers or its body; so every request runs under a `Deadline` that covers connecting,
the response headers, redirects and the body together. When it passes, every connection the request opened is shut
down, which wakes a read blocked on that server at once, and `download` raises TooSlow.
"""
from __future__ import annotations

import http.client
import socket
import threading
import urllib.request

READ_TIMEOUT = 30   # seconds one connect or one read may wait
GRACE = 60          # seconds every download may take, plus its size at...
MIN_RATE = 20_000   # ...this many bytes/s: a download slower than that is given up


def allowed_seconds(size: int) -> float:
    """How long a download of `size` bytes may take in all (size 0 when unknown: GRACE)."""
    return GRACE + size / MIN_RATE


class TooSlow(Exception):
    """The deadline passed before the download finished."""


class Deadline:
    """A wall-clock limit shared by one or more requests (several threads may use it). Used as a context manager:
    its clock starts on entry, and on exit every connection still open is shut down, so threads still reading
    (after another one failed, or on KeyboardInterrupt) return at once instead of at their own deadline."""

    def __init__(self, seconds: float):
        self.seconds, self.expired = seconds, False
        self._sockets, self._lock = [], threading.Lock()
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        self.expire()

    def watch(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)
        return sock

    def expire(self):
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket):
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a blocked recv returns; the owner still closes the socket
    except OSError:
        pass  # already closed


def _watched(handler_class, deadline: Deadline):
    """urllib's handler whose connections give their socket to the deadline as soon as it is connected (before the
    TLS handshake and the headers)."""
    class Watched(handler_class):
        def do_open(self, http_class, req, **kw):
            def connection(host, **args):
                conn = http_class(host, **args)
                # http.client makes its socket through this attribute, for HTTP and HTTPS alike
                conn._create_connection = lambda *a, **k: deadline.watch(socket.create_connection(*a, **k))
                return conn
            return super().do_open(connection, req, **kw)
    return Watched


def download(url: str, take, deadline: Deadline):
    """Call take(chunk) with url's body as it arrives. Raises TooSlow once the deadline has passed (connect,
    headers and body together), urllib.error.HTTPError for an HTTP error status, and OSError or
    http.client.HTTPException for the rest (offline, DNS, a connection cut)."""
    opener = urllib.request.build_opener(_watched(urllib.request.HTTPHandler, deadline),
                                         _watched(urllib.request.HTTPSHandler, deadline))
    try:
        with opener.open(url, timeout=READ_TIMEOUT) as resp:
            while chunk := resp.read1(1 << 16):  # read1: what has arrived, so the deadline is checked as bytes come
                if deadline.expired:
                    break
                take(chunk)
    except (OSError, http.client.HTTPException):
        if not deadline.expired:
            raise
    if deadline.expired:  # the deadline shut the connection: the read failed, or what came may be cut short
        raise TooSlow(f"not done after {deadline.seconds:.0f} s")
