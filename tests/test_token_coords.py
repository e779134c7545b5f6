"""token_coords: (t, h, w) of packed rows from their flat index, against the raster definition."""
from __future__ import annotations

import pytest
import torch

from invnext import ops


def test_token_coords_follow_raster_order_and_zero_prefix_rows():
    T, H, W, B = 3, 4, 5, 2
    N = T * H * W
    want = [(t, h, w) for t in range(T) for h in range(H) for w in range(W)]
    index = torch.cat([torch.tensor([-1, -1]), torch.arange(N), torch.tensor([-1]), N + torch.arange(N).flip(0)])
    got = ops.token_coords(index, (T, H, W))
    assert got.dtype == torch.int32 and got.shape == (index.numel(), 3)
    assert got[:2].tolist() == [[0, 0, 0]] * 2 and got[2 + N].tolist() == [0, 0, 0]
    assert [tuple(r) for r in got[2 : 2 + N].tolist()] == want
    assert [tuple(r) for r in got[3 + N :].tolist()] == want[::-1]
    assert torch.equal(ops.token_coords(index.int(), (T, H, W)), got)


def test_token_coords_of_a_gather_give_each_rows_place():
    grid, C = (2, 3, 4), 3
    N = 24
    hidden = torch.rand(3, N) < 0.6
    packed = ops.gather_visible(torch.randn(3, N, C), hidden, prefix=torch.zeros(1, 2, C))
    coords = ops.token_coords(packed.index, grid)
    rows = packed.index >= 0
    n = packed.index[rows] % N
    assert torch.equal(coords[rows].long(), torch.stack((n // 12, n // 4 % 3, n % 4), 1))


@pytest.mark.parametrize(
    "index, grid, exc, match",
    [
        (torch.zeros(3), (1, 2, 2), TypeError, "token_coords: index must have dtype"),
        (torch.zeros(3, 1, dtype=torch.int64), (1, 2, 2), ValueError, "token_coords: index must have 1 dim"),
        (torch.tensor([0, -2]), (1, 2, 2), ValueError, r"token_coords: index must lie in \[-1, "),
        (torch.tensor([0]), (2, 2), TypeError, "token_coords: grid must be a tuple of three ints"),
    ],
)
def test_token_coords_errors(index, grid, exc, match):
    with pytest.raises(exc, match=match):
        ops.token_coords(index, grid)
