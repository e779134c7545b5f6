"""scatter_tokens' reference vs an independent per-place formulation (its inputs come from gather_visible)."""
from __future__ import annotations

import pytest
import torch

from invnext.ops import gather_visible, scatter_tokens

from test_gather_visible_reference import _random_hidden


def test_scatter_round_trip_and_mask_token():
    B, N, C, P = 4, 40, 6, 2
    x = torch.randn(B, N, C, dtype=torch.float64)
    pos = torch.randn(1, N, C, dtype=torch.float64)
    mask_token = torch.randn(C, dtype=torch.float64)
    hidden = _random_hidden(B, N, all_hidden_sample=2)
    packed = gather_visible(x, hidden, prefix=torch.randn(1, P, C, dtype=torch.float64))
    out = scatter_tokens(packed.tokens, packed.index, mask_token, pos, N, batch_size=B)
    want = torch.where(hidden[..., None], mask_token.expand(B, N, C), x) + pos
    assert torch.allclose(out, want, rtol=0, atol=1e-15)


def test_gradients_by_gradcheck():
    B, N, C, P = 3, 9, 4, 2
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, N, C, dtype=torch.float64, requires_grad=True)
    prefix = torch.randn(1, P, C, dtype=torch.float64, requires_grad=True)
    mask_token = torch.randn(C, dtype=torch.float64, requires_grad=True)
    hidden = _random_hidden(B, N, one_visible_sample=0)

    def gather(x, pos, prefix):
        return gather_visible(x, hidden, pos=pos, prefix=prefix).tokens

    assert torch.autograd.gradcheck(gather, (x, pos, prefix))
    packed = gather_visible(x.detach(), hidden, prefix=prefix.detach())

    def scatter(tokens, mask_token, pos):
        return scatter_tokens(tokens, packed.index, mask_token, pos, N, batch_size=B)

    tokens = packed.tokens.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(scatter, (tokens, mask_token, pos))


def test_scatter_gradients_have_the_expected_meaning():
    B, N, C = 2, 10, 3
    hidden = _random_hidden(B, N)
    packed = gather_visible(torch.randn(B, N, C, dtype=torch.float64), hidden)
    tokens = packed.tokens.clone().requires_grad_(True)
    mask_token = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, N, C, dtype=torch.float64)
    scatter_tokens(tokens, packed.index, mask_token, None, N, batch_size=B).backward(g)
    assert torch.allclose(mask_token.grad, g[hidden].sum(0), rtol=0, atol=1e-12)  # sums differ only in order
    assert torch.equal(tokens.grad, g[~hidden])


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: scatter_tokens(torch.randn(3, 4), torch.tensor([0, 5, 99]), torch.zeros(4), None, 10, batch_size=2),
            r"index must lie in \[-1, 20\)",
        ),
        (
            lambda: scatter_tokens(torch.randn(3, 4), torch.tensor([0, 1, 2]).int(), torch.zeros(4), None, 10, batch_size=2),
            "index must have dtype",
        ),
        (
            lambda: scatter_tokens(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.zeros(5), None, 10, batch_size=2),
            "mask_token must have shape",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


# --------------------------------------------------------------------------- sizes, duplicates, values (issue 16)


def test_scatter_past_memory_is_refused_before_allocating():
    # B * N = 10^13 places of 4 fp32 channels (~150 TiB): named, not an allocator error.
    with pytest.raises(ValueError, match=r"scatter_tokens: batch_size \* N = 1000000 \* 10000000 .* more than its"):
        scatter_tokens(torch.randn(3, 4), torch.tensor([-1, 0, 7]), torch.zeros(4), None, 10**7, batch_size=10**6)


def test_scatter_duplicate_index_is_rejected_where_values_are_checked():
    # Two rows at one place: which lands there would differ between backends; silent before.
    packed, mask = torch.randn(4, 3), torch.zeros(3)
    with pytest.raises(ValueError, match="scatter_tokens: index names place 5 more than once"):
        scatter_tokens(packed, torch.tensor([-1, 5, 2, 5]), mask, None, 4, batch_size=2)
    out = scatter_tokens(packed, torch.tensor([-1, 5, 2, -1]), mask, None, 4, batch_size=2)  # -1 may repeat
    assert torch.equal(out[1, 1], packed[1])


def test_scatter_bool_sizes_are_rejected():
    with pytest.raises(ValueError, match="scatter_tokens: batch_size must be a positive int, got True"):
        scatter_tokens(torch.randn(2, 3), torch.tensor([0, 1]), torch.zeros(3), None, 4, batch_size=True)
