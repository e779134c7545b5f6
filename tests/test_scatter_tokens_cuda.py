"""scatter_tokens' CUDA kernel (compiled extension and CuPy/NVRTC), forward and every gradient,
bit for bit against a float64 torch formulation rounded once; the exactness argument and the
helpers are in test_native_extension.py.
"""
from __future__ import annotations

import pytest
import torch

from test_native_extension import (
    DTYPES,
    _LAYOUTS,
    _assert_same,
    _grid_values,
    _leaf64,
    _packing,
    _randn,
    _scatter_reference,
)


# ----------------------------------------------------------------------------- GPU: scatter_tokens


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("C", [768, 13])
@pytest.mark.parametrize("layout", range(len(_LAYOUTS)))
@pytest.mark.parametrize("pos_batch", ["none", "batch1", "batchB"])
def test_scatter_tokens_matches_reference(kernels_from, dtype, C, layout, pos_batch):
    from invnext.native import ops

    counts, N, P = _LAYOUTS[layout]
    B = len(counts)
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(2000 * layout + C)
    index, _ = _packing(counts, N, P, gen)
    packed = _randn((len(index), C), dtype, dev, gen).requires_grad_(True)
    mask_token = _randn((C,), dtype, dev, gen).requires_grad_(True)
    pos = None
    if pos_batch != "none":
        pos = _randn((1 if pos_batch == "batch1" else B, N, C), dtype, dev, gen).requires_grad_(True)

    out = ops.scatter_tokens_cuda(packed, index.to(dev), mask_token, pos, B, N)
    packed64, mask64, pos64 = _leaf64(packed), _leaf64(mask_token), _leaf64(pos)
    want = _scatter_reference(packed64, index, mask64, pos64, B, N)
    _assert_same(out, want.detach().to(dtype), "forward")

    grad = _grid_values((B, N, C), dtype, dev, gen)
    out.backward(grad)
    want.backward(grad.cpu().to(torch.float64))
    _assert_same(packed.grad, packed64.grad.to(dtype), "d packed")
    _assert_same(mask_token.grad, mask64.grad.to(dtype), "d mask_token")
    if pos is not None:
        _assert_same(pos.grad, pos64.grad.to(dtype), "d pos")


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
    _assert_same(out, want.detach().to(torch.bfloat16), "forward")
    grad = _grid_values((B, N, C), torch.bfloat16, dev, gen)
    out.backward(grad)
    want.backward(grad.cpu().double())
    _assert_same(packed.grad, packed64.grad.to(torch.bfloat16), "d packed")
    _assert_same(mask_token.grad, mask64.grad.to(torch.bfloat16), "d mask_token")
