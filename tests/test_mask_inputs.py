"""Argument checks that every mask sampler shares: an unavailable cuda backend says why (the
reference always runs), and a device that is not here is named.
"""
from __future__ import annotations

import pytest
import torch

from invnext.ops._dispatch import BackendUnavailableError
from invnext.ops.masks import multiblock_mask, semantic_mask, tube_mask

from mask_statistics import ATTN


@pytest.mark.parametrize(
    "call",
    [
        lambda b: tube_mask(2, (2, 4, 4), 0.5, seed=0, backend=b),
        lambda b: multiblock_mask(2, (2, 4, 4), 1, (0.1, 0.2), (1, 1), seed=0, backend=b),
        lambda b: semantic_mask(ATTN, 2, backend=b),
    ],
)
def test_cuda_backend_unavailable_says_why(call):
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable: the CUDA kernels need CUDA tensors"):
        call("cuda")
    assert call("torch").dtype == torch.bool  # the reference is always there


@pytest.mark.parametrize(
    "call",
    [
        lambda d: tube_mask(2, (2, 4, 4), 0.5, seed=0, device=d),
        lambda d: multiblock_mask(2, (2, 4, 4), 1, (0.1, 0.2), (1, 1), seed=0, device=d),
    ],
)
def test_mask_device_that_is_not_here_is_named(call):
    # No machine has 100 GPUs: torch's own AssertionError / "invalid device ordinal" named nothing.
    with pytest.raises(ValueError, match=r"mask: device='cuda:99' but "):
        call("cuda:99")
    with pytest.raises(ValueError, match=r"mask: device must be a torch.device .* got 'gpu'"):
        call("gpu")
