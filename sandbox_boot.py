"""sandbox_boot.py — the code that runs inside each sandbox, first and trusted, and the codec of its pipes.

sandbox.py does not import this file into the sandbox: it reads its source and hands it to a fresh interpreter
(`python -I -S -c <source>`), so the sandbox needs no path to the repository and sees none. There it runs as the
namespace's root (or root of its user namespace): it reads the run's settings and the nonce from stdin, joins the
cgroup, builds the private root, then forks. The parent stays as pid 1 of the namespace until the child ends or the
evaluator goes away; the child sets limits, drops privileges, reports on its status pipe that setup is done and
plays its role (candidate, checker or plain program). Everything is inside functions so that a plain program (run
as a fresh __main__ module) does not find the nonce in a module's globals.

The codec (`plain`, `parse`, `send`, `receive`) is what both sides of a CodeTask use: the candidate's answers and
the checker's arguments are written with repr(plain(...)) and read back by `parse`, which builds builtin values from
a literal and runs nothing. Only the checker's `parse` guards the verdict. sandbox.py imports the same functions for
its callers and tests.
"""
import ast
import ctypes
import json
import linecache
import os
import resource
import select
import signal
import sys
import traceback
import types

# ----------------------------------------------------------------------------- the codec

MAX_MESSAGE = 16 << 20  # bytes of one call or answer
BASES = (bool, int, float, complex, str, bytes)
NAMES = {"inf": float("inf"), "nan": float("nan"), "infj": complex(0, float("inf")), "nanj": complex(0, float("nan"))}


def plain(value, depth=0):
    """A copy of `value` made of builtin literal types only (subclasses of them converted); TypeError otherwise."""
    if depth > 64:
        raise TypeError("nested too deeply to cross between the candidate and the checker")
    if value is None:
        return None
    for base in BASES:
        if isinstance(value, base):
            return value if type(value) is base else base(value)
    if isinstance(value, dict):
        return {plain(k, depth + 1): plain(v, depth + 1) for k, v in dict.items(value)}
    for base in (list, tuple, set, frozenset):
        if isinstance(value, base):
            return base(plain(v, depth + 1) for v in base.__iter__(value))
    raise TypeError(f"a {type(value).__name__} cannot cross between the candidate and the checker")


def parse(text):
    """The value repr(plain(...)) wrote; ValueError for anything else (a name, a call, an attribute, an operator)."""
    return literal(ast.parse(text, mode="eval").body)


def literal(node):
    if isinstance(node, ast.Constant) and type(node.value) in BASES + (type(None),):
        return node.value
    if isinstance(node, ast.Name) and node.id in NAMES:
        return NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
            and isinstance(node.operand, (ast.Constant, ast.Name)):
        v = literal(node.operand)
        if type(v) in (int, float, complex):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):  # a complex: (1-2j), (-inf+nanj)
        re, im = literal(node.left), literal(node.right)
        if type(re) in (int, float) and type(im) is complex:
            return re + im if isinstance(node.op, ast.Add) else re - im
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {ast.Tuple: tuple, ast.List: list, ast.Set: set}[type(node)](literal(e) for e in node.elts)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {literal(k): literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("set", "frozenset") \
            and not node.keywords and len(node.args) <= 1:  # set(), frozenset({1, 2})
        return {"set": set, "frozenset": frozenset}[node.func.id](*map(literal, node.args))
    raise ValueError(f"not a plain literal: {type(node).__name__}")


def send(fd, text):
    data = text.encode()
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"a message of {len(data)} bytes is too large to cross")
    data = len(data).to_bytes(8, "big") + data
    while data:
        data = data[os.write(fd, data):]


def receive(fd):
    """The next message, or None at end-of-file."""
    head = read_exactly(fd, 8)
    if head is None:
        return None
    n = int.from_bytes(head, "big")
    data = read_exactly(fd, n) if n <= MAX_MESSAGE else None
    if data is None:
        raise ValueError(f"a message of {n} bytes that is too large or cut short")
    return data.decode()


def read_exactly(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


# ----------------------------------------------------------------------------- the bootstrap

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


def refuse_sysv_ipc():
    """Without a cgroup nothing charges SysV shared memory, message queues or semaphores to the sandbox: a segment
    outlives its detach and counts in no process's RLIMIT_AS. So their limits in our (fresh) IPC namespace go to 0,
    and every shmget, msgget and semget that would create one fails; the host's namespace is untouched."""
    for name, value in (("shmmni", "0"), ("shmall", "0"), ("msgmni", "0"), ("sem", "0 0 0 0")):
        with open(f"/proc/sys/kernel/{name}", "w") as f:
            f.write(value)


# Per machine: the audit arch the kernel reports to seccomp, and the numbers of memfd_create and memfd_secret
# (x86_64 also answers them with the x32 bit set)
SECCOMP_ARCHES = {
    "x86_64": (0xC000003E, (319, 447, 0x40000000 | 319, 0x40000000 | 447)),
    "aarch64": (0xC00000B7, (279, 447)),
    "riscv64": (0xC00000F3, (279, 447)),
}


def refuse_memfd():
    """Without a cgroup a memfd's pages count in no limit of ours once it is unmapped (only RLIMIT_FSIZE bounds each
    one, and a process holds up to RLIMIT_NOFILE of them), so a seccomp filter makes memfd_create and memfd_secret
    fail with EPERM for this process and all it starts. A system call of another architecture ends the process."""
    machine = os.uname().machine
    if machine not in SECCOMP_ARCHES:
        raise OSError(f"no seccomp table for {machine}: cannot refuse memfd_create without a cgroup")
    arch, numbers = SECCOMP_ARCHES[machine]
    load, equal, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    allow, refuse, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000  # ALLOW, ERRNO(EPERM), KILL_PROCESS
    program = [(load, 0, 0, 4), (equal, 1, 0, arch), (ret, 0, 0, kill), (load, 0, 0, 0)]  # [4]: arch, [0]: nr
    program += [(equal, len(numbers) - i, 0, nr) for i, nr in enumerate(numbers)]  # a match jumps to `refuse`
    program += [(ret, 0, 0, allow), (ret, 0, 0, refuse)]

    class Instruction(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]

    code = (Instruction * len(program))(*program)
    if libc.prctl(22, 2, ctypes.byref(Program(len(program), code)), 0, 0) != 0:  # PR_SET_SECCOMP, MODE_FILTER
        raise OSError(ctypes.get_errno(), "seccomp")


def drop_privileges(cfg):
    for name, value in cfg["limits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary or file capability gives anything back
    if not cfg["cgroup"]:
        refuse_memfd()
    if cfg["uid"] is not None:  # we are real root: become the fresh uid (this drops every capability)
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
    elif cfg["isolate"]:  # root of our own user namespace: drop its capabilities, and from the bounding set too
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
        if libc.capset((ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()) != 0:
            raise OSError(ctypes.get_errno(), "capset")


def compiled(source, name):
    """Compile; tracebacks in the run's output show the lines."""
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    return compile(source, name, "exec")


class CandidateError(Exception):
    """A call the candidate did not answer with a plain value: it raised, ended, or returned what cannot cross."""


class Remote:
    """A name of the candidate's module in the tests: calling it forwards the call; as an argument it goes by name."""

    def __init__(self, link, name):
        self.link, self.name = link, name

    def __call__(self, *args, **kwargs):
        return self.link.call(self.name, args, kwargs)


class Link:
    """The checker's end of the pipes to the candidate: one call, one answer."""

    def __init__(self, call_fd, answer_fd):
        self.call_fd, self.answer_fd = call_fd, answer_fd

    def call(self, name, args, kwargs):
        pack = lambda v: ("name", v.name) if isinstance(v, Remote) else ("value", plain(v))
        send(self.call_fd, repr(("call", name, [pack(a) for a in args], {k: pack(v) for k, v in kwargs.items()})))
        try:
            text = receive(self.answer_fd)
            answer = parse(text) if text is not None else ("raise", "the candidate ended")
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            answer = ("raise", f"an answer that is not plain data ({type(e).__name__})")
        if type(answer) is tuple and len(answer) == 2 and answer[0] == "ok":
            return answer[1]
        if type(answer) is tuple and len(answer) == 2 and answer[0] == "raise" and type(answer[1]) is str:
            raise CandidateError(f"{name}: {answer[1]}")
        raise CandidateError(f"{name}: a malformed answer")


def answer(ns, text):
    """The candidate's answer to one call, as text: ('ok', value) or ('raise', why)."""
    try:
        _, name, args, kwargs = parse(text)
        unpack = lambda a: ns[a[1]] if a[0] == "name" else a[1]
        if name not in ns:
            raise NameError(f"the solution defines no {name!r}")
        value = ns[name](*map(unpack, args), **{k: unpack(v) for k, v in kwargs.items()})
        return repr(("ok", plain(value)))
    except BaseException as e:  # even SystemExit: the answer is a failure, not an end
        try:
            why = f"{type(e).__name__}: {e}"[:2000]
        except BaseException:
            why = "an exception that cannot be shown"
        return repr(("raise", why))


def candidate(cfg):
    """Run the solution (and the benchmark's setup code) as __main__, then answer calls until the checker is done.
    Nothing here guards against the solution: whatever it does to this process only changes its own answers."""
    me, module = os.getpid(), types.ModuleType("__main__")
    sys.modules["__main__"], sys.argv = module, ["solution.py"]
    try:
        exec(compiled(cfg["solution"], "solution.py"), module.__dict__)
        if cfg["setup"]:
            exec(compiled(cfg["setup"], "setup.py"), module.__dict__)
        while os.getpid() == me and (text := receive(cfg["call_fd"])) is not None:
            reply = answer(module.__dict__, text)
            if os.getpid() == me:  # a fork made by the solution does not answer too
                send(cfg["answer_fd"], reply)
        code = 0
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    os._exit(code)


def judged(status, nonce, body):
    """Run body(namespace of a fresh __main__); write the nonce on the status pipe only if it returned normally."""
    write, exit_, getpid, out, err, fail = os.write, os._exit, os.getpid, sys.stdout, sys.stderr, BaseException
    me = getpid()  # these are our references: a program may patch os, sys and builtins, not our locals
    module = types.ModuleType("__main__")
    sys.modules["__main__"], sys.argv = module, ["program.py"]
    try:
        body(module.__dict__)
        passed = True
    except fail:
        passed = False
        try:
            out.flush()
            traceback.print_exc()
        except fail:
            pass
    if passed and getpid() == me:  # a fork of the program that runs on into our code says nothing
        write(status, nonce)
    for stream in (out, err):
        try:
            stream.flush()
        except fail:
            pass
    exit_(0 if passed else 1)  # now: no atexit hook, thread or finaliser runs after the verdict


def checker_body(cfg):
    link, prelude, tests, names = Link(cfg["call_fd"], cfg["answer_fd"]), cfg["prelude"], cfg["tests"], cfg["names"]

    def body(ns):
        exec(compiled(prelude, "prompt.py"), ns)
        ns.update({name: Remote(link, name) for name in names})
        exec(compiled(tests, "tests.py"), ns)
    return body


def child(cfg):
    """Drop privileges, say on the status pipe that setup is done, then play the run's role."""
    status, role = cfg["status_fd"], cfg["role"]
    drop_privileges(cfg)
    for fd in [status] + cfg["fds"]:
        os.set_inheritable(fd, False)  # nothing the code runs (a shell, a subprocess) inherits our pipes
    os.write(status, b"S")
    if role == "candidate":
        os.close(status)
        candidate(cfg)
    nonce = cfg.pop("nonce").encode()
    if role == "checker":
        libc.prctl(4, 0, 0, 0, 0)  # again: a change of uid may have reset it (fs.suid_dumpable)
        body = checker_body(cfg)
    else:
        source = cfg.pop("source")
        body = lambda ns: exec(compile(source, "program.py", "exec"), ns)
    del cfg
    judged(status, nonce, body)


def supervise(pid, lifeline):
    """Wait for the child; if the evaluator goes away first (end-of-file on the lifeline), end everything now."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None  # before Linux 5.3: look every 50 ms
    while True:
        watch = [lifeline] + ([pidfd] if pidfd is not None else [])
        ready = select.select(watch, [], [], None if pidfd is not None else 0.05)[0]
        if lifeline in ready and not os.read(lifeline, 1024):
            os.killpg(0, signal.SIGKILL)  # our process group; pid 1 of a namespace survives it and exits next
            os._exit(137)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)  # pid 1 exits: the kernel kills whatever the code left


def read_settings():
    """The length-prefixed settings from stdin, which stays open: the evaluator's end of it is our lifeline."""
    head = b""
    while not head.endswith(b"\n"):
        c = os.read(0, 1)
        if not c:
            os._exit(2)
        head += c
    data = read_exactly(0, int(head))
    if data is None:
        os._exit(2)
    return json.loads(data)


def main():
    getattr(sys, "set_int_max_str_digits", lambda n: None)(100_000)  # big answers cross; a huge one times out
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no process of our uid may ptrace us or read the nonce
    cfg = read_settings()
    lifeline = os.dup(0)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)  # the code reads EOF, not our stdin
    os.close(null)
    if cfg["cgroup"]:
        with open(cfg["cgroup"] + "/cgroup.procs", "w") as f:
            f.write("0")  # this process; every process forked from here on is in the cgroup too
    if cfg["isolate"]:
        private_root(cfg["root"], cfg["uid"])
        if not cfg["cgroup"]:
            refuse_sysv_ipc()
    pid = os.fork()
    if pid == 0:
        os.close(lifeline)
        child(cfg)
    for fd in [cfg["status_fd"]] + cfg["fds"]:
        os.close(fd)  # the child's alone, so that its exit means end-of-file
    supervise(pid, lifeline)


if __name__ == "__main__":
    main()
