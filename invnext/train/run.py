"""``invnext pretrain``: load and check every stage's config, then run the stages in order.

Output layout: ``OUT/stage1/`` and ``OUT/stage2/`` (each: ``model.safetensors`` = the stage's
final weights, ``checkpoints/``, ``metrics.jsonl``, ``tb/``, ``losses.png``, ``summary.json``).
With ``--stage both`` Stage 2 starts from ``OUT/stage1`` (its final weights). Every config is
loaded and checked before the first step of the first stage, so a misspelt key in the Stage-2
config fails at once, not after Stage 1.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from invnext.config import ConfigError
from invnext.train.config import TrainConfig, load_train_config, read_config_file
from invnext.train.distributed import setup, teardown
from invnext.train.loop import FaultHooks, StageResult, UsageError, stage_done, train_stage

__all__ = ["pretrain", "resolve_configs"]


def _stages(stage: str | int) -> list[int]:
    if str(stage) == "both":
        return [1, 2]
    if str(stage) in ("1", "2"):
        return [int(stage)]
    raise ValueError(f"--stage must be 1, 2 or both, got {stage!r}")


def resolve_configs(
    stage: str | int, configs: Sequence[str] = (), preset: str | None = None, sets: Sequence[str] = ()
) -> dict[int, TrainConfig]:
    """The checked TrainConfig of every stage to run (config files are matched to stages by their ``stage`` key)."""
    stages = _stages(stage)
    if configs and preset:
        raise ValueError("give --config FILE or --preset NAME, not both (a config file names its preset in model.preset)")
    files: dict[int, str] = {}
    for f in configs:
        data = read_config_file(f)
        st = data.get("stage")
        if st not in (1, 2):
            raise ConfigError(f"{f}: a config file must say which stage it configures ('stage: 1' or 'stage: 2'), got {st!r}")
        if st in files:
            raise ValueError(f"two config files for stage {st}: {files[st]} and {f}")
        if st not in stages:
            raise ValueError(f"{f} configures stage {st}, but --stage {stage} does not run it")
        files[st] = f
    if configs:
        missing = [st for st in stages if st not in files]
        if missing:
            raise ValueError(f"--stage {stage} needs a config file for stage {missing[0]} (one --config per stage)")
    return {st: load_train_config(st, files.get(st), preset=preset, sets=sets) for st in stages}


def _default_out(configs: Sequence[str], preset: str | None) -> Path:
    if configs:
        return Path("runs") / Path(configs[0]).stem.replace("stage1_", "").replace("stage2_", "")
    return Path("runs") / (preset or "tiny")


def pretrain(
    stage: str | int,
    configs: Sequence[str] = (),
    preset: str | None = None,
    sets: Sequence[str] = (),
    out: str | os.PathLike | None = None,
    resume: bool = False,
    init: str | None = None,
    hooks: FaultHooks | None = None,
    evaluate: str = "auto",
) -> list[StageResult]:
    """Run the stages (see the module docstring); returns one :class:`StageResult` per stage run.

    ``evaluate``: "on" ends a ``--stage both`` run with :func:`invnext.eval.table.evaluate_run`
    (probe table and a reconstruction picture in ``OUT/eval/``); "auto" does so when both stages
    trained on the bundled default dataset (whose labels the table needs); "off" never.
    """
    if evaluate not in ("auto", "on", "off"):
        raise ValueError(f"evaluate must be 'auto', 'on' or 'off', got {evaluate!r}")
    cfgs = resolve_configs(stage, configs, preset, sets)
    stages = list(cfgs)
    if init is not None and stages != [2]:
        raise UsageError("--init applies to --stage 2 only (with --stage both, Stage 2 starts from this run's Stage 1)")
    out_dir = Path(out) if out is not None else _default_out(configs, preset)
    info = setup(cfgs[stages[0]].device)
    results = []
    try:
        for st in stages:  # a global batch this many devices cannot split fails before any stage runs
            try:
                cfgs[st].batch.accumulation_for(info.world_size)
            except ValueError as exc:
                raise UsageError(f"stage {st}: {exc}") from None
        for st in stages:
            cfg = cfgs[st]
            sdir = out_dir / f"stage{st}"
            done = stage_done(sdir) if resume else None
            if done is not None and done.get("steps") == _planned_steps(cfg, done):
                if info.is_main:
                    print(f"stage {st}: already finished in {sdir} ({done['steps']} steps); skipping")
                results.append(StageResult(st, sdir, sdir / "model.safetensors", done["steps"], done, ""))
                continue
            st_init = None
            if st == 2:
                st_init = init or cfg.init or (str(out_dir / "stage1") if len(stages) == 2 else None)
            results.append(train_stage(cfg, sdir, info, resume=resume, init=st_init, hooks=hooks))
        if info.is_main and _wants_eval(evaluate, cfgs):
            _evaluate(out_dir, cfgs, info)
        if info.is_main:
            where = "; ".join(f"stage {r.stage}: {r.weights}" for r in results)
            print(f"results in {out_dir}: {where}")
    finally:
        teardown(info)
    return results


def _planned_steps(cfg: TrainConfig, done: dict) -> int:
    """The step count a finished stage was run for, if ``cfg`` still asks for it (epochs: trust the summary)."""
    return cfg.schedule.steps if cfg.schedule.steps is not None else done.get("steps")


def _wants_eval(evaluate: str, cfgs: dict[int, TrainConfig]) -> bool:
    if evaluate == "off":
        return False
    if sorted(cfgs) != [1, 2]:
        if evaluate == "on":
            raise UsageError("--eval on needs --stage both (the table compares the Stage-1 and Stage-2 encoders)")
        return False
    return evaluate == "on" or all(c.data.source is None for c in cfgs.values())


def _evaluate(out_dir: Path, cfgs: dict[int, TrainConfig], info) -> None:
    """Probe table and a reconstruction picture of the run in ``OUT/eval/`` (see :mod:`invnext.eval.table`)."""
    import time

    from invnext.data.dataset import read_index
    from invnext.eval.reconstruct import reconstruct
    from invnext.eval.sources import TeacherSource
    from invnext.eval.table import evaluate_run, format_table
    from invnext.teacher_pretrain import load_default_teacher
    from invnext.train.sources import default_data

    t0 = time.perf_counter()
    data = default_data(cfgs[1], info)  # the same variant Stage 1 trained on
    print("eval: attentive probes on frozen features (appearance: which digit; dynamics: how it moves)", flush=True)
    device = "cpu" if cfgs[1].device == "cpu" else None
    teacher = TeacherSource(load_default_teacher(data), name="teacher:default")  # the teacher Stage 1 used
    result = evaluate_run(
        out_dir, train=data.train_index, val=data.val_index, seed=cfgs[2].seed, device=device, teacher=teacher
    )
    first_val = read_index(data.val_index).entries[0].path
    rec = reconstruct(out_dir / "stage1", first_val, steps=20, out=out_dir / "eval" / "reconstruction.png",
                      teacher=str(data.teacher_weights), seed=cfgs[1].seed, device=device)
    print(f"eval: {time.perf_counter() - t0:.0f} s; probe table {result['files']['markdown']}, "
          f"reconstruction {rec['png']} (hidden-patch PSNR {rec['psnr_hidden']:.1f} dB; "
          f"the clip's mean colour gives {rec['psnr_hidden_mean_colour']:.1f} dB)")
    print(format_table(result), flush=True)
