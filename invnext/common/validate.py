"""Argument checks shared by every op.

Shape, dtype and device checks are free and always run. Checks of *values* held in
device memory (``cu_seqlens`` increasing, indices in range, no duplicate indices) need a
host read, so they run when the tensor is on the CPU, or everywhere when
``INVNEXT_CHECK_VALUES=1``; kernels guard their own memory accesses either way, so bad
values never read out of bounds. While ``torch.compile`` traces, value checks are skipped,
as on a GPU by default: each host read would split the graph. Run once eagerly on the CPU
to have them checked. Meta tensors hold no values: never checked.

NaN/inf in float inputs are checked only under ``INVNEXT_CHECK_VALUES=1`` (on every
device): a full pass over every input, and a diverging run must reach its own finite check
(the trainer skips non-finite steps) rather than stop inside an op.

Sizes: an op that allocates from its arguments (a mask of ``batch_size x grid``, a grid of
``batch_size * N`` tokens, a schedule of ``num_steps``) refuses, before allocating, a size
whose smallest allocation exceeds the device's total memory (:func:`check_alloc`).
"""
from __future__ import annotations

import math
import os
from functools import lru_cache
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _switch_on() -> bool:
    return os.environ.get("INVNEXT_CHECK_VALUES", "0") not in ("", "0")


def values_checked(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    if t.device.type == "cpu":
        return True
    return _switch_on()


def finite_checked() -> bool:
    """Whether float inputs are checked for NaN/inf: ``INVNEXT_CHECK_VALUES=1`` only (module docstring)."""
    return not torch.compiler.is_compiling() and _switch_on()


def check_finite(op: str, **tensors: object) -> None:
    """Under ``INVNEXT_CHECK_VALUES=1``: every float tensor given holds no NaN or inf."""
    if not finite_checked():
        return
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.device.type == "meta":
            continue
        bad = int((~torch.isfinite(t.detach())).sum())
        if bad:
            raise ValueError(
                f"{op}: {name} holds {bad} non-finite value(s) (NaN or inf) of {t.numel()} "
                "(checked because INVNEXT_CHECK_VALUES=1)"
            )


def check_host_readable(op: str, name: str, t: torch.Tensor, what: str) -> None:
    """``t``'s values are about to be read on the host: a meta tensor has none."""
    if t.device.type == "meta":
        raise ValueError(f"{op}: {name} is a meta tensor (no values), but {what}")


def check_device(op: str, device: object, name: str = "device") -> torch.device:
    """``device`` (a torch.device, a string or None = CPU) parsed and present on this machine."""
    try:
        dev = torch.device("cpu") if device is None else torch.device(device)  # type: ignore[arg-type]
    except (TypeError, RuntimeError) as exc:
        raise ValueError(f"{op}: {name} must be a torch.device or a device string such as 'cpu' or 'cuda', "
                         f"got {device!r}") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{op}: {name}={str(dev)!r} but torch sees no CUDA GPU here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{op}: {name}={str(dev)!r} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return dev


@lru_cache(maxsize=None)
def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - no sysconf
        return None


def device_memory(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes (None: unknown, or a device that allocates nothing, like meta)."""
    if device.type == "cpu":
        return _host_memory()
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.get_device_properties(index).total_memory
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_alloc(op: str, what: str, nbytes: int, device: torch.device) -> None:
    """Refuse before allocating: ``nbytes`` (a lower bound of what the op would allocate on
    ``device`` for ``what``, the arguments that set it) exceeds the device's total memory."""
    if torch.compiler.is_compiling():  # sizes were checked eagerly; tracing host queries would split the graph
        return
    total = device_memory(device)
    if total is not None and nbytes > total:
        raise ValueError(
            f"{op}: {what} would need at least {_gib(nbytes)} on {device}, more than its {_gib(total)} of memory"
        )


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{op}: {name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype in ({_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    return t


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    device = None
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first} is on {device}; move them to one device")
    if device is None:
        raise ValueError(f"{op}: no tensor arguments given")
    return device


def check_shape(op: str, name: str, t: torch.Tensor, shape: Sequence[int | None]) -> None:
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} must have shape {want}, got {list(t.shape)}")


CU_SEQLENS_DTYPES = (torch.int32, torch.int64)


def check_cu_seqlens(
    op: str, cu_seqlens: object, total: int, device: torch.device, *, name: str = "cu_seqlens",
    dtypes: Sequence[torch.dtype] = (torch.int32,),
) -> torch.Tensor:
    """``name``: 1D ``[B+1]`` of one of ``dtypes``, starts at 0, non-decreasing, ends at ``total``."""
    t = check_tensor(op, name, cu_seqlens, ndim=1, dtypes=dtypes, device=device)
    if t.numel() < 2:
        raise ValueError(f"{op}: {name} must have B+1 >= 2 entries, got {t.numel()}")
    if values_checked(t):
        host = t.cpu()
        if int(host[0]) != 0:
            raise ValueError(f"{op}: {name} must start at 0, got {int(host[0])}")
        if bool((host[1:] < host[:-1]).any()):
            raise ValueError(f"{op}: {name} must be non-decreasing, got {host.tolist()}")
        if int(host[-1]) != total:
            raise ValueError(
                f"{op}: {name} must end at total={total} (the packed tensors' first dimension), got {int(host[-1])}"
            )
    return t


def check_softmax_scale(op: str, softmax_scale: object, head_dim: int) -> float:
    """The attention scale as a float: ``1 / sqrt(head_dim)`` when None, else a finite value > 0."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{op}: softmax_scale must be a float, got {softmax_scale!r}")
    scale = float(softmax_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{op}: softmax_scale must be finite and > 0, got {scale}")
    return scale


def check_index_range(op: str, name: str, index: torch.Tensor, low: int, high: int) -> None:
    """Every entry of ``index`` lies in [low, high)."""
    if index.numel() == 0 or not values_checked(index):
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < low or hi >= high:
        raise ValueError(f"{op}: {name} must lie in [{low}, {high}), found values in [{lo}, {hi}]")


def check_grid(op: str, grid: object) -> tuple[int, int, int]:
    if not (isinstance(grid, (tuple, list)) and len(grid) == 3 and all(isinstance(g, int) for g in grid)):
        raise TypeError(f"{op}: grid must be a tuple of three ints (T, H, W), got {grid!r}")
    if any(g < 1 for g in grid):
        raise ValueError(f"{op}: grid sizes must be >= 1, got {tuple(grid)}")
    return tuple(grid)  # type: ignore[return-value]


def check_range(op: str, name: str, value: object, low: float, high: float) -> tuple[float, float]:
    """A (min, max) pair inside [low, high] with min <= max."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(f"{op}: {name} must be a (min, max) pair, got {value!r}")
    a, b = float(value[0]), float(value[1])
    if not (low <= a <= b <= high):
        raise ValueError(f"{op}: {name} must satisfy {low} <= min <= max <= {high}, got {tuple(value)}")
    return a, b


def check_backend(op: str, backend: object) -> str:
    if backend not in ("auto", "torch", "triton", "cuda"):
        raise ValueError(f"{op}: backend must be 'auto', 'torch', 'triton' or 'cuda', got {backend!r}")
    return backend  # type: ignore[return-value]
