"""p_sample_step's pure-PyTorch reference against independent float64 math (tests/diffusion_float64.py)."""
from __future__ import annotations

import numpy as np
import torch

from invnext.ops.diffusion import make_schedule, p_sample_step

from diffusion_float64 import LOSS_TS, _np_cosine, _np_p_step, _step_inputs


def test_p_sample_step_closed_form():
    out, x_t, t, noise = _step_inputs(LOSS_TS + [37])
    s = make_schedule()
    want = _np_p_step(out.numpy(), x_t.numpy(), t.numpy(), _np_cosine(), noise.numpy(), 0.8)
    got = p_sample_step(out, x_t, t, s, noise, temperature=0.8)
    assert got.dtype == torch.float64
    assert np.allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    got32 = p_sample_step(out.float(), x_t.float(), t, s, noise.float(), temperature=0.8)
    assert got32.dtype == torch.float32
    assert np.allclose(got32.double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_p_sample_step_noise_and_temperature():
    out, x_t, t, noise = _step_inputs([0, 0, 5, 999, 1], seed=8)
    s = make_schedule()
    other = torch.randn_like(noise)
    a = p_sample_step(out, x_t, t, s, noise)
    b = p_sample_step(out, x_t, t, s, other)
    first = t == 0
    assert torch.equal(a[first], b[first])  # t = 0 adds no noise
    assert bool((a[~first] != b[~first]).all())
    base = p_sample_step(out, x_t, t, s, noise, temperature=0.0)
    hot = p_sample_step(out, x_t, t, s, noise, temperature=2.5)
    assert torch.allclose(hot - base, 2.5 * (a - base), rtol=1e-12, atol=1e-12)
    assert torch.equal(base[first], a[first])
