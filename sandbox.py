"""sandbox.py — run untrusted Python code (HumanEval / MBPP completions) and say whether it passed its tests.

Used by tasks.py: `run_many(programs)` returns one SandboxResult per program, in order, and
`sandbox_config().describe()` says in one line how the code is isolated. A program is either
    - a CodeTask: a candidate solution and the benchmark's tests (data.humaneval_program / data.mbpp_program). The
      solution and the tests run in two separate sandboxes: the candidate, which runs the solution as a module and
      then answers calls to its functions, and the checker, which runs the tests and alone holds the verdict;
    - a plain program (a string): one sandbox; it passes if its code runs to the end (used for probes and tests).

Isolation (each sandbox, the default; needs util-linux `unshare`, and root or unprivileged user namespaces):
    - new mount, pid, network and IPC namespaces (no network but a down loopback; `kill`, `ps` and /proc see only
      the sandbox's own processes; SysV shared memory ends with it) and, without root, a user namespace
    - a private root: a tmpfs capped at 64 MiB that holds everything the code can write (/tmp, /var/tmp, /dev/shm,
      /run/lock, its working directory /sandbox) and that only its mount namespace sees, so nothing it writes
      outlives it. Bound into it read-only and nosuid: /usr, /bin, /sbin, /lib*, /etc/ld.so.cache and the
      interpreter's own directories; plus /dev/{null,zero,full,random,urandom} and a fresh /proc. Nothing else of
      the host is there: not the repository, the data, /work, /home, the rest of /root, /sys or /etc
    - as root: a fresh, otherwise unused uid with no groups per sandbox (it cannot signal or ptrace anything
      outside, and RLIMIT_NPROC counts only its own processes); without root: no capabilities left in its user
      namespace. The checker and every supervisor are non-dumpable: no process of their uid may ptrace them
    - RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE, no core files, and one memory cap for all
      of a sandbox's processes: where /sys/fs/cgroup is cgroup v2, we are root and its root delegates the memory
      and pids controllers, each sandbox gets its own cgroup with memory.max (no swap) and pids.max, removed after
      the run; elsewhere at most FALLBACK_PROCS processes (threads count) with RLIMIT_AS = the cap / FALLBACK_PROCS
      each, so a single process gets only that share, and memory the kernel would hold for no process is refused:
      SysV IPC (limits 0 in the IPC namespace) and memfds (seccomp; sandbox_boot.py). describe() says which holds
    - a wall-clock timeout. The code runs as the child of a trusted supervisor that is pid 1 of the namespace;
      when the supervisor ends, the kernel kills all that is left in it. The supervisor also ends the moment the
      evaluator goes away: it watches its stdin, whose other end only the evaluator holds, for end-of-file (which
      the kernel delivers when the evaluator is killed, even by SIGKILL); unshare then exits with it. Mount
      points and cgroups left by a killed evaluator carry its pid in their names and are removed by the next
      run_many or sandbox_config once that pid is gone
    - output comes back through pipes drained as they are written, keeping only the last 4 KiB of each
Without isolation (only with allow_unsandboxed=True, `--allow-unsandboxed` in evaluate.py, and describe() says
UNSANDBOXED): the same limits, uid drop, processes and verdict, but the code can use the network, see host processes,
read and write whatever its uid may, and a process that leaves its process group can outlive the run; without root
the candidate and the checker even share a uid (the non-dumpable flag is then the checker's only shield).

The verdict. The checker runs the benchmark's trusted code: for HumanEval the prompt (so that the helpers the tests
use, like HumanEval/32's `poly`, are the benchmark's and not the candidate's), then the tests with the solution's
names (CodeTask.names) bound to remotes. Calling a remote sends the call to the candidate over a pipe and returns
its answer. Calls and answers cross as plain literal data only: None, bools, numbers (inf and nan included),
strings, bytes, and lists, tuples, dicts, sets and frozensets of those, written with repr and read back by a parser
that accepts nothing else and evaluates nothing (`parse`). So no object of the candidate's (a lying __eq__, a
function, a generator, an instance of its own class) ever reaches the tests: a call whose answer cannot cross, or
that raised, or whose candidate died, raises CandidateError in the tests. The checker never runs the solution's
code, and what the candidate does to its own interpreter (tracing, patching, reading its memory, exiting early,
writing to its pipes) reaches nothing that decides the verdict. The checker's verdict is a random nonce it gets on
stdin and writes to its status pipe after the tests return normally; we require exactly that nonce, exit status 0
and no timeout. A plain program is judged the same way in its own process: a program that deliberately manipulates
its interpreter (reading the nonce from the bootstrap's frame, for one) can fake its own end; it has no tests.

Sandbox errors. Each sandbox's bootstrap reports on its status pipe that its setup (cgroup, mounts, privileges) is
done before any code of the run starts. A run where a sandbox did not get that far is status "error" (passed=False),
not "failed"; it is retried once and reported as "error" if it fails again.

Problems that need more than calls with literal data (found by running every canonical solution):
    - MBPP 367 (is_tree_balanced): test_setup_code builds trees from the solution's own Node class. The setup code
      (trusted) runs in the candidate after the solution, and the names the tests use for its trees reach the
      checker as remotes: passed as an argument, a remote is sent by name and the candidate looks it up. Anything
      else done with such an object in the tests (compare it, read its attributes) fails.
    - MBPP 126: the tests call the solution's function `sum`. A solution's name shadows a builtin in the tests only
      where the trusted reference solution defines that name (`solution_names`), so a candidate cannot swap out
      the builtins the tests use to check it (`sorted`, `set`, `len`).
    - HumanEval/32, 33, 38, 50: the tests also call prompt helpers (`poly`, `encode_cyclic`, `encode_shift`), which
      come from the checker's own run of the prompt, or the entry point by its name (33), which is the remote.
Tests that pass the solution something that cannot cross (a lambda, an object) fail, as do tests that look at an
argument after the call (the candidate works on a copy) or expect an exception of a given type; no HumanEval or MBPP
(11-510) test does. A solution returning e.g. numpy integers fails; float and int subclasses cross as floats and ints.

Not covered, plainly: kernel exploits and escapes through the kernel (for a model you do not trust at all, add a
VM); side channels between the two sandboxes (timing, shared CPU caches) beyond the literal answers; a candidate that
knows the benchmark's answers (the sandbox judges behaviour, not honesty); the trust placed in the benchmark's own
prompt, tests and setup code, which run unexamined in the checker and candidate.
"""
from __future__ import annotations

import ast
import builtins
import errno
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
from pathlib import Path

import sandbox_boot
from cli import UserError, progress
from sandbox_boot import parse, plain  # noqa: F401  (the codec, for callers and tests)

UNSHARE = "unshare"  # util-linux; a test points this elsewhere to see the refusal without isolation
OUTPUT_TAIL = 4096   # bytes of each sandbox's output kept for SandboxResult.detail
PREFIX = "free_moe_sandbox_"  # + the creating pid + "_": mount points and cgroups (see _clean_stale)
CGROUP_FS = "/sys/fs/cgroup"
PROCS = 32          # processes (threads count) per sandbox under a cgroup
FALLBACK_PROCS = 4  # without one: also the share of the memory cap each process gets

# The code each sandbox runs first, as text: handed to a fresh interpreter with -c, so the sandbox sees no path
# to this repository. The evaluator imports the same codec for its callers and tests.
BOOTSTRAP = Path(sandbox_boot.__file__).read_text()


@dataclass(frozen=True)
class CodeTask:
    """A candidate solution and the benchmark's tests, run in separate sandboxes (see the module docstring)."""
    solution: str              # untrusted: run by the candidate (HumanEval: prompt + completion)
    tests: str                 # trusted: run by the checker
    names: tuple[str, ...]     # the solution's names the tests use: remotes in the checker
    prelude: str = ""          # trusted, run by the checker before the tests (HumanEval: the prompt, for its helpers)
    setup: str = ""            # trusted, run by the candidate after the solution (MBPP's test_setup_code)


@dataclass
class SandboxResult:
    passed: bool      # the checker (or a plain program) returned normally (see the module docstring)
    status: str       # "passed", "failed" (exception, early exit, killed), "timeout" or "error" (no sandbox)
    detail: str = ""  # the last 4 KiB of each sandbox's stdout+stderr, for debugging a failure
    uid: int | None = None  # the uid the untrusted code ran as (lets tests check no process of it survived)


@dataclass(frozen=True)
class SandboxConfig:
    isolate: bool   # namespaces + private root (see the module docstring); False only when explicitly allowed
    drop_uid: bool  # we are root: each sandbox runs as a fresh unprivileged uid
    python: str     # the interpreter that runs the bootstrap and the code
    cgroup: str | None = None  # the cgroup v2 folder sandboxes get their own cgroup in; None: FALLBACK_PROCS

    def describe(self) -> str:
        who = "a fresh unprivileged uid" if self.drop_uid else "your own uid"
        memory = ("one cgroup v2 memory+pids cap per sandbox" if self.cgroup else
                  f"memory cap split over at most {FALLBACK_PROCS} processes, "
                  f"{'SysV IPC and memfd' if self.isolate else 'memfd'} refused (no usable cgroup)")
        if self.isolate:
            caps = "a fresh unprivileged uid" if self.drop_uid else "a user namespace without capabilities"
            return (f"isolated: tests and solution in separate sandboxes exchanging literal data; private read-only "
                    f"root with capped tmpfs, mount+pid+network+IPC namespaces, {caps}, {memory}, rlimits, timeout "
                    f"({self.python})")
        return (f"UNSANDBOXED (--allow-unsandboxed): programs can use the network, see host processes and read "
                f"and write what {who} may; only {memory}, rlimits and a timeout ({self.python})")


# Imports of modules Python does not load at startup: an interpreter whose library the sandbox cannot read fails
PROBES = ("import copy, heapq, string, collections, math, re\nassert heapq.nlargest(1, [3, 1]) == [3]",
          CodeTask("import heapq\ndef top(xs):\n    return heapq.nlargest(1, xs)", "assert top([3]) == [3]", ("top",)))


def solution_names(tests: str, reference: str = "") -> tuple[str, ...]:
    """The names `tests` take from the solution: the ones they read without defining, less Python's builtins,
    unless the trusted `reference` solution defines one at its top level (MBPP 126's tests call its `sum`)."""
    read, bound = set(), set()
    for node in ast.walk(ast.parse(tests)):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.alias):  # import a.b as c
            bound.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    defined = _top_level_names(reference)
    return tuple(sorted(n for n in read - bound if not hasattr(builtins, n) or n in defined))


def _top_level_names(source: str) -> set[str]:
    """The functions, classes and variables `source` defines at its top level; none if it does not parse."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return set()
    names = {s.name for s in body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    return names | {n.id for s in body if isinstance(s, (ast.Assign, ast.AnnAssign))
                    for n in ast.walk(s) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


# ----------------------------------------------------------------------------- one sandbox

def _make_root() -> str:
    """A fresh empty directory: the private root's mount point (or the working directory without isolation). Our
    pid in its name lets a later run remove it if we are killed first (_clean_stale)."""
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}_")


def _make_cgroup(parent: str, memory_mb: int) -> str:
    path = os.path.join(parent, f"{PREFIX}{os.getpid()}_{secrets.token_hex(6)}")
    os.mkdir(path)
    try:
        for name, value in (("memory.max", memory_mb << 20), ("pids.max", PROCS + 1),  # + the supervisor
                            ("memory.swap.max", 0), ("memory.oom.group", 1)):
            if name in ("memory.max", "pids.max") or os.path.exists(f"{path}/{name}"):
                with open(f"{path}/{name}", "w") as f:
                    f.write(str(value))
    except OSError:
        _remove_cgroup(path)
        raise
    return path


def _remove_cgroup(path: str):
    """rmdir once its processes are gone (the kernel may take a moment to reap them); kill any that linger."""
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                return
        try:
            with open(f"{path}/cgroup.kill", "w") as f:
                f.write("1")
        except OSError:
            pass
        time.sleep(0.01)


def _limits(cfg: SandboxConfig, timeout: float, memory_mb: int) -> dict:
    procs = PROCS if cfg.cgroup else FALLBACK_PROCS
    per_process = memory_mb if cfg.cgroup else memory_mb // FALLBACK_PROCS
    if cfg.isolate and not cfg.drop_uid:
        procs += 2  # in our user namespace, unshare and the supervisor have the code's uid and count too
    return {"RLIMIT_CPU": int(timeout) + 1, "RLIMIT_AS": per_process * 2**20, "RLIMIT_FSIZE": 16 * 2**20,
            "RLIMIT_NPROC": procs, "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0}


class _Box:
    """One sandboxed process tree: unshare (or nothing), the supervising bootstrap and its child."""

    def __init__(self, cfg: SandboxConfig):
        self.cfg = cfg
        # a fresh uid per sandbox: RLIMIT_NPROC is counted per uid, so a fork bomb only exhausts its own quota
        self.uid = 100_000 + secrets.randbelow(2**30) if cfg.drop_uid else None
        self.root = self.cgroup = self.proc = self.status = self.out = None

    def start(self, role: dict, fds: tuple, timeout: float, memory_mb: int):
        cfg = self.cfg
        self.root = _make_root()
        if self.uid is not None and not cfg.isolate:
            os.chown(self.root, self.uid, self.uid)
        if cfg.cgroup:
            self.cgroup = _make_cgroup(cfg.cgroup, memory_mb)
        self.status, status_w = os.pipe()
        try:
            settings = {"isolate": cfg.isolate, "root": self.root, "uid": self.uid, "cgroup": self.cgroup,
                        "limits": _limits(cfg, timeout, memory_mb), "status_fd": status_w, "fds": list(fds), **role}
            payload = json.dumps(settings).encode()
            argv = [cfg.python, "-I", "-S", "-c", BOOTSTRAP]  # isolated mode, no site-packages
            if cfg.isolate:  # --kill-child: if unshare is killed, so is pid 1, and with it the whole namespace
                userns = [] if os.geteuid() == 0 else ["--map-root-user"]
                argv = [UNSHARE, *userns, "--mount", "--net", "--ipc", "--pid", "--fork", "--kill-child"] + argv
            home = "/sandbox" if cfg.isolate else self.root
            env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp" if cfg.isolate else self.root,
                   "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, pass_fds=(status_w, *fds),
                                         cwd="/" if cfg.isolate else self.root,
                                         env=env, start_new_session=True)  # own process group, killed as a whole
            self.out = self.proc.stdout.fileno()
        finally:
            os.close(status_w)  # only the sandbox holds the write end now, so its end means end-of-file
        try:  # the settings; stdin itself stays open until stop(): the supervisor's lifeline
            self.proc.stdin.write(f"{len(payload)}\n".encode() + payload)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def stop(self):
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:  # stdin, if the child died before reading it
                    pass
        if self.status is not None:
            os.close(self.status)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)  # with isolation the host directory stayed empty
        if self.cgroup is not None:
            _remove_cgroup(self.cgroup)


# ----------------------------------------------------------------------------- one run

def _run(program: str | CodeTask, cfg: SandboxConfig, timeout: float, memory_mb: int) -> SandboxResult:
    """One attempt: the sandboxes up, the pipes drained until the verdict or the deadline, everything torn down."""
    deadline = time.monotonic() + timeout
    nonce = secrets.token_hex(16)
    judge, boxes = _Box(cfg), []
    try:
        if isinstance(program, CodeTask):
            cand = _Box(cfg)
            boxes += [cand, judge]
            call_r, call_w = os.pipe()
            answer_r, answer_w = os.pipe()
            try:
                cand.start({"role": "candidate", "solution": program.solution, "setup": program.setup,
                            "call_fd": call_r, "answer_fd": answer_w}, (call_r, answer_w), timeout, memory_mb)
                judge.start({"role": "checker", "prelude": program.prelude, "tests": program.tests,
                             "names": list(program.names), "nonce": nonce, "call_fd": call_w, "answer_fd": answer_r},
                            (call_w, answer_r), timeout, memory_mb)
            finally:
                for fd in (call_r, call_w, answer_r, answer_w):
                    os.close(fd)
        else:
            cand = judge
            boxes.append(judge)
            judge.start({"role": "program", "source": program, "nonce": nonce}, (), timeout, memory_mb)
        keep = {b.status: 64 for b in boxes} | {b.out: -OUTPUT_TAIL for b in boxes}
        got, closed = _drain(keep, {judge.status, judge.out}, deadline)
        try:  # the pipes close a moment before the exit is reported
            judge.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            finished = True
        except subprocess.TimeoutExpired:
            finished = False
    except OSError as e:  # we could not even start a sandbox (no mount point, no cgroup, no process)
        return SandboxResult(False, "error", f"sandbox: {e}", cand.uid)
    finally:
        for b in boxes:
            b.stop()
    outputs = [got[b.out].decode("utf-8", "replace") for b in boxes]
    detail = "\n--- tests ---\n".join(o for o in outputs if o) if len(boxes) > 1 else outputs[0]
    started = [got[b.status].startswith(b"S") for b in boxes]
    if any(b.status in closed and not ok for b, ok in zip(boxes, started)) or (not finished and not all(started)):
        return SandboxResult(False, "error", detail, cand.uid)  # a sandbox that never got to run anything
    if not finished:
        return SandboxResult(False, "timeout", detail, cand.uid)
    passed = judge.proc.returncode == 0 and got[judge.status] == b"S" + nonce.encode()
    return SandboxResult(passed, "passed" if passed else "failed", detail, cand.uid)


def _drain(keep: dict[int, int], until: set[int], deadline: float) -> tuple[dict[int, bytes], set[int]]:
    """Read pipes as they are written until every one of `until` has closed, or the deadline; then once more what
    the others already hold. keep[fd] > 0 keeps the first bytes, < 0 the last: no child can fill our memory or
    block us. Returns (bytes kept per fd, the fds that closed)."""
    got, closed = {fd: b"" for fd in keep}, set()
    with selectors.DefaultSelector() as sel:
        for fd in keep:
            sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            waiting = left > 0 and not until <= closed
            events = sel.select(timeout=min(0.5, left) if waiting else 0)
            for key, _ in events:
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    closed.add(key.fd)
                n = keep[key.fd]
                got[key.fd] = (got[key.fd] + chunk)[:n] if n > 0 else (got[key.fd] + chunk)[n:]
            if not waiting:  # the last sweep read each ready pipe once
                return got, closed


# ----------------------------------------------------------------------------- configuration and entry points

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _clean_stale(cgroup: str | None = None):
    """Remove the mount points and cgroups of evaluators that were killed mid-run (their pid is in the name)."""
    for parent in (tempfile.gettempdir(), cgroup):
        try:
            names = os.listdir(parent) if parent else []
        except OSError:
            continue
        for name in names:
            pid = name[len(PREFIX):].split("_")[0]
            if not (name.startswith(PREFIX) and pid.isdigit()) or _alive(int(pid)):
                continue
            if parent == cgroup:
                _remove_cgroup(os.path.join(parent, name))
            else:  # never follows a symlink: rmtree refuses one
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _cgroup_parent() -> str | None:
    """The cgroup v2 root, if it is mounted at CGROUP_FS, we are root, it already delegates the memory and pids
    controllers and a capped cgroup can be made there; else None (we never change the host's cgroup settings)."""
    if os.geteuid() != 0:
        return None
    try:
        with open("/proc/self/mounts") as f:
            if not any(line.split()[1:3] == [CGROUP_FS, "cgroup2"] for line in f):
                return None
        with open(f"{CGROUP_FS}/cgroup.subtree_control") as f:
            if not {"memory", "pids"} <= set(f.read().split()):
                return None
        _remove_cgroup(_make_cgroup(CGROUP_FS, 64))
        return CGROUP_FS
    except OSError:
        return None


@cache
def sandbox_config(allow_unsandboxed: bool = False) -> SandboxConfig:
    """The isolated sandbox, checked by running PROBES in it with each candidate interpreter (the next one, the
    system python3, is tried when ours fails); without isolation, a UserError unless allow_unsandboxed."""
    root, cgroup = os.geteuid() == 0, _cgroup_parent()
    _clean_stale(cgroup)
    pythons = list(dict.fromkeys(p for p in (sys.executable, shutil.which("python3"), "/usr/bin/python3")
                                 if p and os.path.exists(p)))
    why = f"`{UNSHARE}` (util-linux) not found"
    if shutil.which(UNSHARE):
        for python in pythons:
            cfg = SandboxConfig(True, root, python, cgroup)
            res = [_run(p, cfg, timeout=20, memory_mb=1024) for p in PROBES]
            if all(r.passed for r in res):
                return cfg
            why = next((r.detail.strip().splitlines() or [r.status])[-1] for r in res if not r.passed)
    if not allow_unsandboxed:
        raise UserError(f"cannot isolate generated programs ({why}); run as root or enable user namespaces, "
                        f"or pass --allow-unsandboxed to run them with only rlimits and a timeout")
    for python in pythons:
        cfg = SandboxConfig(False, root, python, cgroup)
        if all(_run(p, cfg, timeout=20, memory_mb=1024).passed for p in PROBES):
            return cfg
    raise UserError("cannot run even a small program in the sandbox (no interpreter whose library is readable)")


def run_sandboxed(program: str | CodeTask, timeout: float = 10.0, memory_mb: int = 2048,
                  allow_unsandboxed: bool = False) -> SandboxResult:
    """Run one program in the sandbox (see the module docstring); a sandbox that could not start is tried once more."""
    cfg = sandbox_config(allow_unsandboxed)
    res = _run(program, cfg, timeout, memory_mb)
    return res if res.status != "error" else _run(program, cfg, timeout, memory_mb)


def run_many(programs: list[str | CodeTask], timeout: float = 10.0, workers: int = 2, show: bool = False,
             allow_unsandboxed: bool = False, memory_mb: int = 2048) -> list[SandboxResult]:
    """Run programs in parallel (threads only wait on child processes), results in input order."""
    _clean_stale(sandbox_config(allow_unsandboxed).cgroup)  # probe once before the threads start
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(lambda p: run_sandboxed(p, timeout, memory_mb, allow_unsandboxed), programs)
        return list(progress(it, total=len(programs), desc="sandbox", leave=False) if show else it)
