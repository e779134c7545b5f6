"""bench_varlen_attention's wiring, dry-run on the CPU interpreter with a tiny shape.

The benchmark needs a GPU for its numbers; this checks what it times and counts: the allowed-pair
count (its FLOPs) against the op's dense mask, the padded-SDPA baseline's mask and output against
the op, and one pass of every timed mode of the invnext maker through ``run_problem``.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import bench_varlen_attention as bv
from benchmarks import common
from invnext._kernels_path import ensure_kernels_importable
from invnext.ops import varlen_attention
from invnext.ops.varlen import varlen_dense_mask

ensure_kernels_importable()

pytestmark = pytest.mark.triton


@pytest.fixture
def tiny(monkeypatch, triton_device):
    monkeypatch.setattr(bv, "DEVICE", str(triton_device))
    monkeypatch.setattr(bv, "DTYPE", torch.float32)

    def make(**kw):
        return bv.Problem("tiny", [7, 20, 3], [12, 9, 30], 4, 2, 16, **kw)

    return make


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"causal": True, "window": (5, 0)}, {"window": (2, 6)}])
def test_pairs_and_padded_baseline_match_the_op(tiny, kw):
    p = tiny(**kw)
    left, right = p.bounds()
    dense = varlen_dense_mask(p.cu_q, p.cu_k, left, right)
    assert p.pairs == int(dense.sum())
    assert torch.equal(bv._sees_something(p), dense.any(-1))
    want = varlen_attention(p.q, p.k, p.v, p.cu_q, p.cu_k, causal=p.causal, window_size=p.window, backend="torch")
    got = bv.make_sdpa_padded(p, "math")(p.q, p.k, p.v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bv.make_invnext(p)(p.q, p.k, p.v), want, rtol=1e-5, atol=1e-5)


def test_run_problem_times_every_mode(tiny, bench_wiring):
    ran = bench_wiring(common, "do_bench")
    p = tiny(causal=True)
    rows, notes = [], []
    baselines = [("sdpa-math padded", lambda: bv.make_sdpa_padded(p, "math"))]
    bv.run_problem(p, baselines, ["fwd", "bwd", "fwd+bwd"], 1.0, 1000.0, rows, notes)
    assert not notes, notes
    assert {(r.impl, r.mode) for r in rows} == {(i, m) for i in ("invnext-triton", "sdpa-math padded")
                                                for m in ("fwd", "bwd", "fwd+bwd")}
    ours = [r for r in rows if r.impl == "invnext-triton"]
    assert all(r.speedup_vs_baseline == 1.0 for r in ours)
    assert ours[0].extra["max_abs_diff_vs"]["sdpa-math padded"] < 1e-5
    assert len(ran) == 6  # 3 modes x 2 implementations, each timed callable called once
