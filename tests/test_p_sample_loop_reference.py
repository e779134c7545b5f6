"""p_sample_loop's pure-PyTorch reference against a float64 numpy loop, and its documented
generator draw order.
"""
from __future__ import annotations

import numpy as np
import torch

from invnext.ops.diffusion import make_schedule, p_sample_loop

from diffusion_float64 import N, _make_denoiser, _np_cosine, _np_p_step


def test_p_sample_loop_matches_float64_loop():
    m, c, temp = 5, 3, 0.7
    s = make_schedule(N, respace=10)
    kept = s.timestep_map.tolist()
    g = torch.Generator().manual_seed(11)
    cond = torch.randn(m, 4, generator=g, dtype=torch.float64)
    x_T = torch.randn(m, c, generator=g, dtype=torch.float64)
    step_noise = torch.randn(10, m, c, generator=g, dtype=torch.float64)
    seen: list[torch.Tensor] = []
    fn, np_fn = _make_denoiser(c, 4, seen)
    got = p_sample_loop(fn, cond, s, channels=c, noise=x_T, step_noise=step_noise, temperature=temp)
    tab = _np_cosine(kept)
    x = x_T.numpy()
    for i in reversed(range(10)):
        t = np.full(m, i)
        x = _np_p_step(np_fn(x, kept[i], cond.numpy()), x, t, tab, step_noise[i].numpy(), temp)
    assert got.dtype == torch.float64
    assert np.allclose(got.numpy(), x, rtol=1e-9, atol=1e-10)
    assert [v.tolist() for v in seen] == [[k] * m for k in reversed(kept)]
    assert all(v.dtype == torch.int64 for v in seen)


def test_sampler_generator_draw_order():
    # Documented: x_T first, then one randn(M, C) per step t = S-1 .. 1, float32.
    m, c = 3, 2
    s = make_schedule(N, respace=6)
    cond = torch.randn(m, 4, dtype=torch.float64)
    fn, _ = _make_denoiser(c, 4, [])
    run = lambda seed: p_sample_loop(fn, cond, s, channels=c, generator=torch.Generator().manual_seed(seed))
    a, b, other = run(5), run(5), run(6)
    assert a.dtype == torch.float32 and a.shape == (m, c)
    assert torch.equal(a, b) and not torch.equal(a, other)
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(m, c, generator=g)
    step_noise = torch.zeros(6, m, c)
    for t in range(5, 0, -1):
        step_noise[t] = torch.randn(m, c, generator=g)
    assert torch.equal(p_sample_loop(fn, cond, s, channels=c, noise=x_T, step_noise=step_noise), a)
