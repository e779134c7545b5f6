"""Moving tokens between the full clip grid and packed ragged batches.

``gather_visible`` packs the visible tokens of a masked clip batch (the encoder's input),
``scatter_tokens`` puts packed tokens back at their places with a mask token everywhere
else (the predictor's input). Both are copies plus an optional position add, computed in
fp32 and rounded once.

Packed layout (flash-attn's varlen convention)::

    sample b occupies rows cu_seqlens[b] : cu_seqlens[b+1]
    its first P rows are the prefix (class) tokens, then its visible tokens in raster order
    index[r] = b * N + n for a visible token, -1 for a prefix row

Nothing here synchronises with the host when the caller passes ``num_visible`` (the mask
sampler knows its counts); without it, one small device-to-host copy of the per-sample
counts sizes the output.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from invnext.common import validate as V
from ._dispatch import dispatch, register_reference

_HALF_AND_SINGLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class PackedTokens(NamedTuple):
    """Output of :func:`gather_visible`.

    tokens:     [total, C], x's dtype
    cu_seqlens: int32[B+1], prefix sums of per-sample lengths (prefix included)
    max_seqlen: int, the longest sample
    index:      int64[total], flat position ``b*N + n`` of each packed token, -1 for prefix rows
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    index: torch.Tensor


def _sample_of_row(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    rows = torch.arange(total, device=cu_seqlens.device, dtype=torch.int64)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), rows, right=True)


def packed_structure(
    hidden: torch.Tensor, num_prefix: int = 0, num_visible: Sequence[int] | torch.Tensor | None = None
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``(cu_seqlens int32[B+1], max_seqlen, index int64[total])`` of the packed visible tokens.

    Built by a prefix sum and one scatter (stream compaction), so it needs no host sync
    when ``num_visible`` (host ints, one per sample) is given.
    """
    op = "gather_visible"
    B, N = hidden.shape
    visible = ~hidden
    if num_visible is None:
        V.check_host_readable(op, "hidden", hidden, "the visible counts are read from it: pass num_visible")
        counts = [int(c) for c in visible.sum(1).cpu()]
    else:
        if isinstance(num_visible, torch.Tensor):
            num_visible = num_visible.tolist()
        counts = [int(c) for c in num_visible]  # host ints: nothing below reads the device
        if len(counts) != B:
            raise ValueError(f"{op}: num_visible must have one entry per sample ({B}), got {len(counts)}")
        if V.values_checked(hidden) and counts != visible.sum(1).tolist():
            raise ValueError(f"{op}: num_visible {counts} does not match the visible counts of hidden")
    seqlens = [c + num_prefix for c in counts]
    cu_list = [0]
    for n in seqlens:
        cu_list.append(cu_list[-1] + n)
    total = cu_list[-1]
    max_seqlen = max(seqlens) if B > 0 else 0
    cu_host = torch.tensor(cu_list, dtype=torch.int32)
    device = hidden.device
    cu_seqlens = cu_host.to(device, non_blocking=True)

    flat = visible.reshape(-1)
    rank = torch.cumsum(flat.to(torch.int64), 0) - 1  # global rank among visible tokens
    sample = torch.arange(B * N, device=device, dtype=torch.int64) // N
    row = rank + (sample + 1) * num_prefix
    # Hidden places write into a dump slot at `total`, dropped afterwards: no boolean indexing.
    target = torch.where(flat, row, torch.full_like(row, total))
    index = torch.full((total + 1,), -1, dtype=torch.int64, device=device)
    index.scatter_(0, target, torch.arange(B * N, device=device, dtype=torch.int64))
    index = index[:total]  # prefix rows are never targeted, so they keep -1
    return cu_seqlens, max_seqlen, index


@register_reference("gather_visible")
def gather_visible_reference(
    x: torch.Tensor,
    index: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pos: torch.Tensor | None,
    prefix: torch.Tensor | None,
) -> torch.Tensor:
    B, N, C = x.shape
    total = index.shape[0]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    src = index.clamp_min(0)
    out = x.reshape(B * N, C)[src].to(compute)
    sample = _sample_of_row(cu_seqlens, total)
    if pos is not None:
        pos_rows = (sample if pos.shape[0] > 1 else torch.zeros_like(sample)) * N + src % N
        out = out + pos.reshape(-1, C)[pos_rows].to(compute)
    if prefix is not None and prefix.shape[1] > 0:
        P = prefix.shape[1]
        local = torch.arange(total, device=x.device) - cu_seqlens.to(torch.int64)[sample]
        is_prefix = local < P
        pre_rows = (sample if prefix.shape[0] > 1 else torch.zeros_like(sample)) * P + local.clamp(0, P - 1)
        out = torch.where(is_prefix[:, None], prefix.reshape(-1, C)[pre_rows].to(compute), out)
    return out.to(x.dtype)


def gather_visible(
    x: torch.Tensor,
    hidden: torch.Tensor,
    pos: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    *,
    num_visible: Sequence[int] | torch.Tensor | None = None,
    backend: str = "auto",
) -> PackedTokens:
    """Pack the visible tokens of each sample, prefix first, with ``pos`` added on the fly.

    Args:
        x: [B, N, C] float tokens of the full clips (raster order).
        hidden: bool[B, N], True = hidden (dropped).
        pos: optional [B or 1, N, C] position table added to every gathered token.
        prefix: optional [B or 1, P, C] class tokens placed first in each sample (no ``pos``).
        num_visible: optional host ints [B], the visible count per sample; saves a host sync.
        backend: "auto" | "torch" | "triton" | "cuda".
    Returns:
        :class:`PackedTokens` (tokens [total, C], cu_seqlens int32[B+1], max_seqlen, index int64[total]).
    Differentiable w.r.t. ``x``, ``pos`` and ``prefix``.
    """
    op = "gather_visible"
    V.check_backend(op, backend)
    V.check_tensor(op, "x", x, ndim=3, dtypes=_HALF_AND_SINGLE)
    V.check_tensor(op, "hidden", hidden, ndim=2, dtypes=(torch.bool,), device=x.device)
    B, N, C = x.shape
    V.check_shape(op, "hidden", hidden, (B, N))
    for name, t in (("pos", pos), ("prefix", prefix)):
        if t is None:
            continue
        V.check_tensor(op, name, t, ndim=3, dtypes=(x.dtype,), device=x.device)
        if t.shape[0] not in (1, B) or t.shape[2] != C:
            rows = "N" if name == "pos" else "P"
            raise ValueError(f"{op}: {name} must have shape [1 or {B}, {rows}, {C}], got {list(t.shape)}")
    if pos is not None and pos.shape[1] != N:
        raise ValueError(f"{op}: pos must have N={N} rows per sample, got {pos.shape[1]}")
    V.check_finite(op, x=x, pos=pos, prefix=prefix)
    num_prefix = 0 if prefix is None else prefix.shape[1]
    cu_seqlens, max_seqlen, index = packed_structure(hidden, num_prefix, num_visible)
    tokens = dispatch(op, backend, x.device, x, index, cu_seqlens, pos, prefix)
    return PackedTokens(tokens, cu_seqlens, max_seqlen, index)


@register_reference("scatter_tokens")
def scatter_tokens_reference(
    packed: torch.Tensor,
    index: torch.Tensor,
    mask_token: torch.Tensor,
    pos: torch.Tensor | None,
    batch_size: int,
    N: int,
) -> torch.Tensor:
    C = packed.shape[1]
    BN = batch_size * N
    compute = torch.float64 if packed.dtype == torch.float64 else torch.float32
    target = torch.where(index >= 0, index, torch.full_like(index, BN))  # prefix rows -> dump slot
    placed = torch.zeros(BN + 1, C, dtype=compute, device=packed.device).index_copy(0, target, packed.to(compute))
    filled = torch.zeros(BN + 1, dtype=torch.bool, device=packed.device).index_fill(0, target, True)
    out = torch.where(filled[:BN, None], placed[:BN], mask_token.to(compute).expand(BN, C))
    out = out.view(batch_size, N, C)
    if pos is not None:
        out = out + pos.to(compute)
    return out.to(packed.dtype)


def scatter_tokens(
    packed: torch.Tensor,
    index: torch.Tensor,
    mask_token: torch.Tensor,
    pos: torch.Tensor | None,
    N: int,
    *,
    batch_size: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Place packed tokens back on the clip grid, ``mask_token`` at every other place, ``pos`` added.

    Args:
        packed: [total, C] packed tokens (e.g. the encoder's output).
        index: int64[total] flat place ``b*N + n`` of each row, -1 for rows to drop (prefix).
        mask_token: [C] learned token written at every place no row names.
        pos: optional [B or 1, N, C] position table added everywhere.
        N: places per sample.
        batch_size: B (given, not read from ``index``, so no host sync).
    Where values are checked (``_validate``), ``index`` must lie in ``[-1, B*N)`` and name
    no place twice.
    Returns:
        [B, N, C] in ``packed``'s dtype. Differentiable w.r.t. ``packed``, ``mask_token`` and ``pos``.
    """
    op = "scatter_tokens"
    V.check_backend(op, backend)
    V.check_tensor(op, "packed", packed, ndim=2, dtypes=_HALF_AND_SINGLE)
    dev = packed.device
    V.check_tensor(op, "index", index, ndim=1, dtypes=(torch.int64,), device=dev)
    V.check_tensor(op, "mask_token", mask_token, ndim=1, dtypes=(packed.dtype,), device=dev)
    total, C = packed.shape
    for name, value in (("N", N), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    V.check_alloc(op, f"batch_size * N = {batch_size} * {N} places of {C} channels",
                  batch_size * N * C * packed.element_size(), dev)
    V.check_shape(op, "index", index, (total,))
    V.check_shape(op, "mask_token", mask_token, (C,))
    if pos is not None:
        V.check_tensor(op, "pos", pos, ndim=3, dtypes=(packed.dtype,), device=dev)
        if pos.shape[0] not in (1, batch_size) or tuple(pos.shape[1:]) != (N, C):
            raise ValueError(f"{op}: pos must have shape [1 or {batch_size}, {N}, {C}], got {list(pos.shape)}")
    V.check_index_range(op, "index", index, -1, batch_size * N)
    if index.numel() and V.values_checked(index):
        # Two rows at one place: which one lands there differs between backends (and runs).
        placed = index[index >= 0].sort().values
        same = placed[1:] == placed[:-1]
        if bool(same.any()):
            raise ValueError(
                f"{op}: index names place {int(placed[1:][same][0])} more than once "
                f"({int(same.sum())} duplicate(s)); every place takes at most one packed row"
            )
    V.check_finite(op, packed=packed, mask_token=mask_token, pos=pos)
    return dispatch(op, backend, dev, packed, index, mask_token, pos, batch_size, N)
