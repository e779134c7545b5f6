"""Triton implementations of the diffusion-decoder ops of :mod:`invnext.ops.diffusion`.

Each ``<op>_triton`` takes the canonical arguments of ``docs/ops_contract.md`` (the public op has
validated them) and computes what the pure-PyTorch reference computes: fp32 math on fp32 /
bf16 / fp16 inputs, float32 tables read per row at ``t``, outputs in the reference's dtypes.

    q_sample_triton(x0[M,C], noise[M,C], t int64[M], schedule)                       -> x_t[M,C]   (x0's dtype)
    diffusion_loss_triton(model_out[M,2C], x0, x_t, noise, t, schedule)              -> float32[M]
    p_sample_step_triton(model_out[M,2C], x_t[M,C], t, schedule, noise, temperature) -> x_{t-1}[M,C] (x_t's dtype)
    ddim_step_triton(model_out[M,2C], x_t[M,C], t, schedule, noise or None, eta)     -> x_prev[M,C]  (x_t's dtype)
    adaln_modulate_triton(x[M,W], shift[M,W], scale[M,W], eps)                       -> [M,W]        (x's dtype)

Kernels live in ``_diffusion_steps.py`` (element-wise), ``_diffusion_loss.py`` and
``_diffusion_adaln.py``. Each launch is a ``torch.library`` custom op
(``invnext::<op>_triton_fwd`` / ``_bwd``, docs/ops_contract.md) with a fake and a registered
autograd formula, so ``torch.compile`` keeps it as one node; the schedule reaches the ops as
its float32 tables. Per op:
- ``q_sample``: backward scales the incoming gradient by the same per-row coefficients.
- ``diffusion_loss``: differentiable w.r.t. ``model_out`` only (as the reference, whose
  ``x0``, ``x_t``, ``noise`` are detached targets); the backward kernel recomputes every
  term from the saved inputs, nothing else is stored.
- ``adaln_modulate``: saves ``mean``/``rstd`` (fp32 [M]); returns full ``[M, W]`` gradients
  for ``shift`` and ``scale``. When the public op passed stride-0 (broadcast) views, autograd's
  expand/reshape backward sums those over the broadcast rows; ``dshift`` is ``dy`` itself
  (no kernel, no copy when the dtypes agree).
- ``p_sample_step`` / ``ddim_step`` are sampling steps: one forward op, no backward. If autograd
  is recording and an input requires grad they decline (``unsupported``), so under ``auto`` a
  caller who differentiates through a step still gets gradients, from the reference.

Float64 inputs (the checking mode of the reference: float64 tables and math) are declined the
same way; the kernels are float32 machines. Arguments may be strided views (``model_out``
halves are read in place; ``shift``/``scale`` may have row stride 0); nothing is copied.
A ``t`` outside ``[0, S)`` turns its row into NaN and reads no memory out of bounds.
"""

from __future__ import annotations

import contextlib

import torch
import triton
from torch import Tensor

from invnext.common.diffusion_schedule import DiffusionSchedule
from invnext.common.registry import implements

from . import _diffusion_adaln as _ka
from . import _diffusion_loss as _kl
from . import _diffusion_steps as _ks
from ._diffusion_common import TORCH_TO_TL, accurate, col_block, row_block, stride1, strides2

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_ADALN_WIDTH = 16384  # whole rows live in registers; wider rows are declined
# Tile shapes: (rows, warps) per kernel family, from the rules in ``_tile``; ``TUNE`` overrides
# them (``--sweep`` of ``benchmarks/bench_q_sample.py``, ``bench_p_sample_step.py`` and
# ``bench_diffusion_loss.py`` times the alternatives).
TUNE: dict[str, tuple[int, int]] = {}


def _kernel_ok(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.dtype in _KERNEL_DTYPES for t in tensors)


def _dtype_reason(*tensors: torch.Tensor | None) -> str | None:
    if _kernel_ok(*tensors):
        return None
    bad = next(t.dtype for t in tensors if t is not None and t.dtype not in _KERNEL_DTYPES)
    return f"the Triton kernels take float32/bfloat16/float16, not {str(bad).replace('torch.', '')}"


def _on(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _tracks_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _tables(schedule: DiffusionSchedule, *names: str) -> list[torch.Tensor]:
    return [getattr(schedule, n) for n in names]


_POSTERIOR = (
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance_clipped",
    "log_betas",
)


def _tile(kind: str, C: int) -> tuple[int, int, int]:
    """(rows, cols, warps) of a program tile, 128 columns (640 lanes for C = 588).

    Defaults from the diffusion benchmarks' ``--sweep`` on an H200 (bf16, 52800 x 588): the streaming
    kernels (``stream``: q_sample, ddim; ``step``: p_sample) are best at 16 rows x 4 warps
    (32 rows: -5%); the exp-heavy loss kernels at 4 (forward, per chunk) and 8 (backward)
    rows; 16 rows ran 50% and 20% slower there (register pressure of the exp/NLL math).
    """
    bc = col_block(C)
    if kind in TUNE:
        rows, warps = TUNE[kind]
        return rows, bc, warps
    elems = {"stream": 2048, "step": 2048, "loss_fwd": 512, "loss_bwd": 1024}[kind]
    return row_block(bc, elems), bc, 4


def _grid2(kind: str, M: int, C: int) -> tuple[tuple[int, int], int, int, int]:
    bm, bc, warps = _tile(kind, C)
    return (triton.cdiv(M, bm), triton.cdiv(C, bc)), bm, bc, warps


# Paired-row tiling of the streaming kernels (``_diffusion_steps``): on where it aligns rows to
# 16 bytes. Tests switch it off to compare both tilings bit for bit; bench_q_sample and
# bench_p_sample_step time both.
PAIR_ROWS = True


def _pairable(kind: str, C: int, rows: tuple[Tensor, ...], model_out: Tensor | None = None) -> bool:
    """Whether kernel family ``kind`` runs on row pairs: every ``[M, C]`` operand row-contiguous
    (``model_out`` ``[M, 2C]`` too), two rows or more, some operand's rows 8 bytes off 16-byte
    alignment (otherwise row tiles are aligned already), and a tile that gives each thread 16
    contiguous bytes. Without the last, pairs buy no wider access and only cost registers (the
    default loss-forward tile, 4 x 128 over 4 warps: 4 elements a thread; on sm_90 pairing it
    went from 80 to 105 registers, 24 to 16 resident warps, with the same 8-byte loads)."""
    if not PAIR_ROWS or rows[0].shape[0] < 2:
        return False
    if any(x.stride() != (C, 1) for x in rows) or (model_out is not None and model_out.stride() != (2 * C, 1)):
        return False
    bm, bc, warps = _tile(kind, 2 * C)
    per_thread = bm * bc // (32 * warps)
    return any((C * x.element_size()) % 16 == 8 and per_thread * x.element_size() >= 16 for x in rows)


def _segments(M: int, paired: bool) -> list[tuple[slice, int, bool]]:
    """Launches covering M rows: ``(rows, count, paired)``, count = rows or row pairs; an odd
    M's last row goes through the row kernel."""
    if not paired:
        return [(slice(0, M), M, False)]
    segs = [(slice(0, M - M % 2), M // 2, True)]
    if M % 2:
        segs.append((slice(M - 1, M), 1, False))
    return segs


def _o_s0(out: Tensor) -> int:
    return out.stride(0) if out.shape[0] > 1 else 0


# ----------------------------------------------------------------------------------------
# launchers (the real implementations of the custom ops below)
# ----------------------------------------------------------------------------------------
def _q_sample_forward(x0, noise, t, sqrt_ac, sqrt_1m_ac):
    M, C = x0.shape
    out = torch.empty((M, C), dtype=x0.dtype, device=x0.device)
    if M == 0 or C == 0:
        return out
    with _on(x0.device):
        for r, n, paired in _segments(M, _pairable("stream", C, (x0, noise, out))):
            grid, bm, bc, warps = _grid2("stream", n, 2 * C if paired else C)
            _ks.q_sample_fwd_kernel[grid](
                out[r], x0[r], noise[r], t[r], sqrt_ac, sqrt_1m_ac,
                n, sqrt_ac.shape[0], C, *strides2(x0[r]), *strides2(noise[r]), stride1(t[r]),
                TORCH_TO_TL[x0.dtype], bm, bc, paired, num_warps=warps,
            )  # fmt: skip
    return out


def _q_sample_backward(g, t, sqrt_ac, sqrt_1m_ac, x0_dtype, noise_dtype, need_x0, need_noise):
    """(dx0, dnoise), each ``[M, C]`` or ``[0, C]`` when not needed."""
    M, C = g.shape
    dx0 = torch.empty((M if need_x0 else 0, C), dtype=x0_dtype, device=g.device)
    dnoise = torch.empty((M if need_noise else 0, C), dtype=noise_dtype, device=g.device)
    if M and C and (need_x0 or need_noise):
        dx0_, dnoise_ = (dx0 if need_x0 else g), (dnoise if need_noise else g)
        with _on(g.device):
            for r, n, paired in _segments(M, _pairable("stream", C, (g, dx0_, dnoise_))):
                grid, bm, bc, warps = _grid2("stream", n, 2 * C if paired else C)
                _ks.q_sample_bwd_kernel[grid](
                    dx0_[r], dnoise_[r], g[r], t[r], sqrt_ac, sqrt_1m_ac,
                    n, sqrt_ac.shape[0], C, *strides2(g[r]), stride1(t[r]), need_x0, need_noise,
                    TORCH_TO_TL[x0_dtype], TORCH_TO_TL[noise_dtype], bm, bc, paired, num_warps=warps,
                )  # fmt: skip
    return dx0, dnoise


def _loss_args(model_out, x0, x_t, noise, t, posterior, count):
    return (
        model_out, x0, x_t, noise, t, *posterior,
        count, posterior[0].shape[0], x_t.shape[1],
        *strides2(model_out), *strides2(x0), *strides2(x_t), *strides2(noise), stride1(t),
    )  # fmt: skip


def _loss_forward(model_out, x0, x_t, noise, t, posterior):
    M, C = x_t.shape
    loss = torch.empty(M, dtype=torch.float32, device=x_t.device)
    if M == 0:
        return loss
    if C == 0:
        return loss.fill_(float("nan"))  # the reference's mean over no channels
    bm, bc, warps = _tile("loss_fwd", C)
    with _on(x_t.device):
        for r, n, paired in _segments(M, _pairable("loss_fwd", C, (x0, x_t, noise), model_out)):
            _kl.loss_fwd_kernel[(triton.cdiv(n, bm),)](
                loss[r], *_loss_args(model_out[r], x0[r], x_t[r], noise[r], t[r], posterior, n), accurate(), bm, bc,
                paired, 2 * C if paired else C, num_warps=warps,
            )  # fmt: skip
    return loss


def _loss_backward(g, model_out, x0, x_t, noise, t, posterior):
    M, C = x_t.shape
    dmo = torch.empty((M, 2 * C), dtype=model_out.dtype, device=model_out.device)
    if M and C:
        with _on(x_t.device):
            for r, n, paired in _segments(M, _pairable("loss_bwd", C, (x0, x_t, noise), model_out)):
                grid, bm, bc, warps = _grid2("loss_bwd", n, 2 * C if paired else C)
                _kl.loss_bwd_kernel[grid](
                    dmo[r], g[r], *_loss_args(model_out[r], x0[r], x_t[r], noise[r], t[r], posterior, n), stride1(g[r]),
                    TORCH_TO_TL[model_out.dtype], accurate(), bm, bc, paired, num_warps=warps,
                )  # fmt: skip
    return dmo


def _p_sample_launch(out, model_out, x_t, t, posterior, noise, temperature):
    M, C = x_t.shape
    if M and C:
        with _on(x_t.device):
            for r, n, paired in _segments(M, _pairable("step", C, (x_t, noise, out), model_out)):
                grid, bm, bc, warps = _grid2("step", n, 2 * C if paired else C)
                _ks.p_sample_kernel[grid](
                    out[r], model_out[r], x_t[r], noise[r], t[r], *posterior,
                    n, posterior[0].shape[0], float(temperature), C,
                    *strides2(model_out[r]), *strides2(x_t[r]), *strides2(noise[r]), stride1(t[r]), _o_s0(out[r]),
                    TORCH_TO_TL[out.dtype], accurate(), bm, bc, paired, num_warps=warps,
                )  # fmt: skip
    return out


def _ddim_launch(out, model_out, x_t, t, tables, noise, eta):
    M, C = x_t.shape
    # The reference adds noise only when it is given and eta != 0.
    has_noise = noise is not None and eta != 0.0
    if M and C:
        nz = noise if has_noise else x_t
        with _on(x_t.device):
            for r, n, paired in _segments(M, _pairable("stream", C, (x_t, nz, out), model_out)):
                grid, bm, bc, warps = _grid2("stream", n, 2 * C if paired else C)
                _ks.ddim_kernel[grid](
                    out[r], model_out[r], x_t[r], nz[r], t[r], *tables,
                    n, tables[0].shape[0], float(eta), C,
                    *strides2(model_out[r]), *strides2(x_t[r]), *strides2(nz[r]), stride1(t[r]), _o_s0(out[r]),
                    has_noise, TORCH_TO_TL[out.dtype], accurate(), bm, bc, paired, num_warps=warps,
                )  # fmt: skip
    return out


def _adaln_shape(W: int) -> tuple[int, int, int]:
    bw = triton.next_power_of_2(max(W, 1))
    bm = max(1, min(16, 4096 // bw))
    return bw, bm, (4 if bw * bm <= 2048 else 8)


def _adaln_forward(x, shift, scale, eps):
    """(y [M, W] x's dtype, mean fp32[M], rstd fp32[M])."""
    M, W = x.shape
    y = torch.empty((M, W), dtype=x.dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M and W:
        bw, bm, warps = _adaln_shape(W)
        with _on(x.device):
            _ka.adaln_fwd_kernel[(triton.cdiv(M, bm),)](
                y, mean, rstd, x, shift, scale, M, float(eps), W,
                *strides2(x), *strides2(shift), *strides2(scale),
                TORCH_TO_TL[x.dtype], bm, bw, num_warps=warps,
            )  # fmt: skip
    return y, mean, rstd


def _adaln_backward(dy, x, scale, mean, rstd, need_dx, need_dscale):
    """(dx, dscale), each ``[M, W]`` or ``[0, W]`` when not needed; dshift is ``dy`` (no kernel)."""
    M, W = x.shape
    dx = torch.empty((M if need_dx else 0, W), dtype=x.dtype, device=x.device)
    dscale = torch.empty((M if need_dscale else 0, W), dtype=scale.dtype, device=x.device)
    if M and W and (need_dx or need_dscale):
        bw, bm, warps = _adaln_shape(W)
        with _on(x.device):
            _ka.adaln_bwd_kernel[(triton.cdiv(M, bm),)](
                dx if need_dx else dy, dscale if need_dscale else dy, dy, x, scale, mean, rstd, M, W,
                *strides2(dy), *strides2(x), *strides2(scale), need_dx, need_dscale,
                TORCH_TO_TL[x.dtype], TORCH_TO_TL[scale.dtype], bm, bw, num_warps=warps,
            )  # fmt: skip
    return dx, dscale


# ----------------------------------------------------------------------------------------
# torch.library ops (docs/ops_contract.md, "Custom ops"): the schedule is passed as its
# tables (``S`` = their length), every output size is an input's, and the fakes allocate
# what the launchers allocate (contiguous, same dtypes).
# ----------------------------------------------------------------------------------------
_OP_NAMES = (
    "q_sample_triton_fwd", "q_sample_triton_bwd", "diffusion_loss_triton_fwd", "diffusion_loss_triton_bwd",
    "p_sample_step_triton_fwd", "ddim_step_triton_fwd", "adaln_modulate_triton_fwd", "adaln_modulate_triton_bwd",
)  # fmt: skip


def _define_ops():
    ns = torch.ops.invnext
    if all(hasattr(ns, n) for n in _OP_NAMES):
        return tuple(getattr(ns, n) for n in _OP_NAMES)  # a second import of this module
    op = lambda name: torch.library.custom_op(f"invnext::{name}", mutates_args=())

    # ---- q_sample: x_t = a[t] x0 + s[t] noise; dx0 = a[t] g, dnoise = s[t] g
    @op("q_sample_triton_fwd")
    def q_fwd(x0: Tensor, noise: Tensor, t: Tensor, sqrt_ac: Tensor, sqrt_1m_ac: Tensor) -> Tensor:
        return _q_sample_forward(x0, noise, t, sqrt_ac, sqrt_1m_ac)

    q_fwd.register_fake(lambda x0, noise, t, a, s: x0.new_empty(x0.shape))

    @op("q_sample_triton_bwd")
    def q_bwd(
        g: Tensor, t: Tensor, sqrt_ac: Tensor, sqrt_1m_ac: Tensor, x0_dtype: torch.dtype,
        noise_dtype: torch.dtype, need_x0: bool, need_noise: bool,
    ) -> tuple[Tensor, Tensor]:  # fmt: skip
        return _q_sample_backward(g, t, sqrt_ac, sqrt_1m_ac, x0_dtype, noise_dtype, need_x0, need_noise)

    @q_bwd.register_fake
    def _(g, t, a, s, x0_dtype, noise_dtype, need_x0, need_noise):
        M, C = g.shape
        return g.new_empty((M if need_x0 else 0, C), dtype=x0_dtype), g.new_empty(
            (M if need_noise else 0, C), dtype=noise_dtype
        )

    def q_setup(ctx, inputs, output):
        x0, noise, t, a, s = inputs
        ctx.save_for_backward(t, a, s)
        ctx.dtypes = (x0.dtype, noise.dtype)

    def q_grad(ctx, g):
        t, a, s = ctx.saved_tensors
        need_x0, need_noise = ctx.needs_input_grad[:2]
        if not (need_x0 or need_noise):
            return (None,) * 5
        dx0, dnoise = q_bwd(g, t, a, s, *ctx.dtypes, need_x0, need_noise)
        return (dx0 if need_x0 else None), (dnoise if need_noise else None), None, None, None

    q_fwd.register_autograd(q_grad, setup_context=q_setup)

    # ---- diffusion_loss: differentiable in model_out only (x0, x_t, noise are targets)
    @op("diffusion_loss_triton_fwd")
    def loss_fwd(
        model_out: Tensor, x0: Tensor, x_t: Tensor, noise: Tensor, t: Tensor, posterior: list[Tensor]
    ) -> Tensor:
        return _loss_forward(model_out, x0, x_t, noise, t, posterior)

    loss_fwd.register_fake(lambda mo, x0, x_t, noise, t, tables: x_t.new_empty(x_t.shape[0], dtype=torch.float32))

    @op("diffusion_loss_triton_bwd")
    def loss_bwd(
        g: Tensor, model_out: Tensor, x0: Tensor, x_t: Tensor, noise: Tensor, t: Tensor, posterior: list[Tensor]
    ) -> Tensor:
        return _loss_backward(g, model_out, x0, x_t, noise, t, posterior)

    loss_bwd.register_fake(lambda g, mo, x0, x_t, noise, t, tables: mo.new_empty((x_t.shape[0], 2 * x_t.shape[1])))

    def loss_setup(ctx, inputs, output):
        model_out, x0, x_t, noise, t, posterior = inputs
        ctx.save_for_backward(model_out, x0, x_t, noise, t, *posterior)

    def loss_grad(ctx, g):
        model_out, x0, x_t, noise, t, *posterior = ctx.saved_tensors
        no_tables = [None] * len(posterior)  # a list input takes a list of gradients
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, no_tables
        return loss_bwd(g, model_out, x0, x_t, noise, t, posterior), None, None, None, None, no_tables

    loss_fwd.register_autograd(loss_grad, setup_context=loss_setup)

    # ---- sampling steps: forward only (under autograd the entries below are declined)
    @op("p_sample_step_triton_fwd")
    def p_fwd(
        model_out: Tensor, x_t: Tensor, t: Tensor, posterior: list[Tensor], noise: Tensor, temperature: float
    ) -> Tensor:
        out = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
        return _p_sample_launch(out, model_out, x_t, t, posterior, noise, temperature)

    p_fwd.register_fake(lambda mo, x_t, t, posterior, noise, temperature: x_t.new_empty(x_t.shape))

    @op("ddim_step_triton_fwd")
    def ddim_fwd(
        model_out: Tensor, x_t: Tensor, t: Tensor, tables: list[Tensor], noise: Tensor | None, eta: float
    ) -> Tensor:
        out = torch.empty(x_t.shape, dtype=x_t.dtype, device=x_t.device)
        return _ddim_launch(out, model_out, x_t, t, tables, noise, eta)

    ddim_fwd.register_fake(lambda mo, x_t, t, tables, noise, eta: x_t.new_empty(x_t.shape))

    # ---- adaln_modulate: saves mean/rstd (fp32 [M]); dshift = dy needs no kernel
    @op("adaln_modulate_triton_fwd")
    def ada_fwd(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return _adaln_forward(x, shift, scale, eps)

    @ada_fwd.register_fake
    def _(x, shift, scale, eps):
        M = x.shape[0]
        return x.new_empty(x.shape), x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)

    @op("adaln_modulate_triton_bwd")
    def ada_bwd(
        dy: Tensor, x: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor, need_dx: bool, need_dscale: bool
    ) -> tuple[Tensor, Tensor]:
        return _adaln_backward(dy, x, scale, mean, rstd, need_dx, need_dscale)

    @ada_bwd.register_fake
    def _(dy, x, scale, mean, rstd, need_dx, need_dscale):
        M, W = x.shape
        return x.new_empty((M if need_dx else 0, W)), scale.new_empty((M if need_dscale else 0, W))

    def ada_setup(ctx, inputs, output):
        x, shift, scale, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype
        ctx.mark_non_differentiable(mean, rstd)

    def ada_grad(ctx, dy, _dmean, _drstd):
        x, scale, mean, rstd = ctx.saved_tensors
        need_dx, need_dshift, need_dscale = ctx.needs_input_grad[:3]
        dx = dscale = None
        if need_dx or need_dscale:
            dx, dscale = ada_bwd(dy, x, scale, mean, rstd, need_dx, need_dscale)
        dshift = dy.to(ctx.shift_dtype) if need_dshift else None
        return (dx if need_dx else None), dshift, (dscale if need_dscale else None), None

    ada_fwd.register_autograd(ada_grad, setup_context=ada_setup)
    return q_fwd, q_bwd, loss_fwd, loss_bwd, p_fwd, ddim_fwd, ada_fwd, ada_bwd


(
    q_sample_triton_fwd,
    q_sample_triton_bwd,
    diffusion_loss_triton_fwd,
    diffusion_loss_triton_bwd,
    p_sample_step_triton_fwd,
    ddim_step_triton_fwd,
    adaln_modulate_triton_fwd,
    adaln_modulate_triton_bwd,
) = _define_ops()

_DDIM_TABLES = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "alphas_cumprod", "alphas_cumprod_prev")


# ----------------------------------------------------------------------------------------
# public entries (canonical signatures)
# ----------------------------------------------------------------------------------------
@implements("q_sample", "triton")
def q_sample_triton(
    x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, schedule: DiffusionSchedule
) -> torch.Tensor:
    """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; x0, noise ``[M, C]``, t ``int64[M]`` -> ``[M, C]`` x0's dtype."""
    return q_sample_triton_fwd(x0, noise, t, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod)


@implements("diffusion_loss", "triton")
def diffusion_loss_triton(
    model_out: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    schedule: DiffusionSchedule,
) -> torch.Tensor:
    """Per-row hybrid loss ``float32[M]`` (eps MSE + vb in bits); grads flow to ``model_out[M, 2C]`` only."""
    return diffusion_loss_triton_fwd(model_out, x0, x_t, noise, t, _tables(schedule, *_POSTERIOR))


def p_sample_step_triton_into(out, model_out, x_t, t, schedule, noise, temperature) -> torch.Tensor:
    """:func:`p_sample_step_triton` written into ``out`` (``[M, C]``, row-contiguous; may be ``x_t`` itself)."""
    return _p_sample_launch(out, model_out, x_t, t, _tables(schedule, *_POSTERIOR), noise, temperature)


@implements("p_sample_step", "triton")
def p_sample_step_triton(
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: DiffusionSchedule,
    noise: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """One ancestral step ``x_{t-1}[M, C]`` (x_t's dtype) from ``model_out[M, 2C] = [eps, v]``."""
    return p_sample_step_triton_fwd(model_out, x_t, t, _tables(schedule, *_POSTERIOR), noise, float(temperature))


def ddim_step_triton_into(out, model_out, x_t, t, schedule, noise, eta) -> torch.Tensor:
    """:func:`ddim_step_triton` written into ``out`` (``[M, C]``, row-contiguous; may be ``x_t`` itself)."""
    return _ddim_launch(out, model_out, x_t, t, _tables(schedule, *_DDIM_TABLES), noise, eta)


@implements("ddim_step", "triton")
def ddim_step_triton(
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    schedule: DiffusionSchedule,
    noise: torch.Tensor | None,
    eta: float,
) -> torch.Tensor:
    """One DDIM step ``x_prev[M, C]`` (x_t's dtype); ``noise`` is used only when given and ``eta != 0``."""
    return ddim_step_triton_fwd(model_out, x_t, t, _tables(schedule, *_DDIM_TABLES), noise, float(eta))


@implements("adaln_modulate", "triton")
def adaln_modulate_triton(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` over ``W``; x, shift, scale ``[M, W]`` (any strides) -> x's dtype."""
    y, _, _ = adaln_modulate_triton_fwd(x, shift, scale, float(eps))
    return y


# ----------------------------------------------------------------------------------------
# declines: inputs these kernels cannot take (dispatch then runs the reference under "auto"
# and raises BackendUnavailableError for an explicit backend="triton")
# ----------------------------------------------------------------------------------------
def _q_sample_unsupported(x0, noise, t, schedule) -> str | None:
    return _dtype_reason(x0, noise)


def _diffusion_loss_unsupported(model_out, x0, x_t, noise, t, schedule) -> str | None:
    return _dtype_reason(model_out, x0, x_t, noise)


def _step_unsupported(model_out, x_t, t, schedule, noise, coef) -> str | None:
    why = _dtype_reason(model_out, x_t, noise)
    if why is None and _tracks_grad(model_out, x_t, noise):
        why = "the Triton sampling steps have no backward, and autograd is recording an input that requires grad"
    return why


def _adaln_modulate_unsupported(x, shift, scale, eps) -> str | None:
    why = _dtype_reason(x, shift, scale)
    if why is None and x.shape[1] > _MAX_ADALN_WIDTH:
        why = f"rows of {x.shape[1]} exceed the kernel's {_MAX_ADALN_WIDTH} (a whole row lives in registers)"
    return why


q_sample_triton.unsupported = _q_sample_unsupported
diffusion_loss_triton.unsupported = _diffusion_loss_unsupported
p_sample_step_triton.unsupported = _step_unsupported
ddim_step_triton.unsupported = _step_unsupported
adaln_modulate_triton.unsupported = _adaln_modulate_unsupported
