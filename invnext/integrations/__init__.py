"""Drop-in use of invnext's ops inside other frameworks' models.

One module per framework, each importing its framework only when used:

- :mod:`invnext.integrations.transformers`: an attention function registered with Hugging Face
  transformers' ``AttentionInterface`` (``attn_implementation="invnext"``);
- :mod:`invnext.integrations.timm`: a restorable patch routing timm's ViT ``Attention`` through
  invnext;
- :mod:`invnext.integrations.masked`: masked pretraining: the visible tokens of a batch with
  per-sample mask ratios are packed, run through the patched model and scattered back.

:func:`packed` (this module) tells the patched attention layers the layout of a packed ragged
batch for the models whose attention modules take no extra arguments. See docs/integrations.md.
"""
from __future__ import annotations

from ._packing import Packing, current_packing, packed

__all__ = ["Packing", "current_packing", "packed"]
