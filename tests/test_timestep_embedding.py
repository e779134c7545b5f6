"""timestep_embedding against its closed form, and its size check."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from invnext.ops.diffusion import timestep_embedding


@pytest.mark.parametrize("dim", [256, 7, 1])
def test_timestep_embedding(dim):
    t = torch.tensor([0, 1, 999, 500])
    got = timestep_embedding(t, dim)
    assert got.shape == (4, dim) and got.dtype == torch.float32
    half = dim // 2
    freqs = np.exp(-math.log(10000) * np.arange(half) / max(half, 1))
    args = t.numpy()[:, None] * freqs[None]
    want = np.concatenate([np.cos(args), np.sin(args), np.zeros((4, dim % 2))], 1)
    assert np.allclose(got.double().numpy(), want, atol=2e-4)
    got64 = timestep_embedding(t.double(), dim)
    assert got64.dtype == torch.float64 and np.allclose(got64.numpy(), want, rtol=1e-12, atol=1e-12)


def test_timestep_embedding_past_memory_is_refused():
    with pytest.raises(ValueError, match=r"timestep_embedding: dim=1000000000000 for 4 timesteps would need"):
        timestep_embedding(torch.arange(4), 10**12)
