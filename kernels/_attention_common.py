"""Pieces shared by the masked-attention kernels: the per-program setup (sample bounds, RoPE
tables, window coordinates), the walk over a program's tile lists, tile loads with fused RoPE,
and the host-side tables (RoPE channel tables, window tile lists) the kernels read.

The helpers are inlined into every kernel. Keep the order of operations when changing them:
ptxas register allocation on sm_90 follows the order of the emitted code, and a moved
computation changes register counts (``python -m benchmarks.compile_report`` shows them).

RoPE inside a tile. Channel ``c`` of a rotated section pairs with ``partner[c] = c +- s/2``
(rotate-half), so for one token with per-channel angle ``a_c``::

    y[c] = x[c] cos(a_c) + sign[c] x[partner[c]] sin(a_c),    sign = -1 (first half), +1 (second)
    a_c  = t * f_t[c] + h * f_h[c] + w * f_w[c]             (two of the three f's are 0 at c)

The kernels load a tile ``x`` and a second, column-permuted copy ``x[:, partner]`` (the same
cache lines, so it hits L1), and evaluate the line above in fp32. Channels outside every
section have ``f = 0, sign = 0``: cos 0 = 1, sin 0 = 0, the identity; so does a prefix token,
whose coordinates are read as 0. This works for any sections layout and padded head dims.

The gradient goes back through ``R^T``: ``dx[c] = g[c] cos(a_c) - sign[c] g[partner[c]] sin(a_c)``.
``g`` lives in registers, where Triton cannot permute columns, so ``g[:, partner]`` is a matmul
with a 0/1 permutation matrix, exact when ``g`` is split into three bfloat16 parts
(hi + mid + lo carries fp32's 24 mantissa bits) - three small tensor-core products once per
program, not per tile.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------- device helpers

# Under the CPU interpreter (tests) dots are evaluated in float64 and rounded once. Triton 3.9's
# interpreter multiplies the raw uint16 storage of bfloat16 operands, and numpy's BLAS sums in
# an order that differs between ``q @ k^T`` and ``k @ q^T``, so the backward's recomputed
# scores would not match the forward's to the last bit (on the GPU both are the same FMA chain).
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


# Scalar arguments whose values vary from call to call: no per-value specialisation (Triton
# would otherwise compile a variant for value 1 and for multiples of 16). Head strides go the
# other way: they are constexpr in every kernel. A model has one per head dim (the head dim
# itself, for views of a packed qkv), and as a runtime int a stride like 88 - not a multiple of
# 16, so Triton assumes nothing of it - left every q/k/v tile on 16-bit loads with no cp.async
# pipelining at D = 88 on sm_90 (benchmarks/results/compile_*).
NO_SPECIALIZE = ["num_heads", "num_prefix", "rad_t", "rad_h", "rad_w", "band_left", "band_right", "list_nq",
                 "list_nk", "SEQ_BUCKET"]


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr):
    """``a @ b (+ acc)`` with fp32 accumulation (``acc`` fp32 or None)."""
    if _INTERPRETED:
        r = tl.dot(a.to(tl.float64), b.to(tl.float64))
        if acc is not None:
            r = r + acc.to(tl.float64)
        out = r.to(tl.float32)
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PREC)
    return out


@triton.jit
def load_tile(ptrs, row_ok, offs_d, HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, ROW_MASK: tl.constexpr):
    """Load ``[R, HEAD_DP]``; masks only what can be out of range (rows on boundary tiles, padded channels)."""
    if ROW_MASK:
        if HEAD_DIM == HEAD_DP:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == HEAD_DP:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def cos_sin(x, FAST_TRIG: tl.constexpr):
    """cos and sin of fp32 ``x``. ``FAST_TRIG`` (16-bit inputs on the GPU): reduce to [-pi, pi]
    with a two-constant 2*pi (exact product for |x| < 2^13), then the SFU's cos/sin.approx
    (abs error ~1e-6, far below a bf16/fp16 ulp); libdevice's cosf/sinf (slow, register
    hungry inside the key loop) otherwise."""
    if FAST_TRIG:
        k = tl.floor(x * 0.15915494309189535 + 0.5)
        r = x - k * 6.28125
        r = r - k * 0.0019353071795864769
        c = tl.inline_asm_elementwise("cos.approx.ftz.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.ftz.f32 $0, $1;", "=f,f", [r], dtype=tl.float32, is_pure=True, pack=1)
    else:
        c = tl.cos(x)
        s = tl.sin(x)
    return c, s


@triton.jit
def program_block(CU, BLOCK: tl.constexpr):
    """(block index, head, sample, sample start, sample length, first row) of a program of the
    ``(ceil(max_seqlen / BLOCK), H, B)`` grid. A helper cannot end the kernel, so each kernel
    returns itself when the first row lies past its sample's end."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(CU + b)
    L = tl.load(CU + b + 1) - start
    return pid, h, b, start, L, pid * BLOCK


@triton.jit
def program_blocks(CU_OWN, CU_STR, BLOCK: tl.constexpr):
    """:func:`program_block` for a program whose own rows (``CU_OWN``: queries, or keys in the
    key-owned backward) and streamed rows (``CU_STR``) come from two packings: (block index,
    head, sample, own start, own length, streamed start, streamed length, first row). Self-attention
    passes one ``cu_seqlens`` twice."""
    pid, h, b, start, L, r0 = program_block(CU_OWN, BLOCK)
    s_start = tl.load(CU_STR + b)
    s_len = tl.load(CU_STR + b + 1) - s_start
    return pid, h, b, start, L, s_start, s_len, r0


@triton.jit
def block_rows(start, r0, L, BLOCK: tl.constexpr, HEAD_DP: tl.constexpr):
    """(start as int64, rows ``[BLOCK]`` from ``r0``, channels ``[HEAD_DP]``, row in sample)."""
    # token offsets times a token stride can pass 2^31 in a large packed batch
    start64 = start.to(tl.int64)
    rows = r0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DP)
    return start64, rows, offs_d, rows < L


@triton.jit
def load_rope_tables(FTAB, PTAB, offs_d, HEAD_DP: tl.constexpr):
    """(f_t, f_h, f_w, sign, partner) vectors ``[HEAD_DP]`` of :func:`rope_tables`."""
    f_t = tl.load(FTAB + offs_d)
    f_h = tl.load(FTAB + HEAD_DP + offs_d)
    f_w = tl.load(FTAB + 2 * HEAD_DP + offs_d)
    sgn = tl.load(FTAB + 3 * HEAD_DP + offs_d)
    partner = tl.load(PTAB + offs_d)
    return f_t, f_h, f_w, sgn, partner


@triton.jit
def rope_tables_or_identity(FTAB, PTAB, offs_d, HEAD_DP: tl.constexpr, HAS_ROPE: tl.constexpr):
    """The ``rope`` tuple the tile loaders take: :func:`load_rope_tables`, or without ``HAS_ROPE``
    stand-ins they never read (they rotate nothing then), so one loop body serves both."""
    if HAS_ROPE:
        f_t, f_h, f_w, sgn, partner = load_rope_tables(FTAB, PTAB, offs_d, HEAD_DP)
    else:
        f_t = tl.zeros([HEAD_DP], dtype=tl.float32)
        f_h = f_t
        f_w = f_t
        sgn = f_t
        partner = offs_d
    return f_t, f_h, f_w, sgn, partner


@triton.jit
def load_coords(crd_ptr, rows, ok):
    """int32 (t, h, w) ``[R]`` of the tokens at ``rows`` (0 where not ``ok``)."""
    t = tl.load(crd_ptr + rows * 3 + 0, mask=ok, other=0)
    h = tl.load(crd_ptr + rows * 3 + 1, mask=ok, other=0)
    w = tl.load(crd_ptr + rows * 3 + 2, mask=ok, other=0)
    return t, h, w


@triton.jit
def rope_angles(crd_ptr, rows, row_ok, num_prefix, f_t, f_h, f_w):
    """fp32 ``[R, HEAD_DP]`` angles of tokens at positions ``rows`` (coords of prefix rows read as 0)."""
    cm = row_ok & (rows >= num_prefix)
    ct = tl.load(crd_ptr + rows * 3 + 0, mask=cm, other=0).to(tl.float32)
    ch = tl.load(crd_ptr + rows * 3 + 1, mask=cm, other=0).to(tl.float32)
    cw = tl.load(crd_ptr + rows * 3 + 2, mask=cm, other=0).to(tl.float32)
    return ct[:, None] * f_t[None, :] + ch[:, None] * f_h[None, :] + cw[:, None] * f_w[None, :]


@triton.jit
def load_tile_rope(
    base, rows, row_ok, offs_d, stride_t, crd_ptr, num_prefix, rope,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, ROW_MASK: tl.constexpr, HAS_ROPE: tl.constexpr,
    FAST_TRIG: tl.constexpr,
):
    """Tile ``x[rows, :]`` of one head, rotated when ``HAS_ROPE`` (``rope``: the tables of
    :func:`rope_tables_or_identity`); returned in the input dtype."""
    f_t, f_h, f_w, sgn, partner = rope
    x = load_tile(base + rows[:, None] * stride_t + offs_d[None, :], row_ok, offs_d, HEAD_DIM, HEAD_DP, ROW_MASK)
    if HAS_ROPE:
        xp = load_tile(base + rows[:, None] * stride_t + partner[None, :], row_ok, offs_d, HEAD_DIM, HEAD_DP, ROW_MASK)
        c, s = cos_sin(rope_angles(crd_ptr, rows, row_ok, num_prefix, f_t, f_h, f_w), FAST_TRIG)
        y = x.to(tl.float32) * c + sgn[None, :] * xp.to(tl.float32) * s
        x = y.to(x.dtype)
    return x


@triton.jit
def rope_transpose(
    g, FTAB, PTAB, PMAT, crd_ptr, rows, row_ok, offs_d, num_prefix, HEAD_DP: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    """``R^T g`` for fp32 ``g[R, HEAD_DP]`` (the gradient w.r.t. rotated rows -> w.r.t. unrotated).
    Called once per output tile after the tile loop; the tables are read here, so that nothing
    of them stays live through the loop."""
    f_t, f_h, f_w, sgn, _ = load_rope_tables(FTAB, PTAB, offs_d, HEAD_DP)
    pmat = tl.load(PMAT + offs_d[:, None] * HEAD_DP + offs_d[None, :])
    hi = g.to(tl.bfloat16)
    r1 = g - hi.to(tl.float32)
    mid = r1.to(tl.bfloat16)
    lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
    gp = mma(hi, pmat, None, "tf32")
    gp = mma(mid, pmat, gp, "tf32")
    gp = mma(lo, pmat, gp, "tf32")
    c, s = cos_sin(rope_angles(crd_ptr, rows, row_ok, num_prefix, f_t, f_h, f_w), FAST_TRIG)
    return g * c - sgn[None, :] * gp * s


@triton.jit
def window_ok(own, crd_ptr, offs_n, n_ok, num_prefix, rad_t, rad_h, rad_w):
    """bool ``[M, N]``: query (``own``: prefix flag and coords of :func:`block_window`) may see key ``offs_n``."""
    q_pre, qt, qh, qw = own
    kt, kh, kw = load_coords(crd_ptr, offs_n, n_ok)
    near = (tl.abs(qt[:, None] - kt[None, :]) <= rad_t) & (tl.abs(qh[:, None] - kh[None, :]) <= rad_h)
    near = near & (tl.abs(qw[:, None] - kw[None, :]) <= rad_w)
    return (near | q_pre[:, None] | (offs_n[None, :] < num_prefix)) & n_ok[None, :]


@triton.jit
def block_window(crd_w, rows, ok, num_prefix, HAS_WINDOW: tl.constexpr):
    """(prefix flag, t, h, w) ``[R]`` of a program's own rows: ``own`` of :func:`window_ok`.
    Without a window the coordinates are never read: the rows stand in for them."""
    pre = rows < num_prefix
    if HAS_WINDOW:
        t, h, w = load_coords(crd_w, rows, ok)
    else:
        t = rows
        h = rows
        w = rows
    return pre, t, h, w


@triton.jit
def band_ok(own_rows, str_rows, str_ok, band):
    """bool ``[R_own, R_str]``: streamed row ``s`` is allowed for own row ``o`` iff
    ``o + lo <= s <= o + hi`` (``band = (lo, hi)``, see :func:`band_span`) and ``s`` is in its sample."""
    lo, hi = band
    d = str_rows[None, :] - own_rows[:, None]
    return (d >= lo) & (d <= hi) & str_ok[None, :]


@triton.jit
def tile_visible(own, crd_w, offs_n, n_ok, num_prefix, rad_t, rad_h, rad_w, band,
                 HAS_WINDOW: tl.constexpr, IS_BAND: tl.constexpr):
    """bool mask of a masked tile: the window rule, the band rule, or the keys inside the sample.
    Without a window ``own``'s coordinates are the own rows themselves (:func:`block_window`),
    which is what the band rule compares."""
    if HAS_WINDOW:
        ok = window_ok(own, crd_w, offs_n, n_ok, num_prefix, rad_t, rad_h, rad_w)
    elif IS_BAND:
        ok = band_ok(own[1], offs_n, n_ok, band)
    else:
        ok = n_ok[None, :]
    return ok


@triton.jit
def band_shifts(off, left, right, KEY_OWNED: tl.constexpr):
    """``(lo, hi)`` of :func:`band_ok` for a causal / local band ``left <= i + off - j <= ...``:
    query ``i`` sees key ``j`` iff ``i + off - left <= j <= i + off + right`` with ``off = Lk - Lq``
    (flash-attn's bottom-right alignment). Query-owned programs stream keys; key-owned ones
    stream the queries ``j - off - right <= i <= j - off + left``."""
    if KEY_OWNED:
        lo = -off - right
        hi = left - off
    else:
        lo = off - left
        hi = off + right
    return lo, hi


@triton.jit
def band_span(o0, L_own, L_str, band, OWN: tl.constexpr, BLOCK: tl.constexpr):
    """``(lo, flo, fhi, hi)``: streamed blocks ``[lo, hi)`` hold an allowed pair for some own row
    of ``[o0, o0 + OWN)`` (inside the sample), and the blocks ``[flo, fhi)`` among them are full:
    whole, every pair allowed. The band is contiguous, so the masked blocks are its two ends."""
    b_lo, b_hi = band
    o1 = tl.minimum(o0 + OWN, L_own) - 1
    s_lo = tl.maximum(o0 + b_lo, 0)
    s_hi = tl.minimum(o1 + b_hi, L_str - 1)
    lo = s_lo // BLOCK
    hi = tl.where(s_hi >= s_lo, s_hi // BLOCK + 1, lo)
    # first block starting at or after o1 + b_lo; blocks ending at or before o0 + b_hi (and the sample)
    flo = tl.cdiv(tl.maximum(o1 + b_lo, 0), BLOCK)
    fhi = tl.maximum(tl.minimum(o0 + b_hi, L_str - 1) + 1, 0) // BLOCK
    flo = tl.minimum(tl.maximum(flo, lo), hi)
    fhi = tl.minimum(tl.maximum(fhi, flo), hi)
    return lo, flo, fhi, hi


@triton.jit
def tile_counts(FULL_CNT, PART_CNT, row, list_len, L, o0, L_own, band,
                OWN: tl.constexpr, BLOCK: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_BAND: tl.constexpr):
    """The program's ``span`` for :func:`tile_span`: with a window, (full tiles, masked tiles,
    offset of the program's list row) from row ``row`` of the host's lists
    (:func:`window_lists`, rows ``list_len`` long); with a band, :func:`band_span`; else the
    streamed sample's whole blocks (the masked pass is its partial last one, if any)."""
    if HAS_WINDOW:
        n_full = tl.load(FULL_CNT + row)
        n_part = tl.load(PART_CNT + row)
        span = (n_full, n_part, row * list_len, 0)
    elif IS_BAND:
        span = band_span(o0, L_own, L, band, OWN, BLOCK)
    else:
        span = (L // BLOCK, 0, 0, 0)
    return span


@triton.jit
def tile_span(span, L, BLOCK: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
              IS_BAND: tl.constexpr):
    """Loop bounds of the full (``MASKED`` false) or masked pass over a program's tiles."""
    if IS_BAND:
        b_lo, b_flo, b_fhi, b_hi = span
        if MASKED:  # both ends of the band, renumbered from 0 (:func:`tile_block`)
            lo = 0
            hi = (b_flo - b_lo) + (b_hi - b_fhi)
        else:
            lo = b_flo
            hi = b_fhi
    else:
        n_full, n_part, _, _ = span
        if MASKED:
            if HAS_WINDOW:
                lo = 0
                hi = n_part
            else:
                # Evaluated here, after the full pass: computed before it, the bound stays live through
                # that loop (fp32 forward on sm_90: 80 -> 92 registers).
                lo = n_full
                hi = tl.cdiv(L, BLOCK)
        else:
            lo = 0
            hi = n_full
    return lo, hi


@triton.jit
def tile_block(list_ptr, it, span, MASKED: tl.constexpr, USE_LIST: tl.constexpr, IS_BAND: tl.constexpr):
    """Streamed block of step ``it``: entry ``it`` of ``list_ptr``, a band end, or block ``it``."""
    if USE_LIST:
        blk = tl.load(list_ptr + it)
    elif IS_BAND and MASKED:
        b_lo, b_flo, b_fhi, _ = span
        n_left = b_flo - b_lo
        blk = tl.where(it < n_left, b_lo + it, b_fhi + (it - n_left))
    else:
        blk = it
    return blk


@triton.jit
def stream_tile(
    list_ptr, it, span, L, x_base, y_base, stride_xt, stride_yt, crd_r, offs_d, rope, num_prefix,
    HEAD_DIM: tl.constexpr, HEAD_DP: tl.constexpr, BLOCK: tl.constexpr,
    MASKED: tl.constexpr, USE_LIST: tl.constexpr, HAS_ROPE: tl.constexpr, FAST_TRIG: tl.constexpr,
    IS_BAND: tl.constexpr,
):
    """Step ``it`` of a tile loop: (rows ``[BLOCK]``, row in sample, ``x`` rows rotated when
    ``HAS_ROPE``, ``y`` rows) - k, v in the query-block loops, q, dO in the key-block loop.
    The block is :func:`tile_block`'s."""
    r0 = tile_block(list_ptr, it, span, MASKED, USE_LIST, IS_BAND) * BLOCK
    rows = r0 + tl.arange(0, BLOCK)
    ok = rows < L
    x = load_tile_rope(x_base, rows, ok, offs_d, stride_xt, crd_r, num_prefix, rope, HEAD_DIM, HEAD_DP, MASKED,
                       HAS_ROPE, FAST_TRIG)
    y = load_tile(y_base + rows[:, None] * stride_yt + offs_d[None, :], ok, offs_d, HEAD_DIM, HEAD_DP, MASKED)
    return rows, ok, x, y


# --------------------------------------------------------------------------- host tables


def head_dim_padded(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


_ROPE_CACHE: dict = {}


def rope_tables(theta: float, sections: tuple[int, int, int], head_dp: int, device: torch.device):
    """``ftab fp32[4, DP]`` (f_t, f_h, f_w, sign), ``partner int32[DP]``, ``pmat bf16[DP, DP]``.

    inv_freq is evaluated in float64 and rounded once to fp32, as in ``invnext.ops.rope``.
    ``pmat[partner[c], c] = 1`` so that ``(g @ pmat)[:, c] = g[:, partner[c]]``.
    """
    key = (float(theta), tuple(sections), head_dp, str(device))
    hit = _ROPE_CACHE.get(key)
    if hit is not None:
        return hit
    ftab = torch.zeros(4, head_dp, dtype=torch.float64)
    partner = torch.arange(head_dp, dtype=torch.int64)
    off = 0
    for axis, s in enumerate(sections):
        half = s // 2
        for j in range(half):
            f = theta ** (-2.0 * j / s)
            for c, sign, p in ((off + j, -1.0, off + half + j), (off + half + j, 1.0, off + j)):
                ftab[axis, c] = f
                ftab[3, c] = sign
                partner[c] = p
        off += s
    pmat = torch.zeros(head_dp, head_dp, dtype=torch.float32)
    pmat[partner, torch.arange(head_dp)] = 1.0
    out = (
        ftab.to(torch.float32).to(device),
        partner.to(torch.int32).to(device),
        pmat.to(torch.bfloat16).to(device),
    )
    _ROPE_CACHE[key] = out
    return out


def window_geometry(window, coords: torch.Tensor | None, cu_seqlens: torch.Tensor, total: int):
    """``(wcoords int32[total, 3], (rt, rh, rw))`` for a 3D window, or a 1D window ``w`` seen as
    the box ``(1, 1, w)`` on synthetic coordinates ``(0, 0, position in sample)``."""
    if isinstance(window, int) or len(window) == 1:
        w = window if isinstance(window, int) else window[0]
        device = cu_seqlens.device
        tok = torch.arange(total, device=device, dtype=cu_seqlens.dtype)  # int32 or int64, as cu_seqlens
        seg = torch.searchsorted(cu_seqlens, tok, right=True) - 1
        pos = (tok - cu_seqlens[seg]).to(torch.int32)
        wc = torch.zeros(total, 3, dtype=torch.int32, device=device)
        wc[:, 2] = pos
        return wc, (0, 0, w // 2)
    return coords, tuple(int(w) // 2 for w in window)


def _block_boxes(cu: torch.Tensor, max_seqlen: int, wcoords: torch.Tensor, num_prefix: int, bs: int):
    """Per (sample, block of ``bs`` positions): min/max coords of its non-prefix tokens (empty box:
    lo = +big, hi = -big), whether it holds any token, all ``bs`` tokens, or a prefix position."""
    device = cu.device
    B = cu.numel() - 1
    nb = triton.cdiv(max_seqlen, bs)
    starts = cu[:-1].long()
    lens = cu[1:].long() - starts
    j = torch.arange(nb * bs, device=device)
    valid = (j[None, :] < lens[:, None]) & (j[None, :] >= num_prefix)
    rows = (starts[:, None] + j[None, :]).clamp_(0, max(wcoords.shape[0] - 1, 0))
    c = wcoords[rows].long()  # [B, nb*bs, 3]
    big = 1 << 40
    v = valid[..., None]
    lo = torch.where(v, c, big).view(B, nb, bs, 3).amin(2)
    hi = torch.where(v, c, -big).view(B, nb, bs, 3).amax(2)
    blk0 = torch.arange(nb, device=device) * bs
    has_tok = blk0[None, :] < lens[:, None]
    whole = (blk0[None, :] + bs) <= lens[:, None]
    has_prefix = (blk0 < num_prefix)[None, :]
    return lo, hi, has_tok, whole, has_prefix


def window_tiles(cu, max_seqlen, wcoords, radius, num_prefix, block_q, block_k, by_key: bool):
    """Classify every (query block, key block) pair of every sample, ``[B, NQ, NK]`` bools:
    ``full`` (every pair allowed and the streamed block lies inside the sample: loaded and
    computed without masks) and ``part`` (some pair allowed: a masked tile); the rest is
    skipped. Blocks are compared through the bounding boxes of their tokens' coordinates.
    ``by_key``: the kernel's programs own key blocks and stream query blocks."""
    qlo, qhi, q_has, q_whole, q_pre = _block_boxes(cu, max_seqlen, wcoords, num_prefix, block_q)
    klo, khi, k_has, k_whole, k_pre = _block_boxes(cu, max_seqlen, wcoords, num_prefix, block_k)
    r = torch.tensor(radius, device=cu.device, dtype=torch.long)
    qlo, qhi = qlo[:, :, None, :], qhi[:, :, None, :]
    klo, khi = klo[:, None, :, :], khi[:, None, :, :]
    meet = ((qlo - r <= khi) & (klo <= qhi + r)).all(-1)
    # the farthest (query, key) pair on every axis is within the radius (empty boxes: negative)
    near_all = (torch.maximum(qhi - klo, khi - qlo) <= r).all(-1)
    anyp = q_has[:, :, None] & k_has[:, None, :] & (meet | q_pre[:, :, None] | k_pre[:, None, :])
    streamed_whole = q_whole[:, :, None] if by_key else k_whole[:, None, :]
    full = anyp & streamed_whole & near_all
    return full, anyp & ~full


def tile_list(m: torch.Tensor):
    """bool ``[B, R, C]`` -> (``idx int32[B, R, C]`` listing the True columns first, ``cnt int32[B, R]``)."""
    cnt = m.sum(-1, dtype=torch.int32)
    idx = torch.argsort(m.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return idx.contiguous(), cnt.contiguous()


def window_lists(cu, max_seqlen, wcoords, radius, num_prefix, block_q, block_k, by_key: bool):
    """Tile lists for a kernel whose programs own query blocks (``by_key=False``: key blocks to
    visit) or key blocks (``by_key=True``: query blocks to visit): (full idx, full cnt, part idx, part cnt)."""
    full, part = window_tiles(cu, max_seqlen, wcoords, radius, num_prefix, block_q, block_k, by_key)
    if by_key:
        full, part = full.transpose(1, 2), part.transpose(1, 2)
    return (*tile_list(full), *tile_list(part))


def log2e() -> float:
    return 1.0 / math.log(2.0)
