"""invnext's CUDA C++ kernels (``csrc/``), found and loaded on first use.

The kernels come from one of two places, tried in this order:

- ``"compiled"``: the extension ``invnext.native._C`` that ``setup.py`` builds when ``nvcc`` is
  present (or ``scripts/build_csrc.sh --inplace`` in a source tree);
- ``"cupy"``: the same kernel source (``token_kernels.cuh``) compiled at first use by NVRTC
  through CuPy, when the extension is absent and CuPy is installed (CuPy caches the binary).

``INVNEXT_NATIVE_SOURCE=compiled|cupy`` restricts the search to one of them (default ``auto``).
Importing this package loads nothing and touches no GPU; :func:`unavailable_reason` and
:func:`source` do the work once and remember the answer.
"""
from __future__ import annotations

import importlib
import os
import threading
from typing import Any

from .c_api import ABI  # the extension must report the header's INVNEXT_NATIVE_ABI

NOT_BUILT = "not built (installed without nvcc or with INVNEXT_SKIP_CUDA_BUILD=1)"
NO_GPU = "no CUDA GPU visible"
SOURCE_ENV = "INVNEXT_NATIVE_SOURCE"

_lock = threading.Lock()
_state: tuple[Any, str | None, str | None] | None = None  # (backend, source, reason)


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _load_compiled() -> tuple[Any, str | None]:
    name = f"{__name__}._C"
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None, NOT_BUILT
        return None, f"the compiled extension failed to load: {exc}"
    except ImportError as exc:  # e.g. an undefined symbol or a wrong-architecture binary
        return None, f"the compiled extension failed to load: {exc}"
    if mod.abi_version() != ABI:
        return None, f"the compiled extension is stale (ABI {mod.abi_version()}, expected {ABI}); rebuild it"
    err, runtime, driver, devices = mod.runtime_info()
    if err != 0:
        if driver == 0 or err == 100:  # no driver at all, or cudaErrorNoDevice
            return None, NO_GPU
        if driver < runtime:
            return None, (
                f"the CUDA driver ({_version(driver)}) is older than the CUDA runtime the extension was built "
                f"with ({_version(runtime)}); update the driver or rebuild with an older CUDA toolkit"
            )
        return None, f"the CUDA runtime cannot start: {mod.error_string(err)}"
    if devices == 0:
        return None, NO_GPU
    return mod, None


def _load_cupy() -> tuple[Any, str | None]:
    try:
        import cupy  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is the answer
        if isinstance(exc, ModuleNotFoundError) and exc.name == "cupy":
            return None, "cupy is not installed"
        return None, f"cupy failed to import: {exc}"
    if not _gpu_visible():
        return None, NO_GPU
    from . import _cupy

    try:
        return _cupy.CupyKernels(), None
    except Exception as exc:  # noqa: BLE001 - a compile or driver failure is the answer
        return None, f"NVRTC compilation through cupy failed: {exc}"


def _resolve() -> tuple[Any, str | None, str | None]:
    want = os.environ.get(SOURCE_ENV, "auto") or "auto"
    if want not in ("auto", "compiled", "cupy"):
        return None, None, f"{SOURCE_ENV} must be 'auto', 'compiled' or 'cupy', got {want!r}"
    reason = None
    if want in ("auto", "compiled"):
        mod, reason = _load_compiled()
        if mod is not None:
            return mod, "compiled", None
        if want == "compiled" or reason == NO_GPU:
            return None, None, reason
    kernels, why = _load_cupy()
    if kernels is not None:
        return kernels, "cupy", None
    if reason is None:
        return None, None, why
    return None, None, f"{reason}; the run-time NVRTC path is unavailable too: {why}"


def _get() -> tuple[Any, str | None, str | None]:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                _state = _resolve()
    return _state


def unavailable_reason() -> str | None:
    """None when the CUDA kernels can run here; otherwise why not (one line)."""
    return _get()[2]


def source() -> str | None:
    """Where the kernels come from: ``"compiled"``, ``"cupy"``, or None when unavailable."""
    return _get()[1]


def kernels() -> Any:
    """The loaded kernel launchers (the ``_C`` module or its CuPy twin); RuntimeError when unavailable."""
    backend, _, reason = _get()
    if backend is None:
        raise RuntimeError(f"invnext's CUDA kernels are unavailable: {reason}")
    return backend


def _reset() -> None:
    """Forget the cached answer (tests switch INVNEXT_NATIVE_SOURCE)."""
    global _state
    with _lock:
        _state = None
