"""sandbox.py — run untrusted Python programs (HumanEval / MBPP completions) and say whether they passed.

Used by evaluate.py: `run_many(programs)` returns one SandboxResult per program, in order.

Each program runs in a fresh process, never in the evaluator:
    - its own temporary working directory, deleted afterwards; a minimal environment; python -I -S (isolated,
      no site-packages); the interpreter is ours, or the system python3 when the sandbox uid cannot read ours
    - a new network namespace (`unshare -n`: no interfaces but a down loopback) and a new pid namespace (when
      its first process dies the kernel kills every process left in it, even ones that left the process group)
    - as root: a fresh, otherwise unused uid with no groups, so it cannot write or delete the evaluator's files,
      cannot signal the evaluator, and RLIMIT_NPROC (which root ignores) counts only its own processes
    - RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE (file size), RLIMIT_NPROC (fork bombs), RLIMIT_NOFILE
    - a wall-clock timeout, after which its whole process group is killed
    - a pass needs exit code 0 AND a random marker printed after the tests, so sys.exit(0) early is a failure
  Not covered: world-writable directories (/tmp, /dev/shm) stay writable by the sandbox uid; without root the
  program runs as the evaluator's user (still in its own namespaces, with Python-level guards on sockets and
  os.kill) and could touch that user's files; nothing here defends against kernel exploits. Use a VM or
  container for untrusted models.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

from tqdm import tqdm

from cli import UserError


# Runs inside the child, as its own process. Still root (if we were) for its first lines: set the limits,
# drop to the sandbox uid, then run the program as __main__ in the same interpreter (one interpreter start
# per program, not two).
_BOOTSTRAP = r"""
import json, os, resource, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if cfg["uid"] is not None:
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
if cfg["guard"]:  # weak fallback only when the OS-level isolation is unavailable
    import socket
    def _blocked(*args, **kwargs):
        raise PermissionError("blocked in the sandbox")
    socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _blocked
    os.kill = os.killpg = _blocked
os.chdir(cfg["cwd"])
sys.argv = ["program.py"]
with open("program.py") as f:
    code = compile(f.read(), "program.py", "exec")
del json, os, resource, f, name, value, cfg
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
"""


@dataclass
class SandboxResult:
    passed: bool      # exit code 0 and the marker printed after the tests
    status: str       # "passed", "failed" (exception / nonzero exit / no marker) or "timeout"
    detail: str = ""  # last lines of stderr, for debugging a failure
    uid: int | None = None  # the uid it ran as (lets tests check no process of it survived)


@dataclass
class SandboxConfig:
    namespaces: bool  # wrap in `unshare -n -p -f --kill-child`
    drop_uid: bool    # root only: run as a fresh unprivileged uid
    guard: bool       # Python-level socket/os.kill guards, used when the above are missing
    python: str = sys.executable  # an interpreter whose standard library the sandbox uid can read

    def describe(self) -> str:
        if self.namespaces and self.drop_uid:
            return f"network+pid namespaces, unprivileged uid, rlimits, timeout ({self.python})"
        parts = ["network+pid namespaces" if self.namespaces else "no namespaces (unshare unavailable)",
                 "unprivileged uid" if self.drop_uid else "same uid as the evaluator"]
        return ", ".join(parts) + f", rlimits, timeout, Python guards (weak) ({self.python})"


def _launch(source: str, cfg: SandboxConfig, timeout: float, memory_mb: int) -> SandboxResult:
    marker = "SANDBOX-OK-" + secrets.token_hex(8)
    # a fresh uid per run: RLIMIT_NPROC is counted per uid, so a fork bomb only exhausts its own quota
    uid = 100_000 + secrets.randbelow(900_000) if cfg.drop_uid else None
    workdir = tempfile.mkdtemp(prefix="free_moe_sandbox_")
    try:
        os.chmod(workdir, 0o700)
        if uid is not None:
            os.chown(workdir, uid, uid)
        with open(os.path.join(workdir, "program.py"), "w") as f:
            f.write(source + f"\n\nprint({marker!r})\n")
        limits = {"RLIMIT_CPU": int(timeout) + 1, "RLIMIT_AS": memory_mb * 2**20, "RLIMIT_FSIZE": 16 * 2**20,
                  "RLIMIT_NPROC": 32, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}
        config = json.dumps({"limits": limits, "uid": uid, "guard": cfg.guard, "cwd": workdir})
        argv = [cfg.python, "-I", "-S", "-c", _BOOTSTRAP, config]  # isolated mode, no site-packages
        if cfg.namespaces:  # without root, a user namespace (--map-root-user) makes the others possible
            userns = [] if os.geteuid() == 0 else ["--map-root-user"]
            argv = ["unshare", *userns, "--net", "--pid", "--fork", "--kill-child"] + argv
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        # stdout/stderr go to files (capped by RLIMIT_FSIZE), so a program printing forever cannot fill our memory
        with open(os.path.join(workdir, "stdout"), "wb") as out, open(os.path.join(workdir, "stderr"), "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir, env=env,
                                    start_new_session=True)  # own process group, killed as a whole below
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        stdout = _tail(os.path.join(workdir, "stdout"))
        stderr = _tail(os.path.join(workdir, "stderr"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if timed_out:
        return SandboxResult(False, "timeout", stderr, uid)
    lines = stdout.strip().splitlines()
    passed = proc.returncode == 0 and bool(lines) and lines[-1] == marker
    return SandboxResult(passed, "passed" if passed else "failed", stderr, uid)


def _tail(path: str, n: int = 2000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - n))
        return f.read().decode("utf-8", "replace")


@lru_cache(maxsize=1)
def sandbox_config() -> SandboxConfig:
    """The strongest isolation that works here, found by running a small program under each candidate.

    The probe imports modules Python does not load at startup: as an unprivileged uid, an interpreter installed
    under a private home (e.g. pyenv in /root) starts but cannot read its standard library, so the next
    interpreter on the list (the system python3) is tried."""
    root = os.geteuid() == 0
    pythons = list(dict.fromkeys(p for p in (sys.executable, shutil.which("python3"), "/usr/bin/python3")
                                 if p and os.path.exists(p)))
    # (namespaces, drop_uid, guard): without root the program keeps our uid, so the Python guards stay on
    modes = [(True, root, not root), (False, root, not root), (False, False, True)]
    probe = "import copy, heapq, string, collections, math, re\nassert heapq.nlargest(1, [3, 1]) == [3]"
    for namespaces, drop_uid, guard in modes:
        if namespaces and not shutil.which("unshare"):
            continue
        for python in pythons:
            cfg = SandboxConfig(namespaces, drop_uid, guard, python)
            if _launch(probe, cfg, timeout=20, memory_mb=1024).passed:
                return cfg
    raise UserError("cannot run even a small program in the sandbox (no interpreter whose library is readable)")


def run_sandboxed(source: str, timeout: float = 10.0, memory_mb: int = 2048) -> SandboxResult:
    """Run one Python program in the sandbox; it passes if it exits 0 and gets to the end."""
    return _launch(source, sandbox_config(), timeout, memory_mb)


def run_many(sources: list[str], timeout: float = 10.0, workers: int = 2, progress: bool = False) -> list[SandboxResult]:
    """Run programs in parallel (threads only wait on child processes), results in input order."""
    sandbox_config()  # probe once before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda s: run_sandboxed(s, timeout), sources)
        return list(tqdm(it, total=len(sources), desc="sandbox", disable=not progress, leave=False))
