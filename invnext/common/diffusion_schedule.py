"""Noise-schedule tables for the Stage-1 diffusion decoder (improved-DDPM, learned variance range).

Every table is computed in float64 on the host from the closed forms below, then stored in
float32 (what the kernels read per row) with the float64 originals kept beside them, so
float64 inputs run the whole computation in float64.

With ``f(u) = cos(((u + 0.008) / 1.008) * pi / 2) ** 2`` and ``N`` steps (cosine kind):

    beta_i      = min(1 - f((i + 1) / N) / f(i / N), 0.999)
    abar        = cumprod(1 - beta)                       abar_prev = [1, abar[:-1]]
    var_i       = beta_i (1 - abar_prev_i) / (1 - abar_i)   (var_0 = 0)
    logvar_clip = log([var_1, var_1, var_2, ..., var_{S-1}])
    coef1       = beta sqrt(abar_prev) / (1 - abar)        coef2 = (1 - abar_prev) sqrt(1 - beta) / (1 - abar)

Respacing keeps a sorted subset ``K`` of the N steps; the respaced chain has ``S = len(K)``
steps with ``abar'_j = abar[K_j]`` (taken as is, so it matches the full table exactly) and
``beta'_j = 1 - abar[K_j] / abar[K_{j-1}]`` (``abar[K_{-1}] = 1``); the other tables follow from
``beta'`` and ``abar'`` by the formulas above. ``timestep_map[j] = K_j`` is the original timestep
the denoiser is conditioned on at respaced step j.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from invnext.common.validate import check_alloc, check_device

# Tables indexed by the (respaced) step t, in the order of the dataclass fields.
TABLE_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "log_betas",
)

MAX_BETA = 0.999
SCHEDULE_KINDS = ("cosine", "linear")


@dataclass(frozen=True, eq=False)
class DiffusionSchedule:
    """Per-step tables of a (possibly respaced) Gaussian diffusion, on one device.

    Every table is ``float32[S]`` with ``S = num_steps`` (the respaced length); index ``t`` in
    ``[0, S)`` is what the ops take. ``timestep_map``: ``int64[S]``, respaced step -> original
    timestep (identity without respacing), the value the denoiser is conditioned on.
    Build with :func:`make_schedule`; ``tables64()`` gives the float64 originals.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    log_betas: torch.Tensor
    timestep_map: torch.Tensor
    num_steps: int
    _tables64: dict = field(repr=False)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def table(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``name``'s table: the float64 original for ``dtype=float64``, else the float32 one."""
        if dtype == torch.float64:
            return self._tables64[name]
        return getattr(self, name)

    def tables64(self) -> dict[str, torch.Tensor]:
        """The float64 tables (name -> ``float64[S]`` on this schedule's device)."""
        return dict(self._tables64)

    def to(self, device: torch.device | str) -> "DiffusionSchedule":
        device = torch.device(device)
        if device == self.device:
            return self
        moved = {name: getattr(self, name).to(device) for name in TABLE_NAMES}
        return replace(
            self,
            **moved,
            timestep_map=self.timestep_map.to(device),
            _tables64={k: v.to(device) for k, v in self._tables64.items()},
        )


def space_timesteps(num_steps: int, count: int) -> list[int]:
    """``count`` evenly spaced steps of ``range(num_steps)``, first and last included.

    Rule (that of improved-diffusion's ``space_timesteps(num_steps, [count])``): with
    ``stride = (num_steps - 1) / (count - 1)`` accumulated in float64 from 0, keep
    ``round(k * stride)`` for ``k = 0 .. count-1``, Python's round (half to even).
    ``count == 1`` keeps step 0. Example: ``space_timesteps(1000, 10) = [0, 111, 222, ..., 999]``.
    """
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"make_schedule: respace must be None, an int or a list of ints, got {count!r}")
    if not 1 <= count <= num_steps:
        raise ValueError(f"make_schedule: respace={count} must lie in [1, num_steps={num_steps}]")
    stride = 1.0 if count == 1 else (num_steps - 1) / (count - 1)
    kept, cur = [], 0.0
    # Accumulated (not k * stride) so that the kept set matches checkpoints sampled with
    # improved-diffusion's respacing bit for bit at .5 ties.
    for _ in range(count):
        kept.append(round(cur))
        cur += stride
    return kept


def _base_betas(num_steps: int, kind: str) -> torch.Tensor:
    if kind == "cosine":
        u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((u + 0.008) / 1.008 * (math.pi / 2)).square()
        return (1.0 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    if kind == "linear":
        # DDPM's 1e-4 .. 0.02 over 1000 steps, stretched so fewer steps reach the same abar.
        scale = 1000.0 / num_steps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
        if float(betas[-1]) >= 1.0:
            raise ValueError(f"make_schedule: kind='linear' needs num_steps > 20 (beta would reach 1), got {num_steps}")
        return betas
    raise ValueError(f"make_schedule: kind must be one of {SCHEDULE_KINDS}, got {kind!r}")


def _kept_steps(num_steps: int, respace: object) -> list[int] | None:
    if respace is None:
        return None
    if isinstance(respace, int) and not isinstance(respace, bool):
        return space_timesteps(num_steps, respace)
    if isinstance(respace, (list, tuple, range)):
        kept = list(respace)
        if not all(isinstance(k, int) and not isinstance(k, bool) for k in kept):
            raise TypeError(f"make_schedule: respace list must hold ints, got {respace!r}")
        if any(b <= a for a, b in zip(kept, kept[1:])):
            raise ValueError(f"make_schedule: respace list must be strictly increasing, got {kept}")
        if kept and (kept[0] < 0 or kept[-1] >= num_steps):
            raise ValueError(f"make_schedule: respace steps must lie in [0, {num_steps}), got {kept}")
        return kept
    raise TypeError(f"make_schedule: respace must be None, an int or a list of ints, got {type(respace).__name__}")


def _tables_from(betas: torch.Tensor, abar: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every table from ``beta`` and ``abar`` (float64[S], S >= 2)."""
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    one_m = 1.0 - abar
    var = betas * (1.0 - abar_prev) / one_m
    return {
        "betas": betas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar.sqrt(),
        "sqrt_one_minus_alphas_cumprod": one_m.sqrt(),
        "sqrt_recip_alphas_cumprod": (1.0 / abar).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
        "posterior_variance": var,
        # var_0 = 0: its log would be -inf, so step 0 borrows step 1's variance.
        "posterior_log_variance_clipped": torch.cat([var[1:2], var[1:]]).log(),
        "posterior_mean_coef1": betas * abar_prev.sqrt() / one_m,
        "posterior_mean_coef2": (1.0 - abar_prev) * (1.0 - betas).sqrt() / one_m,
        "log_betas": betas.log(),
    }


def make_schedule(
    num_steps: int = 1000,
    kind: str = "cosine",
    respace: int | Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> DiffusionSchedule:
    """Build the tables of an ``num_steps``-step diffusion, optionally respaced.

    Args:
        num_steps: length of the training chain (>= 2).
        kind: ``"cosine"`` (improved-DDPM, beta clipped at 0.999) or ``"linear"`` (DDPM's
            1e-4 .. 0.02, scaled by 1000 / num_steps).
        respace: ``None`` (all steps), an int count (:func:`space_timesteps`), or a strictly
            increasing list of kept steps in ``[0, num_steps)``. At least 2 steps must remain
            (step 0's clipped log-variance is borrowed from step 1).
        device: where the tables live (default CPU); must exist here.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise TypeError(f"make_schedule: num_steps must be an int, got {num_steps!r}")
    if num_steps < 2:
        raise ValueError(f"make_schedule: num_steps must be >= 2, got {num_steps}")
    if not isinstance(kind, str):
        raise TypeError(f"make_schedule: kind must be a str, got {type(kind).__name__}")
    dev = check_device("make_schedule", device)
    # The full chain is built in float64 on the host: at least four such columns (u, f, beta, abar).
    check_alloc("make_schedule", f"num_steps={num_steps}", 4 * 8 * num_steps, torch.device("cpu"))
    betas = _base_betas(num_steps, kind)
    abar = torch.cumprod(1.0 - betas, 0)
    kept = _kept_steps(num_steps, respace)
    if kept is None:
        kept = list(range(num_steps))
    else:
        if len(kept) < 2:
            raise ValueError(f"make_schedule: respace must keep at least 2 steps, got {kept}")
        abar = abar[kept]
        betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    t64 = _tables_from(betas, abar)
    t64 = {k: v.to(dev) for k, v in t64.items()}
    return DiffusionSchedule(
        **{k: v.to(torch.float32) for k, v in t64.items()},
        timestep_map=torch.tensor(kept, dtype=torch.int64, device=dev),
        num_steps=len(kept),
        _tables64=t64,
    )
