"""multiblock_mask: coverage against the box geometry, sizes and aspect ratios, documented box
formula, host counts, errors.

Frequencies are held to binomial bounds of Z = 5 sd (tests/mask_statistics.py says why).
"""
from __future__ import annotations

import math

import pytest
import torch

from invnext.ops.masks import STREAM_MULTIBLOCK, multiblock_boxes, multiblock_hidden_counts, multiblock_mask
from invnext.ops.philox import philox_uniform

from mask_statistics import Z, assert_binomial, cover_prob


# --------------------------------------------------------------------------- multi-block


@pytest.mark.parametrize(
    "grid,scale,aspect,h,w",
    [
        ((1, 7, 9), 12 / 63, 0.75, 3, 4),  # h*w = s*H*W = 12, h/w = 0.75
        ((2, 5, 8), 5 / 40, 5.0, 5, 1),  # full height: top is always 0
        ((1, 6, 6), 1 / 36, 1.0, 1, 1),  # a single token: uniform over all 36 positions
    ],
)
def test_multiblock_coverage_matches_geometry(grid, scale, aspect, h, w):
    M = 20000
    T, H, W = grid
    m = multiblock_mask(M, grid, 1, (scale, scale), (aspect, aspect), seed=5).view(M, T, H, W)
    assert torch.equal(m, m[:, :1].expand_as(m))  # temporal (1, 1): a tube
    assert (m[:, 0].sum((1, 2)) == h * w).all()
    py, px = torch.tensor(cover_prob(H, h)), torch.tensor(cover_prob(W, w))
    expected = py[:, None] * px[None, :]
    assert float(expected[-1].min()) > 0 and float(expected[:, -1].min()) > 0  # last row/col reachable
    assert_binomial(m[:, 0].double().mean(0), expected, M)


def test_multiblock_temporal_extent_consecutive_and_uniform():
    M, grid = 6000, (5, 4, 4)
    m = multiblock_mask(M, grid, 1, (0.25, 0.25), (1.0, 1.0), (0.6, 0.6), seed=6).view(M, 5, 16)
    frames = m.any(-1)  # [M, T]
    assert (frames.sum(1) == 3).all()  # round(5 * 0.6) = 3 frames
    first = frames.int().argmax(1)
    idx = torch.arange(5)
    consecutive = (idx >= first[:, None]) & (idx < first[:, None] + 3)
    assert torch.equal(frames, consecutive)
    # Inside its frames the box is the same 2x2 square; elsewhere nothing is hidden.
    spatial = m[torch.arange(M), first]  # [M, 16]
    assert (spatial.sum(1) == 4).all()
    assert torch.equal(m, frames[:, :, None] & spatial[:, None, :])
    assert_binomial(frames.double().mean(0), torch.tensor(cover_prob(5, 3)), M)


def test_multiblock_sizes_and_aspect_within_range():
    M, H, W = 3000, 32, 32
    s_range, a_range = (0.1, 0.4), (0.5, 2.0)
    m = multiblock_mask(M, (1, H, W), 1, s_range, a_range, seed=7).view(M, H, W)
    rows, cols = m.any(2), m.any(1)
    h, w = rows.sum(1).double(), cols.sum(1).double()
    # The hidden set is exactly one box: the outer product of its rows and columns, both contiguous.
    assert torch.equal(m, rows[:, :, None] & cols[:, None, :])
    for occ, n in ((rows, h), (cols, w)):
        first, i = occ.int().argmax(1), torch.arange(occ.shape[1])
        assert torch.equal(occ, (i >= first[:, None]) & (i < (first + n)[:, None]))
    # h = round(sqrt(s H W a)), w = round(sqrt(s H W / a)) (no clamping at this size) imply
    # s H W in [(h-1/2)(w-1/2), (h+1/2)(w+1/2)] and a in [(h-1/2)/(w+1/2), (h+1/2)/(w-1/2)].
    s_lo, s_hi = (h - 0.5) * (w - 0.5) / (H * W), (h + 0.5) * (w + 0.5) / (H * W)
    a_lo, a_hi = (h - 0.5) / (w + 0.5), (h + 0.5) / (w - 0.5)
    assert bool((s_hi >= s_range[0]).all() and (s_lo <= s_range[1]).all())
    assert bool((a_hi >= a_range[0]).all() and (a_lo <= a_range[1]).all())
    # The draws cover their ranges: with 3000 draws the extremes of s and a come within 1% of the
    # ends; rounding h and w moves the realised area / aspect by at most the margins allowed here.
    area = h * w / (H * W)
    assert float(area.min()) < s_range[0] + 0.03 and float(area.max()) > s_range[1] - 0.05
    aspect = h / w
    assert float(aspect.min()) < a_range[0] * 1.1 and float(aspect.max()) > a_range[1] / 1.1
    # log a is uniform on a range symmetric about 0 and a -> 1/a swaps h and w, so log(h/w) is
    # symmetric about 0: its sample mean is within Z standard errors of 0.
    log_aspect = torch.log(aspect)
    assert abs(float(log_aspect.mean())) < Z * float(log_aspect.std()) / math.sqrt(M)


def test_multiblock_boxes_follow_documented_formula():
    B, J, grid, seed = 4, 3, (6, 9, 11), 123
    s_r, a_r, t_r = (0.1, 0.6), (0.6, 1.8), (0.3, 0.9)
    boxes = multiblock_boxes(B, grid, J, s_r, a_r, t_r, seed)
    assert boxes.shape == (B, J, 6) and boxes.dtype == torch.int64
    T, H, W = grid
    u = philox_uniform(seed, STREAM_MULTIBLOCK, torch.arange(B * J * 8)).tolist()
    rnd = lambda x: math.floor(x + 0.5)  # noqa: E731
    for b in range(B):
        for j in range(J):
            v = u[(b * J + j) * 8 : (b * J + j) * 8 + 6]
            s = s_r[0] + (s_r[1] - s_r[0]) * v[0]
            a = math.exp(math.log(a_r[0]) + (math.log(a_r[1]) - math.log(a_r[0])) * v[1])
            h = min(max(rnd(math.sqrt(s * H * W * a)), 1), H)
            w = min(max(rnd(math.sqrt(s * H * W / a)), 1), W)
            ln = min(max(rnd(T * (t_r[0] + (t_r[1] - t_r[0]) * v[2])), 1), T)
            start, top, left = (math.floor(v[i] * (n - size + 1)) for i, n, size in ((3, T, ln), (4, H, h), (5, W, w)))
            assert boxes[b, j].tolist() == [start, ln, top, h, left, w]


def test_multiblock_mask_is_union_of_boxes():
    B, J, grid, seed = 5, 4, (4, 6, 7), 9
    args = (B, grid, J, (0.05, 0.3), (0.5, 2.0), (0.25, 1.0))
    m = multiblock_mask(*args, seed=seed).view(B, *grid)
    boxes = multiblock_boxes(*args, seed).tolist()
    want = torch.zeros(B, *grid, dtype=torch.bool)
    for b in range(B):
        for t0, lt, y0, h, x0, w in boxes[b]:
            assert 0 <= t0 and t0 + lt <= grid[0] and 0 <= y0 and y0 + h <= grid[1] and 0 <= x0 and x0 + w <= grid[2]
            want[b, t0 : t0 + lt, y0 : y0 + h, x0 : x0 + w] = True
    assert torch.equal(m, want)


def test_multiblock_stage2_views():
    # View A: 8 blocks of 15%; view B: 2 blocks of 70%; aspect 0.75-1.5; tubes through all frames.
    grid = (8, 16, 16)
    # h = round(sqrt(s 256 a)), w = round(sqrt(s 256 / a)), a in [0.75, 1.5]:
    # view A: h in [round(5.37), round(7.59)] = [5, 8], w in [round(5.06), round(7.16)] = [5, 7];
    # view B: h in [round(11.59), round(16.39)] = [12, 16], w in [round(10.93), round(15.46)] = [11, 15].
    for J, s, h_range, w_range in ((8, 0.15, (5, 8), (5, 7)), (2, 0.7, (12, 16), (11, 15))):
        boxes = multiblock_boxes(64, grid, J, (s, s), (0.75, 1.5), (1.0, 1.0), 31)
        start, length, _, h, _, w = boxes.unbind(-1)
        assert (start == 0).all() and (length == 8).all()
        lo_h, hi_h = math.floor(math.sqrt(s * 256 * 0.75) + 0.5), min(math.floor(math.sqrt(s * 256 * 1.5) + 0.5), 16)
        lo_w, hi_w = math.floor(math.sqrt(s * 256 / 1.5) + 0.5), min(math.floor(math.sqrt(s * 256 / 0.75) + 0.5), 16)
        assert (lo_h, hi_h) == h_range and (lo_w, hi_w) == w_range
        assert bool(((h >= lo_h) & (h <= hi_h) & (w >= lo_w) & (w <= hi_w)).all())
        m = multiblock_mask(64, grid, J, (s, s), (0.75, 1.5), seed=31).view(64, 8, 256)
        assert torch.equal(m, m[:, :1].expand_as(m))


@pytest.mark.parametrize(
    "grid, J, s, a, t",
    [
        ((32, 16, 16), 8, (0.15, 0.15), (0.75, 1.5), (1.0, 1.0)),  # Stage-2 view A
        ((32, 16, 16), 2, (0.7, 0.7), (0.75, 1.5), (1.0, 1.0)),  # Stage-2 view B
        ((5, 7, 3), 6, (0.0, 1.0), (0.01, 100.0), (0.0, 1.0)),  # empty to whole-frame boxes, any extent
        ((1, 1, 1), 3, (0.5, 0.5), (1.0, 1.0), (1.0, 1.0)),
    ],
)
def test_multiblock_host_counts_are_the_masks(grid, J, s, a, t):
    for seed in range(12):
        hidden, counts = multiblock_mask(13, grid, J, s, a, t, seed=seed, return_counts=True)
        assert counts.dtype == torch.int64 and counts.device.type == "cpu"
        assert torch.equal(counts, hidden.sum(1))
        assert torch.equal(hidden, multiblock_mask(13, grid, J, s, a, t, seed=seed))
    boxes = multiblock_boxes(13, grid, J, s, a, t, 0).numpy()
    assert multiblock_hidden_counts(boxes[:0], grid).shape == (0,)


def test_multiblock_seeds():
    args = (3, (2, 8, 8), 4, (0.1, 0.2), (0.75, 1.5))
    a = multiblock_mask(*args, seed=1)
    assert torch.equal(a, multiblock_mask(*args, seed=1))
    assert not torch.equal(a, multiblock_mask(*args, seed=2))
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    assert torch.equal(multiblock_mask(*args, generator=g1), multiblock_mask(*args, generator=g2))


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: multiblock_mask(2, (2, 4, 4), 0, (0.1, 0.2), (1, 1)), ValueError, "num_blocks"),
        (lambda: multiblock_mask(2, (2, 4, 4), 1, (0.5, 0.2), (1, 1)), ValueError, "spatial_scale"),
        (lambda: multiblock_mask(2, (2, 4, 4), 1, (0.1, 1.2), (1, 1)), ValueError, "spatial_scale"),
        (lambda: multiblock_mask(2, (2, 4, 4), 1, (0.1, 0.2), (0.0, 1)), ValueError, "aspect_ratio"),
        (lambda: multiblock_mask(2, (2, 4, 4), 1, (0.1, 0.2), 1.0), TypeError, "aspect_ratio"),
        (lambda: multiblock_mask(2, (2, 4, 4), 1, (0.1, 0.2), (1, math.inf)), ValueError, "aspect_ratio.*finite"),
        (lambda: multiblock_mask(2, (2, 4, 4), 1, (0.1, 0.2), (1, 1), (0.5, 1.5)), ValueError, "temporal_scale"),
        (lambda: multiblock_mask(2, [2, 4], 1, (0.1, 0.2), (1, 1)), TypeError, "grid"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_multiblock_mask_past_memory_is_refused_before_allocating():
    # The boxes are drawn on the host before any mask exists: 2 x 10^12 blocks need ~1 PiB there
    # (10^9, the audit's value, needs ~1 TiB: refused on any host under 512 GiB).
    with pytest.raises(ValueError, match=r"multiblock_mask: batch_size=2 x num_blocks=1000000000000 .* more than"):
        multiblock_mask(2, (2, 8, 8), 10**12, (0.1, 0.2), (0.75, 1.5), seed=0)
    with pytest.raises(ValueError, match=r"multiblock_mask: batch_size=1000000000000 x .* more than its"):
        multiblock_mask(10**12, (16, 250, 250), 1, (0.1, 0.2), (0.75, 1.5), seed=0)
