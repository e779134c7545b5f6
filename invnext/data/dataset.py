"""Video index files, the clip Dataset, its collate, its loader, and the bad-file accounting.

Index sources (:func:`read_index`):

* a CSV file with a header: ``path`` (required), optional ``start`` / ``end`` (seconds, a
  window of the video), and any other column is a label (``label``, ``appearance``, ...);
* a JSONL file (``.jsonl`` / ``.ndjson``): one object per line with the same keys;
* a folder: every ``*.mp4 / *.avi / *.mkv / *.webm / *.mov`` inside, recursively, sorted, no labels.
  A name with a video extension that is no readable file (a folder named ``x.mp4``, a dangling
  symlink) is left out of the entries but listed in ``VideoIndex.skipped`` with its reason, so
  ``invnext data check`` reports it and ``VideoDataset`` warns about it.

A CSV is read strictly: a row with more fields than the header, or a quote left open, is an
error naming the line (either would silently shift or swallow entries).

Relative paths are resolved against the index file's folder. Label values that are all
integers stay integers; otherwise the column's distinct strings are numbered in sorted order
(``VideoDataset.label_classes``). A missing label value is -1.

Bad files. A file that cannot be opened or decoded, or has no frame in its window, never
stops a run: ``VideoDataset[i]`` returns a :class:`BadSample` (index, path, reason) instead
of a sample, :func:`collate_videos` drops it from the batch and lists it under
``batch["bad"]``, and the main process counts it in a :class:`BadFileLog` (which warns once
per file, naming it and the reason, and gives the end-of-run summary). Counting in the main
process is what makes the count right with any number of DataLoader workers: a worker's
own state never reaches the main process, but its batches do.

Seeding. Every random draw of sample ``i`` (its frames and its crop) comes from a generator
seeded with ``(seed, epoch, i)``: the same sample gets the same augmentation whichever worker
loads it, runs are reproducible, and :meth:`VideoDataset.set_epoch` changes every draw. So
no ``worker_init_fn`` is needed. The epoch lives in shared memory, so ``set_epoch`` reaches
persistent workers too (call it before iterating the epoch).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from invnext.data.video import (
    DECODERS,
    DEFAULT_RATIO,
    DEFAULT_SCALE,
    eval_transform,
    make_reader,
    sample_indices,
    train_transform,
)

logger = logging.getLogger("invnext.data")

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")
RESERVED_COLUMNS = ("path", "start", "end")


class IndexFileError(ValueError):
    """An index file that cannot be used (its message names the file, the line and the problem)."""


# --------------------------------------------------------------------------- index


@dataclass(frozen=True)
class VideoEntry:
    """One clip: an absolute ``path``, an optional ``[start, end)`` window in seconds, raw label strings."""

    path: str
    start: float | None = None
    end: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VideoIndex:
    source: str
    kind: str  # "csv", "jsonl" or "folder"
    entries: tuple[VideoEntry, ...]
    label_columns: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # folder: (path, reason) of video names that are no file


def _seconds(value: Any, name: str, where: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool):
        raise IndexFileError(f"{where}: {name} must be a number of seconds, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise IndexFileError(f"{where}: {name} must be a number of seconds, got {value!r}") from None
    if not np.isfinite(out) or out < 0:
        raise IndexFileError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return out


def _entry(row: Mapping[str, Any], base: Path, where: str, label_columns: Sequence[str]) -> VideoEntry:
    raw = row.get("path")
    if not isinstance(raw, str) or raw.strip() == "":
        raise IndexFileError(f"{where}: empty or missing 'path' value")
    if "\n" in raw or "\r" in raw:  # only a quote left open upstream puts a line break into a path
        raise IndexFileError(f"{where}: the 'path' value spans several lines (an unbalanced quote?): {raw[:80]!r}")
    if "\0" in raw:  # no filesystem allows it; os.path calls would raise a bare ValueError later
        raise IndexFileError(f"{where}: the 'path' value holds a NUL byte: {raw[:80]!r}")
    path = Path(raw.strip()).expanduser()
    if not path.is_absolute():
        path = base / path
    start = _seconds(row.get("start"), "start", where)
    end = _seconds(row.get("end"), "end", where)
    if start is not None and end is not None and end <= start:
        raise IndexFileError(f"{where}: end ({end}) must be greater than start ({start})")
    labels = {}
    for name in label_columns:
        v = row.get(name)
        labels[name] = "" if v is None else str(v).strip()
    return VideoEntry(os.path.normpath(str(path)), start, end, labels)


def _read_csv(path: Path) -> VideoIndex:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, strict=True)
        try:
            header = reader.fieldnames
        except csv.Error as exc:
            raise IndexFileError(f"{path}:1: malformed CSV header ({exc})") from None
        columns = [c.strip() for c in (header or [])]
        if "path" not in columns:
            raise IndexFileError(f"{path}: the CSV header has no 'path' column (columns: {columns or 'none'})")
        reader.fieldnames = columns
        labels = tuple(c for c in columns if c not in RESERVED_COLUMNS and c)
        entries = []
        while True:
            line = reader.line_num + 1  # where the next row starts (a quoted field may span lines)
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise IndexFileError(f"{path}:{line}: malformed CSV row ({exc}; a quote left open?)") from None
            where = f"{path}:{line}" if reader.line_num == line else f"{path}:{line}-{reader.line_num}"
            if None in row:  # DictReader files surplus fields under the key None
                raise IndexFileError(
                    f"{where}: {len(columns) + len(row[None])} fields, but the header has {len(columns)} "
                    f"({', '.join(columns)}); extra: {row[None]!r} (quote values that contain a comma)"
                )
            if all((v or "").strip() == "" for v in row.values()):
                continue
            entries.append(_entry(row, path.parent, where, labels))
    return VideoIndex(str(path), "csv", tuple(entries), labels)


def _read_jsonl(path: Path) -> VideoIndex:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise IndexFileError(f"{path}:{line}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise IndexFileError(f"{path}:{line}: each line must be a JSON object, got {type(obj).__name__}")
            if "path" not in obj:
                raise IndexFileError(f"{path}:{line}: no 'path' key (keys: {sorted(obj)})")
            rows.append((line, obj))
    labels: list[str] = []
    for _, obj in rows:
        labels += [k for k in obj if k not in RESERVED_COLUMNS and k not in labels]
    entries = tuple(_entry(obj, path.parent, f"{path}:{line}", labels) for line, obj in rows)
    return VideoIndex(str(path), "jsonl", entries, tuple(labels))


def _read_folder(path: Path) -> VideoIndex:
    files, skipped = [], []
    for p in sorted(p for p in path.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS):
        if p.is_file():
            files.append(VideoEntry(str(p)))
        elif p.is_symlink() and not p.exists():
            skipped.append((str(p), f"dangling symbolic link (its target {os.readlink(p)} does not exist)"))
        elif p.is_dir():
            skipped.append((str(p), "a directory, not a video file"))
        else:
            skipped.append((str(p), "not a regular file"))
    return VideoIndex(str(path), "folder", tuple(files), (), tuple(skipped))


def read_index(source: str | os.PathLike) -> VideoIndex:
    """Parse a CSV / JSONL index or list a folder (module docstring). Raises ValueError naming the problem."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"read_index: source must be a path, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.is_dir():
        index = _read_folder(path)
    elif not path.exists():
        raise IndexFileError(f"read_index: {path} does not exist")
    elif path.suffix.lower() in (".jsonl", ".ndjson", ".csv", ".tsv"):
        try:
            index = _read_jsonl(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _read_csv(path)
        except UnicodeDecodeError as exc:
            raise IndexFileError(f"read_index: {path} is not UTF-8 text ({exc})") from None
    else:
        raise IndexFileError(f"read_index: {path}: an index must be a folder, a .csv or a .jsonl file")
    if not index.entries:
        what = f"no video files ({', '.join(VIDEO_EXTENSIONS)})" if index.kind == "folder" else "no entries"
        if index.skipped:
            what += "; not files: " + "; ".join(f"{p}: {reason}" for p, reason in index.skipped[:5])
        raise IndexFileError(f"read_index: {path} holds {what}")
    return index


def _encode_labels(index: VideoIndex, names: Sequence[str]) -> tuple[np.ndarray, dict[str, tuple[str, ...] | None]]:
    """``int64 [N, len(names)]`` label ids (-1 = missing) and each column's class names (None: integer column)."""
    ids = np.full((len(index.entries), len(names)), -1, dtype=np.int64)
    classes: dict[str, tuple[str, ...] | None] = {}
    for j, name in enumerate(names):
        values = [e.labels.get(name, "") for e in index.entries]
        present = [v for v in values if v != ""]
        try:
            as_int = [int(v) if v != "" else -1 for v in values]
            classes[name] = None
        except ValueError:
            vocab = tuple(sorted(set(present)))
            lookup = {v: i for i, v in enumerate(vocab)}
            as_int = [lookup[v] if v != "" else -1 for v in values]
            classes[name] = vocab
        ids[:, j] = as_int
    return ids, classes


# --------------------------------------------------------------------------- bad files


class BadSample(NamedTuple):
    """What ``VideoDataset[i]`` returns for a file it could not use."""

    index: int
    path: str
    reason: str


class BadFileLog:
    """Main-process record of the files skipped so far: warns once per file, summarises at the end."""

    def __init__(self) -> None:
        self.files: dict[str, str] = {}  # path -> first reason
        self.skipped = 0  # samples dropped (a bad file counts once per time it was drawn)

    def record(self, path: str, reason: str) -> bool:
        """Count one skipped sample; returns True (and logs a warning) the first time ``path`` is seen."""
        self.skipped += 1
        if path in self.files:
            return False
        self.files[path] = reason
        logger.warning("skipping bad video %s: %s", path, reason)
        return True

    def update(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """Record the ``batch["bad"]`` entries of a collated batch; returns the batch."""
        for bad in batch.get("bad", ()):
            self.record(bad.path, bad.reason)
        return batch

    @property
    def count(self) -> int:
        """Distinct bad files seen."""
        return len(self.files)

    def summary(self) -> str:
        if not self.files:
            return "bad videos: none"
        lines = [f"bad videos: {self.count} file(s) skipped ({self.skipped} sample(s) dropped)"]
        lines += [f"  {path}: {reason}" for path, reason in sorted(self.files.items())]
        return "\n".join(lines)


# --------------------------------------------------------------------------- dataset


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if type(exc).__name__ in ("DecodeError",) else f"{type(exc).__name__}: {text}"


class VideoDataset(Dataset):
    """Sparse-sampled, augmented clips of an index.

    Args:
        source: a CSV / JSONL index or a folder (:func:`read_index`), or a parsed :class:`VideoIndex`.
        num_frames: T frames per clip.  size: output side in pixels.
        train: random frames per segment, random resized crop and flip; else segment centres and a centre crop.
        seed: base seed of every per-sample generator (module docstring).
        decoder: ``"pyav"`` (default), ``"torchcodec"`` or ``"decord"`` (the latter two when installed).
        labels: label columns to return (default: all of the index's label columns).
        scale, ratio, flip: the training crop's area fraction and aspect range, and the random flip.
        decode_threads: FFmpeg threads per decode (1 suits DataLoader workers).

    ``dataset[i]`` is ``{"video": uint8 [T, size, size, 3], "index": i, "labels": {name: int}}``
    or a :class:`BadSample`.
    """

    def __init__(
        self,
        source: str | os.PathLike | VideoIndex,
        num_frames: int,
        size: int,
        train: bool,
        seed: int = 0,
        decoder: str = "pyav",
        labels: Sequence[str] | None = None,
        *,
        scale: tuple[float, float] = DEFAULT_SCALE,
        ratio: tuple[float, float] = DEFAULT_RATIO,
        flip: bool = True,
        decode_threads: int = 1,
    ):
        for name, v in (("num_frames", num_frames), ("size", size), ("decode_threads", decode_threads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"VideoDataset: {name} must be an int >= 1, got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"VideoDataset: seed must be an int >= 0, got {seed!r}")
        if decoder not in DECODERS:
            raise ValueError(f"VideoDataset: decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"VideoDataset: scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"VideoDataset: ratio must satisfy 0 < min <= max, got {ratio}")
        make_reader(decoder, decode_threads)  # a missing package fails here, not inside a worker
        self.index = source if isinstance(source, VideoIndex) else read_index(source)
        for path, reason in self.index.skipped:
            logger.warning("not using %s: %s", path, reason)
        if labels is None:
            labels = self.index.label_columns
        labels = tuple(labels)
        missing = [n for n in labels if n not in self.index.label_columns]
        if missing:
            raise ValueError(
                f"VideoDataset: labels {missing} are not columns of {self.index.source} "
                f"(label columns: {list(self.index.label_columns) or 'none'})"
            )
        self.label_names = labels
        self._labels, self.label_classes = _encode_labels(self.index, labels)
        self.num_frames, self.size, self.train, self.seed = num_frames, size, bool(train), seed
        self.decoder, self.decode_threads = decoder, decode_threads
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), bool(flip)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._reader = None  # built lazily in each process
        self._known_bad: dict[int, str] = {}  # per process: do not re-open a file that already failed

    def __len__(self) -> int:
        return len(self.index.entries)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Reseed every sample's augmentation for ``epoch`` (seen by all workers, persistent ones included)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"VideoDataset.set_epoch: epoch must be an int >= 0, got {epoch!r}")
        self._epoch.fill_(epoch)

    def num_classes(self, name: str) -> int:
        """Classes of label ``name``: the vocabulary size, or max id + 1 for an integer column."""
        if name not in self.label_names:
            raise ValueError(f"VideoDataset.num_classes: unknown label {name!r} (labels: {list(self.label_names)})")
        vocab = self.label_classes[name]
        return len(vocab) if vocab is not None else int(self._labels[:, self.label_names.index(name)].max()) + 1

    def generators(self, index: int) -> tuple[np.random.SeedSequence, np.random.Generator]:
        """Sample ``index``'s seeds at the current epoch: (frame-sampling seed, crop/flip generator)."""
        time_seed, space_seed = np.random.SeedSequence([self.seed, self.epoch, index]).spawn(2)
        return time_seed, np.random.default_rng(space_seed)

    def frame_indices(self, index: int, num_available: int) -> np.ndarray:
        """The frames sample ``index`` takes from a window of ``num_available`` frames (this epoch)."""
        time_seed, _ = self.generators(index)
        return sample_indices(num_available, self.num_frames, np.random.default_rng(time_seed) if self.train else None)

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        if not 0 <= index < len(self):
            raise IndexError(f"VideoDataset: index {index} out of range [0, {len(self)})")
        entry = self.index.entries[index]
        if index in self._known_bad:
            return BadSample(index, entry.path, self._known_bad[index])
        if self._reader is None:
            self._reader = make_reader(self.decoder, self.decode_threads)
        time_seed, rng = self.generators(index)
        # a fresh generator per call: the reader may ask twice (when the metadata's count is wrong)
        pick = (
            (lambda n: sample_indices(n, self.num_frames, np.random.default_rng(time_seed)))
            if self.train
            else (lambda n: sample_indices(n, self.num_frames))
        )
        if not os.path.isfile(entry.path):
            reason = "file not found" if not os.path.exists(entry.path) else "not a regular file"
            self._known_bad[index] = reason
            return BadSample(index, entry.path, reason)
        try:
            frames, _ = self._reader.read(entry.path, entry.start, entry.end, pick)
        except Exception as exc:  # noqa: BLE001 - any failure of one file must not stop the run
            reason = _describe(exc)
            self._known_bad[index] = reason
            return BadSample(index, entry.path, reason)
        video = torch.from_numpy(np.ascontiguousarray(frames))
        if self.train:
            video = train_transform(video, self.size, rng, self.scale, self.ratio, self.flip)
        else:
            video = eval_transform(video, self.size)
        labels = {name: int(self._labels[index, j]) for j, name in enumerate(self.label_names)}
        return {"video": video, "index": index, "labels": labels}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None  # decoders hold native handles; each process builds its own
        return state


def collate_videos(samples: Sequence[dict[str, Any] | BadSample]) -> dict[str, Any]:
    """Stack the good samples; list the bad ones.

    Returns ``{"video": uint8 [B, T, H, W, 3], "index": int64 [B], "labels": {name: int64 [B]},
    "bad": [BadSample, ...]}`` with B = the number of good samples (possibly 0: then ``video``
    is ``uint8 [0]`` and ``labels`` empty).
    """
    good = [s for s in samples if not isinstance(s, BadSample)]
    bad = [s for s in samples if isinstance(s, BadSample)]
    if not good:
        return {
            "video": torch.zeros(0, dtype=torch.uint8),
            "index": torch.zeros(0, dtype=torch.int64),
            "labels": {},
            "bad": bad,
        }
    names = good[0]["labels"].keys()
    return {
        "video": torch.stack([s["video"] for s in good]),
        "index": torch.tensor([s["index"] for s in good], dtype=torch.int64),
        "labels": {n: torch.tensor([s["labels"][n] for s in good], dtype=torch.int64) for n in names},
        "bad": bad,
    }


# --------------------------------------------------------------------------- loader


class EpochSampler(Sampler[int]):
    """Every index once per epoch; shuffled with a generator seeded by ``(seed, epoch)`` when ``shuffle``."""

    def __init__(self, length: int, shuffle: bool, seed: int = 0):
        self.length, self.shuffle, self.seed, self.epoch = length, shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.length))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=g).tolist())


class VideoLoader:
    """A DataLoader over a :class:`VideoDataset` that accounts for bad files.

    Iterating yields collated batches (:func:`collate_videos`) after recording their bad
    samples in ``self.bad_files`` (a :class:`BadFileLog`: one warning per file, naming it);
    batches left empty by bad files are skipped. ``set_epoch(e)`` reshuffles and reseeds the
    augmentation. ``print(loader.bad_files.summary())`` at the end of a run reports them all.
    """

    def __init__(
        self,
        dataset: VideoDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        num_workers: int = 0,
        drop_last: bool = False,
        seed: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        bad_files: BadFileLog | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"VideoLoader: batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"VideoLoader: num_workers must be an int >= 0, got {num_workers!r}")
        self.dataset = dataset
        self.sampler = EpochSampler(len(dataset), shuffle, seed)
        self.bad_files = bad_files if bad_files is not None else BadFileLog()
        extra = {}
        if num_workers > 0:
            extra["persistent_workers"] = persistent_workers
            if prefetch_factor is not None:
                extra["prefetch_factor"] = prefetch_factor
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            num_workers=num_workers,
            collate_fn=collate_videos,
            pin_memory=pin_memory,
            drop_last=drop_last,
            **extra,
        )

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.bad_files.update(batch)
            if batch["index"].numel() > 0:
                yield batch
