"""``GatherVisible`` and ``ScatterTokens``: the module forms of :func:`invnext.ops.gather_visible`
and :func:`invnext.ops.scatter_tokens`, holding the learned tokens they place."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from invnext import ops

from ._base import FusedOp


def _check_dim(name: str, dim: object) -> int:
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"{name}: dim must be an int >= 1, got {dim!r}")
    return dim


class GatherVisible(FusedOp):
    """Pack the visible tokens of a masked clip batch, with ``num_prefix`` learned class tokens
    first in every sample and an optional position table added on the fly.

    Args:
        dim: C, the token width.
        num_prefix: P >= 0 learned prefix tokens (``prefix``, ``[1, P, C]``, N(0, 0.02) init).
        backend: "auto" | "torch" | "triton" | "cuda".

    Forward: ``x [B, N, C]``, ``hidden bool[B, N]`` (or ``keep_ids=``, int [B, K] or B 1-D int
    tensors), ``pos [B or 1, N, C]`` or None, ``num_visible`` host ints (no sync) ->
    :class:`invnext.ops.PackedTokens`. A module without
    learned tokens (``num_prefix=0``) may be given ``prefix [B or 1, P, C]`` per call: tokens its
    model derives (an encoder's class tokens with their positions added).
    """

    op = "gather_visible"

    def __init__(self, dim: int, num_prefix: int = 0, *, backend: str = "auto"):
        super().__init__(backend)
        self.dim = _check_dim("GatherVisible", dim)
        if not isinstance(num_prefix, int) or isinstance(num_prefix, bool) or num_prefix < 0:
            raise ValueError(f"GatherVisible: num_prefix must be an int >= 0, got {num_prefix!r}")
        self.num_prefix = num_prefix
        self.prefix = nn.Parameter(torch.empty(1, num_prefix, dim)) if num_prefix else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.prefix is not None:
            nn.init.normal_(self.prefix, std=0.02)

    def forward(
        self,
        x: torch.Tensor,
        hidden: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        num_visible: Sequence[int] | torch.Tensor | None = None,
        *,
        prefix: torch.Tensor | None = None,
        keep_ids: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> ops.PackedTokens:
        if self.prefix is not None:
            if prefix is not None:
                raise ValueError("GatherVisible: this module places its own learned prefix; pass prefix=None")
            prefix = self.prefix
        return ops.gather_visible(
            x, hidden, pos, prefix, keep_ids=keep_ids, num_visible=num_visible, backend=self.backend
        )  # fmt: skip

    def _settings(self) -> dict:
        return {"dim": self.dim, "num_prefix": self.num_prefix}


class ScatterTokens(FusedOp):
    """Place packed tokens back on the clip grid with a learned mask token at every other place
    and an optional position table added everywhere.

    Args:
        dim: C, the token width.
        learned_token: False: the module holds no mask token and ``forward`` takes one per call
            (a model that transforms its own first, as the predictor embeds its mask token).
        backend: "auto" | "torch" | "triton" | "cuda".

    Forward: ``packed [total, C]``, ``index int64[total]`` (:class:`invnext.ops.PackedTokens`'
    ``index``: -1 rows are dropped), ``N``, ``batch_size``, ``pos`` or None, and ``mask_token``
    (``[C]``, ``[1, C]`` or ``[1, 1, C]``) exactly when the module holds none -> ``[B, N, C]``.
    """

    op = "scatter_tokens"

    def __init__(self, dim: int, *, learned_token: bool = True, backend: str = "auto"):
        super().__init__(backend)
        self.dim = _check_dim("ScatterTokens", dim)
        self.mask_token = nn.Parameter(torch.empty(dim)) if learned_token else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self, packed: torch.Tensor, index: torch.Tensor, N: int, batch_size: int, pos: torch.Tensor | None = None,
        *, mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        if (mask_token is None) == (self.mask_token is None):
            held = "no mask token: pass one" if self.mask_token is None else "a learned mask token: pass none"
            raise ValueError(f"ScatterTokens: this module holds {held}")
        token = self.mask_token if mask_token is None else mask_token
        return ops.scatter_tokens(packed, index, token, pos=pos, N=N, batch_size=batch_size, backend=self.backend)

    def _settings(self) -> dict:
        return {"dim": self.dim, "learned_token": self.mask_token is not None}
