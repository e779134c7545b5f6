"""The evaluation table that ends the default run: what each model's frozen features know.

Four feature sources are probed with the attentive protocol on the bundled dataset's labels
(``appearance``: which digit; ``dynamics``: which way and how fast it circles):

* a randomly initialised encoder of the run's own architecture (the floor: what the
  architecture and a trained probe reach without pretraining);
* the image teacher of Stage 1 applied frame by frame, features averaged over frames (an
  image model with no notion of frame order);
* the Stage-1 encoder and the Stage-2 encoder of the run.

Every source goes through :func:`invnext.eval.probe.run_probe` (attentive, then a linear probe on
the pooled embedding from the same cached features) with the same settings and seed,
so the rows differ only in the features. Results: ``OUT/eval/table.json`` (every probe's full
result), ``OUT/eval/table.md`` (the table) and the confusion matrices beside them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["EvalRow", "evaluate_run", "format_table"]

LABELS = ("appearance", "dynamics")


@dataclass(frozen=True)
class EvalRow:
    """One probed feature source: its table name, the ``run_probe`` encoder argument, and why it is there."""

    name: str
    source: Any
    role: str


def _rows(out_dir: Path, seed: int, teacher: Any) -> list[EvalRow]:
    from invnext.loading import load_encoder
    from invnext.models.encoder import Encoder

    stage1, stage2 = out_dir / "stage1", out_dir / "stage2"
    for d in (stage1, stage2):
        if not (d / "model.safetensors").is_file():
            raise FileNotFoundError(f"evaluate_run: {d / 'model.safetensors'} is missing; run both stages first")
    trained = load_encoder(stage2 / "model.safetensors")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random_encoder = Encoder(trained.cfg)  # same architecture, untrained weights
    del trained
    return [
        EvalRow("random encoder", random_encoder, "untrained, same architecture"),
        EvalRow("image teacher, frames averaged", teacher, "Stage 1's teacher, no frame order"),
        EvalRow("Stage 1 encoder", stage1 / "model.safetensors", "after Stage 1"),
        EvalRow("Stage 2 encoder", stage2 / "model.safetensors", "after Stage 2"),
    ]


def evaluate_run(
    out_dir: str | os.PathLike,
    *,
    train: str | os.PathLike | None = None,
    val: str | os.PathLike | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    cache: str | os.PathLike | bool | None = True,
    epochs: int | None = None,
    lr: float | None = None,
    teacher: Any = "teacher:default",
    eval_dir: str | os.PathLike | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Probe the four sources of the module docstring and write the table.

    Args:
        out_dir: a run folder holding ``stage1/model.safetensors`` and ``stage2/model.safetensors``.
        train, val: labelled indexes with ``appearance`` and ``dynamics`` columns (default: the
            bundled dataset's ``train.csv`` / ``val.csv``).
        seed: the random encoder's weights, the probes' initialisation and batch order.
        device: where encoders and probes run (default CUDA when available, else CPU).
        cache: feature cache (see :func:`invnext.eval.probe.run_probe`).
        epochs, lr: probe epochs and peak learning rate (default: ``run_probe``'s, which under-fit: the
            README's "converged probe" uses 100 and 3e-3).
        teacher: the image teacher's source for ``run_probe`` (default ``"teacher:default"``, the
            bundled teacher in the default cache; the trainer passes the one its run used).
        eval_dir: where the table goes (default ``out_dir/eval``).
    Returns:
        ``{"rows": [{"name", "role", "appearance", "dynamics", "linear": {label: top1}, "seconds"}],
        "chance": {label: majority share}, "probe": {protocol: settings}, "probes": {row name: {protocol:
        run_probe result}}, "files": {"json", "markdown"}}``;
        accuracies are top-1 fractions: ``appearance`` / ``dynamics`` of the attentive probe (the
        paper's protocol), ``linear`` of a linear probe on the pooled embedding.
    """
    from invnext.eval.probe import ProbeConfig, run_probe

    out_dir = Path(out_dir)
    eval_dir = out_dir / "eval" if eval_dir is None else Path(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    rows, full, chance, settings = [], {}, {}, None
    sources = _rows(out_dir, seed, teacher)
    enc_cfg = sources[0].source.cfg
    # Every source sees the same frames at the same size: the encoders' clip (the teacher's own
    # default would be a longer clip, which would change its dynamics evidence, not only its model).
    clip = {"frames": enc_cfg.num_frames, "size": enc_cfg.img_size}
    # One decoding process beside the encoder: measured 17% faster extraction on the 2-core CPU.
    workers = 1
    for i, row in enumerate(sources):
        t0 = time.perf_counter()
        folder = eval_dir / f"{i}_{row.name.split(',')[0].replace(' ', '_')}"
        res = {
            protocol: run_probe(
                row.source, train, val,
                ProbeConfig(protocol=protocol, label=tuple(LABELS), epochs=epochs, lr=lr, seed=seed, workers=workers, **clip),
                out=folder, cache=cache, device=device, verbose=False,
            )
            for protocol in ("attentive", "linear")  # the second reads the features the first cached
        }
        seconds = time.perf_counter() - t0
        att, lin = res["attentive"]["results"], res["linear"]["results"]
        acc = {name: att[name]["top1"] for name in LABELS}
        linear = {name: lin[name]["top1"] for name in LABELS}
        chance = {name: att[name]["majority"] for name in LABELS}
        settings = {p: r["settings"] for p, r in res.items()}
        rows.append({"name": row.name, "role": row.role, **acc, "linear": linear, "seconds": round(seconds, 1)})
        full[row.name] = res
        if verbose:
            print(f"eval: {row.name}: attentive probe appearance {100 * acc['appearance']:.1f}%, "
                  f"dynamics {100 * acc['dynamics']:.1f}% ({seconds:.0f} s)", flush=True)
    result = {"rows": rows, "chance": chance, "probe": settings, "probes": full}
    md = format_table(result)
    (eval_dir / "table.md").write_text(md + "\n")
    (eval_dir / "table.json").write_text(json.dumps(result, indent=1, default=str))
    result["files"] = {"json": str(eval_dir / "table.json"), "markdown": str(eval_dir / "table.md")}
    return result


def format_table(result: dict[str, Any]) -> str:
    """The markdown table of :func:`evaluate_run`'s rows: top-1 in percent, the majority class's share last."""
    lines = [
        "| frozen features | appearance, attentive | dynamics, attentive | appearance, linear | dynamics, linear |",
        "|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lin = r["linear"]
        lines.append(
            f"| {r['name']} | {100 * r['appearance']:.1f}% | {100 * r['dynamics']:.1f}% "
            f"| {100 * lin['appearance']:.1f}% | {100 * lin['dynamics']:.1f}% |"
        )
    ch = result["chance"]
    a, d = 100 * ch["appearance"], 100 * ch["dynamics"]
    lines.append(f"| (majority class) | {a:.1f}% | {d:.1f}% | {a:.1f}% | {d:.1f}% |")
    return "\n".join(lines)
