"""End-to-end training step: the fused path (``ops_backend="auto"``) against plain PyTorch (``"torch"``).

    python -m benchmarks.bench_step [--quick] [--presets base,large] [--stages 1,2] [--compile on|off]
                                    [--max-batch] [--max-seconds S]

One step is what the trainer does per optimizer step: synthetic uint8 clips of the preset's
shape (already on the device) normalised on the device (``encoder.preprocess``), the forward
under bf16 autocast (GPU; fp32 on the CPU), the backward, gradient clipping, AdamW step and
``zero_grad`` (the last three inside a ``record_function("optimizer")`` region).

* Presets ``base`` and ``large`` on a GPU (Stage 1: 16 clips, Stage 2: 14 clips / 8 for
  ``large``, the papers' per-GPU batches), ``tiny`` (2 clips) on the CPU, where only the
  reference path runs (on the CPU ``"auto"`` resolves to the same references).
* Stage 1's teacher: a **randomly initialised** ViT of SigLIP2-giant's shape (``TinyTeacher``
  built from the preset's teacher config with ``kind="tiny"``: width 1536, depth 40, 16 heads,
  MLP 6144, 256 px / patch 16, the same six aligned layers) — the same FLOPs as the real tower
  without needing its weights; it runs through ``invnext.ops`` like the rest of the model, so
  the fused path could accelerate it. It does not by default: the real teacher is a
  transformers model outside invnext's ops, the same in both paths, so the stand-in runs with
  ``ops_backend="auto"`` in every variant (``--teacher-follows-path`` switches it with the
  path) and the speedup measures the student side. On the CPU the tiny preset's own teacher.
  Stage 2's frozen target is invnext's own encoder and follows the path.
* Stage 2's masks are sampled once per model (seeded) and reused by every step and path: each
  path does the same work, compiled graphs see constant token counts, and the FLOP count is
  exact. They come with the sampler's host counts, as in training, so no step reads the GPU.
  Mask sampling itself is timed by ``bench_<op>_mask``; Stage 1 samples its semantic mask inside
  every step (a fixed count per frame). The diffusion noise uses the device's RNG.
* Rows: step time quantiles (ms), clips/s, tokens/s (grid tokens per clip), peak memory
  (``torch.cuda.max_memory_allocated`` after the warm-up), MFU (``invnext.train.flops`` count
  / time / the measured bf16 matmul peak; ``frac_of_peak``), speedup of every variant over the
  eager ``torch`` path of the same stage and preset.
* Breakdown (``train_step_breakdown`` rows): time per profiler region (teacher, masks,
  encoder, predictor, decoder, loss, optimizer, other) from ``torch.profiler``. Forward time is
  the self time of the ops inside each region; backward time is attributed through autograd
  sequence numbers: every backward node's ops (``autograd::engine::evaluate_function: ...``)
  carry the sequence number of the forward op that made the node, and that op's region gets
  them. Device (kernel) time on a GPU, CPU time on the CPU; gradient accumulation into
  ``.grad`` and the loss sum (outside every region) go to "other"; on a GPU, "idle" is the
  median step time minus the kernel time (launch gaps, host syncs).
* ``--max-batch``: the largest batch that fits (one full step), per stage and path, with and
  without activation checkpointing (doubling, then bisection).
* Order on a GPU (``--max-seconds`` cuts the tail): the timings of every stage, then the
  profiled breakdowns, then ``torch.compile`` variants (each only with ``COMPILE_MIN_S`` left,
  so ``--quick`` normally skips them), then activation checkpointing (not in ``--quick``).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import os
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repo root must be importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import Row, gpu_name, measured_peaks, quantiles_ms, write_results

NAME = "bench_step"
REGIONS = ("teacher", "masks", "encoder", "predictor", "decoder", "loss", "optimizer")
PATH_LABEL = {"auto": "fused (ops_backend=auto)", "torch": "torch (ops_backend=torch)"}
DEFAULT_BATCH = {("tiny", 1): 2, ("tiny", 2): 2, ("base", 1): 16, ("base", 2): 14, ("large", 1): 16, ("large", 2): 8}
GRAD_CLIP = 5.0  # OptimConfig's default
TEACHER_BACKEND = "auto"  # the Stage-1 teacher stand-in's ops in every variant (module docstring)
# A compiled variant starts only with this much time left before --max-seconds: compiling the
# base model (a 40-block teacher, 12 + 5 + 6 blocks) takes minutes, and a cut compile yields nothing.
COMPILE_MIN_S = 150.0


# --------------------------------------------------------------------------- model and one step


def build_model(stage: int, preset: str, device: torch.device):
    """(model, stage config): random init, seeded; Stage 1 with a random teacher of the config's shape."""
    from invnext.config import get_preset
    from invnext.models import Stage1Model, Stage2Model, TinyTeacher

    cfgs = get_preset(preset)
    torch.manual_seed(0)
    with torch.device(device):
        if stage == 1:
            cfg = cfgs.stage1
            teacher = None
            if cfg.teacher.kind != "tiny":  # SigLIP2's shape, random weights (see the module docstring)
                teacher = TinyTeacher(dataclasses.replace(cfg.teacher, kind="tiny", path=None))
            model = Stage1Model(cfg, teacher=teacher)
        else:
            cfg = cfgs.stage2
            model = Stage2Model(cfg)
    return model.to(device).train(), cfg


def synthetic_clips(cfg, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """uint8 ``[B, T, H, W, 3]`` clips of the encoder config's shape, on ``device``."""
    enc = cfg.encoder
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (batch, enc.num_frames, enc.img_size, enc.img_size, 3)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)


class StepRunner:
    """One training step of ``model`` on a fixed batch (module docstring), and its FLOP count."""

    def __init__(self, model, cfg, stage: int, batch: int, device: torch.device, *, compiled: bool = False):
        from invnext.train.config import OptimConfig
        from invnext.train.optim import build_optimizer

        self.model, self.cfg, self.stage, self.batch, self.device = model, cfg, stage, batch, device
        self.optimizer = build_optimizer(model, OptimConfig())
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.forward = torch.compile(model) if compiled else model
        self.video = synthetic_clips(cfg, batch, device)
        self.amp = device.type == "cuda"
        self.masks = None
        if stage == 2:
            gen = torch.Generator(device="cpu").manual_seed(1)
            grid = model.encoder.cfg.grid
            # (mask on the device, host counts) pairs: the step sizes its packed batches without a sync.
            self.masks = [(m.to(device), n) for m, n in model.view_masks(batch, grid, "cpu", gen)]
        self._flops = None

    def step(self) -> dict:
        x = self.model.encoder.preprocess(self.video)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()
        with amp:
            out = self.forward(x, masks=self.masks) if self.stage == 2 else self.forward(x)
        out["loss"].backward()
        with torch.profiler.record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def flops(self):
        """:class:`invnext.train.flops.StepFlops` of one step (constant: fixed masks / fixed keep count)."""
        from invnext.train.flops import stage1_step_flops, stage2_step_flops

        if self._flops is None:
            if self.stage == 1:
                self._flops = stage1_step_flops(self.cfg, self.batch)
            else:
                self._flops = stage2_step_flops(self.cfg, [m.sum(1).tolist() for m, _ in self.masks])
        return self._flops

    @property
    def tokens_per_clip(self) -> int:
        T, H, W = self.model.encoder.cfg.grid
        return T * H * W


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(runner: StepRunner, warmup: int, steps: int, deadline: float | None = None) -> dict:
    """Warm up, then time ``steps`` steps one by one (synchronised). Fewer steps (>= 2) when ``deadline`` nears."""
    dev = runner.device
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        runner.step()
        _sync(dev)
    warm_s = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        s = time.perf_counter()
        runner.step()
        _sync(dev)
        times.append(time.perf_counter() - s)
        if deadline is not None and i >= 1 and time.perf_counter() + times[-1] > deadline:
            break
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    return {"times_s": times, "warmup_s": warm_s, "peak_bytes": peak}


# --------------------------------------------------------------------------- breakdown


def attribute_events(events, use_device_time: bool) -> dict[str, dict[str, float]]:
    """Self time (us) of profiler ``events`` per region and phase: ``{region: {"fwd"|"bwd"|"opt": us}}``.

    Regions are :data:`REGIONS` plus "other". An op inside a region's ``record_function``
    counts for that region's forward ("opt" for the optimizer region); an op inside an
    autograd backward node counts for the backward of the region of the forward op with the
    node's sequence number (same forward thread); anything else is "other". Self times
    partition the total, so the buckets sum to the profiled time.
    """
    from torch.autograd import DeviceType

    cpu = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: e.time_range.start)
    engine = "autograd::engine::evaluate_function"

    def owner(e):
        p = e
        while p is not None:
            if p.name in REGIONS:
                return "region", p.name
            if p.name.startswith(engine):
                return "bwd", p
            p = p.cpu_parent
        return None, None

    # Ops that record no autograd node (no_grad, the frozen teacher) still report the *next*
    # sequence number; the op that then makes the node reports it too, later. So the latest
    # forward op with a number is its owner: overwrite in start-time order.
    seq_region: dict[tuple[int, int], str] = {}
    seq_any: dict[int, str] = {}
    owners = []
    for e in cpu:
        kind, what = owner(e)
        owners.append((kind, what))
        if kind == "region" and e.sequence_nr >= 0:
            seq_region[(e.thread, e.sequence_nr)] = what
            seq_any[e.sequence_nr] = what
    out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for e, (kind, what) in zip(cpu, owners):
        t = e.self_device_time_total if use_device_time else e.self_cpu_time_total
        if not t:
            continue
        if kind == "region":
            out[what]["opt" if what == "optimizer" else "fwd"] += t
        elif kind == "bwd":
            region = seq_region.get((what.fwd_thread, what.sequence_nr)) or seq_any.get(what.sequence_nr)
            out[region or "other"]["bwd"] += t
        else:
            out["other"]["fwd"] += t
    return {k: dict(v) for k, v in out.items()}


def profile_breakdown(runner: StepRunner, steps: int) -> dict[str, dict[str, float]]:
    """Per region and phase, ms per step, from ``steps`` profiled steps (after the warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            runner.step()
            _sync(runner.device)
    per = attribute_events(prof.events(), use_device_time=cuda)
    return {r: {ph: us / 1e3 / steps for ph, us in phases.items()} for r, phases in per.items()}


# --------------------------------------------------------------------------- max batch


def _fits(runner_for, batch: int, cleanup) -> bool:
    try:
        r = runner_for(batch)
        r.step()
        _sync(r.device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        r = None
        if cleanup is not None:
            cleanup()
        _free()


def find_max_batch(runner_for, start: int, limit: int = 1024, cleanup=None) -> int:
    """Largest ``b <= limit`` with ``runner_for(b).step()`` fitting in memory (0 if none): double, then bisect.

    ``cleanup()`` runs after every try (e.g. drop the gradients an out-of-memory step left).
    """
    lo, b = 0, max(1, min(start, limit))
    while True:  # double from the start while it fits
        if not _fits(runner_for, b, cleanup):
            hi = b
            break
        lo = b
        if b >= limit:
            return lo
        b = min(2 * b, limit)
    while hi - lo > 1:  # lo fits (or is 0), hi does not
        mid = (lo + hi) // 2
        if _fits(runner_for, mid, cleanup):
            lo = mid
        else:
            hi = mid
    return lo


# --------------------------------------------------------------------------- rows


def _shape(stage: int, preset: str, runner: StepRunner) -> str:
    T, H, W = runner.model.encoder.cfg.grid
    return f"stage{stage} {preset} B={runner.batch} ({T}x{H}x{W} grid)"


def _teacher_backend(model) -> str | None:
    from invnext.nn import FusedOp

    return next((m.ops_backend for m in model.teacher.modules() if isinstance(m, FusedOp)), None)


def step_row(stage, preset, backend, compiled, ckpt, runner, timing, peak_flops) -> Row:
    ms = [1e3 * t for t in timing["times_s"]]
    med, p20, p80 = quantiles_ms(ms)
    flops = runner.flops()
    seconds = sum(timing["times_s"]) / len(timing["times_s"])  # mean: FLOPs are the same every step
    tflops = flops.total / seconds / 1e12
    frac = None
    if peak_flops:
        from invnext.train.flops import mfu

        frac = mfu(flops.total, seconds, peak_flops)
    clips_s = runner.batch / (med / 1e3)
    impl = PATH_LABEL[backend] + (" + torch.compile" if compiled else "") + (" + grad ckpt" if ckpt else "")
    extra = {
        "stage": stage,
        "preset": preset,
        "batch": runner.batch,
        "ops_backend": backend,
        "compile": compiled,
        "grad_checkpointing": ckpt,
        "steps_timed": len(ms),
        "warmup_s": round(timing["warmup_s"], 2),
        "tokens_per_s": clips_s * runner.tokens_per_clip,
        "tflops_achieved": tflops,
        "mfu": frac,
        "flops_per_step": flops.total,
        "flops_by_component": flops.by_component(),
        "peak_mem_gib": timing["peak_bytes"] / 2**30 if timing["peak_bytes"] is not None else None,
        "device": runner.device.type,
        "teacher_ops_backend": _teacher_backend(runner.model) if stage == 1 else None,
    }
    dtype = "bf16 autocast" if runner.amp else "fp32"
    return Row("train_step", impl, "fwd+bwd+opt", _shape(stage, preset, runner), dtype, med, p20, p80,
               clips_s, "clips/s", frac, extra=extra)


def breakdown_rows(stage, preset, backend, runner, per_region, step_ms) -> list[Row]:
    cuda = runner.device.type == "cuda"
    rows = []
    total = 0.0
    for region in (*REGIONS, "other"):
        if region not in per_region and region != "other":
            continue  # e.g. Stage 2 has no decoder
        phases = per_region.get(region, {})
        ms = sum(phases.values())
        total += ms
        rows.append(Row("train_step_breakdown", PATH_LABEL[backend], region, _shape(stage, preset, runner),
                        "bf16 autocast" if runner.amp else "fp32", ms, ms, ms,
                        extra={"fwd_ms": phases.get("fwd", 0.0), "bwd_ms": phases.get("bwd", 0.0),
                               "opt_ms": phases.get("opt", 0.0), "stage": stage, "preset": preset,
                               "time": "device (kernel) time" if cuda else "CPU time"}))
    if cuda and step_ms is not None:
        idle = max(0.0, step_ms - total)
        rows.append(Row("train_step_breakdown", PATH_LABEL[backend], "idle", _shape(stage, preset, runner),
                        "bf16 autocast", idle, idle, idle,
                        extra={"stage": stage, "preset": preset, "time": "median step time minus kernel time"}))
    whole = max(step_ms, total) if cuda and step_ms is not None else total  # with "idle" the rows sum to the step
    for r in rows:
        r.extra["fraction"] = r.ms_median / whole if whole > 0 else 0.0
    return rows


def link_speedups(rows: list[Row]) -> None:
    """Set every step row's baseline to the eager torch row of its stage / preset / batch."""
    base = {}
    for r in rows:
        e = r.extra
        if r.bench == "train_step" and e["ops_backend"] == "torch" and not e["compile"] and not e["grad_checkpointing"]:
            base[(e["stage"], e["preset"], e["batch"])] = r
    for r in rows:
        if r.bench != "train_step":
            continue
        b = base.get((r.extra["stage"], r.extra["preset"], r.extra["batch"]))
        if b is not None and b is not r:
            r.baseline = b.impl
            r.speedup_vs_baseline = b.ms_median / r.ms_median
            r.extra["baseline_ms"] = b.ms_median
            r.extra["baseline_peak_mem_gib"] = b.extra["peak_mem_gib"]


# --------------------------------------------------------------------------- plan and main


@dataclass
class Variant:
    backend: str
    compiled: bool = False
    ckpt: bool = False
    breakdown: bool = False  # profile a step for the per-region breakdown
    timed: bool = True  # time steps (False: warm up, then only the breakdown)


def plan(args, device: torch.device) -> list[tuple[int, str, list[Variant]]]:
    """Groups ``(stage, preset, variants)`` in priority order (``--max-seconds`` cuts the tail)."""
    stages = [int(s) for s in args.stages.split(",") if s]
    if device.type != "cuda":
        paths = [p for p in args.paths.split(",") if p] if args.paths else ["torch"]
        return [(s, "tiny" if args.presets is None else args.presets.split(",")[0],
                 [Variant(p, breakdown=not args.no_breakdown) for p in paths]) for s in stages]
    presets = args.presets.split(",") if args.presets else (["base"] if args.quick else ["base", "large"])
    paths = [p for p in args.paths.split(",") if p] if args.paths else ["auto", "torch"]
    groups = []
    for preset in presets:
        # Timings of every stage first, the profiled breakdowns after: a short --max-seconds keeps the speedups.
        for s in stages:
            groups.append((s, preset, [Variant(p) for p in paths]))
        if not args.no_breakdown:
            for s in stages:
                groups.append((s, preset, [Variant(p, breakdown=True, timed=False) for p in paths]))
        if args.compile == "on":
            for s in stages:
                groups.append((s, preset, [Variant(p, compiled=True) for p in paths if p == "auto" or not args.quick]))
        if not args.quick:
            for s in stages:
                groups.append((s, preset, [Variant("auto", ckpt=True)]))
    return groups


def _free():
    """Return the freed blocks to the device (a CPU run frees by reference counting alone)."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def run_group(stage, preset, variants, args, device, peak_flops, rows, notes, deadline):
    from invnext.models.switches import set_grad_checkpointing, set_ops_backend

    t0 = time.perf_counter()
    model, cfg = build_model(stage, preset, device)
    batch = args.batch or DEFAULT_BATCH.get((preset, stage), 2)
    print(f"== stage {stage} {preset} B={batch}: model built in {time.perf_counter() - t0:.1f} s", flush=True)
    compiled_any = False
    try:
        for v in variants:
            label = (PATH_LABEL[v.backend] + (" + compile" if v.compiled else "") + (" + ckpt" if v.ckpt else "")
                     + ("" if v.timed else " breakdown"))
            if deadline is not None and time.perf_counter() > deadline:
                notes.append(f"stage{stage} {preset} {label}: skipped (--max-seconds reached)")
                print("   " + notes[-1], flush=True)
                continue
            if v.compiled and deadline is not None and deadline - time.perf_counter() < COMPILE_MIN_S:
                notes.append(f"stage{stage} {preset} {label}: skipped (less than {COMPILE_MIN_S:.0f} s left for "
                             "torch.compile; run without --quick)")
                print("   " + notes[-1], flush=True)
                continue
            set_ops_backend(model, v.backend)
            if stage == 1 and not args.teacher_follows_path:
                set_ops_backend(model.teacher, TEACHER_BACKEND)
            set_grad_checkpointing(model, v.ckpt)
            runner = None
            try:
                runner = StepRunner(model, cfg, stage, batch, device, compiled=v.compiled)
                compiled_any |= v.compiled
                step_ms = None
                if v.timed:
                    timing = time_steps(runner, args.warmup + (1 if v.compiled else 0), args.steps, deadline)
                    row = step_row(stage, preset, v.backend, v.compiled, v.ckpt, runner, timing, peak_flops)
                    rows.append(row)
                    step_ms = row.ms_median
                    mem = row.extra["peak_mem_gib"]
                    print(f"   {row.impl}: {row.ms_median:.1f} ms/step, {row.throughput:.3g} clips/s, "
                          f"{row.extra['tflops_achieved']:.3g} TFLOP/s"
                          + (f", MFU {100 * row.frac_of_peak:.1f}%" if row.frac_of_peak is not None else "")
                          + (f", peak {mem:.1f} GiB" if mem is not None else "")
                          + f" (warm-up {timing['warmup_s']:.1f} s)", flush=True)
                else:
                    runner.step()  # warm (kernels compiled earlier in this process)
                    _sync(device)
                    step_ms = next((r.ms_median for r in rows if r.bench == "train_step" and r.extra["stage"] == stage
                                    and r.extra["preset"] == preset and r.extra["batch"] == batch
                                    and r.extra["ops_backend"] == v.backend and not r.extra["compile"]
                                    and not r.extra["grad_checkpointing"]), None)
                if v.breakdown and (deadline is None or time.perf_counter() < deadline):
                    per = profile_breakdown(runner, args.profile_steps)
                    rows.extend(breakdown_rows(stage, preset, v.backend, runner, per, step_ms))
                    parts = ", ".join(f"{r}: {sum(p.values()):.1f}" for r, p in per.items())
                    print(f"   breakdown (ms/step): {parts}", flush=True)
            except torch.cuda.OutOfMemoryError:
                notes.append(f"stage{stage} {preset} {label}: out of memory at batch {batch}")
                print("   " + notes[-1], flush=True)
            except Exception as exc:  # noqa: BLE001 - one failing variant is a note; the others still run
                notes.append(f"stage{stage} {preset} {label}: failed: {type(exc).__name__}: {str(exc)[:300]}")
                print("   " + notes[-1], flush=True)
                traceback.print_exc()
            runner = None  # the optimizer state and the batch go before the next variant
            model.zero_grad(set_to_none=True)
            _free()
            link_speedups(rows)
            write_results(NAME, rows, notes="; ".join(notes))
    finally:
        del model
        if compiled_any:
            torch._dynamo.reset()
        _free()


def run_max_batch(args, device, rows, notes, deadline):
    """Rows ``train_step_max_batch``: per stage, path and checkpointing, the largest batch and its step time."""
    from invnext.models.switches import set_grad_checkpointing, set_ops_backend

    presets = args.presets.split(",") if args.presets else ["base"]
    for preset in presets:
        for stage in [int(s) for s in args.stages.split(",") if s]:
            model, cfg = build_model(stage, preset, device)

            def runner_for(b, model=model, cfg=cfg, stage=stage):
                return StepRunner(model, cfg, stage, b, device)

            def cleanup(model=model):
                model.zero_grad(set_to_none=True)

            for backend in ("auto", "torch"):
                for ckpt in (False, True):
                    if deadline is not None and time.perf_counter() > deadline:
                        notes.append(f"max-batch search of stage{stage} {preset} cut short (--max-seconds)")
                        break
                    set_ops_backend(model, backend)
                    if stage == 1 and not args.teacher_follows_path:
                        set_ops_backend(model.teacher, TEACHER_BACKEND)
                    set_grad_checkpointing(model, ckpt)
                    t0 = time.perf_counter()
                    best = find_max_batch(runner_for, DEFAULT_BATCH[(preset, stage)], cleanup=cleanup)
                    search_s = time.perf_counter() - t0
                    impl = PATH_LABEL[backend] + (" + grad ckpt" if ckpt else "")
                    if best == 0:
                        notes.append(f"stage{stage} {preset} {impl}: not even batch 1 fits")
                        continue
                    timing = time_steps(runner_for(best), 1, 1)  # one timed step at the largest batch
                    cleanup()
                    _free()
                    ms = 1e3 * timing["times_s"][0]
                    rows.append(Row("train_step_max_batch", impl, "largest batch that fits", f"stage{stage} {preset}",
                                    "bf16 autocast", ms, ms, ms, throughput=best / (ms / 1e3), unit="clips/s",
                                    extra={"stage": stage, "preset": preset, "max_batch": best,
                                           "peak_mem_gib": None if timing["peak_bytes"] is None else timing["peak_bytes"] / 2**30,
                                           "search_s": round(search_s, 1),
                                           "grad_checkpointing": ckpt, "ops_backend": backend}))
                    print(f"   max batch stage {stage} {preset} {impl}: {best} ({ms:.0f} ms/step)", flush=True)
                    write_results(NAME, rows, notes="; ".join(notes))
            model = None
            _free()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="base only, 2+4 steps, compiled fused path last if time is left")
    ap.add_argument("--presets", default=None, help="comma list (GPU default: base,large; --quick: base; CPU: tiny)")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--paths", default=None, help="ops backends, comma list (GPU default: auto,torch; CPU: torch)")
    ap.add_argument("--compile", choices=("off", "on"), default="on",
                    help="compiled variants after the eager ones (GPU only; --quick: the fused path only, "
                         f"and only with {COMPILE_MIN_S:.0f} s left before --max-seconds)")
    ap.add_argument("--batch", type=int, default=None, help="override the per-preset batch")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--profile-steps", type=int, default=None)
    ap.add_argument("--no-breakdown", action="store_true")
    ap.add_argument("--teacher-follows-path", action="store_true",
                    help="run the Stage-1 teacher stand-in on the variant's ops backend too (default: always auto)")
    ap.add_argument("--max-batch", action="store_true", help="also search the largest batch that fits (GPU)")
    ap.add_argument("--max-seconds", type=float, default=0, help="start nothing new after this long")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if args.warmup is None:
        args.warmup = 2 if (args.quick or not gpu) else 3
    if args.steps is None:
        args.steps = (4 if args.quick else 10) if gpu else (3 if args.quick else 5)
    if args.profile_steps is None:
        args.profile_steps = 1 if args.quick or not gpu else 2
    if not gpu:
        print("bench_step: no CUDA GPU: the reference path (ops_backend=torch) on the tiny preset, fp32; "
              "the fused-vs-torch speedups, MFU, peak memory, base/large, torch.compile and --max-batch need a GPU.")
        if args.max_batch:
            print("bench_step: --max-batch ignored without a GPU")
    start = time.perf_counter()
    deadline = start + args.max_seconds if args.max_seconds else None
    peak = measured_peaks().get("matmul_bf16_tflops") if gpu else None
    peak_flops = peak * 1e12 if peak else None
    if peak:
        print(f"{gpu_name()}: measured bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    rows: list[Row] = []
    notes: list[str] = []
    if not gpu:
        notes.append("CPU: reference path only (tiny preset, fp32); MFU needs a measured GPU peak")
    for stage, preset, variants in plan(args, device):
        if deadline is not None and time.perf_counter() > deadline:
            notes.append(f"stage{stage} {preset}: skipped (--max-seconds {args.max_seconds:.0f} reached)")
            print(notes[-1], flush=True)
            continue
        run_group(stage, preset, variants, args, device, peak_flops, rows, notes, deadline)
    if args.max_batch and gpu:
        run_max_batch(args, device, rows, notes, deadline)
    path = write_results(NAME, rows, notes="; ".join(notes))
    print(f"\nwrote {path} ({time.perf_counter() - start:.0f} s)")
    print(path.with_suffix(".md").read_text())
    return 0 if any(r.bench == "train_step" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
