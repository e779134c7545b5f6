"""mask_counts: cu_seqlens and max_seqlen of a mask, errors."""
from __future__ import annotations

import pytest
import torch

from invnext.ops.masks import mask_counts, tube_mask


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


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: mask_counts(torch.zeros(2, 3)), TypeError, "hidden"),
        (lambda: mask_counts(torch.zeros(2, 3, dtype=torch.bool), -1), ValueError, "num_prefix"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_mask_counts_of_a_meta_mask_is_a_clear_error():
    # max_seqlen is a host int read from the mask; a meta tensor has no values to read.
    with pytest.raises(ValueError, match="mask_counts: hidden is a meta tensor"):
        mask_counts(torch.zeros(2, 4, dtype=torch.bool, device="meta"))
    assert tube_mask(2, (2, 4, 4), 0.5, seed=0, device="meta").shape == (2, 32)  # shapes propagate
