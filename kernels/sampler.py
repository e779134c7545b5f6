"""Reverse-diffusion samplers without per-step launch overhead (CUDA graphs).

``p_sample_loop_triton`` / ``ddim_sample_loop_triton`` take the canonical arguments of the reference
samplers in :mod:`invnext.ops.diffusion` and return what they return::

    impl(denoise_fn, cond, schedule, x_T[M,C], step_noise [S,M,C] or None, generator, temperature | eta) -> x_0[M,C]

How. One reverse step (``t_model = timestep_map[t]``, ``denoise_fn(x, t_model, cond)``,
then the Triton step kernel writing ``x`` in place) is captured once in a CUDA graph per
(denoiser, schedule, shape, dtypes, temperature/eta) and replayed S times. Between replays
the host only writes the step index into a static ``t`` buffer and the step's noise into a
static noise buffer (a copy of ``step_noise[t]``, or ``normal_`` from ``generator``: the
same draws, in the same order, as the reference's ``torch.randn``), so the result is
deterministic given the noise and equals the eager loop's. A step costs three launches
instead of the denoiser's dozens plus the reference step's ~20.

Requirements on ``denoise_fn`` for the graph path (those of any CUDA-graph capture): no host
synchronisation, no data-dependent shapes, no randomness of its own, and its parameters
updated in place if they change (the graph reads the memory it was captured with). ``cond``
may be a tensor or a tuple/list/dict of tensors (copied into static buffers each call);
other objects inside it are treated as constants of the captured graph.

Fallback. Off CUDA (the CPU interpreter, tests) or with ``use_graph=False`` the same loop
runs eagerly, one step kernel per step; if capture fails the loop also runs eagerly, with a
``RuntimeWarning`` naming the reason. Graphs are cached (at most ``_CACHE_SIZE``; they pin
the denoiser, the schedule and their memory pool); :func:`clear_graph_cache` drops them.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch

from invnext.common.diffusion_schedule import DiffusionSchedule
from invnext.common.diffusion_steps import ddim_step_reference, denoise, noise_for_step, p_sample_step_reference
from invnext.common.registry import implements

from . import diffusion as _kd

_CACHE_SIZE = 4
_GRAPHS: OrderedDict[tuple, _StepGraph] = OrderedDict()


def clear_graph_cache() -> None:
    """Drop every cached sampler graph (and the memory it holds)."""
    _GRAPHS.clear()


# ----------------------------------------------------------------------------------------
# one reverse step, shared by the eager loop and the captured graph
# ----------------------------------------------------------------------------------------
_REFERENCE_STEP = {"p_sample": p_sample_step_reference, "ddim": ddim_step_reference}


def _step(kind: str, model_out, x, t, schedule, noise, coef):
    """One step of the eager loop, into a new tensor."""
    # x and noise were declined up front if the kernels cannot take them; a denoiser's output
    # shows its dtype only here, mid-loop, so a float64 one gets the reference step.
    if not _kd._kernel_ok(model_out, x, noise):
        return _REFERENCE_STEP[kind](model_out, x, t, schedule, noise, coef)
    step = _kd.p_sample_step_triton if kind == "p_sample" else _kd.ddim_step_triton
    return step(model_out, x, t, schedule, noise, coef)


def _step_into(kind: str, out, model_out, x, t, schedule, noise, coef):
    """One step of the captured graph, into ``out`` (a float64 denoiser output: as in ``_step``)."""
    if not _kd._kernel_ok(model_out, x, noise):
        return out.copy_(_REFERENCE_STEP[kind](model_out, x, t, schedule, noise, coef))
    if kind == "p_sample":
        return _kd.p_sample_step_triton_into(out, model_out, x, t, schedule, noise, coef)
    return _kd.ddim_step_triton_into(out, model_out, x, t, schedule, noise, coef)


def _needs_noise(kind: str, coef: float) -> bool:
    return kind == "p_sample" or coef > 0.0


@torch.no_grad()
def _eager_loop(kind, denoise_fn, cond, schedule, x_T, step_noise, generator, coef):
    """The reference loop with the Triton step kernel: same draws, same order."""
    op = f"{kind}_loop" if kind == "p_sample" else "ddim_sample_loop"
    x = x_T
    rows = x.shape[0]
    for i in reversed(range(schedule.num_steps)):
        t = torch.full((rows,), i, dtype=torch.int64, device=x.device)
        out = denoise(op, denoise_fn, x, t, cond, schedule)
        if kind == "p_sample":
            noise = noise_for_step(step_noise, i, generator, x) if i > 0 else torch.zeros_like(x)
        else:
            noise = noise_for_step(step_noise, i, generator, x) if (i > 0 and coef > 0.0) else None
        x = _step(kind, out, x, t, schedule, noise, coef)
    return x


# ----------------------------------------------------------------------------------------
# CUDA graph of one step
# ----------------------------------------------------------------------------------------
def _tensors_of(cond) -> list[torch.Tensor]:
    if isinstance(cond, torch.Tensor):
        return [cond]
    if isinstance(cond, (tuple, list)):
        return [c for c in cond if isinstance(c, torch.Tensor)]
    if isinstance(cond, dict):
        return [c for c in cond.values() if isinstance(c, torch.Tensor)]
    return []


def _static_like(cond):
    """A structure like ``cond`` whose tensors are fresh buffers (filled by ``_fill``)."""
    if isinstance(cond, torch.Tensor):
        return torch.empty_like(cond)
    if isinstance(cond, (tuple, list)):
        return type(cond)(torch.empty_like(c) if isinstance(c, torch.Tensor) else c for c in cond)
    if isinstance(cond, dict):
        return {k: (torch.empty_like(c) if isinstance(c, torch.Tensor) else c) for k, c in cond.items()}
    return cond


def _cond_signature(cond) -> tuple:
    def sig(c):
        if isinstance(c, torch.Tensor):
            return ("T", tuple(c.shape), tuple(c.stride()), c.dtype, c.device)
        return ("O", id(c))

    if isinstance(cond, (tuple, list)):
        return (type(cond).__name__,) + tuple(sig(c) for c in cond)
    if isinstance(cond, dict):
        return ("dict",) + tuple((k, sig(c)) for k, c in cond.items())
    return (sig(cond),)


class _StepGraph:
    """Static buffers and the captured graph of one reverse step (x updated in place)."""

    def __init__(self, kind, denoise_fn, cond, schedule, x_T, noise_dtype, coef):
        self.kind, self.denoise_fn, self.schedule, self.coef = kind, denoise_fn, schedule, coef
        M, C = x_T.shape
        dev = x_T.device
        self.x = x_T.clone()
        self.t = torch.full((M,), schedule.num_steps - 1, dtype=torch.int64, device=dev)
        self.noise = torch.zeros((M, C), dtype=noise_dtype, device=dev) if _needs_noise(kind, coef) else None
        self.cond = _static_like(cond)
        for dst, src in zip(_tensors_of(self.cond), _tensors_of(cond)):
            dst.copy_(src)
        # Warm up on a side stream (Triton compilation, cuBLAS handles, lazy allocations)
        # with the exact arguments the capture will use, then capture.
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def _step(self) -> None:
        op = "p_sample_loop" if self.kind == "p_sample" else "ddim_sample_loop"
        out = denoise(op, self.denoise_fn, self.x, self.t, self.cond, self.schedule)
        _step_into(self.kind, self.x, out, self.x, self.t, self.schedule, self.noise, self.coef)

    def run(self, cond, x_T, step_noise, generator) -> torch.Tensor:
        self.x.copy_(x_T)
        for dst, src in zip(_tensors_of(self.cond), _tensors_of(cond)):
            dst.copy_(src)
        for i in reversed(range(self.schedule.num_steps)):
            self.t.fill_(i)
            if self.noise is not None:
                if i == 0:
                    self.noise.zero_()  # step 0 adds no noise and draws none
                elif step_noise is not None:
                    self.noise.copy_(step_noise[i])
                else:
                    # normal_ is what torch.randn runs: the reference's draws, bit for bit.
                    self.noise.normal_(generator=generator)
            self.graph.replay()
        return self.x.clone()


def _fn_key(fn) -> tuple:
    # A bound method is a new object at every attribute access; key it by (self, function).
    if hasattr(fn, "__self__") and hasattr(fn, "__func__"):
        return (id(fn.__self__), id(fn.__func__))
    return (id(fn),)


def _graph_for(kind, denoise_fn, cond, schedule, x_T, noise_dtype, coef) -> _StepGraph:
    key = (
        kind, _fn_key(denoise_fn), id(schedule), tuple(x_T.shape), x_T.dtype, x_T.device,
        noise_dtype, float(coef), _cond_signature(cond),
    )  # fmt: skip
    entry = _GRAPHS.get(key)
    # The entry pins denoise_fn and schedule, so their ids cannot be reused while it lives.
    if entry is not None and entry.denoise_fn == denoise_fn and entry.schedule is schedule:
        _GRAPHS.move_to_end(key)
        return entry
    entry = _StepGraph(kind, denoise_fn, cond, schedule, x_T, noise_dtype, coef)
    _GRAPHS[key] = entry
    while len(_GRAPHS) > _CACHE_SIZE:
        _GRAPHS.popitem(last=False)
    return entry


@torch.no_grad()
def _sample(kind, denoise_fn, cond, schedule, x_T, step_noise, generator, coef, use_graph):
    on_cuda = x_T.device.type == "cuda"
    if use_graph is None:
        use_graph = on_cuda
    if use_graph and not on_cuda:
        raise ValueError(f"{kind} sampler: use_graph=True needs CUDA tensors, got {x_T.device}")
    if not use_graph:
        return _eager_loop(kind, denoise_fn, cond, schedule, x_T, step_noise, generator, coef)
    noise_dtype = step_noise.dtype if step_noise is not None else x_T.dtype
    try:
        graph = _graph_for(kind, denoise_fn, cond, schedule, x_T, noise_dtype, coef)
    except RuntimeError as exc:  # e.g. denoise_fn synchronises with the host
        warnings.warn(
            f"{kind} sampler: CUDA-graph capture of one step failed ({exc}); running the eager loop instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return _eager_loop(kind, denoise_fn, cond, schedule, x_T, step_noise, generator, coef)
    return graph.run(cond, x_T, step_noise, generator)


@implements("p_sample_loop", "triton")
def p_sample_loop_triton(
    denoise_fn: Callable,
    cond,
    schedule: DiffusionSchedule,
    x_T: torch.Tensor,
    step_noise: torch.Tensor | None,
    generator: torch.Generator | None,
    temperature: float,
    *,
    use_graph: bool | None = None,
) -> torch.Tensor:
    """Ancestral sampling ``x_T[M, C] -> x_0[M, C]`` (x_T's dtype) over t = S-1 .. 0.

    ``denoise_fn(x_t [M,C], t_model int64[M], cond) -> [M, 2C]``; ``step_noise``: ``[S, M, C]``
    or None (then each step t > 0 draws ``randn(M, C)`` from ``generator``, in the order
    t = S-1 .. 1). ``use_graph``: None = a CUDA graph on CUDA tensors, the eager loop elsewhere.
    """
    return _sample("p_sample", denoise_fn, cond, schedule, x_T, step_noise, generator, float(temperature), use_graph)


@implements("ddim_sample_loop", "triton")
def ddim_sample_loop_triton(
    denoise_fn: Callable,
    cond,
    schedule: DiffusionSchedule,
    x_T: torch.Tensor,
    step_noise: torch.Tensor | None,
    generator: torch.Generator | None,
    eta: float,
    *,
    use_graph: bool | None = None,
) -> torch.Tensor:
    """DDIM sampling ``x_T[M, C] -> x_0[M, C]``; arguments as :func:`p_sample_loop_triton`, ``eta >= 0``
    (with ``eta = 0`` nothing is drawn after x_T and ``step_noise`` is ignored)."""
    return _sample("ddim", denoise_fn, cond, schedule, x_T, step_noise, generator, float(eta), use_graph)


def _loop_unsupported(denoise_fn, cond, schedule, x_T, step_noise, generator, coef) -> str | None:
    """Samples or step noise in a dtype the step kernels cannot take (float64); ``auto`` then runs
    the reference loop."""
    return _kd._dtype_reason(x_T, step_noise)


p_sample_loop_triton.unsupported = _loop_unsupported
ddim_sample_loop_triton.unsupported = _loop_unsupported
