"""The shipped stage configs (``configs/stage{1,2}_{preset}.yaml``), written from the Python defaults.

A recipe value is written once, in :func:`invnext.train.config.train_defaults` (what differs per
preset) or as a dataclass default of :mod:`invnext.train.config` (what every preset shares). The
YAML files are rendered from those, so they cannot drift; a test compares each file with its
rendering. After changing a default, rewrite the files::

    python -m invnext.train.config_files            # rewrite configs/*.yaml
    python -m invnext.train.config_files --check    # exit 1 naming the files that differ
"""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from invnext.config import to_dict
from invnext.train.config import TrainConfig, load_train_config, train_defaults

__all__ = ["SHIPPED", "check_config_files", "render_config_file", "write_config_files"]

# (stage, preset) of every shipped file; the tiny ones show every key, the others the keys below.
SHIPPED = ((1, "tiny"), (2, "tiny"), (1, "base"), (2, "base"), (1, "large"), (2, "large"))

REPO = Path(__file__).resolve().parents[2]
COMMENT_COLUMN = 28

# Shown in every file besides the recipe's own keys: what a user of a big preset sets first.
_ALWAYS_SHOWN = ("data.source", "ops_backend", "grad_checkpointing", "compile")

_NOTES = {
    "model.preset": "tiny | base | large | 1b (invnext.config.get_preset)",
    "teacher": "default (bundled teacher) | random (smoke tests) | PATH.safetensors",
    "schedule.steps": "optimizer steps (or epochs: passes over the index; give one, the other null)",
    "schedule.warmup_steps": "linear warmup from 0 (or warmup_epochs)",
    "schedule.min_lr": "cosine decay from optim.lr down to this",
    "optim.weight_decay": "not on norms, biases, LayerScale, position tables, class/mask tokens",
    "optim.grad_clip": "global L2 norm; 0 = off",
    "batch.global_size": "clips per optimizer step, on any number of devices",
    "batch.per_device": "clips per forward pass; accumulation = global / (per_device x devices)",
    "batch.accumulation": "null = derived; a number pins it (and refuses another device count)",
    "data.source": "null = bundled default | PATH (csv / jsonl index or folder) | synthetic",
    "data.frames": "null = model.encoder.num_frames",
    "data.size": "null = model.encoder.img_size",
    "data.workers": "DataLoader decode processes",
    "data.synthetic_clips": "source: synthetic only",
    "data.default_root": "bundled dataset variant: folder (null = the cache folder),",
    "data.default_clips": "  training clips (null = 1200),",
    "data.default_teacher_steps": "its teacher's training steps (null = its default)",
    "monitor.min_std": "warn: feature std < min_std / sqrt(C)",
    "monitor.min_erank_frac": "warn: effective rank < min_erank_frac x min(rows, C)",
    "max_skipped_steps": "consecutive non-finite steps before the run stops",
    "precision": "auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32",
    "device": "auto | cpu | cuda",
    "strategy": "under torchrun: auto (fsdp for large/1b, else ddp) | ddp | fsdp",
    "threads": "CPU compute threads (null: $OMP_NUM_THREADS, else CPUs - data.workers)",
    "ops_backend": "auto (fused kernels on GPU) | torch (the plain-PyTorch baseline) | triton | cuda",
    "grad_checkpointing": "recompute each encoder/predictor/decoder block in backward: less memory, ~1 more forward",
    "compile": "torch.compile the model's forward (CPU: needs a C++ compiler)",
}
_STAGE_NOTES = {
    1: {"model.overrides": "any Stage1Config key, e.g. {encoder: {drop_path: 0.0}, mask_ratio: 0.75}",
        "init": "Stage 2 only"},
    2: {"model.overrides": "any Stage2Config key, e.g. {views: [{num_blocks: 8}, {num_blocks: 2, spatial_scale: [0.7, 0.7]}]}",
        "teacher": "Stage 1 only"},
}
_GENERATED = "# Written by `python -m invnext.train.config_files` from invnext/train/config.py: change a value there."


def _header(stage: int, preset: str, cfg: TrainConfig) -> str:
    """The file's opening comment; any value it quotes is read from ``cfg``, not restated."""
    sched, optim, batch = cfg.schedule, cfg.optim, cfg.batch
    if preset == "tiny" and stage == 1:
        prose = (
            "Stage 1 (semantic-guided pixel reconstruction) of the tiny preset on the bundled default data. "
            "Every key is shown with its value; this file is exactly `invnext pretrain --stage 1 --preset tiny`. "
            "An unknown key is an error naming it. Override any value with --set KEY=VALUE."
        )
    elif preset == "tiny":
        prose = (
            "Stage 2 (frozen-target latent prediction) of the tiny preset on the bundled default data. "
            "Exactly `invnext pretrain --stage 2 --preset tiny`. It starts from a Stage-1 result: --init CKPT, "
            "or `init:` below, or automatically OUT/stage1 with --stage both."
        )
    else:
        warmup = f"{_number(sched.warmup_epochs)} of warmup" if sched.warmup_epochs else "no warmup"
        sharded = ", sharded with FSDP2 (strategy auto)" if cfg.resolved_strategy() == "fsdp" else ""
        prose = (
            f"Stage {stage} of the {preset} preset, the paper's recipe (method.md \"Recipes\"): lr "
            f"{_number(optim.lr)}, global batch {batch.global_size}, {_number(sched.epochs)} epochs, {warmup}, "
            f"{batch.per_device} clips of {cfg.model_config().encoder.num_frames} frames per GPU{sharded}. "
            + ("Run it under torchrun, e.g." if stage == 1 else "Start it from the Stage-1 result:")
        )
    lines = [_GENERATED, *textwrap.wrap(prose, 106, initial_indent="# ", subsequent_indent="# ")]
    if preset != "tiny" and stage == 1:
        lines += [
            f"#   torchrun --nproc_per_node 8 -m invnext pretrain --stage 1 --config configs/stage1_{preset}.yaml \\",
            "#       --set data.source=/data/kmash/train.csv --set model.overrides.teacher.path=/models/siglip2-giant",
            f"# (teacher: the {preset} preset's SigLIP2 tower, loaded offline from model.teacher.path).",
            "# The release's settings: --set model.overrides.mask_ratio=0.75 --set model.overrides.mask_mode=sample",
            "#                         --set schedule.epochs=62 --set schedule.warmup_epochs=7",
        ]
    elif preset != "tiny":
        lines += [
            f"#   torchrun --nproc_per_node 8 -m invnext pretrain --stage 2 --config configs/stage2_{preset}.yaml \\",
            f"#       --init runs/{preset}/stage1 --set data.source=/data/kmash/train.csv",
        ]
    return "\n".join(lines)


def _number(v: float | int) -> str:
    """``1e-3`` for prose: the shortest form that reads back as the same number."""
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return _scalar(v)


def _scalar(v: Any) -> str:
    """One YAML value in the form the shipped files use (``5.0e-4``, ``[0.9, 0.98]``, ``null``)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v == 0 or 1e-2 <= abs(v) < 1e6:
            return repr(v)
        mantissa, exponent = f"{v:.15e}".split("e")
        mantissa = mantissa.rstrip("0")
        text = f"{mantissa}0e{int(exponent)}" if mantissa.endswith(".") else f"{mantissa}e{int(exponent)}"
        return text if float(text) == v else repr(v)
    if isinstance(v, str):
        return v if v and v.replace("_", "").replace("-", "").replace(".", "").isalnum() else json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_scalar(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"render_config_file: cannot write {type(v).__name__} {v!r}")


def _flat_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "overrides":
            out += _flat_keys(v, f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out


def render_config_file(stage: int, preset: str) -> str:
    """The text of ``configs/stage{stage}_{preset}.yaml``: the preset's resolved config with notes.

    The tiny files show every key; the others the keys the preset's recipe sets plus
    :data:`_ALWAYS_SHOWN` (the rest keep their defaults either way).
    """
    cfg = load_train_config(stage, preset=preset)
    train = to_dict(cfg)
    if preset == "tiny":
        shown = set(_flat_keys(train))
    else:
        shown = set(_flat_keys(train_defaults(stage, preset))) | set(_ALWAYS_SHOWN)
        shown -= {"teacher", "init", "seed"}  # the defaults, and a big run names its teacher in model.overrides
        if preset in ("large", "1b"):
            shown.add("strategy")  # auto means FSDP here, worth seeing
    notes = {**_NOTES, **_STAGE_NOTES[stage]}
    lines = [_header(stage, preset, cfg)]

    def emit(key: str, value: Any, indent: str) -> None:
        text = f"{indent}{key.rsplit('.', 1)[-1]}: {_scalar(value)}"
        note = notes.get(key)
        lines.append(f"{text.ljust(COMMENT_COLUMN - 1)} # {note}" if note else text)

    for name, value in train.items():
        if isinstance(value, dict):
            keys = ["preset", "overrides"] if name == "model" else [k for k in value if f"{name}.{k}" in shown]
            if keys:
                lines.append(f"{name}:")
                for k in keys:
                    emit(f"{name}.{k}", value[k], "  ")
        elif name in shown:
            emit(name, value, "")
    return "\n".join(lines) + "\n"


def _path(stage: int, preset: str, folder: Path) -> Path:
    return folder / f"stage{stage}_{preset}.yaml"


def write_config_files(folder: str | Path = REPO / "configs") -> list[Path]:
    """Rewrite every shipped file in ``folder``; returns the ones whose text changed."""
    changed = []
    for stage, preset in SHIPPED:
        path, text = _path(stage, preset, Path(folder)), render_config_file(stage, preset)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed


def check_config_files(folder: str | Path = REPO / "configs") -> list[Path]:
    """The shipped files in ``folder`` that differ from their rendering (missing ones included)."""
    return [
        path for stage, preset in SHIPPED
        if not (path := _path(stage, preset, Path(folder))).is_file() or path.read_text() != render_config_file(stage, preset)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m invnext.train.config_files", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 naming the files that differ")
    parser.add_argument("--folder", default=str(REPO / "configs"), help="the configs folder (default: the repository's)")
    args = parser.parse_args(argv)
    if args.check:
        stale = check_config_files(args.folder)
        for path in stale:
            print(f"{path}: differs from the defaults in invnext/train/config.py; run python -m invnext.train.config_files")
        return 1 if stale else 0
    for path in write_config_files(args.folder):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
