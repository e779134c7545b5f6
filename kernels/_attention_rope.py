"""RoPE pre-pass of the fused masked attention: rotate q and k once, before the tile loops.

Rotating inside the key loop (``load_tile_rope`` on every key tile, the ``inline`` mode) costs
a second, column-permuted load and a cos/sin per element of every tile, every time a query block
streams it, and on sm_90 it pushes the forward and both backward kernels past 255 registers:
ptxas spills 0.2-4 KB per thread at head dims 64-128 in bf16 (benchmarks/results/compile_*).
The pre-pass rotates each token once (cos/sin shared by q and k), writes ``q_rot, k_rot``
``[total, H, D]`` in the input dtype - rounded exactly as the inline path rounds its tiles - and
the tile loops then run the RoPE-free code. The backward rotates again (nothing extra is kept
from the forward) and applies ``R^T`` to dq and dk once per output tile, after the loop.
Extra memory traffic: read q, k and write two tensors of their size per pass.

Grid ``(ceil(max_seqlen / BLOCK), H, B)``, the attention kernels' layout: a program rotates
``BLOCK`` rows of one (sample, head); rows past the sample's end exit. Prefix rows are copied
unrotated (their coordinates read as 0: cos 1, sin 0).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._attention_common import cos_sin, load_rope_tables, load_tile, program_block, rope_angles


@triton.jit
def _rotate_rows(X, Y, start64, h, rows, ok, offs_d, partner, c, s, sgn, stride_xt, stride_xh, stride_yt, stride_yh,
                 HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr):
    base = X + start64 * stride_xt + h * stride_xh
    x = load_tile(base + rows[:, None] * stride_xt + offs_d[None, :], ok, offs_d, HEAD_DIM, HEAD_DP, True)
    xp = load_tile(base + rows[:, None] * stride_xt + partner[None, :], ok, offs_d, HEAD_DIM, HEAD_DP, True)
    y = x.to(tl.float32) * c + sgn[None, :] * xp.to(tl.float32) * s
    out = Y + start64 * stride_yt + h * stride_yh + rows[:, None] * stride_yt + offs_d[None, :]
    tl.store(out, y.to(x.dtype), mask=ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit(do_not_specialize=["num_prefix"])
def attn_rope_kernel(
    Q, K, QR, KR, CU, CRD_R, FTAB, PTAB,
    stride_qt, stride_qh: tl.constexpr, stride_kt, stride_kh: tl.constexpr, stride_rt, stride_rh: tl.constexpr, num_prefix,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK: tl.constexpr, FAST_TRIG: tl.constexpr,
):  # fmt: skip
    _, h, _, start, L, r0 = program_block(CU, BLOCK)
    if r0 >= L:
        return
    start64 = start.to(tl.int64)
    rows = r0 + tl.arange(0, BLOCK)
    ok = rows < L
    offs_d = tl.arange(0, HEAD_DP)
    f_t, f_h, f_w, sgn, partner = load_rope_tables(FTAB, PTAB, offs_d, HEAD_DP)
    c, s = cos_sin(rope_angles(CRD_R + start64 * 3, rows, ok, num_prefix, f_t, f_h, f_w), FAST_TRIG)
    _rotate_rows(Q, QR, start64, h, rows, ok, offs_d, partner, c, s, sgn, stride_qt, stride_qh, stride_rt, stride_rh,
                 HEAD_DIM, HEAD_DP)
    _rotate_rows(K, KR, start64, h, rows, ok, offs_d, partner, c, s, sgn, stride_kt, stride_kh, stride_rt, stride_rh,
                 HEAD_DIM, HEAD_DP)


@triton.jit(do_not_specialize=["total"])
def rope_table_kernel(
    X, Y, COS, SIN, total, stride_xt, stride_xh, stride_yt, stride_yh, stride_ct, stride_st,
    WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK: tl.constexpr,
    INTERLEAVED: tl.constexpr, TRANSPOSE: tl.constexpr,
):  # fmt: skip
    """RoPE from precomputed per-token tables (``varlen_attention``'s ``rope``): ``BLOCK`` tokens
    of one head. Channel ``c < WIDTH`` pairs with ``c +- WIDTH/2`` (rotate-half) or ``c ^ 1``
    (``INTERLEAVED``), sign -1 on a pair's first channel::

        y[c] = x[c] cos[c] + sign[c] x[partner] sin[c]               (rotation R)
        y[c] = x[c] cos[c] - sign[c] x[partner] sin[partner]         (``TRANSPOSE``: R^T, the backward)

    in fp32, rounded to the output dtype; channels past ``WIDTH`` pass through (cos 1, sin 0)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = (pid * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = rows < total
    offs_d = tl.arange(0, HEAD_DP)
    rot = offs_d < WIDTH
    if INTERLEAVED:
        first = offs_d % 2 == 0
        partner = offs_d ^ 1
    else:
        first = offs_d < WIDTH // 2
        partner = tl.where(first, offs_d + WIDTH // 2, offs_d - WIDTH // 2)
    partner = tl.where(rot, partner, offs_d)
    sgn = tl.where(first, -1.0, 1.0)
    tab = ok[:, None] & rot[None, :]
    c = tl.load(COS + rows[:, None] * stride_ct + offs_d[None, :], mask=tab, other=1.0).to(tl.float32)
    if TRANSPOSE:
        s = tl.load(SIN + rows[:, None] * stride_st + partner[None, :], mask=tab, other=0.0).to(tl.float32)
        sgn = -sgn
    else:
        s = tl.load(SIN + rows[:, None] * stride_st + offs_d[None, :], mask=tab, other=0.0).to(tl.float32)
    base = X + h * stride_xh + rows[:, None] * stride_xt
    x = load_tile(base + offs_d[None, :], ok, offs_d, HEAD_DIM, HEAD_DP, True)
    xp = load_tile(base + partner[None, :], ok, offs_d, HEAD_DIM, HEAD_DP, True)
    y = x.to(tl.float32) * c + sgn[None, :] * xp.to(tl.float32) * s
    out = Y + h * stride_yh + rows[:, None] * stride_yt + offs_d[None, :]
    tl.store(out, y.to(Y.dtype.element_ty), mask=ok[:, None] & (offs_d[None, :] < HEAD_DIM))
