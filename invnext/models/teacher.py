"""The frozen image teacher of Stage 1: a small bundled implementation of its interface
(:mod:`.teacher_interface`).

A teacher sees every frame as an image and returns (method.md "Teacher"):

    features: [B, K, T, S, Ct]  the outputs of its K chosen blocks, per frame, L2-normalised
    pooled:   [B, T, Cp]        its attention-pool embedding per frame, L2-normalised
    attn:     [B, T, S]         the pool head's attention over the S = h*w tokens of each
                                frame (averaged over heads; each row sums to 1)

with tokens in raster order (h, w). Stage 1 aligns student block ``align_layers[i]`` with
``features[:, i]``, the pooled student embedding with ``pooled`` averaged over frames, and
keeps the tokens ``attn`` ranks highest visible.

:class:`TinyTeacher` is a small pre-LN ViT with a SigLIP-style attention-pool head (a
learned probe query, multi-head cross-attention, then a residual MLP), with either a linear
patch embedding or the small convolutional stem :class:`ConvPatchEmbed`
(``TeacherConfig.patch_embed``). It is what the tests, the ``tiny`` preset and the bundled
default teacher use; :class:`invnext.models.hf_teacher.SiglipTeacher` wraps a local SigLIP /
SigLIP2 tower the same way.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from invnext import nn as inn
from invnext.config import TeacherConfig
from invnext.models.layers import init_linear_trunc_normal, l2norm, patchify, sincos_3d, uniform_cu_seqlens
from invnext.models.teacher_interface import ImageTeacher, TeacherOutput


# Channels of ConvPatchEmbed's two hidden stages (fixed: part of the stem's definition).
CONV_STEM_CHANNELS = (32, 64)


class ConvPatchEmbed(nn.Module):
    """A small convolutional patch embedding: ``[F, S, 3 * p * p]`` patch vectors -> ``[F, S, width]`` tokens.

    The patches are put back into images ``[F, 3, g*p, g*p]``, averaged over ``p/4 x p/4``
    blocks, then four 3x3 convolutions (two of stride 2, ReLU between) give one ``width``-vector
    per patch with a ~17 px receptive field at 1/4 resolution (~68 px at full resolution), so
    every token sees a whole object. Convolutions share weights over positions: a teacher
    recognises a digit wherever it is after a few thousand images, where a linear patch
    embedding has to learn every position and sub-patch offset separately (measured on the
    bundled digits: at chance after 400 steps).
    """

    def __init__(self, width: int, patch: int, channels: tuple[int, int] = CONV_STEM_CHANNELS):
        super().__init__()
        if patch % 4:
            raise ValueError(f"ConvPatchEmbed: patch must be a multiple of 4, got {patch}")
        self.patch = patch
        c1, c2 = channels
        self.net = nn.Sequential(
            nn.AvgPool2d(patch // 4),
            nn.Conv2d(3, c1, 3, 1, 1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(c2, c2, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(c2, width, 3, 1, 1),
        )

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """``[F, 3, H, W]`` -> ``[F, width, H / p, W / p]``."""
        return self.net(images)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        F_, S, _ = tokens.shape
        g, p = math.isqrt(S), self.patch
        # invert patchify's (h, w) raster of (c, dy, dx) vectors
        images = tokens.view(F_, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(F_, 3, g * p, g * p)
        return self.feature_map(images).flatten(2).transpose(1, 2)


class _TeacherBlock(nn.Module):
    """Pre-LN ViT block (SigLIP style: LayerNorm, qkv with bias, GELU MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        hidden = round(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.attend = inn.MaskedAttention()

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
        total, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(total, 3, self.heads, width // self.heads)
        attn = self.attend(qkv, None, None, cu_seqlens, length)
        x = x + self.proj(attn.reshape(total, width))
        return x + self.mlp(self.norm2(x))


class _ProbePool(nn.Module):
    """SigLIP's multihead attention pooling: a learned probe attends over the tokens, then a residual MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, out_dim: int):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, width))
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        hidden = round(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.out = nn.Identity() if out_dim == width else nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x[F, S, C]`` -> ``(pooled [F, out_dim], attention [F, S] averaged over heads)``."""
        F_, S, C = x.shape
        H, D = self.heads, C // self.heads
        q = self.q(self.probe).view(1, H, D)
        k = self.k(x).view(F_, S, H, D)
        v = self.v(x).view(F_, S, H, D)
        w = torch.softmax(torch.einsum("qhd,fshd->fhs", q, k) * D**-0.5, dim=-1)  # [F, H, S]
        o = self.o(torch.einsum("fhs,fshd->fhd", w, v).reshape(F_, C))
        o = o + self.mlp(self.norm(o))
        return self.out(o), w.mean(1)


class TinyTeacher(nn.Module):
    """A small frozen-able image ViT implementing :class:`ImageTeacher` (built from a ``TeacherConfig``).

    ``patch_embed`` maps patchified frames ``[F, S, 3*p*p]`` to tokens ``[F, S, width]``: a Linear
    (``cfg.patch_embed == "linear"``) or a :class:`ConvPatchEmbed` (``"conv"``).
    """

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        self.cfg = cfg
        self.layers = tuple(cfg.layers)
        self.feature_dim = cfg.width
        self.pooled_dim = cfg.pooled_dim
        self.img_size, self.patch_size = cfg.img_size, cfg.patch_size
        self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)
        g = cfg.img_size // cfg.patch_size
        self.grid = (g, g)
        if cfg.patch_embed == "conv":
            self.patch_embed = ConvPatchEmbed(cfg.width, cfg.patch_size)
        else:
            self.patch_embed = nn.Linear(3 * cfg.patch_size**2, cfg.width)
        self.pos_embed = nn.Parameter(sincos_3d(cfg.width, (1, g, g))[None].clone())
        self.blocks = nn.ModuleList(_TeacherBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.post_norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.head = _ProbePool(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.pooled_dim)
        init_linear_trunc_normal(self)
        nn.init.trunc_normal_(self.head.probe, std=0.02, a=-0.04, b=0.04)

    def forward(self, video: torch.Tensor) -> TeacherOutput:
        if video.dim() != 5 or video.shape[1] != 3 or tuple(video.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(
                f"TinyTeacher: video must be [B, 3, T, {self.img_size}, {self.img_size}], got {list(video.shape)}"
            )
        B, _, T, _, _ = video.shape
        frames = video.transpose(1, 2).reshape(B * T, 3, 1, self.img_size, self.img_size)
        x = self.patch_embed(patchify(frames, self.patch_size)) + self.pos_embed.to(video.dtype)  # [B*T, S, C]
        F_, S, C = x.shape
        cu = uniform_cu_seqlens(F_, S, x.device)
        h = x.reshape(F_ * S, C)
        wanted = set(self.layers)
        kept = {}
        for i, block in enumerate(self.blocks):
            h = block(h, cu, S)
            if i in wanted:
                kept[i] = h
        feats = torch.stack([kept[i] for i in self.layers], dim=0).view(len(self.layers), B, T, S, C)
        pooled, attn = self.head(self.post_norm(h).view(F_, S, C))
        return TeacherOutput(
            features=l2norm(feats.transpose(0, 1)),
            pooled=l2norm(pooled).view(B, T, -1),
            attn=attn.view(B, T, S),
        )


def teacher_input(rgb: torch.Tensor, teacher: ImageTeacher) -> torch.Tensor:
    """``rgb [B, 3, T, H, W]`` in [0, 1] -> the teacher's input ``[B, 3, T, s, s]``, s = ``teacher.img_size``.

    Frames are resized bilinearly (in fp32: interpolate has no bf16 kernel on some CPUs) and put in
    the teacher's own normalisation, which need not be the student's.
    """
    B, C, T, H, W = rgb.shape
    s = teacher.img_size
    if (H, W) != (s, s):
        frames = rgb.transpose(1, 2).reshape(B * T, C, H, W)
        frames = F.interpolate(frames.float(), size=(s, s), mode="bilinear", align_corners=False).to(rgb.dtype)
        rgb = frames.view(B, T, C, s, s).transpose(1, 2)
    mean = rgb.new_tensor(teacher.mean).view(1, 3, 1, 1, 1)
    std = rgb.new_tensor(teacher.std).view(1, 3, 1, 1, 1)
    return (rgb - mean) / std


def build_teacher(cfg: TeacherConfig) -> nn.Module:
    """The teacher ``cfg`` describes: the bundled :class:`TinyTeacher` (``kind="tiny"``) or a local
    SigLIP / SigLIP2 tower (``kind="siglip"`` / ``"siglip2"``, loaded offline from ``cfg.path`` by
    :class:`invnext.models.hf_teacher.SiglipTeacher`; needs transformers)."""
    if cfg.kind == "tiny":
        return TinyTeacher(cfg)
    if cfg.kind in ("siglip", "siglip2"):
        from invnext.models.hf_teacher import SiglipTeacher  # imports transformers: only when asked for

        return SiglipTeacher.from_config(cfg)
    raise ValueError(f"build_teacher: unknown teacher kind {cfg.kind!r}")
