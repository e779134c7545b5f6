"""Host-side plans of the windowed attention, built once per batch structure.

A windowed launch needs, per kernel kind, the lists of key (or query) blocks each program
visits (``window_lists``: about 115 small torch ops, each a kernel launch on a GPU) and, for a
1D window, synthetic coordinates (``window_geometry``: 8 more). They depend only on
``cu_seqlens``, the coordinates and static settings, which every windowed layer of a forward
and its backward share: the default predictor (3 local layers of 5) built them 9 times per
training step, about 1,100 launches; cached, 3 times.

Entries live in a table per ``cu_seqlens`` tensor, keyed by its ``id`` and emptied by a
``weakref.finalize`` when that tensor dies, so a later tensor at the same address cannot hit
a stale entry. A key holds the version counters of ``cu_seqlens`` and of the coordinates (an
in-place write misses), and an entry holds the coordinates tensor itself, compared by
identity. Inference tensors (no version counter) are never cached.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch

_TABLES: dict[int, dict] = {}


def _table(cu: torch.Tensor) -> dict:
    key = id(cu)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = {}
        weakref.finalize(cu, _TABLES.pop, key, None)
    return table


def cached(cu: torch.Tensor, coords: torch.Tensor | None, key: tuple[Hashable, ...], build: Callable[[], Any]) -> Any:
    """``build()``, or what it returned for the same ``cu``, ``coords`` (same objects, unmodified) and ``key``."""
    if cu.is_inference() or (coords is not None and coords.is_inference()):
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
