"""cli.py — the terminal plumbing every script shares: one-line errors, one flag vocabulary, atomic writes.

Nothing here knows about transformers. Each stage script builds its parser with `add_common_args` (the six
shared flags mean the same everywhere) and runs its main through `run_cli`, so a user mistake (`UserError`)
prints one line and exits with code 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO_DIR = Path(__file__).resolve().parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(ValueError):
    """A mistake the user can fix (bad path, wrong file, unknown name): printed as one line, no traceback."""


def die(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def run_cli(main):
    """Run a script's main(); a UserError becomes one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt:
        die("interrupted", 130)


def shared_dir(data_dir: str | None = None) -> Path:
    """Where the workspace's real assets live: --data-dir, else $FREE_MOE_SHARED, else ../shared beside the repo."""
    return Path(data_dir or os.environ.get("FREE_MOE_SHARED") or REPO_DIR.parent / "shared")


# ----------------------------------------------------------------------------- one flag vocabulary

def add_common_args(p: argparse.ArgumentParser, out_default: str | None = None):
    """The flags every script shares, with the same meaning everywhere (STYLE.md habit 3). `--out` is always a
    directory; scripts that write nothing (model.py, router.py) pass out_default=None and have no --out."""
    p.add_argument("--model", default=None, help="GGUF file, HF model dir or hub id (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="compute dtype (default: float32)")
    p.add_argument("--data-dir", default=None, help="shared assets dir (default: $FREE_MOE_SHARED or ../shared)")
    if out_default is not None:
        p.add_argument("--out", default=out_default, help=f"output directory (default: {out_default})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")


def resolve_device(args) -> torch.device:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device} requested but CUDA is not available")
    return torch.device(args.device)


def resolve_dtype(args) -> torch.dtype:
    return DTYPES[args.dtype]


# ----------------------------------------------------------------------------- atomic writes

def write_atomic(path, data: str | bytes):
    """Write a file so readers see the old one or the new one, never half of one (a killed run loses nothing).

    The temp name is unique (mkstemp in the same folder), so two writers never share one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
