"""semantic_mask: top-k and sampled selection, ties, documented RNG layout, errors.

Frequencies are held to binomial bounds of Z = 5 sd (tests/mask_statistics.py says why).
"""
from __future__ import annotations

import math

import pytest
import torch

from invnext.ops.masks import STREAM_SEMANTIC, semantic_mask
from invnext.ops.philox import philox_uniform

from mask_statistics import ATTN, assert_binomial


# --------------------------------------------------------------------------- semantic


def test_semantic_topk_picks_top_k():
    B, T, S, keep = 3, 4, 37, 9
    attn = torch.rand(B, T, S, dtype=torch.float64)
    hidden = semantic_mask(attn, keep).view(B, T, S)
    top = torch.topk(attn, keep, dim=-1).indices
    want = torch.ones(B, T, S, dtype=torch.bool).scatter_(-1, top, False)
    assert torch.equal(hidden, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("S,keep", [(13, 5), (257, 100)])
def test_semantic_topk_ties_lowest_index(dtype, S, keep):
    B, T = 2, 3
    attn = torch.randint(0, 4, (B, T, S)).to(dtype)
    hidden = semantic_mask(attn, keep).view(B, T, S)
    for b in range(B):
        for t in range(T):
            vals = attn[b, t].tolist()
            kept = sorted(range(S), key=lambda i: (-vals[i], i))[:keep]
            assert sorted(torch.nonzero(~hidden[b, t]).flatten().tolist()) == sorted(kept)


def test_semantic_topk_keep_all_and_one_token():
    attn = torch.rand(2, 3, 1)
    assert not semantic_mask(attn, 1).any()
    attn = torch.rand(1, 2, 7)
    assert not semantic_mask(attn, 7).any()


def test_semantic_sample_frequencies_proportional_keep1():
    weights = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0, 4.0, 0.5])
    F = 20000  # independent frames
    attn = weights.expand(4, F // 4, 7).contiguous()
    hidden = semantic_mask(attn, 1, "sample", seed=4).view(F, 7)
    assert (hidden.sum(1) == 6).all()
    assert not (~hidden[:, weights == 0]).any()  # zero attention never kept
    assert_binomial((~hidden).double().mean(0), weights.double() / weights.sum(), F)


def test_semantic_sample_without_replacement_keep2():
    # P({i, j}) = p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j) for successive draws without replacement.
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    p = w / w.sum()
    F = 20000
    hidden = semantic_mask(w.expand(1, F, 4), 2, "sample", seed=5).view(F, 4)
    kept = ~hidden
    assert (kept.sum(1) == 2).all()
    pairs, freqs = [], []
    for i in range(4):
        for j in range(i + 1, 4):
            pairs.append(float(p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j])))
            freqs.append(float((kept[:, i] & kept[:, j]).double().mean()))
    assert abs(sum(pairs) - 1) < 1e-12
    assert_binomial(torch.tensor(freqs), torch.tensor(pairs), F)


def test_semantic_sample_fills_with_zero_attention_in_index_order():
    attn = torch.tensor([[[0.0, 0.0, 5.0, 0.0, 1.0, 0.0]]]).expand(4, 3, 6)
    hidden = semantic_mask(attn, 4, "sample", seed=3).view(4, 3, 6)
    want = torch.tensor([False, False, False, True, False, True])  # positives 2, 4 + zeros 0, 1
    assert torch.equal(hidden, want.expand(4, 3, 6))


def test_semantic_sample_follows_documented_rng_layout():
    B, T, S, keep, seed = 2, 2, 6, 3, 99
    attn = torch.rand(B, T, S, dtype=torch.float64) + 0.01
    hidden = semantic_mask(attn, keep, "sample", seed=seed).view(B, T, S)
    u = philox_uniform(seed, STREAM_SEMANTIC, torch.arange(B * T * S)).tolist()
    for b in range(B):
        for t in range(T):
            base = (b * T + t) * S
            key = [math.log(float(attn[b, t, s])) - math.log(-math.log(u[base + s] + 2.0**-25)) for s in range(S)]
            kept = sorted(range(S), key=lambda s: (-key[s], s))[:keep]
            assert sorted(torch.nonzero(~hidden[b, t]).flatten().tolist()) == sorted(kept)


def test_semantic_seeds_and_generator_use():
    attn = torch.rand(2, 3, 50)
    a = semantic_mask(attn, 10, "sample", seed=1)
    assert torch.equal(a, semantic_mask(attn, 10, "sample", seed=1))
    assert not torch.equal(a, semantic_mask(attn, 10, "sample", seed=2))
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    semantic_mask(attn, 10, "topk", generator=g)
    assert torch.equal(g.get_state(), state)  # topk draws nothing
    semantic_mask(attn, 10, "sample", generator=g)
    assert not torch.equal(g.get_state(), state)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: semantic_mask(ATTN, 9), ValueError, r"keep.*S=8"),
        (lambda: semantic_mask(ATTN, 0), ValueError, "keep"),
        (lambda: semantic_mask(ATTN, 2.0), TypeError, "keep"),
        (lambda: semantic_mask(ATTN.to(torch.int64), 2), TypeError, "attn"),
        (lambda: semantic_mask(ATTN[0], 2), ValueError, "attn"),
        (lambda: semantic_mask(ATTN - 0.5, 2), ValueError, "non-negative"),
        (lambda: semantic_mask(ATTN.clone().fill_(float("nan")), 2), ValueError, "finite"),
        (lambda: semantic_mask(ATTN, 2, "random"), ValueError, "mode"),
        (lambda: semantic_mask([[[1.0]]], 1), TypeError, "attn"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
