"""gather_visible's CUDA kernel (compiled extension and CuPy/NVRTC), forward and every gradient,
bit for bit against a float64 torch formulation rounded once; the exactness argument and the
helpers are in test_native_extension.py.
"""
from __future__ import annotations

import pytest
import torch

from test_native_extension import (
    _assert_exact_with_grads,
    _assert_same,
    _gather_reference,
    _grid_values,
    _LAYOUTS,
    _leaf64,
    _packing,
    _randn,
    token_kernel_cases,
)


# ----------------------------------------------------------------------------- GPU: gather_visible


@token_kernel_cases
def test_gather_visible_matches_reference(kernels_from, dtype, C, layout, tables):
    from invnext.native import ops

    counts, N, P = _LAYOUTS[layout]
    P = P if tables != "none" else 0  # prefix rows exist only with a prefix table
    B = len(counts)
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(1000 * layout + C)
    index, cu = _packing(counts, N, P, gen)
    x = _randn((B, N, C), dtype, dev, gen).requires_grad_(True)
    pos = prefix = None
    if tables != "none":
        batch = 1 if tables == "batch1" else B
        pos = _randn((batch, N, C), dtype, dev, gen).requires_grad_(True)
        if P:
            prefix = _randn((batch, P, C), dtype, dev, gen).requires_grad_(True)

    out = ops.gather_visible_cuda(x, index.to(dev), cu.to(dev), pos, prefix)
    x64, pos64, prefix64 = _leaf64(x), _leaf64(pos), _leaf64(prefix)
    want = _gather_reference(x64, index, cu, pos64, prefix64)
    grad = _grid_values(tuple(out.shape), dtype, dev, gen)
    leaves = [("x", x, x64), ("pos", pos, pos64), ("prefix", prefix, prefix64)]
    _assert_exact_with_grads(out, want, grad, dtype, leaves)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
def test_gather_visible_misaligned_and_bad_indices(kernels_from, dtype):
    """A 16-byte row size but misaligned pointers takes the scalar path; out-of-range indices
    give zero rows (and zero grads), prefix rows never read their index."""
    from invnext.native import ops

    B, N, C, P = 2, 9, 64, 1
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(7)
    index, cu = _packing([4, 3], N, P, gen)
    x = _randn((B, N, C), dtype, dev, gen, misaligned=True).requires_grad_(True)
    pos = _randn((1, N, C), dtype, dev, gen, misaligned=True)
    prefix = _randn((B, P, C), dtype, dev, gen, misaligned=True)
    assert x.data_ptr() % 16 != 0
    bad = index.clone()
    bad[0] = 10**12  # a prefix row: ignored
    bad[2] = B * N  # one past the end
    bad[6] = -5
    out = ops.gather_visible_cuda(x, bad.to(dev), cu.to(dev), pos, prefix)
    torch.cuda.synchronize()
    good = index.clone()
    good[[2, 6]] = 0
    want = _gather_reference(x.detach().cpu().double(), good, cu, pos.cpu().double(), prefix.cpu().double())
    want[[2, 6]] = 0
    _assert_same(out, want.to(dtype), "forward")
    grad = _grid_values(tuple(out.shape), dtype, dev, gen)
    out.backward(grad)
    dx = torch.zeros(B * N, C, dtype=dtype)
    rows = [r for r in range(len(index)) if r not in (0, 2, 5, 6)]  # prefix rows 0 and 5, bad rows 2 and 6
    dx[index[rows]] = grad.cpu()[rows]
    _assert_same(x.grad, dx.view(B, N, C), "d x")


@pytest.mark.requires_cuda
def test_keep_ids_in_any_order_through_the_public_op(kernels_from):
    # Index lists (unsorted, ragged, one empty) with an fp32 table under bf16 tokens: the CUDA
    # gather and scatter equal the reference, values and gradients (copies and exact sums).
    from invnext import ops

    dev = torch.device("cuda")
    B, N, C, P = 3, 24, 32, 2
    keep_ids = [torch.tensor([5, 0, 23, 7], device=dev), torch.zeros(0, dtype=torch.int64, device=dev),
                torch.tensor([11, 3], device=dev)]  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    x = (torch.randint(-8, 9, (B, N, C), generator=gen) / 4).to(torch.bfloat16).to(dev)
    pos = (torch.randint(-8, 9, (1, N, C), generator=gen) / 4).to(dev)
    prefix = (torch.randint(-8, 9, (1, P, C), generator=gen) / 4).to(torch.bfloat16).to(dev)
    g = (torch.randint(-8, 9, (B, N, C), generator=gen) / 4).to(torch.bfloat16).to(dev)
    results = {}
    for backend in ("torch", "cuda"):
        leaves = [t.clone().requires_grad_(True) for t in (x, pos, prefix)]
        packed = ops.gather_visible(leaves[0], pos=leaves[1], prefix=leaves[2], keep_ids=keep_ids, backend=backend)
        out = ops.scatter_tokens(packed.tokens, packed.index, torch.zeros(1, 1, C, device=dev), pos=leaves[1], N=N,
                                 batch_size=B, backend=backend)  # fmt: skip
        out.backward(g)
        results[backend] = [packed.tokens.detach(), out.detach()] + [t.grad for t in leaves]
    for name, a, b in zip(("packed", "scattered", "dx", "dpos", "dprefix"), results["torch"], results["cuda"]):
        _assert_same(b, a.cpu(), name)
