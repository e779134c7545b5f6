"""The Triton p_sample_loop (step kernels, CUDA-graph replay on a GPU) vs the reference loop."""
from __future__ import annotations

import pytest
import torch

from invnext.ops import diffusion as R
from invnext.ops._dispatch import triton_interpreter

from diffusion_error_rule import MARKS, _check, _denoiser, _sampler_case, _truth_schedule, ks

pytestmark = MARKS


def test_p_sample_loop_matches_reference(triton_device):
    s, cond, x_T, step_noise = _sampler_case(triton_device)
    fn = _denoiser(7, triton_device)
    k = ks.p_sample_loop_triton(fn, cond, s, x_T, step_noise, None, 0.9)
    r = R.p_sample_loop_reference(fn, cond, s, x_T, step_noise, None, 0.9)
    f = R.p_sample_loop_reference(
        lambda x, tm, c: fn(x, tm, c).double(), cond, _truth_schedule(s), x_T.double(), step_noise.double(), None, 0.9
    )
    _check("x_0", k, r, f, 2)
    torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5)


def test_sampler_takes_the_reference_step_for_a_float64_denoiser(triton_device):
    # the denoiser's dtype shows only mid-loop, after dispatch chose the sampler
    s, cond, x_T, step_noise = _sampler_case(triton_device)
    fn = _denoiser(7, triton_device, torch.float64)
    k = ks.p_sample_loop_triton(fn, cond, s, x_T, step_noise, None, 0.9)
    r = R.p_sample_loop_reference(fn, cond, s, x_T, step_noise, None, 0.9)
    assert k.dtype == torch.float32 and torch.equal(k, r)


def test_sampler_generator_draws_match_reference(triton_device):
    s, cond, x_T, _ = _sampler_case(triton_device)
    fn = _denoiser(7, triton_device)
    seed = lambda: torch.Generator(device=triton_device).manual_seed(11)
    k = ks.p_sample_loop_triton(fn, cond, s, x_T, None, seed(), 1.0)
    r = R.p_sample_loop_reference(fn, cond, s, x_T, None, seed(), 1.0)
    torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# GPU only: the CUDA-graph sampler
# ----------------------------------------------------------------------------------------
@pytest.mark.requires_cuda
@pytest.mark.parametrize("kind", ["p_sample", "ddim"])
def test_cuda_graph_sampler_equals_eager_loop(kind):
    if triton_interpreter():
        pytest.skip("CUDA graphs need compiled kernels (TRITON_INTERPRET=0)")
    dev = torch.device("cuda")
    ks.clear_graph_cache()
    s, cond, x_T, step_noise = _sampler_case(dev, M=64, C=588, S=10)
    fn = _denoiser(588, dev)
    loop = ks.p_sample_loop_triton if kind == "p_sample" else ks.ddim_sample_loop_triton
    coef = 0.9 if kind == "p_sample" else 0.5
    eager = loop(fn, cond, s, x_T, step_noise, None, coef, use_graph=False)
    graph = loop(fn, cond, s, x_T, step_noise, None, coef, use_graph=True)
    again = loop(fn, cond, s, x_T, step_noise, None, coef, use_graph=True)  # cached graph
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(graph, again)
    # New inputs through the cached graph: x_T, cond and noise are copied into its buffers.
    x2, c2 = torch.randn_like(x_T), torch.randn_like(cond)
    torch.testing.assert_close(
        loop(fn, c2, s, x2, step_noise, None, coef, use_graph=True),
        loop(fn, c2, s, x2, step_noise, None, coef, use_graph=False),
        rtol=1e-5,
        atol=1e-5,
    )
    # Generator draws happen outside the graph, in the reference's order (t = S-1 .. 1):
    # the same draws handed over as step_noise give the same bits.
    gen = torch.Generator(device=dev).manual_seed(5)
    drawn = torch.zeros_like(step_noise)
    for i in reversed(range(1, s.num_steps)):
        drawn[i] = torch.randn(x_T.shape, generator=gen, device=dev, dtype=x_T.dtype)
    by_gen = loop(fn, cond, s, x_T, None, torch.Generator(device=dev).manual_seed(5), coef, use_graph=True)
    assert torch.equal(by_gen, loop(fn, cond, s, x_T, drawn, None, coef, use_graph=True))
    assert len(ks._GRAPHS) >= 1
    ks.clear_graph_cache()
