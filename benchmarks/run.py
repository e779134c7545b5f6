"""The benchmark suite: every kernel benchmark and the end-to-end step benchmark, one report.

    python -m benchmarks.run [--quick] [--only NAME ...] [--skip NAME ...] [--out DIR] [--budget-s S]

1. On a GPU, measures the card's two peaks first (a large bf16 matmul, a device copy;
   ``benchmarks.common.measured_peaks``) and hands them to every module through
   ``$INVNEXT_BENCH_PEAKS``, so every fraction of peak in the run is against the same figures.
2. Runs each module of :data:`REGISTRY` in its own process (``python -m <module>``, results
   written to ``--out`` through ``$INVNEXT_BENCH_RESULTS``, output to ``<out>/run_<name>.log``)
   under a time cap: a module that crashes, exits non-zero or runs past its cap is reported
   and the suite goes on. A module whose file is missing is skipped with a line saying so.
3. Renders ``<out>/REPORT_<gpu>_<date>.md`` with its plots (``benchmarks.report``) from every
   result file of this card and date in ``--out`` (so results of a module run separately the
   same day, e.g. ``bench_masked_attention`` by ``scripts/gpu_check.sh``, are in the report too).

Without a GPU only the CPU-meaningful parts run: the step benchmark's reference path on the
tiny preset and the pytest-benchmark micro-benchmarks of the CPU references
(``benchmarks/test_cpu_micro.py``); the GPU-only modules are listed as needing a GPU.

Time caps (seconds; ``--quick`` / full). ``--quick`` on a GPU is budgeted to fit a short slot
together with the extension build (``scripts/gpu_check.sh``: under 8 minutes in all):
peaks ~5, masked_attention 150 / 1800, varlen_attention 90 / 900, step 120 / 2400 (it starts no new
variant after 85% of its cap), the token ops 35 / 600 (gather_visible 20, scatter_tokens 15 with --quick), the diffusion ops
and decoder step 57 / 1050 (p_sample_loop 15, decoder_train_step 10, each element op 8), the masks
28 / 300, cpu_micro 90 / 300 (CPU); ``REGISTRY`` has each one's caps.
``--budget-s S`` shares S seconds among the modules still to run in proportion to their
caps (a module that finishes early leaves its time to the rest).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repo root must be importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import PEAKS_ENV, RESULTS_ENV, Row, quantiles_ms, results_dir

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Entry:
    """One suite member.

    name: what ``--only`` / ``--skip`` take. target: a module run with ``python -m`` (kind
    "module") or a pytest-benchmark file relative to the repository (kind "pytest").
    where: "gpu" (needs CUDA), "any", or "cpu" (CPU machines only unless named by ``--only``).
    caps: (quick, full) seconds. max_seconds: the module takes ``--max-seconds``.
    """

    name: str
    target: str
    where: str
    caps: tuple[float, float]
    kind: str = "module"
    max_seconds: bool = False
    args: tuple[str, ...] = ()


REGISTRY: tuple[Entry, ...] = (
    Entry("masked_attention", "benchmarks.bench_masked_attention", "gpu", (150, 1800), max_seconds=True),
    Entry("varlen_attention", "benchmarks.bench_varlen_attention", "gpu", (90, 900), max_seconds=True),
    # The end-to-end step is issue #9's headline: first after attention, so a short budget cuts the kernels' tail.
    Entry("step", "benchmarks.bench_step", "any", (120, 2400), max_seconds=True),
    # One benchmark per op, named by it (cases shared per family in benchmarks/cases_*.py).
    Entry("gather_visible", "benchmarks.bench_gather_visible", "gpu", (20, 300)),
    Entry("scatter_tokens", "benchmarks.bench_scatter_tokens", "gpu", (15, 300)),
    Entry("q_sample", "benchmarks.bench_q_sample", "gpu", (8, 150)),
    Entry("diffusion_loss", "benchmarks.bench_diffusion_loss", "gpu", (8, 150)),
    Entry("p_sample_step", "benchmarks.bench_p_sample_step", "gpu", (8, 150)),
    Entry("adaln_modulate", "benchmarks.bench_adaln_modulate", "gpu", (8, 150)),
    Entry("decoder_train_step", "benchmarks.bench_decoder_train_step", "gpu", (10, 150)),
    Entry("p_sample_loop", "benchmarks.bench_p_sample_loop", "gpu", (15, 300)),
    Entry("tube_mask", "benchmarks.bench_tube_mask", "gpu", (8, 100)),
    Entry("semantic_mask", "benchmarks.bench_semantic_mask", "gpu", (10, 100)),
    Entry("multiblock_mask", "benchmarks.bench_multiblock_mask", "gpu", (10, 100)),
    Entry("cpu_micro", "benchmarks/test_cpu_micro.py", "cpu", (90, 300), kind="pytest"),
)

PEAK_NAMES = ("matmul_bf16_tflops", "copy_gbps")


@dataclass
class Status:
    name: str
    status: str  # "ok" | "failed" | "timed out" | "skipped"
    detail: str = ""
    seconds: float = 0.0
    log: str | None = None
    files: list[str] = field(default_factory=list)


def _available(entry: Entry) -> bool:
    if entry.kind == "pytest":
        return (ROOT / entry.target).is_file()
    try:
        return importlib.util.find_spec(entry.target) is not None
    except ModuleNotFoundError:
        return False


def _command(entry: Entry, quick: bool, cap: float, out: Path, python: str) -> list[str]:
    if entry.kind == "pytest":
        rounds = ["--benchmark-min-rounds=3", "--benchmark-max-time=0.25"] if quick else ["--benchmark-min-rounds=5"]
        return [python, "-m", "pytest", str(ROOT / entry.target), "--benchmark-only", "-q", "-p", "no:cacheprovider",
                "--benchmark-save-data", f"--benchmark-json={out / (entry.name + '.pytest-benchmark.json')}", *rounds,
                *entry.args]
    cmd = [python, "-m", entry.target, *(["--quick"] if quick else []), *entry.args]
    if entry.max_seconds:
        cmd += ["--max-seconds", f"{max(10.0, 0.85 * cap - 10):.0f}"]  # leave room for start-up and the last write
    return cmd


def _pytest_rows(path: Path, device: str) -> list[Row]:
    """pytest-benchmark's JSON (with ``--benchmark-save-data``) -> rows of the reference path's CPU timings."""
    data = json.loads(path.read_text())
    rows = []
    for b in data.get("benchmarks", []):
        samples = [1e3 * s for s in b["stats"].get("data", [])] or [1e3 * b["stats"]["median"]]
        med, p20, p80 = quantiles_ms(samples)
        info = b.get("extra_info", {})
        rows.append(Row("cpu_micro", info.get("impl", "torch reference"), info.get("mode", "fwd"),
                        info.get("shape", b["name"]), info.get("dtype", "float32"), med, p20, p80,
                        extra={"test": b["name"], "rounds": b["stats"].get("rounds"), "device": device}))
    return rows


def _new_files(out: Path, before: dict[str, float]) -> list[str]:
    return sorted(p.name for p in out.glob("*.json") if p.stat().st_mtime > before.get(p.name, -1.0))


def run_entry(entry: Entry, quick: bool, cap: float, out: Path, env: dict, python: str = sys.executable) -> Status:
    """Run one module in a child process under ``cap`` seconds; never raises for the module's failures."""
    log = out / f"run_{entry.name}.log"
    before = {p.name: p.stat().st_mtime for p in out.glob("*.json")}
    cmd = _command(entry, quick, cap, out, python)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=cap, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = time.perf_counter() - t0
    st = Status(entry.name, "ok", seconds=seconds, log=log.name)
    if rc is None:
        st.status, st.detail = "timed out", f"killed after its {cap:.0f} s cap (results written before that are kept)"
    elif rc != 0:
        st.status, st.detail = "failed", f"exit code {rc}: {_last_line(log)}"
    if entry.kind == "pytest":
        js = out / f"{entry.name}.pytest-benchmark.json"
        if js.is_file():
            from benchmarks.common import write_results

            rows = _pytest_rows(js, "cpu")
            if rows:
                write_results(entry.name, rows, notes="pytest-benchmark of the CPU reference path", out_dir=out)
    st.files = _new_files(out, before)
    return st


def _last_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def select(registry, only, skip, gpu: bool) -> list[tuple[Entry, str | None]]:
    """``[(entry, reason to skip or None)]`` in registry order."""
    names = {e.name for e in registry}
    for n in [*(only or []), *(skip or [])]:
        if n not in names:
            raise SystemExit(f"benchmarks.run: unknown benchmark {n!r}; known: {', '.join(sorted(names))}")
    out = []
    for e in registry:
        if only and e.name not in only:
            continue
        if skip and e.name in skip:
            out.append((e, "left out (--skip)"))
            continue
        if e.where == "gpu" and not gpu:
            out.append((e, "needs a CUDA GPU"))
        elif e.where == "cpu" and gpu and not only:
            out.append((e, "CPU-only micro-benchmarks: run with --only cpu_micro"))
        elif not _available(e):
            what = e.target if e.kind == "pytest" else e.target.replace(".", "/") + ".py"
            out.append((e, f"{what} not found"))
        else:
            out.append((e, None))
    return out


def run_suite(
    registry=REGISTRY,
    *,
    quick: bool = False,
    out: Path | None = None,
    only=None,
    skip=None,
    budget_s: float | None = None,
    render: bool = True,
) -> tuple[list[Status], Path | None]:
    """Run the suite (module docstring); return the statuses and the report's path."""
    import torch

    from benchmarks.common import gpu_name, measured_peaks

    out = Path(out) if out is not None else results_dir()
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    start = time.perf_counter()
    env = dict(os.environ)
    env[RESULTS_ENV] = str(out)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    peaks = {}
    if gpu:
        peaks = measured_peaks()
        env[PEAKS_ENV] = json.dumps(peaks)
        print(f"{gpu_name()}: {peaks['matmul_bf16_tflops']:.0f} TFLOP/s bf16 matmul, {peaks['copy_gbps']:.0f} GB/s copy "
              f"(measured in {time.perf_counter() - start:.1f} s)", flush=True)
    else:
        print("no CUDA GPU: running the CPU-meaningful parts only", flush=True)
    plan = select(registry, only, skip, gpu)
    statuses: list[Status] = []
    idx = 0 if quick else 1
    todo = [e for e, why in plan if why is None]
    for entry, why in plan:
        if why is not None:
            print(f"{entry.name}: {why}; skipped", flush=True)
            statuses.append(Status(entry.name, "skipped", why))
            continue
        cap = entry.caps[idx]
        if budget_s is not None:
            left = budget_s - (time.perf_counter() - start)
            share = sum(e.caps[idx] for e in todo)
            cap = min(cap, left * entry.caps[idx] / share) if share > 0 else 0
        todo.remove(entry)
        if budget_s is not None and cap < 5:
            statuses.append(Status(entry.name, "skipped", "no time left in --budget-s"))
            print(f"{entry.name}: no time left in the budget; skipped", flush=True)
            continue
        print(f"{entry.name}: running (cap {cap:.0f} s)", flush=True)
        st = run_entry(entry, quick, cap, out, env)
        statuses.append(st)
        print(f"{entry.name}: {st.status} in {st.seconds:.0f} s" + (f" ({st.detail})" if st.detail else ""), flush=True)
        print(_tail(out / st.log), flush=True)
    report = None
    if render:
        from benchmarks.report import render_report

        report = render_report(out, statuses, gpu=gpu_name(), date=_dt.date.today().isoformat(), peaks=peaks, quick=quick)
        print(f"report: {report}", flush=True)
    return statuses, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="short runs of every module (with --budget-s it fits scripts/gpu_check.sh's 8-minute slot)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these: {', '.join(e.name for e in REGISTRY)}")
    ap.add_argument("--skip", nargs="+", metavar="NAME", help="leave these out")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for the whole suite, shared among the modules")
    args = ap.parse_args(argv)
    statuses, _ = run_suite(quick=args.quick, out=args.out, only=args.only, skip=args.skip, budget_s=args.budget_s)
    print("\nsuite: " + ", ".join(f"{s.name} {s.status}" for s in statuses))
    return 1 if any(s.status in ("failed", "timed out") for s in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
