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
the key-block kernel needs no score mask on boundary tiles; window tiles are masked.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._attention_common import (
    NO_SPECIALIZE,
    load_rope_tables,
    load_tile,
    load_tile_rope,
    mma,
    rope_transpose,
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
    dk, dv, k, v, kt, kh, kw, k_pre, offs_n,
    q_base, do_base, stride_qt, stride_dot, lse_ptr, delta_ptr, crd_r, crd_w, L, lo, hi, list_ptr,
    offs_d, partner, f_t, f_h, f_w, sgn, qk_scale, num_prefix, rad_t, rad_h, rad_w,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, USE_LIST: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    for it in range(lo, hi):
        if USE_LIST:
            m0 = tl.load(list_ptr + it) * BLOCK_M
        else:
            m0 = it * BLOCK_M
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        q = load_tile_rope(
            q_base, offs_m, m_ok, offs_d, partner, stride_qt, crd_r, num_prefix, f_t, f_h, f_w, sgn,
            HEAD_DIM, HEAD_DP, MASKED, HAS_ROPE, FAST_TRIG,
        )
        do = load_tile(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], m_ok, offs_d, HEAD_DIM, HEAD_DP, MASKED)
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
            ok = window_ok(kt, kh, kw, k_pre, crd_w, offs_m, m_ok, num_prefix, rad_t, rad_h, rad_w)
            p_t = tl.where(ok, p_t, 0.0)
        dv = mma(p_t.to(do.dtype), do, dv, DOT_PREC)
        dp_t = mma(v, tl.trans(do), None, DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma(ds_t.to(q.dtype), q, dk, DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU, CRD_R, CRD_W, FTAB, PTAB, PMAT,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
    stride_qt, stride_qh: tl.constexpr, stride_kt, stride_kh: tl.constexpr, stride_vt, stride_vh: tl.constexpr,
    stride_dot, stride_doh: tl.constexpr, stride_dkt, stride_dkh: tl.constexpr, stride_dvt, stride_dvh: tl.constexpr,
    total, num_heads, qk_scale, sm_scale, num_prefix, rad_t, rad_h, rad_w, list_nk, list_nq,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    FAST_TRIG: tl.constexpr, ROPE_OUT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - start
    n0 = pid_n * BLOCK_N
    if n0 >= L:
        return
    start64 = start.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DP)
    n_ok = offs_n < L
    crd_r = CRD_R + start64 * 3
    crd_w = CRD_W + start64 * 3
    if HAS_ROPE:
        f_t, f_h, f_w, sgn, partner = load_rope_tables(FTAB, PTAB, offs_d, HEAD_DP)
    else:
        f_t = tl.zeros([HEAD_DP], dtype=tl.float32)
        f_h = f_t
        f_w = f_t
        sgn = f_t
        partner = offs_d
    k = load_tile_rope(
        K + start64 * stride_kt + h * stride_kh, offs_n, n_ok, offs_d, partner, stride_kt, crd_r, num_prefix,
        f_t, f_h, f_w, sgn, HEAD_DIM, HEAD_DP, True, HAS_ROPE, FAST_TRIG,
    )
    v = load_tile(V + start64 * stride_vt + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                  n_ok, offs_d, HEAD_DIM, HEAD_DP, True)
    k_pre = offs_n < num_prefix
    if HAS_WINDOW:
        kt = tl.load(crd_w + offs_n * 3 + 0, mask=n_ok, other=0)
        kh = tl.load(crd_w + offs_n * 3 + 1, mask=n_ok, other=0)
        kw = tl.load(crd_w + offs_n * 3 + 2, mask=n_ok, other=0)
    else:
        kt = offs_n
        kh = offs_n
        kw = offs_n

    q_base = Q + start64 * stride_qt + h * stride_qh
    do_base = DO + start64 * stride_dot + h * stride_doh
    lse_ptr = LSE + h.to(tl.int64) * total + start64
    delta_ptr = DELTA + h.to(tl.int64) * total + start64
    dk = tl.zeros([BLOCK_N, HEAD_DP], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DP], dtype=tl.float32)
    if HAS_WINDOW:
        row = b * list_nk + pid_n
        n_full = tl.load(FULL_CNT + row)
        n_part = tl.load(PART_CNT + row)
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, kt, kh, kw, k_pre, offs_n, q_base, do_base, stride_qt, stride_dot, lse_ptr, delta_ptr,
            crd_r, crd_w, L, 0, n_full, FULL_IDX + row * list_nq, offs_d, partner, f_t, f_h, f_w, sgn, qk_scale,
            num_prefix, rad_t, rad_h, rad_w, HEAD_DIM, HEAD_DP, BLOCK_M, False, True, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG,
        )
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, kt, kh, kw, k_pre, offs_n, q_base, do_base, stride_qt, stride_dot, lse_ptr, delta_ptr,
            crd_r, crd_w, L, 0, n_part, PART_IDX + row * list_nq, offs_d, partner, f_t, f_h, f_w, sgn, qk_scale,
            num_prefix, rad_t, rad_h, rad_w, HEAD_DIM, HEAD_DP, BLOCK_M, True, True, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG,
        )
    else:
        n_full = L // BLOCK_M
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, kt, kh, kw, k_pre, offs_n, q_base, do_base, stride_qt, stride_dot, lse_ptr, delta_ptr,
            crd_r, crd_w, L, 0, n_full, FULL_IDX, offs_d, partner, f_t, f_h, f_w, sgn, qk_scale,
            num_prefix, rad_t, rad_h, rad_w, HEAD_DIM, HEAD_DP, BLOCK_M, False, False, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG,
        )
        dk, dv = _dkdv_tiles(
            dk, dv, k, v, kt, kh, kw, k_pre, offs_n, q_base, do_base, stride_qt, stride_dot, lse_ptr, delta_ptr,
            crd_r, crd_w, L, n_full, tl.cdiv(L, BLOCK_M), FULL_IDX, offs_d, partner, f_t, f_h, f_w, sgn, qk_scale,
            num_prefix, rad_t, rad_h, rad_w, HEAD_DIM, HEAD_DP, BLOCK_M, True, False, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG,
        )

    dk = dk * sm_scale
    if ROPE_OUT:  # R^T once per tile, after the loop (the tables are reloaded: nothing stays live through it)
        f_t, f_h, f_w, sgn, _ = load_rope_tables(FTAB, PTAB, offs_d, HEAD_DP)
        pmat = tl.load(PMAT + offs_d[:, None] * HEAD_DP + offs_d[None, :])
        dk = rope_transpose(dk, pmat, crd_r, offs_n, n_ok, num_prefix, f_t, f_h, f_w, sgn, FAST_TRIG)
    st_mask = n_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = DK + start64 * stride_dkt + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + start64 * stride_dvt + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def _dq_tiles(
    dq, q, do, lse, delta, qt, qh, qw, q_pre,
    k_base, v_base, stride_kt, stride_vt, crd_r, crd_w, L, lo, hi, list_ptr,
    offs_d, partner, f_t, f_h, f_w, sgn, qk_scale, num_prefix, rad_t, rad_h, rad_w,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, USE_LIST: tl.constexpr, HAS_ROPE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    DOT_PREC: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    for it in range(lo, hi):
        if USE_LIST:
            n0 = tl.load(list_ptr + it) * BLOCK_N
        else:
            n0 = it * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        k = load_tile_rope(
            k_base, offs_n, n_ok, offs_d, partner, stride_kt, crd_r, num_prefix, f_t, f_h, f_w, sgn,
            HEAD_DIM, HEAD_DP, MASKED, HAS_ROPE, FAST_TRIG,
        )
        v = load_tile(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], n_ok, offs_d, HEAD_DIM, HEAD_DP, MASKED)
        s = mma(q, tl.trans(k), None, DOT_PREC)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            if HAS_WINDOW:
                ok = window_ok(qt, qh, qw, q_pre, crd_w, offs_n, n_ok, num_prefix, rad_t, rad_h, rad_w)
            else:
                ok = n_ok[None, :]
            p = tl.where(ok, p, 0.0)
        dp = mma(do, tl.trans(v), None, DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = mma(ds.to(k.dtype), k, dq, DOT_PREC)
    return dq


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, CU, CRD_R, CRD_W, FTAB, PTAB, PMAT,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
    stride_qt, stride_qh: tl.constexpr, stride_kt, stride_kh: tl.constexpr, stride_vt, stride_vh: tl.constexpr,
    stride_dot, stride_doh: tl.constexpr, stride_dqt, stride_dqh: tl.constexpr,
    total, num_heads, qk_scale, sm_scale, num_prefix, rad_t, rad_h, rad_w, list_nq, list_nk,
    SEQ_BUCKET,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    FAST_TRIG: tl.constexpr, ROPE_OUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - start
    m0 = pid_m * BLOCK_M
    if m0 >= L:
        return
    start64 = start.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DP)
    m_ok = offs_m < L
    crd_r = CRD_R + start64 * 3
    crd_w = CRD_W + start64 * 3
    if HAS_ROPE:
        f_t, f_h, f_w, sgn, partner = load_rope_tables(FTAB, PTAB, offs_d, HEAD_DP)
    else:
        f_t = tl.zeros([HEAD_DP], dtype=tl.float32)
        f_h = f_t
        f_w = f_t
        sgn = f_t
        partner = offs_d
    q = load_tile_rope(
        Q + start64 * stride_qt + h * stride_qh, offs_m, m_ok, offs_d, partner, stride_qt, crd_r, num_prefix,
        f_t, f_h, f_w, sgn, HEAD_DIM, HEAD_DP, True, HAS_ROPE, FAST_TRIG,
    )
    do = load_tile(DO + start64 * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                   m_ok, offs_d, HEAD_DIM, HEAD_DP, True)
    lse = tl.load(LSE + h.to(tl.int64) * total + start64 + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + h.to(tl.int64) * total + start64 + offs_m, mask=m_ok, other=0.0)
    q_pre = offs_m < num_prefix
    if HAS_WINDOW:
        qt = tl.load(crd_w + offs_m * 3 + 0, mask=m_ok, other=0)
        qh = tl.load(crd_w + offs_m * 3 + 1, mask=m_ok, other=0)
        qw = tl.load(crd_w + offs_m * 3 + 2, mask=m_ok, other=0)
    else:
        qt = offs_m
        qh = offs_m
        qw = offs_m

    k_base = K + start64 * stride_kt + h * stride_kh
    v_base = V + start64 * stride_vt + h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DP], dtype=tl.float32)
    if HAS_WINDOW:
        row = b * list_nq + pid_m
        n_full = tl.load(FULL_CNT + row)
        n_part = tl.load(PART_CNT + row)
        dq = _dq_tiles(
            dq, q, do, lse, delta, qt, qh, qw, q_pre, k_base, v_base, stride_kt, stride_vt, crd_r, crd_w, L,
            0, n_full, FULL_IDX + row * list_nk, offs_d, partner, f_t, f_h, f_w, sgn, qk_scale, num_prefix,
            rad_t, rad_h, rad_w, HEAD_DIM, HEAD_DP, BLOCK_N, False, True, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG,
        )
        dq = _dq_tiles(
            dq, q, do, lse, delta, qt, qh, qw, q_pre, k_base, v_base, stride_kt, stride_vt, crd_r, crd_w, L,
            0, n_part, PART_IDX + row * list_nk, offs_d, partner, f_t, f_h, f_w, sgn, qk_scale, num_prefix,
            rad_t, rad_h, rad_w, HEAD_DIM, HEAD_DP, BLOCK_N, True, True, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG,
        )
    else:
        n_full = L // BLOCK_N
        dq = _dq_tiles(
            dq, q, do, lse, delta, qt, qh, qw, q_pre, k_base, v_base, stride_kt, stride_vt, crd_r, crd_w, L,
            0, n_full, FULL_IDX, offs_d, partner, f_t, f_h, f_w, sgn, qk_scale, num_prefix,
            rad_t, rad_h, rad_w, HEAD_DIM, HEAD_DP, BLOCK_N, False, False, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG,
        )
        dq = _dq_tiles(
            dq, q, do, lse, delta, qt, qh, qw, q_pre, k_base, v_base, stride_kt, stride_vt, crd_r, crd_w, L,
            n_full, tl.cdiv(L, BLOCK_N), FULL_IDX, offs_d, partner, f_t, f_h, f_w, sgn, qk_scale, num_prefix,
            rad_t, rad_h, rad_w, HEAD_DIM, HEAD_DP, BLOCK_N, True, False, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG,
        )

    dq = dq * sm_scale
    if ROPE_OUT:
        f_t, f_h, f_w, sgn, _ = load_rope_tables(FTAB, PTAB, offs_d, HEAD_DP)
        pmat = tl.load(PMAT + offs_d[:, None] * HEAD_DP + offs_d[None, :])
        dq = rope_transpose(dq, pmat, crd_r, offs_m, m_ok, num_prefix, f_t, f_h, f_w, sgn, FAST_TRIG)
    dq_ptrs = DQ + start64 * stride_dqt + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
