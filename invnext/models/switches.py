"""Model-wide switches for speed and memory: the ops backend, and activation checkpointing per block.

* :func:`set_ops_backend` picks the implementation every ``invnext.ops`` call of a model
  dispatches to. ``"torch"`` is the plain-PyTorch path (every op's reference: SDPA per sample, eager
  elementwise ops): the baseline the fused path is measured against. ``"auto"`` (the default) takes the fastest
  kernel available for the tensors' device. ``"triton"`` / ``"cuda"`` force that family for
  every op that has an implementation of it (an unavailable one raises
  :class:`invnext.ops.BackendUnavailableError` when called); ops without one (the masks have no
  Triton kernel, attention no CUDA one) keep ``"auto"``, so the model still runs end to end.
* :func:`set_grad_checkpointing` recomputes each transformer block's activations in the
  backward pass instead of keeping them (encoder blocks, predictor layers, decoder res-blocks):
  memory for roughly one more forward. Only while training with grad enabled; results and
  gradients are those of the plain pass (the RNG state of drop path is replayed).

The models build every fused part from an :mod:`invnext.nn` module (:class:`invnext.nn.FusedOp`,
attribute ``ops_backend``), and a block stack opts in to checkpointing through the mixin
:class:`CheckpointedBlocks` (attribute ``grad_checkpointing``); the setters walk
``module.modules()`` and set the attribute wherever it is declared.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from invnext.nn import FusedOp
from invnext.ops._dispatch import OPS_BACKENDS, op_backend

__all__ = ["OPS_BACKENDS", "CheckpointedBlocks", "op_backend", "set_grad_checkpointing", "set_ops_backend"]


class CheckpointedBlocks:
    """Mixin of a module that runs a stack of blocks (itself an ``nn.Module``)."""

    grad_checkpointing: bool = False

    def run_block(self, block: nn.Module, *args):
        """``block(*args)``, activation-checkpointed when enabled, training and recording grad.

        ``preserve_rng_state`` (on by default) replays the forward's RNG state in the
        recomputation, so drop path drops the same samples twice.
        """
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=True)
        return block(*args)


def _check_module(fn: str, module: object) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{fn}: module must be a torch.nn.Module, got {type(module).__name__}")


def set_ops_backend(module: nn.Module, backend: str) -> nn.Module:
    """Make every :mod:`invnext.nn` op module inside ``module`` use ``backend``.

    Args:
        module: any module (a model, a wrapped or compiled model: every submodule is reached).
        backend: "auto" | "torch" | "triton" | "cuda" (module docstring).
    Returns:
        ``module`` itself (changed in place).
    """
    _check_module("set_ops_backend", module)
    if not isinstance(backend, str) or backend not in OPS_BACKENDS:
        names = ", ".join(map(repr, OPS_BACKENDS))
        raise ValueError(f"set_ops_backend: backend must be one of {names}, got {backend!r}")
    for m in module.modules():
        if isinstance(m, FusedOp):
            m.ops_backend = backend
    return module


def set_grad_checkpointing(module: nn.Module, enabled: bool) -> nn.Module:
    """Turn activation checkpointing per transformer block on or off for every block stack in ``module``.

    Args:
        module: any module (every :class:`CheckpointedBlocks` below it is switched).
        enabled: bool.
    Returns:
        ``module`` itself (changed in place).
    """
    _check_module("set_grad_checkpointing", module)
    if not isinstance(enabled, bool):
        raise TypeError(f"set_grad_checkpointing: enabled must be a bool, got {type(enabled).__name__} {enabled!r}")
    for m in module.modules():
        if isinstance(m, CheckpointedBlocks):
            m.grad_checkpointing = enabled
    return module
