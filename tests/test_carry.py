"""carry.py: the model and the data in parts under a size limit, received one part per transfer, joined, checked."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import carry  # noqa: E402
import cli  # noqa: E402
import data  # noqa: E402
import model as M  # noqa: E402


def test_plan_puts_data_first_and_splits_the_model_to_fill_each_part(tmp_path):
    files = {}
    for name, size in (("a.txt", 30), ("b.txt", 50), ("c.txt", 10)):
        files[name] = tmp_path / name
        files[name].write_bytes(b"x" * size)
    parts = carry.plan(files, model_size=250, limit=100)
    sizes = [sum(files[i["data"]].stat().st_size if "data" in i else i["model"][1] - i["model"][0] for i in p)
             for p in parts]
    assert sizes == [100, 100, 100, 40]  # every part full but the last
    assert [i["data"] for i in parts[0] if "data" in i] == ["a.txt", "b.txt", "c.txt"]
    pieces = [i["model"] for p in parts for i in p if "model" in i]
    assert pieces[0][0] == 0 and pieces[-1][1] == 250 and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    with pytest.raises(M.UserError, match="larger than --limit-mib"):
        carry.plan(files, 10, limit=40)
    with pytest.raises(M.UserError, match="at least one byte"):  # else no part could ever fill
        carry.plan(files, 10, limit=0)


def test_bad_arguments_and_unwritable_folders_are_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv in (["receive", "0"], ["pack", "--limit-mib", "-1"], ["join", "--stash", str(tmp_path), "--to", "x"]):
        r = subprocess.run([sys.executable, str(ROOT / "carry.py"), *argv], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") <= 2 and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "manifest.json").write_text(json.dumps({"parts": 1, "files": [], "model": {"name": "m.gguf"}}))
    with pytest.raises(M.UserError):  # the target is a file: no folder can be made there
        carry.main(["join", "--stash", str(tmp_path), "--to", str(blocker)])


@pytest.fixture
def small_world(tmp_path, monkeypatch):
    """A 3,000-byte 'model' and two data files, pinned as the project pins the real ones."""
    model = tmp_path / "src" / "model.gguf"
    model.parent.mkdir()
    model.write_bytes(bytes(range(256)) * 11 + b"end" * 64)
    monkeypatch.setattr(M, "default_model_path", lambda: model)
    monkeypatch.setattr(M, "DEFAULT_GGUF", "models/tiny/model.gguf")
    monkeypatch.setattr(M, "DEFAULT_GGUF_SHA256", hashlib.sha256(model.read_bytes()).hexdigest())
    files = {}
    for name, text in (("mmlu/dev.jsonl.gz", b"d" * 700), ("gsm8k/test.jsonl", b"g" * 500)):
        path = tmp_path / "src" / name.replace("/", "_")
        path.write_bytes(text)
        files[name] = data.DataFile(name, (), hashlib.sha256(text).hexdigest(), len(text))
    monkeypatch.setattr(data, "FILES", files)
    monkeypatch.setattr(data, "data_file", lambda name, data_dir=None: tmp_path / "src" / name.replace("/", "_"))
    return model, tmp_path


def test_pack_receive_join_gives_back_the_pinned_bytes(small_world):
    model, tmp = small_world
    manifest = carry.pack(tmp / "packed", limit_mib=1500 / (1 << 20))  # 1,500 bytes per part: 3 parts
    assert manifest["parts"] == 3
    assert all(sum(f.stat().st_size for f in (tmp / "packed" / str(k)).iterdir() if f.name != "manifest.json")
               <= 1500 for k in (1, 2, 3))
    stash = tmp / "stash"
    for k in (3, 1, 2):  # any order; each transfer brings only its own part
        tree = tmp / f"tree{k}"
        shutil.copytree(tmp / "packed" / str(k), tree / str(k))
        carry.receive(k, tree, stash)
        shutil.rmtree(tree)
    joined = carry.join(stash, tmp / "shared")
    assert joined == tmp / "shared" / "models/tiny/model.gguf" and joined.read_bytes() == model.read_bytes()
    assert (tmp / "shared" / "data" / "gsm8k/test.jsonl").read_bytes() == b"g" * 500
    assert not list((tmp / "shared").rglob("*.part"))


def test_a_missing_or_damaged_part_is_one_line_and_leaves_no_model(small_world):
    model, tmp = small_world
    carry.pack(tmp / "packed", limit_mib=1500 / (1 << 20))
    stash = tmp / "stash"
    carry.receive(1, tmp / "packed", stash)
    with pytest.raises(M.UserError, match=r"part 2 of 3 is missing .* receive 2") as e:
        carry.join(stash, tmp / "shared")
    assert "\n" not in str(e.value) and not (tmp / "shared" / "models/tiny/model.gguf").exists()
    with pytest.raises(M.UserError, match="no part 4 here"):
        carry.receive(4, tmp / "packed", stash)
    # damaged on the way: the file differs from pack's manifest
    piece = next(f for f in (tmp / "packed" / "2").iterdir() if f.name.startswith("model."))
    piece.write_bytes(b"?" + piece.read_bytes()[1:])
    with pytest.raises(M.UserError, match="damaged in transfer"):
        carry.receive(2, tmp / "packed", stash)


def test_join_refuses_a_model_that_differs_from_its_pin(small_world, monkeypatch):
    model, tmp = small_world
    carry.pack(tmp / "packed", limit_mib=1)
    manifest = json.loads((tmp / "packed" / "1" / "manifest.json").read_text())
    manifest["model"]["sha256"] = "0" * 64  # a pack made for another model
    (tmp / "packed" / "1" / "manifest.json").write_text(json.dumps(manifest))
    carry.receive(1, tmp / "packed", tmp / "stash")
    with pytest.raises(M.UserError, match="differs from its pin"):
        carry.join(tmp / "stash", tmp / "shared")
    assert not list((tmp / "shared").rglob("*.gguf*"))


@pytest.mark.slow
def test_rehearse_with_the_real_model_and_data(tmp_path):
    try:
        M.check_default_model(M.default_model_path())
    except M.UserError:
        pytest.skip("the default model is not here")
    local = [d / "data" / name for name in data.FILES for d in (cli.shared_dir(), cli.cache_dir())]
    if sum(p.is_file() for p in local) < len(data.FILES):
        pytest.skip("the data files are not all here (pack would download them)")
    r = carry.rehearse(56.0, 64.0, packed=tmp_path / "packed")
    assert r["parts"] == 2 and all(s <= 56.0 for s in r["part_mib"]) and r["tree_mib"] < 8
    with pytest.raises(M.UserError, match="lower --limit-mib"):
        carry.rehearse(56.0, 50.0, packed=tmp_path / "packed")
