"""torch.distributed plumbing: process group from the torchrun environment, DDP / FSDP2 wrapping, reductions.

``torchrun --nproc_per_node N -m invnext pretrain ...`` sets ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``; :func:`setup` reads them and joins the group
(NCCL when the run uses CUDA, gloo on CPUs). Without them the run is one plain process and every
helper here is a no-op. Nothing here starts or manages processes.

Wrapping (only when ``world_size > 1``):

* ``"ddp"``: ``DistributedDataParallel`` over the trainable parameters (frozen teacher / target
  parameters carry no gradient and are not synchronised; every rank builds them identically).
* ``"fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``), one unit per encoder block,
  predictor layer and decoder block, then the root; frozen parameters are left out of the
  sharding (``ignored_params``), so a frozen teacher or target stays whole on every rank.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "gather_objects",
    "grad_sync",
    "setup",
    "teardown",
    "unwrap",
    "wrap_model",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, its ``device``, and the backend (None = single process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer") from None


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group if there is one, and pick this process's device.

    ``device``: ``"auto"`` (CUDA when visible, else CPU), ``"cpu"`` or ``"cuda"``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"setup: device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA GPU (use device: auto or cpu)")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = None
    if world > 1:
        backend = "nccl" if use_cuda else "gloo"
        if not dist.is_initialized():
            kwargs = {"device_id": dev} if use_cuda else {}
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, dev, backend)


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def _shard_units(model: nn.Module) -> Iterable[nn.Module]:
    """The repeated blocks of our models, each a natural FSDP unit (trainable ones only)."""
    for owner in ("encoder", "predictor", "decoder"):
        sub = getattr(model, owner, None)
        for name in ("blocks", "layers"):
            for block in getattr(sub, name, None) or ():
                if any(p.requires_grad for p in block.parameters()):
                    yield block


def wrap_model(model: nn.Module, strategy: str, info: DistInfo) -> nn.Module:
    """``model`` wrapped for data-parallel training with ``strategy`` ("ddp" / "fsdp"); as is on one process."""
    if not info.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        frozen = {p for p in model.parameters() if not p.requires_grad}
        for block in _shard_units(model):
            fully_shard(block, ignored_params={p for p in block.parameters() if p in frozen} or None)
        fully_shard(model, ignored_params=frozen or None)
        return model
    raise ValueError(f"wrap_model: strategy must be 'ddp' or 'fsdp', got {strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The user module under a DDP wrapper (FSDP2 shards in place, so it is the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: gradient sync across ranks only when ``sync`` (the last one).

    DDP: ``no_sync()`` on the others. FSDP2: ``set_requires_gradient_sync(sync)`` (the gradients of the
    skipped micro-batches accumulate unsharded and are reduce-scattered once). One process: nothing.
    """
    if hasattr(model, "no_sync"):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``values`` over ranks (float64 on the host for the logging path: exact for small sums)."""
    if not info.distributed:
        return values
    t = values.to(info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def broadcast_object(obj, info: DistInfo):
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box: list = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, info: DistInfo) -> Sequence:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not info.distributed:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
