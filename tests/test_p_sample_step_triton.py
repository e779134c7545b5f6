"""Triton p_sample_step vs the float64 reference under kernels.md's error rule
(tests/diffusion_error_rule.py), strided and in-place inputs included.
"""
from __future__ import annotations

import pytest
import torch

from invnext.ops import diffusion as R

from diffusion_error_rule import CASES, MARKS, _check, _loss_case, _truth_schedule, kd

pytestmark = MARKS


# ----------------------------------------------------------------------------------------
# reverse steps
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,M,C,respace", CASES)
def test_p_sample_step(triton_device, dtype, M, C, respace):
    s, mo, _, x_t, noise, t = _loss_case(M, C, respace, dtype, triton_device)
    k = kd.p_sample_step_triton(mo, x_t, t, s, noise, 0.8)
    r = R.p_sample_step_reference(mo, x_t, t, s, noise, 0.8)
    f = R.p_sample_step_reference(mo.double(), x_t.double(), t, _truth_schedule(s), noise.double(), 0.8)
    _check("x_{t-1}", k, r, f, 2)


def test_steps_read_strided_views_and_update_in_place(triton_device):
    """model_out as a column slice of a wider buffer, x_t overwritten by its own step."""
    s, mo, _, x_t, noise, t = _loss_case(37, 7, 100, torch.float32, triton_device)
    wide = torch.randn(37, 20, device=triton_device)
    wide[:, 3:17] = mo
    view = wide[:, 3:17]
    expect = R.p_sample_step_reference(mo, x_t, t, s, noise, 1.0)
    torch.testing.assert_close(kd.p_sample_step_triton(view, x_t, t, s, noise, 1.0), expect, rtol=1e-6, atol=1e-6)
    x = x_t.clone()
    kd.p_sample_step_triton_into(x, view, x, t, s, noise, 1.0)
    torch.testing.assert_close(x, expect, rtol=1e-6, atol=1e-6)
