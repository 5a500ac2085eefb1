"""cli.py — the terminal plumbing every script shares: one-line errors, one flag vocabulary, safe outputs.

Nothing here knows about transformers. Each stage script builds its parser with `add_common_args` (the shared
flags mean the same everywhere) and runs its main through `run_cli`, so a user mistake (`UserError`) prints one
line and exits with code 2 instead of a traceback. Outputs: `write_atomic` (a reader sees the old file or the
new one), `locked_dir` (one run per --out), `progress` (bars on a terminal only), `markdown_table` and the optional
matplotlib figure; `file_sha256` checks a pinned file. Caches of long computations live in cache.py, built on
`write_atomic`.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import math
import os
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

REPO_DIR = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(ValueError):
    """A mistake the user can fix (bad path, wrong file, unknown name): printed as one line, no traceback."""


def die(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that `finally` blocks run (temp files removed, locks released)."""


def _terminate(signum, frame):
    raise Terminated


def run_cli(main):
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2. SIGTERM ends it like Ctrl-C,
    as an exception."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt:
        die("interrupted", 130)
    except Terminated:
        die("terminated", 143)


def shared_dir(data_dir: str | None = None) -> Path:
    """Where the workspace's real assets live: --data-dir, else $FREE_MOE_SHARED, else ../shared beside the repo."""
    return Path(data_dir or os.environ.get("FREE_MOE_SHARED") or REPO_DIR.parent / "shared")


def cache_dir() -> Path:
    """The user cache: $FREE_MOE_CACHE, else ~/.cache/free-moe. Data files go under data/, hub models under
    owner--name/, joined model files at the top."""
    return Path(os.environ.get("FREE_MOE_CACHE") or Path.home() / ".cache" / "free-moe")


def progress(iterable=None, **kw):
    """A tqdm bar on a terminal; nothing when stderr is a file or a pipe, where a bar would leave escape codes."""
    kw.setdefault("disable", None)  # tqdm: None = draw only on a TTY
    return tqdm(iterable, **kw)


# ----------------------------------------------------------------------------- one flag vocabulary

class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, once: help texts that already say "(default..." keep their own words."""

    def _get_help_string(self, action):
        return action.help if "(default" in (action.help or "") else super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors: a bad flag is one line (via run_cli) and exit code 2, like every other
    user mistake, instead of the usage block plus a message."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def _checked(cast, rule: str, ok):
    """An argparse `type` that converts with `cast` and refuses values outside `rule` at parse time, so a bad
    number is one line naming the flag (argparse adds "argument --flag:") before any work starts."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}") from None
        if (cast is float and not math.isfinite(v)) or not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v
    parse.__name__ = rule  # argparse names the type in some of its own messages
    return parse


def int_at_least(lo: int):
    return _checked(int, f"an integer >= {lo}", lambda v: v >= lo)


positive_int = int_at_least(1)  # counts, sizes, lengths
nonneg_int = int_at_least(0)  # counts where 0 means "none" (few-shot examples)
positive_float = _checked(float, "a number > 0", lambda v: v > 0)  # timeouts, learning rates, Gumbel tau
nonneg_float = _checked(float, "a number >= 0", lambda v: v >= 0)  # sampling temperature (0 = greedy), weights
fraction = _checked(float, "a number in (0, 1]", lambda v: 0 < v <= 1)  # keep, budget, top-p
probability = _checked(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)  # thresholds
token_sparsity = _checked(float, "a number in [0, 0.99]", lambda v: 0 <= v <= 0.99)  # level 3: fraction skipped
seed_int = _checked(int, "an integer in [0, 2**32)", lambda v: 0 <= v < 2**32)  # numpy refuses negative seeds


def out_dir(text: str) -> str:
    """--out: a directory, existing or to be created; refused at parse time if it (or a parent) is a file."""
    for p in (Path(text), *Path(text).parents):
        if p.exists():
            if not p.is_dir():
                raise argparse.ArgumentTypeError(f"{p} is a file, expected a directory")
            break
    return text


def add_common_args(p: argparse.ArgumentParser, out_default: str | None = None):
    """The flags every script shares, with the same meaning everywhere. `--out` is always a directory;
    scripts that write nothing (generate.py, router.py) pass out_default=None and have no --out."""
    p.add_argument("--model", default=None, help="GGUF file, HF model dir, hub id or short name: gemma3-270m "
                   "(default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (default: auto = cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="compute dtype (default: auto = bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--data-dir", default=None,
                   help="shared assets dir (default: $FREE_MOE_SHARED or ../shared; data missing there is "
                        "downloaded into $FREE_MOE_CACHE or ~/.cache/free-moe)")
    if out_default is not None:
        p.add_argument("--out", type=out_dir, default=out_default, help=f"output directory (default: {out_default})")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default: 0)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)")


def resolve_device(args) -> torch.device:
    """--device: "auto" picks cuda when a GPU is visible, else cpu; "cuda:N" picks GPU N. Picked once, here:
    every tensor after that follows the model's device."""
    name = getattr(args, "device", None) or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def resolve_dtype(args, device: torch.device | None = None) -> torch.dtype:
    """--dtype: "auto" is bfloat16 on CUDA (tensor cores, half the bytes per weight) and float32 on CPU (CPU bf16
    matmuls are slower than fp32 on most machines, and fp32 is what the CPU tests compare against)."""
    name = getattr(args, "dtype", None) or "auto"
    if name == "auto":
        device = device if device is not None else resolve_device(args)
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


# ----------------------------------------------------------------------------- atomic writes

def file_sha256(path) -> str:
    """The sha256 of a file, read in 16 MiB blocks (a model file never sits in memory whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, data: str | bytes):
    """Write a file so readers see the old one or the new one, never half of one (a killed run loses nothing).

    The temp name is unique (mkstemp in the same folder), so two writers never share one; the file gets the
    usual permissions (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def locked_dir(path, what: str = "another run"):
    """Hold an exclusive lock on `path`/.lock while the block runs, so two runs never write one output folder.

    fcntl.flock is released by the kernel when the holder exits or is killed, so a stale lock cannot outlive a
    crash; the file keeps the holder's pid only to name it in the refusal."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    f = open(path / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{path} is in use by {what} (pid {holder}): wait for it to finish or pick another --out") \
            from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    try:
        yield
    finally:
        f.close()  # releases the lock; the file itself is harmless


# ----------------------------------------------------------------------------- tables and figures

def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; floats with 2 decimals."""
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot drawing to files (no display), or None: matplotlib is a dev-only extra, plots are optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path, dpi: int) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return True
