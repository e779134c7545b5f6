"""tube_mask: exact counts, exact coverage frequencies, documented RNG layout, errors.

Frequencies are held to binomial bounds of Z = 5 sd (tests/mask_statistics.py says why).
"""
from __future__ import annotations

import math

import pytest
import torch

from invnext.ops.masks import STREAM_TUBE, tube_mask
from invnext.ops.philox import philox_bits

from mask_statistics import assert_binomial


# --------------------------------------------------------------------------- tube


@pytest.mark.parametrize(
    "grid,ratio,hidden",
    [((3, 7, 9), 0.0, 0), ((3, 7, 9), 0.3, 19), ((3, 7, 9), 0.5, 32), ((1, 7, 9), 0.75, 47), ((5, 2, 2), 0.9, 3)],
)
def test_tube_exact_count_and_constant_in_time(grid, ratio, hidden):
    # 0.5 * 63 = 31.5 rounds up; 0.9 * 4 = 3.6 -> 4 is capped at S - 1 = 3.
    T, H, W = grid
    m = tube_mask(6, grid, ratio, seed=1)
    assert m.dtype == torch.bool and m.shape == (6, T * H * W)
    frames = m.view(6, T, H * W)
    assert (frames.sum(-1) == hidden).all()
    assert torch.equal(frames, frames[:, :1].expand_as(frames))


def test_tube_position_frequency_uniform():
    M, T, H, W = 4000, 2, 7, 9
    S, k = H * W, 19
    m = tube_mask(M, (T, H, W), 0.3, seed=2).view(M, T, S)[:, 0]
    freq = m.double().mean(0)
    assert_binomial(freq, torch.full((S,), k / S), M)
    # Chi-square over positions: the per-sample counts are a uniform k-subset, so
    # sum_i (O_i - E_i)^2 / (M p (1 - p)) * (S - 1) / S ~ chi2(S - 1). Wilson-Hilferty z = 4.5.
    p = k / S
    stat = float(((m.sum(0).double() - M * p) ** 2).sum() / (M * p * (1 - p)) * (S - 1) / S)
    df = S - 1
    assert stat < df * (1 - 2 / (9 * df) + 4.5 * math.sqrt(2 / (9 * df))) ** 3
    # Pairs are uniform too: P(both of two given positions hidden) = k (k-1) / (S (S-1)).
    both = (m[:, 0] & m[:, S - 1]).double().mean()
    assert_binomial(both[None], torch.tensor([k * (k - 1) / (S * (S - 1))]), M)


def test_tube_follows_documented_rng_layout():
    # Hidden = the k positions with the smallest philox_bits(seed, STREAM_TUBE, b*S + p), ties to the lower p.
    B, grid, seed = 3, (2, 3, 5), 77
    S, k = 15, 8
    m = tube_mask(B, grid, 0.5, seed=seed).view(B, 2, S)[:, 0]
    bits = philox_bits(seed, STREAM_TUBE, torch.arange(B * S)).tolist()
    for b in range(B):
        chosen = sorted(range(S), key=lambda p: (bits[b * S + p], p))[:k]
        assert sorted(torch.nonzero(m[b]).flatten().tolist()) == sorted(chosen)


def test_tube_seeds_and_generators():
    g = (4, 6, 6)
    a = tube_mask(4, g, 0.6, seed=10)
    assert torch.equal(a, tube_mask(4, g, 0.6, seed=10))
    assert not torch.equal(a, tube_mask(4, g, 0.6, seed=11))
    ga = tube_mask(4, g, 0.6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ga, tube_mask(4, g, 0.6, generator=torch.Generator().manual_seed(3)))
    assert not torch.equal(ga, tube_mask(4, g, 0.6, generator=torch.Generator().manual_seed(4)))
    torch.manual_seed(1)
    d = tube_mask(4, g, 0.6)
    torch.manual_seed(1)
    assert torch.equal(d, tube_mask(4, g, 0.6, device="cpu"))
    # Sample b does not depend on the batch size (the counter is b*S + p).
    assert torch.equal(tube_mask(9, g, 0.6, seed=10)[:4], a)


# --------------------------------------------------------------------------- per-sample ratios (issue 18)


@pytest.mark.parametrize("as_type", [list, tuple, torch.tensor])
def test_tube_per_sample_ratios_give_per_sample_counts(as_type):
    # S = 63: 0.0 -> 0, 0.3 -> 19, 0.5 -> 31.5 -> 32, 0.75 -> 47, 0.999 -> 63 capped at 62.
    T, H, W = 3, 7, 9
    ratios, counts = [0.0, 0.3, 0.5, 0.75, 0.999], [0, 19, 32, 47, 62]
    m = tube_mask(5, (T, H, W), as_type(ratios), seed=4)
    frames = m.view(5, T, H * W)
    assert frames.sum(-1).tolist() == [[c] * T for c in counts]
    assert torch.equal(frames, frames[:, :1].expand_as(frames))


def test_tube_per_sample_ratio_rows_equal_the_single_ratio_masks():
    # Sample b's mask depends on (seed, b, its own count) only: row b of a per-sample call is row b
    # of the one-ratio call with ratio_b, and a larger ratio hides a superset.
    g, ratios = (2, 5, 6), [0.6, 0.1, 0.6, 0.9, 0.35, 0.0]
    m = tube_mask(6, g, ratios, seed=21)
    for b, r in enumerate(ratios):
        assert torch.equal(m[b], tube_mask(6, g, r, seed=21)[b])
    low, high = tube_mask(6, g, 0.2, seed=21), tube_mask(6, g, 0.7, seed=21)
    assert bool((high | ~low).all())  # low implies high
    assert torch.equal(tube_mask(6, g, torch.tensor(ratios, dtype=torch.float64), seed=21), m)
    assert torch.equal(tube_mask(6, g, torch.tensor(0.6), seed=21), tube_mask(6, g, 0.6, seed=21))


def test_tube_per_sample_position_frequency_uniform():
    # Each sample's hidden set is a uniform k_b-subset: over many clips alternating two ratios,
    # every position of the even (odd) samples is hidden with probability k_even / S (k_odd / S).
    M, H, W = 4000, 7, 9
    S = H * W
    m = tube_mask(M, (1, H, W), [0.3, 0.7] * (M // 2), seed=5)
    for start, k in ((0, 19), (1, 44)):
        rows = m[start::2]
        assert (rows.sum(1) == k).all()
        assert_binomial(rows.double().mean(0), torch.full((S,), k / S), M // 2)


@pytest.mark.parametrize(
    "ratio,exc,match",
    [
        ([0.5, 0.5, 0.5], ValueError, r"ratio must have one entry per sample \(batch_size=2\), got 3"),
        ([0.5, 1.0], ValueError, r"ratio\[1\] must lie in \[0, 1\), got 1.0"),
        ([0.5, "0.1"], TypeError, r"ratio\[1\] must be a real number"),
        ([0.5, True], TypeError, r"ratio\[1\] must be a real number"),
        (torch.zeros(2, 1), TypeError, "ratio as a tensor must be 1-D real"),
        (torch.zeros(2, dtype=torch.bool), TypeError, "ratio as a tensor must be 1-D real"),
        (torch.tensor([0.2, -0.1]), ValueError, r"ratio\[1\] must lie in \[0, 1\)"),
        (torch.zeros(2, device="meta"), ValueError, "ratio is a meta tensor"),
    ],
)
def test_tube_per_sample_ratio_errors_name_the_entry(ratio, exc, match):
    with pytest.raises(exc, match=match):
        tube_mask(2, (2, 4, 4), ratio, seed=0)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: tube_mask(2, (2, 4, 4), 1.0), ValueError, "ratio"),
        (lambda: tube_mask(2, (2, 4, 4), -0.1), ValueError, "ratio"),
        (lambda: tube_mask(2, (2, 4, 4), "0.5"), TypeError, "ratio"),
        (lambda: tube_mask(2, (4, 4), 0.5), TypeError, "grid"),
        (lambda: tube_mask(2, (2, 4.0, 4), 0.5), TypeError, "grid"),
        (lambda: tube_mask(2, (0, 4, 4), 0.5), ValueError, "grid"),
        (lambda: tube_mask(0, (2, 4, 4), 0.5), ValueError, "batch_size"),
        (lambda: tube_mask(2, (2, 4, 4), 0.5, seed=True), TypeError, "seed"),
        (lambda: tube_mask(2, (2, 4, 4), 0.5, generator=3), TypeError, "generator"),
        (lambda: tube_mask(2, (2, 4, 4), 0.5, backend="gpu"), ValueError, "backend"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# --------------------------------------------------------------------------- sizes, devices, values (issue 16)


def test_tube_mask_past_memory_is_refused_before_allocating():
    # 10^6 clips of 10^9 tokens: refused by name instead of an allocator error (or a swapping machine).
    with pytest.raises(ValueError, match=r"tube_mask: batch_size=1000000 x grid 1000x1000x1000 .* more than its"):
        tube_mask(10**6, (1000, 1000, 1000), 0.5, seed=0)
