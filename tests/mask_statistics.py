"""What the mask samplers' tests share: binomial bounds on empirical frequencies and the coverage
probability of a box at a uniform offset.

A position hidden with probability p in each of M independent samples has an empirical
frequency with sd sqrt(p (1 - p) / M); every check allows Z = 5 sd (a false alarm has
probability < 1e-6 per position, and the seeds are fixed).
"""
from __future__ import annotations

import torch


Z = 5.0


def assert_binomial(freq: torch.Tensor, p: torch.Tensor, samples: int) -> None:
    freq, p = freq.double(), p.double()
    sd = torch.sqrt(p * (1 - p) / samples)
    # p = 0 or 1 must be met exactly.
    excess = (freq - p).abs() - Z * sd
    worst = float(((freq - p).abs() / sd.clamp_min(1e-30)).max())
    assert float(excess.max()) <= 1e-12, f"max |freq - p| / sd = {worst}"


def cover_prob(n: int, size: int) -> list[float]:
    """P(index i in [o, o + size)) for an offset o uniform over 0..n-size, by enumeration."""
    offsets = range(n - size + 1)
    return [sum(o <= i < o + size for o in offsets) / len(offsets) for i in range(n)]


# Teacher attention [B, T, S] for the semantic sampler's argument checks.
ATTN = torch.rand(2, 3, 8)
