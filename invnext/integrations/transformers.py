"""invnext attention for Hugging Face transformers (5.x; tested with 5.25).

    from invnext.integrations import transformers as inx_hf
    inx_hf.register()                                   # once: attn_implementation="invnext"
    model = VideoMAEModel(config)                       # or from_pretrained(...)
    model.set_attn_implementation("invnext")            # or from_config(..., attn_implementation="invnext")

The function is registered through transformers' public ``AttentionInterface`` (and the
padding-mask builder of flash-attention under the same name in ``AttentionMaskInterface``, so
language models hand it 2-D padding masks, which it unpads). What it runs per call:

- packed ragged batches, as transformers hands them to flash-attn's varlen kernels: the keywords
  ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k`` with the batch
  flattened to size 1. Models whose attention modules forward no keywords to the attention
  function (VideoMAE, V-JEPA 2, SigLIP in transformers 5.25) get the layout from an enclosing
  :func:`invnext.integrations.packed` block instead;
- equal-length batches ``[B, H, L, D]`` (self- or cross-attention, L and S may differ, fewer
  key/value heads than query heads): every row one sample;
- a 2-D padding mask ``[B, S]`` (1 = token, 0 = padding) on self-attention: unpadded, packed,
  padded back (padding rows get zeros).

Self-attention without a causal mask, window or grouped heads runs
:func:`invnext.ops.masked_attention`; the rest :func:`invnext.ops.varlen_attention`.
``sliding_window=w`` is flash-attn's window ``(w - 1, w - 1)``, as transformers passes it to
flash-attn. Not supported (a clear error): attention dropout while training, ``softcap``,
attention sinks (``s_aux``), 4-D masks, and attention weights (``output_attentions``: None is
returned for them, as by flash-attn).
"""
from __future__ import annotations

from typing import Any

import torch

from ._packing import attend

NAME = "invnext"
SUPPORTED = "transformers>=5.0 (tested with 5.25)"


def _max_len(value: Any) -> int:
    return int(value.max()) if isinstance(value, torch.Tensor) else int(value)


def make_attention_function(backend: str = "auto"):
    """The attention function for transformers' registry, running invnext's ops on ``backend``.

    Signature (transformers' attention interface): ``(module, query [B, Hq, L, D], key
    [B, Hk, S, D], value [B, Hk, S, Dv], attention_mask, dropout=0.0, scaling=None,
    sliding_window=None, softcap=None, is_causal=None, **kwargs) -> (out [B, L, Hq, Dv], None)``.
    """

    def invnext_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        where = f"invnext attention ({type(module).__name__})"
        if dropout and module.training:
            raise NotImplementedError(f"{where}: attention dropout ({dropout}) is not supported; set the config's "
                                      "attention dropout to 0 or call model.eval()")
        if softcap is not None:
            raise NotImplementedError(f"{where}: softcap is not supported")
        if kwargs.get("s_aux") is not None:
            raise NotImplementedError(f"{where}: attention sinks (s_aux) are not supported")
        causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
        S = key.shape[2]
        window = (sliding_window - 1, sliding_window - 1) if sliding_window is not None and S > sliding_window else (-1, -1)
        varlen = [kwargs.get(n) for n in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
        common = {"softmax_scale": scaling, "causal": causal, "window_size": window, "backend": backend}
        if all(x is not None for x in varlen):
            cu_q, cu_k, max_q, max_k = varlen
            if cu_k is not cu_q and cu_k.data_ptr() == cu_q.data_ptr() and cu_k.shape == cu_q.shape:
                cu_k = cu_q  # one tensor under two names: self-attention
            layout = (cu_q, cu_k, _max_len(max_q), _max_len(max_k))
            return attend(query, key, value, layout=layout, **common), None
        if attention_mask is not None:
            return _padded(where, query, key, value, attention_mask, common), None
        return attend(query, key, value, **common), None

    invnext_attention_forward.backend = backend
    return invnext_attention_forward


def _padded(where, query, key, value, attention_mask, common) -> torch.Tensor:
    """Self-attention under a 2-D padding mask: the kept tokens packed, attended, put back."""
    B, H, L, D = query.shape
    if attention_mask.ndim != 2 or tuple(attention_mask.shape) != (B, key.shape[2]) or key.shape[2] != L:
        raise NotImplementedError(
            f"{where}: only 2-D padding masks [batch, length] on self-attention are supported, got a mask of "
            f"shape {list(attention_mask.shape)} for query {list(query.shape)} and key {list(key.shape)}; "
            "register invnext's mask builder (invnext.integrations.transformers.register does)"
        )
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    cu = torch.zeros(B + 1, dtype=torch.int32, device=query.device)
    cu[1:] = lengths.cumsum(0)
    rows = keep.reshape(-1).nonzero().squeeze(1)  # the kept (sample, position) rows, in order

    def pack(t):
        return t.transpose(1, 2).reshape(B * L, t.shape[1], t.shape[3])[rows].transpose(0, 1)[None]

    out = attend(pack(query), pack(key), pack(value), layout=(cu, cu, int(lengths.max()), int(lengths.max())),
                 **common)  # fmt: skip
    full = out.new_zeros(B * L, H, out.shape[-1])
    full = full.index_copy(0, rows, out[0])
    return full.view(B, L, H, out.shape[-1])


def register(name: str = NAME, *, backend: str = "auto") -> str:
    """Register invnext's attention with transformers under ``name`` (and flash-attention's
    padding-mask builder under the same name); return ``name``. Idempotent; ``backend`` picks
    invnext's backend for every call ("auto" by default)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(name, make_attention_function(backend))
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
