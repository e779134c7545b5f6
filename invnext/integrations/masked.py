"""Masked pretraining with ragged per-sample masks on models patched by invnext.

    hidden = ops.tube_mask(B, grid, ratios, seed=step)        # bool[B, N]; ratios: one per sample
    out = masked.encode_visible(model, video, hidden)         # visible tokens packed, run, kept packed
    grid_out = out.scatter()                                  # [B, N, C], zeros at hidden places

Each sample keeps exactly its visible tokens: no padding to the longest sample and no truncation
to the shortest, as HF's ``bool_masked_pos`` (equal counts only) or padding would need. The
model's attention must be invnext's (``attn_implementation="invnext"`` for transformers models,
:func:`invnext.integrations.timm.patch` for timm): each packed sample attends only to itself.

Supported model families (:func:`model_parts` says how each is split):

- transformers ``VideoMAEModel`` / ``VideoMAEForPreTraining`` (its encoder; position table
  added before the gather);
- transformers ``VJEPA2Model`` (its encoder; RoPE positions from each token's place in its
  clip, through the layers' ``position_mask``);
- timm ``VisionTransformer`` (class and register tokens as the ``num_prefix`` prefix of every
  sample, never masked).

Other models: build :class:`ModelParts` by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch

from invnext import ops

from ._packing import packed


class ModelParts(NamedTuple):
    """A model split around the gather.

    embed:      inputs -> (tokens [B, N, C] with positions added, prefix [B or 1, P, C] or None)
    run:        (packed tokens [1, total, C], token places n int64 [1, total], prefix rows -1)
                -> [1, total, C]: the blocks and the final norm
    num_prefix: P
    """

    embed: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    num_prefix: int


@dataclass
class MaskedOutput:
    """The model's outputs for the visible tokens of every sample, packed.

    tokens:     [total, C], sample b's rows ``cu_seqlens[b]:cu_seqlens[b+1]``: its P prefix
                tokens, then its visible tokens (raster order from a mask, listed order from
                ``keep_ids``)
    cu_seqlens: int32 [B+1]
    max_seqlen: int
    index:      int64 [total], ``b*N + n`` of each row, -1 on prefix rows
    batch_size, num_tokens (N), num_prefix (P): ints
    """

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    index: torch.Tensor
    batch_size: int
    num_tokens: int
    num_prefix: int

    def scatter(self, mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, C]: every visible token's output at its place, ``mask_token`` ([C], [1, C]
        or [1, 1, C]; default zeros) at the hidden places (e.g. a decoder's input)."""
        C = self.tokens.shape[1]
        if mask_token is None:
            mask_token = self.tokens.new_zeros(C)
        return ops.scatter_tokens(self.tokens, self.index, mask_token, N=self.num_tokens, batch_size=self.batch_size)

    def prefix(self) -> torch.Tensor | None:
        """[B, P, C]: the outputs of the prefix (class/register) tokens, or None when P = 0."""
        if self.num_prefix == 0:
            return None
        rows = self.cu_seqlens[:-1].to(torch.int64)[:, None] + torch.arange(self.num_prefix, device=self.tokens.device)
        return self.tokens[rows]


def _require_invnext_hf(model) -> None:
    """A packed batch through attention that is not invnext's would mix the samples: refuse."""
    from transformers import AttentionInterface

    name = getattr(model.config, "_attn_implementation", None)
    fn = AttentionInterface._global_mapping.get(name) if isinstance(name, str) else None
    if getattr(fn, "__name__", None) != "invnext_attention_forward":
        raise ValueError(
            f"invnext.integrations.masked: {type(model).__name__} runs attn_implementation={name!r}; packed samples "
            "would attend to each other. Call invnext.integrations.transformers.register() and "
            "model.set_attn_implementation('invnext') first"
        )


def _videomae_parts(model) -> ModelParts:
    _require_invnext_hf(model)
    base = getattr(model, "videomae", model)

    def embed(pixel_values):
        return base.embeddings(pixel_values, None), None

    def run(x, places):
        x = base.encoder(x).last_hidden_state
        return base.layernorm(x) if base.layernorm is not None else x

    return ModelParts(embed, run, 0)


def _vjepa2_parts(model) -> ModelParts:
    _require_invnext_hf(model)
    encoder = model.encoder

    def embed(pixel_values_videos):
        return encoder.embeddings(pixel_values_videos), None

    def run(x, places):
        for layer in encoder.layer:
            x = layer(x, position_mask=places)[0]
        return encoder.layernorm(x)

    return ModelParts(embed, run, 0)


def _timm_vit_parts(model) -> ModelParts:
    if not all("_invnext_backend" in block.attn.__dict__ for block in model.blocks):
        raise ValueError(f"invnext.integrations.masked: the attention of {type(model).__name__} is not patched; "
                         "packed samples would attend to each other. Run inside invnext.integrations.timm.patch(model)")
    P = int(model.num_prefix_tokens)

    def embed(images):
        x = model._pos_embed(model.patch_embed(images))
        x = model.norm_pre(model.patch_drop(x))
        return x[:, P:], (x[:, :P] if P else None)

    def run(x, places):
        for block in model.blocks:
            x = block(x)
        return model.norm(x)

    return ModelParts(embed, run, P)


def model_parts(model: torch.nn.Module) -> ModelParts:
    """How ``model`` is split around the gather (see the module docstring for the families)."""
    names = [cls.__name__ for cls in type(model).__mro__]
    if "VJEPA2Model" in names:
        return _vjepa2_parts(model)
    if "VideoMAEModel" in names or "VideoMAEForPreTraining" in names:
        return _videomae_parts(model)
    if "VisionTransformer" in names and hasattr(model, "_pos_embed") and hasattr(model, "blocks"):
        return _timm_vit_parts(model)
    raise TypeError(f"invnext.integrations.masked: no built-in split for {type(model).__name__}; "
                    "build a ModelParts(embed, run, num_prefix) and pass parts=")


def encode_visible(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    hidden: torch.Tensor | None = None,
    *,
    keep_ids: torch.Tensor | Sequence[torch.Tensor] | None = None,
    num_visible: Sequence[int] | None = None,
    parts: ModelParts | None = None,
    backend: str = "auto",
) -> MaskedOutput:
    """Run ``model`` on the visible tokens of every sample, packed.

    Args:
        model: a model of a supported family whose attention is invnext's (module docstring).
        inputs: what the model's embedding takes (videos [B, T, 3, H, W] for VideoMAE and
            V-JEPA 2, images [B, 3, H, W] for timm ViT).
        hidden: bool [B, N], True = hidden; samples may hide different counts (e.g.
            ``ops.tube_mask`` with one ratio per sample). Or ``keep_ids`` (int [B, K] or B 1-D
            int tensors), as :func:`invnext.ops.gather_visible` takes them.
        num_visible: host ints [B] for ``hidden`` (saves a host sync on a GPU).
        parts: the model's split, default :func:`model_parts`.
        backend: the gather's backend (the attention's is the one registered or patched).
    Returns:
        :class:`MaskedOutput` (``.scatter()`` puts the outputs back on the grid).
    """
    parts = parts if parts is not None else model_parts(model)
    tokens, prefix = parts.embed(inputs)
    B, N, _ = tokens.shape
    pack = ops.gather_visible(tokens, hidden, prefix=prefix, keep_ids=keep_ids, num_visible=num_visible,
                              backend=backend)  # fmt: skip
    places = torch.where(pack.index >= 0, pack.index % N, pack.index)[None]
    with packed(pack.cu_seqlens, pack.max_seqlen, num_prefix=parts.num_prefix):
        out = parts.run(pack.tokens[None], places)[0]
    return MaskedOutput(out, pack.cu_seqlens, pack.max_seqlen, pack.index, B, N, parts.num_prefix)
