"""Shared benchmark harness: the card's identity and measured peaks, timing, result files.

Every benchmark row carries the GPU name, dtype, shape, the median and 20/80% quantiles
in milliseconds, a throughput (TFLOP/s or GB/s), its fraction of this card's *measured*
peak, and the baseline it was compared against in the same run.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Set by ``benchmarks.run`` for its child processes: where results go, and the peaks it measured
# once at the start (JSON), so every module's fraction of peak uses the same figures.
RESULTS_ENV = "INVNEXT_BENCH_RESULTS"
PEAKS_ENV = "INVNEXT_BENCH_PEAKS"


def results_dir() -> Path:
    """Where result files go: ``$INVNEXT_BENCH_RESULTS`` if set, else ``benchmarks/results``."""
    override = os.environ.get(RESULTS_ENV)
    return Path(override) if override else RESULTS_DIR


@dataclass
class Row:
    bench: str  # e.g. "masked_attention"
    impl: str  # e.g. "invnext-triton", "sdpa-flash (padded, incl. gather)"
    mode: str  # "fwd" | "bwd" | "fwd+bwd" | "step" ...
    shape: str
    dtype: str
    ms_median: float
    ms_p20: float
    ms_p80: float
    throughput: float | None = None  # in `unit`
    unit: str = ""  # "TFLOP/s" | "GB/s" | "clips/s"
    frac_of_peak: float | None = None
    baseline: str | None = None  # the impl this row is compared against
    speedup_vs_baseline: float | None = None
    extra: dict = field(default_factory=dict)


def gpu_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


def need_gpu(bench: str) -> bool:
    """True when a CUDA GPU is present; otherwise print why the benchmark is skipped."""
    if torch.cuda.is_available():
        return True
    print(f"{bench}: needs a CUDA GPU (timing the CPU reference against the Triton interpreter means nothing); skipped.")
    return False


def quick_cli(bench: str, doc: str, quick_help: str, argv: list[str] | None) -> argparse.Namespace | None:
    """The arguments of a benchmark whose one option is ``--quick`` (``--help`` prints ``doc``), or
    None when there is no GPU to time on: parsing first, so ``--help`` works on any machine."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    return args if need_gpu(bench) else None


def do_bench(fn: Callable[[], object], warmup_ms: float = 25, rep_ms: float = 100) -> tuple[float, float, float]:
    """(median, p20, p80) in ms, timed with CUDA events by triton.testing.do_bench."""
    import triton.testing

    q = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return float(q[0]), float(q[1]), float(q[2])


def graph_bench(
    fn: Callable[[], object], time_replay: Callable[[Callable[[], object]], tuple[float, float, float]], who: str
) -> tuple[float, float, float] | None:
    """Device time alone: ``fn`` captured in a CUDA graph, its replay timed by ``time_replay``.

    do_bench times from the host's launch, so a call made of several small launches (a
    backward pass through autograd) is timed at the host's pace; the replay of a captured
    graph costs one launch, which leaves the GPU's own time. Returns None, after printing a
    line naming ``who``, when ``fn`` cannot be captured: that only drops the graph row.
    """
    error = None
    for _ in range(2):  # the first capture of an autograd backward in a process can fail; once more
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            result = time_replay(graph.replay)
            del graph
            return result
        except Exception as exc:  # noqa: BLE001 - a failed capture only drops the graph row
            error = exc
            torch.cuda.synchronize()
    print(f"{who}: CUDA-graph timing failed ({type(error).__name__}: {str(error)[:120]})")
    return None


_PEAKS: dict[str, float] = {}


def _matmul_peak_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms, _, _ = do_bench(lambda: a @ b, warmup_ms=50, rep_ms=200)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _copy_peak_gbps(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, device="cuda", dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    ms, _, _ = do_bench(lambda: dst.copy_(src), warmup_ms=50, rep_ms=200)
    return 2 * nbytes / (ms * 1e-3) / 1e9  # bytes read + bytes written


def measured_peaks() -> dict[str, float]:
    """This card's bf16 matmul TFLOP/s and device-copy GB/s (bytes read + written), measured once
    (or taken from ``$INVNEXT_BENCH_PEAKS`` when the suite runner measured them already)."""
    if _PEAKS or not torch.cuda.is_available():
        return _PEAKS
    given = os.environ.get(PEAKS_ENV)
    if given:
        peaks = json.loads(given)
        if {"matmul_bf16_tflops", "copy_gbps"} <= set(peaks):
            _PEAKS.update({k: float(v) for k, v in peaks.items()})
            return _PEAKS
    _PEAKS["matmul_bf16_tflops"] = _matmul_peak_tflops()
    _PEAKS["copy_gbps"] = _copy_peak_gbps()
    torch.cuda.empty_cache()
    return _PEAKS


def quantiles_ms(samples_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of host-timed samples in ms (linear interpolation, as do_bench reports)."""
    if not samples_ms:
        raise ValueError("quantiles_ms: samples_ms is empty")
    t = torch.tensor(samples_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def slug(text: str) -> str:
    """File-name form of a GPU name: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return _slug(text)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_results(name: str, rows: list[Row], notes: str = "", out_dir: Path | None = None) -> Path:
    """Write ``results/<name>_<gpu>_<date>.json`` and a markdown table beside it; return the json path.

    ``out_dir`` overrides the folder (default :func:`results_dir`)."""
    out_dir = Path(out_dir) if out_dir is not None else results_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    stem = f"{name}_{_slug(gpu_name())}_{date}"
    meta = {
        "gpu": gpu_name(),
        "date": date,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "peaks": measured_peaks(),
        "notes": notes,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("INVNEXT_", "TRITON_"))},
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        meta["triton"] = None
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    (out_dir / f"{stem}.md").write_text(markdown_table(rows, meta))
    return path



def run_shapes(
    name: str, problems, run_one: Callable[[object, list, list], None], max_seconds: float = 0
) -> Path | None:
    """Run ``run_one(problem, rows, notes)`` for each problem, writing the results after each (a
    later crash keeps the earlier rows) and freeing GPU memory between shapes; stop starting new
    shapes after ``max_seconds`` (0: no limit). Prints and returns the results file."""
    import time

    start = time.perf_counter()
    rows: list[Row] = []
    notes: list[str] = []
    path = None
    for p in problems:
        if max_seconds and time.perf_counter() - start > max_seconds:
            notes.append(f"stopped before {p.label}: --max-seconds {max_seconds} reached")
            if rows:  # the file must say where the run stopped
                path = write_results(name, rows, notes="; ".join(notes))
            break
        run_one(p, rows, notes)
        path = write_results(name, rows, notes="; ".join(notes))
        del p
        torch.cuda.empty_cache()
    if path is not None:
        print(f"\nwrote {path} ({time.perf_counter() - start:.0f} s)")
        print(path.with_suffix(".md").read_text())
    return path

def markdown_table(rows: list[Row], meta: dict) -> str:
    peaks = meta.get("peaks") or {}
    head = (
        f"# {meta.get('gpu')} · {meta.get('date')} · torch {meta.get('torch')} · triton {meta.get('triton')}\n\n"
        f"Measured peaks: {peaks.get('matmul_bf16_tflops', float('nan')):.0f} TFLOP/s bf16 matmul, "
        f"{peaks.get('copy_gbps', float('nan')):.0f} GB/s device copy.\n\n"
    )
    lines = ["| bench | impl | mode | shape | dtype | median ms | throughput | of peak | vs baseline |", "|" + "---|" * 9]
    for r in rows:
        thr = f"{r.throughput:.1f} {r.unit}" if r.throughput is not None else ""
        frac = f"{100 * r.frac_of_peak:.0f}%" if r.frac_of_peak is not None else ""
        sp = f"{r.speedup_vs_baseline:.2f}x vs {r.baseline}" if r.speedup_vs_baseline is not None else ""
        lines.append(f"| {r.bench} | {r.impl} | {r.mode} | {r.shape} | {r.dtype} | {r.ms_median:.4f} | {thr} | {frac} | {sp} |")
    return head + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- attention benchmarks


def time_attention_modes(fn, p, modes, rep_ms: float, warmup_ms: float = 25) -> dict[str, tuple[float, float, float]]:
    """``{mode: (median, p20, p80)}`` of ``fn(*p.inputs)`` for the modes asked ("fwd", "bwd",
    "fwd+bwd"); "bwd" times the gradients of every input for ``p.dout``, the forward kept."""
    res = {}
    leaves = [t.detach().clone().requires_grad_(True) for t in p.inputs]
    if "fwd" in modes:
        with torch.no_grad():
            res["fwd"] = do_bench(lambda: fn(*p.inputs), warmup_ms, rep_ms)
    if "bwd" in modes:
        out = fn(*leaves)
        res["bwd"] = do_bench(lambda: torch.autograd.grad(out, leaves, p.dout, retain_graph=True), warmup_ms, rep_ms)
        del out
    if "fwd+bwd" in modes:
        res["fwd+bwd"] = do_bench(lambda: torch.autograd.grad(fn(*leaves), leaves, p.dout), warmup_ms, rep_ms)
    return res


def run_attention_problem(bench: str, p, impls, modes, rep_ms: float, peak: float | None, rows: list, notes: list,
                          compare: Callable[[str], bool] = lambda name: True) -> None:
    """Time each ``(name, maker)`` of ``impls`` (ours, "invnext-triton", first) on problem ``p`` and
    append a :class:`Row` per implementation and mode to ``rows``.

    ``p`` holds ``inputs`` (the tensors the op takes), ``dout``, ``pairs`` (allowed query-key pairs),
    ``flops(mode)``, ``shape()`` and ``label``. Each baseline for which ``compare(name)`` holds is
    checked against ours (max |difference| of the outputs, kept in our rows as the run's correctness
    evidence); our rows carry the speedup over the fastest baseline. A baseline that fails to build or
    run is a note, not a crash."""
    import time
    import traceback

    print(f"\n== {p.shape()}  ({p.pairs / 1e6:.1f} M allowed pairs)", flush=True)
    timings, diffs, ours_fn = {}, {}, None
    for name, maker in impls:
        try:
            t0 = time.perf_counter()
            fn = maker()
            if name == "invnext-triton":
                ours_fn = fn
            elif ours_fn is not None and compare(name):
                with torch.no_grad():
                    diffs[name] = float((ours_fn(*p.inputs).float() - fn(*p.inputs).float()).abs().max())
                print(f"   max |ours - {name}| on outputs: {diffs[name]:.3e}", flush=True)
            timings[name] = (time_attention_modes(fn, p, modes, rep_ms), getattr(fn, "extra", {}))
            print(f"   {name}: " + ", ".join(f"{m} {v[0]:.3f} ms" for m, v in timings[name][0].items())
                  + f"  (setup+timing {time.perf_counter() - t0:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - a missing or failing baseline is a note, not a crash
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            msg = f"{p.label}: {name} skipped: {type(exc).__name__}: {first}"
            print("   " + msg, flush=True)
            if name == "invnext-triton":
                traceback.print_exc()
            notes.append(msg)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for mode in modes:
        base = [(n, t[0][mode][0]) for n, t in timings.items() if n != "invnext-triton" and mode in t[0]]
        best = min(base, key=lambda x: x[1]) if base else None
        for name, (tm, extra) in timings.items():
            if mode not in tm:
                continue
            med, p20, p80 = tm[mode]
            tflops = p.flops(mode) / (med * 1e-3) / 1e12
            is_ours = name == "invnext-triton"
            rows.append(Row(
                bench=bench, impl=name, mode=mode, shape=p.shape(), dtype="bf16",
                ms_median=med, ms_p20=p20, ms_p80=p80, throughput=tflops, unit="TFLOP/s",
                frac_of_peak=tflops / peak if peak else None,
                baseline=best[0] if (is_ours and best) else None,
                speedup_vs_baseline=(best[1] / med) if (is_ours and best) else None,
                extra={"allowed_pairs": p.pairs, **extra, **({"max_abs_diff_vs": diffs} if is_ours else {})},
            ))


def attention_main(name: str, doc: str, quick_help: str, argv, problems, baselines_for, run_problem) -> int:
    """The command line of an attention benchmark (``--quick``, ``--max-seconds``, ``--modes``): for
    each of ``problems(quick)``, ``run_problem(p, baselines_for(p, quick), modes, rep_ms, peak, rows,
    notes)``, results written after each shape by :func:`run_shapes` under ``name``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--max-seconds", type=float, default=0, help="stop starting new shapes after this long")
    ap.add_argument("--modes", default="fwd,bwd,fwd+bwd")
    args = ap.parse_args(argv)
    if not need_gpu(name):
        return 0
    rep_ms = 50 if args.quick else 100
    modes = [m for m in args.modes.split(",") if m]
    peak = measured_peaks().get("matmul_bf16_tflops")
    print(f"{gpu_name()}: measured bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)

    def run_one(p, rows, notes):
        run_problem(p, baselines_for(p, args.quick), modes, rep_ms, peak, rows, notes)

    run_shapes(name, problems(args.quick), run_one, args.max_seconds)
    return 0
