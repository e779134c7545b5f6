"""What Stage 1 needs from a frozen image teacher: its output and its interface.

Apart from the teachers (:mod:`.teacher`'s ``TinyTeacher``, :mod:`.hf_teacher`'s ``SiglipTeacher``)
so that each implements it without importing the other.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch


class TeacherOutput(NamedTuple):
    features: torch.Tensor  # [B, K, T, S, Ct], L2-normalised
    pooled: torch.Tensor  # [B, T, Cp], L2-normalised
    attn: torch.Tensor  # [B, T, S], rows sum to 1


@runtime_checkable
class ImageTeacher(Protocol):
    """What Stage 1 needs from a teacher (any frozen image model can implement it).

    Attributes:
        layers: the K block indices (0-based) whose outputs ``features`` holds, in order.
        feature_dim: Ct.  pooled_dim: Cp.
        img_size, patch_size: the square input size it expects and its patch (grid = img_size // patch_size).
        mean, std: per-channel constants its input is normalised with.
    """

    layers: tuple[int, ...]
    feature_dim: int
    pooled_dim: int
    img_size: int
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, video: torch.Tensor) -> TeacherOutput:
        """``video[B, 3, T, img_size, img_size]`` (normalised with mean/std) -> :class:`TeacherOutput`."""
        ...
