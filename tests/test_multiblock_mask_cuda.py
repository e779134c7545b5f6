"""multiblock_mask's CUDA kernel (compiled extension and CuPy/NVRTC) equals the reference bit for
bit on many seeds, grids and box settings; the native chain's other checks are in
test_native_masks.py.
"""
from __future__ import annotations

import pytest

from invnext.ops import masks as ops_masks

from test_native_masks import CUDA, MULTIBLOCK_CASES, SEEDS, _assert_equal


@pytest.mark.requires_cuda
@pytest.mark.parametrize("B,grid,J,s,a,t", MULTIBLOCK_CASES)
def test_multiblock_equals_reference(kernels_from, B, grid, J, s, a, t):
    for seed in SEEDS:
        got = ops_masks.multiblock_mask(B, grid, J, s, a, t, seed=seed, device=CUDA, backend="cuda")
        what = f"multiblock B={B} grid={grid} J={J} seed={seed}"
        want = ops_masks.multiblock_mask(B, grid, J, s, a, t, seed=seed, device=CUDA, backend="torch")
        _assert_equal(got, want, what)
        _assert_equal(got, ops_masks.multiblock_mask(B, grid, J, s, a, t, seed=seed), what + " (CPU reference)")
