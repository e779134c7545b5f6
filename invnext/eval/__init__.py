"""Evaluation: frozen-encoder probes (``run_probe``) and Stage-1 reconstructions (``reconstruct``).

Modules: :mod:`~invnext.eval.probe` (training and scoring the heads), :mod:`~invnext.eval.heads`
(AttentiveProbe, LinearProbe), :mod:`~invnext.eval.features` (extraction and the on-disk cache),
:mod:`~invnext.eval.views` (multi-view clips), :mod:`~invnext.eval.sources` (what can be probed),
:mod:`~invnext.eval.reconstruct`, :mod:`~invnext.eval.cli` (the two subcommands).

Names are imported on first use, so ``invnext.cli`` can build its parsers without loading torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "run_probe": "invnext.eval.probe",
    "ProbeConfig": "invnext.eval.probe",
    "AttentiveProbe": "invnext.eval.heads",
    "LinearProbe": "invnext.eval.heads",
    "extract_features": "invnext.eval.features",
    "default_feature_cache": "invnext.eval.features",
    "FeatureSource": "invnext.eval.sources",
    "register_source": "invnext.eval.sources",
    "resolve_source": "invnext.eval.sources",
    "ViewSpec": "invnext.eval.views",
    "reconstruct": "invnext.eval.reconstruct",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'invnext.eval' has no attribute {name!r}")
