"""Pure-PyTorch references of the diffusion-decoder ops against independent float64 math.

The numpy helpers below recompute every table and formula from kernels.md section C
without touching invnext (scalar closed forms for the tables, numpy for the rest).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from invnext.ops.diffusion import (
    DiffusionSchedule,
    adaln_modulate,
    ddim_sample_loop,
    ddim_step,
    diffusion_loss,
    make_schedule,
    p_sample_loop,
    p_sample_step,
    q_sample,
    space_timesteps,
    timestep_embedding,
)

N = 1000
LOSS_TS = [0, 1, 2, 500, 998, 999]


# ----------------------------------------------------------------------------- independent float64 math


def _f(u: float) -> float:
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def _abar_closed(i: int) -> float:
    """Cosine abar by telescoping the product: f((i+1)/N) / f(0), times 0.001 where beta clips (i = 999)."""
    if i < N - 1:
        return _f((i + 1) / N) / _f(0.0)
    return _f((N - 1) / N) / _f(0.0) * (1 - 0.999)


def _beta_closed(i: int) -> float:
    return min(1 - _f((i + 1) / N) / _f(i / N), 0.999)


def _np_tables(abar: np.ndarray, betas: np.ndarray) -> dict[str, np.ndarray]:
    prev = np.concatenate([[1.0], abar[:-1]])
    var = betas * (1 - prev) / (1 - abar)
    return {
        "betas": betas,
        "abar": abar,
        "abar_prev": prev,
        "var": var,
        "logvar_clip": np.log(np.concatenate([[var[1]], var[1:]])),
        "coef1": betas * np.sqrt(prev) / (1 - abar),
        "coef2": (1 - prev) * np.sqrt(1 - betas) / (1 - abar),
    }


def _np_cosine(kept: list[int] | None = None) -> dict[str, np.ndarray]:
    abar = np.array([_abar_closed(i) for i in range(N)])
    betas = np.array([_beta_closed(i) for i in range(N)])
    if kept is not None:
        abar = abar[kept]
        betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    return _np_tables(abar, betas)


def _np_posterior(out, x_t, t, tab):
    c = x_t.shape[1]
    eps, v = out[:, :c], out[:, c:]
    ab = tab["abar"][t][:, None]
    x0_pred = x_t / np.sqrt(ab) - np.sqrt(1 / ab - 1) * eps
    mean = tab["coef1"][t][:, None] * x0_pred + tab["coef2"][t][:, None] * x_t
    frac = (v + 1) / 2
    logvar = frac * np.log(tab["betas"][t])[:, None] + (1 - frac) * tab["logvar_clip"][t][:, None]
    return x0_pred, mean, logvar


def _np_cdf(x):
    return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _np_loss(out, x0, x_t, noise, t, tab):
    c = x0.shape[1]
    mse = ((noise - out[:, :c]) ** 2).mean(1)
    _, mean, logvar = _np_posterior(out, x_t, t, tab)
    mean_q = tab["coef1"][t][:, None] * x0 + tab["coef2"][t][:, None] * x_t
    lv_q = tab["logvar_clip"][t][:, None]
    kl = 0.5 * (-1 + logvar - lv_q + np.exp(lv_q - logvar) + (mean_q - mean) ** 2 * np.exp(-logvar))
    inv = np.exp(-0.5 * logvar)
    hi = _np_cdf(inv * (x0 - mean + 1 / 255))
    lo = _np_cdf(inv * (x0 - mean - 1 / 255))
    logp = np.where(
        x0 < -0.999,
        np.log(np.maximum(hi, 1e-12)),
        np.where(x0 > 0.999, np.log(np.maximum(1 - lo, 1e-12)), np.log(np.maximum(hi - lo, 1e-12))),
    )
    vb = np.where((t == 0)[:, None], -logp, kl).mean(1) / math.log(2)
    return mse + vb


def _np_q_sample(x0, noise, t, tab):
    ab = tab["abar"][t][:, None]
    return np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise


def _loss_batch(ts, channels=7, seed=0, dtype=torch.float64):
    """x0 in [-1, 1] with the edge bins hit, model_out near the truth, t as given."""
    g = torch.Generator().manual_seed(seed)
    m = len(ts)
    x0 = torch.rand(m, channels, generator=g, dtype=torch.float64) * 2 - 1
    # Row 0 (t = 0 in every batch here) holds both edge bins and values just inside them.
    x0[0, :4] = torch.tensor([-1.0, 1.0, -0.9985, 0.9985])[:channels]
    x0[-1, 0], x0[-1, 1] = -0.9995, 0.9995
    noise = torch.randn(m, channels, generator=g, dtype=torch.float64)
    eps = noise + 0.3 * torch.randn(m, channels, generator=g, dtype=torch.float64)
    v = torch.rand(m, channels, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.tensor(ts, dtype=torch.int64)
    tab = _np_cosine()
    x_t = torch.from_numpy(_np_q_sample(x0.numpy(), noise.numpy(), t.numpy(), tab))
    out = torch.cat([eps, v], 1)
    return [z.to(dtype) for z in (out, x0, x_t, noise)] + [t]


# ----------------------------------------------------------------------------- schedule tables


@pytest.mark.parametrize("i", [0, 1, 500, 998, 999])
def test_cosine_tables_closed_form(i):
    s = make_schedule(N)
    t64 = s.tables64()
    beta, abar = _beta_closed(i), _abar_closed(i)
    prev = _abar_closed(i - 1) if i > 0 else 1.0
    var = beta * (1 - prev) / (1 - abar)
    var1 = _beta_closed(1) * (1 - _abar_closed(0)) / (1 - _abar_closed(1))
    want = {
        "betas": beta,
        "log_betas": math.log(beta),
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": math.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": math.sqrt(1 - abar),
        "sqrt_recip_alphas_cumprod": math.sqrt(1 / abar),
        "sqrt_recipm1_alphas_cumprod": math.sqrt(1 / abar - 1),
        "posterior_variance": var,
        "posterior_log_variance_clipped": math.log(var1 if i == 0 else var),
        "posterior_mean_coef1": beta * math.sqrt(prev) / (1 - abar),
        "posterior_mean_coef2": (1 - prev) * math.sqrt(1 - beta) / (1 - abar),
    }
    for name, value in want.items():
        got64 = float(t64[name][i])
        assert math.isclose(got64, value, rel_tol=1e-10, abs_tol=1e-300), (name, got64, value)
        got32 = getattr(s, name)
        assert got32.dtype == torch.float32 and got32.shape == (N,)
        assert torch.equal(got32, t64[name].float()), name
        assert math.isclose(float(got32[i]), value, rel_tol=1e-7), name
    assert int(s.timestep_map[i]) == i


def test_cosine_table_shape_properties():
    s = make_schedule()
    t64 = s.tables64()
    assert s.num_steps == N and all(v.dtype == torch.float64 for v in t64.values())
    abar = t64["alphas_cumprod"]
    assert bool((abar[1:] < abar[:-1]).all()) and float(abar[0]) < 1.0 and float(abar[-1]) > 0.0
    assert bool((t64["betas"] <= 0.999).all()) and bool((t64["betas"] > 0).all())
    assert float(t64["betas"][-1]) == 0.999 and float(t64["betas"][-2]) < 0.999
    assert float(t64["posterior_variance"][0]) == 0.0
    assert bool(torch.isfinite(t64["posterior_log_variance_clipped"]).all())
    assert torch.equal(s.timestep_map, torch.arange(N))
    assert s.table("betas", torch.float64) is t64["betas"] and s.table("betas", torch.bfloat16) is s.betas


def test_linear_schedule():
    s = make_schedule(N, kind="linear")
    b = s.tables64()["betas"]
    for i in (0, 1, 500, 999):
        assert math.isclose(float(b[i]), 1e-4 + i * (0.02 - 1e-4) / (N - 1), rel_tol=1e-12)
    abar = np.cumprod(1 - b.numpy())
    assert np.allclose(s.tables64()["alphas_cumprod"].numpy(), abar, rtol=1e-13, atol=0)
    s50 = make_schedule(50, kind="linear")  # betas scale by 1000/50
    assert math.isclose(float(s50.tables64()["betas"][-1]), 0.4, rel_tol=1e-12)


def test_respace_count_rule():
    kept = space_timesteps(N, 100)
    assert kept == [round(Fraction(k * (N - 1), 99)) for k in range(100)]
    assert space_timesteps(N, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(N, N) == list(range(N))
    # A .5 tie rounds half to even: stride 999/2 = 499.5 -> 500.
    assert space_timesteps(N, 3) == [0, 500, 999]


@pytest.mark.parametrize("respace", [100, [0, 3, 10, 250, 600, 998, 999], [7, 40]])
def test_respaced_tables(respace):
    full = make_schedule(N).tables64()
    s = make_schedule(N, respace=respace)
    kept = space_timesteps(N, respace) if isinstance(respace, int) else respace
    assert s.num_steps == len(kept) and s.timestep_map.tolist() == kept
    t64 = s.tables64()
    assert torch.equal(t64["alphas_cumprod"], full["alphas_cumprod"][kept])
    abar = full["alphas_cumprod"].numpy()[kept]
    betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    assert np.allclose(t64["betas"].numpy(), betas, rtol=1e-14, atol=0)
    ref = _np_cosine(kept)
    for name, key in [
        ("posterior_variance", "var"),
        ("posterior_log_variance_clipped", "logvar_clip"),
        ("posterior_mean_coef1", "coef1"),
        ("posterior_mean_coef2", "coef2"),
        ("alphas_cumprod_prev", "abar_prev"),
    ]:
        assert np.allclose(t64[name].numpy(), ref[key], rtol=1e-9, atol=0), name


def test_schedule_to_device_moves_every_table():
    s = make_schedule(N, respace=10)
    m = s.to("meta")
    assert isinstance(m, DiffusionSchedule) and m.device.type == "meta" and m.num_steps == 10
    assert m.timestep_map.device.type == "meta" and m.betas.device.type == "meta"
    assert all(v.device.type == "meta" for v in m.tables64().values())
    assert s.to("cpu") is s


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


# ----------------------------------------------------------------------------- reverse steps


def _np_p_step(out, x_t, t, tab, noise, temperature):
    _, mean, logvar = _np_posterior(out, x_t, t, tab)
    return mean + (t > 0)[:, None] * np.exp(0.5 * logvar) * noise * temperature


def _np_ddim(out, x_t, t, tab, noise, eta):
    c = x_t.shape[1]
    eps = out[:, :c]
    ab, ap = tab["abar"][t][:, None], tab["abar_prev"][t][:, None]
    x0_pred = x_t / np.sqrt(ab) - np.sqrt(1 / ab - 1) * eps
    sigma = eta * np.sqrt((1 - ap) / (1 - ab)) * np.sqrt(1 - ab / ap)
    res = np.sqrt(ap) * x0_pred + np.sqrt(1 - ap - sigma**2) * eps
    return res + (t > 0)[:, None] * sigma * noise


def _step_inputs(ts, channels=9, seed=7):
    g = torch.Generator().manual_seed(seed)
    m = len(ts)
    x_t = torch.randn(m, channels, generator=g, dtype=torch.float64)
    eps = torch.randn(m, channels, generator=g, dtype=torch.float64)
    v = torch.rand(m, channels, generator=g, dtype=torch.float64) * 2 - 1
    out = torch.cat([eps, v], 1)
    noise = torch.randn(m, channels, generator=g, dtype=torch.float64)
    return out, x_t, torch.tensor(ts), noise


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


# ----------------------------------------------------------------------------- samplers


def _make_denoiser(channels, cond_dim, seen):
    g = torch.Generator().manual_seed(10)
    wa = torch.randn(channels, channels, generator=g, dtype=torch.float64) / channels
    wb = torch.randn(cond_dim, channels, generator=g, dtype=torch.float64) / cond_dim
    wv = torch.randn(channels, channels, generator=g, dtype=torch.float64)

    def torch_fn(x, t_model, cond):
        seen.append(t_model.clone())
        x = x.double()
        eps = torch.tanh(x @ wa + cond @ wb + 1e-3 * t_model.double()[:, None])
        v = 0.9 * torch.tanh(x @ wv)
        return torch.cat([eps, v], 1)

    def np_fn(x, t_model, cond):
        eps = np.tanh(x @ wa.numpy() + cond @ wb.numpy() + 1e-3 * t_model)
        return np.concatenate([eps, 0.9 * np.tanh(x @ wv.numpy())], 1)

    return torch_fn, np_fn


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


# ----------------------------------------------------------------------------- adaln_modulate, timestep embedding


def _np_adaln(x, shift, scale, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * (1 + scale) + shift


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


# ----------------------------------------------------------------------------- bad inputs


def _good(m=4, c=3):
    out, x0, x_t, noise, t = _loss_batch([0, 1, 500, 999][:m], channels=c)
    return out.float(), x0.float(), x_t.float(), noise.float(), t


def test_bad_t_raises():
    out, x0, x_t, noise, t = _good()
    s = make_schedule()
    with pytest.raises(ValueError, match=r"\bt must lie in \[0, 1000\)"):
        diffusion_loss(out, x0, x_t, noise, torch.tensor([0, 1, 2, 1000]), s)
    with pytest.raises(ValueError, match=r"\bt must lie in \[0, 10\)"):
        p_sample_step(out, x_t, torch.tensor([0, 1, 2, 10]), make_schedule(respace=10), noise)
    with pytest.raises(ValueError, match=r"\bt must lie"):
        q_sample(x0, noise, torch.tensor([0, -1, 2, 3]), s)
    with pytest.raises(TypeError, match=r"\bt must have dtype in \(int64\)"):
        q_sample(x0, noise, t.int(), s)
    with pytest.raises(ValueError, match=r"\bt must have shape \[4\]"):
        diffusion_loss(out, x0, x_t, noise, t[:3], s)


def test_bad_shapes_raise():
    out, x0, x_t, noise, t = _good()
    s = make_schedule()
    with pytest.raises(ValueError, match=r"model_out must have shape \[M, 2\*C\] = \[4, 6\]"):
        diffusion_loss(out[:, :5], x0, x_t, noise, t, s)
    with pytest.raises(ValueError, match="model_out"):
        p_sample_step(out[:3], x_t, t, s, noise)
    with pytest.raises(ValueError, match="model_out"):
        ddim_step(torch.cat([out, out], 1), x_t, t, s)
    with pytest.raises(ValueError, match="noise must have shape"):
        q_sample(x0, noise[:, :2], t, s)
    with pytest.raises(ValueError, match="x0 must have shape"):
        diffusion_loss(out, x0[:2], x_t, noise, t, s)
    with pytest.raises(TypeError, match="noise must have x0's dtype"):
        q_sample(x0, noise.double(), t, s)
    with pytest.raises(TypeError, match="x0 must have dtype"):
        q_sample(x0.int(), noise, t, s)
    with pytest.raises(ValueError, match="shift of shape"):
        adaln_modulate(x0, torch.zeros(4, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="scale of shape"):
        adaln_modulate(x0, torch.zeros(3), torch.zeros(2, 4, 3))


def test_device_mismatch_raises():
    out, x0, x_t, noise, t = _good()
    s = make_schedule()
    with pytest.raises(ValueError, match="noise is on meta"):
        q_sample(x0, noise.to("meta"), t, s)
    with pytest.raises(ValueError, match="t is on meta"):
        diffusion_loss(out, x0, x_t, noise, t.to("meta"), s)
    with pytest.raises(ValueError, match="schedule tables are on meta"):
        p_sample_step(out, x_t, t, s.to("meta"), noise)
    with pytest.raises(ValueError, match="scale is on meta"):
        adaln_modulate(x0, torch.zeros(3), torch.zeros(3, device="meta"))
    with pytest.raises(TypeError, match="schedule must be a DiffusionSchedule"):
        q_sample(x0, noise, t, {"betas": s.betas})


def test_bad_options_raise():
    out, x0, x_t, noise, t = _good()
    s = make_schedule()
    with pytest.raises(ValueError, match="reduction must be one of"):
        diffusion_loss(out, x0, x_t, noise, t, s, reduction="avg")
    with pytest.raises(ValueError, match="backend must be"):
        q_sample(x0, noise, t, s, backend="gpu")
    with pytest.raises(ValueError, match="noise is required when eta > 0"):
        ddim_step(out, x_t, t, s, eta=0.5)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_step(out, x_t, t, s, noise, eta=-0.1)
    with pytest.raises(TypeError, match="temperature must be a finite float"):
        p_sample_step(out, x_t, t, s, noise, temperature=float("nan"))
    with pytest.raises(ValueError, match="eps must be > 0"):
        adaln_modulate(x0, x0, x0, eps=0.0)


def test_bad_schedule_arguments_raise():
    with pytest.raises(ValueError, match=r"respace=1001 must lie in \[1, num_steps=1000\]"):
        make_schedule(1000, respace=1001)
    with pytest.raises(ValueError, match="respace must keep at least 2 steps"):
        make_schedule(1000, respace=1)
    with pytest.raises(ValueError, match="respace list must be strictly increasing"):
        make_schedule(1000, respace=[0, 10, 10, 20])
    with pytest.raises(ValueError, match=r"respace steps must lie in \[0, 1000\)"):
        make_schedule(1000, respace=[0, 1000])
    with pytest.raises(TypeError, match="respace must be None, an int or a list"):
        make_schedule(1000, respace=2.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_schedule(1000, kind="sigmoid")
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        make_schedule(1)
    with pytest.raises(ValueError, match="kind='linear' needs num_steps > 20"):
        make_schedule(20, kind="linear")


def test_bad_sampler_arguments_raise():
    s = make_schedule(respace=4)
    cond = torch.zeros(2, 3)
    good = lambda x, t, c: torch.zeros(x.shape[0], 2 * x.shape[1])
    with pytest.raises(ValueError, match=r"denoise_fn must return model_out of shape \[M, 2\*C\]"):
        p_sample_loop(lambda x, t, c: torch.zeros(2, 3), cond, s, channels=3)
    with pytest.raises(TypeError, match="denoise_fn must be callable"):
        ddim_sample_loop(None, cond, s, channels=3)
    with pytest.raises(ValueError, match=r"step_noise must have shape \[4, 2, 3\]"):
        p_sample_loop(good, cond, s, channels=3, step_noise=torch.zeros(3, 2, 3))
    with pytest.raises(ValueError, match=r"noise must have shape \[M, channels=3\]"):
        ddim_sample_loop(good, cond, s, channels=3, noise=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="pass noise"):
        p_sample_loop(good, None, s, channels=3)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        p_sample_loop(good, cond, s, channels=0)


# ----------------------------------------------------------------------------- sizes, devices, values (issue 16)


def test_make_schedule_past_memory_is_refused_before_allocating():
    # 10^12 steps: the float64 chain alone is ~30 TiB; named, not an allocator error.
    with pytest.raises(ValueError, match=r"make_schedule: num_steps=1000000000000 would need .* more than its"):
        make_schedule(10**12)


def test_make_schedule_device_is_named():
    # torch's "Expected one of cpu, cuda, ..." / "Torch not compiled with CUDA enabled" named nothing.
    with pytest.raises(ValueError, match=r"make_schedule: device must be a torch.device .* got 'gpu'"):
        make_schedule(10, device="gpu")
    with pytest.raises(ValueError, match=r"make_schedule: device='cuda:99' but "):
        make_schedule(10, device="cuda:99")


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


def test_timestep_embedding_past_memory_is_refused():
    with pytest.raises(ValueError, match=r"timestep_embedding: dim=1000000000000 for 4 timesteps would need"):
        timestep_embedding(torch.arange(4), 10**12)


def test_nonfinite_diffusion_inputs_are_named_when_values_are_checked(monkeypatch):
    out, x0, x_t, noise, t = _good()
    s = make_schedule(1000)
    bad = out.clone()
    bad[2, 1] = float("nan")
    diffusion_loss(bad, x0, x_t, noise, t, s)  # opt-in only: NaN flows to the trainer's own check
    monkeypatch.setenv("INVNEXT_CHECK_VALUES", "1")
    inf = torch.full_like(x0, float("inf"))
    for call, match in (
        (lambda: diffusion_loss(bad, x0, x_t, noise, t, s), "diffusion_loss: model_out holds 1 non-finite"),
        (lambda: q_sample(inf, noise, t, s), "q_sample: x0 holds 12 non-finite"),
        (lambda: p_sample_step(out, x_t, t, s, inf), "p_sample_step: noise holds 12 non-finite"),
        (lambda: ddim_step(out, inf, t, s), "ddim_step: x_t holds 12 non-finite"),
        (lambda: adaln_modulate(x0, torch.zeros(3), inf[0]), "adaln_modulate: scale holds 3 non-finite"),
        (lambda: p_sample_loop(lambda x, tt, c: torch.zeros(4, 6), None, make_schedule(respace=4), channels=3,
                               noise=inf), "p_sample_loop: noise holds 12 non-finite"),
    ):
        with pytest.raises(ValueError, match=match):
            call()
