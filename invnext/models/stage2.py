"""Stage 2: frozen-target latent prediction (method.md "Losses", Stage 2).

A frozen copy of the Stage-1 encoder (``requires_grad=False``, always eval, never updated:
no EMA) encodes the full clip; its final-layer grid tokens, L2-normalised, are the targets.
The student encoder (initialised from the same Stage-1 weights) sees each multi-block view's
context: every visible token of every sample is kept (ragged packing; the release instead
truncates every sample to the batch's smallest context). The predictor fills in the hidden
places; ``head`` (Linear-GELU-Linear-LayerNorm, predictor width -> encoder width) maps the
latents at hidden tokens, and the loss is the mean ``2 - 2 cos`` over hidden tokens, summed
over views.

Profiler regions (``torch.profiler.record_function``): "teacher" (the frozen target), "masks",
"encoder", "predictor", "loss" (head and cosine loss), the last four once per view.

The Stage-2 loss never reads the pooled embedding, so the student's attention-pool head is
frozen here (it keeps its Stage-1 weights) and the pool is skipped in every Stage-2 pass.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.profiler import record_function

from invnext import nn as inn
from invnext.config import Stage2Config
from invnext.models.encoder import Encoder
from invnext.models.layers import MLPHead, cosine_loss, l2norm, true_positions
from invnext.models.predictor import Predictor


class Stage2Model(nn.Module):
    """Student encoder + predictor + head, and the frozen target encoder.

    Args:
        cfg: :class:`Stage2Config`.
        init_encoder: a (Stage-1) :class:`Encoder` whose weights initialise both the
            student and the frozen target (position tables resampled to Stage 2's grid).
            Without it both start from one random initialisation.
    """

    def __init__(self, cfg: Stage2Config, init_encoder: Encoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder)
        if init_encoder is not None:
            self.encoder.load_resized(init_encoder.state_dict())
        self.target = copy.deepcopy(self.encoder)
        self.encoder.pool.requires_grad_(False)
        self.target.requires_grad_(False)
        self.target.eval()
        self.predictor = Predictor(cfg.predictor, cfg.encoder.width, cfg.encoder.grid)
        self.head = MLPHead(cfg.predictor.width, cfg.predictor.width, cfg.encoder.width)
        self.view_samplers = nn.ModuleList(  # the multi-block views', in order; future views need none
            inn.MultiblockMask(v.num_blocks, v.spatial_scale, v.aspect_ratio, v.temporal_scale)
            for v in cfg.views
            if not (v.hide_last or v.hide_first)
        )
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> "Stage2Model":
        super().train(mode)
        self.target.eval()
        return self

    @torch.no_grad()
    def targets(self, video: torch.Tensor) -> torch.Tensor:
        """The frozen encoder's final grid tokens, L2-normalised: ``[B, N, width]``."""
        tokens, _ = self.target.encode(video, pool=False)
        return l2norm(tokens.float())

    def view_masks(
        self, batch_size: int, grid, device, generator: torch.Generator | None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One ``(hidden bool[B, N] on device, num_hidden int64[B] on the CPU)`` per view.

        The sampler draws the boxes on the host, so the counts that size the packed batch
        come without reading the GPU: the step never waits for the teacher to finish.
        """
        samplers = iter(self.view_samplers)
        return [
            step_mask(batch_size, grid, view.hide_first, view.hide_last, device)
            if view.hide_last or view.hide_first
            else next(samplers)(batch_size, grid, generator=generator, device=device, return_counts=True)
            for view in self.cfg.views
        ]

    def forward(
        self,
        video: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        masks: list[torch.Tensor | tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One Stage-2 objective evaluation.

        Args:
            video: ``[B, 3, T, H, W]`` normalised with ``encoder.mean/std``.
            generator: CPU ``torch.Generator`` for the view masks.
            masks: optional list, one entry per view, instead of sampling: ``hidden bool[B, N]``
                or the pair ``(hidden, num_hidden int64[B] on the CPU)`` that :meth:`view_masks`
                returns. A bare mask on a GPU costs one host read per view for its counts.
        Returns:
            dict: ``loss`` (weight * sum over views), ``view{i}`` per view, ``hidden{i}`` masks.
        """
        grid = self.encoder.grid_of(video)
        B = video.shape[0]
        N = grid[0] * grid[1] * grid[2]
        with record_function("teacher"):
            target = self.targets(video).reshape(B * N, -1)
        if masks is None:
            with record_function("masks"):
                masks = self.view_masks(B, grid, video.device, generator)
        if len(masks) != len(self.cfg.views):
            views = len(self.cfg.views)
            raise ValueError(f"Stage2Model: masks must hold one mask per view ({views}), got {len(masks)}")
        out: dict[str, torch.Tensor] = {}
        total = video.new_zeros((), dtype=torch.float32)
        for i, view in enumerate(masks):
            hidden, counts = _with_counts(view, i)
            with record_function("encoder"):
                enc = self.encoder.forward_masked(video, hidden, num_visible=(N - counts).tolist(), pool=False)
            with record_function("predictor"):
                latents = self.predictor(enc.tokens, enc.index, B, grid)
            with record_function("loss"):
                where = true_positions(hidden.reshape(-1), int(counts.sum()))
                pred = self.head(latents.reshape(B * N, -1)[where])
                loss = cosine_loss(pred, target[where])
            out[f"view{i}"] = loss
            out[f"hidden{i}"] = hidden
            total = total + loss
        out["loss"] = self.cfg.loss_weight * total
        return out


def _with_counts(
    view: torch.Tensor | tuple[torch.Tensor, torch.Tensor], index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden, num_hidden on the CPU)`` of one view given as a mask or a (mask, counts) pair."""
    if isinstance(view, torch.Tensor):
        return view, view.sum(1).cpu()  # a host read: on a GPU it waits for the mask
    if not (isinstance(view, (tuple, list)) and len(view) == 2):
        raise TypeError(f"Stage2Model: masks[{index}] must be a bool[B, N] mask or a (mask, num_hidden) pair")
    hidden, counts = view
    if not (isinstance(counts, torch.Tensor) and counts.device.type == "cpu" and counts.shape == hidden.shape[:1]):
        raise ValueError(
            f"Stage2Model: masks[{index}]: num_hidden must be a CPU tensor of shape [{hidden.shape[0]}], "
            f"got {getattr(counts, 'shape', type(counts).__name__)}"
        )
    return hidden, counts


def step_mask(
    batch_size: int, grid: tuple[int, int, int], first: int, last: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A past or future view: ``(hidden bool[B, N], num_hidden int64[B] on the CPU)`` hiding the
    first ``first`` or the last ``last`` token steps at every place (tokens in (t, h, w) order)."""
    T, H, W = grid
    steps, name = (last, "hide_last") if last else (first, "hide_first")
    if not 0 < steps < T:
        raise ValueError(f"Stage2Model: views[].{name}={steps} must lie in [1, {T - 1}] for a grid of {T} token steps")
    hidden = torch.zeros(T, H * W, dtype=torch.bool, device=device)
    if last:
        hidden[T - last :] = True
    else:
        hidden[:first] = True
    hidden = hidden.reshape(1, -1).expand(batch_size, -1).contiguous()
    return hidden, torch.full((batch_size,), steps * H * W, dtype=torch.int64)
