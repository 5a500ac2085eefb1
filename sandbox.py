"""sandbox.py — run untrusted Python programs (HumanEval / MBPP completions) and say whether they passed.

Used by evaluate.py: `run_many(programs)` returns one SandboxResult per program, in order, and
`sandbox_config().describe()` says in one line how the programs are isolated.

Isolation (the default; needs util-linux `unshare`, and root or unprivileged user namespaces):
    - new mount, pid and network namespaces (no network but a down loopback; `kill`, `ps` and /proc see only
      the program's own processes) and, without root, a user namespace
    - a private root: a tmpfs capped at 64 MiB that holds everything the program can write (/tmp, /var/tmp,
      /dev/shm, /run/lock, its working directory /sandbox) and that only its mount namespace sees, so nothing
      it writes outlives it. Bound into it read-only and nosuid: /usr, /bin, /sbin, /lib*, /etc/ld.so.cache and
      the interpreter's own directories; plus /dev/{null,zero,full,random,urandom} and a fresh /proc. Nothing
      else of the host is there: not the repository, the data, /work, /home, the rest of /root, /sys or /etc
    - as root: a fresh, otherwise unused uid with no groups (it cannot signal or ptrace anything outside, and
      RLIMIT_NPROC counts only its own processes); without root: no capabilities left in its user namespace
    - RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE, RLIMIT_NPROC (fork bombs), RLIMIT_NOFILE, no core files
    - a wall-clock timeout. The program runs as the child of a trusted supervisor that is pid 1 of the namespace;
      when the supervisor ends (the program returned, or we killed it) the kernel kills all that is left in it
    - its output comes back through a pipe that we drain as it is written, keeping only the last 4 KiB: no file
      the program could delete, swap for a FIFO, or point at /dev/zero or at a file only we may read
Without isolation (only with allow_unsandboxed=True, `--allow-unsandboxed` in evaluate.py, and describe() says
UNSANDBOXED): the same limits, uid drop and verdict, but the program can use the network, see host processes,
read and write whatever its uid may, and a process that leaves our process group can outlive the run.

The verdict. A program passes only if the trusted bootstrap saw its code return normally and said so on a
channel of its own: we draw a random nonce per run and hand it to the bootstrap on its stdin (never in the
program's source, code object, argv, environment or files; stdin is swapped for /dev/null before the program
runs); when exec() of the program returns, the bootstrap writes the nonce to a separate pipe, the verdict pipe,
and exits at once. We require exactly that nonce on the verdict pipe, exit status 0 and no timeout. So printing
anything, exiting early (sys.exit, os._exit, signals), atexit hooks, replacing sys.stdout, patching os or
builtins, or writing junk to every file descriptor cannot turn a failing test into a pass.
Not covered, plainly: the tests run in the same interpreter as the completion, and whatever the bootstrap does
after passing tests, code in that process could do first, given the nonce. So code that deliberately
manipulates its interpreter can still fake a pass: reading the nonce from the bootstrap's frame or memory
(sys._getframe, gc, ctypes), jumping over asserts with sys.settrace, patching builtins the tests call, or
returning objects whose __eq__ always answers True (a known weakness of HumanEval's own tests). Closing that
needs the tests to run in another process than the completion. Nor does anything here defend against kernel
exploits: for a model you do not trust at all, add a VM.
"""
from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

from tqdm import tqdm

from cli import UserError

UNSHARE = "unshare"  # util-linux; a test points this elsewhere to see the refusal without isolation
OUTPUT_TAIL = 4096   # bytes of the program's output kept for SandboxResult.detail

# Runs first in the child, as root (or root of its user namespace), trusted: read the run's settings and the
# nonce from stdin, build the private root, then fork. The parent stays as pid 1 of the namespace until the
# program ends; the child sets limits, drops privileges and runs the program. Everything is inside functions so
# that the program (run as a fresh __main__ module) does not find the nonce in a module's globals.
_BOOTSTRAP = r'''
import builtins, ctypes, json, os, resource, sys, traceback, types

libc = ctypes.CDLL(None, use_errno=True)


def mount(src, dst, kind, flags, data=""):
    b = lambda s: s.encode() if s else None
    if libc.mount(b(src), b(dst), b(kind), flags, b(data)) != 0:
        raise OSError(ctypes.get_errno(), f"mount {src or kind} on {dst}: {os.strerror(ctypes.get_errno())}")


def private_root(root, uid):
    """Mount a tmpfs at `root`, bind what the interpreter needs into it, read-only, and chroot there."""
    RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC = 1, 2, 4, 8, 32, 4096, 16384
    mount("", root, "tmpfs", NOSUID | NODEV, "size=64m,nr_inodes=16384,mode=755")
    done = []
    for path in ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
                 sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]:
        if not os.path.lexists(path) or any(path == d or path.startswith(d + "/") for d in done):
            continue
        done.append(path)
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            os.symlink(os.readlink(path), root + path)
            continue
        os.mkdir(root + path) if os.path.isdir(path) else open(root + path, "w").close()
        mount(path, root + path, "", BIND | REC)
        mount("", root + path, "", REMOUNT | BIND | RDONLY | NOSUID | NODEV)
    os.mkdir(root + "/dev")
    for name in ("null", "zero", "full", "random", "urandom"):
        open(f"{root}/dev/{name}", "w").close()
        mount(f"/dev/{name}", f"{root}/dev/{name}", "", BIND)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    for d in ("tmp", "var/tmp", "dev/shm", "run/lock", "sandbox", "proc"):
        os.makedirs(f"{root}/{d}")
        os.chmod(f"{root}/{d}", {"sandbox": 0o700, "proc": 0o555}.get(d, 0o1777))
    if uid is not None:
        os.chown(f"{root}/sandbox", uid, uid)
    mount("", root + "/proc", "proc", NOSUID | NODEV | NOEXEC)  # our pid namespace's processes only
    os.chroot(root)
    os.chdir("/sandbox")


def drop_privileges(cfg):
    for name, value in cfg["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary or file capability gives anything back
    if cfg["uid"] is not None:  # we are real root: become the fresh uid (this drops every capability)
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    elif cfg["isolate"]:  # root of our own user namespace: drop its capabilities, and from the bounding set too
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
        if libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()) != 0:
            raise OSError(ctypes.get_errno(), "capset")


def run(cfg):
    """The child: run the program; write the nonce on the verdict pipe only if its code returned normally."""
    nonce, source, verdict = cfg.pop("nonce").encode(), cfg.pop("source"), cfg.pop("verdict_fd")
    drop_privileges(cfg)
    del cfg
    os.set_inheritable(verdict, False)
    write, exit_, getpid, out, err, fail = os.write, os._exit, os.getpid, sys.stdout, sys.stderr, BaseException
    me = getpid()  # these are our references: the program may patch os, sys and builtins, not our locals
    module = types.ModuleType("__main__")
    sys.modules["__main__"], sys.argv = module, ["program.py"]
    try:
        exec(compile(source, "program.py", "exec"), module.__dict__)
        passed = True
    except fail:
        passed = False
        try:
            out.flush()
            traceback.print_exc()
        except fail:
            pass
    if passed and getpid() == me:  # a fork of the program that runs on into our code says nothing
        write(verdict, nonce)
    for stream in (out, err):
        try:
            stream.flush()
        except fail:
            pass
    exit_(0 if passed else 1)  # now: no atexit hook, thread or finaliser of the program runs after the verdict


def main():
    cfg = json.loads(sys.stdin.buffer.read())
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)  # the program reads EOF, not our stdin
    os.close(null)
    if cfg["isolate"]:
        private_root(cfg["root"], cfg["uid"])
    pid = os.fork()
    if pid == 0:
        run(cfg)
    os.close(cfg["verdict_fd"])
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os._exit(code if code >= 0 else 128 - code)  # pid 1 exits: the kernel kills whatever the program left


main()
'''

PROBE = "import copy, heapq, string, collections, math, re\nassert heapq.nlargest(1, [3, 1]) == [3]"


@dataclass
class SandboxResult:
    passed: bool      # the bootstrap saw the program return normally (see the module docstring)
    status: str       # "passed", "failed" (exception, early exit, killed) or "timeout"
    detail: str = ""  # last 4 KiB of stdout+stderr, for debugging a failure
    uid: int | None = None  # the uid it ran as (lets tests check no process of it survived)


@dataclass(frozen=True)
class SandboxConfig:
    isolate: bool   # namespaces + private root (see the module docstring); False only when explicitly allowed
    drop_uid: bool  # we are root: each program runs as a fresh unprivileged uid
    python: str     # the interpreter that runs the bootstrap and the program

    def describe(self) -> str:
        who = "a fresh unprivileged uid" if self.drop_uid else "your own uid"
        if self.isolate:
            caps = "a fresh unprivileged uid" if self.drop_uid else "a user namespace without capabilities"
            return (f"isolated: private read-only root with capped tmpfs, mount+pid+network namespaces, {caps}, "
                    f"rlimits, timeout ({self.python})")
        return (f"UNSANDBOXED (--allow-unsandboxed): programs can use the network, see host processes and read "
                f"and write what {who} may; only rlimits and a timeout ({self.python})")


def _launch(source: str, cfg: SandboxConfig, timeout: float, memory_mb: int) -> SandboxResult:
    nonce = secrets.token_hex(16)
    # a fresh uid per run: RLIMIT_NPROC is counted per uid, so a fork bomb only exhausts its own quota
    uid = 100_000 + secrets.randbelow(2**30) if cfg.drop_uid else None
    # a unique empty directory: the mount point of the private root, or the working directory without isolation
    root = tempfile.mkdtemp(prefix="free_moe_sandbox_")
    verdict_r, verdict_w = os.pipe()
    proc = None
    try:
        if uid is not None and not cfg.isolate:
            os.chown(root, uid, uid)
        limits = {"RLIMIT_CPU": int(timeout) + 1, "RLIMIT_AS": memory_mb * 2**20, "RLIMIT_FSIZE": 16 * 2**20,
                  "RLIMIT_NPROC": 32, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}
        payload = json.dumps({"isolate": cfg.isolate, "root": root, "uid": uid, "limits": limits,
                              "verdict_fd": verdict_w, "nonce": nonce, "source": source}).encode()
        argv = [cfg.python, "-I", "-S", "-c", _BOOTSTRAP]  # isolated mode, no site-packages
        if cfg.isolate:  # --kill-child: if unshare is killed, so is pid 1, and with it the whole namespace
            userns = [] if os.geteuid() == 0 else ["--map-root-user"]
            argv = [UNSHARE, *userns, "--mount", "--net", "--pid", "--fork", "--kill-child"] + argv
        home = "/sandbox" if cfg.isolate else root
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp" if cfg.isolate else root, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                pass_fds=(verdict_w,), cwd=root, env=env,
                                start_new_session=True)  # own process group, killed as a whole below
        os.close(verdict_w)
        verdict_w = None  # only the child holds the write end now, so its exit means EOF
        try:  # the trusted bootstrap reads all of stdin before anything of the program runs
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        deadline = time.monotonic() + timeout
        verdict, output = _drain(proc.stdout.fileno(), verdict_r, deadline)
        try:  # the pipes close a moment before the exit is reported
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except OSError:  # stdin, if the child died before reading it
                    pass
        for fd in (verdict_r, verdict_w):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(root, ignore_errors=True)  # with isolation the host directory stayed empty
    detail = output.decode("utf-8", "replace")
    if timed_out:
        return SandboxResult(False, "timeout", detail, uid)
    passed = proc.returncode == 0 and verdict == nonce.encode()
    return SandboxResult(passed, "passed" if passed else "failed", detail, uid)


def _drain(out_fd: int, verdict_fd: int, deadline: float) -> tuple[bytes, bytes]:
    """Read the output and verdict pipes as they are written, until both close or the deadline: at most 64 bytes
    of verdict and the last OUTPUT_TAIL bytes of output are kept, so no child can fill our memory or block us."""
    kept = {out_fd: b"", verdict_fd: b""}
    with selectors.DefaultSelector() as sel:
        for fd in kept:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(0.0, min(0.5, deadline - time.monotonic()))):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                elif key.fd == verdict_fd:
                    kept[verdict_fd] = (kept[verdict_fd] + chunk)[:64]
                else:
                    kept[out_fd] = (kept[out_fd] + chunk)[-OUTPUT_TAIL:]
    return kept[verdict_fd], kept[out_fd]


@cache
def sandbox_config(allow_unsandboxed: bool = False) -> SandboxConfig:
    """The isolated sandbox, checked by running a small program in it with each candidate interpreter; without
    isolation, a UserError unless allow_unsandboxed. The probe imports modules Python does not load at startup,
    so an interpreter whose library the sandbox cannot read is caught here, and the next one (the system
    python3) is tried."""
    root = os.geteuid() == 0
    pythons = list(dict.fromkeys(p for p in (sys.executable, shutil.which("python3"), "/usr/bin/python3")
                                 if p and os.path.exists(p)))
    why = f"`{UNSHARE}` (util-linux) not found"
    if shutil.which(UNSHARE):
        for python in pythons:
            cfg = SandboxConfig(True, root, python)
            res = _launch(PROBE, cfg, timeout=20, memory_mb=1024)
            if res.passed:
                return cfg
            why = (res.detail.strip().splitlines() or [res.status])[-1]
    if not allow_unsandboxed:
        raise UserError(f"cannot isolate generated programs ({why}); run as root or enable user namespaces, "
                        f"or pass --allow-unsandboxed to run them with only rlimits and a timeout")
    for python in pythons:
        cfg = SandboxConfig(False, root, python)
        if _launch(PROBE, cfg, timeout=20, memory_mb=1024).passed:
            return cfg
    raise UserError("cannot run even a small program in the sandbox (no interpreter whose library is readable)")


def run_sandboxed(source: str, timeout: float = 10.0, memory_mb: int = 2048,
                  allow_unsandboxed: bool = False) -> SandboxResult:
    """Run one Python program in the sandbox; it passes if its code returns normally (see the module docstring)."""
    return _launch(source, sandbox_config(allow_unsandboxed), timeout, memory_mb)


def run_many(sources: list[str], timeout: float = 10.0, workers: int = 2, progress: bool = False,
             allow_unsandboxed: bool = False) -> list[SandboxResult]:
    """Run programs in parallel (threads only wait on child processes), results in input order."""
    sandbox_config(allow_unsandboxed)  # probe once before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda s: run_sandboxed(s, timeout, allow_unsandboxed=allow_unsandboxed), sources)
        return list(tqdm(it, total=len(sources), desc="sandbox", disable=not progress, leave=False))
