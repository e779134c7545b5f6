"""gather_visible's reference (and packed_structure) vs an independent per-sample formulation."""
from __future__ import annotations

import pytest
import torch

from invnext.ops import gather_visible, packed_structure, scatter_tokens
from invnext.ops._dispatch import BackendUnavailableError


def _random_hidden(B: int, N: int, *, all_hidden_sample: int | None = None, one_visible_sample: int | None = None):
    hidden = torch.rand(B, N) < 0.7
    if all_hidden_sample is not None:
        hidden[all_hidden_sample] = True
    if one_visible_sample is not None:
        hidden[one_visible_sample] = True
        hidden[one_visible_sample, N - 1] = False
    return hidden


def _expected_gather(x, hidden, pos, prefix):
    """Per-sample boolean indexing: the obvious way, independent of the packed index maths."""
    rows, lens = [], []
    for b in range(x.shape[0]):
        vis = ~hidden[b]
        tok = x[b][vis].double()
        if pos is not None:
            tok = tok + pos[b if pos.shape[0] > 1 else 0][vis].double()
        parts = [tok]
        if prefix is not None:
            parts.insert(0, prefix[b if prefix.shape[0] > 1 else 0].double())
        sample = torch.cat(parts)
        rows.append(sample)
        lens.append(sample.shape[0])
    return torch.cat(rows), lens


@pytest.mark.parametrize("P", [0, 4])
@pytest.mark.parametrize("pos_batch", [None, 1, "B"])
def test_gather_matches_per_sample_indexing(P, pos_batch):
    B, T, S, C = 5, 3, 7, 13
    N = T * S
    x = torch.randn(B, N, C, dtype=torch.float64)
    hidden = _random_hidden(B, N, all_hidden_sample=1, one_visible_sample=3)
    pos = None if pos_batch is None else torch.randn(1 if pos_batch == 1 else B, N, C, dtype=torch.float64)
    prefix = torch.randn(B, P, C, dtype=torch.float64) if P else None
    out = gather_visible(x, hidden, pos=pos, prefix=prefix)
    want, lens = _expected_gather(x, hidden, pos, prefix)
    assert torch.allclose(out.tokens, want, rtol=0, atol=1e-15)
    assert out.cu_seqlens.dtype == torch.int32
    assert out.cu_seqlens.tolist() == [0] + torch.tensor(lens).cumsum(0).tolist()
    assert out.max_seqlen == max(lens)
    # index: flat place of every visible row, -1 on prefix rows
    for b in range(B):
        lo, hi = out.cu_seqlens[b].item(), out.cu_seqlens[b + 1].item()
        assert (out.index[lo : lo + P] == -1).all()
        places = (~hidden[b]).nonzero().flatten() + b * N
        assert torch.equal(out.index[lo + P : hi], places)


def test_gather_half_precision_adds_in_fp32_and_rounds_once():
    B, N, C = 3, 50, 64
    x = torch.randn(B, N, C).to(torch.bfloat16)
    pos = torch.randn(1, N, C).to(torch.bfloat16)
    hidden = _random_hidden(B, N)
    out = gather_visible(x, hidden, pos=pos)
    want, _ = _expected_gather(x.float(), hidden, pos.float(), None)
    assert out.tokens.dtype == torch.bfloat16
    assert torch.equal(out.tokens, want.float().to(torch.bfloat16))


def test_num_visible_avoids_recount_and_is_checked():
    B, N, C = 4, 30, 8
    x = torch.randn(B, N, C)
    hidden = _random_hidden(B, N)
    counts = (~hidden).sum(1).tolist()
    a = gather_visible(x, hidden, num_visible=counts)
    b = gather_visible(x, hidden)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.cu_seqlens, b.cu_seqlens)
    wrong = list(counts)
    wrong[0] += 1
    with pytest.raises(ValueError, match="num_visible"):
        gather_visible(x, hidden, num_visible=wrong)


def test_packed_structure_without_sync_inputs():
    hidden = torch.tensor([[True, False, False, True], [True, True, True, True], [False, True, False, False]])
    cu, max_len, index = packed_structure(hidden, num_prefix=1, num_visible=[2, 0, 3])
    assert cu.tolist() == [0, 3, 4, 8]
    assert max_len == 4
    assert index.tolist() == [-1, 1, 2, -1, -1, 8, 10, 11]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: gather_visible(torch.randn(2, 5, 3).int(), torch.zeros(2, 5, dtype=torch.bool)), "x must have dtype"),
        (lambda: gather_visible(torch.randn(2, 5, 3), torch.zeros(2, 5)), "hidden must have dtype"),
        (lambda: gather_visible(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.bool)), "hidden must have shape"),
        (lambda: gather_visible(torch.randn(5, 3), torch.zeros(5, dtype=torch.bool)), "x must have 3 dimensions"),
        (
            lambda: gather_visible(torch.randn(2, 5, 3), torch.zeros(2, 5, dtype=torch.bool), pos=torch.randn(3, 5, 3)),
            "pos must have shape",
        ),
        (
            lambda: gather_visible(
                torch.randn(2, 5, 3), torch.zeros(2, 5, dtype=torch.bool), pos=torch.ones(1, 5, 3, dtype=torch.int64)
            ),
            "pos must have dtype",
        ),
        (
            lambda: gather_visible(torch.randn(2, 5, 3), torch.zeros(2, 5, dtype=torch.bool), backend="fast"),
            "backend must be",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_device_mismatch_is_named():
    x = torch.randn(2, 5, 3)
    hidden = torch.zeros(2, 5, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="hidden is on meta"):
        gather_visible(x, hidden)


def test_unavailable_backend_says_why():
    x = torch.randn(2, 5, 3)
    hidden = torch.zeros(2, 5, dtype=torch.bool)
    with pytest.raises(BackendUnavailableError, match="cuda.*CUDA tensors"):
        gather_visible(x, hidden, backend="cuda")


def test_gather_of_meta_tensors_needs_num_visible():
    x, hidden = torch.randn(2, 6, 4, device="meta"), torch.zeros(2, 6, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="gather_visible: hidden is a meta tensor .* pass num_visible"):
        gather_visible(x, hidden)
    packed = gather_visible(x, hidden, num_visible=[6, 6])  # shapes propagate without reading values
    assert packed.tokens.shape == (12, 4) and packed.tokens.device.type == "meta"


def test_nonfinite_token_inputs_are_named_when_values_are_checked(monkeypatch):
    x = torch.randn(2, 5, 3)
    x[1, 2, 0] = float("inf")
    hidden = torch.zeros(2, 5, dtype=torch.bool)
    gather_visible(x, hidden)  # opt-in only
    monkeypatch.setenv("INVNEXT_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match="gather_visible: x holds 1 non-finite value"):
        gather_visible(x, hidden)
    with pytest.raises(ValueError, match="scatter_tokens: mask_token holds 3 non-finite value"):
        scatter_tokens(torch.randn(2, 3), torch.tensor([0, 1]), torch.full((3,), float("nan")), N=4, batch_size=1)


# --------------------------------------------------------------------------- keep_ids, dtypes (issue 18)


def test_keep_ids_in_raster_order_equal_the_mask():
    B, N, C, P = 3, 20, 6, 2
    x, pos = torch.randn(B, N, C, dtype=torch.float64), torch.randn(B, N, C, dtype=torch.float64)
    prefix = torch.randn(1, P, C, dtype=torch.float64)
    keep = torch.stack([torch.randperm(N)[:7].sort().values for _ in range(B)])
    hidden = torch.ones(B, N, dtype=torch.bool).scatter_(1, keep, False)
    a = gather_visible(x, hidden, pos, prefix)
    for ids in (keep, keep.int(), list(keep), [row.tolist() for row in keep]):
        b = gather_visible(x, pos=pos, prefix=prefix, keep_ids=ids)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.index, b.index)
        assert torch.equal(a.cu_seqlens, b.cu_seqlens) and a.max_seqlen == b.max_seqlen


def test_keep_ids_keep_their_order_and_may_be_ragged():
    B, N, C = 3, 10, 4
    x = torch.randn(B, N, C, dtype=torch.float64, requires_grad=True)
    keep_ids = [torch.tensor([7, 2, 9]), torch.tensor([], dtype=torch.int64), torch.tensor([0, 5, 4, 1, 3])]
    out = gather_visible(x, keep_ids=keep_ids, prefix=torch.zeros(1, 1, C, dtype=torch.float64))
    want = torch.cat([torch.cat([torch.zeros(1, C, dtype=torch.float64), x[b, ids]]) for b, ids in enumerate(keep_ids)])
    assert torch.equal(out.tokens, want)
    assert out.cu_seqlens.tolist() == [0, 4, 5, 11] and out.max_seqlen == 6
    assert out.index.tolist() == [-1, 7, 2, 9, -1, -1, 20, 25, 24, 21, 23]
    g = torch.randn_like(out.tokens)
    out.tokens.backward(g)
    want_grad = torch.zeros_like(x)
    for b, ids in enumerate(keep_ids):
        lo = int(out.cu_seqlens[b]) + 1
        want_grad[b, ids] = g[lo : lo + ids.numel()]
    assert torch.equal(x.grad, want_grad)
    # Scattering back puts every row at its own place, whatever the order.
    back = scatter_tokens(out.tokens, out.index, torch.zeros(C, dtype=torch.float64), N=N, batch_size=B)
    for b, ids in enumerate(keep_ids):
        assert torch.equal(back[b, ids], x[b, ids].detach())


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"hidden": torch.zeros(2, 5, dtype=torch.bool), "keep_ids": torch.zeros(2, 1, dtype=torch.int64)},
         ValueError, "pass exactly one of hidden .* and keep_ids .*, got both"),
        ({}, ValueError, "pass exactly one of hidden .* and keep_ids .*, got neither"),
        ({"keep_ids": torch.zeros(3, 1, dtype=torch.int64)}, ValueError, r"keep_ids must have shape \[B=2, K\]"),
        ({"keep_ids": torch.zeros(2, 1)}, TypeError, "keep_ids must have dtype"),
        ({"keep_ids": torch.tensor([[0, 5], [1, 2]])}, ValueError, r"keep_ids must lie in \[0, N=5\), sample 0"),
        ({"keep_ids": [torch.tensor([1]), torch.tensor([-1])]}, ValueError, r"keep_ids must lie in .* sample 1"),
        ({"keep_ids": [torch.tensor([1, 1]), torch.tensor([0])]}, ValueError, "keep_ids of sample 0 name a token"),
        ({"keep_ids": [torch.tensor([1])]}, ValueError, r"keep_ids must hold one entry per sample \(2\), got 1"),
        ({"keep_ids": [torch.tensor([1]), torch.tensor([[0]])]}, ValueError, r"keep_ids\[1\] must have 1 dim"),
        ({"keep_ids": "01"}, TypeError, "keep_ids must be an integer tensor"),
        ({"keep_ids": [[0], [1]], "num_visible": [1, 1]}, ValueError, "num_visible goes with hidden"),
    ],
)
def test_keep_ids_errors_name_the_argument(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        gather_visible(torch.randn(2, 5, 3), **kwargs)


def test_fp32_tables_meet_bf16_tokens():
    # Under bf16 autocast a Linear gives bf16 tokens while the position table stays an fp32
    # parameter: the table is cast to the tokens' dtype (and its gradient comes back in fp32).
    B, N, C = 2, 12, 8
    lin = torch.nn.Linear(C, C)
    pos = torch.randn(1, N, C, requires_grad=True)
    prefix = torch.randn(1, 2, C, requires_grad=True)
    hidden = torch.rand(B, N) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = lin(torch.randn(B, N, C))
        out = gather_visible(x, hidden, pos, prefix)
    assert x.dtype == out.tokens.dtype == torch.bfloat16
    want = gather_visible(x.detach(), hidden, pos.detach().bfloat16(), prefix.detach().bfloat16())
    assert torch.equal(out.tokens, want.tokens)
    out.tokens.float().sum().backward()
    assert pos.grad.dtype == torch.float32 and prefix.grad.dtype == torch.float32
