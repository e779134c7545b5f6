"""Triton scatter_tokens vs a per-place torch formulation, bit for bit.

The exactness argument, the inputs and the helpers are those of test_gather_visible_triton.py.
Runs on the CPU interpreter here (keep shapes small) and compiled on a GPU with
TRITON_INTERPRET=0.
"""
from __future__ import annotations

import pytest
import torch

from test_gather_visible_triton import (
    COUNTS,
    DTYPES,
    N,
    _assert_same,
    _check_scatter,
    _dyadic,
    _hidden,
    _public_tokens,
    _ref_scatter,
    _structure,
    tk,
)

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [13, 64])
@pytest.mark.parametrize("P", [0, 4])
@pytest.mark.parametrize("pos_batch", [1, "B"])
def test_scatter_forward_and_grads(triton_device, dtype, C, P, pos_batch):
    _check_scatter(triton_device, dtype, C, P, len(COUNTS) if pos_batch == "B" else 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_scatter_without_pos(triton_device, dtype):
    _check_scatter(triton_device, dtype, 13, 4, None)


def test_scatter_wide_rows(triton_device):
    _check_scatter(triton_device, torch.bfloat16, 1100, 2, 1, counts=[3, 0, 6, 1], n=6)


def test_scatter_grads_for_subsets_of_inputs(triton_device):
    # Each input alone needing a gradient takes a different specialisation of the backward kernel.
    B, C, P = len(COUNTS), 64, 4
    hidden = _hidden(COUNTS, N, triton_device)
    index, _ = _structure(hidden, P)
    packed = torch.randn(index.numel(), C, device=triton_device)
    mask_token = torch.randn(C, device=triton_device)
    g = _dyadic((B, N, C), torch.float32, triton_device)
    for which in range(3):
        for pos_batch in (1, B):
            inputs = [packed.clone(), mask_token.clone(), torch.randn(pos_batch, N, C, device=triton_device)]
            inputs[which].requires_grad_(True)
            (got,) = torch.autograd.grad(
                tk.scatter_tokens_triton(inputs[0], index, inputs[1], inputs[2], B, N), inputs[which], g
            )
            ref = [t.double() for t in inputs]
            ref[which].requires_grad_(True)
            (want,) = torch.autograd.grad(_ref_scatter(ref[0], hidden, P, ref[1], ref[2]), ref[which], g.double())
            _assert_same(got, want, torch.float32, f"grad of input {which} (Bp={pos_batch})")


def test_scatter_of_gather_round_trip(triton_device):
    # Encoder -> predictor path: visible places get their token back, hidden ones the mask token.
    B, C, P = len(COUNTS), 64, 4
    hidden = _hidden(COUNTS, N, triton_device)
    index, cu = _structure(hidden, P)
    x = torch.randn(B, N, C, device=triton_device)
    mask_token = torch.randn(C, device=triton_device)
    packed = tk.gather_visible_triton(x, index, cu, None, torch.randn(1, P, C, device=triton_device))
    out = tk.scatter_tokens_triton(packed, index, mask_token, None, B, N)
    assert torch.equal(out, torch.where(hidden[..., None], mask_token.expand(B, N, C), x))


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"packed": torch.randn(7)}, ValueError, "scatter_tokens: packed must have 2 dimensions"),
        ({"index": torch.zeros(6, dtype=torch.int64)}, ValueError, "scatter_tokens: index must have shape"),
        ({"mask_token": torch.zeros(5)}, ValueError, "scatter_tokens: mask_token must have shape"),
        ({"mask_token": torch.zeros(4, dtype=torch.int32)}, TypeError, "scatter_tokens: mask_token must have dtype"),
        ({"pos": torch.randn(1, 4, 4)}, ValueError, "scatter_tokens: pos must have shape"),
        ({"batch_size": 0}, ValueError, "scatter_tokens: batch_size must be a positive int"),
        ({"N": 2.5}, ValueError, "scatter_tokens: N must be a positive int"),
    ],
)
def test_scatter_bad_inputs(triton_device, change, error, match):
    hidden = _hidden([2, 3], 5, triton_device)
    index, _ = _structure(hidden, 1)
    args = {
        "packed": torch.randn(7, 4),
        "index": index,
        "mask_token": torch.zeros(4),
        "pos": None,
        "batch_size": 2,
        "N": 5,
    }
    args.update(change)
    args = {k: v.to(triton_device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    ops = _public_tokens()
    with pytest.raises(error, match=match):  # the public op checks them before dispatching to the Triton entry
        ops.scatter_tokens(**args, backend="triton")
