"""adaln_modulate's pure-PyTorch reference against its closed form in float64, and its gradients."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from invnext.ops.diffusion import adaln_modulate

from diffusion_float64 import _np_adaln


@pytest.mark.parametrize(
    "xs, ps", [((7, 88), (7, 88)), ((7, 88), (88,)), ((3, 5, 13), (3, 1, 13)), ((1, 1), (1, 1)), ((2, 3, 4), (1, 4))]
)
def test_adaln_modulate_closed_form(xs, ps):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(*xs, generator=g, dtype=torch.float64) * 3 + 1
    shift = torch.randn(*ps, generator=g, dtype=torch.float64)
    scale = torch.randn(*ps, generator=g, dtype=torch.float64)
    got = adaln_modulate(x, shift, scale, eps=1e-6)
    assert got.shape == x.shape and got.dtype == torch.float64
    want = _np_adaln(x.numpy(), shift.numpy(), scale.numpy(), 1e-6)
    assert np.allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    low = adaln_modulate(x.bfloat16(), shift.bfloat16(), scale.bfloat16())
    want_low = _np_adaln(*(z.bfloat16().double().numpy() for z in (x, shift, scale)), 1e-6)
    assert low.dtype == torch.bfloat16
    assert np.allclose(low.double().numpy(), want_low, rtol=1e-2, atol=2e-2)


def test_adaln_modulate_gradcheck():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(2, 1, 5, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.randn(2, 1, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: adaln_modulate(a, b, c, eps=1e-5), (x, shift, scale))
    x2 = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    p2 = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    p3 = torch.randn(1, 7, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: adaln_modulate(a, b, c), (x2, p2, p3))
