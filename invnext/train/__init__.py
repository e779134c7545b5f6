"""The pretraining trainer behind ``invnext pretrain``.

* :mod:`~invnext.train.config`: the typed per-stage :class:`TrainConfig` (YAML / TOML / JSON files,
  ``--set`` overrides, per-preset recipes), unknown keys rejected by name;
* :mod:`~invnext.train.loop`: one stage (build, resume, steps, checkpoints, records);
* :mod:`~invnext.train.run`: the stages in order (``--stage 1 | 2 | both``);
* :mod:`~invnext.train.optim`: AdamW groups and the warmup + cosine schedule;
* :mod:`~invnext.train.batches`: which clips each step and device sees, per-micro-batch seeds;
* :mod:`~invnext.train.distributed`: torchrun process group, DDP / FSDP2;
* :mod:`~invnext.train.checkpoint`: pickle-free atomic checkpoints;
* :mod:`~invnext.train.records`: progress line, metrics JSONL, TensorBoard, loss plot, summary;
* :mod:`~invnext.train.monitors`: feature-collapse monitors;
* :mod:`~invnext.train.sources`: the data and the Stage-1 teacher (bridge to :mod:`invnext.data`).

Importing this package loads no data, builds no model and touches no GPU.
"""
from invnext.train.config import TrainConfig, load_train_config, train_defaults
from invnext.train.loop import NonFiniteLossError, RunExistsError, StageResult, UsageError, train_stage
from invnext.train.run import pretrain, resolve_configs

__all__ = [
    "NonFiniteLossError",
    "RunExistsError",
    "StageResult",
    "TrainConfig",
    "UsageError",
    "load_train_config",
    "pretrain",
    "resolve_configs",
    "train_defaults",
    "train_stage",
]
