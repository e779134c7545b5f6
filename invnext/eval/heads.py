"""Probe heads trained on frozen encoder features.

``AttentiveProbe`` (the probe of method.md "Results to beat": frozen encoder + attentive probe):
one cross-attention pooling block with a learned query, then a linear classifier::

    k, v = Wk LN(x), Wv LN(x)                       x: [B, N, C] frozen tokens
    a    = MHA(q, k, v)                             q: a learned [1, C] query, ``heads`` heads
    z    = q + Wo a
    z    = z + MLP(LN(z))                           MLP = Linear(C, r*C)-GELU-Linear(r*C, C)
    logits = W LN(z) + b                            [B, num_classes]

``LinearProbe``: ``logits = W ((p - mu) / sigma) + b`` on the pooled embedding ``p: [B, C]``.
``mu``/``sigma`` are buffers set from the training features (:meth:`LinearProbe.standardise`):
the classifier stays linear in ``p`` (the affine map folds into ``W``), but AdamW sees
unit-scale inputs whatever the encoder's output scale, so one learning rate fits every encoder.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _check_int(owner: str, name: str, value: object, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{owner}: {name} must be >= {low}, got {value}")
    return value


class AttentiveProbe(nn.Module):
    """Cross-attention pooling (learned query) + linear classifier over tokens.

    Args:
        dim: token width C.
        num_classes: K >= 2.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of the block's MLP, as a multiple of ``dim``.

    ``forward(tokens)``: float ``[B, N, C]`` -> float32 logits ``[B, K]``.
    """

    def __init__(self, dim: int, num_classes: int, heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        _check_int("AttentiveProbe", "dim", dim)
        _check_int("AttentiveProbe", "num_classes", num_classes, 2)
        _check_int("AttentiveProbe", "heads", heads)
        if dim % heads:
            raise ValueError(f"AttentiveProbe: heads={heads} must divide dim={dim}")
        if not mlp_ratio > 0:
            raise ValueError(f"AttentiveProbe: mlp_ratio must be > 0, got {mlp_ratio}")
        self.dim, self.heads, self.num_classes = dim, heads, num_classes
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_kv = nn.LayerNorm(dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.q = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = max(1, round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.query, std=0.02, a=-0.04, b=0.04)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` -> the pooled clip vector ``[B, C]`` (before the output norm and classifier)."""
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"AttentiveProbe: tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim or tokens.shape[1] < 1:
            raise ValueError(f"AttentiveProbe: tokens must be [B, N >= 1, {self.dim}], got {list(tokens.shape)}")
        B, N, C = tokens.shape
        H, D = self.heads, C // self.heads
        x = self.norm_kv(tokens.to(self.query.dtype))  # [B, N, C]
        # One query, so attention reassociates (the same function as MHA(q, Wk x, Wv x)):
        #   score[b, n, h] = q_h . (Wk_h x_n + bk_h) / sqrt(D) = x_n . u_h + c_h,  u_h = Wk_h^T q_h / sqrt(D)
        #   out[b, h]      = sum_n a[b, n, h] (Wv_h x_n + bv_h) = Wv_h (sum_n a[b, n, h] x_n) + bv_h
        # which costs O(N C H) per clip instead of projecting every token, O(N C^2).
        q = self.q(self.query).view(H, D) * D**-0.5
        u = torch.einsum("hd,hdc->hc", q, self.k.weight.view(H, D, C))  # [H, C]
        c = (q * self.k.bias.view(H, D)).sum(-1)  # [H]: shifts every score of a head alike
        a = torch.softmax(x @ u.t() + c, dim=1)  # [B, N, H], over tokens
        pooled = torch.einsum("bnh,bnc->bhc", a, x)  # [B, H, C]
        out = torch.einsum("bhc,hdc->bhd", pooled, self.v.weight.view(H, D, C)) + self.v.bias.view(H, D)
        z = self.query[:, 0] + self.proj(out.reshape(B, C))
        return z + self.mlp(self.norm_mlp(z))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm_out(self.pool(tokens))).float()


class LinearProbe(nn.Module):
    """A linear classifier on standardised pooled embeddings.

    Args:
        dim: embedding width C.  num_classes: K >= 2.

    ``forward(pooled)``: float ``[B, C]`` -> float32 logits ``[B, K]``.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        _check_int("LinearProbe", "dim", dim)
        _check_int("LinearProbe", "num_classes", num_classes, 2)
        self.dim, self.num_classes = dim, num_classes
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.classifier = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.classifier.weight)  # a convex problem: start from the uniform prediction
        nn.init.zeros_(self.classifier.bias)

    @torch.no_grad()
    def standardise(self, features: torch.Tensor, eps: float = 1e-6) -> None:
        """Set ``mean``/``std`` from training features ``[M, C]`` (float64 moments)."""
        if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[1] != self.dim:
            got = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"LinearProbe.standardise: features must be [M, {self.dim}], got {got}")
        f = features.double()
        self.mean.copy_(f.mean(0))
        self.std.copy_(f.std(0, unbiased=False).clamp_min(eps))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if not isinstance(pooled, torch.Tensor):
            raise TypeError(f"LinearProbe: pooled must be a torch.Tensor, got {type(pooled).__name__}")
        if pooled.dim() != 2 or pooled.shape[1] != self.dim:
            raise ValueError(f"LinearProbe: pooled must be [B, {self.dim}], got {list(pooled.shape)}")
        x = (pooled.to(self.mean.dtype) - self.mean) / self.std
        return self.classifier(x).float()
