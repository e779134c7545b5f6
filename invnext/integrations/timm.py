"""Route timm's ViT attention through invnext (timm>=1.0; tested with 1.0.31).

    from invnext.integrations import timm as inx_timm
    with inx_timm.patch(model):            # or: handle = inx_timm.patch(model); ...; handle.restore()
        y = model(images)

:func:`patch` replaces the ``forward`` of every ``timm.layers.Attention`` in the model (instance
attributes; the class is untouched, so other models are not affected) by one that computes q, k
and v with the module's own layers and norms and attends with invnext: each row of an
equal-length batch is one sample, and inside an :func:`invnext.integrations.packed` block (what
:mod:`invnext.integrations.masked` opens) a batch of size 1 is a packed ragged batch. The model's
class and register tokens are its ``num_prefix`` prefix tokens. Attention dropout while training
and ``attn_mask`` are not supported (a clear error).
"""
from __future__ import annotations

import types

import torch

from ._packing import attend

SUPPORTED = "timm>=1.0 (tested with 1.0.31)"


def _attention_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    # timm.layers.Attention.forward with the attention call replaced; the optional parts
    # (gate, norm) are read with getattr, since timm 1.0 releases differ in which they have.
    if attn_mask is not None:
        raise NotImplementedError("invnext timm Attention: attn_mask is not supported; pack ragged samples "
                                  "(invnext.integrations.packed) instead of masking them")
    if self.training and self.attn_drop.p > 0:
        raise NotImplementedError(f"invnext timm Attention: attention dropout ({self.attn_drop.p}) is not "
                                  "supported; build the model with attn_drop_rate=0 or call model.eval()")
    B, N, C = x.shape
    gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    out = attend(q, k, v, softmax_scale=self.scale, causal=is_causal, num_prefix=self._invnext_num_prefix,
                 backend=self._invnext_backend)  # fmt: skip
    x = out.reshape(B, N, getattr(self, "attn_dim", self.num_heads * self.head_dim))
    norm = getattr(self, "norm", None)
    if norm is not None:
        x = norm(x)
    if gate is not None:
        x = x * gate
    return self.proj_drop(self.proj(x))


class TimmPatch:
    """Handle of :func:`patch`: ``restore()`` (or leaving the ``with`` block) puts every patched
    module's own ``forward`` back. ``modules`` lists the patched attention modules."""

    def __init__(self, model: torch.nn.Module, backend: str):
        from timm.layers import Attention

        self.model = model
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.modules: list[torch.nn.Module] = []
        self._saved: list[tuple[torch.nn.Module, object]] = []
        for module in model.modules():
            # Only the plain ViT attention: subclasses with their own forward compute other things.
            if isinstance(module, Attention) and type(module).forward is Attention.forward:
                self._saved.append((module, module.__dict__.get("forward")))
                module._invnext_num_prefix = self.num_prefix
                module._invnext_backend = backend
                module.forward = types.MethodType(_attention_forward, module)
                self.modules.append(module)
        if not self.modules:
            raise ValueError(f"invnext.integrations.timm.patch: {type(model).__name__} has no timm.layers.Attention "
                             "module to patch")

    def restore(self) -> None:
        for module, own in self._saved:
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
            for name in ("_invnext_num_prefix", "_invnext_backend"):
                module.__dict__.pop(name, None)
        self._saved, self.modules = [], []

    def __enter__(self) -> "TimmPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def patch(model: torch.nn.Module, *, backend: str = "auto") -> TimmPatch:
    """Route every ``timm.layers.Attention`` of ``model`` through invnext (``backend`` for its
    calls) until the returned handle's ``restore()`` or the end of its ``with`` block."""
    return TimmPatch(model, backend)
