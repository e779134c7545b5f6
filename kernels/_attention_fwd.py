"""Forward kernel of the fused masked attention (see ``attention.py`` for the math and layout).

One program owns ``BLOCK_M`` query rows of one (sample, head) and streams key/value tiles of
the same sample through an online softmax (scores scaled by ``scale * log2(e)`` so ``exp2``
is the exponential), accumulating in fp32. It writes the output rows and their logsumexp
(base 2) for the backward. Key tiles come in two kinds:

* full tiles: every (query, key) pair allowed: no mask at all (the fast path);
* masked tiles: the sample's last, partial tile, and tiles cut by the window.

Without a window the tiles are the sample's key blocks in order (all full but the last);
with a window the host hands each query block two lists (full, masked) of the key blocks
that its window box can reach: tiles outside it are never loaded. With a band (``IS_BAND``:
``varlen_attention``'s causal / local window, query ``i`` sees keys ``i + off - left ..
i + off + right``) the program computes its key-block range itself: full blocks in the middle,
masked ones at its two ends.

Queries and keys may come from two packings (``CU_Q``, ``CU_K``: cross-attention, different
lengths per sample) and the keys may have fewer heads than the queries (GQA / MQA): query
head ``h`` reads key/value head ``h // group``. A query row that may see no key at all (a band
with ``Lk < Lq``, an empty key sample) gets output 0 and lse ``+inf`` (so that the backward's
``exp2(s - lse)`` is 0 there; the public op reports it as ``-inf``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._attention_common import (
    NO_SPECIALIZE,
    band_shifts,
    block_rows,
    block_window,
    load_tile_rope,
    mma,
    program_blocks,
    rope_tables_or_identity,
    stream_tile,
    tile_counts,
    tile_span,
    tile_visible,
)


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, own, k_base, v_base, stride_kt, stride_vt, crd_r, crd_w, L, span, list_ptr,
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
        if MASKED:
            ok = tile_visible(own, crd_w, offs_n, n_ok, num_prefix, rad_t, rad_h, rad_w, band, HAS_WINDOW, IS_BAND)
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
    Q, K, V, O, LSE, CU_Q, CU_K, CRD_R, CRD_W, FTAB, PTAB,
    FULL_IDX, FULL_CNT, PART_IDX, PART_CNT,
    stride_qt, stride_qh: tl.constexpr, stride_kt, stride_kh: tl.constexpr, stride_vt, stride_vh: tl.constexpr,
    stride_ot, stride_oh: tl.constexpr,
    total, num_heads, group, qk_scale, num_prefix, rad_t, rad_h, rad_w, band_left, band_right, list_nq, list_nk,
    SEQ_BUCKET,  # autotuning key only (max_seqlen rounded up to a power of two)
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROPE: tl.constexpr, HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    FAST_TRIG: tl.constexpr, IS_BAND: tl.constexpr,
):
    pid_m, h, b, start, L, k_start, Lk, m0 = program_blocks(CU_Q, CU_K, BLOCK_M)
    if m0 >= L:
        return
    start64, offs_m, offs_d, m_ok = block_rows(start, m0, L, BLOCK_M, HEAD_DP)
    k_start64 = k_start.to(tl.int64)
    kvh = h // group
    q_base = Q + start64 * stride_qt + h * stride_qh
    k_base = K + k_start64 * stride_kt + kvh * stride_kh
    v_base = V + k_start64 * stride_vt + kvh * stride_vh
    crd_r = CRD_R + start64 * 3
    crd_w = CRD_W + start64 * 3
    crd_rk = CRD_R + k_start64 * 3
    crd_wk = CRD_W + k_start64 * 3

    rope = rope_tables_or_identity(FTAB, PTAB, offs_d, HEAD_DP, HAS_ROPE)
    q = load_tile_rope(q_base, offs_m, m_ok, offs_d, stride_qt, crd_r, num_prefix, rope, HEAD_DIM, HEAD_DP, True,
                       HAS_ROPE, FAST_TRIG)
    own = block_window(crd_w, offs_m, m_ok, num_prefix, HAS_WINDOW)
    band = band_shifts(Lk - L, band_left, band_right, False)

    acc = tl.zeros([BLOCK_M, HEAD_DP], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    span = tile_counts(FULL_CNT, PART_CNT, b * list_nq + pid_m, list_nk, Lk, m0, L, band, BLOCK_M, BLOCK_N,
                       HAS_WINDOW, IS_BAND)
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, own, k_base, v_base, stride_kt, stride_vt, crd_rk, crd_wk, Lk, span,
        FULL_IDX + span[2], offs_d, rope, qk_scale, num_prefix, rad_t, rad_h, rad_w, band,
        HEAD_DIM, HEAD_DP, BLOCK_N, False, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG, IS_BAND,
    )
    acc, l_i, m_i = _fwd_tiles(
        acc, l_i, m_i, q, own, k_base, v_base, stride_kt, stride_vt, crd_rk, crd_wk, Lk, span,
        PART_IDX + span[2], offs_d, rope, qk_scale, num_prefix, rad_t, rad_h, rad_w, band,
        HEAD_DIM, HEAD_DP, BLOCK_N, True, HAS_ROPE, HAS_WINDOW, DOT_PREC, FAST_TRIG, IS_BAND,
    )

    # l = 0: a row past the end, or one that may see no key (acc is 0 there: output 0)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    o_ptrs = O + start64 * stride_ot + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + h.to(tl.int64) * total + start64 + offs_m, lse, mask=m_ok)
