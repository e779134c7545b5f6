"""Backward kernels of the fused masked attention (FlashAttention-2 scheme, no atomics).

With ``S = scale * Q K^T`` (rotated q, k), ``P = exp(S - lse)`` recomputed from the saved
logsumexp, ``dO`` the output gradient and ``delta_i = sum_d dO_id O_id``::

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q

then ``dq, dk`` go back through the transposed rotation. Three kernels:

* ``attn_bwd_delta_kernel``: ``delta`` for every (head, token), fp32.
* ``attn_bwd_dkdv_kernel``: a program owns one key block, keeps its k, v and the dk, dv
  accumulators on chip, and streams the query blocks that can see it.
* ``attn_bwd_dq_kernel``: a program owns one query block and streams key blocks, like the
  forward. Every output element is written by exactly one program in a fixed order, so the
  backward is deterministic (bitwise reproducible) without a separate mode.

Rows past a sample's end load as zeros with ``lse = +inf``, so their ``P`` is exactly 0 and
the key-block kernel needs no score mask on boundary tiles; window and band tiles are masked.
Rows that saw no key in the forward carry ``lse = +inf`` too (``_attention_fwd``): ``P = 0``.

GQA / MQA: the dk/dv kernel runs one program per key block and *key/value* head, and walks the
``group`` query heads that share it (``h = kv_head * group + g``) one after the other, so the
sum over the group stays on chip and the kernel keeps writing each dk, dv element once.
An upstream gradient of the logsumexp (``dlse``, natural log) enters as ``delta - dlse``:
``d lse_i / d S_ij = P_ij``, so ``dS = P * (dP - delta + dlse)``; the launcher folds it in.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._attention_common import (
    NO_SPECIALIZE,
    band_ok,
    band_shifts,
    block_rows,
    block_window,
    load_tile,
    load_tile_rope,
    mma,
    program_blocks,
    rope_tables_or_identity,
    rope_transpose,
    stream_tile,
    tile_counts,
    tile_span,
    tile_visible,
    window_ok,
)


@triton.jit
def attn_bwd_delta_kernel(
    O, DO, DELTA, stride_ot, stride_oh: tl.constexpr, stride_dt, stride_dh: tl.constexpr, total,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DP)
    ok = rows < total
    rows64 = rows.to(tl.int64)
    o = load_tile(O + h * stride_oh + rows64[:, None] * stride_ot + offs_d[None, :], ok, offs_d, HEAD_DIM, HEAD_DP, True)
    do = load_tile(DO + h * stride_dh + rows64[:, None] * stride_dt + offs_d[None, :], ok, offs_d, HEAD_DIM, HEAD_DP, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h.to(tl.int64) * total + rows64, delta, mask=ok)


@triton.jit
def _dkdv_tiles(
    dk, dv, k, v, own, q_base, do_base, stride_qt, stride_dot, lse_ptr, delta_ptr, crd_r, crd_w, L,
    span, list_ptr, offs_d, rope, qk_scale, num_prefix, rad_t, rad_h, rad_w, band,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, FAST_TRIG: tl.constexpr,
    IS_BAND: tl.constexpr,
):
    lo, hi = tile_span(span, L, BLOCK_M, MASKED, HAS_WINDOW, IS_BAND)
    for it in range(lo, hi):
        offs_m, m_ok, q, do = stream_tile(
            list_ptr, it, span, L, q_base, do_base, stride_qt, stride_dot, crd_r, offs_d, rope, num_prefix,
            HEAD_DIM, HEAD_DP, BLOCK_M, MASKED, HAS_WINDOW, HAS_ROPE, FAST_TRIG, IS_BAND,
        )
        if MASKED:
            lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
        else:
            lse = tl.load(lse_ptr + offs_m)
            delta = tl.load(delta_ptr + offs_m)
        s_t = mma(k, tl.trans(q), None, DOT_PREC)  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        if MASKED and HAS_WINDOW:
            # The visibility rule is symmetric in (query, key): keys take the first slot.
            ok = window_ok(own, crd_w, offs_m, m_ok, num_prefix, rad_t, rad_h, rad_w)
            p_t = tl.where(ok, p_t, 0.0)
        if MASKED and IS_BAND:  # own rows are keys here (``band`` of the key-owned side)
            p_t = tl.where(band_ok(own[1], offs_m, m_ok, band), p_t, 0.0)
        dv = mma(p_t.to(do.dtype), do, dv, DOT_PREC)
        dp_t = mma(v, tl.trans(do), None, DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma(ds_t.to(q.dtype), q, dk, DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K, CRD_R, CRD_W, FTAB, PTAB, PMAT,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
    stride_qt, stride_qh: tl.constexpr, stride_kt, stride_kh: tl.constexpr, stride_vt, stride_vh: tl.constexpr,
    stride_dot, stride_doh: tl.constexpr, stride_dkt, stride_dkh: tl.constexpr, stride_dvt, stride_dvh: tl.constexpr,
    total, num_heads, group, qk_scale, sm_scale, num_prefix, rad_t, rad_h, rad_w, band_left, band_right,
    list_nk, list_nq,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    FAST_TRIG: tl.constexpr, ROPE_OUT: tl.constexpr, IS_BAND: tl.constexpr,
):
    # program_id(1) is the key/value head; its queries are the ``group`` heads from kvh * group.
    pid_n, kvh, b, start, L, q_start, Lq, n0 = program_blocks(CU_K, CU_Q, BLOCK_N)
    if n0 >= L:
        return
    start64, offs_n, offs_d, n_ok = block_rows(start, n0, L, BLOCK_N, HEAD_DP)
    q_start64 = q_start.to(tl.int64)
    crd_r = CRD_R + start64 * 3
    crd_w = CRD_W + start64 * 3
    crd_rq = CRD_R + q_start64 * 3
    crd_wq = CRD_W + q_start64 * 3
    rope = rope_tables_or_identity(FTAB, PTAB, offs_d, HEAD_DP, HAS_ROPE)
    k = load_tile_rope(K + start64 * stride_kt + kvh * stride_kh, offs_n, n_ok, offs_d, stride_kt, crd_r, num_prefix,
                       rope, HEAD_DIM, HEAD_DP, True, HAS_ROPE, FAST_TRIG)
    v = load_tile(V + start64 * stride_vt + kvh * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                  n_ok, offs_d, HEAD_DIM, HEAD_DP, True)
    own = block_window(crd_w, offs_n, n_ok, num_prefix, HAS_WINDOW)
    band = band_shifts(L - Lq, band_left, band_right, True)

    dk = tl.zeros([BLOCK_N, HEAD_DP], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DP], dtype=tl.float32)
    span = tile_counts(FULL_CNT, PART_CNT, b * list_nk + pid_n, list_nq, Lq, n0, L, band, BLOCK_N, BLOCK_M,
                       HAS_WINDOW, IS_BAND)
    for g in range(group):
        h = kvh * group + g
        q_base = Q + q_start64 * stride_qt + h * stride_qh
        do_base = DO + q_start64 * stride_dot + h * stride_doh
        lse_ptr = LSE + h.to(tl.int64) * total + q_start64
        delta_ptr = DELTA + h.to(tl.int64) * total + q_start64
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, own, q_base, do_base, stride_qt, stride_dot, lse_ptr, delta_ptr, crd_rq, crd_wq, Lq,
            span, FULL_IDX + span[2], offs_d, rope, qk_scale, num_prefix, rad_t, rad_h, rad_w, band,
            HEAD_DIM, HEAD_DP, BLOCK_M, False, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG, IS_BAND,
        )
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, own, q_base, do_base, stride_qt, stride_dot, lse_ptr, delta_ptr, crd_rq, crd_wq, Lq,
            span, PART_IDX + span[2], offs_d, rope, qk_scale, num_prefix, rad_t, rad_h, rad_w, band,
            HEAD_DIM, HEAD_DP, BLOCK_M, True, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG, IS_BAND,
        )

    dk = dk * sm_scale
    if ROPE_OUT:  # R^T once per tile, after the loop
        dk = rope_transpose(dk, FTAB, PTAB, PMAT, crd_r, offs_n, n_ok, offs_d, num_prefix, HEAD_DP, FAST_TRIG)
    st_mask = n_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = DK + start64 * stride_dkt + kvh * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + start64 * stride_dvt + kvh * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, own, k_base, v_base, stride_kt, stride_vt, crd_r, crd_w, L, span, list_ptr,
    offs_d, rope, qk_scale, num_prefix, rad_t, rad_h, rad_w, band,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, FAST_TRIG: tl.constexpr,
    IS_BAND: tl.constexpr,
):
    lo, hi = tile_span(span, L, BLOCK_N, MASKED, HAS_WINDOW, IS_BAND)
    for it in range(lo, hi):
        offs_n, n_ok, k, v = stream_tile(
            list_ptr, it, span, L, k_base, v_base, stride_kt, stride_vt, crd_r, offs_d, rope, num_prefix,
            HEAD_DIM, HEAD_DP, BLOCK_N, MASKED, HAS_WINDOW, HAS_ROPE, FAST_TRIG, IS_BAND,
        )
        s = mma(q, tl.trans(k), None, DOT_PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            ok = tile_visible(own, crd_w, offs_n, n_ok, num_prefix, rad_t, rad_h, rad_w, band, HAS_WINDOW, IS_BAND)
            p = tl.where(ok, p, 0.0)
        dp = mma(do, tl.trans(v), None, DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(k.dtype), k, dq, DOT_PREC)
    return dq


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K, CRD_R, CRD_W, FTAB, PTAB, PMAT,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
    stride_qt, stride_qh: tl.constexpr, stride_kt, stride_kh: tl.constexpr, stride_vt, stride_vh: tl.constexpr,
    stride_dot, stride_doh: tl.constexpr, stride_dqt, stride_dqh: tl.constexpr,
    total, num_heads, group, qk_scale, sm_scale, num_prefix, rad_t, rad_h, rad_w, band_left, band_right,
    list_nq, list_nk,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    FAST_TRIG: tl.constexpr, ROPE_OUT: tl.constexpr, IS_BAND: tl.constexpr,
):
    pid_m, h, b, start, L, k_start, Lk, m0 = program_blocks(CU_Q, CU_K, BLOCK_M)
    if m0 >= L:
        return
    start64, offs_m, offs_d, m_ok = block_rows(start, m0, L, BLOCK_M, HEAD_DP)
    k_start64 = k_start.to(tl.int64)
    kvh = h // group
    crd_r = CRD_R + start64 * 3
    crd_w = CRD_W + start64 * 3
    rope = rope_tables_or_identity(FTAB, PTAB, offs_d, HEAD_DP, HAS_ROPE)
    q = load_tile_rope(Q + start64 * stride_qt + h * stride_qh, offs_m, m_ok, offs_d, stride_qt, crd_r, num_prefix,
                       rope, HEAD_DIM, HEAD_DP, True, HAS_ROPE, FAST_TRIG)
    do = load_tile(DO + start64 * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                   m_ok, offs_d, HEAD_DIM, HEAD_DP, True)
    lse = tl.load(LSE + h.to(tl.int64) * total + start64 + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + h.to(tl.int64) * total + start64 + offs_m, mask=m_ok, other=0.0)
    own = block_window(crd_w, offs_m, m_ok, num_prefix, HAS_WINDOW)
    band = band_shifts(Lk - L, band_left, band_right, False)

    k_base = K + k_start64 * stride_kt + kvh * stride_kh
    v_base = V + k_start64 * stride_vt + kvh * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DP], dtype=tl.float32)
    span = tile_counts(FULL_CNT, PART_CNT, b * list_nq + pid_m, list_nk, Lk, m0, L, band, BLOCK_M, BLOCK_N,
                       HAS_WINDOW, IS_BAND)
    dq = _dq_tiles(
        dq, q, do, lse, delta, own, k_base, v_base, stride_kt, stride_vt, CRD_R + k_start64 * 3,
        CRD_W + k_start64 * 3, Lk, span, FULL_IDX + span[2], offs_d, rope, qk_scale, num_prefix, rad_t, rad_h, rad_w,
        band, HEAD_DIM, HEAD_DP, BLOCK_N, False, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG, IS_BAND,
    )
    dq = _dq_tiles(
        dq, q, do, lse, delta, own, k_base, v_base, stride_kt, stride_vt, CRD_R + k_start64 * 3,
        CRD_W + k_start64 * 3, Lk, span, PART_IDX + span[2], offs_d, rope, qk_scale, num_prefix, rad_t, rad_h, rad_w,
        band, HEAD_DIM, HEAD_DP, BLOCK_N, True, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG, IS_BAND,
    )

    dq = dq * sm_scale
    if ROPE_OUT:
        dq = rope_transpose(dq, FTAB, PTAB, PMAT, crd_r, offs_m, m_ok, offs_d, num_prefix, HEAD_DP, FAST_TRIG)
    dq_ptrs = DQ + start64 * stride_dqt + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
