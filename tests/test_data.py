"""Tests for data.py: domain splits, user corpora, the one-line errors for bad data and bad benchmark rows,
and the data files' table, cache and downloads (a local file server stands in for the internet).

    python -m pytest -q tests/test_data.py
"""
import csv
import dataclasses
import gzip
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402
import downloads  # noqa: E402
import model as M  # noqa: E402
from cli import UserError, shared_dir  # noqa: E402
from conftest import TrickleServer  # noqa: E402


# ----------------------------------------------------------------------------- domain splits (real files, no model)

def test_domain_splits_disjoint_and_deterministic():
    for d in data.BUILTIN_DOMAINS:
        calib, held = data.domain_documents(d, "calib"), data.domain_documents(d, "heldout")
        assert calib and held
        assert not set(calib) & set(held), d
    assert data.heldout_text("math") == data.heldout_text("math")
    rows = data.load_gsm8k("test")
    math_docs = set(data.domain_documents("math", "calib")) | set(data.domain_documents("math", "heldout"))
    assert not math_docs & {data.gsm8k_text(r) for r in rows}  # GSM8K test (scored by evaluate.py) never used
    buckets = [data.mmlu_bucket(r) for r in data.load_mmlu("test")]
    assert 0.15 < buckets.count("calib") / len(buckets) < 0.25 and 0.05 < buckets.count("heldout") / len(buckets) < 0.15


class CharTok:
    def encode(self, text, bos=False):
        return [ord(c) % 96 for c in text]


def test_user_domain_and_errors(tmp_path):
    f = tmp_path / "legal.txt"
    f.write_text("\n\n".join(f"Clause {i}: the party of the first part shall pay." for i in range(20)))
    calib = data.load_domain_tokens(f"legal={f}", CharTok(), split="calib", n_tokens=256, seq_len=64, seed=1)
    assert calib.shape == (4, 64)
    assert torch.equal(calib, data.load_domain_tokens(f"legal={f}", CharTok(), split="calib", n_tokens=256,
                                                   seq_len=64, seed=1))  # deterministic by seed
    held = data.domain_documents(f"legal={f}", "heldout")
    assert len(held) == 2 and not set(held) & set(data.domain_documents(f"legal={f}", "calib"))
    j = tmp_path / "qa.jsonl"
    j.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(10)))
    assert data.domain_documents(f"qa={j}", "heldout") == ["doc 9"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(UserError, match="0 documents"):
        data.domain_documents(f"e={empty}")
    with pytest.raises(UserError, match="unknown domain"):
        data.domain_documents("poetry")
    with pytest.raises(UserError, match="does not exist"):
        data.domain_documents(f"x={tmp_path / 'nope.txt'}")
    with pytest.raises(UserError, match="bad domain name"):
        data.parse_domain("Bad Name=x.txt")


# ----------------------------------------------------------------------------- data files: table, cache, downloads
#
# A local server (127.0.0.1 only, shut down by the test or by its own timer) stands in for the internet. It serves
# a mirror of the upstream files under <host>/<path>, regenerated from the project's own data files (../shared in
# CI, the cache in a fresh clone): the files and the gunzipped corpora are the upstream bytes; MMLU's CSVs come
# back from csv.writer byte for byte; the code corpus splits back into its files. Only the MedMCQA source has
# fields the corpus drops: it is rebuilt with the fields the build reads and its source hash re-pinned.

SHARED_DATA = shared_dir() / "data"  # the reference copies, where this checkout has ../shared beside it
MEDMCQA = "corpora/medical_medmcqa.txt.gz"
SYSCONFIG = re.compile(r"(?ms)^# ===== file: Lib/_sysconfigdata_.*?(?=^# ===== file: )")  # see data.CPYTHON_FILES


def upstream_files() -> dict[str, bytes]:
    """url -> the bytes its server sends, regenerated from the data files."""
    out = {}
    for f in data.FILES.values():
        text = data.data_file(f.name).read_bytes()
        text = gzip.decompress(text) if f.build else text
        urls = [u for u in f.sources if "://" in u]
        if f.build is data.build_mmlu:  # one CSV per subject
            rows = [json.loads(line) for line in text.decode().split("\n") if line]  # not splitlines: U+2028
            for url in urls:
                subject = url.rsplit("/", 1)[1].rsplit("_", 1)[0]
                buf = io.StringIO(newline="")
                w = csv.writer(buf, lineterminator="\n")
                w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
                w.writerows([r["question"], *r["choices"], r["answer"]] for r in rows if r["subject"] == subject)
                out[url] = buf.getvalue().encode()
        elif f.build is data.build_code:  # one file per header line
            parts = re.split(r"(?m)^# ===== file: (Lib/\S+) =====\n", text.decode())
            files = dict(zip(parts[1::2], parts[2::2]))
            out.update({u: files["Lib/" + u.split("/Lib/", 1)[1]][:-1].encode() for u in urls})
        elif f.build is data.build_medmcqa:
            keys = ("question", "opa", "opb", "opc", "opd", "cop", "exp")
            rows = [dict(zip(keys, data.MEDMCQA_ITEM.fullmatch(item).groups()))
                    for item in re.split(r"\n\n(?=Question: )", text.decode()[:-2])]
            out[urls[0]] = "".join(json.dumps({**r, "cop": "ABCD".index(r["cop"]) + 1}) + "\n" for r in rows).encode()
        elif urls:
            out[urls[0]] = text
    return out


@pytest.fixture(scope="session")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    for url, body in upstream_files().items():
        path = root / url.split("://", 1)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    return root


class Server:
    """A file server on 127.0.0.1 in a thread, counting requests; it shuts itself down after `lifetime` seconds.
    send_only=n: send the headers and the first n bytes, then go quiet (stall=True) or hang up."""

    def __init__(self, root: Path, lifetime: float = 300, send_only: int | None = None, stall: bool = False):
        self.requests, self.sent_part, self.quit = [], threading.Event(), threading.Event()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(root), **k)

            def log_message(self, *a):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                if send_only is None:
                    return super().do_GET()
                body = (root / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:send_only])
                self.wfile.flush()
                server.sent_part.set()
                if stall:
                    server.quit.wait(lifetime)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.timer = threading.Timer(lifetime, self.close)
        self.timer.start()

    def close(self):
        self.quit.set()
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A fresh clone's situation: an empty shared folder and an empty cache. Yields the cache."""
    monkeypatch.setenv("FREE_MOE_SHARED", str(tmp_path / "empty"))
    monkeypatch.setenv("FREE_MOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "data"


@pytest.fixture
def serve(mirror, fresh, monkeypatch):
    """Start a Server on the mirror and point data.py at it; shut down after the test."""
    servers = []

    def start(**kw):
        servers.append(Server(mirror, **kw))
        monkeypatch.setenv("FREE_MOE_DATA_URL", servers[-1].url)
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def repin_medmcqa(mirror, monkeypatch):
    f = data.FILES[MEDMCQA]
    body = (mirror / f.sources[0].split("://", 1)[1]).read_bytes()
    monkeypatch.setitem(data.FILES, MEDMCQA, dataclasses.replace(f, sha256=data.sha256(body)))


def test_download_builds_verifies_and_caches(serve, fresh, mirror, monkeypatch):
    """Every file downloads, builds and verifies, equals ../shared's copy, and a second lookup sends no request."""
    repin_medmcqa(mirror, monkeypatch)
    server = serve()
    for name in data.FILES:
        path = data.data_file(name)
        assert path == fresh / name and data.verify(name, path), name
        if (SHARED_DATA / name).is_file():
            want = (SHARED_DATA / name).read_bytes()
            if name == "corpora/code_python.txt.gz":  # ../shared's copy has one more file (data.CPYTHON_FILES)
                want = data.gzip_bytes(SYSCONFIG.sub("", gzip.decompress(want).decode(), count=1).encode())
            assert path.read_bytes() == want, f"{name} differs from {SHARED_DATA / name}"
    n = len(server.requests)
    assert n == sum("://" in u for f in data.FILES.values() for u in f.sources) == 244
    assert all(data.data_file(name) == fresh / name for name in data.FILES) and len(server.requests) == n
    assert sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file()) == sorted(data.FILES)


def test_mismatch_refused_nothing_written(serve, fresh, monkeypatch):
    serve()
    name = "gsm8k/test.jsonl"
    monkeypatch.setitem(data.FILES, name, dataclasses.replace(data.FILES[name], sha256="0" * 64))
    with pytest.raises(UserError, match=f"refusing data/{name}: its download has sha256 3730d312"):
        data.data_file(name)
    name = "corpora/math_gsm8k_train.txt.gz"
    monkeypatch.setitem(data.FILES, name, dataclasses.replace(data.FILES[name], built_sha256="0" * 64))
    with pytest.raises(UserError, match=f"refusing data/{name}: the built file has sha256 f834f5fa"):
        data.data_file(name)
    assert [p.name for p in fresh.rglob("*") if p.is_file()] == ["train.jsonl"]  # the source entry, verified


def test_cut_short_download_refused(serve, fresh):
    serve(send_only=1000)  # the server hangs up after 1000 bytes of 749738
    with pytest.raises(UserError, match="refusing data/gsm8k/test.jsonl: its download has sha256"):
        data.data_file("gsm8k/test.jsonl")
    assert not fresh.exists() or not any(fresh.rglob("*.jsonl*"))


def test_killed_download_leaves_no_file(serve, fresh):
    """A download killed halfway leaves nothing under the real name (nor a temp file); the next lookup works."""
    stalled = serve(send_only=100_000, stall=True)
    code = "import data; data.data_file('gsm8k/test.jsonl')"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert stalled.sent_part.wait(120), "the download never started"
        proc.kill()
    finally:
        proc.wait(30)
        stalled.close()
    assert not fresh.exists() or not any(fresh.rglob("*"))
    serve()
    assert data.verify("gsm8k/test.jsonl", data.data_file("gsm8k/test.jsonl"))


@pytest.mark.parametrize("trickle", ["headers", "body"])
def test_trickling_server_is_given_up_in_one_line(fresh, monkeypatch, trickle):
    """A server sending a byte every 0.05 s, in its headers or its body, never trips a read timeout; the download's
    deadline (connect, headers and body together) stops it."""
    monkeypatch.setattr(downloads, "GRACE", 1.0)
    monkeypatch.setattr(downloads, "MIN_RATE", 10**9)  # the deadline: one second
    url = data.FILES["gsm8k/test.jsonl"].sources[0].split("://", 1)[1]
    server = TrickleServer({f"/{url}": b"x" * 1000}, trickle)
    monkeypatch.setenv("FREE_MOE_DATA_URL", server.url)
    t0 = time.monotonic()
    try:
        with pytest.raises(UserError, match="downloading data/gsm8k/test.jsonl .* is too slow") as e:
            data.data_file("gsm8k/test.jsonl")
    finally:
        server.close()
    assert time.monotonic() - t0 < 5 and "\n" not in str(e.value)
    assert f"put data/gsm8k/test.jsonl at {fresh / 'gsm8k' / 'test.jsonl'} by hand" in str(e.value)
    assert not fresh.exists() or not any(fresh.rglob("*"))


def test_edited_or_cut_cache_is_fetched_again(serve, fresh, capsys):
    """A cached file is checked at use: edited (every answer changed) or cut at a line boundary, it is fetched
    again with a line on stderr, never used silently."""
    server = serve()
    path = data.data_file("gsm8k/test.jsonl")
    good = path.read_bytes()
    lines = good.decode().split("\n")
    for bad in ("\n".join(line.replace("####", "#### 1") for line in lines).encode(),  # every answer changed
                "\n".join(lines[:700]).encode() + b"\n"):  # 700 of 1,319 rows
        path.write_bytes(bad)
        before = len(server.requests)
        assert data.data_file("gsm8k/test.jsonl") == path and path.read_bytes() == good
        assert len(server.requests) == before + 1 and "fetching it again" in capsys.readouterr().err
    assert data.data_file("gsm8k/test.jsonl") == path and len(server.requests) == before + 1  # verified: kept


def test_offline_is_one_line(fresh, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("FREE_MOE_DATA_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError) as e:
        data.data_file("gsm8k/test.jsonl")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot download data/gsm8k/test.jsonl from http://127.0.0.1:")
    assert "/raw.githubusercontent.com/openai/grade-school-math/3101c7d5072418e28b9008a6636bde82a006892c/" in msg
    assert f"put data/gsm8k/test.jsonl at {fresh / 'gsm8k' / 'test.jsonl'} by hand" in msg
    with pytest.raises(UserError, match="unknown data file 'nope.txt'"):
        data.data_file("nope.txt")


def test_shared_copy_wins(serve, tmp_path):
    """A verified copy in --data-dir is used without a download; an edited one is refused, not used silently."""
    server = serve()
    mine = tmp_path / "mine" / "data" / "gsm8k" / "test.jsonl"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(data.data_file("gsm8k/test.jsonl").read_bytes())  # the real bytes, from the mirror
    requests = len(server.requests)
    assert data.data_file("gsm8k/test.jsonl", str(tmp_path / "mine")) == mine and len(server.requests) == requests
    mine.write_text("{}\n")
    with pytest.raises(UserError, match="refusing .*differs from the pinned sha256"):
        data.data_file("gsm8k/test.jsonl", str(tmp_path / "mine"))


def test_task_pairs_and_second_corpora():
    """Task pairs come from the calibration split, last first (the calibration windows use the first documents);
    every domain has a second corpus from another source, disjoint from its calibration and held-out text."""
    for domain in data.TASK_DOMAINS:
        pairs = data.task_pairs(domain, seed=0)
        docs = data.shuffled(data.domain_documents(domain, "calib"), 0)
        assert len(pairs) == len(docs) and all(p.rstrip().endswith("Answer:") and a.startswith(" ") for p, a in pairs)
        first = pairs[0][0].split("Question: ")[-1].split("\nAnswer:")[0].strip()
        assert first in docs[-1] and first not in "".join(docs[:50])  # from the far end of the calibration order
        assert data.task_pairs(domain, seed=1) != pairs
    with pytest.raises(UserError, match="no task"):
        data.task_pairs("code")
    for domain in data.BUILTIN_DOMAINS:
        text = data.shift_text(domain)
        assert len(text) > 100_000 and text[:2000] not in data.heldout_text(domain)
        assert data.shift_text(domain) is text  # read once per process
    assert len(data.load_math()) == 5000


def test_table_matches_tasks():
    import tasks
    assert data.MMLU_SUBJECTS == sorted(tasks.MMLU_SUBJECT_CATEGORY)
    assert len(data.CPYTHON_FILES) == 121 and all(f.size == 0 or "://" in f.sources[0] for f in data.FILES.values())


@pytest.fixture(scope="session")  # session: looked up before `fresh` empties FREE_MOE_SHARED
def default_gguf():
    try:
        return M.default_model_path()
    except UserError as e:
        pytest.skip(f"real model not available: {e}")


@pytest.mark.slow
def test_purify_on_a_fresh_machine(default_gguf, serve, fresh, tmp_path):
    """purify.py with FREE_MOE_SHARED an empty folder: every corpus it reads comes from the local server."""
    serve()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(REPO / "purify.py"), "--model", str(default_gguf), "--tokens", "128",
                        "--heldout-tokens", "64", "--seq-len", "64", "--keep", "0.5", "--threads", "1",
                        "--no-report", "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "downloading data/corpora/code_python.txt.gz" in r.stderr and (out / "experts.safetensors").exists()
    assert (fresh / "corpora" / "math_gsm8k_train.txt.gz").exists() and (fresh / "mmlu" / "dev.jsonl.gz").exists()


# ----------------------------------------------------------------------------- benchmark rows for the sandbox
#
# data.load_humaneval / load_mbpp refuse rows of the wrong types, naming the file and the row, before anything is
# formatted into a program (a HumanEval `test` that is a list would otherwise be scored).

HUMANEVAL = {"task_id": "HumanEval/0", "prompt": "def f():\n    \"\"\"One.\"\"\"\n",
             "canonical_solution": "    return 1\n", "test": "def check(candidate):\n    assert candidate() == 1\n",
             "entry_point": "f"}
MBPP = {"task_id": 11, "text": "Return one.", "code": "def f():\n    return 1", "test_setup_code": "",
        "test_list": ["assert f() == 1"], "challenge_test_list": []}


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Our own rows in place of the benchmark files (whose pinned sha256 they would not match)."""
    paths = {}
    monkeypatch.setattr(data, "data_file", lambda name, data_dir=None: paths[name])

    def write(rows, name):
        paths[name] = path = tmp_path / name.replace("/", "_")
        text = "".join(json.dumps(r) + "\n" for r in rows)
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
        return path
    return write


def test_good_rows_load(files):
    files([HUMANEVAL, HUMANEVAL], "humaneval/HumanEval.jsonl.gz")
    files([MBPP, {k: v for k, v in MBPP.items() if k != "test_setup_code"}], "mbpp/mbpp.jsonl")
    assert len(data.load_humaneval()) == 2 and len(data.load_mbpp()) == 2


@pytest.mark.parametrize("field, value", [("test", ["def check(candidate):", "    assert True"]), ("prompt", None),
                                          ("canonical_solution", 1), ("task_id", 0), ("entry_point", ["f"]),
                                          ("entry_point", "f(); import os")])
def test_humaneval_rows_of_the_wrong_type_are_refused(files, field, value):
    path = files([HUMANEVAL, {**HUMANEVAL, field: value}], "humaneval/HumanEval.jsonl.gz")
    with pytest.raises(UserError, match=f"corrupt data file {path}: row 2 .*{field}"):
        data.load_humaneval()


@pytest.mark.parametrize("field, value", [("test_list", "assert f() == 1"), ("test_list", [1]), ("task_id", "11"),
                                          ("task_id", True), ("code", None), ("text", ["x"]),
                                          ("test_setup_code", ["x = 1"])])
def test_mbpp_rows_of_the_wrong_type_are_refused(files, field, value):
    path = files([MBPP, {**MBPP, field: value}], "mbpp/mbpp.jsonl")
    with pytest.raises(UserError, match=f"corrupt data file {path}: row 2 "):
        data.load_mbpp()
