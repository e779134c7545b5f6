"""A SigLIP / SigLIP2 vision tower, loaded offline with transformers, as Stage 1's image teacher.

:class:`SiglipTeacher` implements :class:`invnext.models.teacher.ImageTeacher`. The checkpoint is
a local folder written by ``save_pretrained`` (a full SigLIP/SigLIP2 model or its vision tower);
it is loaded with ``local_files_only=True``, so nothing is downloaded. Two towers are handled,
through public transformers classes only:

* ``SiglipVisionModel`` (model types ``siglip`` / ``siglip_vision_model``): fixed resolution,
  takes a pixel tensor ``[F, 3, H, W]``. The fixed-resolution SigLIP2 releases (such as
  ``siglip2-giant-opt-patch16-256``) are stored in this format.
* ``Siglip2VisionModel`` (``siglip2`` / ``siglip2_vision_model``, the "naflex" tower): takes
  patchified pixels ``[F, S, p*p*3]`` (patch vectors ordered (row, column, channel), as its image
  processor makes them), a pixel mask and the per-image patch grid; all are built here for the full
  ``img_size / patch`` grid, with no padding.

Per frame the tower runs its public forward with ``output_hidden_states=True``:

    features[i] = hidden_states[layers[i] + 1]       output of block layers[i], L2-normalised
    pooled      = pooler_output                      the attention-pool head, L2-normalised
    attn        = mean_h softmax_s(q_h . k_{h,s} / sqrt(d))   the head's probe over the S tokens

The pooling attention comes from the head's own ``nn.MultiheadAttention`` (probe as the query,
the post-layernorm tokens as keys and values) called with ``need_weights=True``, which is what the
head computes internally, so no private transformers code or signature is touched.

Input: frames resized to ``img_size`` (bicubic with antialiasing, like the image processors'
bicubic resampling) and normalised with the checkpoint's ``image_mean`` / ``image_std`` from its
``preprocessor_config.json`` when one was saved, else SigLIP's 0.5 / 0.5.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from invnext.models.layers import check_rgb_frames, l2norm
from invnext.models.teacher_interface import TeacherOutput

__all__ = ["SiglipTeacher", "read_preprocessor_stats"]

_SIGLIP = ("siglip", "siglip_vision_model")
_SIGLIP2 = ("siglip2", "siglip2_vision_model")
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def read_preprocessor_stats(path: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(image_mean, image_std)`` from a folder's ``preprocessor_config.json``, or None if there is none."""
    file = Path(os.fspath(path)) / "preprocessor_config.json"
    if not file.is_file():
        return None
    cfg = json.loads(file.read_text())
    if not cfg.get("do_normalize", True):
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean, std = cfg.get("image_mean", SIGLIP_MEAN), cfg.get("image_std", SIGLIP_STD)
    mean = (float(mean),) * 3 if isinstance(mean, (int, float)) else tuple(float(m) for m in mean)
    std = (float(std),) * 3 if isinstance(std, (int, float)) else tuple(float(s) for s in std)
    return mean, std


class SiglipTeacher(nn.Module):
    """Frozen SigLIP / SigLIP2 image tower (see the module docstring).

    Args:
        path: local folder written by ``save_pretrained``.
        layers: the K blocks (0-based) whose outputs ``features`` holds, in order.
        img_size: the square size frames are resized to; default the checkpoint's own
            (``image_size`` for SigLIP; ``sqrt(num_patches) * patch_size`` for SigLIP2).
        mean, std: override the normalisation (default: the preprocessor config, else 0.5 / 0.5).
        attn_implementation: passed to ``from_pretrained`` ("sdpa" or "eager").
        frames_per_pass: frames per tower call (bounds the memory of ``output_hidden_states``).

    Attributes (the :class:`ImageTeacher` protocol): ``layers``, ``feature_dim``, ``pooled_dim``,
    ``img_size``, ``patch_size``, ``mean``, ``std``; also ``depth`` and ``kind`` ("siglip"/"siglip2").
    """

    def __init__(
        self,
        path: str | os.PathLike,
        layers: Sequence[int],
        *,
        img_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        attn_implementation: str = "sdpa",
        frames_per_pass: int = 64,
    ):
        super().__init__()
        import transformers

        folder = Path(os.fspath(path))
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"SiglipTeacher: path must be a local save_pretrained folder with a config.json, got {str(folder)!r}"
            )
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if model_type in _SIGLIP:
            cls, self.kind = transformers.SiglipVisionModel, "siglip"
        elif model_type in _SIGLIP2:
            cls, self.kind = transformers.Siglip2VisionModel, "siglip2"
        else:
            raise ValueError(
                f"SiglipTeacher: {str(folder)!r} holds a {model_type!r} model; expected one of {_SIGLIP + _SIGLIP2}"
            )
        self.tower = cls.from_pretrained(
            os.fspath(folder), local_files_only=True, attn_implementation=attn_implementation
        )
        self.tower.requires_grad_(False)
        self.tower.eval()
        cfg = self.tower.config
        if not getattr(cfg, "vision_use_head", True) or getattr(self.tower, "head", None) is None:
            raise ValueError(f"SiglipTeacher: {str(folder)!r} has no attention-pool head (vision_use_head=False)")

        self.depth = int(cfg.num_hidden_layers)
        self.layers = tuple(int(i) for i in layers)
        if not self.layers or not all(0 <= i < self.depth for i in self.layers):
            raise ValueError(f"SiglipTeacher: layers must name blocks in [0, {self.depth}), got {tuple(layers)}")
        self.feature_dim = self.pooled_dim = int(cfg.hidden_size)
        self.patch_size = int(cfg.patch_size)
        if self.kind == "siglip":
            native = int(cfg.image_size) if isinstance(cfg.image_size, int) else int(cfg.image_size[0])
        else:
            native = math.isqrt(int(cfg.num_patches)) * self.patch_size
        self.native_size = native
        self.img_size = native if img_size is None else int(img_size)
        if self.img_size < self.patch_size or self.img_size % self.patch_size:
            raise ValueError(
                f"SiglipTeacher: img_size must be a positive multiple of patch_size={self.patch_size}, "
                f"got {self.img_size}"
            )
        stats = read_preprocessor_stats(folder)
        default_mean, default_std = stats if stats is not None else (SIGLIP_MEAN, SIGLIP_STD)
        self.mean = tuple(float(m) for m in (mean if mean is not None else default_mean))
        self.std = tuple(float(s) for s in (std if std is not None else default_std))
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ValueError(f"SiglipTeacher: mean/std must be 3 values each (std > 0), got {self.mean}, {self.std}")
        if frames_per_pass < 1:
            raise ValueError(f"SiglipTeacher: frames_per_pass must be >= 1, got {frames_per_pass}")
        self.frames_per_pass = frames_per_pass
        g = self.img_size // self.patch_size
        self.grid = (g, g)

    def train(self, mode: bool = True) -> SiglipTeacher:
        super().train(mode)
        self.tower.eval()  # frozen: never dropout
        return self

    # ------------------------------------------------------------------ inputs

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames ``[B, T, H, W, 3]`` -> float32 ``[B, 3, T, img_size, img_size]``, resized and normalised."""
        check_rgb_frames("SiglipTeacher.preprocess", frames)
        B, T, H, W, _ = frames.shape
        x = frames.permute(0, 1, 4, 2, 3).reshape(B * T, 3, H, W).to(torch.float32) / 255.0
        x = self._resize(x)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        x = (x - mean) / std
        s = self.img_size
        return x.view(B, T, 3, s, s).transpose(1, 2).contiguous()

    def _resize(self, frames: torch.Tensor) -> torch.Tensor:
        """``[F, 3, H, W] -> [F, 3, s, s]``: bicubic, antialiased when shrinking (as the processors resample)."""
        s = self.img_size
        if tuple(frames.shape[-2:]) == (s, s):
            return frames
        out = F.interpolate(frames.float(), size=(s, s), mode="bicubic", align_corners=False, antialias=True)
        return out.to(frames.dtype)

    # ------------------------------------------------------------------ forward

    def _tower(self, pixels: torch.Tensor):
        """The tower's public forward on normalised frames ``[F, 3, s, s]``."""
        if self.kind == "siglip":
            return self.tower(
                pixel_values=pixels,
                output_hidden_states=True,
                interpolate_pos_encoding=self.img_size != self.native_size,
            )
        Fn, C, s, _ = pixels.shape
        p, g = self.patch_size, s // self.patch_size
        # Patch vectors ordered (dy, dx, c), rows in raster order, as Siglip2's processor builds them.
        patches = pixels.reshape(Fn, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(Fn, g * g, p * p * C)
        mask = torch.ones(Fn, g * g, dtype=torch.long, device=pixels.device)
        shapes = torch.tensor([[g, g]], dtype=torch.long, device=pixels.device).expand(Fn, 2)
        return self.tower(
            pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes, output_hidden_states=True
        )

    def _pool_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """float32 ``[F, S]``: the pool head's probe attention over ``tokens[F, S, C]``, averaged over heads."""
        head = self.tower.head
        probe = head.probe.expand(tokens.shape[0], -1, -1).to(tokens.dtype)  # [F, 1, C]
        if not head.attention.batch_first:
            probe, tokens = probe.transpose(0, 1), tokens.transpose(0, 1)
        _, w = head.attention(probe, tokens, tokens, need_weights=True, average_attn_weights=True)  # [F, 1, S]
        return w[:, 0].float()

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> TeacherOutput:
        """``video[B, 3, T, H, W]`` normalised with ``mean``/``std`` -> :class:`TeacherOutput`.

        Frames of another size are resized to ``img_size`` first. Features and pooled embeddings
        come back in the tower's dtype, the attention in float32.
        """
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != 3:
            got = list(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"SiglipTeacher: video must be [B, 3, T, H, W], got {got}")
        B, _, T, H, W = video.shape
        dtype = next(self.tower.parameters()).dtype
        frames = self._resize(video.transpose(1, 2).reshape(B * T, 3, H, W)).to(dtype)
        feats, pooled, attn = [], [], []
        for chunk in frames.split(self.frames_per_pass):
            out = self._tower(chunk)
            feats.append(torch.stack([out.hidden_states[i + 1] for i in self.layers], dim=1))  # [f, K, S, C]
            pooled.append(out.pooler_output)
            attn.append(self._pool_attention(out.last_hidden_state))
        K, S = len(self.layers), self.grid[0] * self.grid[1]
        features = torch.cat(feats).view(B, T, K, S, -1).transpose(1, 2)
        return TeacherOutput(
            features=l2norm(features.float()).to(dtype),
            pooled=l2norm(torch.cat(pooled).float()).to(dtype).view(B, T, -1),
            attn=torch.cat(attn).view(B, T, S),
        )

    # ------------------------------------------------------------------ config

    @classmethod
    def from_config(cls, cfg, **kwargs) -> SiglipTeacher:
        """Build from a :class:`invnext.config.TeacherConfig` of kind ``siglip``/``siglip2`` and check it.

        ``cfg.path`` is the folder, ``cfg.layers`` the blocks, ``cfg.img_size`` the input size; the
        checkpoint must agree with ``patch_size``, ``width``, ``depth`` and ``pooled_dim``.
        """
        if cfg.kind not in ("siglip", "siglip2"):
            raise ValueError(f"SiglipTeacher.from_config: teacher kind must be 'siglip' or 'siglip2', got {cfg.kind!r}")
        if cfg.path is None:
            raise ValueError(
                f"SiglipTeacher.from_config: teacher.path is not set; save {cfg.name} locally with save_pretrained "
                "and point teacher.path at that folder (nothing is downloaded)"
            )
        teacher = cls(cfg.path, cfg.layers, img_size=cfg.img_size, **kwargs)
        found = {
            "patch_size": teacher.patch_size,
            "width": teacher.feature_dim,
            "depth": teacher.depth,
            "pooled_dim": teacher.pooled_dim,
        }
        for name, value in found.items():
            if getattr(cfg, name) != value:
                raise ValueError(
                    f"TeacherConfig.{name}={getattr(cfg, name)} but the checkpoint at {cfg.path!r} has {value}"
                )
        return teacher
