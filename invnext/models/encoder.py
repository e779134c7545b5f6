"""The video encoder: a ViT over (t, h, w) patch tokens, run on packed ragged batches.

Structure (method.md "Shapes"):

    patch embed:  RMSNorm(raw patch) -> Linear (== Conv3d, tubelet x patch x patch) -> RMSNorm
    tokens:       [4 class tokens | grid tokens] + learnable 3D sin-cos position table
    block (x depth, pre-norm):
        x = x + drop_path(LayerScale(Attn(RMSNorm(x))))
        x = x + drop_path(LayerScale(MLP(RMSNorm(x))))          MLP = Linear-GELU-Linear (exact or tanh GELU: cfg.activation)
        Attn: qkv (no bias) -> RMSNorm over the full width on q and k -> masked_attention -> proj
    output:       RMSNorm(x); attention pool (query = token mean) -> [B, embed_dim]

Every attention call goes through ``invnext.ops.masked_attention`` on a packed batch
(``cu_seqlens``), so a masked batch runs on exactly its visible tokens, no padding, no
truncation, and a fused kernel drops in through the op's dispatch. Class tokens are the
``num_prefix`` rows of every sample: every token sees them and they see every token.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

from invnext import nn as inn
from invnext import ops
from invnext.config import EncoderConfig
from invnext.models.layers import (
    LayerScale,
    Packing,
    PositionTable,
    check_rgb_frames,
    drop_path_packed,
    init_linear_trunc_normal,
    make_packing,
    patchify,
    resize_grid_table,
    uniform_cu_seqlens,
)
from invnext.models.switches import CheckpointedBlocks

# ImageNet statistics (InternVideo2/UMT convention): preprocess() maps uint8 RGB frames to
# (x / 255 - mean) / std per channel.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class EncoderOutput(NamedTuple):
    """What a packed encoder pass returns.

    tokens:     [total, C], the final (normed) tokens, class tokens first in each sample
    pooled:     [B, embed_dim], the attention-pooled clip embedding (None when pool=False)
    hidden:     tuple of [total, C], the raw output of each requested block, in request order
    cu_seqlens: int32[B+1]; max_seqlen: int
    index:      int64[total], flat place ``b*N + n`` of each row, -1 on class rows
    grid:       (T, H, W) token grid of the clip
    """

    tokens: torch.Tensor
    pooled: torch.Tensor | None
    hidden: tuple[torch.Tensor, ...]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    index: torch.Tensor
    grid: tuple[int, int, int]


def rope_sections(head_dim: int) -> tuple[int, int, int]:
    """Head-dim split of the 3D RoPE: h and w get ``2 * (D // 6)`` channels each, t the rest.

    (A third each, rounded to even: D=64 -> (24, 20, 20), D=88 -> (32, 28, 28).)
    """
    s = 2 * (head_dim // 6)
    return (head_dim - 2 * s, s, s)


class PatchEmbed(nn.Module):
    """Dual-norm patch embedding: ``[B, C, T, H, W] -> [B, N, width]``."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.patch, self.tubelet = cfg.patch_size, cfg.tubelet_size
        self.pre_norm = nn.RMSNorm(cfg.patch_dim, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.patch_dim, cfg.width)  # a Conv3d with kernel = stride = (tubelet, p, p)
        self.post_norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = patchify(video, self.patch, self.tubelet)
        return self.post_norm(self.proj(self.pre_norm(x)))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, eps: float, rope, num_prefix: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_norm = nn.RMSNorm(width, eps=eps)
        self.k_norm = nn.RMSNorm(width, eps=eps)
        self.proj = nn.Linear(width, width)
        self.attend = inn.MaskedAttention(rope=rope, num_prefix=num_prefix)

    def forward(self, x: torch.Tensor, pack: Packing) -> torch.Tensor:
        total, width = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        shape = (total, self.heads, width // self.heads)
        # q/k norms act on the full width before the head split (InternVideo2's qk_normalization).
        q, k = self.q_norm(q).view(shape), self.k_norm(k).view(shape)
        coords = pack.coords if self.attend.rope is not None else None
        out = self.attend(q, k, v.reshape(shape), pack.cu_seqlens, pack.max_seqlen, coords)
        return self.proj(out.reshape(total, width))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: EncoderConfig, drop_path: float, rope):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg.width, cfg.heads, cfg.norm_eps, rope, cfg.num_class_tokens)
        self.ls1 = LayerScale(cfg.width, cfg.layer_scale_init)
        self.norm2 = nn.RMSNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden, cfg.activation)
        self.ls2 = LayerScale(cfg.width, cfg.layer_scale_init)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, pack: Packing) -> torch.Tensor:
        x = x + drop_path_packed(self.ls1(self.attn(self.norm1(x), pack)), self.drop_path, pack, self.training)
        return x + drop_path_packed(self.ls2(self.mlp(self.norm2(x))), self.drop_path, pack, self.training)


class AttentionPool(nn.Module):
    """One query per sample (the mean of its tokens) cross-attends to all its tokens.

    ``q = Wq LN(mean_j x_j)``, ``k_j = Wk LN(x_j)``, ``v_j = Wv LN(x_j)``, multi-head softmax
    over the sample's rows, then ``Wo`` to ``out_dim``. The per-sample softmax over a ragged
    batch is a segment softmax (scatter-max, exp, index_add), vectorised over rows.
    """

    def __init__(self, width: int, heads: int, out_dim: int, eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(width, eps=eps)
        self.norm_k = nn.LayerNorm(width, eps=eps)
        self.norm_v = nn.LayerNorm(width, eps=eps)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, pack: Packing) -> torch.Tensor:
        """``x[total, C]`` -> ``[B, out_dim]``; returns the pooled embedding."""
        total, C = x.shape
        B, H, D = pack.batch_size, self.heads, C // self.heads
        seg = pack.sample_of_row
        # Sums over a sample's rows accumulate in fp32 (bf16 would lose the tail of long samples).
        counts = (pack.cu_seqlens[1:] - pack.cu_seqlens[:-1]).to(torch.float32).clamp_min(1)
        mean = (x.new_zeros(B, C, dtype=torch.float32).index_add(0, seg, x.float()) / counts[:, None]).to(x.dtype)
        q = self.q(self.norm_q(mean)).view(B, H, D)
        k = self.k(self.norm_k(x)).view(total, H, D)
        v = self.v(self.norm_v(x)).view(total, H, D)
        s = (q.float()[seg] * k.float()).sum(-1) * D**-0.5  # [total, H]
        # Segment softmax; the max only guards exp() and carries no gradient.
        m = s.new_full((B, H), float("-inf")).scatter_reduce(0, seg[:, None].expand(total, H), s.detach(), "amax")
        e = torch.exp(s - m[seg])
        z = s.new_zeros(B, H).index_add(0, seg, e)
        w = e / z[seg]
        out = v.new_zeros(B, H, D, dtype=torch.float32).index_add(0, seg, w[..., None] * v.float()).to(v.dtype)
        return self.proj(out.reshape(B, C))


class Encoder(CheckpointedBlocks, nn.Module):
    """InternVideo-Next's video ViT (see the module docstring).

    Attributes:
        mean, std: per-channel normalisation constants of :meth:`preprocess` (ImageNet).
    """

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.width = cfg.width
        self.depth = cfg.depth
        self.num_prefix = cfg.num_class_tokens
        self.patch_embed = PatchEmbed(cfg)
        self.cls_tokens = nn.Parameter(torch.zeros(1, cfg.num_class_tokens, cfg.width))
        self.pos_embed = PositionTable(cfg.width, cfg.grid, cfg.num_class_tokens)
        self.rope = (cfg.rope_theta, rope_sections(cfg.width // cfg.heads)) if cfg.use_rope else None
        # No learned prefix of its own: it is given the class tokens with their positions added.
        self.gather = inn.GatherVisible(cfg.width)
        rates = torch.linspace(0.0, cfg.drop_path, cfg.depth, device="cpu").tolist() if cfg.depth > 1 else [cfg.drop_path]
        self.blocks = nn.ModuleList(Block(cfg, r, self.rope) for r in rates)
        # The authors' released encoders end without a norm (final_norm=False when converting them).
        self.norm = nn.RMSNorm(cfg.width, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.pool = AttentionPool(cfg.width, cfg.pool_heads, cfg.embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_linear_trunc_normal(self)
        nn.init.trunc_normal_(self.cls_tokens, std=0.02, a=-0.04, b=0.04)
        self.pos_embed.reset_parameters()

    # ------------------------------------------------------------------ inputs

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames ``[B, T, H, W, 3]`` -> normalised float32 ``[B, 3, T, H, W]``."""
        check_rgb_frames("Encoder.preprocess", frames)
        mean = torch.tensor(self.mean, device=frames.device)
        std = torch.tensor(self.std, device=frames.device)
        x = (frames.to(torch.float32) / 255.0 - mean) / std
        return x.permute(0, 4, 1, 2, 3).contiguous()

    def grid_of(self, video: torch.Tensor) -> tuple[int, int, int]:
        if not isinstance(video, torch.Tensor) or video.dim() != 5 or video.shape[1] != self.cfg.in_chans:
            got = list(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
            raise ValueError(f"Encoder: video must be [B, {self.cfg.in_chans}, T, H, W], got {got}")
        _, _, T, H, W = video.shape
        p, tub = self.cfg.patch_size, self.cfg.tubelet_size
        if H % p or W % p or T % tub:
            raise ValueError(
                f"Encoder: video frames {H}x{W} must be multiples of patch {p}, and T={T} of tubelet {tub}"
            )
        return (T // tub, H // p, W // p)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the full clip, no positions: ``[B, 3, T, H, W] -> [B, N, C]``."""
        self.grid_of(video)
        return self.patch_embed(video)

    def positions(self, grid: tuple[int, int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prefix [1, P, C] = class tokens + their positions, grid positions [1, N, C])`` in ``dtype``."""
        pre_pos, pos = self.pos_embed(grid)
        return (self.cls_tokens + pre_pos).to(dtype), pos.to(dtype)

    # ------------------------------------------------------------------ forward passes

    def forward_packed(
        self,
        tokens: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        coords: torch.Tensor | None = None,
        *,
        index: torch.Tensor | None = None,
        grid: tuple[int, int, int] | None = None,
        return_layers: Sequence[int] = (),
        pool: bool = True,
    ) -> EncoderOutput:
        """Run the blocks on an already embedded packed batch.

        Args:
            tokens: ``[total, C]``, each sample = its ``num_prefix`` class rows then its grid
                tokens, positions already added (what :func:`ops.gather_visible` returns).
            cu_seqlens: int32 ``[B+1]``; max_seqlen: the longest sample.
            coords: int32 ``[total, 3]`` (t, h, w) per row; needed only with 3D RoPE.
            index, grid: passed through to the output (``index`` = flat place per row).
            return_layers: 0-based blocks whose raw outputs are returned in ``hidden``.
            pool: run the attention-pool head (False: ``pooled`` is None).
        Returns:
            :class:`EncoderOutput`.
        """
        if self.rope is not None and coords is None:
            raise ValueError("Encoder.forward_packed: this encoder uses 3D RoPE and needs coords[total, 3]")
        for i in return_layers:
            if not 0 <= i < self.depth:
                raise ValueError(f"Encoder: return_layers entries must lie in [0, {self.depth}), got {i}")
        pack = make_packing(cu_seqlens, max_seqlen, tokens.shape[0], self.num_prefix, coords)
        wanted = {i: None for i in return_layers}
        x = tokens
        for i, block in enumerate(self.blocks):
            x = self.run_block(block, x, pack)
            if i in wanted:
                wanted[i] = x
        x = self.norm(x)
        pooled = self.pool(x, pack) if pool else None
        if index is None:
            index = torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
        return EncoderOutput(x, pooled, tuple(wanted[i] for i in return_layers), cu_seqlens, max_seqlen, index, grid)

    def forward_masked(
        self,
        video: torch.Tensor,
        hidden: torch.Tensor,
        *,
        num_visible: Sequence[int] | None = None,
        return_layers: Sequence[int] = (),
        pool: bool = True,
    ) -> EncoderOutput:
        """Encode only the visible tokens: ``video[B, 3, T, H, W]``, ``hidden bool[B, N]`` (True = hidden).

        Samples may keep different numbers of tokens; all of them are kept (ragged packing).
        ``num_visible`` (host ints per sample) saves a host sync when the mask sampler knows it.
        """
        grid = self.grid_of(video)
        x = self.patch_embed(video)
        prefix, pos = self.positions(grid, x.dtype)
        packed = self.gather(x, hidden, pos, num_visible, prefix=prefix)
        coords = ops.token_coords(packed.index, grid) if self.rope is not None else None
        return self.forward_packed(
            packed.tokens, packed.cu_seqlens, packed.max_seqlen, coords,
            index=packed.index, grid=grid, return_layers=return_layers, pool=pool,
        )

    def forward(self, video: torch.Tensor, *, return_layers: Sequence[int] = (), pool: bool = True) -> EncoderOutput:
        """Encode full clips ``[B, 3, T, H, W]``: every sample has ``P + N`` tokens, still run packed."""
        grid = self.grid_of(video)
        x = self.patch_embed(video)
        B, N, C = x.shape
        prefix, pos = self.positions(grid, x.dtype)
        L = self.num_prefix + N
        tokens = torch.cat((prefix.expand(B, -1, -1), x + pos), dim=1).reshape(B * L, C)
        cu = uniform_cu_seqlens(B, L, x.device)
        n = torch.arange(L, device=x.device) - self.num_prefix
        index = (torch.arange(B, device=x.device)[:, None] * N + n[None, :]).masked_fill(n[None, :] < 0, -1).reshape(-1)
        coords = ops.token_coords(index, grid) if self.rope is not None else None
        return self.forward_packed(
            tokens, cu, L, coords, index=index, grid=grid, return_layers=return_layers, pool=pool
        )

    def encode(self, video: torch.Tensor, *, pool: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Full clips ``[B, 3, T, H, W]`` (normalised) -> ``(grid tokens [B, N, C], pooled [B, embed_dim] or None)``."""
        out = self.forward(video, pool=pool)
        B = video.shape[0]
        L = out.tokens.shape[0] // B
        return out.tokens.view(B, L, -1)[:, self.num_prefix :], out.pooled

    def load_resized(self, state: dict[str, torch.Tensor], strict: bool = True):
        """``load_state_dict`` after resampling a position table saved for another grid (frames/resolution)."""
        state = dict(state)
        key = "pos_embed.weight"
        if key in state and state[key].shape != self.pos_embed.weight.shape:
            src = state[key]
            P = self.num_prefix
            src_grid = _infer_grid(src.shape[1] - P, self.pos_embed.grid)
            state[key] = torch.cat((src[:, :P], resize_grid_table(src[:, P:], src_grid, self.pos_embed.grid)), dim=1)
        return self.load_state_dict(state, strict=strict)


def _infer_grid(n: int, like: tuple[int, int, int]) -> tuple[int, int, int]:
    """The grid of a saved table with ``n`` grid rows, assuming it kept ``like``'s spatial size or frame count."""
    T, H, W = like
    if n % (H * W) == 0:
        return (n // (H * W), H, W)
    side = round((n // T) ** 0.5)
    if n % T == 0 and side * side * T == n:
        return (T, side, side)
    raise ValueError(f"Encoder.load_resized: cannot infer the grid of a position table with {n} grid rows (this model: {like})")
