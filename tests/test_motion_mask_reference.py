"""motion_mask: keeps the most changed tokens (against a loop reference), ties, errors."""
from __future__ import annotations

import math

import pytest
import torch

from invnext.ops._dispatch import BackendUnavailableError
from invnext.ops.masks import motion_mask


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


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: motion_mask(torch.randn(1, 1, 4, 3), 0.5), ValueError, "T >= 2"),
        (lambda: motion_mask(torch.ones(1, 2, 4, 3, dtype=torch.int32), 0.5), TypeError, "tokens"),
        (lambda: motion_mask(torch.randn(1, 2, 4, 3), 1.0), ValueError, "ratio"),
        (lambda: motion_mask(torch.randn(2, 4, 3), 0.5), ValueError, "tokens"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_motion_has_no_accelerated_backend():
    with pytest.raises(BackendUnavailableError, match="motion_mask: backend .triton. is unavailable: no triton impl"):
        motion_mask(torch.randn(1, 2, 4, 3), 0.5, backend="triton")


def test_nonfinite_motion_tokens_are_named_when_values_are_checked(monkeypatch):
    tokens = torch.randn(1, 2, 4, 3)
    tokens[0, 1, 2, 0] = float("nan")
    motion_mask(tokens, 0.5)  # opt-in only: a diverging run reaches its own finite check
    monkeypatch.setenv("INVNEXT_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match=r"motion_mask: tokens holds 1 non-finite value"):
        motion_mask(tokens, 0.5)
