"""Module forms of the diffusion-decoder ops of :mod:`invnext.ops.diffusion`.

Each holds its :class:`invnext.ops.DiffusionSchedule` (not in the state dict: it follows from
how it was made) and uses a copy on the inputs' device, made once per device.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from invnext import ops

from ._base import FusedOp


class _Scheduled(FusedOp):
    def __init__(self, schedule: ops.DiffusionSchedule, backend: str):
        super().__init__(backend)
        if not isinstance(schedule, ops.DiffusionSchedule):
            raise TypeError(
                f"{type(self).__name__}: schedule must be an invnext.ops.DiffusionSchedule "
                f"(invnext.ops.make_schedule), got {type(schedule).__name__}"
            )
        self.schedule = schedule
        self._moved: dict[str, ops.DiffusionSchedule] = {}

    def schedule_on(self, device: torch.device) -> ops.DiffusionSchedule:
        key = str(device)
        if key not in self._moved:
            self._moved[key] = self.schedule.to(device)
        return self._moved[key]

    def _settings(self) -> dict:
        return {"num_steps": self.schedule.num_steps}


class QSample(_Scheduled):
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``: forward ``(x0 [M, C], noise [M, C],
    t int64[M]) -> x_t [M, C]``."""

    op = "q_sample"

    def __init__(self, schedule: ops.DiffusionSchedule, *, backend: str = "auto"):
        super().__init__(schedule, backend)

    def forward(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ops.q_sample(x0, noise, t, self.schedule_on(x0.device), backend=self.backend)


class DiffusionLoss(_Scheduled):
    """eps MSE + the variational bound with learned variance (improved DDPM): forward
    ``(model_out [M, 2C], x0, x_t, noise [M, C], t int64[M])`` -> the loss (``reduction``)."""

    op = "diffusion_loss"

    def __init__(self, schedule: ops.DiffusionSchedule, *, reduction: str = "mean", backend: str = "auto"):
        super().__init__(schedule, backend)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"DiffusionLoss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction

    def forward(
        self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        schedule = self.schedule_on(model_out.device)
        return ops.diffusion_loss(
            model_out, x0, x_t, noise, t, schedule, reduction=self.reduction, backend=self.backend
        )

    def _settings(self) -> dict:
        return {**super()._settings(), "reduction": self.reduction}


class PSampleStep(_Scheduled):
    """One ancestral reverse step: forward ``(model_out [M, 2C], x_t [M, C], t int64[M],
    noise [M, C]) -> x_{t-1}``."""

    op = "p_sample_step"

    def __init__(self, schedule: ops.DiffusionSchedule, *, temperature: float = 1.0, backend: str = "auto"):
        super().__init__(schedule, backend)
        self.temperature = temperature

    def forward(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        schedule = self.schedule_on(x_t.device)
        return ops.p_sample_step(
            model_out, x_t, t, schedule, noise, temperature=self.temperature, backend=self.backend
        )  # fmt: skip

    def _settings(self) -> dict:
        return {**super()._settings(), "temperature": self.temperature}


class DDIMStep(_Scheduled):
    """One DDIM step: forward ``(model_out [M, 2C], x_t [M, C], t int64[M], noise or None) -> x_{t-1}``."""

    op = "ddim_step"

    def __init__(self, schedule: ops.DiffusionSchedule, *, eta: float = 0.0, backend: str = "auto"):
        super().__init__(schedule, backend)
        self.eta = eta

    def forward(
        self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        schedule = self.schedule_on(x_t.device)
        return ops.ddim_step(model_out, x_t, t, schedule, noise, eta=self.eta, backend=self.backend)

    def _settings(self) -> dict:
        return {**super()._settings(), "eta": self.eta}


class _SampleLoop(_Scheduled):
    """A reverse sampler over every step of the schedule around a denoiser ``(x_t, t, cond) -> [M, 2C]``
    (an ``nn.Module`` is registered as a submodule; a model that samples with its own ``forward``
    passes a bound method, which is not): forward ``(cond, noise=None, step_noise=None,
    generator=None) -> x_0 [M, C]``, no grad. ``coef`` names the op's noise keyword. Keywords
    ``schedule`` and ``coef`` replace the held ones for one call (a respacing chosen per call)."""

    coef: str

    def __init__(
        self, denoise_fn: Callable, schedule: ops.DiffusionSchedule, channels: int, value: float, backend: str
    ):
        super().__init__(schedule, backend)
        if not callable(denoise_fn):
            raise TypeError(f"{type(self).__name__}: denoise_fn must be callable, got {type(denoise_fn).__name__}")
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f"{type(self).__name__}: channels must be an int >= 1, got {channels!r}")
        self.denoise_fn = denoise_fn
        self.channels = channels
        setattr(self, self.coef, value)

    def forward(self, cond, noise=None, step_noise=None, generator=None, *, schedule=None, **coef) -> torch.Tensor:
        ref = noise if noise is not None else cond
        if not isinstance(ref, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: give noise, or cond as a tensor (it fixes M and the device)")
        if set(coef) - {self.coef}:
            raise TypeError(f"{type(self).__name__}: unexpected keyword(s) {sorted(set(coef) - {self.coef})}")
        value = coef.get(self.coef)
        return getattr(ops, self.op)(
            self.denoise_fn, cond, self.schedule_on(ref.device) if schedule is None else schedule,
            channels=self.channels, noise=noise, step_noise=step_noise, generator=generator, backend=self.backend,
            **{self.coef: getattr(self, self.coef) if value is None else value},
        )  # fmt: skip

    def _settings(self) -> dict:
        return {**super()._settings(), "channels": self.channels, self.coef: getattr(self, self.coef)}


class PSampleLoop(_SampleLoop):
    """Ancestral sampling ``x_T -> x_0`` (:func:`invnext.ops.p_sample_loop`); ``temperature``
    scales every step's noise."""

    op = "p_sample_loop"
    coef = "temperature"

    def __init__(
        self, denoise_fn: Callable, schedule: ops.DiffusionSchedule, channels: int, *, temperature: float = 1.0,
        backend: str = "auto",
    ):  # fmt: skip
        super().__init__(denoise_fn, schedule, channels, temperature, backend)


class DDIMSampleLoop(_SampleLoop):
    """DDIM sampling ``x_T -> x_0`` (:func:`invnext.ops.ddim_sample_loop`); ``eta = 0`` is deterministic."""

    op = "ddim_sample_loop"
    coef = "eta"

    def __init__(
        self, denoise_fn: Callable, schedule: ops.DiffusionSchedule, channels: int, *, eta: float = 0.0,
        backend: str = "auto",
    ):  # fmt: skip
        super().__init__(denoise_fn, schedule, channels, eta, backend)


class AdaLNModulate(FusedOp):
    """``LayerNorm(x, no affine, eps) * (1 + scale) + shift`` over the last dim: forward
    ``(x [..., W], shift, scale broadcastable to x) -> [..., W]``."""

    op = "adaln_modulate"

    def __init__(self, eps: float = 1e-6, *, backend: str = "auto"):
        super().__init__(backend)
        self.eps = eps

    def forward(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return ops.adaln_modulate(x, shift, scale, eps=self.eps, backend=self.backend)

    def _settings(self) -> dict:
        return {"eps": self.eps}
