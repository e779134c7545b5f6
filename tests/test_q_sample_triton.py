"""Triton q_sample vs the float64 reference under kernels.md's error rule (tests/diffusion_error_rule.py)."""
from __future__ import annotations

import pytest
import torch

from invnext.ops import diffusion as R

from diffusion_error_rule import CASES, MARKS, _batch, _check, _schedule, _truth_schedule, kd

pytestmark = MARKS


# ----------------------------------------------------------------------------------------
# q_sample
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,M,C,respace", CASES)
def test_q_sample_forward_and_grads(triton_device, dtype, M, C, respace):
    s = _schedule(respace, triton_device)
    _, x0, noise, t = _batch(M, C, s.num_steps, dtype, triton_device)
    g = torch.randn(M, C, device=triton_device).to(dtype)

    def run(fn, sched, cast):
        a, b = cast(x0).requires_grad_(), cast(noise).requires_grad_()
        out = fn(a, b, t, sched)
        out.backward(cast(g))
        return out.detach(), a.grad, b.grad

    k = run(kd.q_sample_triton, s, lambda z: z.clone())
    r = run(R.q_sample_reference, s, lambda z: z.clone())
    f = run(R.q_sample_reference, _truth_schedule(s), lambda z: z.double())
    _check("x_t", k[0], r[0], f[0], 2)
    _check("dx0", k[1], r[1], f[1], 3)
    _check("dnoise", k[2], r[2], f[2], 3)
