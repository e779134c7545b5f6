"""Mask samplers: which tokens of a clip the encoder does not see.

Conventions (kernels.md): ``grid = (T, H, W)``, ``N = T*H*W`` tokens in raster order
(t, h, w), ``S = H*W`` tokens per frame; every sampler returns ``hidden: bool[B, N]`` with
True = hidden from the encoder.

Randomness: every random number is ``philox_uniform(seed, stream, counter)`` or
``philox_bits(seed, stream, counter)`` (``invnext.ops.philox``), with one stream per
sampler and a counter given by the sample/block/token index (documented per op). So one
seed gives the same mask on the CPU, the GPU and in any dataloader worker, and a kernel
reproduces the reference bit for bit by evaluating the same counters. ``seed=None`` draws
a seed from ``generator`` (a CPU ``torch.Generator``) or from torch's default CPU generator.

Counts: ``count(ratio, S) = min(floor(ratio * S + 1/2), S - 1)`` tokens of a frame are
hidden (round half up). The ``S - 1`` cap keeps the promise of ``ratio < 1``: every frame
keeps at least one visible token, so no sample reaches the encoder empty.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from invnext.common.mask_geometry import (  # noqa: F401 (some only re-exported: tests and benchmarks read them here)
    MULTIBLOCK_SLOTS,
    STREAM_MULTIBLOCK,
    STREAM_SEMANTIC,
    STREAM_TUBE,
    boxes_on,
    check_num_prefix,
    hidden_count,
    multiblock_boxes,
    multiblock_hidden_counts,
)
from invnext.common.philox import philox_bits, philox_uniform, seed_from
from invnext.common.validate import (
    FLOAT_DTYPES,
    check_alloc,
    check_backend,
    check_device,
    check_finite,
    check_grid,
    check_host_readable,
    check_range,
    check_tensor,
    values_checked,
)
from invnext.ops._dispatch import dispatch, register_reference

SEMANTIC_MODES = ("topk", "sample")


# --------------------------------------------------------------------------- helpers


def _check_positive_int(op: str, name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be >= 1, got {value}")
    return value


def _check_ratio(op: str, ratio: object) -> float:
    if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool):
        raise TypeError(f"{op}: ratio must be a real number, got {type(ratio).__name__}")
    if not 0.0 <= float(ratio) < 1.0:
        raise ValueError(f"{op}: ratio must lie in [0, 1), got {ratio}")
    return float(ratio)


def _check_ratios(op: str, ratio: object, batch_size: int) -> float | tuple[float, ...]:
    """One ratio for the batch (a float) or one per sample (a sequence or a 1-D tensor of
    ``batch_size`` reals), each in [0, 1). A tensor's values are read on the host."""
    if isinstance(ratio, torch.Tensor):
        if ratio.ndim == 0:
            ratio = ratio.item()
        else:
            if ratio.ndim != 1 or ratio.is_complex() or ratio.dtype == torch.bool:
                raise TypeError(f"{op}: ratio as a tensor must be 1-D real [batch_size], got "
                                f"{ratio.dtype} of shape {list(ratio.shape)}")
            check_host_readable(op, "ratio", ratio, "the per-sample counts are read from it")
            ratio = ratio.tolist()
    if isinstance(ratio, (list, tuple)):
        if len(ratio) != batch_size:
            raise ValueError(f"{op}: ratio must have one entry per sample (batch_size={batch_size}), "
                             f"got {len(ratio)}")
        out = []
        for b, r in enumerate(ratio):
            if not isinstance(r, numbers.Real) or isinstance(r, bool):
                raise TypeError(f"{op}: ratio[{b}] must be a real number, got {type(r).__name__}")
            if not 0.0 <= float(r) < 1.0:
                raise ValueError(f"{op}: ratio[{b}] must lie in [0, 1), got {r}")
            out.append(float(r))
        return tuple(out)
    if not isinstance(ratio, numbers.Real) or isinstance(ratio, bool):
        raise TypeError(f"{op}: ratio must be a real number or one per sample (a sequence or 1-D tensor), "
                        f"got {type(ratio).__name__}")
    return _check_ratio(op, ratio)


def tube_hidden_counts(ratio: float | tuple[float, ...], batch_size: int, frame_size: int) -> list[int]:
    """Hidden positions per frame of every sample: ``hidden_count(ratio_b, S)``, host ints [B]."""
    ratios = ratio if isinstance(ratio, tuple) else (ratio,) * batch_size
    return [hidden_count(r, frame_size) for r in ratios]


def _seed(op: str, generator: object, seed: object) -> int:
    try:
        return seed_from(generator, seed)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{op}: {exc}") from None


def _device(op: str, device: object) -> torch.device:
    return check_device(op, device)


def _check_mask_size(op: str, batch_size: int, grid: tuple[int, int, int], device: torch.device, per_frame: int):
    """The bool[B, N] mask plus ``per_frame`` bytes per (sample, frame position) of working memory."""
    T, H, W = grid
    what = f"batch_size={batch_size} x grid {T}x{H}x{W} ({batch_size * T * H * W:,} tokens)"
    check_alloc(op, what, batch_size * T * H * W + per_frame * batch_size * H * W, device)


def _hide_all_but(order: torch.Tensor, keep: int) -> torch.Tensor:
    """bool mask of ``order``'s shape: False at the first ``keep`` indices of each row of ``order``."""
    hidden = torch.ones(order.shape, dtype=torch.bool, device=order.device)
    return hidden.scatter_(-1, order[..., :keep], False)


# --------------------------------------------------------------------------- tube


def tube_mask(
    batch_size: int,
    grid: tuple[int, int, int],
    ratio: float | Sequence[float] | torch.Tensor,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """VideoMAE tube mask: one random spatial mask per sample, repeated through every frame.

    Per sample b exactly ``hidden_count(ratio_b, H*W)`` positions of the frame are hidden,
    chosen uniformly among all subsets of that size. A sample's mask depends only on the seed,
    its index b and its own count: the same seed with a larger ratio hides a superset.

    Args:
        batch_size: B >= 1.
        grid: (T, H, W) ints.
        ratio: fraction of each frame hidden, in [0, 1): one float for the batch, or one per
            sample as a sequence of B floats or a 1-D tensor [B] (any real dtype; its values are
            read on the host, so a CUDA tensor synchronises).
        seed / generator: see the module docstring.
        device: where the mask is built (default CPU).
        backend: "auto", "torch" or "cuda".

    Returns:
        hidden: bool[B, T*H*W] on ``device``.
    """
    op = "tube_mask"
    check_backend(op, backend)
    batch_size = _check_positive_int(op, "batch_size", batch_size)
    grid = check_grid(op, grid)
    ratio = _check_ratios(op, ratio, batch_size)
    device = _device(op, device)
    _check_mask_size(op, batch_size, grid, device, per_frame=8)  # the reference's int64 keys
    return dispatch(op, backend, device, batch_size, grid, ratio, _seed(op, generator, seed), device)


@register_reference("tube_mask")
def tube_mask_reference(
    batch_size: int, grid: tuple[int, int, int], ratio: float | tuple[float, ...], seed: int, device: torch.device
) -> torch.Tensor:
    # key[b, p] = philox_bits(seed, STREAM_TUBE, b*S + p) (uint32); the positions with the
    # k_b = hidden_count(ratio_b, S) smallest keys are hidden, ties to the lower index (stable
    # sort). A uniform random order restricted to its first k elements is a uniform k-subset;
    # 32-bit keys tie with probability ~S^2 / 2^33 per sample, a negligible bias.
    T, H, W = grid
    S = H * W
    k = torch.tensor(tube_hidden_counts(ratio, batch_size, S), dtype=torch.int64).to(device)
    counter = torch.arange(batch_size * S, dtype=torch.int64, device=device).view(batch_size, S)
    order = torch.sort(philox_bits(seed, STREAM_TUBE, counter), dim=1, stable=True).indices
    first_k = torch.arange(S, device=device)[None, :] < k[:, None]  # by rank in the sorted order
    hidden_frame = torch.empty(batch_size, S, dtype=torch.bool, device=device).scatter_(1, order, first_k)
    return hidden_frame[:, None, :].expand(batch_size, T, S).reshape(batch_size, T * S)


# --------------------------------------------------------------------------- multi-block


def multiblock_mask(
    batch_size: int,
    grid: tuple[int, int, int],
    num_blocks: int,
    spatial_scale: tuple[float, float],
    aspect_ratio: tuple[float, float],
    temporal_scale: tuple[float, float] = (1.0, 1.0),
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    backend: str = "auto",
    return_counts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """V-JEPA multi-block mask: hidden = the union of ``num_blocks`` boxes per sample.

    Each box (see :func:`multiblock_boxes` for the exact draw) covers about a
    ``spatial_scale`` fraction of the frame with height/width ratio drawn log-uniformly from
    ``aspect_ratio``, and a ``temporal_scale`` fraction of the frames; ``(1, 1)`` makes it
    a tube through every frame. Stage 2 (method.md): view A ``num_blocks=8,
    spatial_scale=(0.15, 0.15)``; view B ``num_blocks=2, spatial_scale=(0.7, 0.7)``; both
    ``aspect_ratio=(0.75, 1.5), temporal_scale=(1.0, 1.0)``.

    Boxes lie wholly inside the grid with their top (left, start) uniform over *all*
    ``H - h + 1`` valid placements, the last one included. In-frame placement still hides
    border positions less often than central ones, by geometry: with ``h`` fixed, row ``y``
    is covered with probability ``(min(y, H-h) - max(0, y-h+1) + 1) / (H-h+1)``, which is
    ``1/(H-h+1)`` for the first and last rows. tests/test_multiblock_mask_reference.py checks the empirical
    frequency of every position against this exact value.

    The boxes (six ints per block) are always drawn on the host; a backend only paints them
    on ``device``. So every backend and device gives the same mask, and the host knows each
    sample's hidden count without reading device memory: ``return_counts=True`` returns it,
    for sizing a packed batch with no synchronisation.

    Args:
        batch_size: B >= 1.
        grid: (T, H, W) ints.
        num_blocks: boxes per sample, >= 1.
        spatial_scale: (min, max) area fraction, within [0, 1].
        aspect_ratio: (min, max) height/width ratio, both > 0 and finite.
        temporal_scale: (min, max) fraction of the frames, within [0, 1].
        seed / generator: see the module docstring.
        device: where the mask is built (default CPU).
        backend: "auto", "torch" or "cuda".
        return_counts: also return the hidden count of every sample.

    Returns:
        hidden: bool[B, T*H*W] on ``device``; with ``return_counts``, the pair
        ``(hidden, num_hidden)``, ``num_hidden`` int64[B] on the CPU.
    """
    op = "multiblock_mask"
    check_backend(op, backend)
    batch_size = _check_positive_int(op, "batch_size", batch_size)
    grid = check_grid(op, grid)
    num_blocks = _check_positive_int(op, "num_blocks", num_blocks)
    spatial_scale = check_range(op, "spatial_scale", spatial_scale, 0.0, 1.0)
    aspect_ratio = check_range(op, "aspect_ratio", aspect_ratio, 0.0, math.inf)
    if not (aspect_ratio[0] > 0.0 and math.isfinite(aspect_ratio[1])):
        raise ValueError(f"{op}: aspect_ratio must be > 0 and finite, got {aspect_ratio}")
    temporal_scale = check_range(op, "temporal_scale", temporal_scale, 0.0, 1.0)
    device = _device(op, device)
    # The boxes are drawn on the host: counters, uniforms and box columns take ~590 bytes per
    # (sample, block) at their peak; 256 is a safe lower bound.
    check_alloc(op, f"batch_size={batch_size} x num_blocks={num_blocks}", 256 * batch_size * num_blocks,
                torch.device("cpu"))
    _check_mask_size(op, batch_size, grid, device, per_frame=0)
    seed = _seed(op, generator, seed)
    boxes, counts = _multiblock_host(batch_size, grid, num_blocks, spatial_scale, aspect_ratio, temporal_scale, seed,
                                     return_counts)  # fmt: skip
    hidden = dispatch(op, backend, device, boxes, grid, device)
    return (hidden, counts) if return_counts else hidden


@torch.compiler.disable  # host numpy: compiled graphs call it as it is
def _multiblock_host(batch_size, grid, num_blocks, spatial_scale, aspect_ratio, temporal_scale, seed, counts):
    boxes = multiblock_boxes(batch_size, grid, num_blocks, spatial_scale, aspect_ratio, temporal_scale, seed)
    return boxes, torch.from_numpy(multiblock_hidden_counts(boxes.numpy(), grid)) if counts else None


@register_reference("multiblock_mask")
def multiblock_mask_reference(boxes: torch.Tensor, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    # hidden[b, t, y, x] = OR_j [start_j <= t < start_j + l_j] [top_j <= y < top_j + h_j] [left_j <= x < left_j + w_j]
    T, H, W = grid
    B = boxes.shape[0]
    start, length, top, h, left, w = (c[..., None] for c in boxes_on(boxes, device).unbind(-1))  # each [B, J, 1]

    def inside(lo: torch.Tensor, size: torch.Tensor, n: int) -> torch.Tensor:
        i = torch.arange(n, device=device)
        return (i >= lo) & (i < lo + size)  # [B, J, n]

    in_t, in_y, in_x = inside(start, length, T), inside(top, h, H), inside(left, w, W)
    box = in_t[:, :, :, None, None] & in_y[:, :, None, :, None] & in_x[:, :, None, None, :]
    return box.any(dim=1).reshape(B, T * H * W)


# --------------------------------------------------------------------------- semantic


def semantic_mask(
    attn: torch.Tensor,
    keep: int,
    mode: str = "topk",
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per frame, keep the ``keep`` tokens the teacher attends to; hide the rest.

    ``"topk"`` (paper): the ``keep`` largest attentions, ties to the lower index, so the
    mask is deterministic and identical on every backend (no randomness; the generator is
    not touched). ``"sample"`` (release): ``keep`` tokens drawn without replacement with
    probability proportional to attention, by Gumbel-top-k (see the reference). Tokens of
    zero attention are never kept while positive ones remain; a frame with fewer than
    ``keep`` positive tokens fills up with zero-attention tokens in index order.

    Args:
        attn: float[B, T, S] (float32/16, bfloat16 or float64), non-negative and finite:
            the teacher's pooling attention of every frame over its S = H*W tokens.
        keep: tokens kept per frame, 1 <= keep <= S.
        mode: "topk" or "sample".
        seed / generator: see the module docstring ("sample" only).
        backend: "auto", "torch" or "cuda".

    Returns:
        hidden: bool[B, T*S] on ``attn``'s device.
    """
    op = "semantic_mask"
    check_backend(op, backend)
    attn = check_tensor(op, "attn", attn, ndim=3, dtypes=FLOAT_DTYPES)
    S = attn.shape[2]
    if not isinstance(keep, int) or isinstance(keep, bool):
        raise TypeError(f"{op}: keep must be an int, got {type(keep).__name__}")
    if not 1 <= keep <= S:
        raise ValueError(f"{op}: keep must satisfy 1 <= keep <= S (tokens per frame, S={S}), got keep={keep}")
    if mode not in SEMANTIC_MODES:
        raise ValueError(f"{op}: mode must be one of {SEMANTIC_MODES}, got {mode!r}")
    if values_checked(attn):
        if not bool(torch.isfinite(attn).all()):
            raise ValueError(f"{op}: attn must be finite (found inf or nan)")
        if bool((attn < 0).any()):
            raise ValueError(f"{op}: attn must be non-negative, found min {float(attn.min())}")
    if mode == "sample":
        seed = _seed(op, generator, seed)
    elif seed is not None:
        seed = _seed(op, None, seed)
    return dispatch(op, backend, attn.device, attn, keep, mode, 0 if seed is None else seed)


@register_reference("semantic_mask")
def semantic_mask_reference(attn: torch.Tensor, keep: int, mode: str, seed: int) -> torch.Tensor:
    # topk:   score = attn.
    # sample: score = log(attn) + g,  g = -log(-log(v)),  v = u + 2^-25 in (0, 1),
    #         u = philox_uniform(seed, STREAM_SEMANTIC, (b*T + t)*S + s), in float64.
    # The `keep` largest Gumbel-perturbed log-weights are a draw without replacement with
    # probabilities proportional to attn (Gumbel-top-k). Zero attention scores -inf; every
    # positive weight scores finite because v is bounded away from 0 and 1.
    # Kept = the first `keep` of a stable descending sort of score (ties to the lower index).
    B, T, S = attn.shape
    if mode == "sample":
        counter = torch.arange(B * T * S, dtype=torch.int64, device=attn.device).view(B, T, S)
        v = philox_uniform(seed, STREAM_SEMANTIC, counter).to(torch.float64) + 2.0**-25
        score = torch.log(attn.to(torch.float64)) - torch.log(-torch.log(v))
    else:
        score = attn
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    return _hide_all_but(order, keep).reshape(B, T * S)


# --------------------------------------------------------------------------- motion


def motion_mask(tokens: torch.Tensor, ratio: float, *, backend: str = "auto") -> torch.Tensor:
    """Per frame, keep the tokens whose embedding changed most since the previous frame.

    Change of token s in frame t: ``||x[t, s] - x[t-1, s]||_2`` for t >= 1; frame 0 has no
    predecessor and uses its change to frame 1 (the same value as frame 1), so it keeps
    the same positions as frame 1. T = 1 raises ValueError (no motion is defined). Each
    frame keeps ``S - hidden_count(ratio, S)`` tokens (at least one), ties to the lower index.

    Args:
        tokens: float[B, T, S, C], T >= 2 (patch embeddings, S = H*W tokens per frame).
        ratio: fraction of each frame hidden, in [0, 1).
        backend: "auto" or "torch" (the only implementation).

    Returns:
        hidden: bool[B, T*S] on ``tokens``' device.
    """
    op = "motion_mask"
    check_backend(op, backend)
    tokens = check_tensor(op, "tokens", tokens, ndim=4, dtypes=FLOAT_DTYPES)
    B, T, S, C = tokens.shape
    if T < 2:
        raise ValueError(f"{op}: tokens must have T >= 2 frames to measure motion, got shape {list(tokens.shape)}")
    if S < 1:
        raise ValueError(f"{op}: tokens must have S >= 1 tokens per frame, got shape {list(tokens.shape)}")
    ratio = _check_ratio(op, ratio)
    check_finite(op, tokens=tokens)
    return dispatch(op, backend, tokens.device, tokens, S - hidden_count(ratio, S))


@register_reference("motion_mask")
def motion_mask_reference(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    # change[t] = ||x[t] - x[t-1]||^2 (t >= 1), change[0] = change[1]; squared norms rank the
    # same as norms. Kept = the first `keep` of a stable descending sort of change.
    B, T, S, _ = tokens.shape
    x = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
    change = (x[:, 1:] - x[:, :-1]).square().sum(-1)  # [B, T-1, S]
    change = torch.cat((change[:, :1], change), dim=1)
    order = torch.sort(change, dim=-1, descending=True, stable=True).indices
    return _hide_all_but(order, keep).reshape(B, T * S)


# --------------------------------------------------------------------------- counts


def mask_counts(hidden: torch.Tensor, num_prefix: int = 0) -> tuple[torch.Tensor, int]:
    """Packed-sequence bookkeeping of a mask: visible tokens (+ prefix) per sample.

    Call it where the mask was sampled, on the CPU (e.g. in the dataloader): it is then
    free, and the model gets ``max_seqlen`` as a host int without reading GPU memory. On a
    CUDA mask the ``max_seqlen`` read synchronises.

    Args:
        hidden: bool[B, N].
        num_prefix: P >= 0 prefix (class) tokens per sample, never hidden.

    Returns:
        cu_seqlens: int32[B+1] on ``hidden``'s device, prefix sums of ``P + visible_b``;
        max_seqlen: int, the largest ``P + visible_b`` (0 when B = 0).
    """
    op = "mask_counts"
    hidden = check_tensor(op, "hidden", hidden, ndim=2, dtypes=(torch.bool,))
    num_prefix = check_num_prefix(op, num_prefix)
    if hidden.shape[0]:
        check_host_readable(op, "hidden", hidden, "max_seqlen is read from its values")
    lengths = (~hidden).sum(dim=1) + num_prefix
    cu_seqlens = torch.zeros(hidden.shape[0] + 1, dtype=torch.int32, device=hidden.device)
    cu_seqlens[1:] = torch.cumsum(lengths, dim=0)
    max_seqlen = int(lengths.max()) if hidden.shape[0] else 0
    return cu_seqlens, max_seqlen
