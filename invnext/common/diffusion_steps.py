"""The reverse-step math of the diffusion decoder (formulas: :mod:`invnext.ops.diffusion`).

Both samplers run it: the reference loops of ``invnext.ops.diffusion`` step with these functions
(they are the ``p_sample_step`` / ``ddim_step`` references), and the Triton sampler
(``invnext_kernels.sampler``) calls the denoiser and draws step noise the same way, and takes the
reference step for a denoiser output its kernels cannot take: that dtype shows only mid-loop,
after dispatch has chosen the sampler, so the sampler cannot decline it beforehand.
"""
from __future__ import annotations

from typing import Callable

import torch

from invnext.common.diffusion_schedule import DiffusionSchedule


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float32, or float64 when any input is float64 (bf16/fp16 promote to float32)."""
    dt = torch.float32
    for x in tensors:
        if x is not None:
            dt = torch.promote_types(dt, x.dtype)
    return dt


def row(schedule: DiffusionSchedule, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``table[t]`` as a ``[M, 1]`` column in ``dtype``'s table precision."""
    return schedule.table(name, dtype).index_select(0, t).unsqueeze(1)


def model_posterior(eps, v, x_t, t, schedule, dt):
    """(x0_pred, mean, logvar) of p(x_{t-1} | x_t), all ``[M, C]`` in ``dt``."""
    x0_pred = row(schedule, "sqrt_recip_alphas_cumprod", t, dt) * x_t - row(
        schedule, "sqrt_recipm1_alphas_cumprod", t, dt
    ) * eps
    mean = row(schedule, "posterior_mean_coef1", t, dt) * x0_pred + row(schedule, "posterior_mean_coef2", t, dt) * x_t
    frac = (v + 1.0) * 0.5
    logvar = frac * row(schedule, "log_betas", t, dt) + (1.0 - frac) * row(
        schedule, "posterior_log_variance_clipped", t, dt
    )
    return x0_pred, mean, logvar


def p_sample_step_reference(
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: DiffusionSchedule,
    noise: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    # x_{t-1} = mean + [t > 0] exp(logvar / 2) noise temperature
    dt = compute_dtype(model_out, x_t, noise)
    channels = x_t.shape[1]
    out, xt = model_out.to(dt), x_t.to(dt)
    _, mean, logvar = model_posterior(out[:, :channels], out[:, channels:], xt, t, schedule, dt)
    live = (t != 0).to(dt).unsqueeze(1)
    return (mean + live * torch.exp(0.5 * logvar) * (noise.to(dt) * temperature)).to(x_t.dtype)


def ddim_step_reference(
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: DiffusionSchedule,
    noise: torch.Tensor | None,
    eta: float,
) -> torch.Tensor:
    # sigma   = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)
    # x_prev  = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma^2) eps + [t > 0] sigma noise
    dt = compute_dtype(model_out, x_t, noise)
    channels = x_t.shape[1]
    out, xt = model_out.to(dt), x_t.to(dt)
    eps = out[:, :channels]
    x0_pred = row(schedule, "sqrt_recip_alphas_cumprod", t, dt) * xt - row(
        schedule, "sqrt_recipm1_alphas_cumprod", t, dt
    ) * eps
    abar = row(schedule, "alphas_cumprod", t, dt)
    abar_prev = row(schedule, "alphas_cumprod_prev", t, dt)
    sigma = eta * torch.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
    # 1 - abar_prev - sigma^2 = (1 - abar_prev)^2 abar / ((1 - abar) abar_prev) >= 0 at eta = 1;
    # the clamp only absorbs rounding.
    x_prev = abar_prev.sqrt() * x0_pred + (1.0 - abar_prev - sigma.square()).clamp(min=0.0).sqrt() * eps
    if noise is not None and eta != 0.0:
        live = (t != 0).to(dt).unsqueeze(1)
        x_prev = x_prev + live * sigma * noise.to(dt)
    return x_prev.to(x_t.dtype)


def denoise(op: str, denoise_fn: Callable, x: torch.Tensor, t: torch.Tensor, cond, schedule) -> torch.Tensor:
    out = denoise_fn(x, schedule.timestep_map.index_select(0, t), cond)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (x.shape[0], 2 * x.shape[1]):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        want = [x.shape[0], 2 * x.shape[1]]
        raise ValueError(f"{op}: denoise_fn must return model_out of shape [M, 2*C] = {want}, got {got}")
    return out


def noise_for_step(step_noise: torch.Tensor | None, i: int, generator, like: torch.Tensor) -> torch.Tensor:
    """Step ``i``'s noise: ``step_noise[i]``, or a fresh draw from ``generator`` (the reference's order)."""
    if step_noise is not None:
        return step_noise[i]
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
