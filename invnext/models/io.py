"""Weights on disk: safetensors only (no pickle, so loading a file never runs code).

``save_weights`` writes a module's ``state_dict`` (contiguous CPU copies; tensors that share
storage, e.g. tied weights, are stored once per name) with optional string metadata;
``load_weights`` reads it back into a module with ``load_state_dict``. The Stage-2 target
encoder and any frozen teacher are ordinary submodules, so their weights travel too.
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file


def save_weights(module: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``module.state_dict()`` to ``path`` as safetensors (every tensor copied to contiguous CPU memory)."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("save_weights: metadata must map str to str")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, os.fspath(path), metadata=dict(metadata) if metadata else None)


def load_weights(
    module: nn.Module, path: str | os.PathLike, *, strict: bool = True, device: str | torch.device | None = None
):
    """Load a safetensors file written by :func:`save_weights` into ``module``.

    Tensors are read onto ``device`` (default: CPU; ``load_state_dict`` copies them to the
    module's own device). Returns ``load_state_dict``'s (missing_keys, unexpected_keys).
    """
    state = load_file(os.fspath(path), device=str(device) if device is not None else "cpu")
    return module.load_state_dict(state, strict=strict)
