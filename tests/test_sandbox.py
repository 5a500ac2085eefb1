"""Tests for sandbox.py, one section per promise of its docstring.

Verdict: no forgery short of manipulating the interpreter (printing, exiting early, atexit hooks, os._exit(0),
patched os/sys/builtins, junk on every fd, signals, threads, forked children) turns a failing test into a pass,
with and without isolation; the documented limits (a lying __eq__, reading the bootstrap's frame) are pinned.
Evaluator: floods, closed or held output pipes and hostile files in the working directory neither hang, crash
nor fill the evaluator, and leave no process behind.
Isolation: writes to /tmp, /var/tmp, /run/lock, /dev/shm (also from a shell and ctypes' system()) do not persist
and are capped; /proc shows only the sandbox; the repository, /work, /home, /sys and a world-readable file of
ours are invisible; hostile programs (infinite loop, fork bomb, huge allocation or file, deleting or writing
our files, network, killing us) fail within the timeout. Without isolation the sandbox refuses unless allowed.
Slow: every HumanEval canonical solution and MBPP reference passes, the bare prompts fail.
"""
import os
import socket
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sandbox as S  # noqa: E402
from cli import UserError  # noqa: E402

PASS = "\n\nassert 1 + 1 == 2  # the 'tests'\n"
FAIL = "\n\nassert 1 + 1 == 3  # the 'tests', failing\n"


@pytest.fixture(scope="module")
def isolated():
    """The isolated sandbox; the tests that need it skip (saying why) where the machine cannot provide it."""
    try:
        return S.sandbox_config()
    except UserError as e:
        pytest.skip(str(e))


@pytest.fixture
def unsandboxed(monkeypatch):
    """The sandbox as on a machine without `unshare`."""
    monkeypatch.setattr(S, "UNSHARE", "/nonexistent/unshare")
    S.sandbox_config.cache_clear()
    yield
    S.sandbox_config.cache_clear()


@pytest.fixture(params=["isolated", "unsandboxed"])
def mode(request):
    """Run a test in both modes: returns the allow_unsandboxed flag to pass."""
    if request.param == "isolated":
        request.getfixturevalue("isolated")
        return False
    request.getfixturevalue("unsandboxed")
    return True


def _processes_of(uid):
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                for line in (d / "status").read_text().splitlines():
                    if line.startswith("Uid:") and int(line.split()[1]) == uid:
                        pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _assert_nothing_left(res):
    if res.uid is not None:  # every process of the run's uid is gone (they may take a moment to be reaped)
        deadline = time.time() + 5
        while _processes_of(res.uid) and time.time() < deadline:
            time.sleep(0.05)
        assert _processes_of(res.uid) == []


# ----------------------------------------------------------------------------- the verdict

FORGERIES = {
    "print_markers": "print('passed'); print('SANDBOX-OK-0123456789abcdef'); print('OK')",
    "sys_exit_0": "import sys\nsys.exit(0)",
    "raise_system_exit": "raise SystemExit(0)",
    "os_exit_0": "import os\nos._exit(0)",
    "atexit_os_exit_0": "import atexit, os\natexit.register(lambda: os._exit(0))",
    "atexit_print": "import atexit\natexit.register(print, 'passed')",
    "excepthook_exit_0": "import os, sys\nsys.excepthook = lambda *a: os._exit(0)",
    "replace_stdout": "import io, sys\nsys.stdout = sys.stderr = io.StringIO()",
    "patch_os": ("import os\nos._exit = lambda code: None\nos.write = lambda fd, data: len(data)\n"
                 "os.close = lambda fd: None"),
    "patch_traceback": "import traceback\ntraceback.print_exc = lambda *a, **k: None",
    "patch_builtins": ("import builtins\nclass Nothing(Exception): pass\n"
                       "builtins.BaseException = builtins.AssertionError = builtins.Exception = Nothing"),
    "junk_on_every_fd": """\
import os
for fd in range(3, 256):
    try:
        os.write(fd, os.urandom(16).hex().encode())
    except OSError:
        pass""",
    "replay_stdin_and_proc": """\
import os
blobs = [os.read(0, 1 << 16)]
for p in ["/proc/self/cmdline", "/proc/self/environ", "/proc/1/cmdline", "/proc/1/environ"]:
    try:
        blobs.append(open(p, "rb").read())
    except OSError:
        pass
for fd in range(3, 64):
    for b in blobs:
        try:
            os.write(fd, b)
        except OSError:
            pass""",
    "alarm_exit_0": ("import os, signal, time\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
                     "signal.setitimer(signal.ITIMER_REAL, 0.05)\ntime.sleep(0.2)"),
    "thread_exit_0": ("import os, threading, time\n"
                      "threading.Thread(target=lambda: (time.sleep(0.05), os._exit(0))).start()"),
    "child_writes_later": """\
import os, time
if os.fork() == 0:
    time.sleep(0.3)
    for fd in range(3, 64):
        try:
            os.write(fd, b"0" * 32)
        except OSError:
            pass
    os._exit(0)""",
}


@pytest.mark.parametrize("name", FORGERIES)
def test_forgeries_do_not_pass_a_failing_test(name, mode):
    res = S.run_sandboxed(FORGERIES[name] + FAIL, timeout=5, allow_unsandboxed=mode)
    assert not res.passed, (name, res)
    # and code that neither ends the program early nor writes to its file descriptors does not spoil a pass
    if name in ("print_markers", "atexit_os_exit_0", "atexit_print", "excepthook_exit_0", "replace_stdout",
                "patch_os", "patch_traceback", "patch_builtins"):
        assert S.run_sandboxed(FORGERIES[name] + PASS, timeout=5, allow_unsandboxed=mode).passed, name


def test_passing_programs_pass(mode):
    for source in ["assert True", "print('x' * 10**6)", "import sys\nprint('noise', file=sys.stderr)",
                   "import threading, time\nthreading.Thread(target=time.sleep, args=(60,)).start()",  # left behind
                   "import atexit, os\natexit.register(os._exit, 1)",  # atexit hooks run after the verdict: never
                   "import os\nos.fork()",  # both processes run the tests; the program's own one answers
                   "import sys\nassert sys.stdin.read() == ''"]:  # no input, and not our payload
        res = S.run_sandboxed(source + PASS, timeout=5, allow_unsandboxed=mode)
        assert res.passed and res.status == "passed", (source, res)
    assert S.run_sandboxed("import time\ntime.sleep(30)", timeout=1, allow_unsandboxed=mode).status == "timeout"
    assert S.run_sandboxed("def f(:", allow_unsandboxed=mode).status == "failed"  # syntax error


def test_documented_limits_still_fool_the_verdict(isolated):
    """Pinned so that the docstring stays true: code that manipulates its own interpreter can fake a pass."""
    lying_eq = "class Yes:\n    def __eq__(self, other):\n        return True\nassert Yes() == 3"
    read_frame = ("import os, sys\nf = sys._getframe(1).f_locals\nos.write(f['verdict'], f['nonce'])\n"
                  "os._exit(0)")
    assert S.run_sandboxed(lying_eq).passed
    assert S.run_sandboxed(read_frame + FAIL).passed


# ----------------------------------------------------------------------------- the evaluator survives the child

EVALUATOR_ATTACKS = {
    "flood_stdout": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "flood_binary_stderr": "import os\nwhile True:\n    os.write(2, os.urandom(65536))",
    "close_outputs": "import os, time\nos.close(1)\nos.close(2)\ntime.sleep(0.3)",
    "hostile_files_in_cwd": ("import os\nos.mkfifo('stdout')\nos.symlink('/dev/zero', 'stderr')\n"
                             "os.symlink('/etc/shadow', 'out')\nos.chmod('.', 0)"),
    "grandchild_holds_pipes": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                               "        time.sleep(60)\n    os._exit(0)\nos.wait()"),
}


@pytest.mark.parametrize("name", EVALUATOR_ATTACKS)
def test_evaluator_survives_the_child(name, isolated):
    t0 = time.time()
    res = S.run_sandboxed(EVALUATOR_ATTACKS[name] + FAIL, timeout=2)
    assert not res.passed and time.time() - t0 < 2 + 3, (name, res)
    assert len(res.detail.encode()) <= 3 * S.OUTPUT_TAIL  # bounded (3 bytes per replaced invalid byte at most)
    _assert_nothing_left(res)
    res = S.run_sandboxed(EVALUATOR_ATTACKS[name] + PASS, timeout=2)
    assert res.passed == name.startswith(("close", "hostile", "grandchild")), (name, res)  # floods time out
    assert S.run_sandboxed("print('still fine')").passed


# ----------------------------------------------------------------------------- isolation

def test_writes_outside_do_not_persist_and_are_capped(isolated):
    tag = f"free_moe_test_{os.getpid()}_{time.time_ns()}"
    places = ["/tmp", "/var/tmp", "/run/lock", "/dev/shm"]
    plant = """\
import ctypes, os, subprocess
for d in PLACES:
    open(f"{d}/TAG", "w").write("planted")
assert ctypes.CDLL(None).system(b"echo x > /tmp/TAG_system") == 0
subprocess.run(["/bin/sh", "-c", "echo x > /var/tmp/TAG_shell"], check=True)
assert os.path.exists("/tmp/TAG_system") and os.path.exists("/var/tmp/TAG_shell")
total = 0
try:
    for i in range(100):
        with open(f"/dev/shm/TAG_{i}", "wb") as f:
            f.write(b"x" * 8 * 2**20)
        total += 8
except OSError:
    pass
assert 8 <= total < 75, total  # the private tmpfs is capped at 64 MiB
""".replace("TAG", tag).replace("PLACES", repr(places))
    res = S.run_sandboxed(plant + PASS)
    assert res.passed, res
    leftovers = [f"{d}/{n}" for d in places if os.path.isdir(d) for n in os.listdir(d) if n.startswith(tag)]
    assert leftovers == []
    look = f"import os\nfor d in {places!r}:\n    assert not any(n.startswith({tag!r}) for n in os.listdir(d))"
    assert S.run_sandboxed(look + PASS).passed  # nor does the next program see them


def test_host_is_invisible_and_proc_is_private(isolated, tmp_path):
    secret = tmp_path / "world_readable.txt"
    secret.write_text("not for the sandbox")
    secret.chmod(0o644)
    hidden = [str(secret), str(ROOT), str(ROOT / "sandbox.py"), "/work", "/home", "/sys/kernel", "/etc/passwd",
              "/etc/hostname", "/var/log", "/mnt", "/opt"]
    # /root only shows the path to the interpreter, when the interpreter lives there (pyenv)
    if os.access("/root", os.R_OK):
        hidden += [f"/root/{e}" for e in os.listdir("/root") if not sys.base_prefix.startswith(f"/root/{e}")]
    hidden = [p for p in hidden if os.path.lexists(p)]
    program = (f"import os\nfor p in {hidden!r}:\n    assert not os.path.lexists(p), p\n"
               "pids = sorted(p for p in os.listdir('/proc') if p.isdigit())\n"
               "assert pids == ['1', '2'], pids  # the supervisor and this program\n"
               "assert os.getcwd() == '/sandbox' and os.access('.', os.W_OK)")
    res = S.run_sandboxed(program + PASS)
    assert res.passed, res
    assert len(hidden) >= 5


def _hostile_programs(protected, port):
    return {
        "infinite_loop": "while True:\n    pass",
        "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "alloc_50GB": "x = bytearray(50 * 2**30)\nx[-1] = 1",
        "write_10GB_file": "with open('big.bin', 'wb') as f:\n    for _ in range(10 * 1024):\n"
                           "        f.write(b'x' * 2**20)",
        "delete_outside": (f"import os, shutil\nos.remove({str(protected / 'keep.txt')!r})\n"
                           f"shutil.rmtree({str(protected)!r})"),
        "write_outside": f"open({str(protected / 'keep.txt')!r}, 'w').write('gone')",
        "socket_to_localhost": (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                                "s.sendall(b'hello')"),
        "kill_parent": f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\n"
                       "os.kill(os.getppid(), signal.SIGKILL)",
        "kill_all": "import os, signal\nos.kill(-1, signal.SIGKILL)",
    }


HOSTILE = ["infinite_loop", "fork_bomb", "alloc_50GB", "write_10GB_file", "delete_outside", "write_outside",
           "socket_to_localhost", "kill_parent", "kill_all"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_program_fails_safely(name, isolated, tmp_path):
    if name == "fork_bomb" and not (isolated.drop_uid or os.geteuid() != 0):
        pytest.skip("RLIMIT_NPROC does not bind root: never run a fork bomb without the uid drop")
    protected = tmp_path / "protected"
    protected.mkdir()
    (protected / "keep.txt").write_text("precious")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    source = _hostile_programs(protected, server.getsockname()[1])[name] + "\n\nassert True  # the 'tests'"
    t0 = time.time()
    res = S.run_sandboxed(source, timeout=2, memory_mb=1024)
    assert not res.passed, (name, res)
    assert time.time() - t0 < 2 + 3
    assert os.listdir(protected) == ["keep.txt"] and (protected / "keep.txt").read_text() == "precious"
    with pytest.raises(socket.timeout):  # nobody connected to our listening socket
        server.accept()
    server.close()
    _assert_nothing_left(res)
    assert S.run_sandboxed("print('still fine')").passed  # and the evaluator carries on


def test_without_isolation_refuses_unless_allowed(unsandboxed):
    with pytest.raises(UserError, match="--allow-unsandboxed"):
        S.sandbox_config()
    with pytest.raises(UserError, match="--allow-unsandboxed"):
        S.run_many(["assert True"])
    cfg = S.sandbox_config(allow_unsandboxed=True)
    assert not cfg.isolate and cfg.describe().startswith("UNSANDBOXED")
    results = S.run_many(["assert True", "assert False"], allow_unsandboxed=True)
    assert [r.passed for r in results] == [True, False]


def test_run_many_keeps_order_in_parallel(isolated):
    sources = [f"assert {i} % 3 != 0" for i in range(8)]
    assert [r.passed for r in S.run_many(sources, workers=4)] == [i % 3 != 0 for i in range(8)]
    assert "isolated" in isolated.describe()


# ----------------------------------------------------------------------------- real benchmarks (slow)

@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_bare_prompts_fail(isolated):
    import data as D
    problems = D.load_humaneval()
    good = S.run_many([D.humaneval_program(p, p["canonical_solution"]) for p in problems], timeout=60)
    bare = S.run_many([D.humaneval_program(p, "") for p in problems], timeout=10)
    assert [p["task_id"] for p, r in zip(problems, good) if not r.passed] == []
    assert [p["task_id"] for p, r in zip(problems, bare) if r.passed] == []
    assert len(problems) == 164


@pytest.mark.slow
def test_mbpp_reference_code_passes_and_no_code_fails(isolated):
    """The test split (task ids 11-510)."""
    import data as D
    docs = [d for d in D.load_mbpp() if 11 <= d["task_id"] <= 510]
    # 60 s: a few reference solutions are slow (task 123 sums amicable numbers: ~9 s on a loaded 2-core machine);
    # this checks the sandbox's verdicts, not speed
    good = S.run_many([D.mbpp_program(d, d["code"]) for d in docs], timeout=60)
    bare = S.run_many([D.mbpp_program(d, "") for d in docs], timeout=10)
    assert [d["task_id"] for d, r in zip(docs, good) if not r.passed] == []
    assert [d["task_id"] for d, r in zip(docs, bare) if r.passed] == []
    assert len(docs) == 500
