"""tube_mask's CUDA kernel (compiled extension and CuPy/NVRTC) equals the reference bit for bit on
many seeds and awkward grids; the native chain's other checks are in test_native_masks.py.
"""
from __future__ import annotations

import itertools

import pytest

from invnext.ops import masks as ops_masks

from test_native_masks import CUDA, SEEDS, _assert_equal


# ----------------------------------------------------------------------------- GPU: exactness


@pytest.mark.requires_cuda
@pytest.mark.parametrize(
    "B,grid", [(1, (1, 1, 1)), (5, (3, 7, 5)), (16, (16, 14, 14)), (4, (4, 64, 64)), (3, (2, 90, 91)), (2, (1, 1, 37))]
)
def test_tube_equals_reference(kernels_from, B, grid):
    for ratio, seed in itertools.product((0.0, 1 / 3, 0.5, 0.9, 0.999), SEEDS):
        got = ops_masks.tube_mask(B, grid, ratio, seed=seed, device=CUDA, backend="cuda")
        what = f"tube B={B} grid={grid} ratio={ratio} seed={seed}"
        _assert_equal(got, ops_masks.tube_mask(B, grid, ratio, seed=seed, device=CUDA, backend="torch"), what)
        if seed in SEEDS[:2]:
            _assert_equal(got, ops_masks.tube_mask(B, grid, ratio, seed=seed), what + " (CPU reference)")


@pytest.mark.requires_cuda
def test_tube_per_sample_ratios_equal_reference(kernels_from):
    for B, grid, ratios in [(6, (3, 7, 5), [0.0, 0.9, 0.5, 0.5, 1 / 3, 0.999]), (3, (2, 16, 16), [0.75, 0.4, 0.75])]:
        for seed in SEEDS[:3]:
            got = ops_masks.tube_mask(B, grid, ratios, seed=seed, device=CUDA, backend="cuda")
            want = ops_masks.tube_mask(B, grid, ratios, seed=seed)
            _assert_equal(got.cpu(), want, f"tube per-sample B={B} grid={grid} seed={seed}")
