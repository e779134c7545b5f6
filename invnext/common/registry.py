"""Where a backend's implementation of an op is found: the module that defines it registers it.

A Triton or CUDA module marks each public entry with ``@implements(op, backend)``; importing the
module fills the table, and ``invnext.ops`` dispatches through it. The table lives on this floor
(not in ``invnext.ops``) so that the kernels register without importing the layer that calls them.
"""
from __future__ import annotations

from typing import Callable

_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {}


def implements(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: ``fn`` is ``backend``'s implementation of ``op``, with the op's canonical
    arguments (already validated by the public op). ``fn.unsupported(*args) -> str | None``, where
    set, declines inputs the implementation cannot take."""

    def wrap(fn: Callable) -> Callable:
        _IMPLEMENTATIONS.setdefault(op, {})[backend] = fn
        return fn

    return wrap


def implementation(op: str, backend: str) -> Callable | None:
    """The registered implementation, or None when no imported module registered one."""
    return _IMPLEMENTATIONS.get(op, {}).get(backend)
