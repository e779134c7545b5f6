"""Module forms of the mask samplers of :mod:`invnext.ops.masks`: each holds its sampling
settings; the batch, grid and randomness come with every call. ``hidden`` is True where a
token is hidden from the encoder."""
from __future__ import annotations

import torch

from invnext import ops

from ._base import FusedOp


class TubeMask(FusedOp):
    """VideoMAE tube mask (``ratio`` of every frame hidden, the same places in every frame):
    forward ``(batch_size, grid, *, seed=None, generator=None, device=None) -> bool[B, N]``.
    ``ratio``: one float, or one per sample (a sequence or 1-D tensor of ``batch_size`` reals)."""

    op = "tube_mask"

    def __init__(self, ratio: float, *, backend: str = "auto"):
        super().__init__(backend)
        self.ratio = ratio

    def forward(self, batch_size: int, grid: tuple[int, int, int], *, seed=None, generator=None, device=None):
        return ops.tube_mask(
            batch_size, grid, self.ratio, seed=seed, generator=generator, device=device, backend=self.backend
        )  # fmt: skip

    def _settings(self) -> dict:
        return {"ratio": self.ratio}


class MultiblockMask(FusedOp):
    """V-JEPA multi-block mask (the union of ``num_blocks`` boxes per sample): forward
    ``(batch_size, grid, *, seed=None, generator=None, device=None, return_counts=False)``
    -> ``bool[B, N]``, or with ``return_counts`` the pair ``(hidden, num_hidden int64[B] on the
    CPU)`` that sizes a packed batch without a sync."""

    op = "multiblock_mask"

    def __init__(
        self,
        num_blocks: int,
        spatial_scale: tuple[float, float],
        aspect_ratio: tuple[float, float] = (0.75, 1.5),
        temporal_scale: tuple[float, float] = (1.0, 1.0),
        *,
        backend: str = "auto",
    ):
        super().__init__(backend)
        self.num_blocks = num_blocks
        self.spatial_scale = tuple(spatial_scale)
        self.aspect_ratio = tuple(aspect_ratio)
        self.temporal_scale = tuple(temporal_scale)

    def forward(
        self, batch_size: int, grid: tuple[int, int, int], *, seed=None, generator=None, device=None,
        return_counts: bool = False,
    ):  # fmt: skip
        return ops.multiblock_mask(
            batch_size, grid, self.num_blocks, self.spatial_scale, self.aspect_ratio, self.temporal_scale,
            seed=seed, generator=generator, device=device, backend=self.backend, return_counts=return_counts,
        )  # fmt: skip

    def _settings(self) -> dict:
        return {"num_blocks": self.num_blocks, "spatial_scale": self.spatial_scale,
                "aspect_ratio": self.aspect_ratio, "temporal_scale": self.temporal_scale}  # fmt: skip


class SemanticMask(FusedOp):
    """Per frame, keep the ``keep`` tokens the teacher attends to most (``"topk"``) or a draw
    proportional to attention (``"sample"``): forward ``(attn float[B, T, S], *, keep=None,
    seed=None, generator=None) -> bool[B, T*S]``. ``keep=None`` at construction: given per call
    (it follows the frame size S, e.g. from a mask ratio)."""

    op = "semantic_mask"

    def __init__(self, keep: int | None, mode: str = "topk", *, backend: str = "auto"):
        super().__init__(backend)
        self.keep = keep
        self.mode = mode

    def forward(self, attn: torch.Tensor, *, keep: int | None = None, seed=None, generator=None) -> torch.Tensor:
        if (keep is None) == (self.keep is None):
            held = f"keeps {self.keep} per frame: pass keep=None" if self.keep is not None else "needs keep per call"
            raise ValueError(f"SemanticMask: this module {held}")
        keep = self.keep if keep is None else keep
        return ops.semantic_mask(attn, keep, self.mode, seed=seed, generator=generator, backend=self.backend)

    def _settings(self) -> dict:
        return {"keep": self.keep, "mode": self.mode}


class MotionMask(FusedOp):
    """Per frame, keep the tokens whose embedding changed most since the previous frame
    (``ratio`` hidden): forward ``(tokens float[B, T, S, C]) -> bool[B, T*S]``."""

    op = "motion_mask"

    def __init__(self, ratio: float, *, backend: str = "auto"):
        super().__init__(backend)
        self.ratio = ratio

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return ops.motion_mask(tokens, self.ratio, backend=self.backend)

    def _settings(self) -> dict:
        return {"ratio": self.ratio}
