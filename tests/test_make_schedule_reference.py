"""make_schedule's tables (cosine, linear, respaced) against closed forms recomputed in float64
(tests/diffusion_float64.py), and its argument checks.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from invnext.ops.diffusion import DiffusionSchedule, make_schedule, space_timesteps

from diffusion_float64 import N, _abar_closed, _beta_closed, _np_cosine


# ----------------------------------------------------------------------------- schedule tables


@pytest.mark.parametrize("i", [0, 1, 500, 998, 999])
def test_cosine_tables_closed_form(i):
    s = make_schedule(N)
    t64 = s.tables64()
    beta, abar = _beta_closed(i), _abar_closed(i)
    prev = _abar_closed(i - 1) if i > 0 else 1.0
    var = beta * (1 - prev) / (1 - abar)
    var1 = _beta_closed(1) * (1 - _abar_closed(0)) / (1 - _abar_closed(1))
    want = {
        "betas": beta,
        "log_betas": math.log(beta),
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": math.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": math.sqrt(1 - abar),
        "sqrt_recip_alphas_cumprod": math.sqrt(1 / abar),
        "sqrt_recipm1_alphas_cumprod": math.sqrt(1 / abar - 1),
        "posterior_variance": var,
        "posterior_log_variance_clipped": math.log(var1 if i == 0 else var),
        "posterior_mean_coef1": beta * math.sqrt(prev) / (1 - abar),
        "posterior_mean_coef2": (1 - prev) * math.sqrt(1 - beta) / (1 - abar),
    }
    for name, value in want.items():
        got64 = float(t64[name][i])
        assert math.isclose(got64, value, rel_tol=1e-10, abs_tol=1e-300), (name, got64, value)
        got32 = getattr(s, name)
        assert got32.dtype == torch.float32 and got32.shape == (N,)
        assert torch.equal(got32, t64[name].float()), name
        assert math.isclose(float(got32[i]), value, rel_tol=1e-7), name
    assert int(s.timestep_map[i]) == i


def test_cosine_table_shape_properties():
    s = make_schedule()
    t64 = s.tables64()
    assert s.num_steps == N and all(v.dtype == torch.float64 for v in t64.values())
    abar = t64["alphas_cumprod"]
    assert bool((abar[1:] < abar[:-1]).all()) and float(abar[0]) < 1.0 and float(abar[-1]) > 0.0
    assert bool((t64["betas"] <= 0.999).all()) and bool((t64["betas"] > 0).all())
    assert float(t64["betas"][-1]) == 0.999 and float(t64["betas"][-2]) < 0.999
    assert float(t64["posterior_variance"][0]) == 0.0
    assert bool(torch.isfinite(t64["posterior_log_variance_clipped"]).all())
    assert torch.equal(s.timestep_map, torch.arange(N))
    assert s.table("betas", torch.float64) is t64["betas"] and s.table("betas", torch.bfloat16) is s.betas


def test_linear_schedule():
    s = make_schedule(N, kind="linear")
    b = s.tables64()["betas"]
    for i in (0, 1, 500, 999):
        assert math.isclose(float(b[i]), 1e-4 + i * (0.02 - 1e-4) / (N - 1), rel_tol=1e-12)
    abar = np.cumprod(1 - b.numpy())
    assert np.allclose(s.tables64()["alphas_cumprod"].numpy(), abar, rtol=1e-13, atol=0)
    s50 = make_schedule(50, kind="linear")  # betas scale by 1000/50
    assert math.isclose(float(s50.tables64()["betas"][-1]), 0.4, rel_tol=1e-12)


def test_respace_count_rule():
    kept = space_timesteps(N, 100)
    assert kept == [round(Fraction(k * (N - 1), 99)) for k in range(100)]
    assert space_timesteps(N, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert space_timesteps(N, N) == list(range(N))
    # A .5 tie rounds half to even: stride 999/2 = 499.5 -> 500.
    assert space_timesteps(N, 3) == [0, 500, 999]


@pytest.mark.parametrize("respace", [100, [0, 3, 10, 250, 600, 998, 999], [7, 40]])
def test_respaced_tables(respace):
    full = make_schedule(N).tables64()
    s = make_schedule(N, respace=respace)
    kept = space_timesteps(N, respace) if isinstance(respace, int) else respace
    assert s.num_steps == len(kept) and s.timestep_map.tolist() == kept
    t64 = s.tables64()
    assert torch.equal(t64["alphas_cumprod"], full["alphas_cumprod"][kept])
    abar = full["alphas_cumprod"].numpy()[kept]
    betas = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    assert np.allclose(t64["betas"].numpy(), betas, rtol=1e-14, atol=0)
    ref = _np_cosine(kept)
    for name, key in [
        ("posterior_variance", "var"),
        ("posterior_log_variance_clipped", "logvar_clip"),
        ("posterior_mean_coef1", "coef1"),
        ("posterior_mean_coef2", "coef2"),
        ("alphas_cumprod_prev", "abar_prev"),
    ]:
        assert np.allclose(t64[name].numpy(), ref[key], rtol=1e-9, atol=0), name


def test_schedule_to_device_moves_every_table():
    s = make_schedule(N, respace=10)
    m = s.to("meta")
    assert isinstance(m, DiffusionSchedule) and m.device.type == "meta" and m.num_steps == 10
    assert m.timestep_map.device.type == "meta" and m.betas.device.type == "meta"
    assert all(v.device.type == "meta" for v in m.tables64().values())
    assert s.to("cpu") is s


def test_bad_schedule_arguments_raise():
    with pytest.raises(ValueError, match=r"respace=1001 must lie in \[1, num_steps=1000\]"):
        make_schedule(1000, respace=1001)
    with pytest.raises(ValueError, match="respace must keep at least 2 steps"):
        make_schedule(1000, respace=1)
    with pytest.raises(ValueError, match="respace list must be strictly increasing"):
        make_schedule(1000, respace=[0, 10, 10, 20])
    with pytest.raises(ValueError, match=r"respace steps must lie in \[0, 1000\)"):
        make_schedule(1000, respace=[0, 1000])
    with pytest.raises(TypeError, match="respace must be None, an int or a list"):
        make_schedule(1000, respace=2.5)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_schedule(1000, kind="sigmoid")
    with pytest.raises(ValueError, match="num_steps must be >= 2"):
        make_schedule(1)
    with pytest.raises(ValueError, match="kind='linear' needs num_steps > 20"):
        make_schedule(20, kind="linear")


# ----------------------------------------------------------------------------- sizes, devices, values (issue 16)


def test_make_schedule_past_memory_is_refused_before_allocating():
    # 10^12 steps: the float64 chain alone is ~30 TiB; named, not an allocator error.
    with pytest.raises(ValueError, match=r"make_schedule: num_steps=1000000000000 would need .* more than its"):
        make_schedule(10**12)


def test_make_schedule_device_is_named():
    # torch's "Expected one of cpu, cuda, ..." / "Torch not compiled with CUDA enabled" named nothing.
    with pytest.raises(ValueError, match=r"make_schedule: device must be a torch.device .* got 'gpu'"):
        make_schedule(10, device="gpu")
    with pytest.raises(ValueError, match=r"make_schedule: device='cuda:99' but "):
        make_schedule(10, device="cuda:99")
