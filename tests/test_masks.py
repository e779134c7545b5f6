"""Mask samplers: exact counts, exact coverage frequencies, documented RNG layout, errors.

Frequency checks use binomial bounds: a position hidden with probability p in each of M
independent samples has an empirical frequency with sd sqrt(p (1 - p) / M); every check
allows Z = 5 sd (a false alarm has probability < 1e-6 per position, and the seeds are fixed).
"""
from __future__ import annotations

import math

import pytest
import torch

from invnext.ops._dispatch import BackendUnavailableError
from invnext.ops.masks import (
    STREAM_MULTIBLOCK,
    STREAM_SEMANTIC,
    STREAM_TUBE,
    mask_counts,
    motion_mask,
    multiblock_boxes,
    multiblock_hidden_counts,
    multiblock_mask,
    semantic_mask,
    tube_mask,
)
from invnext.ops.philox import philox_bits, philox_uniform

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


# --------------------------------------------------------------------------- motion


def test_motion_keeps_most_changed_constructed():
    # Token s of frame t moves by d[t][s] along one axis; keep = 5 - round(0.6 * 5) = 2.
    d = [[0, 3, 1, 5, 2], [4, 0, 0, 1, 2]]
    x = torch.zeros(1, 3, 5, 2)
    x[0, 1, :, 0] = torch.tensor(d[0], dtype=torch.float32)
    x[0, 2, :, 0] = x[0, 1, :, 0]
    x[0, 2, :, 1] = torch.tensor(d[1], dtype=torch.float32)
    hidden = motion_mask(x, 0.6).view(3, 5)
    kept = [sorted(torch.nonzero(~hidden[t]).flatten().tolist()) for t in range(3)]
    assert kept == [[1, 3], [1, 3], [0, 4]]  # frame 0 uses its change to frame 1


def test_motion_matches_loop_reference():
    B, T, S, C = 2, 4, 11, 5
    x = torch.randn(B, T, S, C, dtype=torch.float64)
    hidden = motion_mask(x, 0.7).view(B, T, S)
    keep = S - math.floor(0.7 * S + 0.5)
    for b in range(B):
        for t in range(T):
            t0, t1 = (0, 1) if t == 0 else (t - 1, t)
            change = [float(torch.linalg.vector_norm(x[b, t1, s] - x[b, t0, s])) for s in range(S)]
            kept = sorted(range(S), key=lambda s: (-change[s], s))[:keep]
            assert sorted(torch.nonzero(~hidden[b, t]).flatten().tolist()) == sorted(kept)


def test_motion_ties_and_single_token():
    x = torch.ones(2, 3, 6, 4)  # no motion anywhere: ties -> lowest indices kept
    hidden = motion_mask(x, 0.5).view(2, 3, 6)
    assert torch.equal(hidden, torch.tensor([False, False, False, True, True, True]).expand(2, 3, 6))
    x = torch.ones(1, 2, 300, 4)  # long rows, where an unstable sort would reorder ties
    x[0, 1, 100:] += 1.0  # 200 tokens tie at change 1, keep 150 of them: 100..249
    hidden = motion_mask(x, 0.5).view(2, 300)
    i = torch.arange(300)
    assert torch.equal(hidden, ((i < 100) | (i >= 250)).expand(2, 300))
    assert not motion_mask(torch.randn(1, 2, 1, 3), 0.9).any()  # one token per frame stays visible


# --------------------------------------------------------------------------- counts


def test_mask_counts():
    hidden = torch.rand(7, 113) < torch.linspace(0, 0.99, 7)[:, None]
    hidden[3] = True
    for P in (0, 1, 4):
        cu, mx = mask_counts(hidden, P)
        lengths = [P + sum(not v for v in row) for row in hidden.tolist()]
        want = [0]
        for n in lengths:
            want.append(want[-1] + n)
        assert cu.dtype == torch.int32 and cu.tolist() == want and mx == max(lengths)
    cu, mx = mask_counts(torch.zeros(0, 5, dtype=torch.bool))
    assert cu.tolist() == [0] and mx == 0


# --------------------------------------------------------------------------- bad input

ATTN = torch.rand(2, 3, 8)


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
        (lambda: multiblock_mask(2, (2, 4, 4), 0, (0.1, 0.2), (1, 1)), ValueError, "num_blocks"),
        (lambda: multiblock_mask(2, (2, 4, 4), 1, (0.5, 0.2), (1, 1)), ValueError, "spatial_scale"),
        (lambda: multiblock_mask(2, (2, 4, 4), 1, (0.1, 1.2), (1, 1)), ValueError, "spatial_scale"),
        (lambda: multiblock_mask(2, (2, 4, 4), 1, (0.1, 0.2), (0.0, 1)), ValueError, "aspect_ratio"),
        (lambda: multiblock_mask(2, (2, 4, 4), 1, (0.1, 0.2), 1.0), TypeError, "aspect_ratio"),
        (lambda: multiblock_mask(2, (2, 4, 4), 1, (0.1, 0.2), (1, math.inf)), ValueError, "aspect_ratio.*finite"),
        (lambda: multiblock_mask(2, (2, 4, 4), 1, (0.1, 0.2), (1, 1), (0.5, 1.5)), ValueError, "temporal_scale"),
        (lambda: multiblock_mask(2, [2, 4], 1, (0.1, 0.2), (1, 1)), TypeError, "grid"),
        (lambda: semantic_mask(ATTN, 9), ValueError, r"keep.*S=8"),
        (lambda: semantic_mask(ATTN, 0), ValueError, "keep"),
        (lambda: semantic_mask(ATTN, 2.0), TypeError, "keep"),
        (lambda: semantic_mask(ATTN.to(torch.int64), 2), TypeError, "attn"),
        (lambda: semantic_mask(ATTN[0], 2), ValueError, "attn"),
        (lambda: semantic_mask(ATTN - 0.5, 2), ValueError, "non-negative"),
        (lambda: semantic_mask(ATTN.clone().fill_(float("nan")), 2), ValueError, "finite"),
        (lambda: semantic_mask(ATTN, 2, "random"), ValueError, "mode"),
        (lambda: semantic_mask([[[1.0]]], 1), TypeError, "attn"),
        (lambda: motion_mask(torch.randn(1, 1, 4, 3), 0.5), ValueError, "T >= 2"),
        (lambda: motion_mask(torch.ones(1, 2, 4, 3, dtype=torch.int32), 0.5), TypeError, "tokens"),
        (lambda: motion_mask(torch.randn(1, 2, 4, 3), 1.0), ValueError, "ratio"),
        (lambda: motion_mask(torch.randn(2, 4, 3), 0.5), ValueError, "tokens"),
        (lambda: mask_counts(torch.zeros(2, 3)), TypeError, "hidden"),
        (lambda: mask_counts(torch.zeros(2, 3, dtype=torch.bool), -1), ValueError, "num_prefix"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [
        lambda b: tube_mask(2, (2, 4, 4), 0.5, seed=0, backend=b),
        lambda b: multiblock_mask(2, (2, 4, 4), 1, (0.1, 0.2), (1, 1), seed=0, backend=b),
        lambda b: semantic_mask(ATTN, 2, backend=b),
    ],
)
def test_cuda_backend_unavailable_says_why(call):
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' is unavailable: the CUDA kernels need CUDA tensors"):
        call("cuda")
    assert call("torch").dtype == torch.bool  # the reference is always there


def test_motion_has_no_accelerated_backend():
    with pytest.raises(BackendUnavailableError, match="motion_mask: backend .triton. is unavailable: no triton impl"):
        motion_mask(torch.randn(1, 2, 4, 3), 0.5, backend="triton")


# --------------------------------------------------------------------------- sizes, devices, values (issue 16)


def test_tube_mask_past_memory_is_refused_before_allocating():
    # 10^6 clips of 10^9 tokens: refused by name instead of an allocator error (or a swapping machine).
    with pytest.raises(ValueError, match=r"tube_mask: batch_size=1000000 x grid 1000x1000x1000 .* more than its"):
        tube_mask(10**6, (1000, 1000, 1000), 0.5, seed=0)


def test_multiblock_mask_past_memory_is_refused_before_allocating():
    # The boxes are drawn on the host before any mask exists: 2 x 10^12 blocks need ~1 PiB there
    # (10^9, the audit's value, needs ~1 TiB: refused on any host under 512 GiB).
    with pytest.raises(ValueError, match=r"multiblock_mask: batch_size=2 x num_blocks=1000000000000 .* more than"):
        multiblock_mask(2, (2, 8, 8), 10**12, (0.1, 0.2), (0.75, 1.5), seed=0)
    with pytest.raises(ValueError, match=r"multiblock_mask: batch_size=1000000000000 x .* more than its"):
        multiblock_mask(10**12, (16, 250, 250), 1, (0.1, 0.2), (0.75, 1.5), seed=0)


@pytest.mark.parametrize(
    "call",
    [
        lambda d: tube_mask(2, (2, 4, 4), 0.5, seed=0, device=d),
        lambda d: multiblock_mask(2, (2, 4, 4), 1, (0.1, 0.2), (1, 1), seed=0, device=d),
    ],
)
def test_mask_device_that_is_not_here_is_named(call):
    # No machine has 100 GPUs: torch's own AssertionError / "invalid device ordinal" named nothing.
    with pytest.raises(ValueError, match=r"mask: device='cuda:99' but "):
        call("cuda:99")
    with pytest.raises(ValueError, match=r"mask: device must be a torch.device .* got 'gpu'"):
        call("gpu")


def test_mask_counts_of_a_meta_mask_is_a_clear_error():
    # max_seqlen is a host int read from the mask; a meta tensor has no values to read.
    with pytest.raises(ValueError, match="mask_counts: hidden is a meta tensor"):
        mask_counts(torch.zeros(2, 4, dtype=torch.bool, device="meta"))
    assert tube_mask(2, (2, 4, 4), 0.5, seed=0, device="meta").shape == (2, 32)  # shapes propagate


def test_nonfinite_motion_tokens_are_named_when_values_are_checked(monkeypatch):
    tokens = torch.randn(1, 2, 4, 3)
    tokens[0, 1, 2, 0] = float("nan")
    motion_mask(tokens, 0.5)  # opt-in only: a diverging run reaches its own finite check
    monkeypatch.setenv("INVNEXT_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match=r"motion_mask: tokens holds 1 non-finite value"):
        motion_mask(tokens, 0.5)
