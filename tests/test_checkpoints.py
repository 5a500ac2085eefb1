"""Tests for checkpoints.py: reading HF checkpoint folders (safetensors, sharded or not, and pytorch_model.bin) and
their config.json and key maps, through `load_model(dir)`. A bf16 checkpoint loads into float32 with transformers'
logits; a truncated file, an unknown model_type, a missing tensor or a tensor of the wrong shape is a one-line error
naming the file and the tensor. The checkpoints are conftest.py's tiny random transformers models (the parity of
every format and family is tested in test_model.py).
"""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import model as M  # noqa: E402
from conftest import TOL, build_hf, one_line_error, random_ids, save_hf  # noqa: E402

transformers = pytest.importorskip("transformers")


def test_bf16_checkpoint_loads_exactly(tmp_path):
    """Hub checkpoints are usually bf16 safetensors: read, upcast to fp32, same logits as transformers'."""
    from transformers import AutoModelForCausalLM
    save_hf(build_hf("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)).to(torch.bfloat16), tmp_path,
            "safetensors")
    # reloaded rather than .float(): a module cast to bf16 keeps bf16-rounded RoPE frequencies in transformers
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours, _ = M.load_model(tmp_path)
    assert ours.tok_emb.weight.dtype == torch.float32
    ids = random_ids(2, 32)
    with torch.no_grad():
        diff = (ours(ids) - hf(ids).logits).abs().max().item()
    assert diff <= TOL


# ============================================================================ bad input

@pytest.fixture
def broken_dir(tiny_llama_dir, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, d)
    return d


def test_truncated_safetensors_names_file_and_tensor(broken_dir):
    from safetensors import safe_open
    f = broken_dir / "model.safetensors"
    with safe_open(str(f), "pt") as s:
        names = set(s.keys())
    f.write_bytes(f.read_bytes()[:-1000])
    msg = one_line_error(M.load_model, broken_dir)
    assert str(f) in msg and "truncated" in msg
    named = re.search(r"tensor (\S+)", msg)
    assert named and named.group(1) in names, msg


def test_truncated_safetensors_header(broken_dir):
    f = broken_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    msg = one_line_error(M.load_model, broken_dir)
    assert str(f) in msg and "truncated" in msg


def test_unknown_model_type(broken_dir):
    cfg = json.loads((broken_dir / "config.json").read_text())
    cfg["model_type"] = "bert"
    (broken_dir / "config.json").write_text(json.dumps(cfg))
    msg = one_line_error(M.load_model, broken_dir)
    assert "'bert'" in msg and "config.json" in msg and str(broken_dir) in msg


def test_missing_tensor_named(broken_dir):
    from safetensors.torch import load_file, save_file
    f = broken_dir / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, str(f), metadata={"format": "pt"})
    msg = one_line_error(M.load_model, broken_dir)
    assert str(broken_dir) in msg and "missing" in msg and "layers.1.mlp.down" in msg


def test_shape_mismatch_named(broken_dir):
    from safetensors.torch import load_file, save_file
    f = broken_dir / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(sd, str(f), metadata={"format": "pt"})
    msg = one_line_error(M.load_model, broken_dir)
    assert str(broken_dir) in msg and "layers.0.mlp.up" in msg and "(95, 64)" in msg and "(96, 64)" in msg
