"""diffusion_loss's pure-PyTorch reference against independent float64 math (tests/diffusion_float64.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from invnext.ops.diffusion import diffusion_loss, make_schedule, q_sample

from diffusion_float64 import LOSS_TS, N, _loss_batch, _np_cosine, _np_loss


# ----------------------------------------------------------------------------- diffusion_loss


def test_diffusion_loss_matches_float64_reference():
    out, x0, x_t, noise, t = _loss_batch(LOSS_TS * 2)
    want = _np_loss(out.numpy(), x0.numpy(), x_t.numpy(), noise.numpy(), t.numpy(), _np_cosine())
    s = make_schedule()
    got = diffusion_loss(out, x0, x_t, noise, t, s, reduction="none")
    assert got.dtype == torch.float64 and got.shape == (12,)
    assert np.allclose(got.numpy(), want, rtol=1e-12, atol=0)
    assert math.isclose(float(diffusion_loss(out, x0, x_t, noise, t, s)), want.mean(), rel_tol=1e-12)
    assert math.isclose(float(diffusion_loss(out, x0, x_t, noise, t, s, reduction="sum")), want.sum(), rel_tol=1e-12)
    # fp32 inputs: fp32 tables and math, float32 result near the fp64 value.
    got32 = diffusion_loss(out.float(), x0.float(), x_t.float(), noise.float(), t, s, reduction="none")
    assert got32.dtype == torch.float32
    assert np.allclose(got32.double().numpy(), want, rtol=3e-5, atol=0)


def test_diffusion_loss_t0_uses_nll_and_edge_bins():
    # One row at t = 0: a model mean exactly at x0 gives the central-bin probability; the
    # edge bins (x0 = -1, +1) collect the whole tail and so have higher probability.
    s = make_schedule()
    c = 3
    x0 = torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.float64)
    noise = torch.zeros_like(x0)
    x_t = q_sample(x0, noise, torch.tensor([0]), s)
    # eps chosen so x0_pred = x0 exactly: eps = (x_t / sqrt(abar) - x0) / sqrt(1/abar - 1) = 0 here.
    out = torch.cat([torch.zeros(1, c, dtype=torch.float64), torch.zeros(1, c, dtype=torch.float64)], 1)
    got = float(diffusion_loss(out, x0, x_t, noise, torch.tensor([0]), s))
    t64 = s.tables64()
    sigma = math.exp(0.5 * (0.5 * float(t64["log_betas"][0]) + 0.5 * float(t64["posterior_log_variance_clipped"][0])))
    # mean = coef1 x0_pred + coef2 x_t with coef2(0) = 0 and coef1(0) = 1 (up to rounding)
    cdf = lambda z: 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    p_mid = cdf(1 / 255 / sigma) - cdf(-1 / 255 / sigma)
    p_edge = cdf(1 / 255 / sigma)
    want = -(2 * math.log(p_edge) + math.log(p_mid)) / 3 / math.log(2)
    assert math.isclose(got, want, rel_tol=1e-9)


def test_diffusion_loss_vb_gradient_only_reaches_v():
    out, x0, x_t, noise, t = _loss_batch(LOSS_TS, channels=5, seed=3)
    out.requires_grad_(True)
    s = make_schedule()
    diffusion_loss(out, x0, x_t, noise, t, s).backward()
    m, c = x0.shape
    eps = out.detach()[:, :c]
    # d/d eps of mean_rows mean_c (noise - eps)^2: the MSE alone, nothing from vb.
    assert torch.allclose(out.grad[:, :c], 2 * (eps - noise) / (m * c), rtol=1e-12, atol=1e-15)
    assert bool((out.grad[:, c:].abs() > 0).all())
    # The v gradient is that of vb alone: loss minus its MSE part.
    out2 = out.detach().clone().requires_grad_(True)
    per_row = diffusion_loss(out2, x0, x_t, noise, t, s, reduction="none")
    vb = per_row - (noise - out2[:, :c]).square().mean(1)
    (vb.mean()).backward()
    assert torch.allclose(out2.grad[:, :c], torch.zeros_like(eps), atol=1e-15)
    assert torch.allclose(out2.grad[:, c:], out.grad[:, c:], rtol=1e-12, atol=1e-15)


def test_diffusion_loss_gradcheck():
    # The v half by finite differences. The eps half cannot be: by design vb sees eps
    # detached, so its analytic gradient is the MSE's alone (checked in closed form above),
    # while a finite difference would also move vb.
    out, x0, x_t, noise, t = _loss_batch(LOSS_TS, channels=3, seed=4)
    eps, v = out[:, :3], out[:, 3:].clone().requires_grad_(True)
    s = make_schedule()
    fn = lambda vv: diffusion_loss(torch.cat([eps, vv], 1), x0, x_t, noise, t, s, reduction="none")
    assert torch.autograd.gradcheck(fn, (v,), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(fn, (v,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_diffusion_loss_low_precision_inputs(dtype):
    out, x0, x_t, noise, t = _loss_batch([0, 0, 999, 999, 0, 999], channels=11, seed=5)
    s = make_schedule()
    low = [z.to(dtype) for z in (out, x0, x_t, noise)]
    got = diffusion_loss(*low, t, s, reduction="none")
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    # Against the fp64 loss of the same (rounded) inputs: only fp32 math and tables differ.
    up = [z.double().numpy() for z in low]
    want = _np_loss(*up, t.numpy(), _np_cosine())
    assert np.allclose(got.double().numpy(), want, rtol=1e-5, atol=0)
    o = low[0].clone().requires_grad_(True)
    diffusion_loss(o, *low[1:], t, s).backward()
    assert o.grad.dtype == dtype and bool(torch.isfinite(o.grad.float()).all())


@pytest.mark.parametrize("respace", [None, 10])
def test_diffusion_loss_finite_at_every_step(respace):
    s = make_schedule(N, respace=respace)
    steps = s.num_steps
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(steps, 4, generator=g) * 2 - 1
    noise = torch.randn(steps, 4, generator=g)
    t = torch.arange(steps)
    x_t = q_sample(x0, noise, t, s)
    out = torch.cat([torch.randn(steps, 4, generator=g), torch.rand(steps, 4, generator=g) * 2 - 1], 1)
    out.requires_grad_(True)
    loss = diffusion_loss(out, x0, x_t, noise, t, s, reduction="none")
    assert bool(torch.isfinite(loss).all())
    loss.sum().backward()
    assert bool(torch.isfinite(out.grad).all())


def test_diffusion_loss_of_no_rows_is_zero_and_differentiable():
    # The mean over no rows was NaN, which poisons a training step; it is 0, like the sum.
    s = make_schedule(10)
    model_out = torch.zeros(0, 6, requires_grad=True)
    empty = torch.zeros(0, 3)
    for reduction in ("mean", "sum"):
        loss = diffusion_loss(model_out, empty, empty, empty, torch.zeros(0, dtype=torch.int64), s, reduction=reduction)
        assert loss.shape == () and loss.item() == 0.0 and loss.grad_fn is not None
        (grad,) = torch.autograd.grad(loss, model_out)
        assert grad.shape == (0, 6)
