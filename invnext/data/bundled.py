"""The bundled default dataset: moving handwritten digits, generated on first use, never downloaded.

Source images: scikit-learn's ``load_digits`` (1797 8x8 grey images of the digits 0-9,
shipped inside the scikit-learn package). They are split by image, per class, into a train
pool and a val pool (25%), so validation clips show digit images no training clip (and the
teacher) ever saw.

A clip: ``frames`` frames (default 16, 8 fps) of a ``size`` x ``size`` canvas (default 112,
the tiny preset's input: 7x7 patches of 16 px). One digit, upsampled to 28-40 px (scaled with
``size``) in a random bright colour, over a random dark two-colour gradient, moves at a constant
velocity on a torus (it leaves one edge and re-enters at the opposite one). Two labels:

* ``appearance``: the digit class (10 classes, names "0".."9"); visible in any single frame.
* ``dynamics``: the motion (8 classes): direction (right, left, down, up) x speed (slow 2 px,
  fast 5 px per frame at 112 px). The start position is uniform over the canvas and motion
  wraps, so the digit's position in any one frame is uniform whatever the motion: no single
  frame carries any information about ``dynamics``. The class needs frame order.
  (An unordered bag of frames still shows the axis and speed through the spread of positions,
  but not the sign: a left-moving clip is a time-reversed right-moving one.)

Labels are balanced over the 80 (appearance, dynamics) pairs. Files: ``train/NNNNNN.mp4`` and
``val/NNNNNN.mp4`` (H.264 yuv420p, or MPEG-4 when this FFmpeg lacks libx264), indexed by
``train.csv`` / ``val.csv`` (``path,appearance,dynamics``), described by ``manifest.json``.

The folder (default ``$INVNEXT_CACHE/default_data``, else ``$XDG_CACHE_HOME/invnext/default_data``,
else ``~/.cache/invnext/default_data``) is written to a temporary sibling and renamed into
place, so it is either complete or absent; it is reused while its manifest's version and
config hash match. :func:`ensure_default_dataset` also trains (once) the default Stage-1
teacher on the same train pool and caches it beside the clips
(:mod:`invnext.data.teacher_pretrain`).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from invnext.data.video import write_video

logger = logging.getLogger("invnext.data")

DATA_VERSION = 1
BASE_SIZE = 112  # the canvas the pixel constants below are given for
APPEARANCE = tuple(str(d) for d in range(10))
DIRECTIONS = ("right", "left", "down", "up")
_DIRECTION_STEP = ((0, 1), (0, -1), (1, 0), (-1, 0))  # (dy, dx) per frame, unit speed
SPEEDS = (("slow", 2), ("fast", 5))  # px per frame at BASE_SIZE
DYNAMICS = tuple(f"{d}-{s}" for d in DIRECTIONS for s, _ in SPEEDS)
DIGIT_SIZE = (28, 40)  # clip digit side in px at BASE_SIZE
VAL_FRACTION = 0.25
FPS = 8
LABELS = ("appearance", "dynamics")

# The recommended training augmentation on this data: no flip (a mirrored digit is another
# shape, and a flip swaps left and right motion), and crops that keep most of the canvas.
TRAIN_FLIP = False
TRAIN_SCALE = (0.5, 1.0)


@dataclass(frozen=True)
class DefaultData:
    """Where the bundled dataset lives and what it holds."""

    root: Path
    train_index: Path
    val_index: Path
    teacher_weights: Path | None  # teacher.safetensors, None when not trained (teacher=False)
    teacher_config: Path | None  # teacher.json: the TeacherConfig and how it was trained
    clip_frames: int
    size: int
    num_train: int
    num_val: int
    labels: tuple[str, ...] = LABELS
    label_classes: Mapping[str, tuple[str, ...]] = field(
        default_factory=lambda: {"appearance": APPEARANCE, "dynamics": DYNAMICS}
    )
    train_flip: bool = TRAIN_FLIP
    train_scale: tuple[float, float] = TRAIN_SCALE


def default_cache_root() -> Path:
    """``$INVNEXT_CACHE/default_data``, else ``$XDG_CACHE_HOME/invnext/default_data``, else ``~/.cache/invnext/default_data``."""
    if os.environ.get("INVNEXT_CACHE"):
        return Path(os.environ["INVNEXT_CACHE"]).expanduser() / "default_data"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "invnext" / "default_data"


# --------------------------------------------------------------------------- source images


def digit_split(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, classes), "val": (images, classes)}``: float32 ``[N, 8, 8]`` in [0, 1], int64 ``[N]``.

    Split per class by a seeded permutation: ``ceil(VAL_FRACTION * n_c)`` images of class c go to val.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    classes = digits.target.astype(np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xD1617]))
    val = np.zeros(len(classes), dtype=bool)
    for c in range(10):
        members = np.flatnonzero(classes == c)
        val[rng.permutation(members)[: math.ceil(VAL_FRACTION * len(members))]] = True
    return {"train": (images[~val], classes[~val]), "val": (images[val], classes[val])}


# --------------------------------------------------------------------------- rendering


def upsample_digit(image: np.ndarray, side: int) -> np.ndarray:
    """An 8x8 digit in [0, 1] bilinearly upsampled to ``float32 [side, side]``."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)[0, 0].clamp_(0, 1).numpy()


def random_colours(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A bright foreground ``[3]`` and a dark two-colour gradient background ``[size, size, 3]``, in [0, 1]."""
    fg = rng.uniform(0.6, 1.0, 3)
    c0, c1 = rng.uniform(0.0, 0.35, 3), rng.uniform(0.0, 0.35, 3)
    angle = rng.uniform(0, 2 * math.pi)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    ramp = (math.cos(angle) * x + math.sin(angle) * y)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    bg = c0 + ramp[..., None] * (c1 - c0)
    return fg.astype(np.float32), bg.astype(np.float32)


def render_frames(sprite: np.ndarray, offsets: np.ndarray, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Frames of one sprite at ``offsets`` on a torus: ``uint8 [N, S, S, 3]``.

    sprite: float ``[s, s]`` alpha in [0, 1] (s <= S); offsets: int ``[N, 2]`` (row, col) of the
    sprite's top-left corner, any integers (taken mod S); fg: ``[3]``; bg: ``[S, S, 3]``.
    Pixel (y, x) of frame n shows ``sprite[(y - oy_n) mod S, (x - ox_n) mod S]`` (0 outside it).
    """
    S = bg.shape[0]
    s = sprite.shape[0]
    plane = np.zeros((S, S), dtype=np.float32)
    plane[:s, :s] = sprite
    offsets = np.asarray(offsets, dtype=np.int64)
    grid = np.arange(S)
    rows = (grid[None, :] - offsets[:, :1]) % S  # [N, S]
    cols = (grid[None, :] - offsets[:, 1:]) % S
    alpha = plane[rows[:, :, None], cols[:, None, :]][..., None]  # [N, S, S, 1]
    img = bg[None] + alpha * (fg - bg)[None]
    return np.rint(img * 255.0).clip(0, 255).astype(np.uint8)


def scaled(px: float, size: int) -> int:
    """A pixel constant given at BASE_SIZE, for a ``size`` canvas (at least 1)."""
    return max(1, int(round(px * size / BASE_SIZE)))


def dynamics_velocity(label: int, size: int) -> tuple[int, int]:
    """(dy, dx) in px per frame of dynamics class ``label`` on a ``size`` canvas."""
    direction, speed = divmod(label, len(SPEEDS))
    step = scaled(SPEEDS[speed][1], size)
    dy, dx = _DIRECTION_STEP[direction]
    return dy * step, dx * step


def make_clip(
    image: np.ndarray, dynamics: int, frames: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """One clip of ``image`` moving with ``dynamics``: ``uint8 [frames, size, size, 3]``."""
    side = int(rng.integers(scaled(DIGIT_SIZE[0], size), scaled(DIGIT_SIZE[1], size) + 1))
    fg, bg = random_colours(rng, size)
    start = rng.integers(0, size, 2)
    velocity = np.array(dynamics_velocity(dynamics, size))
    offsets = start[None, :] + np.arange(frames)[:, None] * velocity[None, :]
    return render_frames(upsample_digit(image, side), offsets, fg, bg)


# --------------------------------------------------------------------------- generation


def _config(num_train: int, num_val: int, frames: int, size: int, seed: int) -> dict:
    return {
        "version": DATA_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "frames": frames,
        "size": size,
        "fps": FPS,
        "seed": seed,
        "digit_size": list(DIGIT_SIZE),
        "speeds": [v for _, v in SPEEDS],
        "val_fraction": VAL_FRACTION,
    }


def _config_hash(config: Mapping) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _balanced_labels(n: int, rng: np.random.Generator) -> np.ndarray:
    """``int64 [n, 2]`` (appearance, dynamics) pairs cycling through all 80 pairs, shuffled."""
    pairs = np.array([(a, d) for a in range(len(APPEARANCE)) for d in range(len(DYNAMICS))], dtype=np.int64)
    reps = -(-n // len(pairs))
    out = np.concatenate([pairs[rng.permutation(len(pairs))] for _ in range(reps)])[:n]
    return out[rng.permutation(n)]


def _split_jobs(name: str, pool, n: int, seed: int) -> list[tuple[str, np.ndarray, int, int, int]]:
    """The clips of one split: (relative path, 8x8 image, appearance, dynamics, clip seed)."""
    images, classes = pool
    by_class = [np.flatnonzero(classes == c) for c in range(len(APPEARANCE))]
    split_id = 0 if name == "train" else 1
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC11B, split_id]))
    labels = _balanced_labels(n, rng)
    jobs = []
    for i, (appearance, dynamics) in enumerate(labels):
        image = images[rng.choice(by_class[appearance])]
        jobs.append((f"{name}/{i:06d}.mp4", image, int(appearance), int(dynamics), int(rng.integers(2**62))))
    return jobs


def _write_clips(folder: str, jobs, frames: int, size: int) -> str:
    """Render and encode ``jobs`` (one process's share); returns the codec used."""
    torch.set_num_threads(1)
    codec = ""
    for rel, image, _, dynamics, clip_seed in jobs:
        clip = make_clip(image, dynamics, frames, size, np.random.default_rng(clip_seed))
        codec = write_video(os.path.join(folder, rel), clip, fps=FPS)
    return codec


def _write_all(folder: Path, jobs, frames: int, size: int, workers: int) -> str:
    """Write every clip, over ``workers`` processes (each clip has its own seed: the files do not depend on it)."""
    if workers <= 1 or len(jobs) < 64:
        return _write_clips(str(folder), jobs, frames, size)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    chunks = [jobs[i::workers * 4] for i in range(workers * 4)]
    # fork where the platform has it (fast start); spawn elsewhere (macOS/Windows defaults).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        codecs = list(pool.map(_write_clips, [str(folder)] * len(chunks), chunks, [frames] * len(chunks), [size] * len(chunks)))
    return codecs[0]


def _complete(root: Path, config_hash: str) -> bool:
    """True when ``root`` holds a finished dataset of this config (manifest last written, files present)."""
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != DATA_VERSION or manifest.get("config_hash") != config_hash:
        return False
    for split in ("train", "val"):
        index = root / f"{split}.csv"
        if not index.is_file():
            return False
        with open(index, newline="") as f:
            rows = list(csv.DictReader(f))
        if len(rows) != manifest["config"][f"num_{split}"] or not all((root / r["path"]).is_file() for r in rows):
            return False
    return True


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX advisory lock; no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: generation stays atomic, concurrent generators just duplicate work
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _data(root: Path, config: Mapping, teacher: bool) -> DefaultData:
    weights, cfg = root / "teacher.safetensors", root / "teacher.json"
    have = teacher and weights.is_file() and cfg.is_file()
    return DefaultData(
        root=root,
        train_index=root / "train.csv",
        val_index=root / "val.csv",
        teacher_weights=weights if have else None,
        teacher_config=cfg if have else None,
        clip_frames=config["frames"],
        size=config["size"],
        num_train=config["num_train"],
        num_val=config["num_val"],
    )


def ensure_default_dataset(
    root: str | os.PathLike | None = None,
    *,
    num_train: int = 1200,
    num_val: int = 400,
    frames: int = 16,
    size: int = 112,
    seed: int = 0,
    teacher: bool = True,
    teacher_steps: int | None = None,
    workers: int | None = None,
) -> DefaultData:
    """The bundled dataset at ``root`` (default :func:`default_cache_root`), generated if absent or stale.

    Args:
        num_train, num_val: clips per split (>= 1).  frames: frames per clip (>= 1).
        size: canvas side in px (even, >= 16).  seed: everything random in the data.
        teacher: also train (once) and cache the default Stage-1 teacher beside the clips.
        teacher_steps: its optimisation steps (None: the default of ``teacher_pretrain``).
        workers: processes that encode clips (None: the CPU count, at most 8). The files do
            not depend on it: every clip has its own seed.

    Returns a :class:`DefaultData`. Generation of the default 1200 + 400 clips takes ~25 s on
    2 cores; the teacher ~25 s more; later calls return at once.
    """
    for name, v, lo in (("num_train", num_train, 1), ("num_val", num_val, 1), ("frames", frames, 1), ("size", size, 16)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"ensure_default_dataset: {name} must be an int >= {lo}, got {v!r}")
    if size % 2:
        raise ValueError(f"ensure_default_dataset: size must be even (yuv420p video), got {size}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"ensure_default_dataset: seed must be an int >= 0, got {seed!r}")
    root = Path(root).expanduser() if root is not None else default_cache_root()
    config = _config(num_train, num_val, frames, size, seed)
    config_hash = _config_hash(config)
    with _lock(root.parent / f".{root.name}.lock"):
        if not _complete(root, config_hash):
            _generate(root, config, config_hash, workers if workers is not None else min(os.cpu_count() or 1, 8))
    if teacher:
        from invnext.data.teacher_pretrain import ensure_teacher

        with _lock(root.parent / f".{root.name}.lock"):
            ensure_teacher(root, steps=teacher_steps, seed=seed)
    return _data(root, config, teacher)


def _generate(root: Path, config: Mapping, config_hash: str, workers: int) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    logger.info(
        "generating the default dataset (%d train + %d val clips of %d frames, %dx%d) in %s",
        config["num_train"], config["num_val"], config["frames"], config["size"], config["size"], root,
    )  # fmt: skip
    try:
        split = digit_split(config["seed"])
        jobs = []
        for name in ("train", "val"):
            (tmp / name).mkdir(parents=True)
            split_jobs = _split_jobs(name, split[name], config[f"num_{name}"], config["seed"])
            with open(tmp / f"{name}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["path", *LABELS])
                writer.writerows([rel, a, d] for rel, _, a, d, _ in split_jobs)
            jobs += split_jobs
        codec = _write_all(tmp, jobs, config["frames"], config["size"], workers)
        manifest = {
            "version": DATA_VERSION,
            "config": dict(config),
            "config_hash": config_hash,
            "codec": codec,
            "labels": {"appearance": list(APPEARANCE), "dynamics": list(DYNAMICS)},
            "source": "sklearn.datasets.load_digits (split by image, val fraction %.2f)" % VAL_FRACTION,
            "source_images": {k: int(len(v[1])) for k, v in split.items()},
            "seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            root.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("default dataset ready in %.1f s (%s)", time.perf_counter() - t0, root)
