"""Forward kernel of the fused masked attention (see ``attention.py`` for the math and layout).

One program owns ``BLOCK_M`` query rows of one (sample, head) and streams key/value tiles of
the same sample through an online softmax (scores scaled by ``scale * log2(e)`` so ``exp2``
is the exponential), accumulating in fp32. It writes the output rows and their logsumexp
(base 2) for the backward. Key tiles come in two kinds:

* full tiles: every (query, key) pair allowed: no mask at all (the fast path);
* masked tiles: the sample's last, partial tile, and tiles cut by the window.

Without a window the tiles are the sample's key blocks in order (all full but the last);
with a window the host hands each query block two lists (full, masked) of the key blocks
that its window box can reach: tiles outside it are never loaded.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._attention_common import NO_SPECIALIZE, load_rope_tables, load_tile, load_tile_rope, mma, window_ok


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, qt, qh, qw, q_pre,
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
        if MASKED:
            if HAS_WINDOW:
                ok = window_ok(qt, qh, qw, q_pre, crd_w, offs_n, n_ok, num_prefix, rad_t, rad_h, rad_w)
            else:
                ok = n_ok[None, :]
            s = tl.where(ok, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            p = tl.exp2(s * qk_scale - m_new[:, None])
        # m_i starts at a finite -1e30, so a row with no allowed key yet keeps alpha = 1, p = 0.
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=NO_SPECIALIZE)
def attn_fwd_kernel(
    Q, K, V, O, LSE, CU, CRD_R, CRD_W, FTAB, PTAB,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
    stride_qt, stride_qh: tl.constexpr, stride_kt, stride_kh: tl.constexpr, stride_vt, stride_vh: tl.constexpr,
    stride_ot, stride_oh: tl.constexpr,
    total, num_heads, qk_scale, num_prefix, rad_t, rad_h, rad_w, list_nq, list_nk,
    SEQ_BUCKET,  # autotuning key only (max_seqlen rounded up to a power of two)
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    FAST_TRIG: tl.constexpr,
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
    q_base = Q + start64 * stride_qt + h * stride_qh
    k_base = K + start64 * stride_kt + h * stride_kh
    v_base = V + start64 * stride_vt + h * stride_vh
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
        q_base, offs_m, m_ok, offs_d, partner, stride_qt, crd_r, num_prefix, f_t, f_h, f_w, sgn,
        HEAD_DIM, HEAD_DP, True, HAS_ROPE, FAST_TRIG,
    )
    q_pre = offs_m < num_prefix
    if HAS_WINDOW:
        qt = tl.load(crd_w + offs_m * 3 + 0, mask=m_ok, other=0)
        qh = tl.load(crd_w + offs_m * 3 + 1, mask=m_ok, other=0)
        qw = tl.load(crd_w + offs_m * 3 + 2, mask=m_ok, other=0)
    else:
        qt = offs_m
        qh = offs_m
        qw = offs_m

    acc = tl.zeros([BLOCK_M, HEAD_DP], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    if HAS_WINDOW:
        row = b * list_nq + pid_m
        n_full = tl.load(FULL_CNT + row)
        n_part = tl.load(PART_CNT + row)
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, qt, qh, qw, q_pre, k_base, v_base, stride_kt, stride_vt, crd_r, crd_w, L,
            0, n_full, FULL_IDX + row * list_nk, offs_d, partner, f_t, f_h, f_w, sgn, qk_scale, num_prefix,
            rad_t, rad_h, rad_w, HEAD_DIM, HEAD_DP, BLOCK_N, False, True, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG,
        )
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, qt, qh, qw, q_pre, k_base, v_base, stride_kt, stride_vt, crd_r, crd_w, L,
            0, n_part, PART_IDX + row * list_nk, offs_d, partner, f_t, f_h, f_w, sgn, qk_scale, num_prefix,
            rad_t, rad_h, rad_w, HEAD_DIM, HEAD_DP, BLOCK_N, True, True, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG,
        )
    else:
        n_full = L // BLOCK_N
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, qt, qh, qw, q_pre, k_base, v_base, stride_kt, stride_vt, crd_r, crd_w, L,
            0, n_full, FULL_IDX, offs_d, partner, f_t, f_h, f_w, sgn, qk_scale, num_prefix,
            rad_t, rad_h, rad_w, HEAD_DIM, HEAD_DP, BLOCK_N, False, False, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG,
        )
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, qt, qh, qw, q_pre, k_base, v_base, stride_kt, stride_vt, crd_r, crd_w, L,
            n_full, tl.cdiv(L, BLOCK_N), FULL_IDX, offs_d, partner, f_t, f_h, f_w, sgn, qk_scale, num_prefix,
            rad_t, rad_h, rad_w, HEAD_DIM, HEAD_DP, BLOCK_N, True, False, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG,
        )

    out = acc / tl.where(m_ok, l_i, 1.0)[:, None]  # rows past the end saw no key: l = 0
    o_ptrs = O + start64 * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse = m_i + tl.log2(tl.where(m_ok, l_i, 1.0))
    tl.store(LSE + h.to(tl.int64) * total + start64 + offs_m, lse, mask=m_ok)
