"""Pieces shared by the diffusion-decoder kernels: accurate math, rounding, launch shapes.

Accuracy. ``tl.exp``/``tl.log`` lower to the approximate ``ex2``/``lg2`` instructions on
NVIDIA GPUs, whose error grows with ``|x|``; the loss takes ``exp`` of log-variances near
-10 and the tests hold the kernels to twice PyTorch's error, so compiled kernels call
libdevice's ``expf``/``logf`` (PyTorch's error class). The CPU interpreter cannot run
libdevice; it evaluates ``tl.exp`` in numpy, which is exact enough. ``ACCURATE`` (a constexpr argument) picks the path at compile time. Divisions and
square roots that feed outputs use ``tl.div_rn``/``tl.sqrt_rn`` (IEEE rounding, as PyTorch)
rather than Triton's default approximate ``div.full``/``sqrt.approx``.

Strides and widths are ``tl.constexpr`` in every kernel here: the decoder's C = 588 is not a
multiple of 16, so as runtime integers Triton would know nothing about the alignment of a
row start and would emit scalar loads; as constants it proves ``row * 588 + col`` aligned to
4 elements and vectorises (8-byte bf16 / 16-byte fp32 accesses, checked in the PTX); the
streaming kernels tile row pairs to reach 16-byte bf16 accesses (``_diffusion_steps``). A model
uses one or two row shapes, so few variants compile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from invnext.common.interpreter import triton_interpreter

# Triton's CPU interpreter (3.x) truncates fp32 -> bf16 where a GPU rounds to nearest even;
# rounding by hand under the interpreter makes CPU tests see the bits a GPU writes.
_EMULATE_BF16_RNE = tl.constexpr(triton_interpreter())

TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def accurate() -> bool:
    """True when kernels compile for a GPU (libdevice available), False under the interpreter."""
    return not triton_interpreter()


def col_block(width: int, cap: int = 128) -> int:
    """Column tile: the next power of two of ``width``, at most ``cap`` (588 -> 128: 640 lanes, 9% idle)."""
    return min(triton.next_power_of_2(max(width, 1)), cap)


def row_block(block_c: int, elems: int, cap: int = 64) -> int:
    """Rows per tile of about ``elems`` elements: 1 to ``cap`` rows of ``block_c`` columns."""
    return max(1, min(cap, elems // block_c))


def strides2(t: torch.Tensor) -> tuple[int, int]:
    """(row, column) strides of a 2-D tensor; a one-row tensor's row stride is irrelevant and set to 0."""
    s0, s1 = t.stride()
    return (0 if t.shape[0] <= 1 else s0), (0 if t.shape[1] <= 1 else s1)


def stride1(t: torch.Tensor) -> int:
    return 0 if t.shape[0] <= 1 else t.stride(0)


@triton.jit
def exp_(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        return libdevice.exp(x)
    else:
        return tl.exp(x)


@triton.jit
def log_(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def sigmoid_(a, ACCURATE: tl.constexpr):
    # 1 / (1 + e^-a): saturates to exactly 0 or 1 far out, never NaN.
    return tl.div_rn(1.0, 1.0 + exp_(-a, ACCURATE))


@triton.jit
def round_to(val, dtype: tl.constexpr):
    """``val.to(dtype)`` with round-to-nearest-even, also under the interpreter."""
    if _EMULATE_BF16_RNE and dtype == tl.bfloat16 and val.dtype == tl.float32:
        bits = val.to(tl.uint32, bitcast=True)
        half = ((bits >> 16) & 1) + 0x7FFF  # ties go to the even neighbour
        top = (bits + half) >> 16
        top = tl.where(val != val, 0x7FC0, top)  # noqa: PLR0124  (NaN test) keep NaN a quiet NaN
        return top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return val.to(dtype)


@triton.jit
def load_rows_t(t_ptr, rows, row_ok, T_STRIDE: tl.constexpr, S):
    """(t, valid) of a block of rows; a t outside [0, S) is invalid and its tables read as NaN."""
    t = tl.load(t_ptr + rows.to(tl.int64) * T_STRIDE, mask=row_ok, other=0)
    ok = row_ok & (t >= 0) & (t < S)
    return t, ok


@triton.jit
def table(ptr, t, ok):
    """``ptr[t]`` in fp32, NaN for rows whose t is invalid (bad input poisons its row, never memory)."""
    return tl.load(ptr + t, mask=ok, other=float("nan"))


# ---------------------------------------------------------------------------------------
# tiles of rows, or of row pairs (``PAIRED``: see ``_diffusion_steps``)
# ---------------------------------------------------------------------------------------
@triton.jit
def row_tile(BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, M, C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < C)[None, :]
    return rows, cols, row_ok, mask


@triton.jit
def row_off(rows, cols, S0: tl.constexpr, S1: tl.constexpr):
    return rows.to(tl.int64)[:, None] * S0 + cols[None, :] * S1


@triton.jit
def rows_t(t_ptr, rows, row_ok, T_S: tl.constexpr, S, PAIRED: tl.constexpr):
    """(t, valid) of the tile's first rows and, paired, of their second rows (else the same)."""
    if PAIRED:
        ta, oka = load_rows_t(t_ptr, 2 * rows, row_ok, T_S, S)
        tb, okb = load_rows_t(t_ptr, 2 * rows + 1, row_ok, T_S, S)
    else:
        ta, oka = load_rows_t(t_ptr, rows, row_ok, T_S, S)
        tb, okb = ta, oka
    return ta, oka, tb, okb


@triton.jit
def pick(second, a, b, PAIRED: tl.constexpr):
    """Per-row values ``a`` (first rows) / ``b`` (second rows) broadcast over the tile."""
    if PAIRED:
        return tl.where(second[None, :], b[:, None], a[:, None])
    else:
        return a[:, None]


@triton.jit
def coef(ptr, ta, oka, tb, okb, second, PAIRED: tl.constexpr):
    if PAIRED:
        return pick(second, table(ptr, ta, oka), table(ptr, tb, okb), PAIRED)
    else:
        return table(ptr, ta, oka)[:, None]


@triton.jit
def data_off(rows, cols, S0: tl.constexpr, S1: tl.constexpr, C: tl.constexpr, PAIRED: tl.constexpr):
    """Element offsets of an ``[M, C]`` operand: strided rows, or (paired) contiguous row pairs."""
    if PAIRED:
        return rows.to(tl.int64)[:, None] * (2 * C) + cols[None, :]
    else:
        return row_off(rows, cols, S0, S1)


@triton.jit
def model_out_halves(mo_ptr, rows, cols, mask, second, MO_S0: tl.constexpr, MO_S1: tl.constexpr, C: tl.constexpr,
                     NEED_V: tl.constexpr, PAIRED: tl.constexpr):
    """(eps, v) halves of ``model_out [M, 2C]`` in fp32 (v = eps when not NEED_V)."""
    if PAIRED:
        # pair p holds [eps_a | v_a | eps_b | v_b] from p * 4C: first rows read eps at col, v at
        # C + col; second rows (col = C + j) eps at C + col, v at 2C + col.
        base = mo_ptr + rows.to(tl.int64)[:, None] * (4 * C) + cols[None, :]
        first = mask & (cols < C)[None, :]
        latter = mask & second[None, :]
        mid = tl.load(base + C, mask=mask, other=0.0).to(tl.float32)
        eps = tl.where(second[None, :], mid, tl.load(base, mask=first, other=0.0).to(tl.float32))
        if NEED_V:
            v = tl.where(second[None, :], tl.load(base + 2 * C, mask=latter, other=0.0).to(tl.float32), mid)
        else:
            v = eps
    else:
        off = row_off(rows, cols, MO_S0, MO_S1)
        eps = tl.load(mo_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if NEED_V:
            v = tl.load(mo_ptr + off + C * MO_S1, mask=mask, other=0.0).to(tl.float32)
        else:
            v = eps
    return eps, v


@triton.jit
def stream_tile(BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, M, C: tl.constexpr, PAIRED: tl.constexpr):
    """(rows, cols, row_ok, mask, second): ``M`` rows of C, or (paired) ``M`` row pairs of 2C."""
    if PAIRED:
        rows, cols, row_ok, mask = row_tile(BLOCK_M, BLOCK_C, M, 2 * C)
    else:
        rows, cols, row_ok, mask = row_tile(BLOCK_M, BLOCK_C, M, C)
    return rows, cols, row_ok, mask, cols >= C


@triton.jit
def store_model_out_halves(dmo_ptr, rows, cols, mask, second, d_eps, d_v, C: tl.constexpr, DTYPE: tl.constexpr,
                           PAIRED: tl.constexpr):
    """Write ``[d_eps, d_v]`` into a row-contiguous ``[M, 2C]`` (the layout ``model_out_halves`` reads)."""
    if PAIRED:
        base = dmo_ptr + rows.to(tl.int64)[:, None] * (4 * C) + cols[None, :]
        tl.store(base, round_to(d_eps, DTYPE), mask=mask & (cols < C)[None, :])
        tl.store(base + C, round_to(tl.where(second[None, :], d_eps, d_v), DTYPE), mask=mask)
        tl.store(base + 2 * C, round_to(d_v, DTYPE), mask=mask & second[None, :])
    else:
        out = rows.to(tl.int64)[:, None] * (2 * C) + cols[None, :]
        tl.store(dmo_ptr + out, round_to(d_eps, DTYPE), mask=mask)
        tl.store(dmo_ptr + out + C, round_to(d_v, DTYPE), mask=mask)
