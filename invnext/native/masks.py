"""CUDA mask samplers (csrc/mask_kernels.cuh) with the canonical signatures of docs/ops_contract.md.

Each returns exactly the boolean mask of its reference in ``invnext.ops.masks`` for the same
seed: the kernels evaluate the same Philox counters and pick "the first k of a stable sort"
by an exact radix select on (key, index). Multi-block masks paint the boxes the host drew
(``multiblock_boxes``), so they are identical on every device by construction. The only
values that can differ from the *CPU* reference are the fp64 ``log`` results of the Gumbel
scores (semantic "sample"), which the CUDA math library and the CPU library may round
differently; against torch's CUDA reference the masks are identical. One block per sample
(tube, multi-block) or per frame (semantic); nothing reads device memory on the host, so
every call is asynchronous. Tube and semantic sampling is CUDA-graph capturable; multi-block
sampling copies its host boxes in and is not.

``*_with_cu_seqlens`` variants also return ``cu_seqlens`` (int32[B+1], prefix sums of
``P + visible``) computed on the device by the sampler, and an exact host ``max_seqlen``
(every sample keeps the same count in tube and semantic masks; the host counts the
multi-block boxes).

``.unsupported(*args)`` declines (``auto`` then uses the reference) frames too large for the
shared-memory sort and inputs the extension cannot take. Arguments are the canonical ones, as
``invnext.ops.masks`` validates them.
"""
from __future__ import annotations

import torch

from invnext import native
from invnext.common.mask_geometry import (
    boxes_on,
    check_num_prefix,
    hidden_count,
    multiblock_boxes,
    multiblock_hidden_counts,
)
from invnext.common.registry import implements
from invnext.native._launch import DTYPE_CODE as _DTYPE_CODE
from invnext.native._launch import check as _check
from invnext.native._launch import on as _on
from invnext.native._launch import ptr as _ptr
from invnext.native._launch import stream as _stream
from invnext.native.c_api import MASK_KEY_BYTES, MASK_MAX_BLOCKS
from invnext.native.c_api import MASK_MODES as MODES

_MAX_INT32 = 2**31 - 1


def _lib(op: str):
    lib = native.kernels()
    if not hasattr(lib, op):
        raise RuntimeError(
            f"invnext CUDA kernels: the compiled extension predates {op}; rebuild it (scripts/build_csrc.sh --inplace)"
        )
    return lib


def _common_reason(op: str, device: torch.device, B: int, N: int) -> str | None:
    if device.type != "cuda":
        return f"the CUDA kernels need a CUDA device, got {device}"
    why = native.unavailable_reason()
    if why is not None:
        return why
    if not hasattr(native.kernels(), op):
        return "the compiled extension predates the mask kernels; rebuild it (scripts/build_csrc.sh --inplace)"
    if N > _MAX_INT32 or B > _MAX_INT32:
        return f"sizes beyond int32 (B={B}, N={N})"
    return None


def _outputs(op: str, B: int, N: int, P: int | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampler's outputs: hidden bool[B, N] and, for the ``*_with_cu_seqlens`` variants
    (``P`` not None), cu_seqlens int32[B+1]."""
    hidden = torch.empty(B, N, dtype=torch.bool, device=device)
    if P is None:
        return hidden, None
    P = check_num_prefix(op, P)
    if B * (N + P) > _MAX_INT32:
        raise ValueError(f"{op}: cu_seqlens would overflow int32: B * (N + P) = {B * (N + P)}")
    return hidden, torch.empty(B + 1, dtype=torch.int32, device=device)


# --------------------------------------------------------------------------- tube


# Per-sample ratios: the kernel takes one hidden count per launch, and sample b's keys depend
# only on (seed, b), so one launch per distinct count over the whole batch, each sample's row
# taken from the launch of its own count, equals the reference bit for bit. The bound keeps a
# batch with a different ratio in every sample from launching B kernels (auto then takes the
# reference, which sorts once for any counts).
TUBE_MAX_DISTINCT_COUNTS = 8


def _tube(batch_size, grid, num_hidden, seed, device, num_prefix):
    lib = _lib("tube_mask")
    device = torch.device(device)
    T, H, W = grid
    S = H * W
    hidden, cu = _outputs("tube_mask", batch_size, T * S, num_prefix, device)
    with _on(device):
        code = lib.tube_mask(
            _ptr(hidden), _ptr(cu), batch_size, T, H, W, num_hidden, seed, num_prefix or 0, _stream(device),
        )  # fmt: skip
    _check(lib, code, "tube_mask")
    return hidden, cu


def _tube_counts(batch_size, grid, ratio) -> list[int]:
    S = grid[1] * grid[2]
    ratios = ratio if isinstance(ratio, tuple) else (ratio,) * batch_size
    return [hidden_count(r, S) for r in ratios]


@implements("tube_mask", "cuda")
def tube_mask_cuda(
    batch_size: int, grid: tuple[int, int, int], ratio: float | tuple[float, ...], seed: int, device: torch.device
) -> torch.Tensor:
    """``tube_mask_reference`` on the GPU: ``bool[B, T*H*W]`` on ``device`` (CUDA). ``ratio``:
    one float, or a tuple of B floats (one launch per distinct hidden count)."""
    counts = _tube_counts(batch_size, grid, ratio)
    distinct = sorted(set(counts))
    hidden = _tube(batch_size, grid, distinct[0], seed, device, None)[0]
    if len(distinct) > 1:
        per_sample = torch.tensor(counts, dtype=torch.int64).to(hidden.device, non_blocking=True)
        for k in distinct[1:]:
            rows = (per_sample == k)[:, None]
            hidden = torch.where(rows, _tube(batch_size, grid, k, seed, device, None)[0], hidden)
    return hidden


def _tube_unsupported(batch_size, grid, ratio, seed, device) -> str | None:
    T, H, W = grid
    why = _common_reason("tube_mask", torch.device(device), batch_size, T * H * W)
    if why is None and H * W * 4 > MASK_KEY_BYTES:
        why = f"a frame of {H * W} positions exceeds the shared-memory sort ({MASK_KEY_BYTES // 4} positions)"
    if why is None:
        distinct = len(set(_tube_counts(batch_size, grid, ratio)))
        if distinct > TUBE_MAX_DISTINCT_COUNTS:
            why = (f"per-sample ratios give {distinct} distinct hidden counts; the kernel takes one count per "
                   f"launch and runs at most {TUBE_MAX_DISTINCT_COUNTS}")
    return why


tube_mask_cuda.unsupported = _tube_unsupported


def tube_mask_with_cu_seqlens(
    batch_size: int, grid: tuple[int, int, int], ratio: float, seed: int, device: torch.device, num_prefix: int = 0
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(hidden bool[B, N], cu_seqlens int32[B+1], max_seqlen)``; every sample keeps
    ``P + T * (H*W - hidden_count(ratio, H*W))`` tokens, so ``max_seqlen`` is exact."""
    T, H, W = grid
    hidden, cu = _tube(batch_size, grid, hidden_count(ratio, H * W), seed, device, num_prefix)
    return hidden, cu, num_prefix + T * (H * W - hidden_count(ratio, H * W))


# --------------------------------------------------------------------------- multi-block


def _multiblock(boxes, grid, device, num_prefix):
    lib = _lib("multiblock_mask")
    device = torch.device(device)
    T, H, W = grid
    B, J = boxes.shape[:2]
    hidden, cu = _outputs("multiblock_mask", B, T * H * W, num_prefix, device)
    with _on(device):
        boxes = boxes_on(boxes, device, torch.int32)  # dies only after the kernel is queued: the stream orders its free
        code = lib.multiblock_mask(
            _ptr(hidden), _ptr(cu), _ptr(boxes), B, T, H, W, J, num_prefix or 0, _stream(device)
        )  # fmt: skip
    _check(lib, code, "multiblock_mask")
    return hidden, cu


@implements("multiblock_mask", "cuda")
def multiblock_mask_cuda(boxes: torch.Tensor, grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """``multiblock_mask_reference`` on the GPU: paints the host's boxes (int64[B, J, 6], CPU)
    into ``bool[B, T*H*W]`` on ``device`` (CUDA)."""
    return _multiblock(boxes, grid, device, None)[0]


def _multiblock_unsupported(boxes, grid, device) -> str | None:
    T, H, W = grid
    why = _common_reason("multiblock_mask", torch.device(device), boxes.shape[0], T * H * W)
    if why is None and boxes.shape[1] > MASK_MAX_BLOCKS:
        why = f"num_blocks={boxes.shape[1]} exceeds the kernel's {MASK_MAX_BLOCKS} boxes per sample"
    return why


multiblock_mask_cuda.unsupported = _multiblock_unsupported


def multiblock_mask_with_cu_seqlens(
    batch_size: int,
    grid: tuple[int, int, int],
    num_blocks: int,
    spatial_scale: tuple[float, float],
    aspect_ratio: tuple[float, float],
    temporal_scale: tuple[float, float],
    seed: int,
    device: torch.device,
    num_prefix: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(hidden bool[B, N], cu_seqlens int32[B+1], max_seqlen)`` for the arguments of
    :func:`invnext.ops.masks.multiblock_mask` (already valid). The boxes are drawn on the
    host, so ``max_seqlen`` is exact and nothing waits for the GPU."""
    boxes = multiblock_boxes(batch_size, grid, num_blocks, spatial_scale, aspect_ratio, temporal_scale, seed)
    hidden, cu = _multiblock(boxes, grid, device, num_prefix)
    N = grid[0] * grid[1] * grid[2]
    return hidden, cu, num_prefix + N - int(multiblock_hidden_counts(boxes.numpy(), grid).min())


# --------------------------------------------------------------------------- semantic


def _semantic(attn, keep, mode, seed, num_prefix):
    lib = _lib("semantic_mask")
    B, T, S = attn.shape
    attn = attn.contiguous()
    hidden, cu = _outputs("semantic_mask", B, T * S, num_prefix, attn.device)
    with _on(attn.device):
        code = lib.semantic_mask(
            _ptr(hidden), _ptr(cu), _ptr(attn), B, T, S, keep, MODES[mode], _DTYPE_CODE[attn.dtype], seed,
            num_prefix or 0, _stream(attn.device),
        )  # fmt: skip
    _check(lib, code, "semantic_mask")
    return hidden, cu


@implements("semantic_mask", "cuda")
def semantic_mask_cuda(attn: torch.Tensor, keep: int, mode: str, seed: int) -> torch.Tensor:
    """``semantic_mask_reference`` on the GPU.

    Args:
        attn: float[B, T, S] (float32/16, bfloat16, float64) on a CUDA device.
        keep: tokens kept per frame, 1 <= keep <= S.
        mode: "topk" or "sample".
        seed: the Philox seed ("sample" only).
    Returns:
        hidden: bool[B, T*S] on ``attn``'s device.
    """
    return _semantic(attn, keep, mode, seed, None)[0]


def _semantic_unsupported(attn, keep, mode, seed) -> str | None:
    B, T, S = attn.shape
    why = _common_reason("semantic_mask", attn.device, B * T, T * S)
    if why is None and attn.dtype not in _DTYPE_CODE:
        why = f"attn dtype {attn.dtype} is not float32/16, bfloat16 or float64"
    key_bytes = 8 if mode == "sample" or attn.dtype == torch.float64 else 4
    if why is None and S * key_bytes > MASK_KEY_BYTES:
        limit = MASK_KEY_BYTES // key_bytes
        why = f"a frame of {S} tokens exceeds the shared-memory sort ({limit} for this mode/dtype)"
    return why


semantic_mask_cuda.unsupported = _semantic_unsupported


def semantic_mask_with_cu_seqlens(
    attn: torch.Tensor, keep: int, mode: str, seed: int, num_prefix: int = 0
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(hidden bool[B, T*S], cu_seqlens int32[B+1], max_seqlen)``; every sample keeps
    ``P + T * keep`` tokens, so ``max_seqlen`` is exact."""
    hidden, cu = _semantic(attn, keep, mode, seed, num_prefix)
    return hidden, cu, num_prefix + attn.shape[1] * keep
