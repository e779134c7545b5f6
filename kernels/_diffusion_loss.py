"""The decoder's hybrid loss (eps MSE + variational bound) in one pass, and its backward.

Per row (C channels, model_out = [eps, v], tables read at the row's t, fp32 throughout)::

    mse     = mean_c (noise - eps)^2
    x0p     = sra x_t - srm1 eps                 (eps detached below this line)
    mean    = c1 x0p + c2 x_t                    mean_q = c1 x0 + c2 x_t  =>  mean_q - mean = c1 (x0 - x0p)
    dl      = frac (lb - lvc),  logvar = lvc + dl,    frac = (v + 1) / 2
    t > 0:  kl  = 0.5 (-1 + dl + exp(-dl) + (mean_q - mean)^2 exp(-logvar))        (logvar_q = lvc)
    t = 0:  nll = -log P(bin of x0 | mean, logvar), the CDF approximated by
                  Phi(y) ~ 0.5 (1 + tanh(k (y + 0.044715 y^3))) = sigmoid(2k (y + 0.044715 y^3)),  k = sqrt(2/pi)
                  y+- = exp(-logvar/2) (x0 - mean +- 1/255)
                  log P = log max(Phi(y+), 1e-12)            x0 < -0.999
                          log max(1 - Phi(y-), 1e-12)        x0 >  0.999
                          log max(Phi(y+) - Phi(y-), 1e-12)  otherwise
    loss    = mse + mean_c (kl or nll) / ln 2

The sigmoid form is the same function as the tanh form, evaluated without the cancellation of
``1 + tanh`` in the lower tail and of ``Phi(y+) - Phi(y-)`` near 1 (taken as
``(1 - Phi(y-)) - (1 - Phi(y+))`` there), so the kernel is at least as accurate as the
float32 reference wherever the clamps are not active, and agrees with it where they are.

Backward for an incoming ``g[M]`` (the loss is linear in each element's term)::

    d eps = g 2 (eps - noise) / C                                        (from the MSE only)
    d v   = g / (C ln 2) * d(term)/d(logvar) * (lb - lvc) / 2            (from vb only)
    dkl/dlogvar  = 0.5 (1 - exp(-dl) - (mean_q - mean)^2 exp(-logvar))
    dnll/dlogvar = -dlogP/dlogvar, with dy/dlogvar = -y/2 and dPhi/dy = s (1 - s) 2k (1 + 3 0.044715 y^2),
                   s = sigmoid(2k (y + 0.044715 y^3)); a clamped log has zero gradient (as torch.clamp).

Nothing is saved for backward but the inputs (references, no copies): the backward kernel
recomputes the row's terms. The NLL branch runs only in tiles that hold a t = 0 row.

Accuracy details that matter at the 1-ulp level (PyTorch's fp32 loss on a GPU is often within
half an ulp of the fp64 value): ``exp(-logvar)`` is ``exp(-dl)`` times the row constant
``exp(-lvc)`` carried as an fp32 pair (no coherent per-row rounding), and the row sums
are combined and scaled by ``1/(C ln 2)`` in fp64.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._diffusion_common import (
    data_off,
    exp_,
    log_,
    model_out_halves,
    pick,
    rows_t,
    sigmoid_,
    store_model_out_halves,
    stream_tile,
    table,
)

# Constants are written out inside the jit functions (Triton reads no Python globals):
# 0.7978845608028654 = sqrt(2/pi), 1.4426950408889634 = 1/ln 2, 1/255 = half a pixel bin.


@triton.jit
def _logit(y):
    # tanh(u) = 2 sigmoid(2u) - 1, so 0.5 (1 + tanh(k u)) = sigmoid(2k u)
    return 2.0 * 0.7978845608028654 * (y + 0.044715 * y * y * y)


@triton.jit
def _dlogit_dlogvar(y):
    # d logit(y) / d logvar with dy/dlogvar = -y / 2
    return 2.0 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * y * y) * (-0.5 * y)


@triton.jit
def _nll_bin(x0, cx, inv_std, ACCURATE: tl.constexpr):
    """(-log P, d(-log P)/d logvar) of x0's 8-bit bin, element-wise."""
    yp = inv_std * (cx + 1.0 / 255.0)
    ym = inv_std * (cx - 1.0 / 255.0)
    ap = _logit(yp)
    am = _logit(ym)
    cdf_p = sigmoid_(ap, ACCURATE)  # Phi(y+)
    sf_p = sigmoid_(-ap, ACCURATE)  # 1 - Phi(y+)
    cdf_m = sigmoid_(am, ACCURATE)  # Phi(y-)
    sf_m = sigmoid_(-am, ACCURATE)  # 1 - Phi(y-)
    # Subtract the two small tail masses, never two numbers near 1.
    delta = tl.where(am > 0.0, sf_m - sf_p, cdf_p - cdf_m)
    lo = x0 < -0.999
    hi = x0 > 0.999
    arg = tl.where(lo, cdf_p, tl.where(hi, sf_m, delta))
    live = arg >= 1e-12  # torch.clamp(min=) passes the gradient where input >= min
    log_p = log_(tl.maximum(arg, 1e-12), ACCURATE)
    # dPhi(y)/dlogvar = s (1 - s) dlogit/dlogvar
    dcdf_p = cdf_p * sf_p * _dlogit_dlogvar(yp)
    dcdf_m = cdf_m * sf_m * _dlogit_dlogvar(ym)
    dlog_lo = sf_p * _dlogit_dlogvar(yp)  # (dPhi(y+)/dlv) / Phi(y+)
    dlog_hi = -cdf_m * _dlogit_dlogvar(ym)  # (-dPhi(y-)/dlv) / (1 - Phi(y-))
    # (guarded for lanes of the edge branches, where delta may be 0 and is not used)
    dlog_mid = tl.div_rn(dcdf_p - dcdf_m, tl.where(delta >= 1e-12, delta, 1.0))
    dlog_p = tl.where(lo, dlog_lo, tl.where(hi, dlog_hi, dlog_mid))
    dlog_p = tl.where(live, dlog_p, 0.0)
    return -log_p, -dlog_p


@triton.jit
def _row_consts(sra_ptr, srm1_ptr, c1_ptr, c2_ptr, lvc_ptr, lb_ptr, t, ok, ACCURATE: tl.constexpr):
    """Per-row tables at t: (sra, srm1, c1, c2, lvc, half_gap = d logvar / d v, exp(-lvc) as hi + lo)."""
    sra = table(sra_ptr, t, ok)
    srm1 = table(srm1_ptr, t, ok)
    c1 = table(c1_ptr, t, ok)
    c2 = table(c2_ptr, t, ok)
    lvc = table(lvc_ptr, t, ok)
    half_gap = 0.5 * (table(lb_ptr, t, ok) - lvc)
    e64 = exp_(-lvc.to(tl.float64), ACCURATE)
    e_hi = e64.to(tl.float32)
    e_lo = (e64 - e_hi.to(tl.float64)).to(tl.float32)
    return sra, srm1, c1, c2, lvc, half_gap, e_hi, e_lo


@triton.jit
def _tile_rows(t_ptr, rows, row_ok, T_S: tl.constexpr, S, sra_ptr, srm1_ptr, c1_ptr, c2_ptr, lvc_ptr, lb_ptr,
               ACCURATE: tl.constexpr, PAIRED: tl.constexpr):  # fmt: skip
    """A tile's timesteps (first rows, second rows), whether any is 0, and both rows' tables
    (``_row_consts``; unpaired, the first rows' stand in for the second, unread)."""
    t_a, ok_a, t_b, ok_b = rows_t(t_ptr, rows, row_ok, T_S, S, PAIRED)
    any0 = tl.max((((t_a == 0) | (t_b == 0)) & row_ok).to(tl.int32)) > 0
    sra_a, srm1_a, c1_a, c2_a, lvc_a, hg_a, eh_a, el_a = _row_consts(
        sra_ptr, srm1_ptr, c1_ptr, c2_ptr, lvc_ptr, lb_ptr, t_a, ok_a, ACCURATE)
    if PAIRED:
        sra_b, srm1_b, c1_b, c2_b, lvc_b, hg_b, eh_b, el_b = _row_consts(
            sra_ptr, srm1_ptr, c1_ptr, c2_ptr, lvc_ptr, lb_ptr, t_b, ok_b, ACCURATE)
    else:
        sra_b, srm1_b, c1_b, c2_b, lvc_b, hg_b, eh_b, el_b = sra_a, srm1_a, c1_a, c2_a, lvc_a, hg_a, eh_a, el_a
    return (t_a, t_b, any0, sra_a, srm1_a, c1_a, c2_a, lvc_a, hg_a, eh_a, el_a,
            sra_b, srm1_b, c1_b, c2_b, lvc_b, hg_b, eh_b, el_b)  # fmt: skip


@triton.jit
def _tile_terms(
    mo_ptr, x0_ptr, xt_ptr, nz_ptr, rows, cols, mask, second, t_a, t_b, row_ok, any0,
    sra_a, srm1_a, c1_a, c2_a, lvc_a, hg_a, eh_a, el_a, sra_b, srm1_b, c1_b, c2_b, lvc_b, hg_b, eh_b, el_b,
    C: tl.constexpr, MO_S0: tl.constexpr, MO_S1: tl.constexpr, X0_S0: tl.constexpr, X0_S1: tl.constexpr,
    XT_S0: tl.constexpr, XT_S1: tl.constexpr, N_S0: tl.constexpr, N_S1: tl.constexpr,
    ACCURATE: tl.constexpr, PAIRED: tl.constexpr,
):  # fmt: skip
    """Element terms of one tile: (eps - noise, vb term, d term / d logvar, half_gap).

    The forward kernel ignores the derivative and the backward the term; the compiler drops
    the dead half of each.
    """
    eps, v = model_out_halves(mo_ptr, rows, cols, mask, second, MO_S0, MO_S1, C, True, PAIRED)
    x0 = tl.load(x0_ptr + data_off(rows, cols, X0_S0, X0_S1, C, PAIRED), mask=mask, other=0.0).to(tl.float32)
    xt = tl.load(xt_ptr + data_off(rows, cols, XT_S0, XT_S1, C, PAIRED), mask=mask, other=0.0).to(tl.float32)
    nz = tl.load(nz_ptr + data_off(rows, cols, N_S0, N_S1, C, PAIRED), mask=mask, other=0.0).to(tl.float32)
    sra = pick(second, sra_a, sra_b, PAIRED)
    srm1 = pick(second, srm1_a, srm1_b, PAIRED)
    c1 = pick(second, c1_a, c1_b, PAIRED)
    c2 = pick(second, c2_a, c2_b, PAIRED)
    lvc = pick(second, lvc_a, lvc_b, PAIRED)
    half_gap = pick(second, hg_a, hg_b, PAIRED)
    e_lvc_hi = pick(second, eh_a, eh_b, PAIRED)
    e_lvc_lo = pick(second, el_a, el_b, PAIRED)
    is0 = pick(second, (t_a == 0) & row_ok, (t_b == 0) & row_ok, PAIRED)

    diff = eps - nz
    x0p = sra * xt - srm1 * eps
    mean = c1 * x0p + c2 * xt
    dmean = c1 * (x0 - x0p)  # mean_q - mean
    dl = (v + 1.0) * half_gap  # logvar - logvar_q
    logvar = lvc + dl
    e_dl = exp_(-dl, ACCURATE)
    # exp(-logvar) = exp(-lvc) exp(-dl): one exp per element instead of two. exp(-lvc) is a
    # per-row constant, so its rounding would bias a whole row coherently: it is carried as
    # an fp32 pair hi + lo of the fp64 value, and the product is exact to fp32 rounding.
    e_lv = e_dl * e_lvc_hi + e_dl * e_lvc_lo
    term = 0.5 * (-1.0 + dl + e_dl + dmean * dmean * e_lv)
    dterm = 0.5 * (1.0 - e_dl - dmean * dmean * e_lv)
    if any0:
        # Rows with t > 0 evaluate the likelihood at a harmless point (cx = 0), as the reference.
        cx = tl.where(is0, x0 - mean, 0.0)
        nll, dnll = _nll_bin(x0, cx, exp_(-0.5 * logvar, ACCURATE), ACCURATE)
        term = tl.where(is0, nll, term)
        dterm = tl.where(is0, dnll, dterm)
    term = tl.where(mask, term, 0.0)
    return diff, term, dterm, half_gap


@triton.jit
def _split_sum(x, second, PAIRED: tl.constexpr):
    """Row sums of a tile in fp64: (first rows, second rows); unpaired, the second is 0."""
    if PAIRED:
        a = tl.sum(tl.where(second[None, :], 0.0, x), axis=1).to(tl.float64)
        b = tl.sum(tl.where(second[None, :], x, 0.0), axis=1).to(tl.float64)
    else:
        a = tl.sum(x, axis=1).to(tl.float64)
        b = tl.zeros_like(a)
    return a, b


@triton.jit
def loss_fwd_kernel(
    loss_ptr, mo_ptr, x0_ptr, xt_ptr, nz_ptr, t_ptr,
    sra_ptr, srm1_ptr, c1_ptr, c2_ptr, lvc_ptr, lb_ptr,
    M, S,
    C: tl.constexpr, MO_S0: tl.constexpr, MO_S1: tl.constexpr, X0_S0: tl.constexpr, X0_S1: tl.constexpr,
    XT_S0: tl.constexpr, XT_S1: tl.constexpr, N_S0: tl.constexpr, N_S1: tl.constexpr, T_S: tl.constexpr,
    ACCURATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, PAIRED: tl.constexpr, WIDTH: tl.constexpr,
):  # fmt: skip
    """``M`` rows of ``WIDTH = C`` (``PAIRED``: row pairs, ``WIDTH = 2C``), all columns per program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    (t_a, t_b, any0, sra_a, srm1_a, c1_a, c2_a, lvc_a, hg_a, eh_a, el_a,
     sra_b, srm1_b, c1_b, c2_b, lvc_b, hg_b, eh_b, el_b) = _tile_rows(
        t_ptr, rows, row_ok, T_S, S, sra_ptr, srm1_ptr, c1_ptr, c2_ptr, lvc_ptr, lb_ptr, ACCURATE, PAIRED)

    # Row sums: fp32 within a chunk, fp64 across chunks and for the final scaling, so no
    # rounding of 1/C or 1/ln 2 (coherent over a row) reaches the loss.
    mse_a = tl.zeros([BLOCK_M], dtype=tl.float64)
    vb_a = tl.zeros([BLOCK_M], dtype=tl.float64)
    mse_b = tl.zeros([BLOCK_M], dtype=tl.float64)
    vb_b = tl.zeros([BLOCK_M], dtype=tl.float64)
    for c0 in tl.static_range(0, WIDTH, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        if c0 + BLOCK_C <= WIDTH:  # an interior chunk: only the row mask
            mask = row_ok[:, None] & (cols >= 0)[None, :]
        else:
            mask = row_ok[:, None] & (cols < WIDTH)[None, :]
        second = cols >= C
        diff, term, _, _ = _tile_terms(
            mo_ptr, x0_ptr, xt_ptr, nz_ptr, rows, cols, mask, second, t_a, t_b, row_ok, any0,
            sra_a, srm1_a, c1_a, c2_a, lvc_a, hg_a, eh_a, el_a, sra_b, srm1_b, c1_b, c2_b, lvc_b, hg_b, eh_b, el_b,
            C, MO_S0, MO_S1, X0_S0, X0_S1, XT_S0, XT_S1, N_S0, N_S1, ACCURATE, PAIRED,
        )  # fmt: skip
        sq_a, sq_b = _split_sum(diff * diff, second, PAIRED)
        tm_a, tm_b = _split_sum(term, second, PAIRED)
        mse_a += sq_a
        mse_b += sq_b
        vb_a += tm_a
        vb_b += tm_b
    loss_a = ((mse_a + vb_a * 1.4426950408889634) / C).to(tl.float32)
    if PAIRED:
        loss_b = ((mse_b + vb_b * 1.4426950408889634) / C).to(tl.float32)
        tl.store(loss_ptr + 2 * rows, loss_a, mask=row_ok)
        tl.store(loss_ptr + 2 * rows + 1, loss_b, mask=row_ok)
    else:
        tl.store(loss_ptr + rows, loss_a, mask=row_ok)


@triton.jit
def loss_bwd_kernel(
    dmo_ptr, g_ptr, mo_ptr, x0_ptr, xt_ptr, nz_ptr, t_ptr,
    sra_ptr, srm1_ptr, c1_ptr, c2_ptr, lvc_ptr, lb_ptr,
    M, S,
    C: tl.constexpr, MO_S0: tl.constexpr, MO_S1: tl.constexpr, X0_S0: tl.constexpr, X0_S1: tl.constexpr,
    XT_S0: tl.constexpr, XT_S1: tl.constexpr, N_S0: tl.constexpr, N_S1: tl.constexpr, T_S: tl.constexpr,
    G_S: tl.constexpr, DMO_DTYPE: tl.constexpr, ACCURATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    PAIRED: tl.constexpr,
):  # fmt: skip
    rows, cols, row_ok, mask, second = stream_tile(BLOCK_M, BLOCK_C, M, C, PAIRED)
    (t_a, t_b, any0, sra_a, srm1_a, c1_a, c2_a, lvc_a, hg_a, eh_a, el_a,
     sra_b, srm1_b, c1_b, c2_b, lvc_b, hg_b, eh_b, el_b) = _tile_rows(
        t_ptr, rows, row_ok, T_S, S, sra_ptr, srm1_ptr, c1_ptr, c2_ptr, lvc_ptr, lb_ptr, ACCURATE, PAIRED)
    if PAIRED:
        g_a = tl.load(g_ptr + (2 * rows).to(tl.int64) * G_S, mask=row_ok, other=0.0).to(tl.float32)
        g_b = tl.load(g_ptr + (2 * rows + 1).to(tl.int64) * G_S, mask=row_ok, other=0.0).to(tl.float32)
    else:
        g_a = tl.load(g_ptr + rows.to(tl.int64) * G_S, mask=row_ok, other=0.0).to(tl.float32)
        g_b = g_a
    g = pick(second, g_a, g_b, PAIRED)

    diff, _, dterm, half_gap = _tile_terms(
        mo_ptr, x0_ptr, xt_ptr, nz_ptr, rows, cols, mask, second, t_a, t_b, row_ok, any0,
        sra_a, srm1_a, c1_a, c2_a, lvc_a, hg_a, eh_a, el_a, sra_b, srm1_b, c1_b, c2_b, lvc_b, hg_b, eh_b, el_b,
        C, MO_S0, MO_S1, X0_S0, X0_S1, XT_S0, XT_S1, N_S0, N_S1, ACCURATE, PAIRED,
    )  # fmt: skip
    d_eps = g * (2.0 / C) * diff
    d_v = g * (1.4426950408889634 / C) * dterm * half_gap
    store_model_out_halves(dmo_ptr, rows, cols, mask, second, d_eps, d_v, C, DMO_DTYPE, PAIRED)
