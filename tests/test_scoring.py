"""Tests for scoring.py, the log-likelihood engine: batched log-likelihoods equal a plain unpadded forward per request
on a tiny random model, with rows shared by several requests, a context shared by several continuations (run once,
its KV cache copied), left truncation past max_seq_len, several batches and LM-head chunks; the token budget changes
only the grouping, not the numbers; the bootstrap interval is deterministic and brackets the mean.
"""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import scoring as SC  # noqa: E402
from conftest import tiny_model  # noqa: E402

# the tiny model of the scoring tests: tiny_model(seed=seed, **TINY); max_seq_len 24, so long requests get truncated
TINY = dict(vocab=50, max_seq_len=24)


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    x = (torch.rand(200, generator=torch.Generator().manual_seed(0)) < 0.3).double().numpy()
    ones = x * 0 + 1
    lo, hi = SC.bootstrap(x, ones, seed=0)
    assert lo < x.mean() < hi and [lo, hi] == SC.bootstrap(x, ones, seed=0)
    dlo, dhi = SC.bootstrap(x, ones, seed=0, ref=(x, ones))
    assert dlo == dhi == 0.0


# ----------------------------------------------------------------------------- loglikelihoods: batched on the device

def test_loglikelihoods_equal_brute_force_with_shared_rows_chunks_and_truncation(monkeypatch):
    """Requests that share a row (MMLU letters), a row shared by continuations of different lengths (its scored
    positions interleave), inputs longer than max_seq_len (left-truncated), several batches (batch_tokens) and
    several LM-head chunks (HEAD_ROWS): every sum equals a plain unpadded forward per request."""
    model = tiny_model(**TINY)
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(0, 50, (n,), generator=g).tolist()  # noqa: E731
    ctx, long_ctx = ids(9), ids(30)
    reqs = [(ctx, [t]) for t in (3, 4, 5, 6)]  # one row, one position, four targets
    reqs += [(ctx[:-2], ctx[-2:] + [7]), (ctx[:-1], ctx[-1:] + [7])]  # row `ctx` again, 3 and 2 scored positions
    reqs += [(ids(n), ids(k)) for n, k in ((1, 1), (4, 3), (12, 5), (6, 1))]
    reqs += [(long_ctx, ids(3)), (ids(2), ids(22))]  # truncated to the last 24 inputs
    shared = ids(11)  # MMLU cloze: one context, several longer-than-one-token continuations (run once, cache copied)
    reqs += [(shared, ids(k)) for k in (2, 4, 3, 1)]

    def brute(c, x):
        full = (c + x)[-(model.config.max_seq_len + 1):]  # the same left truncation
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([full[:-1]]))[0], -1)  # (T, V)
        return sum(float(logp[len(full) - 1 - len(x) + j, t]) for j, t in enumerate(x))
    want = [brute(c, x) for c, x in reqs]
    monkeypatch.setattr(SC, "HEAD_ROWS", 3)
    assert list(SC.shared_contexts(reqs, model.config.max_seq_len)) == [tuple(shared)]
    for batch_tokens in (30, 4096):
        for share in (True, False):
            got = SC.loglikelihoods(model, reqs, batch_tokens=batch_tokens, share_prefix=share)
            assert got == pytest.approx(want, abs=1e-4), (batch_tokens, share)
    with pytest.raises(ValueError, match="empty continuation"):
        SC.loglikelihoods(model, [([1], [])])
    with pytest.raises(ValueError, match="empty context"):
        SC.loglikelihoods(model, [([], [1, 2])])


def test_loglikelihoods_do_not_depend_on_batching():
    """The default token budget (CPU 4096, CUDA 32768) only changes how rows are grouped, not the numbers."""
    model = tiny_model(seed=1, **TINY)
    g = torch.Generator().manual_seed(2)
    reqs = [(torch.randint(0, 50, (n,), generator=g).tolist(), [int(t)]) for n, t in zip(range(1, 20), range(19))]
    a = SC.loglikelihoods(model, reqs)
    b = SC.loglikelihoods(model, reqs, batch_tokens=8)
    assert a == pytest.approx(b, abs=1e-4)  # float32 matmuls of other shapes: last-bit differences only
    assert SC.default_batch_tokens("cpu") == 4096 and SC.default_batch_tokens("cuda:0") == 32768
