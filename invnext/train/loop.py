"""One pretraining stage: build, (resume,) train, checkpoint, record.

:func:`_train_stage` reads top to bottom as the stage runs: :func:`_open_output` (resume or refuse),
:func:`_build_run` (data, model, optimizer), :func:`_resume` (a checkpoint's weights, optimizer, RNG
and counts), then per step :func:`_train_step`, :func:`_log_step` and :func:`_save`, and at the end
:func:`_finish` (weights file, plot, summary).

A step (0-based ``step``; records and checkpoints count completed steps, ``step + 1``):

1. ``lr = lr_at(step)`` (warmup + cosine) on every param group.
2. For each of this rank's micro-batches ``j`` (``batches.micro_range``): reseed torch's default
   generators (drop path) and a CPU generator (masks, diffusion t and noise) from
   ``micro_seed(seed, step, j)``; forward under autocast (bf16 on GPU, fp32 on CPU);
   backward of ``loss / accumulation`` (DDP: gradient sync only on the last micro-batch).
3. Global gradient norm, clipped to ``optim.grad_clip``. A non-finite norm or loss skips the
   update (the step and its data still count), adds to ``skipped``; more than
   ``max_skipped_steps`` in a row stops the run with :class:`NonFiniteLossError`. A step that drew
   no readable clip makes no update either; more than ``max_skipped_steps`` of them in a row (or a
   whole session of them) stop the run with :class:`NoReadableDataError` naming the data source.
4. Loss terms averaged over every micro-batch of every rank; logged every ``log_every`` steps
   (and on the first, the last and every skipped step) with the collapse monitors.
5. Checkpoint every ``save_every`` steps and at the end (``invnext.train.checkpoint``).

Test seams (environment, read by :meth:`FaultHooks.from_env`; used by the tests only; a step is
``k`` or ``stage:k``): ``INVNEXT_TEST_NAN_STEPS="3,4"`` makes those steps' losses NaN;
``INVNEXT_TEST_KILL_AFTER_STEP=k`` SIGKILLs the process after step k (after its checkpoint, if it
saves one); ``INVNEXT_TEST_KILL_IN_SAVE=k`` SIGKILLs it in the middle of writing step k's checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from invnext.config import Stage1Config, to_dict
from invnext.models import Encoder, Stage1Model, Stage2Model, set_grad_checkpointing, set_ops_backend
from invnext.train import checkpoint as ckpt
from invnext.train.batches import StepSampler, make_loader, micro_range, micro_seed, mix_seed
from invnext.train.config import TrainConfig, config_to_json, steps_for
from invnext.train.distributed import DistInfo, all_reduce_sum, barrier, gather_objects, grad_sync, unwrap, wrap_model
from invnext.train.monitors import CollapseMonitor
from invnext.train.optim import build_optimizer, lr_at, set_lr
from invnext.train.records import (
    METRICS_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    MetricsLog,
    ProgressLine,
    format_summary,
    plot_losses,
)
from invnext.train.sources import build_dataset, build_stage1_teacher, collate_fn

__all__ = [
    "FaultHooks",
    "NoReadableDataError",
    "NonFiniteLossError",
    "RunExistsError",
    "StageResult",
    "UsageError",
    "stage_done",
    "train_stage",
]

WEIGHTS_FILE = "model.safetensors"
CHECKPOINTS = "checkpoints"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class RunExistsError(RuntimeError):
    """The output folder already holds a run and ``resume`` was not asked for."""


class UsageError(ValueError):
    """The run cannot start as asked (a missing or unfit --init, a resume with changed settings, ...)."""


class NoReadableDataError(UsageError):
    """Steps drew no readable clip at all: the data source is unusable (training on it only decays the weights)."""


@dataclass(frozen=True)
class FaultHooks:
    """Fault injection for the tests (module docstring). Steps are ``(stage, step)`` pairs, step 1-based;
    stage 0 matches either stage."""

    nan_steps: frozenset[tuple[int, int]] = frozenset()
    kill_after_step: tuple[int, int] | None = None
    kill_in_save: tuple[int, int] | None = None

    @staticmethod
    def _parse(item: str) -> tuple[int, int]:
        stage, _, step = item.strip().rpartition(":")
        return (int(stage) if stage else 0, int(step))

    @classmethod
    def from_env(cls) -> FaultHooks:
        env = os.environ
        nan = frozenset(cls._parse(x) for x in env.get("INVNEXT_TEST_NAN_STEPS", "").split(",") if x.strip())
        after = env.get("INVNEXT_TEST_KILL_AFTER_STEP")
        save = env.get("INVNEXT_TEST_KILL_IN_SAVE")
        return cls(nan, cls._parse(after) if after else None, cls._parse(save) if save else None)

    @staticmethod
    def hits(spec: tuple[int, int] | None, stage: int, step: int) -> bool:
        return spec is not None and spec[1] == step and spec[0] in (0, stage)

    def nan_at(self, stage: int, step: int) -> bool:
        return any(self.hits(s, stage, step) for s in self.nan_steps)


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class StageResult:
    stage: int
    out_dir: Path
    weights: Path
    steps: int
    summary: dict[str, Any] = field(default_factory=dict)
    line: str = ""


def stage_done(out_dir: Path) -> dict | None:
    """The summary of a finished stage in ``out_dir`` (None when it has not finished)."""
    path = out_dir / SUMMARY_FILE
    if not (path.is_file() and (out_dir / WEIGHTS_FILE).is_file()):
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        return None
    return summary if summary.get("finished") else None


# --------------------------------------------------------------------------- building


def _cpu_threads(cfg: TrainConfig) -> int:
    """Compute threads of a CPU run: ``threads``, else $OMP_NUM_THREADS, else the cores the loader workers leave.

    Oversubscribed OpenMP threads (compute threads plus busy decode workers on more cores than
    exist) slow a step many times over, so the default leaves one core per worker.
    """
    if cfg.threads is not None:
        return cfg.threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - cfg.data.workers)


def _precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = full fp32)."""
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _stage2_init_encoder(init: str | None) -> Encoder | None:
    """The Stage-1 encoder a fresh Stage-2 run starts from (None: ``init: random``).

    ``init`` is a stage folder, a checkpoint folder or root, or a weights file: one of ours (its
    config travels in the metadata) or the authors' release (``invnext.loading.load_encoder``).
    """
    if init is None:
        raise UsageError(
            "stage 2 needs a Stage-1 checkpoint: pass --init CKPT (a checkpoint folder, a stage folder or a "
            "model.safetensors), set init in the config, or run --stage both"
        )
    if init == "random":
        return None
    from invnext.loading import load_encoder

    try:
        return load_encoder(ckpt.resolve_weights(init))
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--init {init}: {exc}") from None


def _build_model(cfg: TrainConfig, info: DistInfo, init: str | None, fresh: bool) -> nn.Module:
    model_cfg = cfg.model_config()
    torch.manual_seed(mix_seed(cfg.seed, 0))
    if isinstance(model_cfg, Stage1Config):
        teacher = build_stage1_teacher(cfg, model_cfg, info)
        torch.manual_seed(mix_seed(cfg.seed, 0))  # the model's init does not depend on how the teacher was made
        return Stage1Model(model_cfg, teacher=teacher)
    init_encoder = _stage2_init_encoder(init) if fresh else None
    torch.manual_seed(mix_seed(cfg.seed, 0))
    try:
        return Stage2Model(model_cfg, init_encoder=init_encoder)
    except RuntimeError as exc:  # load_state_dict: the Stage-1 encoder has another shape
        raise UsageError(f"--init {init}: its encoder does not fit this Stage-2 model: {exc}") from None


def _frozen_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes left out of checkpoints: the Stage-1 teacher (rebuilt from its source)."""
    return ("teacher.",) if isinstance(model, Stage1Model) else ()


def _fingerprint(cfg: TrainConfig, dataset_size: int) -> dict[str, Any]:
    """What must not change between a run and its resumption (for the same steps to follow)."""
    return {
        "model": to_dict(cfg.model_config()),
        "seed": cfg.seed,
        "batch.global_size": cfg.batch.global_size,
        "batch.per_device": cfg.batch.per_device,
        "data.source": cfg.data.source,
        "data.frames": cfg.data.frames,
        "data.size": cfg.data.size,
        "dataset_size": dataset_size,
    }


# --------------------------------------------------------------------------- the stage


def train_stage(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    info: DistInfo,
    *,
    resume: bool = False,
    init: str | None = None,
    hooks: FaultHooks | None = None,
) -> StageResult:
    """Run (or resume) one stage of ``cfg`` into ``out_dir``; returns where its results are.

    ``init`` (Stage 2): the Stage-1 checkpoint, overriding ``cfg.init``.
    Raises RunExistsError when ``out_dir`` already holds checkpoints and ``resume`` is False, and
    ``checkpoint.OutputLockedError`` while another live run holds ``out_dir`` (its checkpoint
    writes and pruning would race with this run's).
    """
    lock = ckpt.OutputLock(out_dir)
    refused = None
    if info.is_main:
        try:
            lock.acquire()
        except ckpt.OutputLockedError as exc:
            refused = str(exc)
    refused = gather_objects(refused, info)[0]  # every rank stops, not only the one that saw the lock
    if refused is not None:
        raise ckpt.OutputLockedError(refused)
    try:
        return _train_stage(cfg, out_dir, info, resume=resume, init=init, hooks=hooks)
    finally:
        lock.release()


def _train_stage(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    info: DistInfo,
    *,
    resume: bool,
    init: str | None,
    hooks: FaultHooks | None,
) -> StageResult:
    """Build the run, restore a checkpoint, step to the end, save: the stage in the order it happens."""
    out = Path(out_dir)
    existing = _open_output(cfg, out, info, resume)
    run = _build_run(cfg, out, info, init if init is not None else cfg.init, hooks or FaultHooks(), fresh=existing is None)
    tally = _resume(run, existing) if existing is not None else _Tally()
    sampler = StepSampler(len(run.dataset), cfg.batch.global_size, cfg.batch.per_device, info.rank, run.accum, cfg.seed,
                          tally.start_step, run.total)
    loader = make_loader(run.dataset, sampler, cfg.data.workers, collate_fn(), pin_memory=run.device.type == "cuda")
    records = MetricsLog(out, tally.start_step, cfg.tensorboard) if info.is_main else None
    progress = ProgressLine(run.total, tally.start_step, f"stage {run.stage}", info.is_main and cfg.progress)
    monitor = CollapseMonitor(run.core.encoder, cfg.monitor.min_std, cfg.monitor.min_erank_frac) if info.is_main else None
    if info.is_main:
        print(_banner(run, out))

    t_start = time.perf_counter()
    data_iter = iter(loader)
    try:
        for step in range(tally.start_step, run.total):
            log_now = (step + 1) % cfg.log_every == 0 or step == tally.start_step or step + 1 == run.total
            result = _train_step(run, step, data_iter, monitor if log_now else None, progress)
            step_done = step + 1
            tally.count(result)
            elapsed = tally.elapsed_before + (time.perf_counter() - t_start)
            _check_data(tally.empty_steps, tally.session_clips, step_done == run.total, cfg, run.bad_log,
                        len(run.dataset), run.data_desc, info)
            if info.is_main:
                _log_step(run, tally, result, step_done, elapsed, progress, records if log_now or not result.ok else None)
            if tally.consecutive > cfg.max_skipped_steps:
                raise NonFiniteLossError(
                    f"stage {run.stage}: {tally.consecutive} consecutive steps (up to step {step_done}) had a non-finite "
                    f"loss or gradient (limit max_skipped_steps={cfg.max_skipped_steps}); the run is diverging: lower "
                    "optim.lr, raise schedule.warmup_steps, or check the data. The last good checkpoint is in "
                    f"{ckpt.latest_checkpoint(run.root) or run.root}"
                )
            if step_done % cfg.save_every == 0 or step_done == run.total:
                _save(run, tally, step_done, elapsed)
            if run.hooks.hits(run.hooks.kill_after_step, run.stage, step_done):
                _die()
    finally:
        progress.close()
        if monitor is not None:
            monitor.close()
        if records is not None:
            records.close()
    return _finish(run, tally, out, time.perf_counter() - t_start)


# --------------------------------------------------------------------------- build


@dataclass
class _Run:
    """What a stage builds before its first step; fixed from then on."""

    cfg: TrainConfig
    info: DistInfo
    hooks: FaultHooks
    root: Path  # the checkpoints folder
    device: torch.device
    autocast_dtype: torch.dtype | None
    dataset: Any
    data_desc: str
    total: int
    warmup: int
    accum: int
    wrapped: nn.Module  # what the forward calls (DDP / FSDP around ``core``)
    core: nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[torch.Tensor]
    sharded: bool
    fingerprint: dict[str, Any]
    writer: ckpt.CheckpointWriter
    metadata: dict[str, str]
    bad_log: Any
    tokens_per_clip: int
    saving_step: int = 0  # the step a checkpoint is being written for: the kill-in-save test seam reads it

    @property
    def stage(self) -> int:
        return self.cfg.stage


@dataclass
class _Tally:
    """The counts a step updates and a checkpoint carries over to a resumed run."""

    start_step: int = 0
    skipped_total: int = 0
    dropped_total: int = 0
    elapsed_before: float = 0.0
    consecutive: int = 0  # skipped steps in a row
    empty_steps: int = 0  # steps in a row without a readable clip (not in checkpoints)
    session_clips: int = 0
    last_terms: dict[str, float] = field(default_factory=dict)  # of the last finite step

    def count(self, step: _StepResult) -> None:
        if step.ok and step.clips:
            self.consecutive = 0
        elif not step.ok:
            self.skipped_total += 1
            self.consecutive += 1
        self.dropped_total += step.dropped
        self.session_clips += step.clips
        self.empty_steps = 0 if step.clips else self.empty_steps + 1
        if step.ok:
            self.last_terms = {k: v for k, v in step.terms.items() if k == "loss" or k.startswith("loss/")}


def _open_output(cfg: TrainConfig, out: Path, info: DistInfo, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: a fresh run), after clearing writes a killed run left."""
    root = out / CHECKPOINTS
    existing = ckpt.latest_checkpoint(root)
    if existing is not None and not resume:
        raise RunExistsError(
            f"{out} already holds a stage-{cfg.stage} run (latest checkpoint {existing.name}); pass --resume to "
            "continue it, or choose another --out"
        )
    barrier(info)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        removed = ckpt.clean_partial(root)
        if removed:
            print(f"stage {cfg.stage}: removed {len(removed)} unfinished checkpoint write(s): {', '.join(p.name for p in removed)}")
    barrier(info)
    return existing


def _build_run(cfg: TrainConfig, out: Path, info: DistInfo, init: str | None, hooks: FaultHooks, fresh: bool) -> _Run:
    """Data, model, optimizer and checkpoint writer of a stage (``fresh``: no checkpoint to resume)."""
    enc = cfg.model_config().encoder
    device = info.device
    if device.type == "cpu":
        torch.set_num_threads(_cpu_threads(cfg))
    frames = cfg.data.frames or enc.num_frames
    size = cfg.data.size or enc.img_size
    dataset, data_desc = build_dataset(cfg, frames, size, info)
    total, warmup = steps_for(cfg, len(dataset))
    accum = cfg.batch.accumulation_for(info.world_size)

    model = _build_model(cfg, info, init, fresh=fresh)
    set_grad_checkpointing(set_ops_backend(model, cfg.ops_backend), cfg.grad_checkpointing)
    model.to(device)
    model.train()
    strategy = cfg.resolved_strategy()
    wrapped = wrap_model(model, strategy, info)
    core = unwrap(wrapped)
    if cfg.compile:
        core.compile()  # in place (nn.Module.compile): state_dict names stay free of torch.compile's "_orig_mod."
    run = _Run(
        cfg=cfg, info=info, hooks=hooks, root=out / CHECKPOINTS, device=device, autocast_dtype=_precision(cfg, device),
        dataset=dataset, data_desc=data_desc, total=total, warmup=warmup, accum=accum, wrapped=wrapped, core=core,
        optimizer=build_optimizer(core, cfg.optim), trainable=[p for p in core.parameters() if p.requires_grad],
        sharded=info.distributed and strategy == "fsdp", fingerprint=_fingerprint(cfg, len(dataset)),
        writer=ckpt.CheckpointWriter(out / CHECKPOINTS, cfg.keep_last), metadata=_model_metadata(cfg.model_config()),
        bad_log=_bad_file_log(), tokens_per_clip=(frames // enc.tubelet_size) * (size // enc.patch_size) ** 2,
    )

    def crash(where: str) -> None:
        if where == "after_model" and hooks.hits(hooks.kill_in_save, run.stage, run.saving_step):
            _die()

    run.writer.crash_hook = crash
    return run


def _resume(run: _Run, existing: Path) -> _Tally:
    """Load the newest readable checkpoint into ``run`` (weights, optimizer, RNG); returns its counts."""
    cfg, info, stage = run.cfg, run.info, run.stage
    try:  # a damaged newest checkpoint (bad disk, a copy cut short) falls back to the one before
        log = (lambda msg: print(f"stage {stage}: {msg}")) if info.is_main else (lambda msg: None)
        existing, saved = ckpt.read_latest(run.root, log=log)
    except ckpt.CheckpointError as exc:
        raise UsageError(f"--resume: {exc}") from None
    st = saved["state"]
    fingerprint = run.fingerprint
    diff = [k for k, v in fingerprint.items() if json.loads(json.dumps(st.get("fingerprint", {}).get(k))) != json.loads(json.dumps(v))]
    if diff:
        raise UsageError(
            f"--resume: {existing} was written with different {', '.join(diff)}; the run cannot continue "
            "exactly (use the original settings, or another --out)"
        )
    # The teacher is not in checkpoints: keep the one just built from its source.
    skip_prefixes = _frozen_prefixes(run.core)
    full = {k: v for k, v in run.core.state_dict().items() if skip_prefixes and k.startswith(skip_prefixes)}
    full.update(saved["model"])
    _load_state(run.core, run.optimizer, full, saved["optim"], run.sharded)
    if not ckpt.restore_rng_state(info.rank, saved["rng"], st["rng"].get(f"rank{info.rank}", {})):
        torch.manual_seed(mix_seed(cfg.seed, 4, info.rank, st["step"]))
    tally = _Tally(
        start_step=st["step"],
        skipped_total=st.get("skipped_total", 0),
        dropped_total=st.get("dropped_total", 0),
        elapsed_before=st.get("elapsed_s", 0.0),
        consecutive=st.get("consecutive_skipped", 0),
    )
    if info.is_main:
        print(f"stage {stage}: resuming from {existing} (step {tally.start_step} of {run.total})")
    return tally


def _banner(run: _Run, out: Path) -> str:
    cfg, info = run.cfg, run.info
    params = sum(p.numel() for p in run.trainable) / 1e6
    return (
        f"stage {run.stage}: {type(run.core).__name__} ({params:.2f}M trainable params), "
        f"data {run.data_desc}, {run.total} steps of {cfg.batch.global_size} clips ({cfg.batch.per_device} per forward "
        f"x {run.accum} accumulation x {info.world_size} device(s), {run.device.type}"
        f"{', bf16' if run.autocast_dtype else ', fp32'}), output {out}"
    )


# --------------------------------------------------------------------------- one step


@dataclass
class _StepResult:
    lr: float
    terms: dict[str, float]  # loss terms averaged over every micro-batch of every rank
    grad_norm: float
    ok: bool  # finite loss and gradient: the update was made (when there were clips)
    clips: int  # readable clips over every rank
    dropped: int
    wait: float  # seconds spent waiting for data
    seconds: float
    stats: dict[str, float]  # collapse monitor statistics (on a logged step)


def _train_step(
    run: _Run, step: int, data_iter, monitor: CollapseMonitor | None, progress: ProgressLine
) -> _StepResult:
    """One optimizer step (module docstring, 1-3); ``monitor`` is armed on its first micro-batch when given."""
    cfg, info, core, optimizer = run.cfg, run.info, run.core, run.optimizer
    t0 = time.perf_counter()
    wait = 0.0
    lr = lr_at(step, run.total, run.warmup, cfg.optim.lr, cfg.schedule.min_lr)
    set_lr(optimizer, lr)
    sums: dict[str, torch.Tensor] = {}
    counted = clips = dropped = 0
    stats: dict[str, float] = {}
    for a, j in enumerate(micro_range(info.rank, run.accum)):
        tw = time.perf_counter()
        batch = next(data_iter)
        wait += time.perf_counter() - tw
        bad = batch.get("bad", ())
        if run.bad_log is not None:
            run.bad_log.update(batch)
        dropped += len(bad)
        video = batch["video"]
        with grad_sync(run.wrapped, a == run.accum - 1):
            if video.numel() == 0:  # every clip of the micro-batch was unreadable: join the gradient sync with zeros
                loss = sum((p * 0.0).sum() for p in run.trainable)
                out_terms = None
            else:
                seed = micro_seed(cfg.seed, step, j)
                torch.manual_seed(seed)
                gen = torch.Generator().manual_seed(mix_seed(seed, 5))
                x = core.encoder.preprocess(video.to(run.device, non_blocking=True))
                arm = monitor is not None and a == 0
                if arm:
                    monitor.arm()
                amp = torch.autocast(run.device.type, dtype=run.autocast_dtype) if run.autocast_dtype else contextlib.nullcontext()
                with amp:
                    out_terms = run.wrapped(x, generator=gen)
                if arm:
                    stats, msgs = monitor.compute(out_terms.get("hidden", out_terms.get("hidden0")))
                    for msg in msgs:
                        progress.write(f"warning: step {step + 1}: {msg}")
                loss = out_terms["loss"]
                clips += video.shape[0]
            if run.hooks.nan_at(run.stage, step + 1):
                loss = loss * float("nan")
            (loss / run.accum).backward()
        if out_terms is not None:
            counted += 1
            _accumulate_terms(sums, out_terms, loss)

    terms, _, g_clips, g_dropped = _reduce_terms(sums, counted, clips, dropped, info)

    norm = torch.nn.utils.clip_grad_norm_(run.trainable, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    grad_norm = float(norm)
    ok = math.isfinite(grad_norm) and math.isfinite(terms.get("loss", 0.0))
    if ok and g_clips:  # no update without data: weight decay alone would shrink the weights
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return _StepResult(lr, terms, grad_norm, ok, g_clips, g_dropped, wait, time.perf_counter() - t0, stats)


# --------------------------------------------------------------------------- log


def _log_step(
    run: _Run, tally: _Tally, step: _StepResult, step_done: int, elapsed: float, progress: ProgressLine,
    records: MetricsLog | None,
) -> None:
    """The progress line, and a metrics record when ``records`` is given (main process only)."""
    terms, dt = step.terms, step.seconds
    clips_per_s = step.clips / dt if dt > 0 else 0.0
    if not step.ok:
        progress.write(
            f"warning: step {step_done}: non-finite loss or gradient (loss {terms.get('loss')}, grad norm "
            f"{step.grad_norm}); update skipped ({tally.consecutive} in a row, {tally.skipped_total} in all)"
        )
    fields = {"loss": terms.get("loss", float("nan"))}
    fields.update({k.removeprefix("loss/"): v for k, v in terms.items() if k.startswith("loss/")})
    fields.update({"lr": step.lr, "clips/s": clips_per_s, "tok/s": clips_per_s * run.tokens_per_clip,
                   "wait": f"{100 * step.wait / dt:.0f}%"})
    progress.update(step_done, fields)
    if records is not None:
        record = {"step": step_done, **terms, "lr": step.lr, "grad_norm": step.grad_norm, "skipped": not step.ok,
                  "skipped_total": tally.skipped_total, "clips_per_s": clips_per_s,
                  "tokens_per_s": clips_per_s * run.tokens_per_clip, "data_wait": step.wait / dt,
                  "dropped_total": tally.dropped_total, "epoch": step_done * run.cfg.batch.global_size / len(run.dataset),
                  "time": elapsed}
        record.update({f"collapse/{k}": v for k, v in step.stats.items()})
        records.log(record)


# --------------------------------------------------------------------------- save


def _save(run: _Run, tally: _Tally, step_done: int, elapsed: float) -> Path | None:
    """Write the checkpoint of ``step_done`` (every rank takes part; the main process writes)."""
    cfg, info = run.cfg, run.info
    run.saving_step = step_done
    model_sd, optim_sd = _full_state(run.core, run.optimizer, run.sharded)
    rngs = gather_objects(ckpt.rng_state(info.rank), info)
    final = None
    if info.is_main:
        tmp = run.writer.begin(step_done)
        rng_tensors: dict[str, torch.Tensor] = {}
        rng_meta: dict[str, Any] = {}
        for r, (tensors, meta) in enumerate(rngs):
            rng_tensors.update(tensors)
            rng_meta[f"rank{r}"] = meta
        G = cfg.batch.global_size
        state = {
            "stage": run.stage,
            "total_steps": run.total,
            "warmup_steps": run.warmup,
            "samples_seen": step_done * G,
            "epoch": step_done * G / len(run.dataset),
            "skipped_total": tally.skipped_total,
            "consecutive_skipped": tally.consecutive,
            "dropped_total": tally.dropped_total,
            "elapsed_s": elapsed,
            "world_size": info.world_size,
            "fingerprint": run.fingerprint,
            "config": config_to_json(cfg),
        }
        skip_prefixes = _frozen_prefixes(run.core)
        model_sd = {k: v for k, v in model_sd.items() if not k.startswith(skip_prefixes)}
        final = run.writer.commit(tmp, step_done, model_sd, optim_sd, state, rng_tensors, rng_meta, run.metadata)
    barrier(info)
    return final


def _finish(run: _Run, tally: _Tally, out: Path, wall: float) -> StageResult:
    """The final checkpoint (when the last step's is missing), the weights file, the plot and the summary."""
    cfg, info, root, total = run.cfg, run.info, run.root, run.total
    latest = ckpt.latest_checkpoint(root)
    if latest is None or int(latest.name.split("_")[-1]) != total:
        latest = _save(run, tally, total, tally.elapsed_before + wall)  # e.g. a resume of an already finished run
    weights = out / WEIGHTS_FILE
    summary: dict[str, Any] = {}
    line = ""
    if info.is_main:
        ckpt.copy_atomic(latest / ckpt.MODEL_FILE, weights)
        plot = plot_losses(out / METRICS_FILE, out / PLOT_FILE, f"stage {run.stage} ({cfg.model.preset})")
        summary = {
            "finished": True,
            "stage": run.stage,
            "steps": total,
            "steps_this_session": total - tally.start_step,
            "wall_s": wall,
            "total_s": tally.elapsed_before + wall,
            "clips_per_s": tally.session_clips / wall if wall > 0 else 0.0,
            "final_losses": tally.last_terms,
            "skipped": tally.skipped_total,
            "dropped": tally.dropped_total,
            "weights": str(weights),
            "checkpoints": str(root),
            "metrics": str(out / METRICS_FILE),
            "plot": str(plot) if plot else "none",
            "tensorboard": str(out / "tb") if cfg.tensorboard and (out / "tb").is_dir() else None,
        }
        if run.bad_log is not None and run.bad_log.count:
            summary["bad_files"] = run.bad_log.count
            print(run.bad_log.summary())
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
        line = format_summary(run.stage, summary)
        print(line)
    barrier(info)
    return StageResult(run.stage, out, weights, total, summary, line)


def _accumulate_terms(sums: dict[str, torch.Tensor], out: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
    """Add a micro-batch's loss terms (detached, on the device: no host sync) to ``sums``.

    Scalars become ``loss`` / ``loss/<name>``; vectors (``align_per_layer``) ``<name>/<i>``; masks are skipped.
    """
    for k, v in out.items():
        if k.startswith("hidden") or not torch.is_floating_point(v):
            continue
        v = (loss if k == "loss" else v).detach().float()
        name = ("loss" if k == "loss" else f"loss/{k}") if v.dim() == 0 else k
        sums[name] = sums[name] + v if name in sums else v


def _reduce_terms(
    sums: dict[str, torch.Tensor], counted: int, clips: int, dropped: int, info: DistInfo
) -> tuple[dict[str, float], float, int, int]:
    """Mean loss terms over every micro-batch of every rank, and the global clip / dropped counts (one reduction)."""
    names = sorted(sums)
    if info.distributed:  # a rank whose clips were all unreadable has no terms: use the union
        names = sorted(set().union(*gather_objects(names, info)))
    parts = [sums[n].reshape(-1).double().cpu() if n in sums else None for n in names]
    sizes = [p.numel() if p is not None else 1 for p in parts]
    if info.distributed:  # a missing term's size must agree across ranks
        sizes = [max(z) for z in zip(*gather_objects(sizes, info))]
    flat = [p if p is not None else torch.zeros(z, dtype=torch.float64) for p, z in zip(parts, sizes)]
    vec = torch.cat([*flat, torch.tensor([counted, clips, dropped], dtype=torch.float64)])
    vec = all_reduce_sum(vec, info)
    n_micro = max(vec[-3].item(), 1.0)
    terms: dict[str, float] = {}
    offset = 0
    for n, z in zip(names, sizes):
        values = (vec[offset:offset + z] / n_micro).tolist()
        if n == "loss" or n.startswith("loss/"):
            terms[n] = values[0]
        else:
            terms.update({f"{n}/{i}": x for i, x in enumerate(values)})
        offset += z
    return terms, n_micro, int(vec[-2].item()), int(vec[-1].item())


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """``(model state, name-keyed optimizer state)``, whole (gathered from the shards under FSDP; rank 0 gets them)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), ckpt.named_optimizer_state(model, optimizer)


def _load_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict, sharded: bool) -> None:
    """Load whole states (every rank reads the same files; FSDP keeps its own shard of each)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True))
        return
    model.load_state_dict(model_sd, strict=True)
    ckpt.load_named_optimizer_state(model, optimizer, optim_sd)


def _check_data(empty_steps: int, session_clips: int, last: bool, cfg: TrainConfig, bad_log, size: int, desc: str,
                info: DistInfo) -> None:
    """Stop (before a checkpoint) when the data gives nothing to train on: more than ``max_skipped_steps``
    steps in a row, or every step of this session, without one readable clip, or (one process, which
    sees every file it drew) every file of the index found bad."""
    every_file = not info.distributed and bad_log is not None and bad_log.count >= size
    if not (empty_steps > cfg.max_skipped_steps or (last and session_clips == 0) or every_file):
        return
    what = (
        "every one of its files is unreadable" if every_file
        else f"{empty_steps} step(s) in a row drew only unreadable clips"
    )
    if bad_log is not None and bad_log.count:
        what += f"; {bad_log.count} distinct bad file(s), e.g. {next(iter(bad_log.files.items()))}"
    raise NoReadableDataError(
        f"stage {cfg.stage}: no readable clip in the data source {desc}: {what}. "
        f"`invnext data check {cfg.data.source or 'INDEX'}` lists every bad file"
    )


def _bad_file_log():
    try:
        from invnext.data.dataset import BadFileLog
    except ImportError:  # pragma: no cover - the data package always has it
        return None
    return BadFileLog()


def _model_metadata(model_cfg) -> dict[str, str]:
    try:
        from invnext.loading import config_metadata
    except ImportError:  # pragma: no cover
        return {}
    return config_metadata(model_cfg)
