"""Independent float64 math for the diffusion-decoder ops' reference tests.

The numpy helpers here recompute every table and formula from kernels.md section C without
touching invnext (scalar closed forms for the tables, numpy for the rest).
"""
from __future__ import annotations

import math

import numpy as np
import torch


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


# ----------------------------------------------------------------------------- adaln_modulate, timestep embedding


def _np_adaln(x, shift, scale, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * (1 + scale) + shift


# ----------------------------------------------------------------------------- bad inputs


def _good(m=4, c=3):
    out, x0, x_t, noise, t = _loss_batch([0, 1, 500, 999][:m], channels=c)
    return out.float(), x0.float(), x_t.float(), noise.float(), t
