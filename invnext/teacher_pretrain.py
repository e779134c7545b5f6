"""The default Stage-1 teacher: the tiny preset's ``TinyTeacher``, trained to recognise the bundled digits.

Stage 1 aligns the student with a frozen image teacher and keeps visible the tokens the
teacher's pool head attends to; a randomly initialised teacher carries no semantics. So the
default run first trains the tiny preset's teacher as an image classifier on the images the
clips are made of (the *train* pool of :func:`bundled.digit_split` only: validation digits
stay unseen), on single frames drawn like the clips' frames after a random resized crop.

The tiny preset's teacher config says ``patch_embed: conv``: its patch embedding is the small
convolutional stem :class:`invnext.models.teacher.ConvPatchEmbed`, not a linear map of each
16x16 patch. Measured on this data, a linear patch embedding stays at chance for 400 steps (it
must learn every position and sub-patch offset of a digit separately), while the conv stem
recognises digits anywhere after ~200 steps. The teacher is a plain ``TinyTeacher`` built from
that config (an ``ImageTeacher``), so the config recorded beside its weights (and in every
Stage-1 checkpoint) describes it completely.

Training (:func:`train_teacher`), from a fast-training init (:func:`_init_for_training`), in
three stages: A) the stem alone (cheap), B) the attention pool over the frozen stem's tokens,
C) a light pass through the whole teacher. Measured on an idle 2-core CPU with the defaults:
~92% on frames of held-out digit clips (chance 10%) in ~38 s. The weights go to
``teacher.safetensors`` beside the clips with ``teacher.json`` (the TeacherConfig, the
training settings and the measured accuracies); :func:`load_default_teacher` reads them back.
A cache written before ``TeacherConfig.patch_embed`` existed (its config has no such key; its
settings say ``patch_embed: {kind: conv}``) is read as a conv-stem teacher and stays valid: it
is neither retrained nor rejected (:func:`_upgrade_config`).

:func:`frame_forward` runs the teacher's own modules on single frames with all frames'
attention in one SDPA call (the packed reference ``masked_attention`` loops over samples,
which is far slower for thousands of 49-token frames); a test checks it equals
``TinyTeacher.forward``.

This module needs both the digits (:mod:`invnext.data.bundled`) and the model
(:mod:`invnext.models.teacher`), so it sits above both, beside :mod:`invnext.loading`; so does
:func:`ensure_default_dataset`, the clips with their teacher, which training and evaluation ask for.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from invnext.config import TeacherConfig, from_dict, get_preset, to_dict
from invnext.data import bundled
from invnext.models.io import load_weights, save_weights
from invnext.models.layers import patchify
from invnext.models.teacher import CONV_STEM_CHANNELS, ConvPatchEmbed, TinyTeacher  # noqa: F401 (re-exported)

logger = logging.getLogger("invnext.data")

TEACHER_VERSION = 2
STEM_CHANNELS = CONV_STEM_CHANNELS
STEM_STEPS = 220
STEM_LR = 3e-3
POOL_STEPS = 160
POOL_LR = 3e-3
DEFAULT_STEPS = 20
BATCH_SIZE = 32
LR = 5e-5  # stage C only nudges the blocks: at 1e-3, 20 steps cost 25 points of accuracy
POS_SCALE = 0.1
WEIGHT_DECAY = 0.05
WARMUP = 20
EVAL_SAMPLES = 500
# Digit sides at BASE_SIZE: the clips' 40-52 px, down to 0.9x and up to the 1.41x zoom of a 0.5-area crop.
DIGIT_SIZE = (36.0, 76.0)
WEIGHTS_NAME, CONFIG_NAME = "teacher.safetensors", "teacher.json"


def default_teacher_config() -> TeacherConfig:
    """The tiny preset's teacher (the one the default run uses)."""
    return get_preset("tiny").stage1.teacher


# --------------------------------------------------------------------------- data


def render_digit_frames(
    pool: tuple[np.ndarray, np.ndarray], n: int, size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` single frames ``uint8 [n, size, size, 3]`` of random digits of ``pool``, and their classes ``int64 [n]``.

    Like the clips' frames after a random resized crop: digit sides 36-76 px (at 112), centres
    anywhere in the middle 80% of the canvas (a digit near an edge is cut), random colours.
    """
    images, classes = pool
    pick = rng.integers(0, len(classes), n)
    k = size / bundled.BASE_SIZE
    sides = torch.from_numpy(rng.uniform(DIGIT_SIZE[0] * k, DIGIT_SIZE[1] * k, n)).float()
    centres = torch.from_numpy(rng.uniform(0.1 * size, 0.9 * size, (n, 2))).float()
    fg, bg0, bg1, angle = bundled.random_colours(rng, n)
    frames = bundled.render_digits(torch.from_numpy(images[pick]), centres, sides, fg, bg0, bg1, angle, size)
    return frames, classes[pick]


def render_clip_frames(
    pool: tuple[np.ndarray, np.ndarray], n: int, size: int, rng: np.random.Generator
) -> tuple[torch.Tensor, np.ndarray]:
    """One random frame of each of ``n`` clips exactly as :func:`bundled.make_clip` draws them (uncropped)."""
    images, classes = pool
    pick = rng.integers(0, len(classes), n)
    centres, sides = [], []
    for _ in range(n):
        c, side = bundled.clip_geometry(int(rng.integers(len(bundled.DYNAMICS))), 1, size, rng)
        centres.append(c[0])
        sides.append(side)
    fg, bg0, bg1, angle = bundled.random_colours(rng, n)
    frames = bundled.render_digits(
        torch.from_numpy(images[pick]), torch.tensor(np.array(centres)).float(), torch.tensor(sides).float(),
        fg, bg0, bg1, angle, size,
    )  # fmt: skip
    return frames, classes[pick]


def normalise_frames(frames: torch.Tensor, teacher: nn.Module) -> torch.Tensor:
    """``uint8 [F, H, W, 3]`` -> ``float32 [F, 3, H, W]`` normalised with the teacher's mean/std."""
    x = frames.permute(0, 3, 1, 2).contiguous().float()
    scale = torch.tensor([1.0 / (255.0 * s) for s in teacher.std]).view(1, 3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(teacher.mean, teacher.std)]).view(1, 3, 1, 1)
    return x.mul_(scale).sub_(shift)


# --------------------------------------------------------------------------- model


def build_default_teacher(cfg: TeacherConfig) -> TinyTeacher:
    """The default teacher's structure: ``TinyTeacher(cfg)`` (its stem is ``cfg.patch_embed``: conv by default)."""
    if cfg.kind != "tiny":
        raise ValueError(f"build_default_teacher: the default teacher is a tiny one, got kind={cfg.kind!r}")
    return TinyTeacher(cfg)


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
def accuracy(
    teacher: TinyTeacher, head: nn.Module, frames: torch.Tensor, classes: np.ndarray, batch: int = 200
) -> float:
    """Top-1 accuracy of ``head(pooled)`` on ``frames`` (uint8 [N, s, s, 3])."""
    was = teacher.training
    teacher.eval()
    correct = 0
    for i in range(0, len(classes), batch):
        pooled, _ = frame_forward(teacher, normalise_frames(frames[i : i + batch], teacher))
        correct += int((head(pooled).argmax(1).numpy() == classes[i : i + batch]).sum())
    teacher.train(was)
    return correct / len(classes)


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ~10% of the steps (at most WARMUP), then cosine decay to 0."""
    warmup = min(WARMUP, max(1, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))
        ),
    )


def _adamw(params, lr: float) -> torch.optim.AdamW:
    params = list(params)
    decay = [p for p in params if p.dim() >= 2]
    other = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))


def _init_for_training(teacher: TinyTeacher) -> None:
    """Weights that train fast (replacing the preset's 0.02-std init, under which the blocks and
    the pool head barely move in a few hundred steps): LeCun-normal linear layers, residual
    branches that start at zero (every block starts as the identity, so the stage-A
    classifier is the whole teacher's at the start of stage C), a position table scaled down
    so content dominates, and a probe of unit scale (a non-uniform attention from the start)."""
    for m in teacher.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=m.in_features**-0.5)
            nn.init.zeros_(m.bias)
    for block in teacher.blocks:
        for out in (block.proj, block.mlp[-1]):
            nn.init.zeros_(out.weight)
    teacher.pos_embed.data.mul_(POS_SCALE)
    nn.init.normal_(teacher.head.probe, std=1.0)


def _stem_tokens(teacher: TinyTeacher, x: torch.Tensor) -> torch.Tensor:
    """``post_norm(patch_embed(x) + pos)``: the tokens the pool head sees while every block is the identity."""
    tokens = teacher.patch_embed(patchify(x[:, :, None], teacher.patch_size)) + teacher.pos_embed
    return teacher.post_norm(tokens)


def train_teacher(
    cfg: TeacherConfig | None = None,
    *,
    stem_steps: int = STEM_STEPS,
    pool_steps: int = POOL_STEPS,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
) -> tuple[TinyTeacher, dict[str, Any]]:
    """Train the default teacher on the bundled digits' train pool; returns (teacher frozen in eval mode, stats).

    Three stages, cheapest first (every block is the identity until stage C):

    A. ``stem_steps`` x 64 frames: the conv patch embedding (and ``post_norm``), read out by a
       linear classifier on the max over tokens of ``post_norm(tokens)``. Reading out after the
       LayerNorm makes the stem encode the class in each token's direction, which is what the
       attention pool can use (a max over un-normalised tokens also trains the stem, but the pool
       then reaches ~70% where it reaches ~90% here).
    B. ``pool_steps`` x 64 frames: the stem frozen, the attention-pool head (and a linear
       classifier on its output) learns to pool the stem's tokens.
    C. ``steps`` x 32 frames: the whole teacher but the stem (blocks, pool head, classifier),
       through :func:`frame_forward`.

    ``stats``: ``val_accuracy`` (the pool head's classifier on single frames of clips made from
    held-out digit images), ``val_accuracy_augmented`` (held-out digits placed like crops of the
    clips: any size 36-76 px, anywhere, cut at the edges), ``stem_val_accuracy`` (stage A's
    readout on the latter), ``seconds`` and the settings.
    """
    cfg = default_teacher_config() if cfg is None else cfg
    for name, v in (("stem_steps", stem_steps), ("pool_steps", pool_steps), ("steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"train_teacher: {name} must be an int >= 0, got {v!r}")
    t0 = time.perf_counter()
    split = bundled.digit_split(seed)
    size = cfg.img_size
    n_cls = len(bundled.APPEARANCE)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG stream alone
        torch.manual_seed(seed)
        teacher = build_default_teacher(cfg)
        _init_for_training(teacher)
        stem_head = nn.Linear(cfg.width, n_cls)
        head = nn.Linear(cfg.pooled_dim, n_cls)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7EAC]))
    aug_frames, aug_classes = render_digit_frames(
        split["val"], EVAL_SAMPLES, size, np.random.default_rng(np.random.SeedSequence([seed, 0xE7A1]))
    )
    clip_frames, clip_classes = render_clip_frames(
        split["val"], EVAL_SAMPLES, size, np.random.default_rng(np.random.SeedSequence([seed, 0xE7A2]))
    )
    teacher.train()

    stage_seconds: list[float] = []

    def run(stage_steps: int, batch: int, lr: float, params, loss_fn) -> None:
        t = time.perf_counter()
        opt = _adamw(params, lr)
        sched = _schedule(opt, max(stage_steps, 1))
        for _ in range(stage_steps):
            frames, classes = render_digit_frames(split["train"], batch, size, rng)
            loss = F.cross_entropy(loss_fn(normalise_frames(frames, teacher)), torch.from_numpy(classes))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        stage_seconds.append(round(time.perf_counter() - t, 2))

    stem = teacher.patch_embed
    # A: the stem, read out after the LayerNorm
    run(stem_steps, 64, STEM_LR, [*stem.parameters(), *teacher.post_norm.parameters(), *stem_head.parameters()],
        lambda x: stem_head(_stem_tokens(teacher, x).amax(1)))  # fmt: skip
    with torch.no_grad():
        stem_acc = float(
            np.mean([
                (stem_head(_stem_tokens(teacher, normalise_frames(aug_frames[i : i + 200], teacher)).amax(1)).argmax(1).numpy()
                 == aug_classes[i : i + 200]).mean()
                for i in range(0, EVAL_SAMPLES, 200)
            ])
        )  # fmt: skip
    stem.requires_grad_(False)
    # B: the attention pool over the frozen stem's tokens
    pool_params = [*teacher.head.parameters(), *teacher.post_norm.parameters(), teacher.pos_embed, *head.parameters()]
    run(pool_steps, 64, POOL_LR, pool_params, lambda x: head(teacher.head(_stem_tokens(teacher, x))[0]))
    pool_acc = accuracy(teacher, head, aug_frames, aug_classes)
    # C: everything but the stem, through the blocks
    rest = [p for n, p in teacher.named_parameters() if not n.startswith("patch_embed.")] + list(head.parameters())
    run(steps, BATCH_SIZE, LR, rest, lambda x: head(frame_forward(teacher, x)[0]))

    aug_acc = accuracy(teacher, head, aug_frames, aug_classes)
    clip_acc = accuracy(teacher, head, clip_frames, clip_classes)
    teacher.requires_grad_(False)
    teacher.eval()
    stats = {
        "val_accuracy": round(clip_acc, 4),
        "val_accuracy_augmented": round(aug_acc, 4),
        "stem_val_accuracy": round(stem_acc, 4),
        "pool_val_accuracy": round(pool_acc, 4),
        "chance": 1.0 / n_cls,
        "seconds": round(time.perf_counter() - t0, 2),
        "stage_seconds": stage_seconds,
        "stem_steps": stem_steps,
        "pool_steps": pool_steps,
        "steps": steps,
        "seed": seed,
        "eval_samples": EVAL_SAMPLES,
    }
    return teacher, stats


# --------------------------------------------------------------------------- cache


def _settings(cfg: TeacherConfig, steps: tuple[int, int, int], seed: int) -> dict[str, Any]:
    stem: dict[str, Any] = {"kind": cfg.patch_embed}
    if cfg.patch_embed == "conv":
        stem["channels"] = list(STEM_CHANNELS)
    return {"version": TEACHER_VERSION, "config": to_dict(cfg), "patch_embed": stem, "steps": list(steps), "seed": seed}


def _upgrade_config(config: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """A cached TeacherConfig dict with its ``patch_embed`` filled in.

    Caches written before the field existed always held the conv stem, which their settings
    record as ``patch_embed: {kind: conv}``; without that record the stem was linear.
    """
    if "patch_embed" in config:
        return config
    stem = settings.get("patch_embed")
    kind = stem.get("kind", "linear") if isinstance(stem, dict) else "linear"
    return {**config, "patch_embed": kind}


def _cached_settings(meta: Path) -> dict[str, Any] | None:
    """The settings a cache's ``teacher.json`` records (upgraded by :func:`_upgrade_config`), or None."""
    try:
        settings = json.loads(meta.read_text()).get("settings")
    except (OSError, ValueError):
        return None
    if not isinstance(settings, dict) or not isinstance(settings.get("config"), dict):
        return None
    return {**settings, "config": _upgrade_config(settings["config"], settings)}


def teacher_steps(steps: int | tuple[int, int, int] | None) -> tuple[int, int, int]:
    """(stem, pool, full) step counts: None = the defaults; an int = a total budget split like the defaults
    (each stage at least one step); a triple as given."""
    default = (STEM_STEPS, POOL_STEPS, DEFAULT_STEPS)
    if steps is None:
        return default
    if isinstance(steps, int) and not isinstance(steps, bool):
        if steps < 1:
            raise ValueError(f"teacher steps must be >= 1, got {steps}")
        return tuple(max(1, round(steps * d / sum(default))) for d in default)  # type: ignore[return-value]
    steps = tuple(steps)
    if len(steps) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in steps):
        raise ValueError(f"teacher steps must be an int or (stem, pool, full) ints >= 0, got {steps!r}")
    return steps  # type: ignore[return-value]


def ensure_teacher(
    root: str | os.PathLike,
    *,
    cfg: TeacherConfig | None = None,
    steps: int | tuple[int, int, int] | None = None,
    seed: int = 0,
) -> Path:
    """Train and cache the teacher in ``root`` unless ``root/teacher.json`` already records these settings.

    ``steps``: see :func:`teacher_steps`. Writes ``teacher.safetensors`` then ``teacher.json``
    (each through a temporary file and a rename, the JSON last, so a present JSON means complete
    weights). Returns the weights path.
    """
    root = Path(root)
    cfg = default_teacher_config() if cfg is None else cfg
    steps = teacher_steps(steps)
    settings = _settings(cfg, steps, seed)
    weights, meta = root / WEIGHTS_NAME, root / CONFIG_NAME
    if weights.is_file() and _cached_settings(meta) == settings:
        return weights
    logger.info("training the default teacher (%d + %d + %d steps)", *steps)
    teacher, stats = train_teacher(cfg, stem_steps=steps[0], pool_steps=steps[1], steps=steps[2], seed=seed)
    logger.info(
        "default teacher: %.1f%% accuracy on frames of held-out digits (chance 10%%), trained in %.1f s",
        100 * stats["val_accuracy"], stats["seconds"],
    )  # fmt: skip
    tmp = root / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
    save_weights(teacher, tmp, metadata={"kind": "TinyTeacher", "settings": json.dumps(settings, sort_keys=True)})
    os.replace(tmp, weights)
    tmp_meta = root / f".{CONFIG_NAME}.tmp-{os.getpid()}"
    tmp_meta.write_text(json.dumps({"settings": settings, "config": to_dict(cfg), "stats": stats}, indent=1))
    os.replace(tmp_meta, meta)
    return weights


def ensure_default_dataset(
    root: str | os.PathLike | None = None,
    *,
    num_train: int = 1200,
    num_val: int = 400,
    frames: int = 16,
    size: int = 112,
    seed: int = 0,
    teacher: bool = True,
    teacher_steps: int | tuple[int, int, int] | None = None,
    workers: int | None = None,
) -> bundled.DefaultData:
    """The bundled dataset at ``root`` (:func:`bundled.ensure_default_clips`) and, with ``teacher``,
    the default Stage-1 teacher trained (once) and cached beside the clips.

    Args:
        num_train, num_val, frames, size, seed, workers: as :func:`bundled.ensure_default_clips`.
        teacher: also train (once) and cache the default Stage-1 teacher beside the clips.
        teacher_steps: its optimisation steps: None (the defaults, 220 + 160 + 20), an int (a total
            budget split the same way) or (stem, pool, full) counts (:func:`teacher_steps`).

    Returns a :class:`bundled.DefaultData`. Measured on an idle 2-core CPU: the default 1200 + 400
    clips in ~21 s (18 MB), the teacher in ~38 s more; later calls return at once (~30 ms).
    """
    data = bundled.ensure_default_clips(
        root, num_train=num_train, num_val=num_val, frames=frames, size=size, seed=seed, workers=workers
    )
    if not teacher:
        return data
    with bundled.cache_lock(data.root):
        ensure_teacher(data.root, steps=teacher_steps, seed=seed)
    weights, meta = data.root / WEIGHTS_NAME, data.root / CONFIG_NAME
    have = weights.is_file() and meta.is_file()
    return dataclasses.replace(data, teacher_weights=weights if have else None, teacher_config=meta if have else None)


def teacher_stats(data: Any) -> dict[str, Any]:
    """The training record (accuracies, seconds, settings) of the cached default teacher."""
    root = Path(data.root if isinstance(data, bundled.DefaultData) else data)
    return json.loads((root / CONFIG_NAME).read_text())["stats"]


def load_default_teacher(data: Any, cfg: TeacherConfig | None = None) -> TinyTeacher:
    """The cached default teacher, frozen (``requires_grad=False``) in eval mode.

    ``data``: a :class:`bundled.DefaultData` or its root folder. ``cfg``: the TeacherConfig the
    caller's model expects (default: the cached one); a mismatch raises ValueError naming the
    differing fields. The result is a :class:`TinyTeacher` (an ``ImageTeacher``) with the stem
    its config names (a :class:`ConvPatchEmbed` for the default config); pass it as
    ``Stage1Model(cfg, teacher=...)``.
    """
    root = Path(data.root if isinstance(data, bundled.DefaultData) else data)
    weights, meta = root / WEIGHTS_NAME, root / CONFIG_NAME
    if not (weights.is_file() and meta.is_file()):
        raise FileNotFoundError(
            f"load_default_teacher: no trained teacher in {root} (expected {WEIGHTS_NAME} and {CONFIG_NAME}); "
            "run ensure_default_dataset(..., teacher=True)"
        )
    record = json.loads(meta.read_text())
    saved = from_dict(TeacherConfig, _upgrade_config(record["config"], record.get("settings") or {}))
    if cfg is not None and cfg != saved:
        wanted, cached = to_dict(cfg), to_dict(saved)
        diff = {k: (wanted[k], cached[k]) for k in wanted if wanted[k] != cached[k]}
        raise ValueError(
            f"load_default_teacher: the cached teacher was trained with another TeacherConfig (wanted, cached): {diff}"
        )
    teacher = build_default_teacher(saved)
    load_weights(teacher, weights)
    teacher.requires_grad_(False)
    return teacher.eval()
