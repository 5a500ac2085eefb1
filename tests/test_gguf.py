"""Tests for gguf_file.py: reading GGUF files and dequantising their tensors. Every block type gguf_file reads (F32,
F16, BF16, the legacy quants and the K-quants) dequantises bit for bit like the `gguf` package (the oracle) on random
blocks; a truncated file or a wrong magic is a one-line error naming the file and tensor. Slow tests read the real
SmolLM2-135M GGUF: its 272 tensors equal gguf's dequantisation bit for bit.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import gguf_file  # noqa: E402
import model as M  # noqa: E402
from conftest import one_line_error  # noqa: E402


@pytest.mark.slow
def test_truncated_gguf_names_file_and_tensor(tmp_path):
    src = M.default_model_path()
    with open(src, "rb") as f:
        head = f.read(6 << 20)  # metadata + tensor table fit in the first few MB; the data does not
    for cut, needle in ((6 << 20, "tensor token_embd.weight"), (1000, "truncated GGUF")):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(head[:cut])
        msg = one_line_error(M.load_model, bad)
        assert str(bad) in msg and needle in msg, msg


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    assert "bad magic" in one_line_error(M.load_model, bad)


@pytest.mark.slow
def test_gguf_dequantization_bit_exact(gguf_path, gguf_read):
    import gguf
    _, ours = gguf_read
    reader = gguf.GGUFReader(str(gguf_path))
    assert len(reader.tensors) == len(ours) == 272
    kinds = set()
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        mine = ours[t.name].numpy()
        kinds.add(t.tensor_type.name)
        assert mine.shape == ref.reshape(mine.shape).shape and mine.size == ref.size, t.name
        assert np.array_equal(mine.reshape(-1).view(np.uint32), ref.reshape(-1).view(np.uint32)), \
            f"{t.name} ({t.tensor_type.name}) differs from gguf.quants.dequantize"
    assert kinds == {"Q4_1", "Q8_0", "F32"}


# where each block type keeps its fp16 factors (d, and dmin / m), made finite so NaN can never hide a mismatch
FP16_AT = {"Q4_0": [0], "Q4_1": [0, 2], "Q8_0": [0], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82], "Q3_K": [108],
           "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", *FP16_AT])
def test_dequantize_every_supported_type_matches_gguf(kind):
    """Random blocks of every type gguf_file reads, bit for bit against the gguf package (the real files hold
    F32, Q8_0, Q4_1 (SmolLM2) and Q5_0, Q4_K, Q6_K (Gemma 3))."""
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[kind]
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    assert gguf_file.GGML_BLOCK[kind] == (block_bytes, block_size)
    rng = np.random.default_rng(0)
    if kind in FP16_AT:  # 512 random blocks, their fp16 factors finite
        raw = rng.integers(0, 256, (512, block_bytes), dtype=np.uint8)
        for at in FP16_AT[kind]:
            raw[:, at:at + 2] = rng.normal(0, 0.05, (512, 1)).astype(np.float16).view(np.uint8)
    else:  # plain floats: 256 random finite values
        vals = rng.normal(0, 1, 256).astype(np.float32)
        if kind == "F16":
            vals = vals.astype(np.float16)
        if kind == "BF16":
            vals = (vals.view(np.uint32) >> 16).astype(np.uint16)  # the top half of a float32
        raw = vals.view(np.uint8).reshape(8, -1)
    ref = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(-1)
    ours = gguf_file.dequantize(raw.reshape(-1), kind)
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
