"""Frozen features of every view of every clip of an index, extracted once and cached on disk.

A cache entry is one safetensors file ``<cache>/<key>.safetensors``:

    pooled          float32  [M, V, Cp]     the source's pooled embedding per view
    tokens          bfloat16 [M, V, N, C]   its tokens per view (present when a run needed them)
    index           int64    [M]            dataset row of each clip (bad files are left out)
    label.<name>    int64    [M]            every label column of the index (-1 = missing)

with the settings, label vocabularies and skipped files as JSON in the metadata. ``key`` is the
SHA-256 of: the source's fingerprint (class, config and weight bytes), the index file's bytes
and mtime (for a folder: every video's path, size and mtime), and the preprocessing (frames,
size, views, decoder, precision, token dtype). So any probe setting can change without a
re-encode, and a change of weights, index or preprocessing never reads stale features. The
videos an index names are not hashed (reading them all would cost as much as decoding): after
replacing a video in place, touch its index file.
Tokens are stored in bfloat16 (fp32's range; a cache of ``M*V*N*C`` values halves) and the
probe heads upcast them. Entries are written to a temporary file and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from invnext.eval.sources import FeatureSource
from invnext.eval.views import MultiViewDataset, ViewSpec, parse_views

logger = logging.getLogger("invnext.eval")

FEATURE_VERSION = 1
TOKEN_DTYPE = torch.bfloat16
_META_KEY = "invnext.features"
_VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def default_feature_cache() -> Path:
    """``$INVNEXT_CACHE/features``, else ``$XDG_CACHE_HOME/invnext/features``, else ``~/.cache/invnext/features``."""
    if os.environ.get("INVNEXT_CACHE"):
        return Path(os.environ["INVNEXT_CACHE"]).expanduser() / "features"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "invnext" / "features"


def index_fingerprint(source: str | os.PathLike) -> str:
    """SHA-256 of an index file's bytes and mtime, or of a folder's video paths, sizes and mtimes."""
    path = Path(source).expanduser()
    h = hashlib.sha256()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and p.suffix.lower() in _VIDEO_EXTENSIONS:
                st = p.stat()
                h.update(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    if not path.is_file():
        raise ValueError(f"index {str(path)!r} does not exist")
    h.update(path.read_bytes())
    h.update(f"|mtime={path.stat().st_mtime_ns}".encode())
    return h.hexdigest()


@dataclass
class FeatureSet:
    """Features of one index (see the module docstring for shapes)."""

    pooled: torch.Tensor
    tokens: torch.Tensor | None
    index: torch.Tensor
    labels: dict[str, torch.Tensor]
    label_classes: dict[str, list[str] | None]
    settings: dict[str, Any]
    bad: list[tuple[str, str]] = field(default_factory=list)
    path: Path | None = None  # the cache file (None: not cached)
    hit: bool = False  # read from the cache rather than encoded

    @property
    def num_clips(self) -> int:
        return self.pooled.shape[0]

    @property
    def num_views(self) -> int:
        return self.pooled.shape[1]


def feature_settings(
    source: FeatureSource,
    index: str | os.PathLike,
    frames: int,
    size: int,
    views: ViewSpec,
    decoder: str,
    precision: str,
) -> dict[str, Any]:
    """What the cache key covers."""
    return {
        "version": FEATURE_VERSION,
        "source": source.fingerprint(),
        "index": index_fingerprint(index),
        "frames": frames,
        "size": size,
        "views": [views.clips, views.crops],
        "decoder": decoder,
        "precision": precision,
        "token_dtype": str(TOKEN_DTYPE).replace("torch.", ""),
    }


def cache_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(path: Path, settings: dict[str, Any], need_tokens: bool) -> FeatureSet | None:
    from safetensors import SafetensorError, safe_open

    # Everything that reads the entry stays inside the try: a truncated or hand-edited entry is
    # re-encoded (and then overwritten), never a crash of the probe.
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if _META_KEY not in metadata:
                raise ValueError(f"no {_META_KEY!r} metadata")
            meta = json.loads(metadata[_META_KEY])
            if meta["settings"] != settings or (need_tokens and "tokens" not in set(f.keys())):
                return None
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        labels = {name: t[f"label.{name}"] for name in meta["label_names"]}
        bad = [tuple(b) for b in meta["bad"]]
        fs = FeatureSet(
            t["pooled"], t["tokens"] if need_tokens else t.get("tokens"), t["index"], labels, meta["label_classes"],
            settings, bad, path, True,
        )
        if fs.index.shape[0] != fs.pooled.shape[0] or any(y.shape[0] != fs.pooled.shape[0] for y in labels.values()):
            raise ValueError("its tensors disagree on the number of clips")
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("feature cache %s unreadable (%s: %s); re-encoding", path, type(exc).__name__, exc)
        return None
    return fs


def _write_cache(path: Path, fs: FeatureSet) -> None:
    from safetensors.torch import save_file

    tensors = {"pooled": fs.pooled.contiguous(), "index": fs.index.contiguous()}
    if fs.tokens is not None:
        tensors["tokens"] = fs.tokens.contiguous()
    for name, y in fs.labels.items():
        tensors[f"label.{name}"] = y.contiguous()
    meta = {
        "settings": fs.settings,
        "label_names": list(fs.labels),
        "label_classes": fs.label_classes,
        "bad": [list(b) for b in fs.bad],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, os.fspath(tmp), metadata={_META_KEY: json.dumps(meta)})
    os.replace(tmp, path)


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


@torch.no_grad()
def encode_dataset(
    source: FeatureSource,
    dataset: MultiViewDataset,
    *,
    batch_size: int,
    device: torch.device,
    precision: str,
    need_tokens: bool,
    workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, dict[str, torch.Tensor], list[tuple[str, str]]]:
    """Run ``source`` on every view of every clip: ``(pooled, tokens or None, index, labels, bad)``."""
    from invnext.data.dataset import collate_videos

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_videos)
    V = dataset.views.count
    pooled, tokens, index, bad = [], [], [], []
    labels: dict[str, list[torch.Tensor]] = {name: [] for name in dataset.label_names}
    was_training = source.module.training
    source.module.eval()  # no dropout / drop path; the caller's mode is restored below
    try:
        for batch in loader:
            bad += [(b.path, b.reason) for b in batch["bad"]]
            if batch["index"].numel() == 0:
                continue
            video = batch["video"].to(device, non_blocking=True)  # uint8 [B, V, T, s, s, 3]
            B = video.shape[0]
            with _autocast(device, precision):
                tok, pool = source.encode(video.flatten(0, 1))
            pooled.append(pool.float().view(B, V, -1).cpu())
            if need_tokens:
                tokens.append(tok.to(TOKEN_DTYPE).view(B, V, *tok.shape[1:]).cpu())
            index.append(batch["index"])
            for name, ys in labels.items():
                ys.append(batch["labels"][name])
    finally:
        source.module.train(was_training)
    for path, reason in bad:
        logger.warning("probe: skipping unreadable video %s: %s", path, reason)
    if not index:
        raise ValueError(f"no readable clip in {dataset.index.source} ({len(bad)} unreadable)")
    return (
        torch.cat(pooled),
        torch.cat(tokens) if need_tokens else None,
        torch.cat(index),
        {name: torch.cat(v) for name, v in labels.items()},
        bad,
    )


def extract_features(
    source: FeatureSource,
    index: str | os.PathLike,
    *,
    frames: int,
    size: int,
    views: str | ViewSpec = "1x1",
    need_tokens: bool = True,
    cache: str | os.PathLike | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    precision: str = "auto",
    decoder: str = "pyav",
    workers: int = 0,
) -> FeatureSet:
    """Features of every view of every clip of ``index``, from the cache when it holds them.

    Args:
        source: the frozen model (:func:`invnext.eval.sources.resolve_source`).
        index: a CSV / JSONL index or a folder of videos.
        frames, size: clip length and side (pixels).  views: ``"CLIPSxCROPS"``.
        need_tokens: keep the tokens (the attentive probe needs them; the linear probe does not).
        cache: folder of cache entries; None disables caching.
        batch_size: clips per forward (each with all its views).
        device: where the model runs (default: CUDA when available, else CPU).
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"auto"`` (bf16 on CUDA, fp32 elsewhere).
        decoder, workers: video decoder and DataLoader workers.
    Returns:
        :class:`FeatureSet` (``hit`` tells whether the encoder ran).
    """
    views = parse_views(views)
    for name, v in (("frames", frames), ("size", size), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"extract_features: {name} must be an int >= 1, got {v!r}")
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"extract_features: precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    source.check_input(frames, size)
    settings = feature_settings(source, index, frames, size, views, decoder, precision)
    path = Path(cache).expanduser() / f"{cache_key(settings)}.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        hit = _read_cache(path, settings, need_tokens)
        if hit is not None:
            logger.info("probe: features of %s from the cache %s", index, path)
            return hit
    dataset = MultiViewDataset(index, frames, size, views, decoder=decoder)
    t0 = time.perf_counter()
    source.to(device)
    pooled, tokens, idx, labels, bad = encode_dataset(
        source,
        dataset,
        batch_size=batch_size,
        device=device,
        precision=precision,
        need_tokens=need_tokens,
        workers=workers,
    )
    logger.info(
        "probe: encoded %d clips x %d views of %s in %.1f s", len(idx), views.count, index, time.perf_counter() - t0
    )
    classes = {k: (list(v) if v is not None else None) for k, v in dataset.label_classes.items()}
    fs = FeatureSet(pooled, tokens, idx, labels, classes, settings, bad, path, False)
    if path is not None:
        _write_cache(path, fs)
    return fs
