"""Triton diffusion-decoder kernels vs the float64 reference, under kernels.md's error rule.

Truth is the pure-PyTorch reference run in float64 on the float32 tables (upcast): the kernels
are specified to read the tables in float32, so that is the exact function they compute, and
the error left is arithmetic alone. Rule (kernels.md): the kernel's max error vs truth is at
most 2x (outputs) / 3x (gradients) the max error of the same-dtype PyTorch computation, i.e.
the reference on the same inputs (fp32 math inside, outputs rounded to the input dtype),
plus one unit in the last place of the largest output for the rare case where PyTorch
happens to be exact.

Rows carry many different t (0, 1, 2, S-2, S-1 and random) of the full 1000-step cosine
schedule and of a 100-step respacing; C = 588 (the decoder's 3x14x14 patch) and C = 7;
M = 37 and 1. Runs on the CPU interpreter here (small shapes) and compiled with
TRITON_INTERPRET=0 on a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch

from invnext import ops
from invnext._kernels_path import ensure_kernels_importable
from invnext.ops import _dispatch
from invnext.ops import diffusion as R
from invnext.ops._dispatch import triton_interpreter
from invnext.ops.diffusion_schedule import TABLE_NAMES

ensure_kernels_importable()
kd = importlib.import_module("invnext_kernels.diffusion")
ks = importlib.import_module("invnext_kernels.sampler")

pytestmark = [
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
# q_sample
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,M,C,respace", CASES)
def test_q_sample_forward_and_grads(triton_device, dtype, M, C, respace):
    s = _schedule(respace, triton_device)
    _, x0, noise, t = _batch(M, C, s.num_steps, dtype, triton_device)
    g = torch.randn(M, C, device=triton_device).to(dtype)

    def run(fn, sched, cast):
        a, b = cast(x0).requires_grad_(), cast(noise).requires_grad_()
        out = fn(a, b, t, sched)
        out.backward(cast(g))
        return out.detach(), a.grad, b.grad

    k = run(kd.q_sample, s, lambda z: z.clone())
    r = run(R.q_sample_reference, s, lambda z: z.clone())
    f = run(R.q_sample_reference, _truth_schedule(s), lambda z: z.double())
    _check("x_t", k[0], r[0], f[0], 2)
    _check("dx0", k[1], r[1], f[1], 3)
    _check("dnoise", k[2], r[2], f[2], 3)


# ----------------------------------------------------------------------------------------
# diffusion_loss
# ----------------------------------------------------------------------------------------
def _loss_case(M, C, respace, dtype, device):
    s = _schedule(respace, device)
    mo, x0, noise, t = _batch(M, C, s.num_steps, dtype, device)
    x_t = R.q_sample_reference(x0, noise, t, s)
    return s, mo, x0, x_t, noise, t


@pytest.mark.parametrize("dtype,M,C,respace", CASES)
def test_diffusion_loss_forward_and_grad(triton_device, dtype, M, C, respace):
    s, mo, x0, x_t, noise, t = _loss_case(M, C, respace, dtype, triton_device)
    w = torch.rand(M, device=triton_device) + 0.5  # a per-row incoming gradient

    def run(fn, sched, cast):
        m = cast(mo).requires_grad_()
        loss = fn(m, cast(x0), cast(x_t), cast(noise), t, sched)
        (loss * w.to(loss.dtype)).sum().backward()
        return loss.detach(), m.grad

    k = run(kd.diffusion_loss, s, lambda z: z.clone())
    r = run(R.diffusion_loss_reference, s, lambda z: z.clone())
    f = run(R.diffusion_loss_reference, _truth_schedule(s), lambda z: z.double())
    _check("loss", k[0], r[0], f[0], 2)
    _check("d model_out", k[1], r[1], f[1], 3)


def test_diffusion_loss_t0_branches_and_halves(triton_device):
    """Every row at t = 0: the NLL with both edge bins; eps grad from the MSE, v grad from vb."""
    M, C = 9, 40
    s = _schedule(None, triton_device)
    mo, x0, noise, _ = _batch(M, C, s.num_steps, torch.float32, triton_device)
    t = torch.zeros(M, dtype=torch.int64, device=triton_device)
    t[-1] = 1
    x_t = R.q_sample_reference(x0, noise, t, s)
    # Wide and narrow predicted variances: v = +-1 puts logvar on either table exactly.
    mo[0, C:] = 1.0
    mo[1, C:] = -1.0
    m = mo.clone().requires_grad_()
    loss = kd.diffusion_loss(m, x0, x_t, noise, t, s)
    loss.sum().backward()
    f = mo.double().requires_grad_()
    truth = R.diffusion_loss_reference(f, x0.double(), x_t.double(), noise.double(), t, _truth_schedule(s))
    truth.sum().backward()
    torch.testing.assert_close(loss.double(), truth, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(m.grad.double(), f.grad, rtol=1e-5, atol=1e-7)
    mse_grad = 2.0 * (mo[:, :C].double() - noise.double()) / C
    torch.testing.assert_close(m.grad[:, :C].double(), mse_grad, rtol=1e-6, atol=1e-9)
    assert m.grad[:, C:].abs().sum() > 0


def test_diffusion_loss_public_op_mean_reduction(triton_device):
    """Through invnext.ops with backend='triton': the mean's expanded (stride-0) gradient."""
    s, mo, x0, x_t, noise, t = _loss_case(37, 7, 100, torch.float32, triton_device)

    def run(backend, sched, cast):
        m = cast(mo).requires_grad_()
        loss = ops.diffusion_loss(m, cast(x0), cast(x_t), cast(noise), t, sched, backend=backend)
        loss.backward()
        return loss.detach(), m.grad

    k = run("triton", s, lambda z: z.clone())
    r = run("torch", s, lambda z: z.clone())
    f = run("torch", _truth_schedule(s), lambda z: z.double())
    _check("mean loss", k[0], r[0], f[0], 2)
    _check("d model_out", k[1], r[1], f[1], 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_steps_finite_at_extremes(triton_device, dtype):
    """Every step of the full schedule (fp32; the ends and a sample of the rest for half
    inputs), saturated outputs and pixels far past the edges."""
    s = _schedule(None, triton_device)
    if dtype == torch.float32:
        t = torch.arange(1000)
    else:
        t = torch.cat([torch.arange(10), torch.arange(990, 1000), torch.randint(10, 990, (40,))])
    t = t.to(triton_device)
    M, C = t.numel(), 2
    mo = torch.randn(M, 2 * C) * 4
    mo[::3, C:] = 1.0
    mo[1::3, C:] = -1.0
    x0 = torch.randn(M, C) * 1.5
    noise = torch.randn(M, C)
    cast = lambda z: z.to(dtype).to(triton_device)
    mo, x0, noise = cast(mo), cast(x0), cast(noise)
    x_t = kd.q_sample(x0, noise, t, s)
    m = mo.clone().requires_grad_()
    loss = kd.diffusion_loss(m, x0, x_t, noise, t, s)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(m.grad).all()
    assert torch.isfinite(kd.p_sample_step(mo, x_t, t, s, noise, 1.0)).all()
    assert torch.isfinite(kd.ddim_step(mo, x_t, t, s, noise, 1.0)).all()


def test_out_of_range_t_poisons_only_its_row(triton_device):
    """Unvalidated bad t (device tensors skip value checks) reads nothing out of bounds."""
    s = _schedule(100, triton_device)
    mo, x0, noise, t = _batch(6, 7, s.num_steps, torch.float32, triton_device)
    t[2], t[4] = -1, s.num_steps
    x_t = torch.randn_like(x0)
    bad = torch.zeros(6, dtype=torch.bool, device=triton_device)
    bad[2] = bad[4] = True
    for out in (
        kd.q_sample(x0, noise, t, s),
        kd.diffusion_loss(mo, x0, x_t, noise, t, s)[:, None],
        kd.p_sample_step(mo, x_t, t, s, noise, 1.0),
        kd.ddim_step(mo, x_t, t, s, noise, 0.5),
    ):
        assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()


# ----------------------------------------------------------------------------------------
# reverse steps
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,M,C,respace", CASES)
def test_p_sample_step(triton_device, dtype, M, C, respace):
    s, mo, _, x_t, noise, t = _loss_case(M, C, respace, dtype, triton_device)
    k = kd.p_sample_step(mo, x_t, t, s, noise, 0.8)
    r = R.p_sample_step_reference(mo, x_t, t, s, noise, 0.8)
    f = R.p_sample_step_reference(mo.double(), x_t.double(), t, _truth_schedule(s), noise.double(), 0.8)
    _check("x_{t-1}", k, r, f, 2)


@pytest.mark.parametrize("eta,with_noise", [(0.0, False), (0.0, True), (0.5, True), (1.0, True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("respace", [None, 100])
def test_ddim_step(triton_device, eta, with_noise, dtype, respace):
    s, mo, _, x_t, noise, t = _loss_case(37, 588 if dtype == torch.float32 else 7, respace, dtype, triton_device)
    nz = noise if with_noise else None
    k = kd.ddim_step(mo, x_t, t, s, nz, eta)
    r = R.ddim_step_reference(mo, x_t, t, s, nz, eta)
    f = R.ddim_step_reference(
        mo.double(), x_t.double(), t, _truth_schedule(s), None if nz is None else nz.double(), eta
    )
    _check("x_prev", k, r, f, 2)


def test_steps_read_strided_views_and_update_in_place(triton_device):
    """model_out as a column slice of a wider buffer, x_t overwritten by its own step."""
    s, mo, _, x_t, noise, t = _loss_case(37, 7, 100, torch.float32, triton_device)
    wide = torch.randn(37, 20, device=triton_device)
    wide[:, 3:17] = mo
    view = wide[:, 3:17]
    expect = R.p_sample_step_reference(mo, x_t, t, s, noise, 1.0)
    torch.testing.assert_close(kd.p_sample_step(view, x_t, t, s, noise, 1.0), expect, rtol=1e-6, atol=1e-6)
    x = x_t.clone()
    kd.p_sample_step_into(x, view, x, t, s, noise, 1.0)
    torch.testing.assert_close(x, expect, rtol=1e-6, atol=1e-6)


def test_pairing_rule(monkeypatch):
    """Pairs only where rows are 8 bytes off alignment and the tile gives a thread 16 bytes."""
    rows = lambda dtype, C, M=8: (torch.zeros(M, C, dtype=dtype),)  # noqa: E731
    assert kd._pairable("stream", 588, rows(BF16, 588))  # 16 x 128 over 4 warps: 16 elements a thread
    assert not kd._pairable("stream", 588, rows(F32, 588))  # 2352-byte rows: aligned already
    assert not kd._pairable("stream", 588, rows(BF16, 588, M=1))
    assert not kd._pairable("stream", 588, (torch.zeros(8, 600, dtype=BF16)[:, :588],))  # not row-contiguous
    assert not kd._pairable("loss_fwd", 588, rows(BF16, 588))  # 4 x 128 over 4 warps: 8 bytes a thread
    monkeypatch.setitem(kd.TUNE, "loss_fwd", (4, 2))
    assert kd._pairable("loss_fwd", 588, rows(BF16, 588))
    assert kd._pairable("step", 6, rows(F32, 6))  # 24-byte fp32 rows pair as well


@pytest.mark.parametrize("dtype,M,C", [(BF16, 37, 588), (F16, 6, 12), (F32, 9, 6)])
def test_paired_row_tiling_is_bit_identical_to_row_tiles(triton_device, monkeypatch, dtype, M, C):
    """Where a row is 8 bytes off 16-byte alignment (C * itemsize = 8 mod 16) the kernels tile row
    pairs; every element-wise output equals the row-tiled kernels' bit for bit (odd M: the last
    row goes through the row kernel), in place (the sampler's x <- step(x)) too."""
    s, mo, x0, x_t, noise, t = _loss_case(M, C, 100, dtype, triton_device)
    g = torch.randn(M, C, device=triton_device).to(dtype)
    monkeypatch.setitem(kd.TUNE, "loss_fwd", (16, 2))  # a tile that pairs (16 bytes a thread at these C)
    launches = []
    real = kd._segments
    monkeypatch.setattr(kd, "_segments", lambda m, paired: launches.append(paired) or real(m, paired))

    def run(pair_rows):
        monkeypatch.setattr(kd, "PAIR_ROWS", pair_rows)
        x0_ = x0.clone().requires_grad_(True)
        noise_ = noise.clone().requires_grad_(True)
        xq = kd.q_sample(x0_, noise_, t, s)
        dx0, dnoise = torch.autograd.grad(xq, (x0_, noise_), g)
        in_place = x_t.clone()
        kd.p_sample_step_into(in_place, mo, in_place, t, s, noise, 0.7)
        mo_ = mo.clone().requires_grad_(True)
        loss = kd.diffusion_loss(mo_, x0, x_t, noise, t, s)
        (dmo,) = torch.autograd.grad(loss, mo_, torch.linspace(0.5, 1.5, M, device=loss.device))
        return loss.detach(), (xq.detach(), dx0, dnoise, kd.p_sample_step(mo, x_t, t, s, noise, 0.7), in_place,
                               kd.ddim_step(mo, x_t, t, s, noise, 0.6), kd.ddim_step(mo, x_t, t, s, None, 0.0), dmo)

    loss_rows, rows = run(False)
    assert launches and not any(launches)
    launches.clear()
    loss_pairs, pairs = run(True)
    assert launches and all(launches)
    names = ["q_sample", "dx0", "dnoise", "p_sample", "p_sample in place", "ddim", "ddim eta 0", "loss d model_out"]
    for name, a, b in zip(names, rows, pairs):
        assert torch.equal(a, b), name
    # The loss sums each row in fp32 chunks, then in fp64: pairs cut a row's second half into
    # other chunks, so the two tilings round differently, within a few fp32 ulps of the sum.
    torch.testing.assert_close(loss_pairs, loss_rows, rtol=4e-7, atol=0)


def test_steps_under_autograd_are_declined(triton_device, monkeypatch):
    s, mo, _, x_t, noise, t = _loss_case(5, 7, 100, torch.float32, triton_device)
    m = mo.clone().requires_grad_()
    assert "autograd" in kd.p_sample_step.unsupported(m, x_t, t, s, noise, 1.0)
    assert "autograd" in kd.ddim_step.unsupported(m, x_t, t, s, noise, 0.5)
    with torch.no_grad():
        assert kd.p_sample_step.unsupported(m, x_t, t, s, noise, 1.0) is None
    with pytest.raises(ops.BackendUnavailableError, match="autograd"):
        ops.p_sample_step(m, x_t, t, s, noise, backend="triton")
    # auto with the Triton kernel first (as on a GPU): the reference runs, and gradients flow
    candidates = lambda op, device: iter([("triton", kd.p_sample_step), ("torch", R.p_sample_step_reference)])
    monkeypatch.setattr(_dispatch, "_candidates", candidates)
    ops.p_sample_step(m, x_t, t, s, noise).sum().backward()
    assert m.grad is not None and torch.isfinite(m.grad).all()


def test_float64_and_wide_rows_are_declined(triton_device):
    """The kernels are float32 machines: float64 (the reference's checking mode) goes to the
    reference under auto and is refused, with the reason, for an explicit backend="triton"."""
    s, mo, x0, x_t, noise, t = _loss_case(3, 7, None, torch.float64, triton_device)
    assert "float64" in kd.q_sample.unsupported(x0, noise, t, s)
    assert "float64" in kd.diffusion_loss.unsupported(mo, x0, x_t, noise, t, s)
    assert "float64" in kd.ddim_step.unsupported(mo, x_t, t, s, None, 0.0)
    assert "float64" in ks.p_sample_loop.unsupported(None, None, s, x_t, None, None, 1.0)
    assert "float64" in ks.ddim_sample_loop.unsupported(None, None, s, x_t.float(), noise[None], None, 0.5)
    assert ks.p_sample_loop.unsupported(None, None, s, x_t.float(), None, None, 1.0) is None
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        ops.q_sample(x0, noise, t, s, backend="triton")
    torch.testing.assert_close(ops.q_sample(x0, noise, t, s), R.q_sample_reference(x0, noise, t, s), rtol=0, atol=0)
    wide = torch.zeros(1, kd._MAX_ADALN_WIDTH + 1, device=triton_device)
    assert "16384" in kd.adaln_modulate.unsupported(wide, wide, wide, 1e-6)
    assert kd.adaln_modulate.unsupported(wide[:, :-1], wide[:, :-1], wide[:, :-1], 1e-6) is None


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
    y = kd.adaln_modulate(x, shift, scale, 1e-5)
    _, _, mean, rstd = y.grad_fn.saved_tensors
    x64 = x.detach().double()
    torch.testing.assert_close(mean.double(), x64.mean(1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rstd.double(), (x64.var(1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-6, atol=1e-7)
    assert mean.dtype == rstd.dtype == torch.float32


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


def test_p_sample_loop_matches_reference(triton_device):
    s, cond, x_T, step_noise = _sampler_case(triton_device)
    fn = _denoiser(7, triton_device)
    k = ks.p_sample_loop(fn, cond, s, x_T, step_noise, None, 0.9)
    r = R.p_sample_loop_reference(fn, cond, s, x_T, step_noise, None, 0.9)
    f = R.p_sample_loop_reference(
        lambda x, tm, c: fn(x, tm, c).double(), cond, _truth_schedule(s), x_T.double(), step_noise.double(), None, 0.9
    )
    _check("x_0", k, r, f, 2)
    torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_sample_loop_matches_reference(triton_device, eta):
    s, cond, x_T, step_noise = _sampler_case(triton_device)
    fn = _denoiser(7, triton_device)
    k = ks.ddim_sample_loop(fn, cond, s, x_T, step_noise, None, eta)
    r = R.ddim_sample_loop_reference(fn, cond, s, x_T, step_noise, None, eta)
    torch.testing.assert_close(k, r, rtol=1e-5, atol=1e-5)


def test_sampler_takes_the_reference_step_for_a_float64_denoiser(triton_device):
    # the denoiser's dtype shows only mid-loop, after dispatch chose the sampler
    s, cond, x_T, step_noise = _sampler_case(triton_device)
    fn = _denoiser(7, triton_device, torch.float64)
    k = ks.p_sample_loop(fn, cond, s, x_T, step_noise, None, 0.9)
    r = R.p_sample_loop_reference(fn, cond, s, x_T, step_noise, None, 0.9)
    assert k.dtype == torch.float32 and torch.equal(k, r)


def test_sampler_generator_draws_match_reference(triton_device):
    s, cond, x_T, _ = _sampler_case(triton_device)
    fn = _denoiser(7, triton_device)
    seed = lambda: torch.Generator(device=triton_device).manual_seed(11)
    k = ks.p_sample_loop(fn, cond, s, x_T, None, seed(), 1.0)
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
    loop = ks.p_sample_loop if kind == "p_sample" else ks.ddim_sample_loop
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
