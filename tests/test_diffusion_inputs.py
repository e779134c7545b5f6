"""Argument checks shared by the diffusion-decoder ops: each kind of bad input (t, shapes, devices,
options, sampler arguments, non-finite values) is named by every op that takes it.
"""
from __future__ import annotations
import pytest
import torch

from invnext.ops.diffusion import (
    adaln_modulate,
    ddim_sample_loop,
    ddim_step,
    diffusion_loss,
    make_schedule,
    p_sample_loop,
    p_sample_step,
    q_sample,
)

from diffusion_float64 import _good


def test_bad_t_raises():
    out, x0, x_t, noise, t = _good()
    s = make_schedule()
    with pytest.raises(ValueError, match=r"\bt must lie in \[0, 1000\)"):
        diffusion_loss(out, x0, x_t, noise, torch.tensor([0, 1, 2, 1000]), s)
    with pytest.raises(ValueError, match=r"\bt must lie in \[0, 10\)"):
        p_sample_step(out, x_t, torch.tensor([0, 1, 2, 10]), make_schedule(respace=10), noise)
    with pytest.raises(ValueError, match=r"\bt must lie"):
        q_sample(x0, noise, torch.tensor([0, -1, 2, 3]), s)
    with pytest.raises(TypeError, match=r"\bt must have dtype in \(int64\)"):
        q_sample(x0, noise, t.int(), s)
    with pytest.raises(ValueError, match=r"\bt must have shape \[4\]"):
        diffusion_loss(out, x0, x_t, noise, t[:3], s)


def test_bad_shapes_raise():
    out, x0, x_t, noise, t = _good()
    s = make_schedule()
    with pytest.raises(ValueError, match=r"model_out must have shape \[M, 2\*C\] = \[4, 6\]"):
        diffusion_loss(out[:, :5], x0, x_t, noise, t, s)
    with pytest.raises(ValueError, match="model_out"):
        p_sample_step(out[:3], x_t, t, s, noise)
    with pytest.raises(ValueError, match="model_out"):
        ddim_step(torch.cat([out, out], 1), x_t, t, s)
    with pytest.raises(ValueError, match="noise must have shape"):
        q_sample(x0, noise[:, :2], t, s)
    with pytest.raises(ValueError, match="x0 must have shape"):
        diffusion_loss(out, x0[:2], x_t, noise, t, s)
    with pytest.raises(TypeError, match="noise must have x0's dtype"):
        q_sample(x0, noise.double(), t, s)
    with pytest.raises(TypeError, match="x0 must have dtype"):
        q_sample(x0.int(), noise, t, s)
    with pytest.raises(ValueError, match="shift of shape"):
        adaln_modulate(x0, torch.zeros(4, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="scale of shape"):
        adaln_modulate(x0, torch.zeros(3), torch.zeros(2, 4, 3))


def test_device_mismatch_raises():
    out, x0, x_t, noise, t = _good()
    s = make_schedule()
    with pytest.raises(ValueError, match="noise is on meta"):
        q_sample(x0, noise.to("meta"), t, s)
    with pytest.raises(ValueError, match="t is on meta"):
        diffusion_loss(out, x0, x_t, noise, t.to("meta"), s)
    with pytest.raises(ValueError, match="schedule tables are on meta"):
        p_sample_step(out, x_t, t, s.to("meta"), noise)
    with pytest.raises(ValueError, match="scale is on meta"):
        adaln_modulate(x0, torch.zeros(3), torch.zeros(3, device="meta"))
    with pytest.raises(TypeError, match="schedule must be a DiffusionSchedule"):
        q_sample(x0, noise, t, {"betas": s.betas})


def test_bad_options_raise():
    out, x0, x_t, noise, t = _good()
    s = make_schedule()
    with pytest.raises(ValueError, match="reduction must be one of"):
        diffusion_loss(out, x0, x_t, noise, t, s, reduction="avg")
    with pytest.raises(ValueError, match="backend must be"):
        q_sample(x0, noise, t, s, backend="gpu")
    with pytest.raises(ValueError, match="noise is required when eta > 0"):
        ddim_step(out, x_t, t, s, eta=0.5)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_step(out, x_t, t, s, noise, eta=-0.1)
    with pytest.raises(TypeError, match="temperature must be a finite float"):
        p_sample_step(out, x_t, t, s, noise, temperature=float("nan"))
    with pytest.raises(ValueError, match="eps must be > 0"):
        adaln_modulate(x0, x0, x0, eps=0.0)


def test_bad_sampler_arguments_raise():
    s = make_schedule(respace=4)
    cond = torch.zeros(2, 3)
    good = lambda x, t, c: torch.zeros(x.shape[0], 2 * x.shape[1])
    with pytest.raises(ValueError, match=r"denoise_fn must return model_out of shape \[M, 2\*C\]"):
        p_sample_loop(lambda x, t, c: torch.zeros(2, 3), cond, s, channels=3)
    with pytest.raises(TypeError, match="denoise_fn must be callable"):
        ddim_sample_loop(None, cond, s, channels=3)
    with pytest.raises(ValueError, match=r"step_noise must have shape \[4, 2, 3\]"):
        p_sample_loop(good, cond, s, channels=3, step_noise=torch.zeros(3, 2, 3))
    with pytest.raises(ValueError, match=r"noise must have shape \[M, channels=3\]"):
        ddim_sample_loop(good, cond, s, channels=3, noise=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="pass noise"):
        p_sample_loop(good, None, s, channels=3)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        p_sample_loop(good, cond, s, channels=0)


def test_nonfinite_diffusion_inputs_are_named_when_values_are_checked(monkeypatch):
    out, x0, x_t, noise, t = _good()
    s = make_schedule(1000)
    bad = out.clone()
    bad[2, 1] = float("nan")
    diffusion_loss(bad, x0, x_t, noise, t, s)  # opt-in only: NaN flows to the trainer's own check
    monkeypatch.setenv("INVNEXT_CHECK_VALUES", "1")
    inf = torch.full_like(x0, float("inf"))
    for call, match in (
        (lambda: diffusion_loss(bad, x0, x_t, noise, t, s), "diffusion_loss: model_out holds 1 non-finite"),
        (lambda: q_sample(inf, noise, t, s), "q_sample: x0 holds 12 non-finite"),
        (lambda: p_sample_step(out, x_t, t, s, inf), "p_sample_step: noise holds 12 non-finite"),
        (lambda: ddim_step(out, inf, t, s), "ddim_step: x_t holds 12 non-finite"),
        (lambda: adaln_modulate(x0, torch.zeros(3), inf[0]), "adaln_modulate: scale holds 3 non-finite"),
        (lambda: p_sample_loop(lambda x, tt, c: torch.zeros(4, 6), None, make_schedule(respace=4), channels=3,
                               noise=inf), "p_sample_loop: noise holds 12 non-finite"),
    ):
        with pytest.raises(ValueError, match=match):
            call()
