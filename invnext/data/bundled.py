"""The bundled default dataset: moving handwritten digits, generated on first use, never downloaded.

Source images: scikit-learn's ``load_digits`` (1797 8x8 grey images of the digits 0-9,
shipped inside the scikit-learn package). They are split by image, per class, into a train
pool and a val pool (25%), so validation clips show digit images that no training clip (and
not the teacher) ever saw.

A clip: ``frames`` frames (default 16 at 8 fps) of a ``size`` x ``size`` canvas (default 112,
the tiny preset's input: 7x7 patches of 16 px). One digit, 40-52 px tall (scaled with
``size``), in a random bright colour over a random dark two-colour gradient, circles around a
point near the canvas centre (radius 14-22 px) at a constant angular speed. Two labels:

* ``appearance``: the digit class (10 classes, "0".."9"); visible in any single frame.
* ``dynamics``: how it circles (8 classes): clockwise or counter-clockwise, at 1, 2, 3 or 4
  x pi/48 rad per frame (a sixth of a turn to two thirds of a turn over 16 frames). The start
  angle is uniform, so in every frame the digit's angle on its circle is uniform whatever
  the class; centre, radius, size and colours are drawn the same way for every class. So no
  single frame carries any information about ``dynamics``: it needs the frames' order.
  (An unordered bag of frames still shows the arc's length, hence the speed, but not the
  direction: a counter-clockwise clip is a clockwise one played backwards.)

Labels are balanced over the 80 (appearance, dynamics) pairs. Files: ``train/NNNNNN.mp4`` and
``val/NNNNNN.mp4`` (H.264 yuv420p, or MPEG-4 when this FFmpeg lacks libx264), indexed by
``train.csv`` / ``val.csv`` (``path,appearance,dynamics``), described by ``manifest.json``.

The folder (default ``$INVNEXT_CACHE/default_data``, else ``$XDG_CACHE_HOME/invnext/default_data``,
else ``~/.cache/invnext/default_data``) is written to a temporary sibling and renamed into
place, so it is either complete or absent; it is reused while its manifest's version and
config hash match. The default Stage-1 teacher, trained on the same train pool, is cached beside
the clips by :func:`invnext.teacher_pretrain.ensure_default_dataset` (a model, so above this
package).
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from invnext.data.video import write_video

logger = logging.getLogger("invnext.data")

DATA_VERSION = 2
BASE_SIZE = 112  # the canvas the pixel constants below are given for
APPEARANCE = tuple(str(d) for d in range(10))
DIRECTIONS = ("cw", "ccw")  # as seen on screen (rows grow downwards)
ANGULAR_SPEEDS = (1, 2, 3, 4)  # x pi/48 rad per frame
DYNAMICS = tuple(f"{d}-{s}" for d in DIRECTIONS for s in ANGULAR_SPEEDS)
DIGIT_SIZE = (40.0, 52.0)  # digit side in px at BASE_SIZE
RADIUS = (14.0, 22.0)  # circle radius in px at BASE_SIZE
CENTRE_JITTER = 6.0  # circle centre: canvas centre +- this, per axis, px at BASE_SIZE
VAL_FRACTION = 0.25
FPS = 8
LABELS = ("appearance", "dynamics")

# The recommended training augmentation on this data: no flip (a mirrored digit is another
# shape, and a flip swaps clockwise and counter-clockwise), and crops that keep most of the canvas.
TRAIN_FLIP = False
TRAIN_SCALE = (0.5, 1.0)


@dataclass(frozen=True)
class DefaultData:
    """Where the bundled dataset lives and what it holds."""

    root: Path
    train_index: Path
    val_index: Path
    teacher_weights: Path | None  # teacher.safetensors, None when not trained (invnext.teacher_pretrain)
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


def render_digits(
    images: torch.Tensor,
    centres: torch.Tensor,
    sides: torch.Tensor,
    fg: torch.Tensor,
    bg0: torch.Tensor,
    bg1: torch.Tensor,
    angle: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Draw one digit per frame: ``uint8 [N, size, size, 3]``.

    images: float ``[N, 8, 8]`` alpha in [0, 1]; centres: ``[N, 2]`` (row, col) of the digit's
    centre in px (any real values; parts outside the canvas are cut); sides: ``[N]`` the
    digit's side in px; fg, bg0, bg1: ``[N, 3]`` colours in [0, 1]; angle: ``[N]`` the
    direction (radians) of the background's linear gradient from bg0 to bg1.

    Pixel (y, x) with centre (y + 1/2, x + 1/2) shows ``bg + a * (fg - bg)``, ``a`` the digit
    bilinearly resampled (zero outside it) at ``((y + 1/2 - top) / side, (x + 1/2 - left) / side)``.
    """
    pix = torch.arange(size, dtype=torch.float32) + 0.5
    half = sides[:, None] / 2
    gx = (pix[None, :] - centres[:, 1:2] + half) / sides[:, None] * 2 - 1  # [N, S], grid_sample's x in [-1, 1]
    gy = (pix[None, :] - centres[:, 0:1] + half) / sides[:, None] * 2 - 1  # [N, S]
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # [N, S, S, (x, y)]
    alpha = F.grid_sample(images[:, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    alpha = alpha[:, 0, :, :, None].clamp_(0, 1)  # [N, S, S, 1]
    ramp = torch.cos(angle)[:, None, None] * pix[None, None, :] + torch.sin(angle)[:, None, None] * pix[None, :, None]
    lo, hi = ramp.amin((1, 2), keepdim=True), ramp.amax((1, 2), keepdim=True)
    ramp = ((ramp - lo) / (hi - lo).clamp_min(1e-6))[..., None]  # [N, S, S, 1] in [0, 1]
    bg = bg0[:, None, None] + ramp * (bg1 - bg0)[:, None, None]
    img = bg + alpha * (fg[:, None, None] - bg)
    return img.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


def random_colours(rng: np.random.Generator, n: int = 1) -> tuple[torch.Tensor, ...]:
    """(fg, bg0, bg1 ``[n, 3]``, angle ``[n]``): bright foregrounds over dark gradients."""
    fg = rng.uniform(0.6, 1.0, (n, 3))
    bg0, bg1 = rng.uniform(0.0, 0.35, (n, 3)), rng.uniform(0.0, 0.35, (n, 3))
    angle = rng.uniform(0, 2 * math.pi, n)
    return tuple(torch.from_numpy(a).float() for a in (fg, bg0, bg1, angle))


def dynamics_of(label: int) -> tuple[int, float]:
    """(direction sign: +1 clockwise on screen, -1 counter-clockwise; angular speed in rad/frame) of a class."""
    direction, speed = divmod(int(label), len(ANGULAR_SPEEDS))
    return (1 if DIRECTIONS[direction] == "cw" else -1), ANGULAR_SPEEDS[speed] * math.pi / 48


def clip_geometry(dynamics: int, frames: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """The digit's centres ``float64 [frames, 2]`` (row, col) along its circle, and its side, for one clip.

    ``phi_t = theta_0 + sign * omega * t`` with ``theta_0 ~ U[0, 2 pi)``; ``(row, col) = c + r (sin phi_t, cos phi_t)``.
    """
    k = size / BASE_SIZE
    sign, omega = dynamics_of(dynamics)
    side = rng.uniform(*DIGIT_SIZE) * k
    radius = rng.uniform(*RADIUS) * k
    centre = size / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2) * k
    phi = rng.uniform(0, 2 * math.pi) + sign * omega * np.arange(frames)
    return centre[None, :] + radius * np.stack([np.sin(phi), np.cos(phi)], axis=1), side


def make_clip(image: np.ndarray, dynamics: int, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One clip of the 8x8 ``image`` circling with class ``dynamics``: ``uint8 [frames, size, size, 3]``."""
    centres, side = clip_geometry(dynamics, frames, size, rng)
    fg, bg0, bg1, angle = (t.expand(frames, *t.shape[1:]) for t in random_colours(rng))
    images = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].expand(frames, 8, 8)
    sides = torch.full((frames,), float(side))
    return render_digits(images, torch.from_numpy(centres).float(), sides, fg, bg0, bg1, angle, size).numpy()


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
        "radius": list(RADIUS),
        "centre_jitter": CENTRE_JITTER,
        "angular_speeds": list(ANGULAR_SPEEDS),
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and stall when the CPU is shared)
    try:
        codec = ""
        for rel, image, _, dynamics, clip_seed in jobs:
            clip = make_clip(image, dynamics, frames, size, np.random.default_rng(clip_seed))
            codec = write_video(os.path.join(folder, rel), clip, fps=FPS)
        return codec
    finally:
        torch.set_num_threads(threads)


def _write_all(folder: Path, jobs, frames: int, size: int, workers: int) -> str:
    """Write every clip, over ``workers`` processes (each clip has its own seed: the files do not depend on it)."""
    if workers <= 1 or len(jobs) < 64:
        return _write_clips(str(folder), jobs, frames, size)
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    chunks = [jobs[i :: workers * 4] for i in range(workers * 4)]
    # fork where the platform has it (fast start); spawn elsewhere (macOS/Windows defaults).
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        codecs = list(
            pool.map(_write_clips, [str(folder)] * len(chunks), chunks, [frames] * len(chunks), [size] * len(chunks))
        )
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


def cache_lock(root: Path) -> contextlib.AbstractContextManager[None]:
    """The lock every writer of the cache folder ``root`` holds: the clips here, the teacher beside them."""
    return _lock(root.parent / f".{root.name}.lock")


def _data(root: Path, config: Mapping) -> DefaultData:
    return DefaultData(
        root=root,
        train_index=root / "train.csv",
        val_index=root / "val.csv",
        teacher_weights=None,
        teacher_config=None,
        clip_frames=config["frames"],
        size=config["size"],
        num_train=config["num_train"],
        num_val=config["num_val"],
    )


def ensure_default_clips(
    root: str | os.PathLike | None = None,
    *,
    num_train: int = 1200,
    num_val: int = 400,
    frames: int = 16,
    size: int = 112,
    seed: int = 0,
    workers: int | None = None,
) -> DefaultData:
    """The bundled clips at ``root`` (default :func:`default_cache_root`), generated if absent or stale.

    Args:
        num_train, num_val: clips per split (>= 1).  frames: frames per clip (>= 1).
        size: canvas side in px (even, >= 16).  seed: everything random in the data.
        workers: processes that encode clips (None: the CPU count, at most 8). The files do
            not depend on it: every clip has its own seed.

    Returns a :class:`DefaultData` without a teacher. Measured on an idle 2-core CPU: the default
    1200 + 400 clips in ~21 s (18 MB); later calls return at once (~30 ms).
    """
    for name, v, lo in (
        ("num_train", num_train, 1),
        ("num_val", num_val, 1),
        ("frames", frames, 1),
        ("size", size, 16),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"ensure_default_clips: {name} must be an int >= {lo}, got {v!r}")
    if size % 2:
        raise ValueError(f"ensure_default_clips: size must be even (yuv420p video), got {size}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"ensure_default_clips: seed must be an int >= 0, got {seed!r}")
    root = Path(root).expanduser() if root is not None else default_cache_root()
    config = _config(num_train, num_val, frames, size, seed)
    config_hash = _config_hash(config)
    with cache_lock(root):
        if not _complete(root, config_hash):
            _generate(root, config, config_hash, workers if workers is not None else min(os.cpu_count() or 1, 8))
    return _data(root, config)


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
            "source": f"sklearn.datasets.load_digits (split by image, val fraction {VAL_FRACTION:.2f})",
            "source_images": {k: len(v[1]) for k, v in split.items()},
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
