"""Stage 1: semantic-guided pixel reconstruction with teacher alignment (method.md "Losses" (a)-(c)).

One step on a clip batch ``video[B, 3, T, H, W]`` (normalised with ``encoder.mean/std``):

1. The frozen teacher (no grad, eval mode) sees every frame: per-layer features, pooled
   embedding, pooling attention ``attn[B, frames, S]``. A token of a tubelet spans u frames:
   the mask reads their mean attention, and alignment (``align_frames``) pairs the token with
   each of its u frames (the head predicts u features) or with their mean.
2. Semantic mask: per frame keep the ``keep = S - round(ratio * S)`` tokens the teacher
   attends to most (``"topk"``) or a draw proportional to attention (``"sample"``).
3. The encoder runs on the visible tokens only (packed, ragged-ready), returning the
   outputs of the student blocks ``cfg.student_layers``.
4. (a) Alignment: head i (Linear-GELU-Linear-LayerNorm) maps student block
   ``student_layers[i]`` (+ the alignment position table) at visible tokens; loss
   ``2 - 2 cos`` against teacher layer ``teacher.layers[i]`` at the same tokens, averaged
   over tokens, then over the K pairs. Pair i is always (student i, teacher i) — the
   authors' release indexes the student with a stale loop variable instead.
   (b) Pooled: ``pool_head(encoder pooled)`` vs the teacher's per-frame pooled embeddings
   averaged over frames: ``2 - 2 cos``.
   (c) Diffusion: the predictor turns [visible tokens; mask tokens] into latents; the decoder's
   diffusion loss reconstructs each hidden token's raw pixel patch (in [-1, 1]) from its latent.
5. ``loss = align_weight * (a) + pool_weight * (b) + diffusion_weight * (c)``.

Profiler regions (``torch.profiler.record_function``, for the step-time breakdown): "teacher",
"masks", "encoder", "loss" ((a) and (b)), "predictor", "decoder" ((c): decoder and its loss).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.profiler import record_function

from invnext import nn as inn
from invnext.config import Stage1Config
from invnext.models.decoder import DiffusionDecoder
from invnext.models.encoder import Encoder, EncoderOutput
from invnext.models.layers import MLPHead, PositionTable, cosine_loss, grid_rows, patchify, true_positions
from invnext.models.predictor import Predictor
from invnext.models.teacher import ImageTeacher, TeacherOutput, build_teacher, teacher_input
from invnext.models.teacher_interface import token_attention, token_features


def kept_per_frame(ratio: float, frame_tokens: int) -> int:
    """Tokens kept per frame: ``S - min(floor(ratio * S + 1/2), S - 1)`` (at least one)."""
    return frame_tokens - min(math.floor(ratio * frame_tokens + 0.5), frame_tokens - 1)


class Stage1Model(nn.Module):
    """Encoder + predictor + diffusion decoder + alignment heads, with a frozen teacher.

    Args:
        cfg: :class:`Stage1Config`.
        teacher: an :class:`ImageTeacher`; default: built from ``cfg.teacher`` (``kind="tiny"`` only).
            It is frozen here (``requires_grad_(False)``) and kept in eval mode.
    """

    def __init__(self, cfg: Stage1Config, teacher: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        enc = cfg.encoder
        self.encoder = Encoder(enc)
        self.teacher = teacher if teacher is not None else build_teacher(cfg.teacher)
        if not isinstance(self.teacher, ImageTeacher):
            raise TypeError(f"Stage1Model: teacher must implement ImageTeacher, got {type(self.teacher).__name__}")
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.student_layers = cfg.student_layers
        if len(self.student_layers) != len(self.teacher.layers):
            raise ValueError(
                f"Stage1Model: {len(self.student_layers)} student layers {self.student_layers} cannot pair with "
                f"{len(self.teacher.layers)} teacher layers {tuple(self.teacher.layers)}"
            )
        Ct, Cp = self.teacher.feature_dim, self.teacher.pooled_dim
        self.align_pos = PositionTable(enc.width, enc.grid, num_prefix=0)
        u = cfg.frames_per_alignment
        self.align_heads = nn.ModuleList(MLPHead(enc.width, Ct, Ct * u) for _ in self.student_layers)
        self.pool_head = MLPHead(enc.embed_dim, Cp, Cp)
        self.predictor = Predictor(cfg.predictor, enc.width, enc.grid)
        self.decoder = DiffusionDecoder(cfg.decoder, enc.patch_dim, cfg.predictor.width)
        # The semantic sampler's keep follows each clip's frame size: given per call.
        tube = cfg.mask_mode == "tube"
        self.mask_sampler = inn.TubeMask(cfg.mask_ratio) if tube else inn.SemanticMask(None, cfg.mask_mode)
        for head in (*self.align_heads, self.pool_head):
            for m in head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                    nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> "Stage1Model":
        super().train(mode)
        self.teacher.eval()  # frozen: never dropout/drop-path, whatever the trainer asks
        return self

    def teacher_input(self, video: torch.Tensor) -> torch.Tensor:
        """The student clip re-normalised (and resized) for the teacher: ``[B, 3, T, s, s]``, s = teacher.img_size."""
        mean = video.new_tensor(self.encoder.mean).view(1, 3, 1, 1, 1)
        std = video.new_tensor(self.encoder.std).view(1, 3, 1, 1, 1)
        return teacher_input(video * std + mean, self.teacher)

    def pixel_targets(self, video: torch.Tensor) -> torch.Tensor:
        """Raw pixel patches in [-1, 1]: ``[B, N, patch_dim]`` (the decoder's targets)."""
        mean = video.new_tensor(self.encoder.mean).view(1, 3, 1, 1, 1)
        std = video.new_tensor(self.encoder.std).view(1, 3, 1, 1, 1)
        rgb = video * std + mean
        return patchify(rgb * 2.0 - 1.0, self.cfg.encoder.patch_size, self.cfg.encoder.tubelet_size)

    def run_teacher(self, video: torch.Tensor, teacher_video: torch.Tensor | None = None) -> TeacherOutput:
        """The frozen teacher's output per frame: ``features[B, K, frames, S, Ct]``, ``attn[B, frames, S]``."""
        with torch.no_grad():
            out = self.teacher(teacher_video if teacher_video is not None else self.teacher_input(video))
        return TeacherOutput(*(t.detach() for t in out))

    def alignment_targets(self, tout: TeacherOutput) -> torch.Tensor:
        """``[B, K, N, cfg.frames_per_alignment, Ct]``: what head i predicts at each token place (raster t, h, w)."""
        u = self.cfg.encoder.tubelet_size
        if self.cfg.frames_per_alignment == 1:
            return token_features(tout.features, u).flatten(2, 3)[:, :, :, None]  # [B, K, T*S, 1, Ct]
        B, K, frames, S, Ct = tout.features.shape
        return tout.features.reshape(B, K, frames // u, u, S, Ct).transpose(3, 4).reshape(B, K, -1, u, Ct)

    def alignment_losses(self, enc: EncoderOutput, tout: TeacherOutput) -> torch.Tensor:
        """float32[K]: loss of pair i = student block ``student_layers[i]`` vs teacher ``layers[i]``, visible tokens
        (and, for a tubelet with ``align_frames="each"``, every frame of each token, averaged)."""
        T, H, W = enc.grid
        N = T * H * W
        B = enc.pooled.shape[0]
        P = self.encoder.num_prefix
        rows = grid_rows(enc.cu_seqlens, P, enc.tokens.shape[0] - B * P)
        place = enc.index[rows]  # b*N + n of every visible token
        _, pos = self.align_pos(enc.grid)
        pos = pos[0].to(enc.tokens.dtype)[place % N]
        targets = self.alignment_targets(tout)  # [B, K, N, u, Ct]
        u, Ct = targets.shape[-2:]
        losses = []
        for i, head in enumerate(self.align_heads):
            student = head(enc.hidden[i][rows] + pos).reshape(-1, u, Ct)
            target = targets[:, i].reshape(B * N, u, Ct)[place]
            losses.append(cosine_loss(student, target))
        return torch.stack(losses)

    def forward(
        self,
        video: torch.Tensor,
        teacher_video: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """One Stage-1 objective evaluation.

        Args:
            video: ``[B, 3, T, H, W]`` normalised with ``encoder.mean/std``.
            teacher_video: optional teacher input ``[B, 3, T, s, s]``; default :meth:`teacher_input`.
            generator: CPU ``torch.Generator`` for the mask (``"sample"``), diffusion t and noise.
        Returns:
            dict: ``loss`` (weighted total), ``align`` (mean over pairs), ``align_per_layer`` [K],
            ``pool``, ``diffusion``; plus ``hidden`` (the bool[B, N] mask used), detached.
        """
        cfg = self.cfg
        grid = self.encoder.grid_of(video)
        T, H, W = grid
        S, N = H * W, T * H * W
        B = video.shape[0]
        with record_function("teacher"):
            tout = self.run_teacher(video, teacher_video)
        frames = T * cfg.encoder.tubelet_size
        if tuple(tout.attn.shape) != (B, frames, S) or tout.features.shape[:4] != (B, len(self.student_layers), frames, S):
            raise ValueError(
                f"Stage1Model: the teacher's grid must match the student's ({frames} frames of {H}x{W} tokens); "
                f"got attn {list(tout.attn.shape)}, features {list(tout.features.shape)}"
            )

        keep = kept_per_frame(cfg.mask_ratio, S)
        with record_function("masks"):
            if cfg.mask_mode == "tube":  # the ablation: the same ratio, places drawn at random (no teacher)
                hidden = self.mask_sampler(B, grid, generator=generator, device=video.device)
            else:
                hidden = self.mask_sampler(token_attention(tout.attn, cfg.encoder.tubelet_size).float(), keep=keep, generator=generator)
        with record_function("encoder"):
            enc = self.encoder.forward_masked(
                video, hidden, num_visible=[T * keep] * B, return_layers=self.student_layers
            )

        with record_function("loss"):
            per_layer = self.alignment_losses(enc, tout)
            align = per_layer.mean()
            pool = cosine_loss(self.pool_head(enc.pooled), tout.pooled.float().mean(1))

        with record_function("predictor"):
            latents = self.predictor(enc.tokens, enc.index, B, grid)  # [B, N, Wp]
        with record_function("decoder"):
            where = true_positions(hidden.reshape(-1), B * (N - T * keep))
            cond = latents.reshape(B * N, -1)[where]
            target = self.pixel_targets(video).reshape(B * N, -1)[where]
            diffusion = self.decoder.loss(cond, target, generator=generator)

        loss = cfg.align_weight * align + cfg.pool_weight * pool + cfg.diffusion_weight * diffusion
        return {
            "loss": loss,
            "align": align,
            "align_per_layer": per_layer,
            "pool": pool,
            "diffusion": diffusion,
            "hidden": hidden,
        }
