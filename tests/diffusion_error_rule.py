"""What the Triton diffusion-decoder kernels' tests share: the problems they are run on and the
error rule they are held to.

Truth is the pure-PyTorch reference run in float64 on the float32 tables (upcast): the kernels
are specified to read the tables in float32, so that is the exact function they compute, and
the error left is arithmetic alone. Rule (kernels.md): the kernel's max error vs truth is at
most 2x (outputs) / 3x (gradients) the max error of the same-dtype PyTorch computation, i.e.
the reference on the same inputs (fp32 math inside, outputs rounded to the input dtype),
plus one unit in the last place of the largest output for the rare case where PyTorch
happens to be exact.

Rows carry many different t (0, 1, 2, S-2, S-1 and random) of the full 1000-step cosine
schedule and of a 100-step respacing; C = 588 (the decoder's 3x14x14 patch) and C = 7;
M = 37 and 1. The tests run on the CPU interpreter here (small shapes) and compiled with
TRITON_INTERPRET=0 on a GPU.
"""
from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch

from invnext._kernels_path import ensure_kernels_importable
from invnext.ops import diffusion as R
from invnext.ops.diffusion_schedule import TABLE_NAMES

ensure_kernels_importable()
kd = importlib.import_module("invnext_kernels.diffusion")
ks = importlib.import_module("invnext_kernels.sampler")


# Every test module of a Triton diffusion kernel sets ``pytestmark = MARKS``.
MARKS = [
    pytest.mark.triton,
    # The interpreter's numpy exp warns where a sigmoid saturates (e^-a = inf -> 0): intended.
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F32, BF16, F16 = DTYPES
# (dtype, M, C, respace): every dtype meets C = 588 and C = 7, M = 1 and 37, both schedules.
CASES = [
    (F32, 37, 588, None),
    (BF16, 37, 588, 100),
    (F16, 20, 588, None),
    (F32, 1, 7, 100),
    (BF16, 37, 7, None),
    (F16, 37, 7, 100),
    (BF16, 1, 7, None),
]


# ----------------------------------------------------------------------------------------
# problem construction
# ----------------------------------------------------------------------------------------
def _schedule(respace, device):
    return R.make_schedule(1000, respace=respace, device=device)


def _truth_schedule(s):
    """The same schedule whose 'float64 tables' are the float32 ones upcast (see module doc)."""
    return dataclasses.replace(s, _tables64={n: getattr(s, n).double() for n in TABLE_NAMES})


def _steps(M, S, device):
    t = torch.randint(0, S, (M,))
    fixed = torch.tensor([0, 1, S - 1, 2, S - 2, 0])
    k = min(M, fixed.numel())
    t[:k] = fixed[:k]
    return t.to(device)


def _batch(M, C, S, dtype, device):
    """x0 in [-1, 1] with pixels at the edges +-1; eps near the noise as a trained model's."""
    x0 = torch.rand(M, C) * 2 - 1
    x0[torch.rand(M, C) < 0.15] = -1.0
    x0[torch.rand(M, C) < 0.15] = 1.0
    noise = torch.randn(M, C)
    eps = 0.9 * noise + 0.3 * torch.randn(M, C)
    v = torch.rand(M, C) * 2.4 - 1.2
    t = _steps(M, S, device)
    cast = lambda z: z.to(dtype).to(device)
    return cast(torch.cat([eps, v], 1)), cast(x0), cast(noise), t


def _max_err(a, truth):
    return (a.double() - truth).abs().max().item()


def _check(name, out, same_dtype_torch, truth, factor):
    assert out.dtype == same_dtype_torch.dtype, f"{name}: dtype {out.dtype} != reference {same_dtype_torch.dtype}"
    assert out.shape == truth.shape, name
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err_k, err_t = _max_err(out, truth), _max_err(same_dtype_torch, truth)
    ulp = torch.finfo(out.dtype).eps * truth.abs().max().item()
    assert err_k <= factor * err_t + ulp, f"{name}: kernel error {err_k:.3g} > {factor} x torch {err_t:.3g} + {ulp:.3g}"


def _params(schedule_respace):
    return pytest.mark.parametrize("respace", schedule_respace)


# ----------------------------------------------------------------------------------------
# diffusion_loss
# ----------------------------------------------------------------------------------------
def _loss_case(M, C, respace, dtype, device):
    s = _schedule(respace, device)
    mo, x0, noise, t = _batch(M, C, s.num_steps, dtype, device)
    x_t = R.q_sample_reference(x0, noise, t, s)
    return s, mo, x0, x_t, noise, t


# ----------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------
def _denoiser(C, device, dtype=torch.float32):
    """A tiny deterministic denoiser: a fixed linear map of (x_t, cond, sin(t)) with a tanh."""
    gen = torch.Generator().manual_seed(3)
    w_x = (torch.randn(C, 2 * C, generator=gen) / math.sqrt(C)).to(device, dtype)
    w_c = (torch.randn(4, 2 * C, generator=gen) * 0.3).to(device, dtype)

    def fn(x, t_model, cond):
        time = torch.sin(t_model.to(dtype) / 150.0)[:, None]
        return torch.tanh(x.to(dtype) @ w_x + cond.to(dtype) @ w_c + time)

    return fn


def _sampler_case(device, M=6, C=7, S=10):
    s = _schedule(S, device)
    cond = torch.randn(M, 4, device=device)
    x_T = torch.randn(M, C, device=device)
    step_noise = torch.randn(S, M, C, device=device)
    return s, cond, x_T, step_noise
