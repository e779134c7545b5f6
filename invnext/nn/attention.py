"""``MaskedAttention``: the module form of :func:`invnext.ops.masked_attention`."""
from __future__ import annotations

import torch

from invnext import ops

from ._base import FusedOp


class MaskedAttention(FusedOp):
    """Attention within each sample of a packed ragged batch, optionally with 3D RoPE and a
    spatio-temporal window, fixed at construction. No parameters, like flash-attn's
    ``FlashSelfAttention``: the q/k/v and output projections stay the caller's.

    Args:
        softmax_scale: default ``1 / sqrt(D)``.
        rope: ``(theta, (st, sh, sw))``: 3D RoPE on q and k from the ``coords`` given to forward.
        window: None, int ``w`` (1D, raster positions) or ``(wt, wh, ww)`` (needs ``coords``).
        num_prefix: class tokens at the start of every sample: never rotated, never windowed.
        backend: "auto" | "torch" | "triton" | "cuda".

    Forward: ``q, k, v [total, H, D]`` (or ``q = qkv[total, 3, H, D]``), ``cu_seqlens int32[B+1]``,
    ``max_seqlen`` (host int: no sync), ``coords [total, 3]`` -> ``[total, H, D]``.
    """

    op = "masked_attention"

    def __init__(
        self,
        *,
        softmax_scale: float | None = None,
        rope: tuple[float, tuple[int, int, int]] | None = None,
        window: None | int | tuple[int, int, int] = None,
        num_prefix: int = 0,
        backend: str = "auto",
    ):
        super().__init__(backend)
        self.softmax_scale = softmax_scale
        self.rope = rope
        self.window = window
        self.num_prefix = num_prefix

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        coords: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return ops.masked_attention(
            q, k, v, cu_seqlens, max_seqlen, softmax_scale=self.softmax_scale, coords=coords, rope=self.rope,
            window=self.window, num_prefix=self.num_prefix, backend=self.backend,
        )  # fmt: skip

    def _settings(self) -> dict:
        return {"softmax_scale": self.softmax_scale, "rope": self.rope, "window": self.window,
                "num_prefix": self.num_prefix}  # fmt: skip


class VarlenAttention(FusedOp):
    """flash-attn's varlen attention (:func:`invnext.ops.varlen_attention`) with its settings fixed
    at construction: queries and keys packed separately, GQA/MQA, causal and local windows aligned
    bottom-right. No parameters (flash-attn's ``FlashCrossAttention`` role): projections stay the
    caller's.

    Args:
        softmax_scale: default ``1 / sqrt(D)``.
        causal: bottom-right aligned causal mask.
        window_size: ``(left, right)``, -1 = unbounded.
        return_lse: forward returns ``(out, lse)``.
        rope_pairing: "rotate_half" or "interleaved", for the RoPE tables given to forward.
        backend: "auto" | "torch" | "triton".

    Forward: ``q [total_q, Hq, D]``, ``k, v [total_k, Hk, D]``, ``cu_seqlens_q``, ``cu_seqlens_k``
    int32/int64 ``[B+1]``, ``max_seqlen_q``, ``max_seqlen_k`` (host ints: no sync), optional
    ``rope = (cos, sin)`` ``[total_q, R]`` and ``rope_k`` ``[total_k, R]`` per-token tables ->
    ``out [total_q, Hq, D]`` (and ``lse`` float32 ``[Hq, total_q]``).
    """

    op = "varlen_attention"

    def __init__(
        self,
        *,
        softmax_scale: float | None = None,
        causal: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        return_lse: bool = False,
        rope_pairing: str = "rotate_half",
        backend: str = "auto",
    ):
        super().__init__(backend)
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.window_size = tuple(window_size)
        self.return_lse = return_lse
        self.rope_pairing = rope_pairing

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int | None = None,
        max_seqlen_k: int | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        rope_k: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return ops.varlen_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=self.softmax_scale,
            causal=self.causal, window_size=self.window_size, return_lse=self.return_lse, rope=rope, rope_k=rope_k,
            rope_pairing=self.rope_pairing, backend=self.backend,
        )  # fmt: skip

    def _settings(self) -> dict:
        return {"softmax_scale": self.softmax_scale, "causal": self.causal, "window_size": self.window_size,
                "return_lse": self.return_lse, "rope_pairing": self.rope_pairing}  # fmt: skip
