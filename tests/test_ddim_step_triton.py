"""Triton ddim_step vs the float64 reference under kernels.md's error rule (tests/diffusion_error_rule.py)."""
from __future__ import annotations

import pytest
import torch

from invnext.ops import diffusion as R

from diffusion_error_rule import DTYPES, MARKS, _check, _loss_case, _truth_schedule, kd

pytestmark = MARKS


@pytest.mark.parametrize("eta,with_noise", [(0.0, False), (0.0, True), (0.5, True), (1.0, True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("respace", [None, 100])
def test_ddim_step(triton_device, eta, with_noise, dtype, respace):
    s, mo, _, x_t, noise, t = _loss_case(37, 588 if dtype == torch.float32 else 7, respace, dtype, triton_device)
    nz = noise if with_noise else None
    k = kd.ddim_step_triton(mo, x_t, t, s, nz, eta)
    r = R.ddim_step_reference(mo, x_t, t, s, nz, eta)
    f = R.ddim_step_reference(
        mo.double(), x_t.double(), t, _truth_schedule(s), None if nz is None else nz.double(), eta
    )
    _check("x_prev", k, r, f, 2)
