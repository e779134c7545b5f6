"""Triton diffusion_loss vs the float64 reference under kernels.md's error rule (tests/diffusion_error_rule.py)."""
from __future__ import annotations

import pytest
import torch

from invnext import ops
from invnext.ops import diffusion as R

from diffusion_error_rule import CASES, MARKS, _batch, _check, _loss_case, _schedule, _truth_schedule, kd

pytestmark = MARKS


@pytest.mark.parametrize("dtype,M,C,respace", CASES)
def test_diffusion_loss_forward_and_grad(triton_device, dtype, M, C, respace):
    s, mo, x0, x_t, noise, t = _loss_case(M, C, respace, dtype, triton_device)
    w = torch.rand(M, device=triton_device) + 0.5  # a per-row incoming gradient

    def run(fn, sched, cast):
        m = cast(mo).requires_grad_()
        loss = fn(m, cast(x0), cast(x_t), cast(noise), t, sched)
        (loss * w.to(loss.dtype)).sum().backward()
        return loss.detach(), m.grad

    k = run(kd.diffusion_loss_triton, s, lambda z: z.clone())
    r = run(R.diffusion_loss_reference, s, lambda z: z.clone())
    f = run(R.diffusion_loss_reference, _truth_schedule(s), lambda z: z.double())
    _check("loss", k[0], r[0], f[0], 2)
    _check("d model_out", k[1], r[1], f[1], 3)


def test_diffusion_loss_t0_branches_and_halves(triton_device):
    """Every row at t = 0: the NLL with both edge bins; eps grad from the MSE, v grad from vb."""
    M, C = 9, 40
    s = _schedule(None, triton_device)
    mo, x0, noise, _ = _batch(M, C, s.num_steps, torch.float32, triton_device)
    t = torch.zeros(M, dtype=torch.int64, device=triton_device)
    t[-1] = 1
    x_t = R.q_sample_reference(x0, noise, t, s)
    # Wide and narrow predicted variances: v = +-1 puts logvar on either table exactly.
    mo[0, C:] = 1.0
    mo[1, C:] = -1.0
    m = mo.clone().requires_grad_()
    loss = kd.diffusion_loss_triton(m, x0, x_t, noise, t, s)
    loss.sum().backward()
    f = mo.double().requires_grad_()
    truth = R.diffusion_loss_reference(f, x0.double(), x_t.double(), noise.double(), t, _truth_schedule(s))
    truth.sum().backward()
    torch.testing.assert_close(loss.double(), truth, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(m.grad.double(), f.grad, rtol=1e-5, atol=1e-7)
    mse_grad = 2.0 * (mo[:, :C].double() - noise.double()) / C
    torch.testing.assert_close(m.grad[:, :C].double(), mse_grad, rtol=1e-6, atol=1e-9)
    assert m.grad[:, C:].abs().sum() > 0


def test_diffusion_loss_public_op_mean_reduction(triton_device):
    """Through invnext.ops with backend='triton': the mean's expanded (stride-0) gradient."""
    s, mo, x0, x_t, noise, t = _loss_case(37, 7, 100, torch.float32, triton_device)

    def run(backend, sched, cast):
        m = cast(mo).requires_grad_()
        loss = ops.diffusion_loss(m, cast(x0), cast(x_t), cast(noise), t, sched, backend=backend)
        loss.backward()
        return loss.detach(), m.grad

    k = run("triton", s, lambda z: z.clone())
    r = run("torch", s, lambda z: z.clone())
    f = run("torch", _truth_schedule(s), lambda z: z.double())
    _check("mean loss", k[0], r[0], f[0], 2)
    _check("d model_out", k[1], r[1], f[1], 3)
