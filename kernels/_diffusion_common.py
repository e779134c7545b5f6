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

from invnext.ops._dispatch import triton_interpreter

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
