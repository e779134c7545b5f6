"""The Triton ddim_sample_loop (step kernels) vs the reference loop."""
from __future__ import annotations

import pytest
import torch

from invnext.ops import diffusion as R

from diffusion_error_rule import MARKS, _denoiser, _sampler_case, ks

pytestmark = MARKS


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_sample_loop_matches_reference(triton_device, eta):
    s, cond, x_T, step_noise = _sampler_case(triton_device)
    fn = _denoiser(7, triton_device)
    k = ks.ddim_sample_loop_triton(fn, cond, s, x_T, step_noise, None, eta)
    r = R.ddim_sample_loop_reference(fn, cond, s, x_T, step_noise, None, eta)
    torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5)
