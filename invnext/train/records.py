"""What a run leaves behind and shows while it runs: progress line, metrics JSONL, TensorBoard, loss plot, summary.

Per stage output folder (only the main rank writes)::

    metrics.jsonl   one JSON object per logged step: step, loss terms (``loss``, ``loss/<term>``,
                    per-layer vectors as ``<name>/<i>``), lr, grad_norm, skipped, skipped_total,
                    clips_per_s, tokens_per_s (clips/s x the clip's T*H*W grid tokens), data_wait
                    (fraction of the step spent waiting for the loader), dropped_total (unreadable
                    clips), epoch, time (s since the stage began, across resumes), collapse/* monitors
    tb/             TensorBoard events (when ``tensorboard`` is importable and enabled)
    losses.png      the loss curves and the learning rate (matplotlib, Agg backend), written at the end
    summary.json    the summary line's numbers

Non-finite numbers are written as ``null`` (JSON has no NaN). On resume from step ``k`` the
records of steps after ``k`` (logged before a kill, then recomputed) are dropped first.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "ProgressLine", "format_summary", "plot_losses", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "losses.png"
SUMMARY_FILE = "summary.json"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
    return out


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and TensorBoard (``tb/``); truncates both on resume."""

    def __init__(self, out_dir: Path, start_step: int, tensorboard: bool):
        self.path = out_dir / METRICS_FILE
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 - open for the whole run, closed by close()
        self.tb = None
        self.tb_dir = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # noqa: BLE001 - tensorboard not installed: JSONL only
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb_dir = out_dir / "tb"
                self.tb = SummaryWriter(os.fspath(self.tb_dir), purge_step=start_step + 1)

    def log(self, record: Mapping[str, Any]) -> None:
        clean = {k: _clean(v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self.tb is not None:
            self.tb.close()


class ProgressLine:
    """A live progress bar: tqdm when installed, else one carriage-return line on stderr (throttled)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.step = initial
        self.desc = desc
        self._bar = None
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except Exception:  # noqa: BLE001 - no tqdm: plain line
            tqdm = None
        if tqdm is not None:
            self._bar = tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def update(self, step: int, fields: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
        if self._bar is not None:
            self._bar.update(step - self.step)
            self._bar.set_postfix_str(text, refresh=False)
        else:
            now = time.monotonic()
            if now - self._last >= 0.5 or step == self.total:
                self._last = now
                sys.stderr.write(f"\r{self.desc} {step}/{self.total} {text}\x1b[K")
                sys.stderr.flush()
        self.step = step

    def write(self, message: str) -> None:
        """Print a message above the bar."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            sys.stderr.write(("\n" if self.enabled else "") + message + "\n")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4):
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v)


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str) -> Path | None:
    """Loss curves (log scale; raw faint, trailing mean solid) and the learning rate from ``metrics.jsonl``.

    Returns the PNG's path, or None when there is nothing to plot.
    """
    records = read_metrics(metrics_path)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    keys = [k for k in records[-1] if k == "loss" or k.startswith("loss/")]
    steps = [r["step"] for r in records]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for k in keys:
        ys = [r.get(k) for r in records]
        pts = [(s, y) for s, y in zip(steps, ys) if isinstance(y, (int, float)) and y > 0]
        if pts:
            xs, vs = [p[0] for p in pts], [p[1] for p in pts]
            line = ax.plot(xs, vs, linewidth=0.6, alpha=0.35)[0]
            ax.plot(xs, _smooth(vs), color=line.get_color(), label=k.removeprefix("loss/"), linewidth=1.6 if k == "loss" else 1.1)
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax_lr.plot(steps, [r.get("lr") or 0.0 for r in records], color="gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(png_path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _smooth(values: list[float]) -> list[float]:
    """Trailing mean over ~5% of the points (at least 1): the trend through noisy per-step losses."""
    w = max(1, len(values) // 20)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return out


def format_summary(stage: int, s: Mapping[str, Any]) -> str:
    """The one-line end-of-stage summary."""
    losses = ", ".join(f"{k.removeprefix('loss/')} {_fmt(v)}" for k, v in s["final_losses"].items() if k != "loss")
    final = s["final_losses"].get("loss")
    session = s.get("steps_this_session", s["steps"])
    steps = f"{s['steps']} steps" + (f" ({session} in this session)" if session != s["steps"] else "")
    return (
        f"stage {stage}: {steps} in {s['wall_s']:.1f} s ({s['clips_per_s']:.2f} clips/s), "
        f"final loss {_fmt(final) if final is not None else 'n/a'}"
        + (f" ({losses})" if losses else "")
        + f", skipped {s['skipped']}; weights {s['weights']}, checkpoints {s['checkpoints']}, "
        f"metrics {s['metrics']}, plot {s['plot']}"
    )
