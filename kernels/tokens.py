"""Triton kernels for the token-movement ops ``gather_visible`` and ``scatter_tokens``.

Both ops are copies with an optional position add; every kernel here is bandwidth bound, so
the design goal is the minimal byte count: each input byte read once, each output byte
written once, no intermediate ``[B, N, C]`` tensor.

Math (index[r] = b*N + n for a visible token, -1 on prefix rows; P = prefix rows per sample)::

    gather:   out[r] = prefix[b|0, j]                    if j = r - cu_seqlens[b] < P
                     = x[b, n] + pos[b|0, n]             otherwise           (fp32 add, one rounding)
    scatter:  out[b, n] = packed[r] + pos[b|0, n]        if index[r] = b*N + n for some r
                        = mask_token + pos[b|0, n]       otherwise

    gather backward:   dx[b, n] = g[r] where index[r] = b*N + n, else 0
                       dpos = dx (Bp = B) or sum_b dx[b] (Bp = 1)
                       dprefix[b, j] = g[cu_seqlens[b] + j]  (summed over b when Bq = 1)
    scatter backward:  dpacked[r] = g[index[r]] (0 where index[r] = -1)
                       dmask_token = sum of g over the places no row names
                       dpos = g (Bp = B) or sum_b g[b] (Bp = 1)

Kernels. Two shapes of program cover every pass:
- *row* programs walk packed rows ``[BLOCK_R, BLOCK_C]`` (gather forward). The sample ``b``
  of a row is found by a vectorised binary search of ``r`` in ``cu_seqlens`` inside the
  kernel: ``ceil(log2(B+1))`` loads from a B+1-entry table that stays in L1, instead of a
  ``searchsorted`` precompute that would write and re-read 8 bytes per row. It runs only
  when a prefix or a per-sample ``pos`` needs ``b``.
- *place* programs own ``[BLOCK_N, BLOCK_C]`` places of the grid and loop over the batch
  (scatter forward, both backwards). The loop keeps a shared ``pos`` tile (Bp = 1) and the
  mask token in registers for every sample, and lets the batch sums for ``dpos`` and the
  masked sum for ``dmask_token`` accumulate in fp32 registers: the full-grid gradient is
  read exactly once. They find the packed row of a place through an inverse map
  ``inv[b*N + n] = r`` (int32, -1 for places no row names), built by a tiny kernel.

The prefix gradient has its own small kernel (P rows per sample, summed over the batch in
registers when the prefix is shared). ``dmask_token`` is reduced in two deterministic steps
(fp32 partials per place block, then a torch sum over blocks). Nothing synchronises with
the host: ``total`` is ``index.shape[0]``.

Each pass is a ``torch.library`` custom op (``invnext::gather_visible_triton_fwd`` / ``_bwd``,
``invnext::scatter_tokens_triton_fwd`` / ``_bwd``) with a fake and a registered autograd
formula, so ``torch.compile`` graphs keep the kernels as single nodes; the entries below
make their arguments contiguous and call them (``invnext.ops.tokens`` has validated them).

Rows are contiguous with stride C; when C is a multiple of 8 (bf16/fp16) or 4 (fp32) the
row offsets are hinted with ``tl.multiple_of`` so the loads and stores become 16-byte
vectors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from invnext.common.interpreter import triton_interpreter
from invnext.common.registry import implements
from invnext.common.token_custom_ops import define_token_ops

# Elements per program tile at 4 warps. Place programs loop over the batch, so a larger tile
# keeps more bytes in flight per iteration (a few % faster on an H200 at both Stage shapes);
# row programs are one-shot and prefer more, smaller programs.
_ROW_TILE_ELEMS = 2048
_PLACE_TILE_ELEMS = 4096
# Triton's CPU interpreter (3.x) truncates fp32 -> bf16 where the GPU rounds to nearest even;
# under the interpreter the kernels round by hand, so CPU tests check the bits a GPU writes.
_EMULATE_BF16_RNE = tl.constexpr(triton_interpreter())


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _round_to(val, dtype: tl.constexpr):
    """``val.to(dtype)`` with round-to-nearest-even, also under the interpreter."""
    out = val.to(dtype)
    # (two operands at most: Triton's compiler rejects a chain of three `and`s)
    if _EMULATE_BF16_RNE and dtype == tl.bfloat16:
        bits = val.to(tl.float32).to(tl.uint32, bitcast=True)
        half = ((bits >> 16) & 1) + 0x7FFF  # ties go to the even neighbour
        top = (bits + half) >> 16
        top = tl.where(val != val, 0x7FC0, top)  # noqa: PLR0124 - NaN test; keep NaN a (quiet) NaN
        out = top.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return out


@triton.jit
def _gather_rows_kernel(
    out_ptr,  # [total, C]
    x_ptr,  # [B*N, C]
    index_ptr,  # int64[total]
    cu_ptr,  # int32[B+1] (read only when NEED_SAMPLE)
    pos_ptr,  # [Bp, N, C]
    prefix_ptr,  # [Bq, P, C]
    total,
    C,
    N,
    BN,
    B,
    P,
    pos_bstride,  # N*C when Bp = B, else 0
    prefix_bstride,  # P*C when Bq = B, else 0
    HAS_POS: tl.constexpr,
    HAS_PREFIX: tl.constexpr,
    NEED_SAMPLE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    ALIGN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < total
    col_ok = cols < C
    idx = tl.load(index_ptr + rows, mask=row_ok, other=-1)
    # An index outside [0, B*N) (bad input) reads nothing: its row becomes 0.
    named = row_ok & (idx >= 0) & (idx < BN)

    b = tl.zeros([BLOCK_R], dtype=tl.int32)
    if NEED_SAMPLE:
        # b = the largest s in [0, B] with cu[s] <= r; each step halves [lo, hi].
        lo = tl.zeros([BLOCK_R], dtype=tl.int32)
        hi = tl.zeros([BLOCK_R], dtype=tl.int32) + B
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi + 1) // 2
            start = tl.load(cu_ptr + mid, mask=row_ok, other=0)
            go = start <= rows
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
        b = tl.minimum(lo, B - 1)

    col2 = cols[None, :]
    tok_mask = named[:, None] & col_ok[None, :]
    src = tl.where(named, idx, 0)
    x_row = tl.multiple_of(src * C, ALIGN)
    val = tl.load(x_ptr + x_row[:, None] + col2, mask=tok_mask, other=0.0).to(ACC)
    if HAS_POS:
        pos_row = tl.multiple_of(b.to(tl.int64) * pos_bstride + (src % N) * C, ALIGN)
        val += tl.load(pos_ptr + pos_row[:, None] + col2, mask=tok_mask, other=0.0).to(ACC)
    if HAS_PREFIX:
        j = rows - tl.load(cu_ptr + b, mask=row_ok, other=0)
        is_pre = row_ok & (j >= 0) & (j < P)
        # Clamped rather than selected: Triton 3.6 mis-lays-out a select here (P >= 1 in this branch).
        pre_row = b.to(tl.int64) * prefix_bstride + tl.minimum(tl.maximum(j, 0), P - 1).to(tl.int64) * C
        pre = tl.load(prefix_ptr + pre_row[:, None] + col2, mask=is_pre[:, None] & col_ok[None, :], other=0.0)
        val = tl.where(is_pre[:, None], pre.to(ACC), val)
    out_row = tl.multiple_of(rows.to(tl.int64) * C, ALIGN)
    tl.store(
        out_ptr + out_row[:, None] + col2,
        _round_to(val, out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _invert_index_kernel(inv_ptr, index_ptr, total, BN, BLOCK: tl.constexpr):
    # inv[index[r]] = r for every row that names a place; inv was filled with -1.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < total
    idx = tl.load(index_ptr + rows, mask=ok, other=-1)
    named = ok & (idx >= 0) & (idx < BN)
    tl.store(inv_ptr + tl.where(named, idx, 0), rows, mask=named)


@triton.jit
def _zero_unnamed_rows_kernel(out_ptr, index_ptr, total, C, BN, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Rows that name no place (prefix rows) get a zero gradient; the others are written elsewhere.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = rows < total
    idx = tl.load(index_ptr + rows, mask=ok, other=0)
    unnamed = ok & ((idx < 0) | (idx >= BN))
    zero = tl.zeros([BLOCK_R, BLOCK_C], dtype=out_ptr.dtype.element_ty)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], zero, mask=unnamed[:, None] & (cols < C)[None, :]
    )


@triton.jit
def _place_tile(N, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """A place program's tile: places ``n`` (within a sample) x channels ``cols``, and their masks."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_ok = n < N
    col_ok = cols < C
    return n.to(tl.int64), cols, n_ok, col_ok, n_ok[:, None] & col_ok[None, :]


@triton.jit
def _packed_row(inv_ptr, place, n_ok, C, ALIGN: tl.constexpr):
    """(visible, element offset of its packed row) for each place; hidden places point at row 0."""
    row = tl.load(inv_ptr + place, mask=n_ok, other=-1)
    vis = row >= 0
    return vis, tl.multiple_of(tl.where(vis, row, 0).to(tl.int64) * C, ALIGN)


@triton.jit
def _scatter_places_kernel(
    out_ptr,  # [B*N, C]
    packed_ptr,  # [total, C]
    inv_ptr,  # int32[B*N]
    mask_ptr,  # [C]
    pos_ptr,  # [Bp, N, C]
    B,
    N,
    C,
    HAS_POS: tl.constexpr,
    POS_SHARED: tl.constexpr,  # Bp = 1
    ALIGN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n64, cols, n_ok, col_ok, tile_ok = _place_tile(N, C, BLOCK_N, BLOCK_C)
    col2 = cols[None, :]
    fill = tl.load(mask_ptr + cols, mask=col_ok, other=0.0).to(ACC)
    if HAS_POS and POS_SHARED:
        pos_row = tl.multiple_of(n64 * C, ALIGN)
        pos_shared = tl.load(pos_ptr + pos_row[:, None] + col2, mask=tile_ok, other=0.0).to(ACC)
    for b in range(B):
        place = n64 + b * N
        vis, src = _packed_row(inv_ptr, place, n_ok, C, ALIGN)
        tok = tl.load(packed_ptr + src[:, None] + col2, mask=vis[:, None] & col_ok[None, :], other=0.0).to(ACC)
        val = tl.where(vis[:, None], tok, fill[None, :])
        dst = tl.multiple_of(place * C, ALIGN)
        if HAS_POS:
            if POS_SHARED:
                val += pos_shared
            else:
                val += tl.load(pos_ptr + dst[:, None] + col2, mask=tile_ok, other=0.0).to(ACC)
        tl.store(out_ptr + dst[:, None] + col2, _round_to(val, out_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _gather_bwd_places_kernel(
    dx_ptr,  # [B*N, C]
    dpos_ptr,  # [Bp*N, C]
    grad_ptr,  # [total, C]
    inv_ptr,  # int32[B*N]
    B,
    N,
    C,
    STORE_DX: tl.constexpr,
    POS_MODE: tl.constexpr,  # 0: no dpos, 1: dpos per sample (= dx), 2: dpos summed over the batch
    ALIGN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n64, cols, n_ok, col_ok, tile_ok = _place_tile(N, C, BLOCK_N, BLOCK_C)
    col2 = cols[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    for b in range(B):
        place = n64 + b * N
        vis, src = _packed_row(inv_ptr, place, n_ok, C, ALIGN)
        g = tl.load(grad_ptr + src[:, None] + col2, mask=vis[:, None] & col_ok[None, :], other=0.0)
        dst = tl.multiple_of(place * C, ALIGN)
        if STORE_DX:
            tl.store(dx_ptr + dst[:, None] + col2, g, mask=tile_ok)
        if POS_MODE == 1:
            tl.store(dpos_ptr + dst[:, None] + col2, g, mask=tile_ok)
        if POS_MODE == 2:
            acc += g.to(ACC)
    if POS_MODE == 2:
        pos_row = tl.multiple_of(n64 * C, ALIGN)
        tl.store(dpos_ptr + pos_row[:, None] + col2, _round_to(acc, dpos_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _scatter_bwd_places_kernel(
    dpacked_ptr,  # [total, C]
    dpos_ptr,  # [N, C] (only when POS_SUM)
    mask_part_ptr,  # ACC[num_place_blocks, C]
    grad_ptr,  # [B*N, C]
    inv_ptr,  # int32[B*N]
    B,
    N,
    C,
    STORE_PACKED: tl.constexpr,
    POS_SUM: tl.constexpr,
    MASK_GRAD: tl.constexpr,
    ALIGN: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n64, cols, n_ok, col_ok, tile_ok = _place_tile(N, C, BLOCK_N, BLOCK_C)
    col2 = cols[None, :]
    acc_pos = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    acc_mask = tl.zeros([BLOCK_N, BLOCK_C], dtype=ACC)
    for b in range(B):
        place = n64 + b * N
        g = tl.load(grad_ptr + tl.multiple_of(place * C, ALIGN)[:, None] + col2, mask=tile_ok, other=0.0)
        vis, dst = _packed_row(inv_ptr, place, n_ok, C, ALIGN)
        if STORE_PACKED:
            tl.store(dpacked_ptr + dst[:, None] + col2, g, mask=vis[:, None] & col_ok[None, :])
        if POS_SUM:
            acc_pos += g.to(ACC)
        if MASK_GRAD:
            acc_mask += tl.where(vis[:, None], 0.0, g.to(ACC))
    if POS_SUM:
        pos_row = tl.multiple_of(n64 * C, ALIGN)
        tl.store(dpos_ptr + pos_row[:, None] + col2, _round_to(acc_pos, dpos_ptr.dtype.element_ty), mask=tile_ok)
    if MASK_GRAD:
        tl.store(mask_part_ptr + tl.program_id(0).to(tl.int64) * C + cols, tl.sum(acc_mask, axis=0), mask=col_ok)


@triton.jit
def _prefix_grad_kernel(
    dprefix_ptr,  # [Bq, P, C]
    grad_ptr,  # [total, C]
    cu_ptr,  # int32[B+1]
    B,
    P,
    C,
    total,
    SUM_BATCH: tl.constexpr,  # Bq = 1
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    j = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    j_ok = j < P
    col_ok = cols < C
    col2 = cols[None, :]
    tile_ok = j_ok[:, None] & col_ok[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for b in range(B):
        start = tl.load(cu_ptr + b)
        end = tl.minimum(tl.load(cu_ptr + b + 1), total)
        row = start + j
        has = j_ok & (row < end)  # a sample shorter than P has no row for the rest
        src = tl.where(has, row, 0).to(tl.int64) * C
        g = tl.load(grad_ptr + src[:, None] + col2, mask=has[:, None] & col_ok[None, :], other=0.0)
        if SUM_BATCH:
            acc += g.to(ACC)
        else:
            dst = (b * P + j).to(tl.int64) * C
            tl.store(dprefix_ptr + dst[:, None] + col2, g, mask=tile_ok)
    if SUM_BATCH:
        dst = j.to(tl.int64) * C
        tl.store(dprefix_ptr + dst[:, None] + col2, _round_to(acc, dprefix_ptr.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _acc_torch(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiles(C: int, elems: int = _ROW_TILE_ELEMS) -> tuple[int, int, int, int]:
    """(BLOCK_C, rows per program, num_warps, ALIGN) for rows of C elements, ``elems`` per tile.

    BLOCK_C is the power of two <= 256 that pads C least (ties to the larger), so C = 768
    runs as 3 x 256 and C = 1408 as 11 x 128 with no masked lanes. ALIGN is the largest
    power of two (<= 16) dividing C, the row-offset hint that unlocks 16-byte accesses.
    """
    if C <= 256:
        block_c = triton.next_power_of_2(max(C, 1))
    else:
        block_c = min((256, 128, 64), key=lambda bc: (triton.cdiv(C, bc) * bc - C, -bc))
    rows = max(1, elems // block_c)
    align = 1
    while align < 16 and C % (align * 2) == 0:
        align *= 2
    return block_c, rows, 4, align


def _place_launch(N: int, C: int, dtype: torch.dtype) -> tuple[tuple[int, int], dict]:
    """(grid, tile keywords) of a place launch over ``[N, C]``: one tiling for the three place
    kernels, whose signatures end in the same constexprs, so a retuned tile reaches them all."""
    block_c, block_n, warps, align = _tiles(C, _PLACE_TILE_ELEMS)
    grid = (triton.cdiv(N, block_n), triton.cdiv(C, block_c))
    tile = {"ALIGN": align, "ACC": _acc_dtype(dtype), "BLOCK_N": block_n, "BLOCK_C": block_c, "num_warps": warps}
    return grid, tile


def _inverse_map(index: torch.Tensor, places: int) -> torch.Tensor:
    """int32[places]: inv[p] = the row r with index[r] = p, -1 where no row names p."""
    inv = torch.full((places,), -1, dtype=torch.int32, device=index.device)
    total = index.shape[0]
    if total > 0 and places > 0:
        block = 1024
        _invert_index_kernel[(triton.cdiv(total, block),)](inv, index, total, places, BLOCK=block, num_warps=4)
    return inv


def _gather_rows(
    x: torch.Tensor,
    index: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    pos: torch.Tensor | None,
    prefix: torch.Tensor | None,
) -> torch.Tensor:
    """The gather forward kernel on contiguous inputs; also serves the prefix-grad gather."""
    B, N, C = x.shape
    total = index.shape[0]
    out = torch.empty(total, C, dtype=x.dtype, device=x.device)
    if total == 0 or C == 0:
        return out
    P = prefix.shape[1] if prefix is not None else 0
    has_prefix = P > 0
    per_sample_pos = pos is not None and pos.shape[0] > 1
    need_sample = has_prefix or per_sample_pos
    block_c, block_r, warps, align = _tiles(C)
    grid = (triton.cdiv(total, block_r), triton.cdiv(C, block_c))
    _gather_rows_kernel[grid](
        out,
        x,
        index,
        cu_seqlens if need_sample else index,
        pos if pos is not None else x,
        prefix if has_prefix else x,
        total,
        C,
        N,
        B * N,
        B,
        P,
        N * C if per_sample_pos else 0,
        P * C if has_prefix and prefix.shape[0] > 1 else 0,
        HAS_POS=pos is not None,
        HAS_PREFIX=has_prefix,
        NEED_SAMPLE=need_sample,
        SEARCH_STEPS=max(1, B.bit_length()),
        ALIGN=align,
        ACC=_acc_dtype(x.dtype),
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return out


# ----------------------------------------------------------------------------------------
# gather_visible
# ----------------------------------------------------------------------------------------
def _gather_backward(grad, index, cu_seqlens, B, N, pos_batch, prefix_batch, P, need_x, need_pos, need_prefix):
    """(dx, dpos, dprefix); a gradient that is not needed comes back with a leading dim of 0."""
    C = grad.shape[1]
    grad = grad.contiguous()
    new = lambda lead, rows, need: torch.empty(lead if need else 0, rows, C, dtype=grad.dtype, device=grad.device)
    dx, dpos, dprefix = new(B, N, need_x), new(pos_batch, N, need_pos), new(prefix_batch, P, need_prefix)
    pos_mode = 0 if not need_pos else (1 if pos_batch > 1 else 2)
    if (need_x or pos_mode) and B * N > 0 and C > 0:
        inv = _inverse_map(index, B * N)
        grid, tile = _place_launch(N, C, grad.dtype)
        _gather_bwd_places_kernel[grid](
            dx if need_x else grad,
            dpos if pos_mode else grad,
            grad,
            inv,
            B,
            N,
            C,
            STORE_DX=need_x,
            POS_MODE=pos_mode,
            **tile,
        )
    if need_prefix and P > 0 and C > 0:
        block_c, _, warps, _ = _tiles(C)
        block_p = min(triton.next_power_of_2(P), 16)
        _prefix_grad_kernel[(triton.cdiv(P, block_p), triton.cdiv(C, block_c))](
            dprefix,
            grad,
            cu_seqlens,
            B,
            P,
            C,
            grad.shape[0],
            SUM_BATCH=prefix_batch == 1 and B > 1,
            ACC=_acc_dtype(grad.dtype),
            BLOCK_P=block_p,
            BLOCK_C=block_c,
            num_warps=warps,
        )
    return dx, dpos, dprefix


# ----------------------------------------------------------------------------------------
# scatter_tokens
# ----------------------------------------------------------------------------------------
def _scatter_forward(packed, index, mask_token, pos, batch_size, N):
    """(out [B, N, C], inv int32[B*N]); ``inv`` is kept for the backward."""
    C = packed.shape[1]
    inv = _inverse_map(index, batch_size * N)
    out = torch.empty(batch_size, N, C, dtype=packed.dtype, device=packed.device)
    if batch_size * N > 0 and C > 0:
        grid, tile = _place_launch(N, C, packed.dtype)
        _scatter_places_kernel[grid](
            out,
            packed,
            inv,
            mask_token,
            pos if pos is not None else packed,
            batch_size,
            N,
            C,
            HAS_POS=pos is not None,
            POS_SHARED=pos is not None and pos.shape[0] == 1,
            **tile,
        )
    return out, inv


def _scatter_backward(grad, index, inv, need_packed, need_mask, need_pos_sum):
    """(dpacked [total, C], dmask_token [C], dpos summed over the batch [1, N, C]); an output
    that is not needed has a leading dim of 0. A per-sample ``pos`` needs no kernel (its
    gradient is ``grad`` itself), so the autograd formula handles it."""
    B, N, C = grad.shape
    total = index.shape[0]
    grad = grad.contiguous()
    acc = _acc_torch(grad.dtype)
    grid, tile = _place_launch(N, C, grad.dtype)
    n_blocks = grid[0]  # one dmask_token partial row per place block
    dev = grad.device
    dpacked = torch.empty(total if need_packed else 0, C, dtype=grad.dtype, device=dev)
    dpos = torch.empty(1 if need_pos_sum else 0, N, C, dtype=grad.dtype, device=dev)
    parts = torch.empty(n_blocks if need_mask else 0, C, dtype=acc, device=dev)
    if (need_packed or need_mask or need_pos_sum) and B * N > 0 and C > 0:
        _scatter_bwd_places_kernel[grid](
            dpacked if need_packed else grad,
            dpos if need_pos_sum else grad,
            parts if need_mask else grad,
            grad,
            inv,
            B,
            N,
            C,
            STORE_PACKED=need_packed,
            POS_SUM=need_pos_sum,
            MASK_GRAD=need_mask,
            **tile,
        )
    if need_packed and total > 0 and C > 0:
        block_c = tile["BLOCK_C"]
        rows = max(1, _ROW_TILE_ELEMS // block_c)
        _zero_unnamed_rows_kernel[(triton.cdiv(total, rows), triton.cdiv(C, block_c))](
            dpacked, index, total, C, B * N, BLOCK_R=rows, BLOCK_C=block_c, num_warps=tile["num_warps"]
        )
    if not need_mask:
        dmask = torch.empty(0, dtype=grad.dtype, device=dev)
    elif B * N > 0:
        dmask = parts.sum(0).to(grad.dtype)
    else:
        dmask = torch.zeros(C, dtype=grad.dtype, device=dev)
    return dpacked, dmask, dpos


# ----------------------------------------------------------------------------------------
# torch.library ops (docs/ops_contract.md, "Custom ops"): torch.compile sees each launch as
# one opaque node whose fake gives the output's shape; ``total`` is ``index.shape[0]``, so no
# output size depends on tensor values.
# ----------------------------------------------------------------------------------------
(
    gather_visible_triton_fwd,
    gather_visible_triton_bwd,
    scatter_tokens_triton_fwd,
    scatter_tokens_triton_bwd,
) = define_token_ops(
    "triton",
    gather_forward=_gather_rows,
    gather_backward=_gather_backward,
    scatter_forward=_scatter_forward,
    scatter_backward=_scatter_backward,
    # Registered for every device (the interpreter runs the kernels on the CPU); an absent
    # table has batch 0, and a shared pos (batch 1) gets its gradient summed over the batch.
    absent_batch=0,
    sum_pos_grad=lambda pos_batch, batch_size: pos_batch == 1,
)


# ----------------------------------------------------------------------------------------
# public entries (canonical signatures). Named ``<op>_triton``: they take the packed
# structure (index, cu_seqlens) that ``invnext.ops.gather_visible`` builds from the mask, so
# they are not that op's signature and must not pass for it.
# ----------------------------------------------------------------------------------------
@implements("gather_visible", "triton")
def gather_visible_triton(
    x: torch.Tensor,
    index: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pos: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pack rows of ``x`` (plus ``pos``) with each sample's prefix first; Triton backend.

    Args:
        x: [B, N, C] fp32/fp16/bf16/fp64 tokens of the full clips.
        index: int64[total], flat place ``b*N + n`` of each packed row, -1 on prefix rows.
        cu_seqlens: int32[B+1], row offsets of the samples in the packed batch.
        pos: optional [1 or B, N, C] in x's dtype, added to every gathered token.
        prefix: optional [1 or B, P, C] in x's dtype, copied into the first P rows of each sample.
    Returns:
        [total, C] in x's dtype; the add runs in fp32 (fp64 for fp64) and rounds once.
    Differentiable w.r.t. x, pos and prefix. No host synchronisation.
    """
    contig = lambda t: None if t is None else t.contiguous()
    return gather_visible_triton_fwd(
        x.contiguous(), index.contiguous(), cu_seqlens.contiguous(), contig(pos), contig(prefix)
    )


@implements("scatter_tokens", "triton")
def scatter_tokens_triton(
    packed: torch.Tensor,
    index: torch.Tensor,
    mask_token: torch.Tensor,
    pos: torch.Tensor | None,
    batch_size: int,
    N: int,
) -> torch.Tensor:
    """Put packed rows back on the ``[batch_size, N]`` grid, ``mask_token`` elsewhere, ``pos`` added; Triton backend.

    Args:
        packed: [total, C] fp32/fp16/bf16/fp64 rows.
        index: int64[total], place ``b*N + n`` of each row; -1 rows (prefix) are dropped.
            The places named must be distinct (as ``gather_visible`` builds them).
        mask_token: [C] in packed's dtype, written at every place no row names.
        pos: optional [1 or batch_size, N, C] in packed's dtype, added everywhere.
        batch_size, N: the grid.
    Returns:
        [batch_size, N, C] in packed's dtype; adds in fp32 (fp64 for fp64), one rounding.
    Differentiable w.r.t. packed, mask_token and pos. No host synchronisation.
    """
    out, _ = scatter_tokens_triton_fwd(
        packed.contiguous(),
        index.contiguous(),
        mask_token.contiguous(),
        None if pos is None else pos.contiguous(),
        batch_size,
        N,
    )
    return out
