"""Backend selection for every op in ``invnext.ops``.

Each op has a pure-PyTorch reference (``"torch"``, always available) and may have a
Triton (``"triton"``) and/or CUDA C++ (``"cuda"``) implementation. An implementation registers
itself where it is defined (``@implements(op, backend)``, :mod:`invnext.common.registry`); a
backend's modules are imported the first time one of its ops is asked for, so importing
``invnext`` never touches the GPU, Triton or the native extension.

``backend="auto"`` picks the first available entry of the op's preference order for
the device of its tensors; CPU tensors always get the reference. An explicit backend
that cannot run raises :class:`BackendUnavailableError` saying why.
"""
from __future__ import annotations

import importlib
import importlib.util
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from invnext.common.interpreter import triton_interpreter
from invnext.common.registry import implementation

BACKENDS = ("torch", "triton", "cuda")
_AUTO_ORDER_DEFAULT = ("cuda", "triton", "torch")

# op -> the backends besides "torch" that implement it. Declared here, not only learnt from the
# registrations, so that the answer needs no import: a model-wide "triton" keeps "auto" for an op
# without a Triton kernel even where Triton is not installed (tests/test_dispatch.py checks that
# these agree with what the backends register).
_ACCELERATED: dict[str, tuple[str, ...]] = {
    "masked_attention": ("triton",),
    "varlen_attention": ("triton",),
    "gather_visible": ("cuda", "triton"),
    "scatter_tokens": ("cuda", "triton"),
    "diffusion_loss": ("triton",),
    "q_sample": ("triton",),
    "p_sample_step": ("triton",),
    "ddim_step": ("triton",),
    "adaln_modulate": ("triton",),
    "tube_mask": ("cuda",),
    "multiblock_mask": ("cuda",),
    "semantic_mask": ("cuda",),
    "motion_mask": (),
    # Triton step kernels replayed from a CUDA graph: needs Triton, not the native extension.
    "p_sample_loop": ("triton",),
    "ddim_sample_loop": ("triton",),
}

# backend -> its modules; importing one registers the ops it implements.
_BACKEND_MODULES: dict[str, tuple[str, ...]] = {
    "triton": ("invnext_kernels.attention", "invnext_kernels.diffusion", "invnext_kernels.sampler",
               "invnext_kernels.tokens"),
    "cuda": ("invnext.native.ops", "invnext.native.masks"),
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
def _import_failures(backend: str) -> tuple[str, ...]:
    """Import ``backend``'s modules, so that each registers the ops it implements; why those
    that could not be imported failed."""
    if backend == "triton":
        from invnext._kernels_path import ensure_kernels_importable

        ensure_kernels_importable()
    failures = []
    for module in _BACKEND_MODULES[backend]:
        try:
            spec = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            failures.append(f"its implementation module {module} is not present in this install")
            continue
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - the reason is the answer
            failures.append(f"{module} failed to import: {exc.__class__.__name__}: {exc}")
    return tuple(failures)


def _implementation_error(op: str, backend: str) -> str | None:
    failures = _import_failures(backend)
    if implementation(op, backend) is not None:
        return None
    # A module that failed to import may be the one that would have registered ``op``.
    return "; ".join(failures) or f"no module of the {backend} backend registers {op}"


def availability(op: str, backend: str, device: torch.device | str | None) -> tuple[bool, str]:
    """Whether ``backend`` can run ``op`` on ``device``; the string says why not."""
    if op not in _ACCELERATED:
        raise KeyError(f"unknown op {op!r}; known ops: {', '.join(ops())}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    dev = torch.device(device) if device is not None else None
    if backend == "torch":
        return True, "pure-PyTorch reference"
    if backend not in _ACCELERATED[op]:
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
    err = _implementation_error(op, backend)
    if err:
        return False, err
    fn = implementation(op, backend)
    return True, f"{fn.__module__}.{fn.__qualname__}"


def _on_gpu(dev: torch.device) -> bool:
    """Whether ``dev`` is a GPU, where ``auto`` looks past the reference and warns when it falls
    back to it. Read from the device alone, never by querying a GPU (tests fake it to walk the
    GPU path on the CPU)."""
    return dev.type == "cuda"


def _candidates(op: str, device: torch.device | str | None):
    """Implementations ``auto`` may use on ``device``, fastest first; the reference is always last."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type != "cpu" or _on_gpu(dev):
        for name in _AUTO_ORDER_DEFAULT:
            if name != "torch" and availability(op, name, dev)[0]:
                yield name, implementation(op, name)
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
    return backend, implementation(op, backend)


def dispatch(op: str, backend: str, device: torch.device | str | None, *args):
    """Resolve ``op`` and call it with its canonical arguments.

    An accelerated implementation may carry ``unsupported(*args) -> str | None`` for inputs it
    does not handle (a dtype, a head dim): ``auto`` then passes it over for the next one, and an
    explicit request raises :class:`BackendUnavailableError` with that reason.
    """
    if _capture is not None and _capture == threading.get_ident():
        raise _Captured(op, backend, device, args)
    if backend == "auto":
        for name, impl in _candidates(op, device):
            check = getattr(impl, "unsupported", None)
            if check is None or check(*args) is None:
                if name == "torch" and op not in _warned and _ACCELERATED[op]:
                    _warn_reference_on_gpu(op, device, args)
                return impl(*args)
    name, impl = resolve(op, backend, device)
    check = getattr(impl, "unsupported", None)
    why = check(*args) if check is not None else None
    if why:
        raise BackendUnavailableError(f"invnext.ops.{op}: backend {name!r} cannot run these inputs: {why}")
    return impl(*args)


# --------------------------------------------------------------------------- saying what runs

_warned: set[str] = set()  # ops whose fallback to the reference on a GPU was reported
_capture: int | None = None  # the thread in which explain() runs an op up to its dispatch


class _Captured(Exception):
    """Raised by :func:`dispatch` while :func:`explain` runs: the op's canonical arguments."""

    def __init__(self, op: str, backend: str, device, args: tuple):
        super().__init__(op)
        self.op, self.backend, self.device, self.args = op, backend, device, args


def _verdicts(op: str, device, args: tuple) -> dict[str, tuple[bool, str]]:
    """backend -> (whether it takes these canonical arguments on ``device``, what runs or why not),
    every backend in ``auto``'s order, for the device ``auto`` sees."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    looks_past = dev.type != "cpu" or _on_gpu(dev)
    out: dict[str, tuple[bool, str]] = {}
    for name in _AUTO_ORDER_DEFAULT:
        if name == "torch":
            fn = _REFERENCE[op]
            out[name] = (True, f"pure-PyTorch reference {fn.__module__}.{fn.__qualname__}")
            continue
        if name not in _ACCELERATED[op]:
            out[name] = (False, f"no {name} implementation of this op exists")
            continue
        if not looks_past:
            out[name] = (False, f"auto runs the reference for {dev.type} tensors")
            continue
        ok, why = availability(op, name, dev)
        if ok:
            check = getattr(implementation(op, name), "unsupported", None)
            declined = check(*args) if check is not None else None
            if declined:
                ok, why = False, f"declines these inputs: {declined}"
        out[name] = (ok, why)
    return out


def _warn_reference_on_gpu(op: str, device, args: tuple) -> None:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if not _on_gpu(dev) or torch.compiler.is_compiling():  # a warning would split a compiled graph
        return
    _warned.add(op)
    declines = "; ".join(f"{name}: {why}" for name, (ok, why) in _verdicts(op, dev, args).items()
                         if name != "torch" and name in _ACCELERATED[op])
    warnings.warn(
        f"invnext.ops.{op}: backend='auto' on {dev} runs the pure-PyTorch reference ({declines}). "
        f"invnext.ops.explain({op!r}, ...) says why for given inputs; this warning is shown once per op.",
        RuntimeWarning,
        stacklevel=3,
    )


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain` found: the backend ``auto`` picks for one call and why each other
    backend does not run. ``str()`` (and the REPL) show it as a short report.

    op:        the op's name
    device:    the device of the call's tensors (what ``auto`` decides on)
    chosen:    the backend ``auto`` runs ("torch" is the reference)
    requested: the ``backend`` argument of the call ("auto" unless given)
    verdicts:  backend -> (whether it runs these inputs, what runs or why not), in ``auto``'s order
    """

    op: str
    device: torch.device
    chosen: str
    requested: str
    verdicts: dict

    def __str__(self) -> str:
        lines = [f"invnext.ops.{self.op} on {self.device}: backend='auto' runs {self.chosen!r}"]
        for name, (ok, why) in self.verdicts.items():
            mark = "runs" if name == self.chosen else ("could run" if ok else "declines")
            lines.append(f"  {name:6s} {mark}: {why}")
        if self.requested != "auto":
            ok, why = self.verdicts[self.requested]
            lines.append(f"  (this call asks for backend={self.requested!r}: "
                         + ("it runs" if ok else f"it raises BackendUnavailableError: {why}") + ")")
        return "\n".join(lines)

    __repr__ = __str__


def explain(op: str | Callable, *args, **kwargs) -> Explanation:
    """Which backend ``auto`` picks for ``op(*args, **kwargs)`` and why each other one declines.

    The op runs its argument checks and preparation (so bad arguments raise as in a call, and a
    ``generator`` argument is advanced as by a call) and stops before any implementation runs.

    Args:
        op: the op's name (``"masked_attention"``) or the function (``invnext.ops.masked_attention``).
        *args, **kwargs: the arguments of a call of that op.
    Returns:
        :class:`Explanation`; print it for the report.
    """
    global _capture
    name = getattr(op, "__name__", op)
    if not isinstance(name, str) or name not in _ACCELERATED:
        raise ValueError(f"explain: op must be one of the dispatched ops ({', '.join(ops())}) or one of their "
                         f"functions, got {op!r}")
    import invnext.ops

    fn = getattr(invnext.ops, name)
    _capture = threading.get_ident()
    try:
        fn(*args, **kwargs)
    except _Captured as captured:
        call = captured
    else:
        raise RuntimeError(f"explain: invnext.ops.{name} returned without dispatching")  # pragma: no cover
    finally:
        _capture = None
    dev = torch.device(call.device) if call.device is not None else torch.device("cpu")
    verdicts = _verdicts(call.op, dev, call.args)
    chosen = next(b for b, (ok, _) in verdicts.items() if ok)
    return Explanation(call.op, dev, chosen, call.backend, verdicts)


# --------------------------------------------------------------------------- model-wide choice

OPS_BACKENDS = ("auto", "torch", "triton", "cuda")


def op_backend(backend: str, op: str) -> str:
    """The backend argument for ``op`` under a module's choice ``backend`` (``invnext.nn``'s
    modules; :func:`invnext.models.switches.set_ops_backend` sets it model-wide).

    "auto" and "torch" pass through; "triton" / "cuda" pass through for an op that declares
    such an implementation and become "auto" for one that does not.
    """
    if backend in ("auto", "torch") or backend in _ACCELERATED.get(op, {}):
        return backend
    return "auto"

