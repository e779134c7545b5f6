"""Element-wise diffusion kernels: ``q_sample`` (+ backward), the ancestral and the DDIM step.

Each program owns a ``[BLOCK_M, BLOCK_C]`` tile of rows x channels, reads its rows' ``t``
once and the few schedule values it needs (tables of S floats, L1 resident), and streams
the row data once: these kernels are pure bandwidth, every byte read or written once.
Math in fp32 whatever the storage dtype; one rounding on store.

Paired rows (``PAIRED``; the loss kernels use the same tiles). A bf16/fp16 row of C = 588 channels is 1176 bytes: every other row
starts 8 bytes off a 16-byte boundary, so row tiles load and store 8 bytes at a time (the SASS
of ``benchmarks.compile_report``). When every ``[M, C]`` operand is row-contiguous, rows 2p and
2p+1 are one contiguous run of 2C elements that starts on a 16-byte boundary; the paired
kernels tile ``[M // 2, 2C]`` instead (column ``c`` belongs to the second row when
``c >= C``), pick each element's per-row coefficients with ``second``, and move x0 / x_t /
noise / out 16 bytes at a time. ``model_out [M, 2C]`` halves are read with the matching
offsets (8-byte accesses). The host runs an odd M's last row through the row kernel, and pairs
only where the tile gives each thread 16 contiguous bytes (``diffusion._pairable``).

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

from ._diffusion_common import coef, data_off, exp_, model_out_halves, pick, round_to, rows_t, stream_tile, table


@triton.jit
def q_sample_fwd_kernel(
    out_ptr, x0_ptr, noise_ptr, t_ptr, sa_ptr, s1ma_ptr,
    M, S,
    C: tl.constexpr,
    X_S0: tl.constexpr, X_S1: tl.constexpr, N_S0: tl.constexpr, N_S1: tl.constexpr, T_S: tl.constexpr,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PAIRED: tl.constexpr,
):  # fmt: skip
    rows, cols, row_ok, mask, second = stream_tile(BLOCK_M, BLOCK_C, M, C, PAIRED)
    ta, oka, tb, okb = rows_t(t_ptr, rows, row_ok, T_S, S, PAIRED)
    a = coef(sa_ptr, ta, oka, tb, okb, second, PAIRED)
    s = coef(s1ma_ptr, ta, oka, tb, okb, second, PAIRED)
    x0 = tl.load(x0_ptr + data_off(rows, cols, X_S0, X_S1, C, PAIRED), mask=mask, other=0.0).to(tl.float32)
    nz = tl.load(noise_ptr + data_off(rows, cols, N_S0, N_S1, C, PAIRED), mask=mask, other=0.0).to(tl.float32)
    out = a * x0 + s * nz
    tl.store(out_ptr + data_off(rows, cols, C, 1, C, PAIRED), round_to(out, OUT_DTYPE), mask=mask)


@triton.jit
def q_sample_bwd_kernel(
    dx0_ptr, dnoise_ptr, g_ptr, t_ptr, sa_ptr, s1ma_ptr,
    M, S,
    C: tl.constexpr,
    G_S0: tl.constexpr, G_S1: tl.constexpr, T_S: tl.constexpr,
    NEED_X0: tl.constexpr, NEED_NOISE: tl.constexpr,
    X0_DTYPE: tl.constexpr, NOISE_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    PAIRED: tl.constexpr,
):  # fmt: skip
    rows, cols, row_ok, mask, second = stream_tile(BLOCK_M, BLOCK_C, M, C, PAIRED)
    ta, oka, tb, okb = rows_t(t_ptr, rows, row_ok, T_S, S, PAIRED)
    g = tl.load(g_ptr + data_off(rows, cols, G_S0, G_S1, C, PAIRED), mask=mask, other=0.0).to(tl.float32)
    out_off = data_off(rows, cols, C, 1, C, PAIRED)
    if NEED_X0:
        a = coef(sa_ptr, ta, oka, tb, okb, second, PAIRED)
        tl.store(dx0_ptr + out_off, round_to(a * g, X0_DTYPE), mask=mask)
    if NEED_NOISE:
        s = coef(s1ma_ptr, ta, oka, tb, okb, second, PAIRED)
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
    PAIRED: tl.constexpr,
):  # fmt: skip
    rows, cols, row_ok, mask, second = stream_tile(BLOCK_M, BLOCK_C, M, C, PAIRED)
    ta, oka, tb, okb = rows_t(t_ptr, rows, row_ok, T_S, S, PAIRED)
    sra = coef(sra_ptr, ta, oka, tb, okb, second, PAIRED)
    srm1 = coef(srm1_ptr, ta, oka, tb, okb, second, PAIRED)
    c1 = coef(c1_ptr, ta, oka, tb, okb, second, PAIRED)
    c2 = coef(c2_ptr, ta, oka, tb, okb, second, PAIRED)
    lvc = coef(lvc_ptr, ta, oka, tb, okb, second, PAIRED)
    lb = coef(lb_ptr, ta, oka, tb, okb, second, PAIRED)
    live = pick(second, (ta != 0).to(tl.float32), (tb != 0).to(tl.float32), PAIRED)

    eps, v = model_out_halves(mo_ptr, rows, cols, mask, second, MO_S0, MO_S1, C, True, PAIRED)
    xt = tl.load(xt_ptr + data_off(rows, cols, X_S0, X_S1, C, PAIRED), mask=mask, other=0.0).to(tl.float32)
    nz = tl.load(noise_ptr + data_off(rows, cols, N_S0, N_S1, C, PAIRED), mask=mask, other=0.0).to(tl.float32)

    x0p = sra * xt - srm1 * eps
    mean = c1 * x0p + c2 * xt
    frac = (v + 1.0) * 0.5
    logvar = frac * lb + (1.0 - frac) * lvc
    out = mean + live * exp_(0.5 * logvar, ACCURATE) * (nz * temperature)
    # O_S0 may equal X_S0 with out_ptr == xt_ptr: the CUDA-graph sampler updates x in place
    # (every element is read by the program that later overwrites it).
    tl.store(out_ptr + data_off(rows, cols, O_S0, 1, C, PAIRED), round_to(out, OUT_DTYPE), mask=mask)


@triton.jit
def _ddim_coefs(sra_ptr, srm1_ptr, abar_ptr, abar_prev_ptr, t, ok, eta):
    """Per-row (sra, srm1, c_x0, c_eps, sigma), in the reference's order (the same fp32 roundings)."""
    sra = table(sra_ptr, t, ok)
    srm1 = table(srm1_ptr, t, ok)
    abar = table(abar_ptr, t, ok)
    abar_prev = table(abar_prev_ptr, t, ok)
    sigma = eta * tl.sqrt_rn(tl.div_rn(1.0 - abar_prev, 1.0 - abar) * (1.0 - tl.div_rn(abar, abar_prev)))
    c_eps = tl.sqrt_rn(tl.maximum(1.0 - abar_prev - sigma * sigma, 0.0))
    c_x0 = tl.sqrt_rn(abar_prev)
    return sra, srm1, c_x0, c_eps, sigma


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
    PAIRED: tl.constexpr,
):  # fmt: skip
    rows, cols, row_ok, mask, second = stream_tile(BLOCK_M, BLOCK_C, M, C, PAIRED)
    ta, oka, tb, okb = rows_t(t_ptr, rows, row_ok, T_S, S, PAIRED)
    sra_a, srm1_a, cx0_a, ceps_a, sig_a = _ddim_coefs(sra_ptr, srm1_ptr, abar_ptr, abar_prev_ptr, ta, oka, eta)
    if PAIRED:
        sra_b, srm1_b, cx0_b, ceps_b, sig_b = _ddim_coefs(sra_ptr, srm1_ptr, abar_ptr, abar_prev_ptr, tb, okb, eta)
    else:
        sra_b, srm1_b, cx0_b, ceps_b, sig_b = sra_a, srm1_a, cx0_a, ceps_a, sig_a

    eps, _ = model_out_halves(mo_ptr, rows, cols, mask, second, MO_S0, MO_S1, C, False, PAIRED)
    xt = tl.load(xt_ptr + data_off(rows, cols, X_S0, X_S1, C, PAIRED), mask=mask, other=0.0).to(tl.float32)
    x0p = pick(second, sra_a, sra_b, PAIRED) * xt - pick(second, srm1_a, srm1_b, PAIRED) * eps
    out = pick(second, cx0_a, cx0_b, PAIRED) * x0p + pick(second, ceps_a, ceps_b, PAIRED) * eps
    if HAS_NOISE:
        nz = tl.load(noise_ptr + data_off(rows, cols, N_S0, N_S1, C, PAIRED), mask=mask, other=0.0).to(tl.float32)
        live_a = (ta != 0).to(tl.float32)
        live_b = (tb != 0).to(tl.float32)
        out = out + pick(second, live_a * sig_a, live_b * sig_b, PAIRED) * nz
    tl.store(out_ptr + data_off(rows, cols, O_S0, 1, C, PAIRED), round_to(out, OUT_DTYPE), mask=mask)
