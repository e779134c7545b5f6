"""The default Stage-1 teacher: a :class:`TinyTeacher` trained to recognise the bundled digits.

Stage 1 aligns the student with a frozen image teacher and keeps visible the tokens the
teacher's pool head attends to; a randomly initialised teacher would carry no semantics. So
the default run first trains the tiny preset's ``TinyTeacher`` as an image classifier on the
same shipped images the clips are made of (the *train* pool of :func:`bundled.digit_split`
only; validation digits stay unseen):

* inputs: single frames rendered like the clips' (:func:`bundled.render_frames`: a digit of
  random size in a random colour at a random position, wrapping, on a random gradient),
  with digit sizes covering the clips' after a random resized crop;
* a linear head on the pool head's output (before its L2 norm), cross-entropy, AdamW with a
  short warm-up and cosine decay; the head is discarded afterwards.

Measured on a 2-core CPU: ~200 steps of 48 frames reach > 95% accuracy on frames of held-out
digit images in ~25 s. The weights go to ``teacher.safetensors`` beside the clips, with
``teacher.json`` (the TeacherConfig, the training settings, the held-out accuracy).

Training runs the teacher's own modules through :func:`frame_forward`, which batches the
attention of all frames into one SDPA call: the packed reference ``masked_attention`` loops
over samples, far slower for thousands of 49-token frames. A test checks it equals
``TinyTeacher.forward``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from invnext.config import TeacherConfig, from_dict, get_preset, to_dict
from invnext.data import bundled
from invnext.models.io import load_weights, save_weights
from invnext.models.layers import patchify
from invnext.models.teacher import TinyTeacher

logger = logging.getLogger("invnext.data")

TEACHER_VERSION = 1
DEFAULT_STEPS = 200
BATCH_SIZE = 48
LR = 2e-3
WEIGHT_DECAY = 0.05
WARMUP = 20
EVAL_SAMPLES = 600
# Digit sides at BASE_SIZE: the clips' 28-40 px, up to the 1.4x zoom of a 0.5-area crop.
DIGIT_SIZE = (22, 58)
WEIGHTS_NAME, CONFIG_NAME = "teacher.safetensors", "teacher.json"


def default_teacher_config() -> TeacherConfig:
    """The tiny preset's teacher (the one the default run uses)."""
    return get_preset("tiny").stage1.teacher


# --------------------------------------------------------------------------- data


def render_digit_frames(
    pool: tuple[np.ndarray, np.ndarray], n: int, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` single frames ``uint8 [n, size, size, 3]`` of random digits of ``pool`` and their classes ``int64 [n]``."""
    images, classes = pool
    pick = rng.integers(0, len(classes), n)
    lo, hi = bundled.scaled(DIGIT_SIZE[0], size), min(bundled.scaled(DIGIT_SIZE[1], size), size)
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, j in enumerate(pick):
        side = int(rng.integers(lo, hi + 1))
        fg, bg = bundled.random_colours(rng, size)
        frames[i] = bundled.render_frames(bundled.upsample_digit(images[j], side), rng.integers(0, size, (1, 2)), fg, bg)[0]
    return frames, classes[pick]


def normalise_frames(frames: np.ndarray, teacher: TinyTeacher) -> torch.Tensor:
    """``uint8 [F, H, W, 3]`` -> ``float32 [F, 3, H, W]`` normalised with the teacher's mean/std."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(teacher.mean).view(1, 3, 1, 1)
    std = torch.tensor(teacher.std).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- model


def frame_forward(teacher: TinyTeacher, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TinyTeacher`` on single frames ``[F, 3, s, s]`` with batched attention.

    Returns (pooled ``[F, Cp]`` before the L2 norm, pool attention ``[F, S]``): the same math as
    ``TinyTeacher.forward`` (whose ``pooled`` is ``l2norm`` of the first), every frame's
    attention in one ``scaled_dot_product_attention`` call instead of one call per frame.
    """
    Fn = frames.shape[0]
    x = teacher.patch_embed(patchify(frames[:, :, None], teacher.patch_size)) + teacher.pos_embed.to(frames.dtype)
    _, S, C = x.shape
    for block in teacher.blocks:
        H = block.heads
        qkv = block.qkv(block.norm1(x)).view(Fn, S, 3, H, C // H).permute(2, 0, 3, 1, 4)  # [3, F, H, S, D]
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + block.proj(o.transpose(1, 2).reshape(Fn, S, C))
        x = x + block.mlp(block.norm2(x))
    return teacher.head(teacher.post_norm(x))


@torch.no_grad()
def accuracy(teacher: TinyTeacher, head: nn.Module, frames: np.ndarray, classes: np.ndarray, batch: int = 200) -> float:
    """Top-1 accuracy of ``head(pooled)`` on ``frames`` (uint8 [N, s, s, 3])."""
    teacher.eval()
    correct = 0
    for i in range(0, len(classes), batch):
        pooled, _ = frame_forward(teacher, normalise_frames(frames[i : i + batch], teacher))
        correct += int((head(pooled).argmax(1).numpy() == classes[i : i + batch]).sum())
    return correct / len(classes)


def train_teacher(
    cfg: TeacherConfig | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = 0,
) -> tuple[TinyTeacher, dict[str, Any]]:
    """Train a ``TinyTeacher(cfg)`` on the bundled digits' train pool; returns (teacher frozen in eval mode, stats).

    ``stats``: ``val_accuracy`` (frames of held-out digit images), ``train_accuracy`` (the
    last 10 batches), ``seconds``, ``steps``, ``batch_size``, ``lr``, ``chance`` (0.1).
    """
    cfg = default_teacher_config() if cfg is None else cfg
    if cfg.kind != "tiny":
        raise ValueError(f"train_teacher: only the bundled tiny teacher can be trained here, got kind={cfg.kind!r}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"train_teacher: {name} must be an int >= 1, got {v!r}")
    t0 = time.perf_counter()
    split = bundled.digit_split(seed)
    size = cfg.img_size
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG stream alone
        torch.manual_seed(seed)
        teacher = TinyTeacher(cfg)
        head = nn.Linear(cfg.pooled_dim, len(bundled.APPEARANCE))
    decay = [p for n, p in teacher.named_parameters() if p.dim() >= 2 and "pos_embed" not in n] + [head.weight]
    other = [p for n, p in teacher.named_parameters() if not (p.dim() >= 2 and "pos_embed" not in n)] + [head.bias]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )
    warmup = min(WARMUP, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
    )
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7EAC]))
    teacher.train()
    recent: list[float] = []
    for step in range(steps):
        frames, classes = render_digit_frames(split["train"], batch_size, size, rng)
        pooled, _ = frame_forward(teacher, normalise_frames(frames, teacher))
        logits = head(pooled)
        target = torch.from_numpy(classes)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(teacher.parameters()) + list(head.parameters()), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [float((logits.argmax(1) == target).float().mean())])[-10:]
    eval_frames, eval_classes = render_digit_frames(
        split["val"], EVAL_SAMPLES, size, np.random.default_rng(np.random.SeedSequence([seed, 0xE7A1]))
    )
    val_acc = accuracy(teacher, head, eval_frames, eval_classes)
    teacher.requires_grad_(False)
    teacher.eval()
    stats = {
        "val_accuracy": round(val_acc, 4),
        "train_accuracy": round(float(np.mean(recent)), 4),
        "chance": 1.0 / len(bundled.APPEARANCE),
        "seconds": round(time.perf_counter() - t0, 2),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "eval_samples": EVAL_SAMPLES,
    }
    return teacher, stats


# --------------------------------------------------------------------------- cache


def _settings(cfg: TeacherConfig, steps: int, seed: int) -> dict[str, Any]:
    return {"version": TEACHER_VERSION, "config": to_dict(cfg), "steps": steps, "batch_size": BATCH_SIZE, "lr": LR, "seed": seed}


def ensure_teacher(
    root: str | os.PathLike, *, cfg: TeacherConfig | None = None, steps: int | None = None, seed: int = 0
) -> Path:
    """Train and cache the teacher in ``root`` unless ``root/teacher.json`` already records these settings.

    Writes ``teacher.safetensors`` then ``teacher.json`` (each through a temporary file and a
    rename, the JSON last, so a present JSON means complete weights). Returns the weights path.
    """
    root = Path(root)
    cfg = default_teacher_config() if cfg is None else cfg
    steps = DEFAULT_STEPS if steps is None else steps
    settings = _settings(cfg, steps, seed)
    weights, meta = root / WEIGHTS_NAME, root / CONFIG_NAME
    try:
        if weights.is_file() and json.loads(meta.read_text()).get("settings") == settings:
            return weights
    except (OSError, ValueError):
        pass
    logger.info("training the default teacher (%d steps of %d frames)", steps, BATCH_SIZE)
    teacher, stats = train_teacher(cfg, steps=steps, seed=seed)
    logger.info(
        "default teacher: %.1f%% accuracy on held-out digits (chance 10%%), trained in %.1f s",
        100 * stats["val_accuracy"], stats["seconds"],
    )  # fmt: skip
    tmp = root / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    save_weights(teacher, tmp, metadata={"kind": "TinyTeacher", "settings": json.dumps(settings, sort_keys=True)})
    os.replace(tmp, weights)
    tmp_meta = root / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    tmp_meta.write_text(json.dumps({"settings": settings, "config": to_dict(cfg), "stats": stats}, indent=1))
    os.replace(tmp_meta, meta)
    return weights


def load_default_teacher(data: Any, cfg: TeacherConfig | None = None) -> TinyTeacher:
    """The cached default teacher, frozen (``requires_grad=False``) in eval mode.

    ``data``: a :class:`bundled.DefaultData` or its root folder. ``cfg``: the TeacherConfig the
    caller's model expects (default: the cached one); a mismatch raises ValueError naming the
    differing fields.
    """
    root = Path(data.root if isinstance(data, bundled.DefaultData) else data)
    weights, meta = root / WEIGHTS_NAME, root / CONFIG_NAME
    if not (weights.is_file() and meta.is_file()):
        raise FileNotFoundError(
            f"load_default_teacher: no trained teacher in {root} (expected {WEIGHTS_NAME} and {CONFIG_NAME}); "
            "run ensure_default_dataset(..., teacher=True)"
        )
    saved = from_dict(TeacherConfig, json.loads(meta.read_text())["config"])
    if cfg is not None and cfg != saved:
        diff = {k: (v, getattr(saved, k)) for k, v in to_dict(cfg).items() if to_dict(saved)[k] != v}
        raise ValueError(f"load_default_teacher: the cached teacher was trained with other settings (wanted, cached): {diff}")
    teacher = TinyTeacher(saved)
    load_weights(teacher, weights)
    teacher.requires_grad_(False)
    return teacher.eval()
