"""Element-wise diffusion kernels: ``q_sample`` (+ backward), the ancestral and the DDIM step.

Each program owns a ``[BLOCK_M, BLOCK_C]`` tile of rows x channels, reads its rows' ``t``
once and the few schedule values it needs (tables of S floats, L1 resident), and streams
the row data once: these kernels are pure bandwidth, every byte read or written once.
Math in fp32 whatever the storage dtype; one rounding on store.

    q_sample:   x_t = sqrt(abar) x0 + sqrt(1 - abar) noise           dx0 = sqrt(abar) g,  dnoise = sqrt(1 - abar) g
    p_sample:   x0p = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps,  mean = coef1 x0p + coef2 x_t
                logvar = frac log(beta) + (1 - frac) logvar_clip,  frac = (v + 1) / 2
                x_{t-1} = mean + [t > 0] exp(logvar / 2) (noise temperature)
    ddim:       sigma = eta sqrt((1 - abar_prev) / (1 - abar) (1 - abar / abar_prev))
                x_prev = sqrt(abar_prev) x0p + sqrt(max(1 - abar_prev - sigma^2, 0)) eps + [t > 0] sigma noise
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._diffusion_common import exp_, load_rows_t, round_to, table


@triton.jit
def _tile(BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, M, C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < C)[None, :]
    return rows, cols, row_ok, mask


@triton.jit
def _off(rows, cols, S0: tl.constexpr, S1: tl.constexpr):
    return rows.to(tl.int64)[:, None] * S0 + cols[None, :] * S1


@triton.jit
def q_sample_fwd_kernel(
    out_ptr, x0_ptr, noise_ptr, t_ptr, sa_ptr, s1ma_ptr,
    M, S,
    C: tl.constexpr,
    X_S0: tl.constexpr, X_S1: tl.constexpr, N_S0: tl.constexpr, N_S1: tl.constexpr, T_S: tl.constexpr,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows, cols, row_ok, mask = _tile(BLOCK_M, BLOCK_C, M, C)
    t, ok = load_rows_t(t_ptr, rows, row_ok, T_S, S)
    a = table(sa_ptr, t, ok)[:, None]
    s = table(s1ma_ptr, t, ok)[:, None]
    x0 = tl.load(x0_ptr + _off(rows, cols, X_S0, X_S1), mask=mask, other=0.0).to(tl.float32)
    nz = tl.load(noise_ptr + _off(rows, cols, N_S0, N_S1), mask=mask, other=0.0).to(tl.float32)
    out = a * x0 + s * nz
    tl.store(out_ptr + _off(rows, cols, C, 1), round_to(out, OUT_DTYPE), mask=mask)


@triton.jit
def q_sample_bwd_kernel(
    dx0_ptr, dnoise_ptr, g_ptr, t_ptr, sa_ptr, s1ma_ptr,
    M, S,
    C: tl.constexpr,
    G_S0: tl.constexpr, G_S1: tl.constexpr, T_S: tl.constexpr,
    NEED_X0: tl.constexpr, NEED_NOISE: tl.constexpr,
    X0_DTYPE: tl.constexpr, NOISE_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows, cols, row_ok, mask = _tile(BLOCK_M, BLOCK_C, M, C)
    t, ok = load_rows_t(t_ptr, rows, row_ok, T_S, S)
    g = tl.load(g_ptr + _off(rows, cols, G_S0, G_S1), mask=mask, other=0.0).to(tl.float32)
    out_off = _off(rows, cols, C, 1)
    if NEED_X0:
        a = table(sa_ptr, t, ok)[:, None]
        tl.store(dx0_ptr + out_off, round_to(a * g, X0_DTYPE), mask=mask)
    if NEED_NOISE:
        s = table(s1ma_ptr, t, ok)[:, None]
        tl.store(dnoise_ptr + out_off, round_to(s * g, NOISE_DTYPE), mask=mask)


@triton.jit
def p_sample_kernel(
    out_ptr, mo_ptr, xt_ptr, noise_ptr, t_ptr,
    sra_ptr, srm1_ptr, c1_ptr, c2_ptr, lvc_ptr, lb_ptr,
    M, S, temperature,
    C: tl.constexpr,
    MO_S0: tl.constexpr, MO_S1: tl.constexpr, X_S0: tl.constexpr, X_S1: tl.constexpr,
    N_S0: tl.constexpr, N_S1: tl.constexpr, T_S: tl.constexpr, O_S0: tl.constexpr,
    OUT_DTYPE: tl.constexpr, ACCURATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows, cols, row_ok, mask = _tile(BLOCK_M, BLOCK_C, M, C)
    t, ok = load_rows_t(t_ptr, rows, row_ok, T_S, S)
    sra = table(sra_ptr, t, ok)[:, None]
    srm1 = table(srm1_ptr, t, ok)[:, None]
    c1 = table(c1_ptr, t, ok)[:, None]
    c2 = table(c2_ptr, t, ok)[:, None]
    lvc = table(lvc_ptr, t, ok)[:, None]
    lb = table(lb_ptr, t, ok)[:, None]
    live = (t != 0).to(tl.float32)[:, None]

    mo_off = _off(rows, cols, MO_S0, MO_S1)
    eps = tl.load(mo_ptr + mo_off, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(mo_ptr + mo_off + C * MO_S1, mask=mask, other=0.0).to(tl.float32)
    xt = tl.load(xt_ptr + _off(rows, cols, X_S0, X_S1), mask=mask, other=0.0).to(tl.float32)
    nz = tl.load(noise_ptr + _off(rows, cols, N_S0, N_S1), mask=mask, other=0.0).to(tl.float32)

    x0p = sra * xt - srm1 * eps
    mean = c1 * x0p + c2 * xt
    frac = (v + 1.0) * 0.5
    logvar = frac * lb + (1.0 - frac) * lvc
    out = mean + live * exp_(0.5 * logvar, ACCURATE) * (nz * temperature)
    # O_S0 may equal X_S0 with out_ptr == xt_ptr: the CUDA-graph sampler updates x in place
    # (every element is read by the program that later overwrites it).
    tl.store(out_ptr + _off(rows, cols, O_S0, 1), round_to(out, OUT_DTYPE), mask=mask)


@triton.jit
def ddim_kernel(
    out_ptr, mo_ptr, xt_ptr, noise_ptr, t_ptr,
    sra_ptr, srm1_ptr, abar_ptr, abar_prev_ptr,
    M, S, eta,
    C: tl.constexpr,
    MO_S0: tl.constexpr, MO_S1: tl.constexpr, X_S0: tl.constexpr, X_S1: tl.constexpr,
    N_S0: tl.constexpr, N_S1: tl.constexpr, T_S: tl.constexpr, O_S0: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    OUT_DTYPE: tl.constexpr, ACCURATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    rows, cols, row_ok, mask = _tile(BLOCK_M, BLOCK_C, M, C)
    t, ok = load_rows_t(t_ptr, rows, row_ok, T_S, S)
    sra = table(sra_ptr, t, ok)
    srm1 = table(srm1_ptr, t, ok)
    abar = table(abar_ptr, t, ok)
    abar_prev = table(abar_prev_ptr, t, ok)
    # Per-row coefficients, evaluated in the reference's order (the same fp32 roundings).
    sigma = eta * tl.sqrt_rn(tl.div_rn(1.0 - abar_prev, 1.0 - abar) * (1.0 - tl.div_rn(abar, abar_prev)))
    c_eps = tl.sqrt_rn(tl.maximum(1.0 - abar_prev - sigma * sigma, 0.0))
    c_x0 = tl.sqrt_rn(abar_prev)

    mo_off = _off(rows, cols, MO_S0, MO_S1)
    eps = tl.load(mo_ptr + mo_off, mask=mask, other=0.0).to(tl.float32)
    xt = tl.load(xt_ptr + _off(rows, cols, X_S0, X_S1), mask=mask, other=0.0).to(tl.float32)
    x0p = sra[:, None] * xt - srm1[:, None] * eps
    out = c_x0[:, None] * x0p + c_eps[:, None] * eps
    if HAS_NOISE:
        nz = tl.load(noise_ptr + _off(rows, cols, N_S0, N_S1), mask=mask, other=0.0).to(tl.float32)
        live = (t != 0).to(tl.float32)
        out = out + (live * sigma)[:, None] * nz
    tl.store(out_ptr + _off(rows, cols, O_S0, 1), round_to(out, OUT_DTYPE), mask=mask)
