"""Argument checks shared by every op.

Shape, dtype and device checks are free and always run. Checks of *values* held in
device memory (``cu_seqlens`` increasing, indices in range) need a host read, so they run
when the tensor is on the CPU, or everywhere when ``INVNEXT_CHECK_VALUES=1``; kernels
guard their own memory accesses either way, so bad values never read out of bounds. While
``torch.compile`` traces, value checks are skipped, as on a GPU by default: each host read
would split the graph. Run once eagerly on the CPU to have them checked.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def values_checked(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    return os.environ.get("INVNEXT_CHECK_VALUES", "0") not in ("", "0")


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


def check_cu_seqlens(op: str, cu_seqlens: object, total: int, device: torch.device) -> torch.Tensor:
    """``cu_seqlens``: int32[B+1], starts at 0, non-decreasing, ends at ``total``."""
    t = check_tensor(op, "cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
    if t.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must have B+1 >= 2 entries, got {t.numel()}")
    if values_checked(t):
        host = t.cpu()
        if int(host[0]) != 0:
            raise ValueError(f"{op}: cu_seqlens must start at 0, got {int(host[0])}")
        if bool((host[1:] < host[:-1]).any()):
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {host.tolist()}")
        if int(host[-1]) != total:
            raise ValueError(
                f"{op}: cu_seqlens must end at total={total} (the packed tensors' first dimension), got {int(host[-1])}"
            )
    return t


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
