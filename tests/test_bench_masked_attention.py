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
