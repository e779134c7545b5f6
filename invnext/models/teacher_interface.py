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


def _frames_to_tokens(x: torch.Tensor, dim: int, tubelet: int) -> torch.Tensor:
    """Mean over each run of ``tubelet`` frames along ``dim`` (the frames a student token spans)."""
    frames = x.shape[dim]
    if frames % tubelet:
        raise ValueError(f"the teacher saw {frames} frames, not a multiple of the tubelet size {tubelet}")
    return x.unflatten(dim, (frames // tubelet, tubelet)).mean(dim + 1)


def token_attention(attn: torch.Tensor, tubelet: int) -> torch.Tensor:
    """Teacher attention ``[B, frames, S]`` per student token step: ``[B, frames / tubelet, S]``
    (a token spans ``tubelet`` frames; rows still sum to 1)."""
    return attn if tubelet == 1 else _frames_to_tokens(attn, 1, tubelet)


def token_features(features: torch.Tensor, tubelet: int) -> torch.Tensor:
    """Teacher features ``[B, K, frames, S, Ct]`` per student token step, their frames' mean
    re-normalised: ``[B, K, frames / tubelet, S, Ct]``."""
    return features if tubelet == 1 else F.normalize(_frames_to_tokens(features, 2, tubelet), dim=-1)
