"""Where a run's clips and its Stage-1 teacher come from (the bridge to :mod:`invnext.data`).

* ``data.source = None``: the bundled default dataset (``ensure_default_dataset``, generated on
  first use), its ``train.csv`` read by ``VideoDataset`` with the dataset's recommended training
  augmentation (its ``train_scale`` / ``train_flip``).
* ``data.source = PATH``: a CSV / JSONL index or a folder of videos, read by ``VideoDataset``.
* ``data.source = "synthetic"``: :class:`invnext.train.batches.SyntheticClips`.

The teacher (Stage 1, ``TrainConfig.teacher``): ``"default"`` is the bundled default teacher
(``load_default_teacher``) when the model's teacher is the tiny kind, or the local SigLIP /
SigLIP2 tower ``model.teacher.path`` names otherwise; ``"random"`` a freshly initialised
:class:`~invnext.models.TinyTeacher` (smoke tests only: it teaches nothing); any other value is
a safetensors file of teacher weights for the model's teacher config.

Augmentation per epoch: ``VideoDataset`` seeds sample ``i`` from ``(seed, epoch, i)`` with the
epoch in memory shared by all workers. Prefetching workers would race with a ``set_epoch`` at
an epoch boundary, so items are addressed as ``(index, epoch)`` pairs and each process keeps its
own epoch (:class:`EpochItems`): a clip's augmentation depends on its position in the run only.
"""
from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from invnext.config import Stage1Config
from invnext.models import build_teacher, load_weights
from invnext.train.batches import SyntheticClips
from invnext.train.config import TrainConfig
from invnext.train.distributed import DistInfo, barrier

__all__ = ["EpochItems", "build_dataset", "build_stage1_teacher", "collate_fn", "default_data"]


def _data_api(name: str) -> Callable:
    """``invnext.data``'s public function ``name`` (from the package, else the module that defines it)."""
    for module in ("invnext.data", "invnext.data.bundled", "invnext.data.dataset"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(mod, name):
            return getattr(mod, name)
    raise ImportError(f"invnext.data provides no {name}() (is the data package complete?)")


def collate_fn() -> Callable:
    return _data_api("collate_videos")


class EpochItems(Dataset):
    """``dataset[(index, epoch)]``: the item with the augmentation of ``epoch`` (module docstring)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._local = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, epoch = key
        if not hasattr(self.dataset, "set_epoch"):
            return self.dataset[index]
        if self._local is None:
            # A per-process copy with its own (unshared) epoch counter: VideoDataset keeps the epoch
            # in shared memory, which one worker's set_epoch would change under the others.
            self._local = copy.copy(self.dataset)
            if isinstance(getattr(self._local, "_epoch", None), torch.Tensor):
                self._local._epoch = torch.zeros((), dtype=torch.int64)
        self._local.set_epoch(int(epoch))
        return self._local[index]

    def __getstate__(self) -> dict:
        return {"dataset": self.dataset, "_local": None}


_DEFAULT_CACHE: dict = {}


def default_data(cfg: TrainConfig, info: DistInfo):
    """The bundled default dataset (generated once; rank 0 first, the others then find it ready)."""
    d = cfg.data
    key = (d.default_root, d.default_clips, d.default_teacher_steps)
    if key in _DEFAULT_CACHE:
        return _DEFAULT_CACHE[key]
    from invnext.teacher_pretrain import ensure_default_dataset as ensure

    kwargs: dict[str, Any] = {}
    if d.default_clips is not None:
        kwargs.update(num_train=d.default_clips, num_val=max(1, d.default_clips // 4))
    if d.default_teacher_steps is not None:
        kwargs["teacher_steps"] = d.default_teacher_steps
    data = None
    if info.is_main:
        data = ensure(d.default_root, **kwargs)
    barrier(info)
    if not info.is_main:
        data = ensure(d.default_root, **kwargs)
    _DEFAULT_CACHE[key] = data
    return data


def build_dataset(cfg: TrainConfig, frames: int, size: int, info: DistInfo) -> tuple[Dataset, str]:
    """``(dataset addressed by (index, epoch), description)`` of ``cfg.data`` at ``frames`` x ``size`` px."""
    src = cfg.data.source
    if src == "synthetic":
        return EpochItems(SyntheticClips(cfg.data.synthetic_clips, frames, size, cfg.seed)), f"synthetic ({cfg.data.synthetic_clips} clips)"
    VideoDataset = _data_api("VideoDataset")
    if src is None:
        data = default_data(cfg, info)
        ds = VideoDataset(
            str(data.train_index), frames, size, train=True, seed=cfg.seed,
            scale=tuple(data.train_scale), flip=bool(data.train_flip),
        )
        return EpochItems(ds), f"bundled default ({data.train_index}, {len(ds)} clips)"
    ds = VideoDataset(src, frames, size, train=True, seed=cfg.seed)
    return EpochItems(ds), f"{src} ({len(ds)} clips)"


def build_stage1_teacher(cfg: TrainConfig, model_cfg: Stage1Config, info: DistInfo) -> nn.Module:
    """The frozen Stage-1 teacher ``cfg.teacher`` names (module docstring)."""
    choice = cfg.teacher
    if choice == "default":
        if model_cfg.teacher.kind == "tiny":
            from invnext.teacher_pretrain import load_default_teacher

            return load_default_teacher(default_data(cfg, info))
        return build_teacher(model_cfg.teacher)
    teacher = build_teacher(model_cfg.teacher)
    if choice == "random":
        return teacher
    missing, unexpected = load_weights(teacher, choice, strict=False)
    if missing or unexpected:
        raise ValueError(f"teacher weights {choice}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return teacher
