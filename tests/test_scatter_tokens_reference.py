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


# --------------------------------------------------------------------------- mask_token shapes, keywords (issue 18)


def test_mask_token_as_c_1c_or_11c_and_keyword_order():
    B, N, C = 2, 6, 5
    packed = gather_visible(torch.randn(B, N, C, dtype=torch.float64), torch.rand(B, N) < 0.5)
    pos = torch.randn(1, N, C, dtype=torch.float64)
    token = torch.randn(C, dtype=torch.float64)
    want = scatter_tokens(packed.tokens, packed.index, token, pos, N, batch_size=B)  # the positional form
    for shape in ((C,), (1, C), (1, 1, C)):
        t = token.reshape(shape).clone().requires_grad_(True)
        got = scatter_tokens(packed.tokens, packed.index, t, pos=pos, N=N, batch_size=B)
        assert torch.equal(got, want)
        got.sum().backward()
        assert t.grad.shape == shape
    kw = scatter_tokens(packed=packed.tokens, index=packed.index, mask_token=token, batch_size=B, N=N, pos=pos)
    assert torch.equal(kw, want)


def test_fp32_mask_token_and_pos_meet_bf16_packed():
    B, N, C = 2, 6, 4
    packed = gather_visible(torch.randn(B, N, C).bfloat16(), torch.rand(B, N) < 0.5)
    token, pos = torch.randn(1, 1, C), torch.randn(1, N, C)
    out = scatter_tokens(packed.tokens, packed.index, token, pos=pos, N=N, batch_size=B)
    want = scatter_tokens(packed.tokens, packed.index, token.bfloat16().view(C), pos=pos.bfloat16(), N=N, batch_size=B)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"mask_token": torch.zeros(2, 4)}, ValueError, r"mask_token must have shape \[4\], \[1, 4\] or \[1, 1, 4\]"),
        ({"mask_token": torch.zeros(1, 1, 1, 4)}, ValueError, "mask_token must have 1 or 2 or 3 dimensions"),
        ({"N": None}, TypeError, r"scatter_tokens: N \(places per sample\) is required"),
    ],
)
def test_scatter_shape_errors(kwargs, exc, match):
    args = {"packed": torch.randn(2, 4), "index": torch.tensor([0, 3]), "mask_token": torch.zeros(4), "N": 2,
            "batch_size": 2}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        scatter_tokens(**args)
