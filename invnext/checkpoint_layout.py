"""Where a run keeps its weights: step folders ``<root>/step_<8 digits>/`` (written by
:mod:`invnext.train.checkpoint`), which of them are complete, the newest, and the weights file a
user points at. Below the trainer, so evaluation and loading read runs without importing it.
"""
from __future__ import annotations

import os
from pathlib import Path

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"
STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file() and (path / MODEL_FILE).is_file()


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (temp folders never count)."""
    r = Path(root)
    if not r.is_dir():
        return []
    found = []
    for p in r.iterdir():
        if p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit() and is_complete(p):
            found.append((int(p.name[len(STEP_PREFIX):]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none).

    That is the folder ``root/latest`` names, unless a kill fell between a folder's rename and the
    pointer's update, in which case the renamed (complete, fsync'd) folder is newer and wins.
    """
    done = complete_checkpoints(root)
    return done[-1] if done else None


def resolve_weights(path: str | os.PathLike) -> Path:
    """The model weights file a user pointed at: a ``.safetensors`` file, a checkpoint folder, a
    checkpoints root (its latest), or a stage output folder (its final ``model.safetensors`` or latest)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such checkpoint file or folder")
    if (p / MODEL_FILE).is_file():
        return p / MODEL_FILE
    for root in (p, p / "checkpoints"):
        latest = latest_checkpoint(root)
        if latest is not None:
            return latest / MODEL_FILE
    raise FileNotFoundError(f"{p}: holds no {MODEL_FILE} and no complete checkpoint")
