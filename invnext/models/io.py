"""Weights on disk: safetensors only (no pickle, so loading a file never runs code).

``save_weights`` writes a module's ``state_dict`` (contiguous CPU copies; tensors that share
storage, e.g. tied weights, are stored once per name) with optional string metadata;
``load_weights`` reads it back into a module with ``load_state_dict``. The Stage-2 target
encoder and any frozen teacher are ordinary submodules, so their weights travel too.

Loading names the file in every error: one that is not safetensors, a tensor whose shape does
not fit the module, and a tensor holding NaN or inf (refused: a model loaded from it would
quietly output NaN).
"""
from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["check_finite", "check_shapes", "load_weights", "read_safetensors", "save_weights"]


def read_safetensors(path: str | os.PathLike, device: str = "cpu", *, what: str = "weights") -> dict[str, torch.Tensor]:
    """``load_file``, with a ``ValueError`` naming ``path`` for a file that is not valid safetensors."""
    try:
        return load_file(os.fspath(path), device=device)
    except SafetensorError as exc:
        raise ValueError(f"{what} file {os.fspath(path)!r} is not a readable safetensors file ({exc})") from None


def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse floating tensors holding NaN or inf, naming ``where`` (the file) and the tensors."""
    bad = [k for k, v in state.items() if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{where}: {len(bad)} tensor(s) hold NaN or inf values, e.g. {bad[:5]}; refusing to load them "
            "(a diverged run's weights? load an earlier checkpoint)"
        )


def check_shapes(module: nn.Module, state: Mapping[str, torch.Tensor], where: str, skip: tuple[str, ...] = ()) -> None:
    """A ``ValueError`` naming ``where`` and each tensor whose shape differs from ``module``'s (``skip``: names
    the caller resizes itself)."""
    own = module.state_dict()
    wrong = [
        f"{k}: file {list(v.shape)}, model {list(own[k].shape)}"
        for k, v in state.items()
        if k in own and k not in skip and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        raise ValueError(f"{where}: tensor shapes do not fit the model ({len(wrong)}): " + "; ".join(wrong[:5]))


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
    Raises ValueError naming the file for a damaged file, a wrong shape or NaN / inf weights.
    """
    state = read_safetensors(path, str(device) if device is not None else "cpu")
    where = f"weights file {os.fspath(path)!r}"
    check_shapes(module, state, where)
    check_finite(state, where)
    return module.load_state_dict(state, strict=strict)
