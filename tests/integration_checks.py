"""Shared checks of tests/test_integrations_*.py: outputs and parameter gradients of a patched
model against the unpatched one, fp32, to 1e-5 of the reference's largest magnitude."""
from __future__ import annotations

import torch

RTOL = 1e-5


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, floor: float = 0.0) -> None:
    """``floor``: the smallest scale the tolerance is relative to (a gradient that is zero in exact
    arithmetic, such as a key bias's, holds only rounding noise)."""
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    scale = max(float(want.detach().abs().max()) if want.numel() else 0.0, floor) or 1.0
    err = float((got.detach() - want.detach()).abs().max()) if want.numel() else 0.0
    assert err <= RTOL * scale, f"{what}: max |diff| {err:.3g} > {RTOL} x {scale:.3g}"


def weights_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=t.dtype)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: torch.nn.Module, want: torch.nn.Module, what: str) -> None:
    a, b = grads(got), grads(want)
    assert a.keys() == b.keys() and b, f"{what}: gradients of different parameters"
    # A gradient that vanishes in exact arithmetic (a key bias: softmax ignores a per-row shift)
    # holds only rounding noise: each tensor's tolerance is relative to at least 1e-6 of the
    # model's largest gradient. In fp32 that noise reaches 1e-3 of it, so per-tensor gradient
    # checks run in float64 (assert_same_grads on .double() copies); fp32 gradients are compared
    # at the model's scale (assert_same_grads_fp32).
    floor = 1e-6 * max(float(g.abs().max()) for g in b.values())
    for name in b:
        assert_close(a[name], b[name], f"{what}: grad of {name}", floor)


def assert_same_grads_fp32(got: torch.nn.Module, want: torch.nn.Module, what: str) -> None:
    """fp32 gradients: every tensor within 1e-5 of the model's largest gradient."""
    a, b = grads(got), grads(want)
    assert a.keys() == b.keys() and b, f"{what}: gradients of different parameters"
    scale = max(float(g.abs().max()) for g in b.values())
    for name in b:
        assert_close(a[name], b[name], f"{what}: fp32 grad of {name}", scale)
