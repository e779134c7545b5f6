"""Learning curves: what a stage's frozen encoder knows at each checkpoint it kept.

A run keeps its last ``keep_last`` checkpoints (``STAGE/checkpoints/step_N/``), so a curve over a
whole run needs ``--set keep_last=...`` large enough. Every point is probed with the attentive
protocol on both labels of the bundled dataset, with one set of probe settings and one seed, as in
the evaluation table, so points differ only in the encoder. ``curve.json`` holds every point's
top-1 and its standard error over the val clips; ``curve.png`` draws them with the table's random
encoder and image teacher as flat lines.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["checkpoint_steps", "probe_checkpoints", "plot_curve", "standard_error"]

from invnext.eval.table import LABELS


def standard_error(top1: float, clips: int) -> float:
    """The binomial standard error of an accuracy over ``clips`` independent clips."""
    return math.sqrt(top1 * (1.0 - top1) / clips)


def checkpoint_steps(stage_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, folder)]`` of the complete checkpoints under ``stage_dir/checkpoints``, by step."""
    root = Path(stage_dir) / "checkpoints"
    if not root.is_dir():
        raise FileNotFoundError(f"probe_checkpoints: {root} is missing; is {stage_dir} a stage folder of a run?")
    found = [
        (int(d.name.removeprefix("step_")), d)
        for d in root.iterdir()
        if d.is_dir() and d.name.startswith("step_") and (d / "model.safetensors").is_file()
    ]
    if not found:
        raise FileNotFoundError(f"probe_checkpoints: {root} holds no complete step_N checkpoint")
    return sorted(found)


def probe_checkpoints(
    stage_dir: str | os.PathLike,
    *,
    start: str | os.PathLike | None = None,
    train: str | os.PathLike | None = None,
    val: str | os.PathLike | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    cache: str | os.PathLike | bool | None = True,
    known: Mapping[str, Mapping[str, Any]] | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Probe the encoder of every kept checkpoint of ``stage_dir`` (and ``start`` as step 0).

    Args:
        stage_dir: a stage folder of a run (``OUT/stage1`` or ``OUT/stage2``).
        start: the encoder the stage started from (e.g. ``OUT/stage1/model.safetensors`` for Stage 2),
            drawn at step 0; None: no step-0 point.
        train, val: labelled indexes (default: the bundled dataset's).
        epochs, lr, seed, device, cache: as :func:`invnext.eval.table.evaluate_run`.
        known: attentive ``run_probe`` results already computed on these indexes with these settings,
            by encoder fingerprint (``evaluate_run``'s ``probes``): a point whose encoder holds the same
            weights (the Stage-1 start, the final checkpoint) reuses its result instead of training
            the probe again.
    Returns:
        ``{"stage_dir", "probe": settings, "points": [{"step", "source", "val_clips", "reused", label:
        top1, f"{label}_se": standard error}]}``, points by step.
    """
    from invnext.eval.probe import ProbeConfig, run_probe
    from invnext.eval.sources import resolve_source

    paths = [(0, Path(start))] if start is not None else []
    paths += checkpoint_steps(stage_dir)
    points, settings = [], None
    for step, path in paths:
        source = resolve_source(path, seed=seed, verbose=False)
        res = (known or {}).get(source.fingerprint())
        reused = res is not None
        if not reused:
            res = run_probe(
                source, train, val,
                ProbeConfig(protocol="attentive", label=LABELS, epochs=epochs, lr=lr, seed=seed, workers=1),
                cache=cache, device=device, verbose=False,
            )
        clips = res["features"]["val"]["clips"]
        point: dict[str, Any] = {"step": step, "source": str(path), "val_clips": clips, "reused": reused}
        for name in LABELS:
            top1 = res["results"][name]["top1"]
            point[name], point[f"{name}_se"] = top1, standard_error(top1, clips)
        points.append(point)
        settings = res["settings"]
        if verbose:
            print(f"curve: step {step}: appearance {100 * point['appearance']:.1f}%, "
                  f"dynamics {100 * point['dynamics']:.1f}%", flush=True)
    return {"stage_dir": str(stage_dir), "probe": settings, "points": points}


def plot_curve(curve: dict[str, Any], path: str | os.PathLike, baselines: dict[str, dict[str, float]] | None = None,
               title: str = "attentive probe of each checkpoint") -> Path:
    """Write ``curve`` (from :func:`probe_checkpoints`) as a PNG, one panel per label, with error bars
    of one standard error and ``baselines`` (``{name: {label: top1}}``) as flat dashed lines; also
    writes the curve beside it as ``<path>.json``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    steps = [p["step"] for p in curve["points"]]
    fig, axes = plt.subplots(1, len(LABELS), figsize=(5.2 * len(LABELS), 3.8), squeeze=False)
    for ax, name in zip(axes[0], LABELS):
        ys = [100 * p[name] for p in curve["points"]]
        es = [100 * p[f"{name}_se"] for p in curve["points"]]
        ax.errorbar(steps, ys, yerr=es, marker="o", capsize=3, label="this run")
        for i, (base, accs) in enumerate((baselines or {}).items()):
            ax.axhline(100 * accs[name], linestyle="--", color=f"C{i + 1}", label=base)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name}, top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    path.with_suffix(".json").write_text(json.dumps({**curve, "baselines": baselines}, indent=1, default=str))
    return path
