"""``nn.Module`` forms of the ``invnext.ops`` ops, for use as layers in your own models.

One module per op, named after it (``masked_attention`` -> :class:`MaskedAttention`): the
module holds the op's settings and, where the op places learned tokens, their parameters
(:class:`GatherVisible`'s class tokens, :class:`ScatterTokens`' mask token); ``forward``
takes the tensors and calls the op. ``backend=`` picks the implementation as in ``invnext.ops``,
and :func:`invnext.models.switches.set_ops_backend` switches every such module of a model at once.

    import torch
    from invnext import nn as inn

    attn = inn.MaskedAttention(rope=(10000.0, (16, 24, 24)), num_prefix=1)
    gather = inn.GatherVisible(dim=768, num_prefix=1)
    packed = gather(x, hidden, pos, num_visible=counts)          # x [B, N, 768]
    out = attn(qkv, None, None, packed.cu_seqlens, packed.max_seqlen, coords)
"""
from __future__ import annotations

from ._base import FusedOp  # the base that set_ops_backend looks for; __all__ lists the ops' modules only
from .attention import MaskedAttention, VarlenAttention
from .diffusion import AdaLNModulate, DDIMSampleLoop, DDIMStep, DiffusionLoss, PSampleLoop, PSampleStep, QSample
from .masks import MotionMask, MultiblockMask, SemanticMask, TubeMask
from .tokens import GatherVisible, ScatterTokens

__all__ = [
    "AdaLNModulate",
    "DDIMSampleLoop",
    "DDIMStep",
    "DiffusionLoss",
    "GatherVisible",
    "MaskedAttention",
    "MotionMask",
    "MultiblockMask",
    "PSampleLoop",
    "PSampleStep",
    "QSample",
    "ScatterTokens",
    "SemanticMask",
    "TubeMask",
    "VarlenAttention",
]
