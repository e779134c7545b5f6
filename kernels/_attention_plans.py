"""Host-side plans of the windowed attention, reused only for structures declared immutable.

A windowed launch needs, per kernel kind, the lists of key (or query) blocks each program
visits (``window_lists``: about 115 small torch ops, each a kernel launch on a GPU) and, for a
1D window, synthetic coordinates (``window_geometry``: 8 more). They depend only on
``cu_seqlens``, the coordinates and static settings, which every windowed layer of a forward
and its backward share: the default predictor (3 local layers of 5) built them 9 times per
training step, about 1,100 launches; reused, 3 times.

Reuse is explicit. A plan is reused only for a ``cu_seqlens`` (and coordinates) declared
immutable with ``invnext.ops.static_structure``; any other call builds its plans afresh. A
cache keyed by identity and version counter alone returned stale plans (NaN rows) when the
values changed without a version bump (the numpy array under ``torch.from_numpy`` written, a
write through ``.data``); keying by value would need a host read (a sync on the GPU) per call.
For a declared structure the version counters still take part in the key, so an in-place
write to it rebuilds the plans.

Entries live in a table per declared ``cu_seqlens`` tensor, keyed by its ``id`` and emptied by
a ``weakref.finalize`` when that tensor dies, so a later tensor at the same address cannot hit
a stale entry. An entry holds the coordinates tensor itself, compared by identity. Inference
tensors (no version counter) are never reused.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch

# The attribute ``invnext.ops.static_structure`` sets on the tensors it declares (the kernels
# package does not import invnext, so the name is shared as a literal).
STATIC_ATTR = "_invnext_static_structure"

_TABLES: dict[int, dict] = {}


def is_static(t: torch.Tensor | None) -> bool:
    """True for None and for a tensor declared immutable (and not an inference tensor)."""
    return t is None or (bool(getattr(t, STATIC_ATTR, False)) and not t.is_inference())


def mark_static(t: torch.Tensor) -> torch.Tensor:
    """``t``, declared immutable (for plan parts derived from a declared structure)."""
    setattr(t, STATIC_ATTR, True)
    return t


def _table(cu: torch.Tensor) -> dict:
    key = id(cu)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = {}
        weakref.finalize(cu, _TABLES.pop, key, None)
    return table


def cached(cu: torch.Tensor, coords: torch.Tensor | None, key: tuple[Hashable, ...], build: Callable[[], Any]) -> Any:
    """``build()``; for a declared ``cu`` and ``coords``, what it returned for the same objects,
    unmodified (version counters), and ``key``."""
    if not (is_static(cu) and is_static(coords)):
        return build()
    table = _table(cu)
    full = (cu._version, -1 if coords is None else coords._version, *key)
    entry = table.get(full)
    if entry is not None and entry[0] is coords:
        return entry[1]
    value = build()
    table[full] = (coords, value)
    return value


def clear() -> None:
    """Drop every plan (tests; the tables also empty themselves as their tensors die)."""
    _TABLES.clear()
