"""carry.py — the default model and the benchmark data to a machine without network, in parts under a size limit.

Some GPU machines (a course's runner, a batch job behind a firewall) cannot download anything and take files only
as bundles of limited size, the working tree included. The default model (98 MB) and the data (12 MB) then travel
in parts, one per transfer:

    python carry.py pack [--limit-mib 56]      here: .carry/1, .carry/2, ... each at most the limit (git-ignored)
    python carry.py receive K                  there, once per transfer, .carry/K carried: part K into the stash
    python carry.py join                       there, when every part is in: each part checked, the model joined and
                                               checked against its pin, model and data laid out as a shared folder
    FREE_MOE_SHARED=/tmp/free-moe-shared make gpu-check      then every script finds them there
    python carry.py rehearse                   here: pack, then receive each part into a fresh copy, join, check

The stash (/tmp/free-moe-carry) outlives the transfers: a transfer may replace the working tree, and with it the
part that came before. Every file is checked by sha256 three times: as received (against pack's manifest), the
joined model against model.DEFAULT_GGUF_SHA256, each data file against its pin in data.py.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import data
import model as M
from cli import ArgumentParser, UserError, file_sha256, positive_float, positive_int, run_cli, write_atomic

ROOT = Path(__file__).resolve().parent
PACKED = ROOT / ".carry"  # listed in .gitignore: parts are never committed
STASH = Path("/tmp/free-moe-carry")
SHARED = Path("/tmp/free-moe-shared")
MODEL_NAME = Path(M.DEFAULT_GGUF).name
CHUNK = 1 << 24


# ----------------------------------------------------------------------------- here: pack

def plan(data_files: dict[str, Path], model_size: int, limit: int) -> list[list[dict]]:
    """What goes into which part: the data files whole, first (they are small), then the model's bytes in pieces
    that fill each part up to `limit` bytes. -> parts, each a list of {"data": name} or {"model": (start, end)}."""
    if limit < 1:
        raise UserError("--limit-mib must allow at least one byte per part")
    parts, room = [[]], limit
    for name, path in data_files.items():
        size = path.stat().st_size
        if size > limit:
            raise UserError(f"data file {name} ({size} bytes) is larger than --limit-mib")
        if size > room:
            parts, room = parts + [[]], limit
        parts[-1].append({"data": name})
        room -= size
    start = 0
    while start < model_size:
        if room == 0:
            parts, room = parts + [[]], limit
        end = min(model_size, start + room)
        parts[-1].append({"model": (start, end)})
        room -= end - start
        start = end
    return parts


def pack(out: Path, limit_mib: float) -> dict:
    """Write the parts and, into each, the manifest (every part knows the whole plan)."""
    src = M.default_model_path()
    M.check_default_model(src)  # only the pinned bytes are sent
    data_files = {name: data.data_file(name) for name in data.FILES}  # verified, downloaded into the cache if needed
    parts = plan(data_files, src.stat().st_size, int(limit_mib * (1 << 20)))
    if out.exists():
        shutil.rmtree(out)
    manifest = {"model": {"name": M.DEFAULT_GGUF, "sha256": M.DEFAULT_GGUF_SHA256, "size": src.stat().st_size},
                "parts": len(parts), "files": []}
    with open(src, "rb") as model_file:
        for k, items in enumerate(parts, 1):
            (out / str(k)).mkdir(parents=True)
            for item in items:
                if "data" in item:
                    dest = out / str(k) / ("data." + item["data"].replace("/", "."))
                    shutil.copyfile(data_files[item["data"]], dest)
                    entry = {"part": k, "file": dest.name, "data": item["data"]}
                else:
                    start, end = item["model"]
                    dest = out / str(k) / f"model.{start}"
                    model_file.seek(start)
                    dest.write_bytes(model_file.read(end - start))
                    entry = {"part": k, "file": dest.name, "model_bytes": [start, end]}
                manifest["files"].append({**entry, "sha256": file_sha256(dest)})
    for k in range(1, len(parts) + 1):
        write_atomic(out / str(k) / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


# ----------------------------------------------------------------------------- there: receive, join

def receive(k: int, packed: Path, stash: Path) -> list[str]:
    """Copy part k into the stash, checking each file as it lands. -> the files received."""
    src = packed / str(k)
    if not (src / "manifest.json").is_file():
        raise UserError(f"{src}: no part {k} here (carry .carry/{k} with this transfer)")
    manifest = json.loads((src / "manifest.json").read_text())
    (stash / str(k)).mkdir(parents=True, exist_ok=True)
    got = []
    for f in (f for f in manifest["files"] if f["part"] == k):
        dest = stash / str(k) / f["file"]
        shutil.copyfile(src / f["file"], dest)
        if file_sha256(dest) != f["sha256"]:
            raise UserError(f"{src / f['file']}: damaged in transfer (sha256 differs from the manifest)")
        got.append(f["file"])
    shutil.copyfile(src / "manifest.json", stash / "manifest.json")
    return got


def join(stash: Path, to: Path) -> Path:
    """Check that every part is in, join the model, lay out to/models/... and to/data/... -> the model's path."""
    if not (stash / "manifest.json").is_file():
        raise UserError(f"{stash}: nothing received yet (run `python carry.py receive K` for each part first)")
    manifest = json.loads((stash / "manifest.json").read_text())
    for f in manifest["files"]:
        path = stash / str(f["part"]) / f["file"]
        if not path.is_file():
            raise UserError(f"part {f['part']} of {manifest['parts']} is missing in {stash} "
                            f"(run `python carry.py receive {f['part']}` with .carry/{f['part']} carried)")
        if file_sha256(path) != f["sha256"]:
            raise UserError(f"{path}: damaged in the stash (sha256 differs from the manifest); receive it again")
    model = to / manifest["model"]["name"]
    model.parent.mkdir(parents=True, exist_ok=True)
    partial = model.with_name(model.name + ".part")
    with open(partial, "wb") as out:
        for f in sorted((f for f in manifest["files"] if "model_bytes" in f), key=lambda f: f["model_bytes"][0]):
            with open(stash / str(f["part"]) / f["file"], "rb") as piece:
                shutil.copyfileobj(piece, out, CHUNK)
    if file_sha256(partial) != manifest["model"]["sha256"]:
        partial.unlink()
        raise UserError(f"the joined model differs from its pin {manifest['model']['sha256'][:16]}...: a piece is "
                        "missing or from another pack")
    partial.replace(model)
    for f in (f for f in manifest["files"] if "data" in f):
        dest = to / "data" / f["data"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stash / str(f["part"]) / f["file"], dest)
        if not data.verify(f["data"], dest):
            raise UserError(f"{dest}: differs from the pin of data/{f['data']} in data.py")
    return model


# ----------------------------------------------------------------------------- here: the whole trip, rehearsed

def part_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / (1 << 20)


def tree_mib() -> float:
    """The working tree as a transfer sends it: tracked files and untracked ones git does not ignore."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        raise UserError("rehearse needs git, to size the working tree a transfer sends") from None
    return sum((ROOT / n).stat().st_size for n in names if n and (ROOT / n).is_file()) / (1 << 20)


def rehearse(limit_mib: float, bundle_mib: float, packed: Path = PACKED) -> dict:
    """pack, then for each part a fresh tree holding only that part (as a transfer that replaces the tree),
    receive it, and join: what the machine will do, here, on the same bytes."""
    manifest = pack(packed, limit_mib)
    tree = tree_mib()
    with tempfile.TemporaryDirectory() as tmp:
        stash, shared = Path(tmp) / "stash", Path(tmp) / "shared"
        sizes = []
        for k in range(1, manifest["parts"] + 1):
            fresh = Path(tmp) / f"tree{k}" / ".carry"
            shutil.copytree(packed / str(k), fresh / str(k))
            sizes.append(part_mib(fresh / str(k)))
            receive(k, fresh, stash)
            shutil.rmtree(fresh.parent)
        join(stash, shared)  # checks the joined model against its pin, and every data file
    over = [k for k, size in enumerate(sizes, 1) if size + tree > bundle_mib]
    if over:
        raise UserError(f"part(s) {over} with the working tree ({tree:.1f} MiB) exceed {bundle_mib} MiB: "
                        "lower --limit-mib")
    return {"parts": manifest["parts"], "part_mib": [round(s, 1) for s in sizes], "tree_mib": round(tree, 1)}


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0].split(" — ", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, text in (("pack", "write the parts into .carry/"), ("rehearse", "pack, receive and join, here")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--limit-mib", type=positive_float, default=56.0,
                       help="most MiB per part (the tree travels too)")
        if name == "rehearse":
            s.add_argument("--bundle-mib", type=positive_float, default=64.0,
                           help="most MiB per transfer, tree included")
    s = sub.add_parser("receive", help="copy part K from .carry/K into the stash")
    s.add_argument("k", type=positive_int, metavar="K")
    s.add_argument("--stash", type=Path, default=STASH)
    s = sub.add_parser("join", help="check the parts, join the model, lay out a shared folder")
    s.add_argument("--stash", type=Path, default=STASH)
    s.add_argument("--to", type=Path, default=SHARED)
    args = p.parse_args(argv)
    try:
        run(args)
    except OSError as e:  # a stash or target folder that cannot be written, a disk that is full
        raise UserError(f"{e.filename or 'carry.py'}: {e.strerror or e}") from None


def run(args):
    if args.cmd == "pack":
        m = pack(PACKED, args.limit_mib)
        for k in range(1, m["parts"] + 1):
            print(f"part {k} of {m['parts']}: {PACKED / str(k)} ({part_mib(PACKED / str(k)):.1f} MiB)")
    elif args.cmd == "receive":
        print(f"part {args.k}: {len(receive(args.k, PACKED, args.stash))} files into {args.stash / str(args.k)}")
    elif args.cmd == "join":
        path = join(args.stash, args.to)
        print(f"joined {path} (sha256 checked); use it with FREE_MOE_SHARED={args.to}")
    else:
        r = rehearse(args.limit_mib, args.bundle_mib)
        print(f"rehearsed: {r['parts']} parts of {r['part_mib']} MiB, working tree {r['tree_mib']} MiB; "
              "received, joined and checked")


if __name__ == "__main__":
    run_cli(main)
