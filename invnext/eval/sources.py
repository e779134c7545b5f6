"""What a probe evaluates: a frozen model that maps clips to ``(tokens, pooled)`` features.

``resolve_source(source)`` accepts:

* an :class:`~invnext.models.Encoder` instance (e.g. the trainer's, at the end of a run);
* anything :func:`invnext.loading.load_encoder` reads: a preset name (randomly initialised,
  with torch's RNG seeded by ``seed`` so that reruns give the same weights), one of our
  checkpoints, or the authors' released encoder;
* ``"<prefix>:<spec>"`` for a prefix registered with :func:`register_source`. Registered here:
  ``teacher:default``, the bundled default image teacher (``load_default_teacher``) applied to
  every frame, its features averaged over frames (an image baseline: no temporal order);
* a :class:`FeatureSource` (passed through).

Every source has a ``fingerprint``: the SHA-256 of its class, config and every weight tensor's
bytes, so a feature cache keyed by it is invalidated by any change of the weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable

import torch
import torch.nn as nn

from invnext.checkpoint_layout import resolve_weights
from invnext.config import to_dict
from invnext.models.encoder import Encoder
from invnext.models.teacher import teacher_input

__all__ = ["EncoderSource", "FeatureSource", "TeacherSource", "register_source", "resolve_source", "weights_digest"]


def weights_digest(module: nn.Module, extra: object = None) -> str:
    """SHA-256 over ``extra`` (JSON) and every state-dict tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureSource:
    """A frozen clip model for probing.

    Attributes:
        name: how results and logs name it.
        dim: the token width C (attentive probe input).  pooled_dim: the pooled width (linear probe input).
        default_frames, default_size: the clip length and side it is evaluated at unless told otherwise.
    """

    name: str
    dim: int
    pooled_dim: int
    default_frames: int
    default_size: int

    def __init__(self) -> None:
        self._fingerprint: str | None = None

    @property
    def module(self) -> nn.Module:
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able description (kind and config) recorded in results and hashed into the fingerprint."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_digest(self.module, self.describe())
        return self._fingerprint

    def check_input(self, frames: int, size: int) -> None:
        """Raise ValueError when clips of ``frames`` x ``size``^2 cannot be encoded."""

    def to(self, device: torch.device | str) -> FeatureSource:
        self.module.to(device)
        return self

    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[B, T, H, W, 3]`` (on the model's device) -> ``(tokens [B, N, dim], pooled [B, pooled_dim])``."""
        raise NotImplementedError


class EncoderSource(FeatureSource):
    """An invnext :class:`Encoder`: its grid tokens and attention-pooled embedding."""

    def __init__(self, encoder: Encoder, name: str = "encoder"):
        super().__init__()
        if not isinstance(encoder, Encoder):
            raise TypeError(f"EncoderSource: encoder must be an invnext Encoder, got {type(encoder).__name__}")
        self.encoder = encoder  # left as given; extraction runs it in eval mode under no_grad
        self.name = name
        cfg = encoder.cfg
        self.dim, self.pooled_dim = cfg.width, cfg.embed_dim
        self.default_frames, self.default_size = cfg.num_frames, cfg.img_size

    @property
    def module(self) -> nn.Module:
        return self.encoder

    def describe(self) -> dict:
        return {"kind": "encoder", "config": to_dict(self.encoder.cfg)}

    def check_input(self, frames: int, size: int) -> None:
        cfg = self.encoder.cfg
        if size % cfg.patch_size:
            raise ValueError(f"size={size} must be a multiple of the encoder's patch size {cfg.patch_size}")
        if frames % cfg.tubelet_size:
            raise ValueError(f"frames={frames} must be a multiple of the encoder's tubelet size {cfg.tubelet_size}")

    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, pooled = self.encoder.encode(self.encoder.preprocess(frames))
        return tokens, pooled


class TeacherSource(FeatureSource):
    """A frozen image teacher (:class:`~invnext.models.ImageTeacher`) applied frame by frame.

    tokens: its last returned layer ``features[:, -1]`` averaged over frames -> ``[B, S, Ct]``;
    pooled: its pooled embedding averaged over frames -> ``[B, Cp]``. Frames are resized to the
    teacher's ``img_size`` when they differ.
    """

    def __init__(self, teacher: nn.Module, name: str = "teacher"):
        super().__init__()
        self.teacher = teacher
        self.name = name
        self.dim, self.pooled_dim = int(teacher.feature_dim), int(teacher.pooled_dim)
        self.default_frames, self.default_size = 16, int(teacher.img_size)

    @property
    def module(self) -> nn.Module:
        return self.teacher

    def describe(self) -> dict:
        cfg = getattr(self.teacher, "cfg", None)
        return {
            "kind": "teacher",
            "class": type(self.teacher).__name__,
            "config": to_dict(cfg) if cfg is not None else None,
        }

    def encode(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = frames.permute(0, 4, 1, 2, 3).float() / 255.0  # [B, 3, T, H, W]
        out = self.teacher(teacher_input(rgb, self.teacher))
        return out.features[:, -1].mean(1), out.pooled.mean(1)


# --------------------------------------------------------------------------- resolution

_REGISTRY: dict[str, Callable[[str], FeatureSource]] = {}


def register_source(prefix: str, factory: Callable[[str], FeatureSource]) -> None:
    """Make ``"<prefix>:<spec>"`` resolve to ``factory(spec)`` (a :class:`FeatureSource`)."""
    if not isinstance(prefix, str) or not prefix.isidentifier():
        raise ValueError(f"register_source: prefix must be an identifier, got {prefix!r}")
    if not callable(factory):
        raise TypeError(f"register_source: factory must be callable, got {type(factory).__name__}")
    _REGISTRY[prefix] = factory


def _bundled_teacher(spec: str) -> FeatureSource:
    if spec != "default":
        raise ValueError(f"teacher:{spec}: unknown teacher; known: teacher:default (the bundled default teacher)")
    from invnext.teacher_pretrain import ensure_default_dataset, load_default_teacher

    return TeacherSource(load_default_teacher(ensure_default_dataset(teacher=True)), name="teacher:default")


register_source("teacher", _bundled_teacher)


def resolve_source(
    source: str | os.PathLike | nn.Module | FeatureSource, *, seed: int = 0, verbose: bool = True
) -> FeatureSource:
    """The :class:`FeatureSource` ``source`` names (module docstring)."""
    if isinstance(source, FeatureSource):
        return source
    if isinstance(source, Encoder):
        return EncoderSource(source)
    if isinstance(source, nn.Module):
        raise TypeError(f"resolve_source: a module source must be an invnext Encoder, got {type(source).__name__}")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"resolve_source: source must be a name, a path, an Encoder or a FeatureSource, got {type(source).__name__}"
        )
    text = os.fspath(source)
    prefix, sep, spec = text.partition(":")
    if sep and prefix in _REGISTRY and not os.path.exists(text):
        return _REGISTRY[prefix](spec)
    from invnext.loading import load_encoder

    if os.path.isdir(text):  # a stage folder, a checkpoint folder or a checkpoints root: its model weights
        try:
            text = os.fspath(resolve_weights(text))
        except FileNotFoundError:
            pass  # not one of our run folders: load_encoder takes a folder holding one weights file
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # a preset's random init is then the same on every run (and cache hits)
        encoder = load_encoder(text, verbose=verbose)
    return EncoderSource(encoder, name=text)
