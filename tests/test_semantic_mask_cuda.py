"""semantic_mask's CUDA kernel (compiled extension and CuPy/NVRTC) equals the reference bit for bit
(top-k and sampled, ties, strided inputs, long rows); the native chain's other checks are in
test_native_masks.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from invnext.ops import masks as ops_masks

from test_native_masks import CUDA, SEEDS, _assert_equal, _attn_values


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_semantic_equals_reference(kernels_from, dtype, mode):
    gen = torch.Generator().manual_seed(7)
    shapes = [(1, 1, 1), (2, 3, 7), (3, 5, 256), (2, 2, 1024), (1, 3, 5000)]
    for (B, T, S), kind in itertools.product(shapes, ("rand", "ties", "zeros")):
        attn = _attn_values(kind, (B, T, S), dtype, gen)
        for keep in sorted({1, max(1, S // 3), max(1, S - 1), S}):
            for seed in SEEDS[:3] if mode == "sample" else (0,):
                what = f"semantic {mode} {dtype} shape={(B, T, S)} {kind} keep={keep} seed={seed}"
                got = ops_masks.semantic_mask(attn.to(CUDA), keep, mode, seed=seed, backend="cuda")
                want = ops_masks.semantic_mask(attn.to(CUDA), keep, mode, seed=seed, backend="torch")
                _assert_equal(got, want, what)
                if S <= 256:
                    _assert_equal(got, ops_masks.semantic_mask(attn, keep, mode, seed=seed), what + " (CPU reference)")


@pytest.mark.requires_cuda
def test_semantic_strided_input_and_long_topk_rows(kernels_from):
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(2, 8192, 4, generator=gen).to(CUDA)
    attn = base.transpose(1, 2)  # [2, 4, 8192], not contiguous; 8192 fp32 keys fit the shared-memory sort
    for keep in (1, 1638, 8191):
        got = ops_masks.semantic_mask(attn, keep, "topk", backend="cuda")
        _assert_equal(got, ops_masks.semantic_mask(attn, keep, "topk", backend="torch"), f"topk keep={keep}")
