"""ddim_step's pure-PyTorch reference against independent float64 math (tests/diffusion_float64.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from invnext.ops.diffusion import ddim_step, make_schedule

from diffusion_float64 import N, _np_cosine, _np_ddim, _step_inputs


@pytest.mark.parametrize("respace", [None, 10])
def test_ddim_step_closed_form(respace):
    s = make_schedule(N, respace=respace)
    ts = [0, 1, s.num_steps - 1, s.num_steps // 2]
    out, x_t, t, noise = _step_inputs(ts, seed=9)
    kept = s.timestep_map.tolist()
    tab = _np_cosine(kept if respace else None)
    zero = np.zeros_like(noise.numpy())
    got0 = ddim_step(out, x_t, t, s)
    want0 = _np_ddim(out.numpy(), x_t.numpy(), t.numpy(), tab, zero, 0.0)
    assert np.allclose(got0.numpy(), want0, rtol=1e-10, atol=1e-10)
    assert torch.equal(ddim_step(out, x_t, t, s, noise, eta=0.0), got0)  # eta = 0 ignores noise
    got = ddim_step(out, x_t, t, s, noise, eta=0.6)
    want = _np_ddim(out.numpy(), x_t.numpy(), t.numpy(), tab, noise.numpy(), 0.6)
    assert np.allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    # t = 0 lands on x0_pred exactly (abar_prev = 1)
    ab = s.tables64()["alphas_cumprod"][0]
    x0_pred = x_t[0] / ab.sqrt() - (1 / ab - 1).sqrt() * out[0, : x_t.shape[1]]
    assert torch.allclose(got[0], x0_pred, rtol=1e-12, atol=1e-12)
