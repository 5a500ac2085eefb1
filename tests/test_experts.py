"""Tests for experts.py: the DSS-Experts file, compact experts and the HF export. On tiny random models (seeded): a
masked FFN (MaskedMLP) equals its materialized compact FFN; the experts file round-trips its index sets, baselines and
statistics, and a file for another model, a flipped bit, a truncation, a foreign file or an out-of-range index is
refused; baselines rebuild from the saved statistics at any keep; an exported expert loads in transformers (and in our
loader) with the same logits, in float32 and in bfloat16. Shape legend: N windows, T time, V vocab.
"""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import checkpoints as ckpt  # noqa: E402
import model as M  # noqa: E402
import dowp  # noqa: E402
import experts as EX  # noqa: E402
from conftest import TINY, smol_hf_tokenizer, tiny_model, windows  # noqa: E402

SMOL_HF_TOK = smol_hf_tokenizer()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masked_equals_compact(arch):
    m, w = tiny_model(arch, **TINY), windows()
    scores = dowp.score_random(m, seed=3)
    idx = dowp.select_neurons(scores, 0.4)
    assert all(len(i) == round(0.4 * 48) for i in idx)
    compact = EX.materialize(m, idx)
    masked = [EX.MaskedMLP(b.mlp, i) for b, i in zip(m.layers, idx)]
    for c, k in zip(compact, idx):
        assert c.n_neurons == len(k) and c.up.weight.shape == (len(k), 32)  # really smaller matmuls
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert (compact[0](x) - masked[0](x)).abs().max() <= 1e-5
        assert (m(w, mlps=compact) - m(w, mlps=masked)).abs().max() <= 1e-5
        assert (m(w, mlps=compact) - m(w)).abs().max() > 1e-3  # and purifying really changed the model


def test_experts_file_roundtrip_and_refusals(tmp_path):
    m, w = tiny_model(**TINY), windows()
    stats = {"general": dowp.collect_stats(m, w), "code": dowp.collect_stats(m, windows(seed=5))}
    experts = {d: dowp.select_neurons(dowp.score_neurons(stats, m, "dowp", d), 0.5) for d in stats}
    baselines = {b: EX.baseline_indices(b, m, stats, 0.5) for b in dowp.BASELINES}
    meta = {"fingerprint": m.fingerprint, "n_layer": 3, "n_ffn": 48, "score": "dowp", "keep": 0.5, "protect": 50.0}
    path = tmp_path / "experts.safetensors"
    EX.save_experts(path, experts, meta, baselines, stats)
    ex = EX.load_experts(path, m)
    assert ex.domains == ["general", "code"] and ex.meta["keep"] == 0.5
    for d in stats:
        assert all(torch.equal(a, b) for a, b in zip(ex.indices[d], experts[d]))
        for k in dowp.STATS:
            assert torch.equal(ex.stats[d][k], stats[d][k])
    for b in dowp.BASELINES:
        assert all(torch.equal(x, y) for x, y in zip(ex.baselines[b], baselines[b]))
        # a baseline rebuilt from the saved statistics (at the file's keep) is the stored one
        assert all(torch.equal(x, y) for x, y in zip(EX.baseline_indices(b, m, path, 0.5), baselines[b]))
    assert len(EX.baseline_indices("mixed", m, ex, 0.25)[0]) == 12  # any keep
    assert all(EX.kept_fraction(ex.indices[d], m) == 0.5 for d in ex.domains)
    assert ex.mlps("code")[0].n_neurons == 24
    assert all(torch.equal(a, b) for a, b in zip(ex.index_sets("general"), experts["general"]))  # domain first
    assert all(torch.equal(a, b) for a, b in zip(ex.index_sets("baseline.general"), baselines["general"]))
    with pytest.raises(M.UserError, match="no expert or baseline"):
        ex.mlps("legal")

    other = tiny_model(seed=1, **TINY)  # same shapes, other weights -> other fingerprint
    with pytest.raises(M.UserError, match="fingerprint"):
        EX.load_experts(path, other)
    wide = tiny_model(n_ffn=64, **TINY)
    EX.save_experts(tmp_path / "wide.safetensors", experts, {**meta, "fingerprint": wide.fingerprint})
    with pytest.raises(M.UserError, match="neurons"):
        EX.load_experts(tmp_path / "wide.safetensors", wide)

    raw = bytearray(path.read_bytes())
    bad = tmp_path / "flipped.safetensors"
    raw_flip = bytearray(raw)
    raw_flip[-5] ^= 0x40  # one bit inside the tensor data
    bad.write_bytes(bytes(raw_flip))
    with pytest.raises(M.UserError, match="checksum|corrupt"):
        EX.load_experts(bad, m)
    bad.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(M.UserError, match="truncated"):
        EX.load_experts(bad, m)
    ckpt.write_safetensors(bad, {"x": torch.zeros(3)}, {"hello": "world"})
    with pytest.raises(M.UserError, match="not an experts file"):
        EX.load_experts(bad, m)
    with pytest.raises(M.UserError, match="does not exist"):
        EX.load_experts(tmp_path / "missing.safetensors", m)
    # an index set out of range, saved with a valid checksum, is refused by the range check
    broken = {d: [i.clone() for i in v] for d, v in experts.items()}
    broken["code"][1][-1] = 48
    EX.save_experts(bad, broken, meta)
    with pytest.raises(M.UserError, match="code.1"):
        EX.load_experts(bad, m)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("gpt2", True)])
def test_export_loads_in_transformers(tmp_path, arch, tie):
    transformers = pytest.importorskip("transformers")
    m, w = tiny_model(arch, tie=tie, **TINY), windows()
    idx = dowp.select_neurons(dowp.score_random(m, 7), 0.5)
    out = tmp_path / "exp"
    info = EX.export_hf(m, idx, out, SMOL_HF_TOK if SMOL_HF_TOK.exists() else None, {"domain": "x"})
    copied = info["tokenizer_files"]
    assert info["dtype"] == "float32" and info["bytes"] == (out / "model.safetensors").stat().st_size  # its source
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf.config.intermediate_size if arch == "llama" else hf.config.n_inner == 24
    with torch.no_grad():
        ours = m(w, mlps=EX.materialize(m, idx))  # (N, T, V)
        theirs = hf(w).logits
    assert (ours - theirs).abs().max() <= 1e-4
    if copied:  # our own loader reads the exported dir too
        m2, _ = M.load_model(out)
        with torch.no_grad():
            assert (m2(w) - ours).abs().max() <= 1e-5
    with pytest.raises(M.UserError, match="same number of kept neurons"):
        EX.export_hf(m, [idx[0], idx[1], idx[2][:5]], tmp_path / "bad")
    half = EX.export_hf(m, idx, tmp_path / "bf16", dtype="bfloat16")  # half the bytes, still loads
    assert half["bytes"] < 0.6 * info["bytes"]
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
