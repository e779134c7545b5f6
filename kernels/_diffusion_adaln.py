"""Adaptive LayerNorm ``LN(x) * (1 + scale) + shift`` forward and backward, a row per lane group.

Per row of width W (fp32 math, biased variance as ``F.layer_norm``)::

    mean = sum_w x / W,   rstd = 1 / sqrt(sum_w (x - mean)^2 / W + eps),   xhat = (x - mean) rstd
    y    = xhat (1 + scale) + shift

    backward, gy = dy (1 + scale):
    dx     = rstd (gy - mean_w gy - xhat mean_w (gy xhat))
    dscale = dy xhat,     dshift = dy          (per element; broadcast rows are summed by autograd)

A program holds ``BLOCK_M`` whole rows in registers (``BLOCK_W`` = next power of two of W),
so x is read once and the variance is the exact two-pass one. ``shift``/``scale`` come with
their own (constexpr) strides: a row stride of 0 is a modulation shared by every row, read
from cache instead of memory. The forward stores mean and rstd (fp32 [M]) for the backward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._diffusion_common import round_to, row_off


@triton.jit
def _row_tile(M, W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
    """(rows, cols, row_ok, mask) of a program's ``BLOCK_M`` whole rows."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_W)
    row_ok = rows < M
    return rows, cols, row_ok, row_ok[:, None] & (cols < W)[None, :]


@triton.jit
def _load_rows(ptr, rows, cols, mask, S0: tl.constexpr, S1: tl.constexpr):
    # The pointer takes the row step, then the column step (not ``row_off``'s summed offset):
    # on sm_90 the summed form compiles to other SASS and register counts.
    return tl.load(ptr + rows.to(tl.int64)[:, None] * S0 + cols[None, :] * S1, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def adaln_fwd_kernel(
    y_ptr, mean_ptr, rstd_ptr, x_ptr, shift_ptr, scale_ptr,
    M, eps,
    W: tl.constexpr,
    X_S0: tl.constexpr, X_S1: tl.constexpr, SH_S0: tl.constexpr, SH_S1: tl.constexpr,
    SC_S0: tl.constexpr, SC_S1: tl.constexpr,
    Y_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    rows, cols, row_ok, mask = _row_tile(M, W, BLOCK_M, BLOCK_W)
    x = _load_rows(x_ptr, rows, cols, mask, X_S0, X_S1)
    mean = tl.sum(x, axis=1) * (1.0 / W)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) * (1.0 / W)
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    sh = _load_rows(shift_ptr, rows, cols, mask, SH_S0, SH_S1)
    sc = _load_rows(scale_ptr, rows, cols, mask, SC_S0, SC_S1)
    y = xc * rstd[:, None] * (1.0 + sc) + sh
    tl.store(y_ptr + row_off(rows, cols, W, 1), round_to(y, Y_DTYPE), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def adaln_bwd_kernel(
    dx_ptr, dscale_ptr, dy_ptr, x_ptr, scale_ptr, mean_ptr, rstd_ptr,
    M,
    W: tl.constexpr,
    DY_S0: tl.constexpr, DY_S1: tl.constexpr, X_S0: tl.constexpr, X_S1: tl.constexpr,
    SC_S0: tl.constexpr, SC_S1: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DSCALE: tl.constexpr,
    DX_DTYPE: tl.constexpr, DSCALE_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    rows, cols, row_ok, mask = _row_tile(M, W, BLOCK_M, BLOCK_W)
    out = row_off(rows, cols, W, 1)
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)[:, None]
    x = _load_rows(x_ptr, rows, cols, mask, X_S0, X_S1)
    dy = _load_rows(dy_ptr, rows, cols, mask, DY_S0, DY_S1)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    if NEED_DSCALE:
        tl.store(dscale_ptr + out, round_to(dy * xhat, DSCALE_DTYPE), mask=mask)
    if NEED_DX:
        sc = _load_rows(scale_ptr, rows, cols, mask, SC_S0, SC_S1)
        gy = dy * (1.0 + sc)
        mean_gy = tl.sum(gy, axis=1) * (1.0 / W)
        mean_gyx = tl.sum(gy * xhat, axis=1) * (1.0 / W)
        dx = rstd * (gy - mean_gy[:, None] - xhat * mean_gyx[:, None])
        tl.store(dx_ptr + out, round_to(dx, DX_DTYPE), mask=mask)
