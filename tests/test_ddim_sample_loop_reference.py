"""ddim_sample_loop's pure-PyTorch reference against a float64 numpy loop."""
from __future__ import annotations

import numpy as np
import torch

from invnext.ops.diffusion import ddim_sample_loop, make_schedule

from diffusion_float64 import N, _make_denoiser, _np_cosine, _np_ddim


def test_ddim_sample_loop_matches_float64_loop_and_is_deterministic():
    m, c = 4, 6
    s = make_schedule(N, respace=[0, 50, 300, 700, 999])
    kept = s.timestep_map.tolist()
    g = torch.Generator().manual_seed(12)
    cond = torch.randn(m, 3, generator=g, dtype=torch.float64)
    x_T = torch.randn(m, c, generator=g, dtype=torch.float64)
    fn, np_fn = _make_denoiser(c, 3, [])
    a = ddim_sample_loop(fn, cond, s, channels=c, noise=x_T, generator=torch.Generator().manual_seed(1))
    b = ddim_sample_loop(fn, cond, s, channels=c, noise=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    tab = _np_cosine(kept)
    x = x_T.numpy()
    for i in reversed(range(len(kept))):
        x = _np_ddim(np_fn(x, kept[i], cond.numpy()), x, np.full(m, i), tab, np.zeros_like(x), 0.0)
    assert np.allclose(a.numpy(), x, rtol=1e-9, atol=1e-10)
    # eta > 0 with explicit per-step noise follows the same closed form.
    step_noise = torch.randn(len(kept), m, c, generator=g, dtype=torch.float64)
    got = ddim_sample_loop(fn, cond, s, channels=c, noise=x_T, step_noise=step_noise, eta=1.0)
    x = x_T.numpy()
    for i in reversed(range(len(kept))):
        x = _np_ddim(np_fn(x, kept[i], cond.numpy()), x, np.full(m, i), tab, step_noise[i].numpy(), 1.0)
    assert np.allclose(got.numpy(), x, rtol=1e-9, atol=1e-10)
