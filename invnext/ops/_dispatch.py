"""Backend selection for every op in ``invnext.ops``.

Each op has a pure-PyTorch reference (``"torch"``, always available) and may have a
Triton (``"triton"``) and/or CUDA C++ (``"cuda"``) implementation. Non-reference
implementations are named here by import path and imported only when first used, so
importing ``invnext`` never touches the GPU, Triton or the native extension.

``backend="auto"`` picks the first available entry of the op's preference order for
the device of its tensors; CPU tensors always get the reference. An explicit backend
that cannot run raises :class:`BackendUnavailableError` saying why.
"""
from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from typing import Callable

import torch

from invnext.common.interpreter import triton_interpreter

BACKENDS = ("torch", "triton", "cuda")
_AUTO_ORDER_DEFAULT = ("cuda", "triton", "torch")

# op name -> backend -> "module:function". The reference lives beside the public op
# and registers itself with ``register_reference``.
_ACCELERATED: dict[str, dict[str, str]] = {
    "masked_attention": {"triton": "invnext_kernels.attention:masked_attention_triton"},
    "gather_visible": {
        "cuda": "invnext.native.ops:gather_visible_cuda",
        "triton": "invnext_kernels.tokens:gather_visible_triton",
    },
    "scatter_tokens": {
        "cuda": "invnext.native.ops:scatter_tokens_cuda",
        "triton": "invnext_kernels.tokens:scatter_tokens_triton",
    },
    "diffusion_loss": {"triton": "invnext_kernels.diffusion:diffusion_loss"},
    "q_sample": {"triton": "invnext_kernels.diffusion:q_sample"},
    "p_sample_step": {"triton": "invnext_kernels.diffusion:p_sample_step"},
    "ddim_step": {"triton": "invnext_kernels.diffusion:ddim_step"},
    "adaln_modulate": {"triton": "invnext_kernels.diffusion:adaln_modulate"},
    "tube_mask": {"cuda": "invnext.native.masks:tube_mask"},
    "multiblock_mask": {"cuda": "invnext.native.masks:multiblock_mask"},
    "semantic_mask": {"cuda": "invnext.native.masks:semantic_mask"},
    "motion_mask": {},
    # Triton step kernels replayed from a CUDA graph: needs Triton, not the native extension.
    "p_sample_loop": {"triton": "invnext_kernels.sampler:p_sample_loop"},
    "ddim_sample_loop": {"triton": "invnext_kernels.sampler:ddim_sample_loop"},
}

_REFERENCE: dict[str, Callable] = {}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this op here; the message says why."""


def register_reference(op: str):
    """Decorator: mark ``fn`` as the pure-PyTorch reference of ``op``."""

    def wrap(fn: Callable) -> Callable:
        if op not in _ACCELERATED:
            raise KeyError(f"op {op!r} is not declared in invnext.ops._dispatch")
        _REFERENCE[op] = fn
        return fn

    return wrap


def ops() -> list[str]:
    return sorted(_ACCELERATED)


@lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; Linux only)"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton failed to import: {exc}"
    return None


def _native_error() -> str | None:
    from invnext import native

    return native.unavailable_reason()


@lru_cache(maxsize=None)
def _module_error(path: str) -> str | None:
    module, _, name = path.partition(":")
    if module.startswith("invnext_kernels"):
        from invnext._kernels_path import ensure_kernels_importable

        ensure_kernels_importable()
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        return f"its implementation module {module} is not present in this install"
    try:
        loaded = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - the reason is the answer
        return f"{module} failed to import: {exc.__class__.__name__}: {exc}"
    if not callable(getattr(loaded, name, None)):
        return f"{module} has no {name}"
    return None


def availability(op: str, backend: str, device: torch.device | str | None) -> tuple[bool, str]:
    """Whether ``backend`` can run ``op`` on ``device``; the string says why not."""
    if op not in _ACCELERATED:
        raise KeyError(f"unknown op {op!r}; known ops: {', '.join(ops())}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    dev = torch.device(device) if device is not None else None
    if backend == "torch":
        return True, "pure-PyTorch reference"
    path = _ACCELERATED[op].get(backend)
    if path is None:
        return False, f"no {backend} implementation of this op exists (yet)"
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return False, err
        on_gpu = dev is not None and dev.type == "cuda"
        if not on_gpu and not triton_interpreter():
            where = "CPU tensors" if dev is None or dev.type == "cpu" else f"{dev.type} tensors"
            return False, f"triton kernels need CUDA tensors (got {where}; set TRITON_INTERPRET=1 to run them on the CPU interpreter)"
        if on_gpu and not torch.cuda.is_available():
            return False, "no CUDA GPU is visible to torch"
    if backend == "cuda":
        if dev is None or dev.type != "cuda":
            return False, "the CUDA kernels need CUDA tensors" + (
                "" if torch.cuda.is_available() else " and torch sees no CUDA GPU here"
            )
        err = _native_error()
        if err:
            return False, err
    err = _module_error(path)
    if err:
        return False, err
    return True, path


def _load(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _candidates(op: str, device: torch.device | str | None):
    """Implementations ``auto`` may use on ``device``, fastest first; the reference is always last."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu":
        for name in _AUTO_ORDER_DEFAULT:
            if name != "torch" and availability(op, name, dev)[0]:
                yield name, _load(_ACCELERATED[op][name])
    yield "torch", _REFERENCE[op]


def resolve(op: str, backend: str, device: torch.device | str | None) -> tuple[str, Callable]:
    """Return ``(backend_name, implementation)`` for ``op`` on ``device``."""
    if backend == "auto":
        return next(_candidates(op, device))
    ok, why = availability(op, backend, device)
    if not ok:
        raise BackendUnavailableError(f"invnext.ops.{op}: backend {backend!r} is unavailable: {why}")
    if backend == "torch":
        return "torch", _REFERENCE[op]
    return backend, _load(_ACCELERATED[op][backend])


def dispatch(op: str, backend: str, device: torch.device | str | None, *args):
    """Resolve ``op`` and call it with its canonical arguments.

    An accelerated implementation may carry ``unsupported(*args) -> str | None`` for inputs it
    does not handle (a dtype, a head dim): ``auto`` then passes it over for the next one, and an
    explicit request raises :class:`BackendUnavailableError` with that reason.
    """
    if backend == "auto":
        for _, impl in _candidates(op, device):
            check = getattr(impl, "unsupported", None)
            if check is None or check(*args) is None:
                return impl(*args)
    name, impl = resolve(op, backend, device)
    check = getattr(impl, "unsupported", None)
    why = check(*args) if check is not None else None
    if why:
        raise BackendUnavailableError(f"invnext.ops.{op}: backend {name!r} cannot run these inputs: {why}")
    return impl(*args)


# --------------------------------------------------------------------------- model-wide choice

OPS_BACKENDS = ("auto", "torch", "triton", "cuda")


def op_backend(backend: str, op: str) -> str:
    """The backend argument for ``op`` under the model-wide choice ``backend``
    (:func:`invnext.models.switches.set_ops_backend`).

    "auto" and "torch" pass through; "triton" / "cuda" pass through for an op that declares
    such an implementation and become "auto" for one that does not.
    """
    if backend in ("auto", "torch") or backend in _ACCELERATED.get(op, {}):
        return backend
    return "auto"


class OpsUser:
    """Mixin of a module that calls ``invnext.ops``: ``ops_backend`` is the model-wide choice."""

    ops_backend: str = "auto"

    def backend_for(self, op: str) -> str:
        return op_backend(self.ops_backend, op)
