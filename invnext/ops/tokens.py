"""Moving tokens between the full clip grid and packed ragged batches.

``gather_visible`` packs the visible tokens of a masked clip batch (the encoder's input),
``scatter_tokens`` puts packed tokens back at their places with a mask token everywhere
else (the predictor's input). Both are copies plus an optional position add, computed in
fp32 and rounded once.

Packed layout (flash-attn's varlen convention)::

    sample b occupies rows cu_seqlens[b] : cu_seqlens[b+1]
    its first P rows are the prefix (class) tokens, then its visible tokens: in raster order
    when they come from a mask (``hidden``), in the order listed when from ``keep_ids``
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


def keep_structure(
    keep_ids: torch.Tensor | Sequence[torch.Tensor | Sequence[int]],
    batch_size: int,
    N: int,
    num_prefix: int = 0,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``(cu_seqlens int32[B+1], max_seqlen, index int64[total])`` of the tokens named by
    ``keep_ids`` (validated), prefix rows first in every sample, then the kept tokens in the
    order ``keep_ids`` lists them. Lengths come from shapes: no host sync."""
    if isinstance(keep_ids, torch.Tensor):
        K = keep_ids.shape[1]
        ids = keep_ids.to(torch.int64) + N * torch.arange(batch_size, device=keep_ids.device)[:, None]
        lengths = [num_prefix + K] * batch_size
        rows = torch.cat((torch.full((batch_size, num_prefix), -1, dtype=torch.int64, device=ids.device), ids), 1)
        index = rows.reshape(-1)
    else:
        lengths = [num_prefix + ids.shape[0] for ids in keep_ids]
        parts = []
        for b, ids in enumerate(keep_ids):
            parts += [torch.full((num_prefix,), -1, dtype=torch.int64, device=device), ids.to(torch.int64) + b * N]
        index = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32).to(index.device, non_blocking=True)
    return cu_seqlens, (max(lengths) if lengths else 0), index


def _check_keep_ids(op: str, keep_ids: object, B: int, N: int, device: torch.device):
    """``keep_ids``: an integer tensor [B, K] (K kept tokens in every sample) or a sequence of B
    1-D integer tensors (or lists of ints) of any lengths; entries in [0, N), none twice in a sample."""
    ints = (torch.int64, torch.int32)
    if isinstance(keep_ids, torch.Tensor):
        V.check_tensor(op, "keep_ids", keep_ids, ndim=2, dtypes=ints, device=device)
        if keep_ids.shape[0] != B:
            raise ValueError(f"{op}: keep_ids must have shape [B={B}, K], got {list(keep_ids.shape)}")
        per_sample = list(keep_ids) if V.values_checked(keep_ids) else []
    elif isinstance(keep_ids, (list, tuple)):
        if len(keep_ids) != B:
            raise ValueError(f"{op}: keep_ids must hold one entry per sample ({B}), got {len(keep_ids)}")
        out = []
        for b, ids in enumerate(keep_ids):
            if not isinstance(ids, torch.Tensor):
                try:
                    ids = torch.as_tensor(ids, dtype=torch.int64, device=device)
                except (TypeError, ValueError, RuntimeError) as exc:
                    raise TypeError(f"{op}: keep_ids[{b}] must be a 1-D integer tensor or a list of ints") from exc
            V.check_tensor(op, f"keep_ids[{b}]", ids, ndim=1, dtypes=ints, device=device)
            out.append(ids)
        keep_ids = out
        per_sample = [ids for ids in out if V.values_checked(ids)]
    else:
        raise TypeError(f"{op}: keep_ids must be an integer tensor [B, K] or a sequence of B 1-D integer "
                        f"tensors, got {type(keep_ids).__name__}")
    for b, ids in enumerate(per_sample):
        if ids.numel() == 0:
            continue
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= N:
            raise ValueError(f"{op}: keep_ids must lie in [0, N={N}), sample {b} has values in [{lo}, {hi}]")
        ordered = ids.sort().values
        if bool((ordered[1:] == ordered[:-1]).any()):
            raise ValueError(f"{op}: keep_ids of sample {b} name a token more than once")
    return keep_ids


def gather_visible(
    x: torch.Tensor,
    hidden: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    prefix: torch.Tensor | None = None,
    *,
    keep_ids: torch.Tensor | Sequence[torch.Tensor | Sequence[int]] | None = None,
    num_visible: Sequence[int] | torch.Tensor | None = None,
    backend: str = "auto",
) -> PackedTokens:
    """Pack the visible tokens of each sample, prefix first, with ``pos`` added on the fly.

    Which tokens: exactly one of ``hidden`` (a mask, visible tokens in raster order) and
    ``keep_ids`` (index lists, as Hugging Face and V-JEPA 2 code keep them; tokens in the
    order listed).

    Args:
        x: [B, N, C] float tokens of the full clips (raster order).
        hidden: bool[B, N], True = hidden (dropped).
        pos: optional [B or 1, N, C] float position table added to every gathered token; cast
            to ``x``'s dtype (an fp32 table under bf16 autocast is fine).
        prefix: optional [B or 1, P, C] float class tokens placed first in each sample (no
            ``pos``); cast to ``x``'s dtype.
        keep_ids: instead of ``hidden``: int64/int32 [B, K] (K tokens kept in every sample; no
            host sync), or a sequence of B 1-D int64/int32 tensors (or lists of ints) of any
            lengths. Entries in [0, N), none repeated within a sample.
        num_visible: optional host ints [B], the visible count per sample; saves a host sync
            (with ``hidden`` only: ``keep_ids`` carry their counts in their shapes).
        backend: "auto" | "torch" | "triton" | "cuda".
    Returns:
        :class:`PackedTokens` (tokens [total, C] in x's dtype, cu_seqlens int32[B+1],
        max_seqlen, index int64[total] = ``b*N + n``, -1 on prefix rows).
    Differentiable w.r.t. ``x``, ``pos`` and ``prefix``.
    """
    op = "gather_visible"
    V.check_backend(op, backend)
    V.check_tensor(op, "x", x, ndim=3, dtypes=_HALF_AND_SINGLE)
    B, N, C = x.shape
    if (hidden is None) == (keep_ids is None):
        given = "both" if hidden is not None else "neither"
        raise ValueError(f"{op}: pass exactly one of hidden (bool mask [B, N]) and keep_ids (kept token "
                         f"indices), got {given}")
    if hidden is not None:
        V.check_tensor(op, "hidden", hidden, ndim=2, dtypes=(torch.bool,), device=x.device)
        V.check_shape(op, "hidden", hidden, (B, N))
    else:
        if num_visible is not None:
            raise ValueError(f"{op}: num_visible goes with hidden; keep_ids carry their counts in their shapes")
        keep_ids = _check_keep_ids(op, keep_ids, B, N, x.device)
    pos = _as_dtype(op, "pos", pos, x.dtype)
    prefix = _as_dtype(op, "prefix", prefix, x.dtype)
    for name, t in (("pos", pos), ("prefix", prefix)):
        if t is None:
            continue
        V.check_tensor(op, name, t, ndim=3, device=x.device)
        if t.shape[0] not in (1, B) or t.shape[2] != C:
            rows = "N" if name == "pos" else "P"
            raise ValueError(f"{op}: {name} must have shape [1 or {B}, {rows}, {C}], got {list(t.shape)}")
    if pos is not None and pos.shape[1] != N:
        raise ValueError(f"{op}: pos must have N={N} rows per sample, got {pos.shape[1]}")
    V.check_finite(op, x=x, pos=pos, prefix=prefix)
    num_prefix = 0 if prefix is None else prefix.shape[1]
    if hidden is not None:
        cu_seqlens, max_seqlen, index = packed_structure(hidden, num_prefix, num_visible)
    else:
        cu_seqlens, max_seqlen, index = keep_structure(keep_ids, B, N, num_prefix, x.device)
    tokens = dispatch(op, backend, x.device, x, index, cu_seqlens, pos, prefix)
    return PackedTokens(tokens, cu_seqlens, max_seqlen, index)


def _as_dtype(op: str, name: str, t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A float table in the tokens' dtype: fp32 parameters meet bf16 activations under autocast.
    The cast is differentiable, so the table's gradient comes back in its own dtype."""
    if t is None:
        return None
    V.check_tensor(op, name, t, dtypes=_HALF_AND_SINGLE)
    return t if t.dtype == dtype else t.to(dtype)


def token_coords(index: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(t, h, w) of every packed row, for RoPE and 3D windows (``masked_attention``'s ``coords``).

    Args:
        index: int64 or int32 [total], the flat place ``b*N + n`` of each row
            (:class:`PackedTokens`' ``index``); -1 marks a prefix row.
        grid: (T, H, W) ints, N = T*H*W, raster order (t, h, w).
    Returns:
        int32[total, 3] on ``index``'s device: ``(n // (H*W), (n // W) % H, n % W)`` with
        ``n = index % N``; prefix rows get (0, 0, 0). No host sync.
    """
    op = "token_coords"
    V.check_tensor(op, "index", index, ndim=1, dtypes=(torch.int64, torch.int32))
    T, H, W = V.check_grid(op, grid)
    V.check_index_range(op, "index", index, -1, 2**63 - 1)
    index = index.to(torch.int64)
    n = index.clamp_min(0) % (T * H * W)
    c = torch.stack((n // (H * W), (n // W) % H, n % W), dim=1)
    return c.masked_fill((index < 0)[:, None], 0).to(torch.int32)


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
    pos: torch.Tensor | None = None,
    N: int | None = None,
    *,
    batch_size: int,
    backend: str = "auto",
) -> torch.Tensor:
    """Place packed tokens back on the clip grid, ``mask_token`` at every other place, ``pos`` added.

    Every argument after ``mask_token`` may be passed by keyword:
    ``scatter_tokens(packed, index, mask_token, N=N, batch_size=B, pos=pos)``; the positional
    form ``scatter_tokens(packed, index, mask_token, pos, N, batch_size=B)`` works too.

    Args:
        packed: [total, C] float packed tokens (e.g. the encoder's output).
        index: int64[total] flat place ``b*N + n`` of each row, -1 for rows to drop (prefix).
        mask_token: [C], [1, C] or [1, 1, C] learned token written at every place no row names;
            cast to ``packed``'s dtype.
        pos: optional [B or 1, N, C] float position table added everywhere; cast to
            ``packed``'s dtype.
        N: places per sample (required).
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
    V.check_tensor(op, "mask_token", mask_token, ndim=(1, 2, 3), dtypes=_HALF_AND_SINGLE, device=dev)
    total, C = packed.shape
    if N is None:
        raise TypeError(f"{op}: N (places per sample) is required")
    for name, value in (("N", N), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    V.check_alloc(op, f"batch_size * N = {batch_size} * {N} places of {C} channels",
                  batch_size * N * C * packed.element_size(), dev)
    V.check_shape(op, "index", index, (total,))
    if tuple(mask_token.shape) not in ((C,), (1, C), (1, 1, C)):
        raise ValueError(f"{op}: mask_token must have shape [{C}], [1, {C}] or [1, 1, {C}], "
                         f"got {list(mask_token.shape)}")
    mask_token = _as_dtype(op, "mask_token", mask_token.reshape(C), packed.dtype)
    pos = _as_dtype(op, "pos", pos, packed.dtype)
    if pos is not None:
        V.check_tensor(op, "pos", pos, ndim=3, device=dev)
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
