"""Typed training configuration: one :class:`TrainConfig` per stage, read from YAML / TOML / JSON.

A config file describes one stage and overrides that stage's defaults for its model preset
(:func:`train_defaults`); ``--set key=value`` overrides the file. Every key is checked by
:func:`invnext.config.from_dict`: an unknown key raises :class:`~invnext.config.ConfigError`
naming it (with the closest valid key), a wrong type a ``TypeError`` naming its path, all
before any data or model is touched. The model section (``model.preset`` + ``model.overrides``)
is resolved into a full ``Stage1Config`` / ``Stage2Config`` at load time, so a misspelt model key
fails just as early.

Where each value is written: what differs per preset in :func:`train_defaults`; what every preset
shares (betas, eps, the monitor's thresholds, ...) as a dataclass default below, which also fills
any key a recipe leaves out. The shipped ``configs/*.yaml`` are rendered from these two by
:mod:`invnext.train.config_files` (a test holds them to it), so a value is changed here only;
``configs/stage1_tiny.yaml`` shows every key of a file, with a note on each.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from invnext.config import (
    PRESETS,
    ConfigError,
    Stage1Config,
    Stage2Config,
    _Checked,
    from_dict,
    get_preset,
    override,
    to_dict,
)

__all__ = [
    "BatchConfig",
    "DataConfig",
    "ModelSection",
    "MonitorConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "load_train_config",
    "parse_set",
    "read_config_file",
    "train_defaults",
]


def _require_finite(cfg: _Checked, *names: str) -> None:
    """Reject inf / nan in the float fields ``names`` of ``cfg`` (None is left to the other checks)."""
    for name in names:
        value = getattr(cfg, name)
        cfg._require(value is None or math.isfinite(value), name, "must be a finite number")


@dataclass(frozen=True)
class ModelSection(_Checked):
    """The model: a preset (``invnext.config.get_preset``) plus overrides of that stage's model config."""

    preset: str = "tiny"
    overrides: Any = field(default_factory=dict)  # keys of Stage1Config / Stage2Config, checked in TrainConfig

    def validate(self) -> None:
        if self.preset not in PRESETS:
            get_preset(self.preset)  # raises ConfigError naming the preset and the known ones
        if not isinstance(self.overrides, Mapping):
            raise TypeError(f"ModelSection.overrides: expected a mapping, got {type(self.overrides).__name__}")


@dataclass(frozen=True)
class OptimConfig(_Checked):
    """AdamW. ``lr`` is the peak rate reached after warmup; ``grad_clip`` 0 disables clipping."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.05
    grad_clip: float = 5.0

    def validate(self) -> None:
        # inf passes the sign checks below, then trains and fails at the first checkpoint (JSON has no inf)
        _require_finite(self, "lr", "eps", "weight_decay", "grad_clip")
        self._require(self.lr > 0, "lr", "must be > 0")
        self._require(all(0.0 <= b < 1.0 for b in self.betas), "betas", "must lie in [0, 1)")
        self._require(self.eps > 0, "eps", "must be > 0")
        self._require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self._require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")


@dataclass(frozen=True)
class ScheduleConfig(_Checked):
    """Length and learning-rate schedule: linear warmup from 0, then cosine from ``lr`` to ``min_lr``.

    Give ``steps`` (optimizer steps) or ``epochs`` (passes over the training index, rounded up to
    whole steps), not both; likewise ``warmup_steps`` or ``warmup_epochs``.
    """

    steps: int | None = 1000
    epochs: float | None = None
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    min_lr: float = 0.0

    def validate(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError(
                f"ScheduleConfig: give exactly one of steps / epochs (the other null), got steps={self.steps}, epochs={self.epochs}"
            )
        _require_finite(self, "epochs", "warmup_epochs", "min_lr")
        self._require(self.steps is None or self.steps >= 1, "steps", "must be >= 1")
        self._require(self.epochs is None or self.epochs > 0, "epochs", "must be > 0")
        self._require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._require(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        self._require(self.warmup_steps == 0 or self.warmup_epochs == 0, "warmup_epochs", "give warmup_steps or warmup_epochs, not both")
        self._require(self.min_lr >= 0, "min_lr", "must be >= 0")


@dataclass(frozen=True)
class BatchConfig(_Checked):
    """``global_size`` clips per optimizer step, ``per_device`` clips per forward pass on one device.

    Gradient accumulation = ``global_size / (per_device * world_size)``, which must be a whole
    number; ``accumulation`` (optional) pins it, and the run refuses a world size that disagrees.
    """

    global_size: int = 2048
    per_device: int = 16
    accumulation: int | None = None

    def validate(self) -> None:
        self._require(self.global_size >= 1, "global_size", "must be >= 1")
        self._require(self.per_device >= 1, "per_device", "must be >= 1")
        self._require(self.global_size % self.per_device == 0, "global_size", f"must be a multiple of per_device={self.per_device}")
        self._require(self.accumulation is None or self.accumulation >= 1, "accumulation", "must be None or >= 1")
        if self.accumulation is not None:
            micro = self.global_size // self.per_device
            self._require(micro % self.accumulation == 0, "accumulation", f"must divide global_size / per_device = {micro}")

    def accumulation_for(self, world_size: int) -> int:
        """Micro-batches per device per step on ``world_size`` devices (ValueError when it is not whole)."""
        micro = self.global_size // self.per_device
        if micro % world_size:
            raise ValueError(
                f"batch.global_size={self.global_size} is {micro} micro-batches of per_device={self.per_device}, "
                f"which does not split over {world_size} devices; change batch.global_size or batch.per_device"
            )
        accum = micro // world_size
        if self.accumulation is not None and self.accumulation != accum:
            raise ValueError(
                f"batch.accumulation={self.accumulation} but global_size / (per_device * world_size) = "
                f"{self.global_size} / ({self.per_device} * {world_size}) = {accum}"
            )
        return accum


@dataclass(frozen=True)
class DataConfig(_Checked):
    """Training clips.

    ``source``: None = the bundled default dataset (``invnext.teacher_pretrain.ensure_default_dataset``); an
    index file / folder that ``invnext.data.VideoDataset`` reads; or ``"synthetic"``: random uint8
    clips (``synthetic_clips`` of them, fixed per index), for smoke tests and throughput runs.
    ``frames`` / ``size`` default to the model's ``encoder.num_frames`` / ``encoder.img_size``.
    ``default_root`` / ``default_clips`` / ``default_teacher_steps`` pick a variant of the bundled
    dataset (its folder, its number of training clips, its teacher's training steps); None = the
    standard one in the standard cache folder.
    """

    source: str | None = None
    frames: int | None = None
    size: int | None = None
    workers: int = 2
    synthetic_clips: int = 64
    default_root: str | None = None
    default_clips: int | None = None
    default_teacher_steps: int | None = None

    def validate(self) -> None:
        self._require(self.frames is None or self.frames >= 1, "frames", "must be None or >= 1")
        self._require(self.size is None or self.size >= 1, "size", "must be None or >= 1")
        self._require(self.workers >= 0, "workers", "must be >= 0")
        self._require(self.synthetic_clips >= 1, "synthetic_clips", "must be >= 1")
        self._require(self.default_clips is None or self.default_clips >= 1, "default_clips", "must be None or >= 1")
        self._require(
            self.default_teacher_steps is None or self.default_teacher_steps >= 1, "default_teacher_steps", "must be None or >= 1"
        )


@dataclass(frozen=True)
class MonitorConfig(_Checked):
    """Collapse warnings (see ``invnext.train.monitors``).

    Warn when the features' std across the batch falls below ``min_std / sqrt(C)`` (1/sqrt(C) is
    the std of isotropic unit vectors), or their effective rank below ``min_erank_frac * min(rows, C)``.
    """

    min_std: float = 0.05
    min_erank_frac: float = 0.02

    def validate(self) -> None:
        _require_finite(self, "min_std")
        self._require(self.min_std >= 0, "min_std", "must be >= 0")
        self._require(0 <= self.min_erank_frac <= 1, "min_erank_frac", "must lie in [0, 1]")


@dataclass(frozen=True)
class TrainConfig(_Checked):
    """Everything one pretraining stage needs (module docstring: the file layout)."""

    stage: Literal[1, 2] = 1
    model: ModelSection = field(default_factory=ModelSection)
    teacher: str = "default"  # stage 1: "default" (the bundled default teacher), "random", or a safetensors path
    init: str | None = None  # stage 2: Stage-1 checkpoint; "random" = no init (smoke tests only)
    seed: int = 0
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    max_skipped_steps: int = 10  # consecutive non-finite steps tolerated before the run stops
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    progress: bool = True
    tensorboard: bool = True
    threads: int | None = None  # CPU runs: compute threads; None = $OMP_NUM_THREADS, else CPU count - data.workers
    ops_backend: Literal["auto", "torch", "triton", "cuda"] = "auto"  # every invnext.ops call of the model
    grad_checkpointing: bool = False  # activation checkpointing per encoder / predictor / decoder block
    compile: bool = False  # torch.compile the model's forward (in place: no _orig_mod. prefix in the weights)

    def validate(self) -> None:
        for name in ("save_every", "keep_last", "log_every", "max_skipped_steps"):
            self._require(getattr(self, name) >= 1, name, "must be >= 1")
        self._require(self.threads is None or self.threads >= 1, "threads", "must be None or >= 1")
        if self.schedule.min_lr > self.optim.lr:  # the cosine would climb from lr to min_lr
            raise ValueError(
                f"TrainConfig.schedule.min_lr: must be <= optim.lr={self.optim.lr!r} (the cosine decays from lr to "
                f"min_lr), got {self.schedule.min_lr!r}"
            )
        self.model_config()  # a bad model override fails here, before anything runs

    def model_config(self) -> Stage1Config | Stage2Config:
        """The stage's model config: the preset's, with ``model.overrides`` applied (checked)."""
        preset = get_preset(self.model.preset)
        base = preset.stage1 if self.stage == 1 else preset.stage2
        try:
            return override(base, self.model.overrides)
        except (ConfigError, TypeError, ValueError) as exc:
            raise type(exc)(f"model.overrides: {exc}") from None

    def resolved_strategy(self) -> str:
        if self.strategy != "auto":
            return self.strategy
        return "fsdp" if self.model.preset in ("large", "1b") else "ddp"


# --------------------------------------------------------------------------- defaults per preset


def train_defaults(stage: int, preset: str) -> dict[str, Any]:
    """The training recipe a preset starts from (plain data, as a config file would hold it).

    The one place a preset's recipe values are written (``configs/*.yaml`` are rendered from it).
    ``tiny`` is sized so that both stages on the bundled default data finish within minutes on a
    2-core laptop CPU. ``base`` / ``large`` / ``1b`` follow the paper (method.md "Recipes"); Stage 1's
    warmup keeps the release's 7/62 ratio, and the per-device batch is the release's Stage-1 value
    (its Stage-2 14 does not divide 2048), halved for Stage 2 of large / 1b (32-frame clips).
    """
    if stage not in (1, 2):
        raise ValueError(f"train_defaults: stage must be 1 or 2, got {stage!r}")
    if preset not in PRESETS:
        get_preset(preset)
    if preset == "tiny":
        # Stage 2 runs one future view per step, about half the cost of the paper's two views. Its 8 clips
        # per step halve the spread over seeds of what it learns (README, finding E).
        return {
            "stage": stage,
            "model": {"preset": "tiny", "overrides": {}},
            "teacher": "default",
            "init": None,
            "seed": 0,
            "schedule": {"steps": 360 if stage == 1 else 520, "epochs": None, "warmup_steps": 20, "min_lr": 1e-5},
            "optim": {"lr": 5e-4 if stage == 1 else 2e-4},
            "batch": {"global_size": 4, "per_device": 4} if stage == 1 else {"global_size": 8, "per_device": 8},
            "data": {"workers": 1},
            "save_every": 100,
            "keep_last": 2,
            "log_every": 5,
        }
    stage2_batch = 2048 if preset == "base" else 1024
    if stage == 1:
        recipe = {
            "schedule": {"steps": None, "epochs": 50.0, "warmup_epochs": 5.0, "min_lr": 1e-6},
            "optim": {"lr": 1e-3},
            "batch": {"global_size": 2048, "per_device": 16},
        }
    else:
        recipe = {
            "schedule": {"steps": None, "epochs": 100.0, "warmup_epochs": 0.0, "min_lr": 1e-6},
            "optim": {"lr": 1e-4},
            "batch": {"global_size": stage2_batch, "per_device": 16 if preset == "base" else 8},
        }
    return {
        "stage": stage,
        "model": {"preset": preset, "overrides": {}},
        "teacher": "default",
        "init": None,
        "seed": 0,
        **recipe,
        "data": {"workers": 8},
        "save_every": 1000,
        "keep_last": 3,
        "log_every": 20,
    }


# --------------------------------------------------------------------------- files and --set


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 insists on ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)
# Plain integers must stay ints: resolvers are tried in order, so re-add int ahead of the float above.
_Loader.yaml_implicit_resolvers = {
    k: sorted(v, key=lambda tr: tr[0] != "tag:yaml.org,2002:int") for k, v in _Loader.yaml_implicit_resolvers.items()
}


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _toml_module():
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ValueError("TOML config files need Python >= 3.11 or the tomli package (or use YAML)") from None
    return tomllib


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A config file's plain data (``.yaml`` / ``.yml`` / ``.toml`` / ``.json``)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    suffix = p.suffix.lower()
    text = p.read_text()
    if suffix in (".yaml", ".yml"):
        try:
            data = _yaml(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {p}: cannot parse: {exc}") from None
    elif suffix == ".toml":
        toml = _toml_module()
        try:
            data = toml.loads(text)
        except toml.TOMLDecodeError as exc:
            raise ValueError(f"config file {p}: cannot parse: {exc}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {p}: cannot parse: {exc}") from None
    else:
        raise ValueError(f"config file {p}: unknown format {suffix!r} (use .yaml, .yml, .toml or .json)")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TypeError(f"config file {p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_set(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-4"`` -> ``(["optim", "lr"], 0.0001)``; the value is read as a YAML scalar/list."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY such as optim.lr=1e-4")
    try:
        value = _yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ValueError(f"--set {item!r}: cannot parse the value: {exc}") from None
    return key.split("."), value


def _merge(base: dict, upd: Mapping) -> dict:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _nest(path: Sequence[str], value: Any) -> dict:
    d: Any = value
    for part in reversed(path):
        d = {part: d}
    return d


def load_train_config(
    stage: int,
    file: str | os.PathLike | None = None,
    *,
    preset: str | None = None,
    sets: Sequence[str] = (),
) -> TrainConfig:
    """The TrainConfig of ``stage``: preset defaults <- config ``file`` <- ``sets`` (``KEY=VALUE``).

    The preset is the file's ``model.preset``, else ``preset``, else ``tiny``. A ``--set`` key may
    carry a ``stage1.`` / ``stage2.`` prefix to reach one stage only (others reach both).
    Raises ConfigError / TypeError / ValueError naming the offending key and where it came from.
    """
    data: dict[str, Any] = {}
    where = f"--preset {preset or 'tiny'}"
    if file is not None:
        data = read_config_file(file)
        where = str(file)
        if "stage" not in data:
            raise ConfigError(f"{file}: a config file must say which stage it configures ('stage: 1' or 'stage: 2')")
        if data["stage"] != stage:
            raise ConfigError(f"{file}: configures stage {data['stage']!r}, expected stage {stage}")
    updates: dict[str, Any] = {}
    for item in sets:
        path, value = parse_set(item)
        if path[0] in ("stage1", "stage2"):
            if int(path[0][-1]) != stage:
                continue
            path = path[1:]
            if not path:
                raise ValueError(f"--set {item!r}: a key must follow the stage prefix")
        updates = _merge(updates, _nest(path, value))
    name = preset or "tiny"
    for layer in (data, updates):
        section = layer.get("model")
        if isinstance(section, Mapping) and "preset" in section:
            name = section["preset"]
    if not isinstance(name, str):
        raise TypeError(f"{where}: model.preset: expected a preset name, got {name!r}")
    try:
        base = train_defaults(stage, name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: model.preset: {exc}") from None
    # A file or --set that names steps replaces epochs (and the other way round), not merges with it.
    merged = base
    for layer in (data, updates):
        sched = layer.get("schedule") if isinstance(layer, Mapping) else None
        if isinstance(sched, Mapping):
            merged = dict(merged)
            merged["schedule"] = dict(merged.get("schedule", {}))
            if "steps" in sched and "epochs" not in sched:
                merged["schedule"]["epochs"] = None
            if "epochs" in sched and "steps" not in sched:
                merged["schedule"]["steps"] = None
        merged = _merge(merged, layer)
    src = where + (" with --set " + " ".join(sets) if sets else "")
    try:
        cfg = from_dict(TrainConfig, merged)
    except (ConfigError, TypeError, ValueError) as exc:
        raise type(exc)(f"{src}: {exc}") from None
    if cfg.stage != stage:
        raise ConfigError(f"{src}: stage: this config is loaded for stage {stage} but says stage {cfg.stage}")
    return cfg


def steps_for(cfg: TrainConfig, dataset_size: int) -> tuple[int, int]:
    """``(total steps, warmup steps)`` of ``cfg`` for a training index of ``dataset_size`` clips."""
    per_epoch = dataset_size / cfg.batch.global_size
    sched = cfg.schedule
    total = sched.steps if sched.steps is not None else max(1, math.ceil(sched.epochs * per_epoch))
    warmup = sched.warmup_steps if sched.warmup_epochs == 0 else math.ceil(sched.warmup_epochs * per_epoch)
    return total, min(warmup, total)


def config_to_json(cfg: TrainConfig) -> dict[str, Any]:
    """Plain data of the config and its resolved model config (what a checkpoint records)."""
    return {"train": to_dict(cfg), "model_class": type(cfg.model_config()).__name__, "model": to_dict(cfg.model_config())}


def model_config_class(stage: int) -> type:
    return Stage1Config if stage == 1 else Stage2Config
