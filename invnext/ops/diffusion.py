"""Gaussian-diffusion ops of the Stage-1 pixel decoder (improved-DDPM, learned variance range).

Rows are independent: ``x0, x_t, noise`` are ``[M, C]`` (one hidden token's pixel patch per
row), ``t`` is ``int64[M]`` indexing the (possibly respaced) ``schedule``, and the denoiser's
output ``model_out[M, 2C] = [eps, v]`` holds the predicted noise and the variance
interpolation. With the per-row table values of step t (see :mod:`.diffusion_schedule`):

    x0_pred = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps
    mean    = coef1 x0_pred + coef2 x_t
    logvar  = frac log(beta) + (1 - frac) logvar_clip,        frac = (v + 1) / 2

x0_pred is never clipped to [-1, 1] (the decoder's targets are normalised pixels, but the
release samples unclipped, and clipping would make the reverse step non-differentiable).

Precision: tables are read in float32 and the math runs in float32 whatever the input dtype
(bf16/fp16 are upcast); if any input is float64 the float64 tables are used and the math runs
in float64. Outputs come back in the input's dtype, except the loss (float32, or float64).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

# Re-exported: invnext.ops._EXPORTS is the one list of the names this module makes public.
from invnext.common.diffusion_schedule import DiffusionSchedule, make_schedule, space_timesteps  # noqa: F401
from invnext.common.diffusion_steps import (
    compute_dtype,
    denoise,
    model_posterior,
    noise_for_step,
    row,
)
from invnext.common.diffusion_steps import ddim_step_reference, p_sample_step_reference
from invnext.common.validate import (
    FLOAT_DTYPES,
    check_alloc,
    check_backend,
    check_finite,
    check_index_range,
    check_same_device,
    check_shape,
    check_tensor,
)
from invnext.ops._dispatch import dispatch, register_reference

_LN2 = math.log(2.0)
_BIN = 1.0 / 255.0  # half the width of one 8-bit pixel bin on [-1, 1]
_LOG_FLOOR = 1e-12
_EDGE = 0.999
_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- helpers


def _device(op: str, **args: object) -> torch.device:
    """The common device of the tensor arguments (non-tensors are rejected later, by name)."""
    return check_same_device(op, **{k: v for k, v in args.items() if isinstance(v, torch.Tensor)})


def _check_schedule(op: str, schedule: object, device: torch.device) -> DiffusionSchedule:
    if not isinstance(schedule, DiffusionSchedule):
        got = type(schedule).__name__
        raise TypeError(f"{op}: schedule must be a DiffusionSchedule (see make_schedule), got {got}")
    if schedule.device != device:
        raise ValueError(
            f"{op}: schedule tables are on {schedule.device} but the tensors are on {device}; "
            "use schedule.to(device)"
        )
    return schedule


def _check_t(op: str, t: object, rows: int, device: torch.device, schedule: DiffusionSchedule) -> torch.Tensor:
    t = check_tensor(op, "t", t, ndim=1, dtypes=(torch.int64,), device=device)
    check_shape(op, "t", t, [rows])
    check_index_range(op, "t", t, 0, schedule.num_steps)
    return t


def _check_rows(op: str, name: str, x: object, shape: list[int | None], device: torch.device | None = None):
    x = check_tensor(op, name, x, ndim=len(shape), dtypes=FLOAT_DTYPES, device=device)
    check_shape(op, name, x, shape)
    return x


def _check_model_out(op: str, model_out: object, rows: int, channels: int, device: torch.device) -> torch.Tensor:
    model_out = check_tensor(op, "model_out", model_out, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if tuple(model_out.shape) != (rows, 2 * channels):
        raise ValueError(
            f"{op}: model_out must have shape [M, 2*C] = [{rows}, {2 * channels}] ([eps, v] for C={channels} "
            f"channels), got {list(model_out.shape)}"
        )
    return model_out


def _check_float(op: str, name: str, value: object, *, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{op}: {name} must be a finite float, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{op}: {name} must be >= {low}, got {value}")
    return float(value)


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # The tanh approximation of Phi (the one improved-DDPM's bits/dim numbers use), not erf.
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


# ----------------------------------------------------------------------------- q_sample


@register_reference("q_sample")
def q_sample_reference(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: DiffusionSchedule
) -> torch.Tensor:
    # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
    dt = compute_dtype(x0, noise)
    a = row(schedule, "sqrt_alphas_cumprod", t, dt)
    s = row(schedule, "sqrt_one_minus_alphas_cumprod", t, dt)
    return (a * x0.to(dt) + s * noise.to(dt)).to(x0.dtype)


def q_sample(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: DiffusionSchedule, *, backend: str = "auto"
) -> torch.Tensor:
    """Noise clean rows to step t: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    Args:
        x0: ``[M, C]`` float (fp32/bf16/fp16/fp64), the clean rows.
        noise: ``[M, C]``, same dtype as ``x0``.
        t: ``int64[M]`` in ``[0, schedule.num_steps)``.
        schedule: a :class:`DiffusionSchedule` on the same device.
    Returns:
        ``x_t[M, C]`` in ``x0``'s dtype. Differentiable w.r.t. ``x0`` and ``noise``.
    """
    op = "q_sample"
    check_backend(op, backend)
    x0 = check_tensor(op, "x0", x0, ndim=2, dtypes=FLOAT_DTYPES)
    device = _device(op, x0=x0, noise=noise, t=t)
    noise = _check_rows(op, "noise", noise, list(x0.shape), device)
    if noise.dtype != x0.dtype:
        raise TypeError(f"{op}: noise must have x0's dtype {x0.dtype}, got {noise.dtype}")
    schedule = _check_schedule(op, schedule, device)
    t = _check_t(op, t, x0.shape[0], device, schedule)
    check_finite(op, x0=x0, noise=noise)
    return dispatch(op, backend, device, x0, noise, t, schedule)


# ----------------------------------------------------------------------------- loss


@register_reference("diffusion_loss")
def diffusion_loss_reference(
    model_out: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: DiffusionSchedule,
) -> torch.Tensor:
    # loss = mean_c (noise - eps)^2 + vb / ln 2, vb from the posterior with eps detached:
    #   t > 0: KL(q(x_{t-1}|x_t,x0) || p) = 0.5 (-1 + lv - lv_q + exp(lv_q - lv) + (mu_q - mu)^2 exp(-lv))
    #   t = 0: -log P(x0's 8-bit bin | mu, lv), bins of width 2/255, open-ended past +-0.999
    dt = compute_dtype(model_out, x0, x_t, noise)
    channels = x_t.shape[1]
    out = model_out.to(dt)
    eps, v = out[:, :channels], out[:, channels:]
    x0, x_t, noise = (z.detach().to(dt) for z in (x0, x_t, noise))

    mse = (noise - eps).square().mean(1)

    _, mean, logvar = model_posterior(eps.detach(), v, x_t, t, schedule, dt)
    mean_q = row(schedule, "posterior_mean_coef1", t, dt) * x0 + row(schedule, "posterior_mean_coef2", t, dt) * x_t
    logvar_q = row(schedule, "posterior_log_variance_clipped", t, dt)
    kl = 0.5 * (-1.0 + logvar - logvar_q + torch.exp(logvar_q - logvar) + (mean_q - mean).square() * torch.exp(-logvar))

    first = (t == 0).unsqueeze(1)
    # Rows with t > 0 evaluate the (discarded) likelihood at a harmless point: an overflow
    # there would turn the masked-out gradient into 0 * inf = NaN.
    centered = torch.where(first, x0 - mean, torch.zeros_like(mean))
    inv_std = torch.exp(-0.5 * logvar)
    cdf_hi = _approx_std_normal_cdf(inv_std * (centered + _BIN))
    cdf_lo = _approx_std_normal_cdf(inv_std * (centered - _BIN))
    log_lo_edge = torch.log(cdf_hi.clamp(min=_LOG_FLOOR))
    log_hi_edge = torch.log((1.0 - cdf_lo).clamp(min=_LOG_FLOOR))
    log_bin = torch.log((cdf_hi - cdf_lo).clamp(min=_LOG_FLOOR))
    log_p = torch.where(x0 < -_EDGE, log_lo_edge, torch.where(x0 > _EDGE, log_hi_edge, log_bin))

    vb = torch.where(first, -log_p, kl).mean(1) / _LN2
    return mse + vb


def diffusion_loss(
    model_out: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: DiffusionSchedule,
    *,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """The decoder's training loss: eps MSE + the variational bound (improved-DDPM hybrid loss).

    Per row: ``mean_c (noise - eps)^2 + vb`` where ``vb`` (bits) is the KL from the true
    posterior to the model's for t > 0 and the discretised Gaussian NLL of ``x0`` at t = 0,
    both computed with ``eps`` detached, so ``vb`` trains only the ``v`` half.

    Args:
        model_out: ``[M, 2C]`` float, ``[eps, v]``.
        x0: ``[M, C]`` float, the clean target in [-1, 1].
        x_t: ``[M, C]`` float, ``q_sample(x0, noise, t)``.
        noise: ``[M, C]`` float, the noise that made ``x_t``.
        t: ``int64[M]`` in ``[0, schedule.num_steps)``.
        schedule: a :class:`DiffusionSchedule` on the same device.
        reduction: ``"mean"`` (over rows), ``"sum"`` or ``"none"``. The mean over no rows
            (``M = 0``) is 0, as the sum is, and still differentiable: a batch with nothing to
            reconstruct adds nothing to the loss (NaN would poison the step).
    Returns:
        float32 (float64 if any input is float64): ``[M]`` for ``"none"``, else a scalar.
        Differentiable w.r.t. ``model_out`` only; ``x0``, ``x_t`` and ``noise`` are targets.
    """
    op = "diffusion_loss"
    check_backend(op, backend)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    x_t = check_tensor(op, "x_t", x_t, ndim=2, dtypes=FLOAT_DTYPES)
    device = _device(op, model_out=model_out, x0=x0, x_t=x_t, noise=noise, t=t)
    rows, channels = x_t.shape
    model_out = _check_model_out(op, model_out, rows, channels, device)
    x0 = _check_rows(op, "x0", x0, [rows, channels], device)
    noise = _check_rows(op, "noise", noise, [rows, channels], device)
    schedule = _check_schedule(op, schedule, device)
    t = _check_t(op, t, rows, device, schedule)
    check_finite(op, model_out=model_out, x0=x0, x_t=x_t, noise=noise)
    loss = dispatch(op, backend, device, model_out, x0, x_t, noise, t, schedule)
    if reduction == "mean":
        return loss.mean() if rows else loss.sum()
    if reduction == "sum":
        return loss.sum()
    return loss


# ----------------------------------------------------------------------------- reverse steps


# The reference step is the Triton sampler's too (invnext.common.diffusion_steps).
register_reference("p_sample_step")(p_sample_step_reference)


def p_sample_step(
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: DiffusionSchedule,
    noise: torch.Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """One ancestral reverse step ``x_t -> x_{t-1}`` with the learned variance.

    ``x_{t-1} = mean + [t > 0] * exp(logvar / 2) * noise * temperature`` (module docstring
    for mean and logvar; x0_pred is not clipped).

    Args:
        model_out: ``[M, 2C]`` float, ``[eps, v]``.
        x_t: ``[M, C]`` float.
        t: ``int64[M]`` in ``[0, schedule.num_steps)``; rows with t = 0 return the mean.
        schedule: a :class:`DiffusionSchedule` on the same device.
        noise: ``[M, C]`` float, standard normal.
        temperature: scales the added noise.
    Returns:
        ``x_{t-1}[M, C]`` in ``x_t``'s dtype.
    """
    op = "p_sample_step"
    check_backend(op, backend)
    temperature = _check_float(op, "temperature", temperature)
    x_t = check_tensor(op, "x_t", x_t, ndim=2, dtypes=FLOAT_DTYPES)
    device = _device(op, model_out=model_out, x_t=x_t, noise=noise, t=t)
    rows, channels = x_t.shape
    model_out = _check_model_out(op, model_out, rows, channels, device)
    noise = _check_rows(op, "noise", noise, [rows, channels], device)
    schedule = _check_schedule(op, schedule, device)
    t = _check_t(op, t, rows, device, schedule)
    check_finite(op, model_out=model_out, x_t=x_t, noise=noise)
    return dispatch(op, backend, device, model_out, x_t, t, schedule, noise, temperature)


register_reference("ddim_step")(ddim_step_reference)


def ddim_step(
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: DiffusionSchedule,
    noise: torch.Tensor | None = None,
    *,
    eta: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """One DDIM step ``x_t -> x_{prev}`` along the (respaced) schedule, eps from ``model_out[:, :C]``.

    ``eta = 0`` is deterministic (``noise`` ignored); ``eta = 1`` matches the ancestral
    step's variance with the posterior variance. The ``v`` half is not used.

    Args:
        model_out: ``[M, 2C]`` float, ``[eps, v]``.
        x_t: ``[M, C]`` float.
        t: ``int64[M]`` in ``[0, schedule.num_steps)``.
        schedule: a :class:`DiffusionSchedule` on the same device.
        noise: ``[M, C]`` float, required when ``eta > 0``.
        eta: >= 0.
    Returns:
        ``x_prev[M, C]`` in ``x_t``'s dtype.
    """
    op = "ddim_step"
    check_backend(op, backend)
    eta = _check_float(op, "eta", eta, low=0.0)
    x_t = check_tensor(op, "x_t", x_t, ndim=2, dtypes=FLOAT_DTYPES)
    device = _device(op, model_out=model_out, x_t=x_t, noise=noise, t=t)
    rows, channels = x_t.shape
    model_out = _check_model_out(op, model_out, rows, channels, device)
    if noise is None:
        if eta > 0.0:
            raise ValueError(f"{op}: noise is required when eta > 0 (got eta={eta})")
    else:
        noise = _check_rows(op, "noise", noise, [rows, channels], device)
    schedule = _check_schedule(op, schedule, device)
    t = _check_t(op, t, rows, device, schedule)
    check_finite(op, model_out=model_out, x_t=x_t, noise=noise)
    return dispatch(op, backend, device, model_out, x_t, t, schedule, noise, eta)


# ----------------------------------------------------------------------------- AdaLN


@register_reference("adaln_modulate")
def adaln_modulate_reference(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    # y = (x - mean_w x) / sqrt(var_w x + eps) * (1 + scale) + shift   (biased variance)
    dt = compute_dtype(x, shift, scale)
    y = F.layer_norm(x.to(dt), (x.shape[-1],), eps=eps)
    return (y * (1.0 + scale.to(dt)) + shift.to(dt)).to(x.dtype)


def adaln_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, *, eps: float = 1e-6, backend: str = "auto"
) -> torch.Tensor:
    """Adaptive LayerNorm: ``LayerNorm(x, no affine, eps) * (1 + scale) + shift`` over the last dim.

    Args:
        x: ``[..., W]`` float (flattened to ``[M, W]`` rows).
        shift, scale: float, broadcastable to ``x``'s shape without changing it, e.g. ``[W]``,
            ``[1, W]`` or ``[M, W]`` against ``[M, W]``, or ``[B, 1, W]`` (per-sample modulation)
            against ``[B, L, W]``. They are expanded to ``x``'s shape and flattened to ``[M, W]``
            (a stride-0 view where possible, a copy otherwise).
        eps: LayerNorm epsilon (> 0).
    Returns:
        ``x``'s shape and dtype. Differentiable w.r.t. ``x``, ``shift`` and ``scale``.
    """
    op = "adaln_modulate"
    check_backend(op, backend)
    x = check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    shift = check_tensor(op, "shift", shift, dtypes=FLOAT_DTYPES)
    scale = check_tensor(op, "scale", scale, dtypes=FLOAT_DTYPES)
    device = check_same_device(op, x=x, shift=shift, scale=scale)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must have shape [..., W] with W >= 1, got {list(x.shape)}")
    for name, p in (("shift", shift), ("scale", scale)):
        try:
            ok = torch.broadcast_shapes(p.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{op}: {name} of shape {list(p.shape)} must broadcast to x's shape {list(x.shape)}")
    eps = _check_float(op, "eps", eps)
    if eps <= 0.0:
        raise ValueError(f"{op}: eps must be > 0, got {eps}")
    check_finite(op, x=x, shift=shift, scale=scale)
    width = x.shape[-1]
    rows = x.numel() // width
    flat = [z.expand(x.shape).reshape(rows, width) for z in (x, shift, scale)]
    return dispatch(op, backend, device, *flat, eps).reshape(x.shape)


# ----------------------------------------------------------------------------- samplers


@register_reference("p_sample_loop")
@torch.no_grad()
def p_sample_loop_reference(denoise_fn, cond, schedule, x_T, step_noise, generator, temperature):
    x = x_T
    rows = x.shape[0]
    for i in reversed(range(schedule.num_steps)):
        t = torch.full((rows,), i, dtype=torch.int64, device=x.device)
        out = denoise("p_sample_loop", denoise_fn, x, t, cond, schedule)
        # Step 0 adds no noise, so nothing is drawn for it.
        noise = noise_for_step(step_noise, i, generator, x) if i > 0 else torch.zeros_like(x)
        x = p_sample_step_reference(out, x, t, schedule, noise, temperature)
    return x


@register_reference("ddim_sample_loop")
@torch.no_grad()
def ddim_sample_loop_reference(denoise_fn, cond, schedule, x_T, step_noise, generator, eta):
    x = x_T
    rows = x.shape[0]
    for i in reversed(range(schedule.num_steps)):
        t = torch.full((rows,), i, dtype=torch.int64, device=x.device)
        out = denoise("ddim_sample_loop", denoise_fn, x, t, cond, schedule)
        noise = noise_for_step(step_noise, i, generator, x) if (i > 0 and eta > 0.0) else None
        x = ddim_step_reference(out, x, t, schedule, noise, eta)
    return x


def _sample_loop(op, backend, denoise_fn, cond, schedule, channels, noise, step_noise, generator, coef):
    """Validate a sampler's remaining arguments, draw x_T if not given, and dispatch ``op``."""
    if not callable(denoise_fn):
        raise TypeError(f"{op}: denoise_fn must be callable (x_t[M,C], t_model int64[M], cond) -> [M, 2C]")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"{op}: channels must be a positive int, got {channels!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if noise is not None:
        noise = check_tensor(op, "noise", noise, ndim=2, dtypes=FLOAT_DTYPES)
        if noise.shape[1] != channels:
            raise ValueError(f"{op}: noise must have shape [M, channels={channels}], got {list(noise.shape)}")
        device, rows = noise.device, noise.shape[0]
    elif isinstance(cond, torch.Tensor) and cond.dim() >= 1:
        device, rows = cond.device, cond.shape[0]
    else:
        raise ValueError(f"{op}: pass noise [M, C] (x_T) when cond is not a tensor whose first dimension is M")
    schedule = _check_schedule(op, schedule, device)
    if step_noise is not None:
        step_noise = _check_rows(op, "step_noise", step_noise, [schedule.num_steps, rows, channels], device)
    check_finite(op, noise=noise, step_noise=step_noise, cond=cond)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"{op}: generator is on {generator.device} but the samples are on {device}")
    if noise is None:
        noise = torch.randn((rows, channels), generator=generator, device=device, dtype=torch.float32)
    return dispatch(op, backend, device, denoise_fn, cond, schedule, noise, step_noise, generator, coef)


def p_sample_loop(
    denoise_fn: Callable,
    cond,
    schedule: DiffusionSchedule,
    *,
    channels: int,
    noise: torch.Tensor | None = None,
    step_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Ancestral sampling: ``x_T -> x_0`` over every step of ``schedule`` (t = S-1 .. 0), no grad.

    Args:
        denoise_fn: ``(x_t [M, C], t_model int64[M], cond) -> model_out [M, 2C]``;
            ``t_model = schedule.timestep_map[t]`` is the original (un-respaced) timestep.
        cond: passed through to ``denoise_fn``; when ``noise`` is None it must be a tensor
            whose first dimension is M (it fixes M and the device).
        schedule: a :class:`DiffusionSchedule` on the samples' device.
        channels: C.
        noise: ``x_T [M, C]`` float (its dtype is the samples' dtype); drawn (float32) if None.
        step_noise: ``[S, M, C]`` float; step t adds ``step_noise[t]`` (``step_noise[0]`` is
            unused). If None, each step t > 0 draws ``randn(M, C)`` from ``generator`` in the
            order t = S-1 .. 1, after x_T.
        generator: ``torch.Generator`` on the samples' device, or None (the global RNG).
        temperature: scales every step's noise (not x_T).
    Returns:
        ``x_0 [M, C]`` in x_T's dtype.
    """
    op = "p_sample_loop"
    check_backend(op, backend)
    temperature = _check_float(op, "temperature", temperature)
    return _sample_loop(op, backend, denoise_fn, cond, schedule, channels, noise, step_noise, generator, temperature)


def ddim_sample_loop(
    denoise_fn: Callable,
    cond,
    schedule: DiffusionSchedule,
    *,
    channels: int,
    noise: torch.Tensor | None = None,
    step_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """DDIM sampling ``x_T -> x_0`` over every step of ``schedule``, no grad.

    Arguments as :func:`p_sample_loop`; ``eta = 0`` is deterministic given x_T (nothing is
    drawn after x_T and ``step_noise`` is ignored); with ``eta > 0`` step t > 0 adds
    ``sigma_t * step_noise[t]`` (or a fresh draw from ``generator``).
    """
    op = "ddim_sample_loop"
    check_backend(op, backend)
    eta = _check_float(op, "eta", eta, low=0.0)
    return _sample_loop(op, backend, denoise_fn, cond, schedule, channels, noise, step_noise, generator, eta)


# ----------------------------------------------------------------------------- timestep embedding


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    ``emb[m] = [cos(t_m w_0), .., cos(t_m w_{h-1}), sin(t_m w_0), .., sin(t_m w_{h-1})]`` with
    ``h = dim // 2`` and ``w_k = max_period ** (-k / h)`` (cos half first, as in DiT/MAR's
    AdaLN MLP); an odd ``dim`` gets a trailing zero column.

    Args:
        t: ``[M]`` int or float tensor.
        dim: embedding width (>= 1).
    Returns:
        ``[M, dim]`` float32 (float64 if ``t`` is float64).
    """
    op = "timestep_embedding"
    t = check_tensor(op, "t", t, ndim=1)
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{op}: t must be an integer or float tensor, got {t.dtype}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{op}: dim must be a positive int, got {dim!r}")
    max_period = _check_float(op, "max_period", max_period)
    if max_period <= 0.0:
        raise ValueError(f"{op}: max_period must be > 0, got {max_period}")
    check_alloc(op, f"dim={dim} for {t.shape[0]} timesteps", 4 * dim * t.shape[0], t.device)
    check_finite(op, t=t)
    dt = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dt, device=t.device) / max(half, 1))
    args = t.to(dt).unsqueeze(1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(t.shape[0], 1)], dim=1)
    return emb
