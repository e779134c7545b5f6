"""The packed-batch layout the patched attention layers read, and the attention call they share.

A model whose attention modules forward no extra arguments (most of transformers' vision
models, timm's ViT) cannot be handed ``cu_seqlens`` per call. :func:`packed` sets the layout
for the duration of a ``with`` block in a context variable: scoped to the block and to the
thread or task that entered it, so concurrent models do not see each other's batches.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, NamedTuple

import torch

from invnext import ops


class Packing(NamedTuple):
    """A packed ragged batch: sample b's queries are rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.

    cu_seqlens_q: int32 or int64 [B+1]
    max_seqlen_q: int, the longest sample's queries
    total_q:      int, ``cu_seqlens_q[-1]`` (read once, on entry)
    cu_seqlens_k, max_seqlen_k, total_k: the same for keys (self-attention: the query values)
    num_prefix:   prefix (class/register) tokens at the start of every sample
    """

    cu_seqlens_q: torch.Tensor
    max_seqlen_q: int
    total_q: int
    cu_seqlens_k: torch.Tensor
    max_seqlen_k: int
    total_k: int
    num_prefix: int


_CURRENT: contextvars.ContextVar[Packing | None] = contextvars.ContextVar("invnext_packing", default=None)


@contextlib.contextmanager
def packed(
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
    num_prefix: int = 0,
) -> Iterator[Packing]:
    """Within the block, attention patched by invnext treats an input of batch size 1 whose
    length is ``cu_seqlens[-1]`` as a packed ragged batch: each sample attends only to itself.

    Args:
        cu_seqlens: int32/int64 [B+1] prefix sums of the per-sample lengths (a
            :class:`invnext.ops.PackedTokens`' ``cu_seqlens``).
        max_seqlen: the longest sample (host int).
        cu_seqlens_k / max_seqlen_k: keys' layout where it differs (cross-attention); default:
            the queries'.
        num_prefix: prefix tokens at the start of every sample (timm's class/register tokens).
    Reads ``cu_seqlens[-1]`` once on entry (a host sync on a GPU tensor).
    """
    for name, cu in (("cu_seqlens", cu_seqlens), ("cu_seqlens_k", cu_seqlens_k)):
        if cu is not None and (not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64)
                               or cu.ndim != 1 or cu.numel() < 2):
            raise ValueError(f"invnext.integrations.packed: {name} must be an int32/int64 tensor [B+1], got {cu!r}")
    if (cu_seqlens_k is None) != (max_seqlen_k is None):
        raise ValueError("invnext.integrations.packed: give cu_seqlens_k and max_seqlen_k together")
    total_q = int(cu_seqlens[-1])
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k, total_k = cu_seqlens, max_seqlen, total_q
    else:
        total_k = int(cu_seqlens_k[-1])
    packing = Packing(cu_seqlens, int(max_seqlen), total_q, cu_seqlens_k, int(max_seqlen_k), total_k, num_prefix)
    token = _CURRENT.set(packing)
    try:
        yield packing
    finally:
        _CURRENT.reset(token)


def current_packing() -> Packing | None:
    """The layout set by the innermost :func:`packed` block, or None."""
    return _CURRENT.get()


def _uniform(batch: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch + 1, device=device, dtype=torch.int32) * length


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax_scale: float | None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    layout: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
    num_prefix: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention of ``q [B, Hq, L, D]`` over ``k, v [B, Hk, S, D]`` (transformers' and timm's
    layout) -> ``[B, L, Hq, D]``.

    ``layout = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)`` for a packed batch
    (B = 1, L and S the packed totals); without it, the enclosing :func:`packed` block's layout
    applies when B = 1 and the lengths match, else every one of the B rows is one sample.
    Self-attention without a causal mask, window or grouped heads runs
    :func:`invnext.ops.masked_attention`; everything else :func:`invnext.ops.varlen_attention`.
    """
    B, Hq, L, D = q.shape
    S, Hk = k.shape[2], k.shape[1]
    if layout is None:
        pack = _CURRENT.get()
        if pack is not None and B == 1 and L == pack.total_q and S == pack.total_k:
            layout = (pack.cu_seqlens_q, pack.cu_seqlens_k, pack.max_seqlen_q, pack.max_seqlen_k)
            num_prefix = max(num_prefix, pack.num_prefix)
    if layout is None:
        cu_q = _uniform(B, L, q.device)
        cu_k = cu_q if S == L else _uniform(B, S, q.device)
        layout = (cu_q, cu_k, L, S)
    elif B != 1:
        raise ValueError(f"invnext attention: a packed batch has batch size 1, got query shape {list(q.shape)}")
    cu_q, cu_k, max_q, max_k = layout
    rows_q, rows_k = B * L, B * S
    qr = q.transpose(1, 2).reshape(rows_q, Hq, D)
    kr = k.transpose(1, 2).reshape(rows_k, Hk, D)
    vr = v.transpose(1, 2).reshape(rows_k, Hk, v.shape[-1])
    # Only the same tensor counts as self-attention: comparing values would read the device.
    self_attention = cu_k is cu_q and L == S
    plain = self_attention and not causal and window_size == (-1, -1) and Hq == Hk and v.shape[-1] == D
    # masked_attention's kernel takes head dims 16..128; without a window, prefix tokens change
    # nothing, so larger heads go to varlen_attention, whose kernel takes up to 256
    if plain and 16 <= D <= 128:
        out = ops.masked_attention(qr, kr, vr, cu_q.to(torch.int32), int(max_q), softmax_scale=softmax_scale,
                                   num_prefix=num_prefix, backend=backend)  # fmt: skip
    else:
        out = ops.varlen_attention(qr, kr, vr, cu_q, cu_k, int(max_q), int(max_k), softmax_scale=softmax_scale,
                                   causal=causal, window_size=tuple(window_size), backend=backend)  # fmt: skip
    return out.view(B, L, Hq, out.shape[-1])
