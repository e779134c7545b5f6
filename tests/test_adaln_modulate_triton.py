"""Triton adaln_modulate vs the float64 reference under kernels.md's error rule
(tests/diffusion_error_rule.py), forward and backward.
"""
from __future__ import annotations

import pytest
import torch

from invnext import ops
from invnext.ops import diffusion as R

from diffusion_error_rule import DTYPES, MARKS, _check, kd

pytestmark = MARKS


# ----------------------------------------------------------------------------------------
# adaln_modulate
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "xs,ps",
    [
        ((37, 7), (37, 7)),  # per-row modulation (the decoder's per-token condition)
        ((1, 588), (588,)),
        ((3, 13, 40), (3, 1, 40)),  # per-sample modulation (materialised by the public op)
        ((6, 1536), (1536,)),  # one shared modulation: a stride-0 view, summed by autograd
    ],
)
def test_adaln_modulate(triton_device, dtype, xs, ps):
    x = (torch.randn(xs) * 2 + 0.5).to(dtype).to(triton_device)
    shift = torch.randn(ps).to(dtype).to(triton_device)
    scale = (torch.randn(ps) * 0.5).to(dtype).to(triton_device)
    g = torch.randn(xs).to(dtype).to(triton_device)

    def run(backend, cast):
        args = [cast(z).requires_grad_() for z in (x, shift, scale)]
        if backend == "float64":
            y = R.adaln_modulate_reference(*(a.expand(x.shape).reshape(-1, x.shape[-1]) for a in args), 1e-6)
            y = y.reshape(x.shape)
        else:
            y = ops.adaln_modulate(*args, eps=1e-6, backend=backend)
        y.backward(cast(g))
        return (y.detach(), *(a.grad for a in args))

    k = run("triton", lambda z: z.clone())
    r = run("torch", lambda z: z.clone())
    f = run("float64", lambda z: z.double())
    _check("y", k[0], r[0], f[0], 2)
    for name, a, b, c in zip(("dx", "dshift", "dscale"), k[1:], r[1:], f[1:]):
        _check(name, a, b, c, 3)


def test_adaln_saves_row_stats_and_reads_broadcast_in_place(triton_device):
    x = torch.randn(5, 24, device=triton_device).requires_grad_()
    shift = torch.randn(24, device=triton_device).expand(5, 24)
    scale = torch.randn(24, device=triton_device).expand(5, 24)
    y = kd.adaln_modulate_triton(x, shift, scale, 1e-5)
    _, _, mean, rstd = y.grad_fn.saved_tensors
    x64 = x.detach().double()
    torch.testing.assert_close(mean.double(), x64.mean(1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rstd.double(), (x64.var(1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-6, atol=1e-7)
    assert mean.dtype == rstd.dtype == torch.float32
