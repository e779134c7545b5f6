"""Building blocks shared by the encoder, predictor, teacher and objectives.

Packed (ragged) batches follow invnext.ops: ``x[total, C]`` with ``cu_seqlens int32[B+1]``;
every helper here is vectorised over rows and never reads device values on the host.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class Packing(NamedTuple):
    """How a packed batch is laid out; built once per forward and passed to every block.

    cu_seqlens:    int32[B+1]
    max_seqlen:    int
    sample_of_row: int64[total], the sample each row belongs to
    batch_size:    B (host int)
    num_prefix:    prefix (class) tokens at the start of every sample
    coords:        int32[total, 3] (t, h, w) of every row (prefix rows 0), or None
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    sample_of_row: torch.Tensor
    batch_size: int
    num_prefix: int
    coords: torch.Tensor | None


def sample_of_row(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64[total]: the sample of every packed row (no host sync)."""
    rows = torch.arange(total, device=cu_seqlens.device, dtype=torch.int64)
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), rows, right=True)


def make_packing(cu_seqlens: torch.Tensor, max_seqlen: int, total: int, num_prefix: int, coords=None) -> Packing:
    return Packing(cu_seqlens, max_seqlen, sample_of_row(cu_seqlens, total), cu_seqlens.numel() - 1, num_prefix, coords)


def uniform_cu_seqlens(batch_size: int, length: int, device) -> torch.Tensor:
    """cu_seqlens of ``batch_size`` samples of ``length`` tokens each."""
    return (torch.arange(batch_size + 1, device=device, dtype=torch.int64) * length).to(torch.int32)


def grid_rows(cu_seqlens: torch.Tensor, num_prefix: int, num_grid_rows: int) -> torch.Tensor:
    """int64[num_grid_rows]: the packed rows that are not prefix rows, in order.

    Grid row j of the batch sits in sample s (found on the prefix-free prefix sums) and is
    shifted past the ``num_prefix`` rows of samples 0..s, so no boolean indexing (no sync).
    """
    B = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.int64) - num_prefix * torch.arange(B + 1, device=cu_seqlens.device)
    j = torch.arange(num_grid_rows, device=cu_seqlens.device, dtype=torch.int64)
    s = torch.searchsorted(cu[1:], j, right=True)
    return j + num_prefix * (s + 1)


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """int64[count]: the indices where the 1D bool ``mask`` is True, ascending.

    ``count`` (the number of True entries, known on the host) sizes the result, so this is
    a prefix sum and a scatter instead of ``nonzero`` (which syncs).
    """
    flat = mask.reshape(-1)
    rank = torch.cumsum(flat.to(torch.int64), 0) - 1
    target = torch.where(flat, rank, torch.full_like(rank, count))
    out = torch.empty(count + 1, dtype=torch.int64, device=mask.device)
    out.scatter_(0, target, torch.arange(flat.numel(), device=mask.device, dtype=torch.int64))
    return out[:count]


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-6)


def cosine_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``2 - 2 cos(pred, target)`` (both normalised here; computed in fp32)."""
    p, t = l2norm(pred.float()), l2norm(target.float())
    return (2.0 - 2.0 * (p * t).sum(-1)).mean()


def drop_path_packed(x: torch.Tensor, p: float, pack: Packing, training: bool) -> torch.Tensor:
    """Stochastic depth per *sample* of a packed batch: a dropped sample's whole branch is zero.

    Survivors are scaled by 1 / (1 - p) so the expectation is unchanged.
    """
    if p == 0.0 or not training:
        return x
    keep = torch.rand(pack.batch_size, device=x.device) >= p
    scale = keep.to(x.dtype) / (1.0 - p)
    return x * scale[pack.sample_of_row][:, None]


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.init = init
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class MLPHead(nn.Module):
    """Linear-GELU-Linear-LayerNorm, the projection of every alignment/prediction head."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(self.act(self.fc1(x))))


def init_linear_trunc_normal(module: nn.Module, std: float = 0.02) -> None:
    """ViT-style init of every Linear below ``module``: truncated normal weights, zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------- pixels


def check_rgb_frames(owner: str, frames: torch.Tensor) -> None:
    """Raise unless ``frames`` is uint8 ``[B, T, H, W, 3]``, the layout every model's ``preprocess``
    takes from the data loaders, so a float or channels-first clip fails before it is normalised."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 5 or frames.shape[-1] != 3:
        got = list(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"{owner}: frames must be [B, T, H, W, 3], got {got}")
    if frames.dtype != torch.uint8:
        raise TypeError(f"{owner}: frames must be uint8, got {frames.dtype}")


def patchify(video: torch.Tensor, patch: int, tubelet: int = 1) -> torch.Tensor:
    """``video[B, C, T, H, W] -> [B, N, C*tubelet*patch*patch]``, tokens in raster order (t, h, w).

    Each token's vector is ordered (c, dt, dy, dx), the flattening of a Conv3d kernel of
    shape ``[C, tubelet, patch, patch]``, so a patch-embedding Linear maps one-to-one onto
    a Conv3d weight.
    """
    B, C, T, H, W = video.shape
    if H % patch or W % patch or T % tubelet:
        raise ValueError(
            f"patchify: video [B, C, T, H, W] = {list(video.shape)} must have H, W multiples of patch={patch} "
            f"and T a multiple of tubelet={tubelet}"
        )
    t, h, w = T // tubelet, H // patch, W // patch
    x = video.reshape(B, C, t, tubelet, h, patch, w, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, t * h * w, C * tubelet * patch * patch)


# --------------------------------------------------------------------------- position tables


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[len(positions), dim]`` (dim even): ``[sin(p w_k), cos(p w_k)]`` with ``w_k = 10000^(-k / (dim/2))``."""
    half = dim // 2
    omega = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(half, 1))
    angle = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat((angle.sin(), angle.cos()), dim=1)


def sincos_3d(width: int, grid: tuple[int, int, int], num_prefix: int = 0) -> torch.Tensor:
    """Fixed joint 3D sin-cos table ``float32[num_prefix + T*H*W, width]``.

    Channels are split [t | h | w]: a quarter (rounded to even) for time, the rest halved
    (each even) between rows and columns; an odd leftover channel is zero. Each part is the
    1D sin-cos embedding of that coordinate, so every grid token gets a distinct code and
    nearby tokens similar ones. The ``num_prefix`` class-token rows are zero.
    """
    T, H, W = grid
    d_t = 2 * (width // 8)
    rest = width - d_t
    d_h = 2 * (rest // 4)
    d_w = 2 * ((rest - d_h) // 2)
    t, h, w = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    parts = [_sincos_1d(d_t, t.flatten()), _sincos_1d(d_h, h.flatten()), _sincos_1d(d_w, w.flatten())]
    table = torch.cat(parts, dim=1)
    table = F.pad(table, (0, width - table.shape[1]))
    table = torch.cat((table.new_zeros(num_prefix, width), table), dim=0)
    return table.to(torch.float32)


def resize_grid_table(table: torch.Tensor, src: tuple[int, int, int], dst: tuple[int, int, int]) -> torch.Tensor:
    """Resample a grid position table ``[1, T*H*W, C]`` from grid ``src`` to ``dst``.

    Bicubic in space (per frame), then linear in time, both with ``align_corners=False``
    (the centres of the old and new cells line up). Computed in float32 on the table's own
    device; returns the table's dtype. Identity when ``src == dst``.
    """
    if tuple(src) == tuple(dst):
        return table
    T0, H0, W0 = src
    T, H, W = dst
    C = table.shape[-1]
    x = table.reshape(T0, H0, W0, C).to(torch.float32).permute(0, 3, 1, 2)  # [T0, C, H0, W0]
    if (H0, W0) != (H, W):
        x = F.interpolate(x, size=(H, W), mode="bicubic", align_corners=False)
    x = x.permute(2, 3, 1, 0).reshape(H * W, C, T0)  # [H*W, C, T0]
    if T0 != T:
        x = F.interpolate(x, size=T, mode="linear", align_corners=False)
    x = x.reshape(H, W, C, T).permute(3, 0, 1, 2).reshape(1, T * H * W, C)
    return x.to(table.dtype)


class PositionTable(nn.Module):
    """Learnable position table initialised from :func:`sincos_3d`.

    ``weight``: ``[1, num_prefix + T*H*W, C]`` for the preset grid; ``forward(grid)`` returns
    ``(prefix [1, P, C], grid [1, T'*H'*W', C])``, the grid part resampled when the clip's
    grid differs from the preset (frames or resolution changed).
    """

    def __init__(self, width: int, grid: tuple[int, int, int], num_prefix: int = 0):
        super().__init__()
        self.grid = tuple(grid)
        self.num_prefix = num_prefix
        self.weight = nn.Parameter(torch.empty(1, num_prefix + math.prod(grid), width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.copy_(sincos_3d(self.weight.shape[-1], self.grid, self.num_prefix)[None])

    def forward(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        P = self.num_prefix
        return self.weight[:, :P], resize_grid_table(self.weight[:, P:], self.grid, tuple(grid))

    def resized_state(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """This table's weight resampled to ``grid`` (for loading into a model of another shape)."""
        prefix, table = self.forward(grid)
        return torch.cat((prefix, table), dim=1).detach()
