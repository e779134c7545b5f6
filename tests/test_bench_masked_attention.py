"""bench_masked_attention's implementations run the op they claim to (CPU interpreter, tiny shape).

The benchmark itself needs a GPU; these check its makers: the RoPE in-loop row really switches
the kernel to the inline mode (same results bit for bit, the environment restored after), and
the no-RoPE reference point differs from the RoPE run.
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import bench_masked_attention as ba
from benchmarks import common
from invnext._kernels_path import ensure_kernels_importable

ensure_kernels_importable()

pytestmark = pytest.mark.triton


@pytest.fixture
def tiny(monkeypatch, triton_device):
    monkeypatch.setattr(ba, "DEVICE", str(triton_device))
    monkeypatch.setattr(ba, "DTYPE", torch.float32)
    monkeypatch.delenv("INVNEXT_ATTN_ROPE", raising=False)
    return ba.Problem("tiny", [7, 20], 1, 16, num_prefix=2, grid=(2, 4, 4), rope=(100.0, (4, 4, 4)))


def test_rope_inline_row_runs_the_inline_kernel(tiny, monkeypatch):
    from invnext_kernels import attention as kattn

    seen = []
    real = kattn.rope_mode
    monkeypatch.setattr(kattn, "rope_mode", lambda: seen.append(real()) or seen[-1])
    pre = ba.make_invnext(tiny)(tiny.qkv)
    inline = ba.make_invnext_rope_inline(tiny)(tiny.qkv)
    assert seen == ["prepass", "inline"]
    assert "INVNEXT_ATTN_ROPE" not in os.environ
    assert torch.equal(pre, inline)
    assert not torch.equal(pre, ba.make_invnext_without_rope(tiny)(tiny.qkv))


def test_run_problem_compares_only_what_computes_the_same(tiny, bench_wiring):
    ran = bench_wiring(common, "do_bench")
    rows, notes = [], []
    baselines = [("invnext-triton without rope (reference point)", lambda: ba.make_invnext_without_rope(tiny)),
                 ("invnext-triton rope inline (in-loop rotation)", lambda: ba.make_invnext_rope_inline(tiny))]
    ba.run_problem(tiny, baselines, ["fwd", "fwd+bwd"], 1.0, 1000.0, rows, notes)
    assert not notes, notes
    assert len(rows) == 6 and len(ran) == 6  # 3 implementations x 2 modes, each timed callable called once
    ours = [r for r in rows if r.impl == "invnext-triton"]
    # the unrotated row is timed but not compared: it computes something else
    assert ours[0].extra["max_abs_diff_vs"] == {"invnext-triton rope inline (in-loop rotation)": 0.0}
    assert all(r.bench == "masked_attention" and r.baseline is not None for r in ours)
