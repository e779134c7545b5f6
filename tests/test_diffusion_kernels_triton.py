"""What every Triton diffusion-decoder kernel shares: finite results at the schedule's extremes,
unvalidated bad t confined to its row, the row-pair tiling (bit-identical to row tiles), and the
inputs the kernels decline.
"""
from __future__ import annotations

import pytest
import torch

from invnext import ops
from invnext.ops import _dispatch
from invnext.ops import diffusion as R

from diffusion_error_rule import BF16, DTYPES, F16, F32, MARKS, _batch, _loss_case, _schedule, kd, ks

pytestmark = MARKS


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
    x_t = kd.q_sample_triton(x0, noise, t, s)
    m = mo.clone().requires_grad_()
    loss = kd.diffusion_loss_triton(m, x0, x_t, noise, t, s)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(m.grad).all()
    assert torch.isfinite(kd.p_sample_step_triton(mo, x_t, t, s, noise, 1.0)).all()
    assert torch.isfinite(kd.ddim_step_triton(mo, x_t, t, s, noise, 1.0)).all()


def test_out_of_range_t_poisons_only_its_row(triton_device):
    """Unvalidated bad t (device tensors skip value checks) reads nothing out of bounds."""
    s = _schedule(100, triton_device)
    mo, x0, noise, t = _batch(6, 7, s.num_steps, torch.float32, triton_device)
    t[2], t[4] = -1, s.num_steps
    x_t = torch.randn_like(x0)
    bad = torch.zeros(6, dtype=torch.bool, device=triton_device)
    bad[2] = bad[4] = True
    for out in (
        kd.q_sample_triton(x0, noise, t, s),
        kd.diffusion_loss_triton(mo, x0, x_t, noise, t, s)[:, None],
        kd.p_sample_step_triton(mo, x_t, t, s, noise, 1.0),
        kd.ddim_step_triton(mo, x_t, t, s, noise, 0.5),
    ):
        assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()


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
        xq = kd.q_sample_triton(x0_, noise_, t, s)
        dx0, dnoise = torch.autograd.grad(xq, (x0_, noise_), g)
        in_place = x_t.clone()
        kd.p_sample_step_triton_into(in_place, mo, in_place, t, s, noise, 0.7)
        mo_ = mo.clone().requires_grad_(True)
        loss = kd.diffusion_loss_triton(mo_, x0, x_t, noise, t, s)
        (dmo,) = torch.autograd.grad(loss, mo_, torch.linspace(0.5, 1.5, M, device=loss.device))
        return loss.detach(), (xq.detach(), dx0, dnoise, kd.p_sample_step_triton(mo, x_t, t, s, noise, 0.7), in_place,
                               kd.ddim_step_triton(mo, x_t, t, s, noise, 0.6),
                               kd.ddim_step_triton(mo, x_t, t, s, None, 0.0), dmo)

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
    assert "autograd" in kd.p_sample_step_triton.unsupported(m, x_t, t, s, noise, 1.0)
    assert "autograd" in kd.ddim_step_triton.unsupported(m, x_t, t, s, noise, 0.5)
    with torch.no_grad():
        assert kd.p_sample_step_triton.unsupported(m, x_t, t, s, noise, 1.0) is None
    with pytest.raises(ops.BackendUnavailableError, match="autograd"):
        ops.p_sample_step(m, x_t, t, s, noise, backend="triton")
    # auto with the Triton kernel first (as on a GPU): the reference runs, and gradients flow
    candidates = lambda op, device: iter([("triton", kd.p_sample_step_triton), ("torch", R.p_sample_step_reference)])
    monkeypatch.setattr(_dispatch, "_candidates", candidates)
    ops.p_sample_step(m, x_t, t, s, noise).sum().backward()
    assert m.grad is not None and torch.isfinite(m.grad).all()


def test_float64_and_wide_rows_are_declined(triton_device):
    """The kernels are float32 machines: float64 (the reference's checking mode) goes to the
    reference under auto and is refused, with the reason, for an explicit backend="triton"."""
    s, mo, x0, x_t, noise, t = _loss_case(3, 7, None, torch.float64, triton_device)
    assert "float64" in kd.q_sample_triton.unsupported(x0, noise, t, s)
    assert "float64" in kd.diffusion_loss_triton.unsupported(mo, x0, x_t, noise, t, s)
    assert "float64" in kd.ddim_step_triton.unsupported(mo, x_t, t, s, None, 0.0)
    assert "float64" in ks.p_sample_loop_triton.unsupported(None, None, s, x_t, None, None, 1.0)
    assert "float64" in ks.ddim_sample_loop_triton.unsupported(None, None, s, x_t.float(), noise[None], None, 0.5)
    assert ks.p_sample_loop_triton.unsupported(None, None, s, x_t.float(), None, None, 1.0) is None
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        ops.q_sample(x0, noise, t, s, backend="triton")
    torch.testing.assert_close(ops.q_sample(x0, noise, t, s), R.q_sample_reference(x0, noise, t, s), rtol=0, atol=0)
    wide = torch.zeros(1, kd._MAX_ADALN_WIDTH + 1, device=triton_device)
    assert "16384" in kd.adaln_modulate_triton.unsupported(wide, wide, wide, 1e-6)
    assert kd.adaln_modulate_triton.unsupported(wide[:, :-1], wide[:, :-1], wide[:, :-1], 1e-6) is None
