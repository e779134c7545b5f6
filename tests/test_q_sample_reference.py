"""q_sample's pure-PyTorch reference against its closed form in float64, and its gradients."""
from __future__ import annotations

import numpy as np
import torch

from invnext.ops.diffusion import make_schedule, q_sample

from diffusion_float64 import _np_cosine, _np_q_sample


# ----------------------------------------------------------------------------- q_sample


def test_q_sample_closed_form():
    g = torch.Generator().manual_seed(1)
    ts = [0, 1, 2, 500, 998, 999, 113]
    x0 = torch.randn(7, 13, generator=g, dtype=torch.float64)
    noise = torch.randn(7, 13, generator=g, dtype=torch.float64)
    t = torch.tensor(ts)
    s = make_schedule()
    want = _np_q_sample(x0.numpy(), noise.numpy(), np.array(ts), _np_cosine())
    got = q_sample(x0, noise, t, s)
    assert got.dtype == torch.float64
    assert np.allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)
    got32 = q_sample(x0.float(), noise.float(), t, s)
    assert got32.dtype == torch.float32
    assert np.allclose(got32.double().numpy(), want, rtol=1e-6, atol=1e-6)
    got16 = q_sample(x0.bfloat16(), noise.bfloat16(), t, s)
    assert got16.dtype == torch.bfloat16
    want16 = _np_q_sample(x0.bfloat16().double().numpy(), noise.bfloat16().double().numpy(), np.array(ts), _np_cosine())
    assert np.allclose(got16.double().numpy(), want16, rtol=8e-3, atol=8e-3)


def test_q_sample_gradcheck():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 4, 999, 500, 1])
    s = make_schedule()
    assert torch.autograd.gradcheck(lambda a, b: q_sample(a, b, t, s), (x0, noise))
