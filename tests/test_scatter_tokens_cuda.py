"""scatter_tokens' CUDA kernel (compiled extension and CuPy/NVRTC), forward and every gradient,
bit for bit against a float64 torch formulation rounded once; the exactness argument and the
helpers are in test_native_extension.py.
"""
from __future__ import annotations

import pytest
import torch

from test_native_extension import (
    _assert_exact_with_grads,
    _grid_values,
    _LAYOUTS,
    _leaf64,
    _packing,
    _randn,
    _scatter_reference,
    token_kernel_cases,
)


# ----------------------------------------------------------------------------- GPU: scatter_tokens


@token_kernel_cases
def test_scatter_tokens_matches_reference(kernels_from, dtype, C, layout, tables):
    from invnext.native import ops

    counts, N, P = _LAYOUTS[layout]
    B = len(counts)
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(2000 * layout + C)
    index, _ = _packing(counts, N, P, gen)
    packed = _randn((len(index), C), dtype, dev, gen).requires_grad_(True)
    mask_token = _randn((C,), dtype, dev, gen).requires_grad_(True)
    pos = None
    if tables != "none":
        pos = _randn((1 if tables == "batch1" else B, N, C), dtype, dev, gen).requires_grad_(True)

    out = ops.scatter_tokens_cuda(packed, index.to(dev), mask_token, pos, B, N)
    packed64, mask64, pos64 = _leaf64(packed), _leaf64(mask_token), _leaf64(pos)
    want = _scatter_reference(packed64, index, mask64, pos64, B, N)
    grad = _grid_values((B, N, C), dtype, dev, gen)
    leaves = [("packed", packed, packed64), ("mask_token", mask_token, mask64), ("pos", pos, pos64)]
    _assert_exact_with_grads(out, want, grad, dtype, leaves)


@pytest.mark.requires_cuda
def test_scatter_tokens_many_chunks_and_bad_indices(kernels_from):
    """d mask_token over more places than one reduction chunk; out-of-range rows are dropped."""
    from invnext.native import ops

    B, N, C = 3, 700, 24
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(11)
    index, _ = _packing([50, 0, 699], N, 0, gen)
    index[3] = B * N + 4  # dropped like a prefix row
    packed = _randn((len(index), C), torch.bfloat16, dev, gen).requires_grad_(True)
    mask_token = _randn((C,), torch.bfloat16, dev, gen).requires_grad_(True)
    out = ops.scatter_tokens_cuda(packed, index.to(dev), mask_token, None, B, N)
    kept = index.clone()
    kept[3] = -1
    packed64, mask64 = _leaf64(packed), _leaf64(mask_token)
    want = _scatter_reference(packed64, kept, mask64, None, B, N)
    grad = _grid_values((B, N, C), torch.bfloat16, dev, gen)
    leaves = [("packed", packed, packed64), ("mask_token", mask_token, mask64)]
    _assert_exact_with_grads(out, want, grad, torch.bfloat16, leaves)
