"""Frozen-encoder probing: ``run_probe`` (and ``invnext probe``).

1. Features (:mod:`invnext.eval.features`): the frozen source runs once over every clip of the
   train index (``train_views``, default one centred view) and of the val index (``views``, e.g.
   2 clips x 3 crops); both are cached on disk, so other probe settings reuse them. Cached
   features mean no training augmentation (the paper's probes see augmented clips); more train
   views (``train_views="2x3"``) are the cached stand-in.
2. A head is trained on the train features with AdamW, a linear warm-up (the first 10% of the
   steps) and a cosine decay to zero, cross-entropy, mini-batches drawn by a seeded generator:
   ``attentive``: :class:`~invnext.eval.heads.AttentiveProbe` on the tokens ``[N, C]``;
   ``linear``: :class:`~invnext.eval.heads.LinearProbe` on the pooled embedding.
   Every train view is a training sample.
3. Evaluation: the head's logits of every view of a val clip are averaged (multi-view testing,
   as the paper does) before top-1 / top-5 (top-5 only with more than 5 classes).

Labels: every label column of the index by default (one head per label, the features shared).
String labels are numbered over the union of both splits' values, so the numbering is the same
on both sides; missing labels (-1) are left out of training and scoring.

Outputs (when ``out`` is given): ``probe_<protocol>.json`` (settings, feature provenance and
per-label results) and ``confusion_<protocol>_<label>.png`` (row-normalised confusion matrix).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from invnext.config import _Checked, from_dict
from invnext.eval.features import FeatureSet, default_feature_cache, extract_features
from invnext.eval.heads import AttentiveProbe, LinearProbe
from invnext.eval.sources import FeatureSource, resolve_source
from invnext.eval.views import parse_views

logger = logging.getLogger("invnext.eval")

PROTOCOLS = ("attentive", "linear")
DEFAULTS = {
    "attentive": {"epochs": 20, "lr": 1e-3, "weight_decay": 0.05},
    "linear": {"epochs": 50, "lr": 1e-3, "weight_decay": 1e-4},
}
WARMUP_FRACTION = 0.1
# Default epochs are raised to reach this many optimizer steps: a few hundred clips make only a
# few steps per epoch, and an attentive head from a small init needs a few hundred to fit at all.
MIN_STEPS = 300

__all__ = [
    "PROTOCOLS",
    "ProbeConfig",
    "average_view_logits",
    "confusion_matrix",
    "default_heads",
    "run_probe",
    "save_confusion_png",
    "topk_accuracy",
    "train_head",
]


# --------------------------------------------------------------------------- metrics


def average_view_logits(logits: torch.Tensor) -> torch.Tensor:
    """Multi-view testing: ``[M, V, K]`` logits of every view -> their mean ``[M, K]``."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"average_view_logits: logits must be [M, V, K], got {got}")
    return logits.mean(1)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` largest logits (``logits [M, K]``, ``labels int64 [M]``)."""
    if logits.dim() != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            f"topk_accuracy: logits must be [M, K] and labels [M], got {list(logits.shape)}, {list(labels.shape)}"
        )
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"topk_accuracy: k must lie in [1, {logits.shape[1]}], got {k}")
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(1).double().mean())


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``int64 [K, K]``: entry (i, j) counts clips of class i predicted as j."""
    flat = labels.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def save_confusion_png(cm: torch.Tensor, class_names: Sequence[str], path: str | os.PathLike, title: str) -> None:
    """Write the row-normalised confusion matrix ``cm [K, K]`` as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    K = cm.shape[0]
    rates = cm.double() / cm.sum(1, keepdim=True).clamp_min(1)
    side = min(12.0, 2.5 + 0.45 * K)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    try:
        im = ax.imshow(rates.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
        if K <= 40:
            ax.set_xticks(range(K), labels=list(class_names), rotation=90, fontsize=7)
            ax.set_yticks(range(K), labels=list(class_names), fontsize=7)
        if K <= 15:
            for i in range(K):
                for j in range(K):
                    if cm[i, j]:
                        ax.text(
                            j,
                            i,
                            str(int(cm[i, j])),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="black" if rates[i, j] > 0.5 else "white",
                        )
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(os.fspath(path), dpi=100)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- training


def default_heads(dim: int) -> int:
    """Attention heads of the attentive probe: the most (<= 16) that divide ``dim`` with a head dim >= 8."""
    for h in range(16, 0, -1):
        if dim % h == 0 and dim // h >= 8:
            return h
    return 1


def _inputs(fs: FeatureSet, protocol: str) -> torch.Tensor:
    """``[M, V, ...]`` probe inputs: tokens (attentive) or pooled (linear)."""
    if protocol == "attentive":
        if fs.tokens is None:
            raise ValueError("the attentive probe needs tokens, but these features hold only pooled embeddings")
        return fs.tokens
    return fs.pooled


def train_head(
    head: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
) -> list[float]:
    """Fit ``head`` on ``x [S, ...]`` / ``y int64 [S]``: AdamW, warm-up + cosine per step. Returns the epoch losses."""
    S = y.shape[0]
    per_epoch = math.ceil(S / batch_size)
    total = epochs * per_epoch
    warmup = max(1, round(WARMUP_FRACTION * total))
    decay = [p for n, p in head.named_parameters() if p.dim() >= 2 and "query" not in n]
    rest = [p for n, p in head.named_parameters() if not (p.dim() >= 2 and "query" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.999),
    )

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    head.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(S, generator=generator)
        total_loss = 0.0
        for i in range(0, S, batch_size):
            idx = order[i : i + batch_size]
            logits = head(x[idx].to(device).float())
            loss = F.cross_entropy(logits, y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * idx.numel()
        losses.append(total_loss / S)
    head.eval()
    return losses


@torch.no_grad()
def view_logits(head: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """Logits of every view: ``x [M, V, ...]`` -> float32 ``[M, V, K]`` (on the CPU)."""
    M, V = x.shape[:2]
    flat = x.flatten(0, 1)
    out = [head(flat[i : i + batch_size].to(device).float()).cpu() for i in range(0, flat.shape[0], batch_size)]
    return torch.cat(out).view(M, V, -1)


def _align_labels(train: FeatureSet, val: FeatureSet, name: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Both splits' ids of label ``name`` in one numbering, and its class names."""
    for split, fs in (("train", train), ("val", val)):
        if name not in fs.labels:
            known = list(fs.labels) or "none"
            raise ValueError(f"label {name!r} is not a column of the {split} index (label columns: {known})")
    ct, cv = train.label_classes[name], val.label_classes[name]
    yt, yv = train.labels[name], val.labels[name]
    if ct is None and cv is None:
        K = int(max(yt.max(), yv.max())) + 1
        return yt, yv, [str(i) for i in range(K)]

    def names(y: torch.Tensor, classes) -> list[str | None]:
        return [None if int(i) < 0 else (classes[int(i)] if classes is not None else str(int(i))) for i in y]

    nt, nv = names(yt, ct), names(yv, cv)
    vocab = sorted({n for n in nt + nv if n is not None})
    lookup = {n: i for i, n in enumerate(vocab)}

    def remap(ns: list[str | None]) -> torch.Tensor:
        return torch.tensor([-1 if n is None else lookup[n] for n in ns], dtype=torch.int64)

    return remap(nt), remap(nv), vocab


def _probe_label(
    name: str, train: FeatureSet, val: FeatureSet, protocol: str, hp: dict[str, Any], device: torch.device, seed: int
) -> tuple[dict[str, Any], torch.Tensor, list[str]]:
    yt, yv, classes = _align_labels(train, val, name)
    K = len(classes)
    if K < 2:
        raise ValueError(f"label {name!r} has {K} class(es) over train and val; a probe needs at least 2")
    xt, xv = _inputs(train, protocol), _inputs(val, protocol)
    Vt = xt.shape[1]
    keep_t, keep_v = yt >= 0, yv >= 0
    if not bool(keep_t.any()) or not bool(keep_v.any()):
        raise ValueError(f"label {name!r}: no labelled clip in the {'train' if not keep_t.any() else 'val'} split")
    x_train = xt[keep_t].flatten(0, 1)  # every train view is a sample
    y_train = yt[keep_t].repeat_interleave(Vt)
    per_epoch = math.ceil(y_train.shape[0] / hp["batch_size"])
    epochs = (
        hp["epochs"]
        if hp["epochs"] is not None
        else max(DEFAULTS[protocol]["epochs"], math.ceil(MIN_STEPS / per_epoch))
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if protocol == "attentive":
            head = AttentiveProbe(xt.shape[-1], K, heads=hp["heads"])
        else:
            head = LinearProbe(xt.shape[-1], K)
            head.standardise(x_train.float())
    head.to(device)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    losses = train_head(
        head,
        x_train,
        y_train,
        epochs=epochs,
        lr=hp["lr"],
        weight_decay=hp["weight_decay"],
        batch_size=hp["batch_size"],
        generator=gen,
        device=device,
    )
    train_seconds = time.perf_counter() - t0
    train_logits = view_logits(head, xt[keep_t], device)
    logits = average_view_logits(view_logits(head, xv[keep_v], device))
    y_val = yv[keep_v]
    cm = confusion_matrix(logits.argmax(1), y_val, K)
    counts = torch.bincount(y_val, minlength=K)
    res: dict[str, Any] = {
        "num_classes": K,
        "classes": classes,
        "train_clips": int(keep_t.sum()),
        "val_clips": int(keep_v.sum()),
        "top1": topk_accuracy(logits, y_val, 1),
        "train_top1": topk_accuracy(average_view_logits(train_logits), yt[keep_t], 1),
        "majority": float(counts.max()) / float(counts.sum()),
        "epochs": epochs,
        "steps": epochs * per_epoch,
        "final_loss": losses[-1],
        "train_seconds": round(train_seconds, 3),
        "confusion": cm.tolist(),
    }
    if K > 5:
        res["top5"] = topk_accuracy(logits, y_val, 5)
    return res, cm, classes


# --------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class ProbeConfig(_Checked):
    """What a probe computes: the clips it reads and how its head is trained (checked on construction).

    Args:
        protocol: ``"attentive"`` or ``"linear"``.
        label: label column(s) to probe (default: every label column of the train index).
        epochs, lr, weight_decay: head training (defaults per protocol: :data:`DEFAULTS`; default epochs
            are raised to make at least :data:`MIN_STEPS` optimizer steps, the count used is in each result).
        batch_size: head training batch.  heads: attentive probe heads (default :func:`default_heads`).
        views: val views ``"CLIPSxCROPS"`` (logits averaged over them).  train_views: train views.
        frames, size: clip length and side (default: the encoder's config).
        precision: feature extraction precision ("auto", "fp32", "bf16").
        extract_batch_size, workers, decoder: feature extraction batch (clips), DataLoader workers, video decoder.
        seed: head initialisation and batch order (and a preset's random weights).
    """

    protocol: str = "attentive"
    label: str | tuple[str, ...] | None = None
    epochs: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int = 64
    heads: int | None = None
    views: str = "1x1"
    train_views: str = "1x1"
    frames: int | None = None
    size: int | None = None
    precision: str = "auto"
    extract_batch_size: int = 8
    workers: int = 0
    decoder: str = "pyav"
    seed: int = 0

    def validate(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"ProbeConfig: protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        for name in ("batch_size", "extract_batch_size", "epochs"):
            self._require(getattr(self, name) is None or getattr(self, name) >= 1, name, "must be >= 1")
        self._require(self.lr is None or self.lr > 0, "lr", "must be > 0")
        self._require(self.weight_decay is None or self.weight_decay >= 0, "weight_decay", "must be >= 0")
        parse_views(self.views)
        parse_views(self.train_views)

    def head_settings(self) -> dict[str, Any]:
        """``epochs`` (None: auto, see ``_probe_label``), ``lr``, ``weight_decay``: given ones over the protocol's."""
        given = {"epochs": self.epochs, "lr": self.lr, "weight_decay": self.weight_decay}
        return {**DEFAULTS[self.protocol], "epochs": None, **{k: v for k, v in given.items() if v is not None}}


def run_probe(
    encoder: str | os.PathLike | nn.Module | FeatureSource,
    train: str | os.PathLike | None = None,
    val: str | os.PathLike | None = None,
    config: ProbeConfig | Mapping[str, Any] | None = None,
    *,
    out: str | os.PathLike | None = None,
    cache: str | os.PathLike | bool | None = True,
    device: str | torch.device | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Probe a frozen encoder; returns the result dict (also written to ``out/probe_<protocol>.json``).

    Args:
        encoder: a preset, checkpoint or release file (``load_encoder``), an Encoder, ``teacher:default``
            or a :class:`FeatureSource` (see :func:`invnext.eval.sources.resolve_source`).
        train, val: CSV / JSONL indexes with label columns (default: the bundled default dataset's).
        config: a :class:`ProbeConfig`, or a mapping of its keys (an unknown key is a ConfigError naming
            it); None: every default.
        out: folder for the JSON and the confusion-matrix PNGs (None: write nothing).
        cache: feature cache folder; True = :func:`default_feature_cache`; False/None = no cache.
        device: where the encoder and the head run (default CUDA when available, else CPU).
    Returns:
        ``{"source", "fingerprint", "protocol", "train", "val", "settings", "features", "results": {label: {...}}}``;
        each label's entry holds ``top1`` (and ``top5`` with more than 5 classes), ``train_top1``,
        ``majority`` (the most frequent val class's share), ``num_classes``, ``classes``, ``confusion``,
        and ``confusion_png`` when written.
    """
    cfg = config if isinstance(config, ProbeConfig) else from_dict(ProbeConfig, config or {})
    protocol, label, seed = cfg.protocol, cfg.label, cfg.seed
    hp = cfg.head_settings()
    view_spec, train_spec = parse_views(cfg.views), parse_views(cfg.train_views)
    if train is None or val is None:
        from invnext.data.bundled import ensure_default_clips

        data = ensure_default_clips()
        train = data.train_index if train is None else train
        val = data.val_index if val is None else val
    if label is not None:  # fail before any encoding
        from invnext.data.dataset import read_index

        columns = read_index(train).label_columns
        for name in [label] if isinstance(label, str) else list(label):
            if name not in columns:
                raise ValueError(
                    f"run_probe: label {name!r} is not a column of the train index {os.fspath(train)!r} "
                    f"(label columns: {list(columns) or 'none'})"
                )
    cache_dir = default_feature_cache() if cache is True else (None if cache in (False, None) else Path(cache))
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    t0 = time.perf_counter()
    source = resolve_source(encoder, seed=seed, verbose=verbose)
    frames = source.default_frames if cfg.frames is None else cfg.frames
    size = source.default_size if cfg.size is None else cfg.size
    hp["batch_size"] = cfg.batch_size
    hp["heads"] = default_heads(source.dim) if cfg.heads is None else cfg.heads
    common = {
        "frames": frames,
        "size": size,
        "need_tokens": protocol == "attentive",
        "cache": cache_dir,
        "batch_size": cfg.extract_batch_size,
        "device": dev,
        "precision": cfg.precision,
        "decoder": cfg.decoder,
        "workers": cfg.workers,
    }
    feats = {
        "train": extract_features(source, train, views=train_spec, **common),
        "val": extract_features(source, val, views=view_spec, **common),
    }
    extract_seconds = time.perf_counter() - t0
    if not isinstance(encoder, (nn.Module, FeatureSource)):
        source.to("cpu")  # a model loaded here is done with: free the device for the heads

    names = [label] if isinstance(label, str) else (list(label) if label is not None else list(feats["train"].labels))
    if not names:
        raise ValueError(f"run_probe: the train index {os.fspath(train)!r} has no label column to probe")
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name in names:
        res, cm, classes = _probe_label(name, feats["train"], feats["val"], protocol, hp, dev, seed)
        if out_dir is not None:
            png = out_dir / f"confusion_{protocol}_{name}.png"
            title = f"{source.name} | {protocol} probe | {name}: top-1 {100 * res['top1']:.1f}% ({view_spec} views)"
            save_confusion_png(cm, classes, png, title)
            res["confusion_png"] = str(png)
        results[name] = res
        if verbose:
            top5 = f", top-5 {100 * res['top5']:.1f}%" if "top5" in res else ""
            print(
                f"probe {protocol} {name}: top-1 {100 * res['top1']:.1f}%{top5} ({res['num_classes']} classes, "
                f"{res['val_clips']} val clips, majority {100 * res['majority']:.1f}%)"
            )

    result = {
        "source": source.name,
        "fingerprint": source.fingerprint(),
        "protocol": protocol,
        "train": os.fspath(train),
        "val": os.fspath(val),
        "settings": {
            "epochs": hp["epochs"]
            if hp["epochs"] is not None
            else f"auto (>= {DEFAULTS[protocol]['epochs']}, >= {MIN_STEPS} steps)",
            **{k: hp[k] for k in ("lr", "weight_decay", "batch_size")},
            "heads": hp["heads"] if protocol == "attentive" else None,
            "warmup_fraction": WARMUP_FRACTION,
            "optimizer": "AdamW(0.9, 0.999)",
            "schedule": "linear warm-up + cosine to 0",
            "frames": frames,
            "size": size,
            "views": str(view_spec),
            "train_views": str(train_spec),
            "view_averaging": "mean of logits",
            "precision": feats["val"].settings["precision"],
            "device": str(dev),
            "seed": seed,
        },
        "features": {
            split: {
                "clips": fs.num_clips,
                "views": fs.num_views,
                "skipped": [list(b) for b in fs.bad],
                "cache": str(fs.path) if fs.path is not None else None,
                "cache_hit": fs.hit,
            }
            for split, fs in feats.items()
        },
        "extract_seconds": round(extract_seconds, 3),
        "results": results,
    }
    if out_dir is not None:
        path = out_dir / f"probe_{protocol}.json"
        path.write_text(json.dumps(result, indent=1))
        result["json"] = str(path)
    return result
