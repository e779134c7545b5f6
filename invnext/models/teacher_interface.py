"""What Stage 1 needs from a frozen image teacher: its output and its interface.

Apart from the teachers (:mod:`.teacher`'s ``TinyTeacher``, :mod:`.hf_teacher`'s ``SiglipTeacher``)
so that each implements it without importing the other.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F


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


def per_token(out: TeacherOutput, tubelet: int) -> TeacherOutput:
    """The teacher's per-frame output per student token: a token spans ``tubelet`` frames, so its
    features (re-normalised) and attention are its frames' mean; the pooled embeddings stay per frame.
    """
    if tubelet == 1:
        return out
    B, K, frames, S, Ct = out.features.shape
    if frames % tubelet:
        raise ValueError(f"the teacher saw {frames} frames, not a multiple of the tubelet size {tubelet}")
    features = F.normalize(out.features.reshape(B, K, frames // tubelet, tubelet, S, Ct).mean(3), dim=-1)
    attn = out.attn.reshape(B, frames // tubelet, tubelet, S).mean(2)
    return TeacherOutput(features, out.pooled, attn)
