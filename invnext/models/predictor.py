"""The predictor ("world model"): ModernBERT-style layers over the full token grid.

Input (method.md "Predictor"): the encoder's grid tokens at their visible places and a
learned mask token at every hidden place, each mapped by ``embed`` (Linear-GELU-Linear-
LayerNorm, encoder width -> predictor width), plus a learnable predictor position table.
The predictor runs on the ``N`` grid tokens only, in raster order (t, h, w); the encoder's
class tokens are dropped (their rows carry index -1, which ``ops.scatter_tokens`` ignores).
Since ``embed`` acts per token, ``embed(mask_token)`` is computed once and scattered.

Layers follow ModernBERT's structure so its weights map one-to-one (names included):

    attn_norm: LayerNorm(no bias), Identity for ModernBERT layer 0
    attn:      Wqkv (no bias) -> [total, 3, H, D] -> 1D RoPE on q, k -> attention -> Wo (no bias)
    mlp_norm:  LayerNorm(no bias)
    mlp:       Wi (no bias, width -> 2I) -> (input, gate) -> Wo(GELU(input) * gate)
    x = x + attn(attn_norm(x));  x = x + mlp(mlp_norm(x))

``layer_id = first_layer_id + i`` is the layer's index in ModernBERT (default 23: the last
5 of ModernBERT-large's 28); ``layer_id % global_every == 0`` layers attend globally with
RoPE theta ``global_rope_theta``, the others within a window of ``local_window`` tokens
(``|i - j| <= local_window // 2`` in raster order) with theta ``local_rope_theta``, or
within the ``local_window_3d`` (t, h, w) box when configured.

1D RoPE via the 3D op: raster index ``n`` is passed as coords ``(0, 0, n)`` with sections
``(0, 0, D)``; a section of ``D`` channels rotates pair ``(j, j + D/2)`` by
``n * theta^(-2j/D)``, exactly ModernBERT's rotate-half RoPE. With a 3D box window the
coords must carry (t, h, w), so q and k are rotated beforehand with ``ops.apply_rope_3d``
on the 1D coords and the attention gets the 3D coords for the window only.

Text initialisation (``cfg.init_from`` or :meth:`Predictor.init_from_modernbert`) copies the last
``depth`` layers of a local ModernBERT checkpoint; see :mod:`invnext.models.modernbert`.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from invnext import nn as inn
from invnext import ops
from invnext.config import PredictorConfig
from invnext.models.layers import MLPHead, PositionTable, uniform_cu_seqlens
from invnext.models.modernbert import load_modernbert_layers
from invnext.models.switches import CheckpointedBlocks


class PredictorAttention(nn.Module):
    def __init__(self, cfg: PredictorConfig, is_global: bool):
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.width // cfg.heads
        self.Wqkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.Wo = nn.Linear(cfg.width, cfg.width, bias=False)
        self.theta = cfg.global_rope_theta if is_global else cfg.local_rope_theta
        if is_global:
            self.window = None
        else:
            self.window = tuple(cfg.local_window_3d) if cfg.local_window_3d is not None else cfg.local_window
        self.sections = (0, 0, self.head_dim)
        # A 3D box window reads the (t, h, w) coords, so the 1D RoPE is applied beforehand (module docstring).
        rope = None if isinstance(self.window, tuple) else (self.theta, self.sections)
        self.attend = inn.MaskedAttention(rope=rope, window=self.window)

    def forward(self, x: torch.Tensor, cu_seqlens, max_seqlen: int, coords_1d, coords_3d) -> torch.Tensor:
        total, width = x.shape
        qkv = self.Wqkv(x).view(total, 3, self.heads, self.head_dim)
        if isinstance(self.window, tuple):
            q, k, v = qkv.unbind(1)
            q = ops.apply_rope_3d(q, coords_1d, self.theta, self.sections)
            k = ops.apply_rope_3d(k, coords_1d, self.theta, self.sections)
            out = self.attend(q, k, v, cu_seqlens, max_seqlen, coords_3d)
        else:
            out = self.attend(qkv, None, None, cu_seqlens, max_seqlen, coords_1d)
        return self.Wo(out.reshape(total, width))


class PredictorMLP(nn.Module):
    """GeGLU: ``Wo(GELU(a) * g)`` with ``[a, g] = Wi(x)``."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.Wi = nn.Linear(cfg.width, 2 * cfg.mlp_hidden, bias=False)
        self.act = nn.GELU()
        self.Wo = nn.Linear(cfg.mlp_hidden, cfg.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.act(a) * g)


class PredictorLayer(nn.Module):
    def __init__(self, cfg: PredictorConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.is_global = cfg.layer_is_global(layer_id)
        self.attn_norm = (
            nn.Identity() if layer_id == 0 else nn.LayerNorm(cfg.width, eps=cfg.norm_eps, bias=False)
        )
        self.attn = PredictorAttention(cfg, self.is_global)
        self.mlp_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, bias=False)
        self.mlp = PredictorMLP(cfg)

    def forward(self, x, cu_seqlens, max_seqlen, coords_1d, coords_3d) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cu_seqlens, max_seqlen, coords_1d, coords_3d)
        return x + self.mlp(self.mlp_norm(x))


class Predictor(CheckpointedBlocks, nn.Module):
    """``Predictor(cfg, in_dim, grid)``: encoder tokens (+ mask tokens) -> a latent per grid token.

    Args:
        cfg: :class:`PredictorConfig`.
        in_dim: the encoder's width (the packed tokens' C).
        grid: the preset (T, H, W) grid of the position table (resampled for other grids).
    """

    def __init__(self, cfg: PredictorConfig, in_dim: int, grid: tuple[int, int, int]):
        super().__init__()
        self.cfg = cfg
        self.width = cfg.width
        self.in_dim = in_dim
        self.embed = MLPHead(in_dim, cfg.width, cfg.width)
        self.mask_token = nn.Parameter(torch.zeros(in_dim))
        # Its mask token is scattered after the embedding (module docstring): given per call.
        self.scatter = inn.ScatterTokens(cfg.width, learned_token=False)
        self.pos_embed = PositionTable(cfg.width, grid, num_prefix=0)
        self.layers = nn.ModuleList(PredictorLayer(cfg, cfg.first_layer_id + i) for i in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.width, eps=cfg.norm_eps, bias=False) if cfg.final_norm else nn.Identity()
        self._structures: dict[tuple, tuple] = {}  # see _structure
        self.reset_parameters()
        if cfg.init_from is not None:
            self.init_from_modernbert(cfg.init_from)

    def init_from_modernbert(self, source, *, verbose: bool = True) -> dict[str, str]:
        """Text initialisation: copy the last ``depth`` layers (and final norm) of a local ModernBERT.

        ``source``: a ``save_pretrained`` folder or a ``.safetensors`` file. Prints and returns the
        mapping ``{checkpoint key: predictor key}``; see :mod:`invnext.models.modernbert`.
        """
        return load_modernbert_layers(self, source, verbose=verbose)

    def reset_parameters(self) -> None:
        # Truncated normal cut at 2 std (ModernBERT's: std 0.02; or 1/sqrt(fan-in), cfg.init); norms at 1.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                std = m.in_features**-0.5 if self.cfg.init == "fan_in" else 0.02
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.04, b=0.04)
        self.pos_embed.reset_parameters()

    def forward(
        self, tokens: torch.Tensor, index: torch.Tensor, batch_size: int, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        """Predict a latent for every grid token.

        Args:
            tokens: ``[total, in_dim]`` packed encoder output (class rows included or not).
            index: int64 ``[total]``, flat place ``b*N + n`` of each row, -1 for rows to drop.
            batch_size: B.
            grid: (T, H, W) of the clips.
        Returns:
            ``[B, N, width]``.
        """
        if tokens.dim() != 2 or tokens.shape[1] != self.in_dim:
            raise ValueError(f"Predictor: tokens must be [total, {self.in_dim}], got {list(tokens.shape)}")
        T, H, W = grid
        N = T * H * W
        x = self.embed(tokens)
        mask = self.embed(self.mask_token.to(tokens.dtype)[None])[0].to(x.dtype)
        _, pos = self.pos_embed(grid)
        x = self.scatter(x, index, N, batch_size, pos.to(x.dtype), mask_token=mask)
        return self.forward_grid(x, grid)

    def _structure(self, B: int, grid: tuple[int, int, int], device: torch.device) -> tuple:
        """``(cu_seqlens, coords_1d, coords_3d or None)`` of ``B`` whole grids.

        Made once per (B, grid, device), never written, and declared so
        (``ops.static_structure``): the attention then reuses its window tile lists for these
        tensors (``kernels/_attention_plans.py``), so the local layers build them once per run
        instead of once per layer and step. Not while dynamo traces (it would store traced values).
        """
        key = (B, tuple(grid), str(device))
        hit = self._structures.get(key)
        if hit is None:
            N = grid[0] * grid[1] * grid[2]
            n = torch.arange(N, device=device, dtype=torch.int64).repeat(B)
            coords_1d = F.pad(n[:, None], (2, 0)).to(torch.int32)  # (0, 0, n)
            coords_3d = ops.token_coords(n, grid) if self.cfg.local_window_3d is not None else None
            hit = (uniform_cu_seqlens(B, N, device), coords_1d, coords_3d)
            if not torch.compiler.is_compiling():
                ops.static_structure(hit[0], coords_1d)
                if coords_3d is not None:
                    ops.static_structure(hit[0], coords_3d)
                if len(self._structures) >= 4:  # a few batch sizes (a last partial batch, eval)
                    self._structures.clear()
                self._structures[key] = hit
        return hit

    def forward_grid(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """The layers on an embedded grid ``x[B, N, width]`` (positions added) -> ``[B, N, width]``."""
        B, N, C = x.shape
        cu, coords_1d, coords_3d = self._structure(B, grid, x.device)
        h = x.reshape(B * N, C)
        for layer in self.layers:
            h = self.run_block(layer, h, cu, N, coords_1d, coords_3d)
        return self.final_norm(h).view(B, N, C)
