"""The suite's markdown report and its plots, from the result files of one card and date.

``render_report(out, statuses, gpu=..., date=..., peaks=..., quick=...)`` reads every
``<name>_<gpu>_<date>.json`` in ``out`` (``benchmarks.common.write_results``'s files) and
writes ``out/REPORT_<gpu>_<date>.md`` with:

* the suite table (each module's status, time, log and result files);
* the headline: the end-to-end training step per stage / preset / path (ms, clips/s,
  tokens/s, TFLOP/s, MFU, peak memory, speedup over the eager torch path) against the
  targets of ``shared/design/kernels.md`` (>= 1.5x, MFU >= 45%);
* the step-time breakdown per region, and a stacked-bar plot ``..._breakdown.png``;
* every invnext row that has a baseline, with its speedup, and a bar plot ``..._speedup.png``;
* the notes each module recorded.

Plots use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import slug

TARGET_SPEEDUP = 1.5
TARGET_MFU = 0.45
REGION_ORDER = ("teacher", "masks", "encoder", "predictor", "decoder", "loss", "optimizer", "other", "idle")


def load_results(out: Path, gpu: str, date: str) -> list[tuple[str, dict, list[dict]]]:
    """``[(file name, meta, rows)]`` of the result files of ``gpu`` on ``date`` in ``out``, by name."""
    tail = f"_{slug(gpu)}_{date}.json"
    found = []
    for path in sorted(Path(out).glob(f"*{tail}")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            found.append((path.name, {"notes": f"unreadable: {exc}"}, []))
            continue
        found.append((path.name, data.get("meta", {}), data.get("rows", [])))
    return found


def _cell(value) -> str:
    return str(value).replace("|", "/").replace("\n", " ")


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def _table(header: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _step_section(rows: list[dict], quick: bool) -> str:
    steps = [r for r in rows if r["bench"] == "train_step"]
    if not steps:
        return "No end-to-end step results in this run.\n"
    body = []
    for r in steps:
        e = r["extra"]
        mem = e.get("peak_mem_gib")
        body.append([
            e["stage"], e["preset"], e["batch"], r["impl"], r["dtype"], f"{r['ms_median']:.1f}",
            f"{r['throughput']:.3g}", f"{e['tokens_per_s']:.3g}", f"{e['tflops_achieved']:.3g}",
            _fmt(e.get("mfu"), ".1%"), _fmt(mem, ".1f", " GiB"),
            _fmt(r.get("speedup_vs_baseline"), ".2f", "x"),
        ])
    text = _table(["stage", "preset", "batch", "path", "dtype", "ms/step (median)", "clips/s", "tokens/s",
                   "TFLOP/s", "MFU", "peak mem", "speedup vs torch eager"], body)
    checks = []
    for r in steps:
        e = r["extra"]
        if e.get("preset") != "base" or r.get("speedup_vs_baseline") is None:
            continue
        ok_s = r["speedup_vs_baseline"] >= TARGET_SPEEDUP
        mfu = e.get("mfu")
        ok_m = mfu is not None and mfu >= TARGET_MFU
        checks.append(f"- stage {e['stage']} base, {r['impl']}: speedup {r['speedup_vs_baseline']:.2f}x "
                      f"({'meets' if ok_s else 'misses'} >= {TARGET_SPEEDUP}x), MFU "
                      f"{_fmt(mfu, '.1%') or 'n/a'} ({'meets' if ok_m else 'misses'} >= {TARGET_MFU:.0%})")
    if checks:
        text += "\nTargets (kernels.md, base preset):\n" + "\n".join(checks) + "\n"
    elif all(r["extra"].get("device") == "cpu" for r in steps):
        text += ("\nCPU run: the reference path on the tiny preset only. The fused-vs-torch speedup, MFU and "
                 "peak memory targets need a GPU run (`python -m benchmarks.run --quick` on one).\n")
    text += ("\nMFU = analytic model FLOPs of the step (`invnext/train/flops.py`: matmuls and attention, "
             "backward 2x, frozen teacher forward only, no credit for recomputation) / the mean "
             "step time / the measured bf16 matmul peak. The torch path is every op's pure-PyTorch reference "
             "(`ops_backend=torch`), not a tuned PyTorch model: its attention upcasts q, k, v to fp32 and, where "
             "padding the batch would exceed the reference's budget (`_PADDED_ELEMENTS` in "
             "`invnext/ops/attention.py`; at the base preset's sizes that is every attention of the step), calls "
             "SDPA once per sample in a Python loop. The speedup "
             "includes those costs; `bench_masked_attention` compares the kernel with padded bf16 SDPA. Stage 1's teacher "
             "is a randomly initialised stand-in of SigLIP2-giant's shape that runs the same way (`ops_backend=auto`) "
             "in both paths, as the real (transformers) teacher would.\n")
    return text


def _max_batch_section(rows: list[dict]) -> str:
    mb = [r for r in rows if r["bench"] == "train_step_max_batch"]
    if not mb:
        return ""
    body = [[r["shape"], r["impl"], r["extra"]["max_batch"], f"{r['ms_median']:.0f}", f"{r['throughput']:.3g}",
             _fmt(r["extra"].get("peak_mem_gib"), ".1f", " GiB")] for r in mb]
    return ("\n### Largest batch that fits (one full step)\n\n"
            + _table(["stage / preset", "path", "max batch", "ms/step there", "clips/s", "peak mem"], body))


def _breakdown_section(rows: list[dict]) -> str:
    bd = [r for r in rows if r["bench"] == "train_step_breakdown"]
    if not bd:
        return "No breakdown in this run.\n"
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in bd:
        groups.setdefault((r["shape"], r["impl"]), {})[r["mode"]] = r
    regions = [g for g in REGION_ORDER if any(g in v for v in groups.values())]
    body = []
    for (shape, impl), regs in groups.items():
        cells = []
        for g in regions:
            r = regs.get(g)
            cells.append("" if r is None else f"{r['ms_median']:.1f} ({100 * r['extra'].get('fraction', 0):.0f}%)")
        body.append([shape, impl, *cells])
    text = _table(["shape", "path", *regions], body)
    kinds = sorted({r["extra"].get("time", "") for r in bd})
    text += ("\nms per step (share). Forward: self time of the ops inside each `record_function` region; "
             "backward: attributed to the region of the forward op with the same autograd sequence number; "
             f"time measured: {', '.join(kinds)}.\n")
    return text


def _speedup_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("speedup_vs_baseline") is not None]


def _speedup_section(rows: list[dict]) -> str:
    sp = [r for r in _speedup_rows(rows) if r["bench"] not in ("train_step",)]
    if not sp:
        return "No kernel rows with a baseline in this run.\n"
    body = [[r["bench"], r["mode"], r["shape"], r["impl"], r["dtype"], f"{r['ms_median']:.4f}",
             "" if r.get("throughput") is None else f"{r['throughput']:.1f} {r.get('unit', '')}",
             _fmt(r.get("frac_of_peak"), ".0%"), f"{r['speedup_vs_baseline']:.2f}x", r.get("baseline") or ""]
            for r in sp]
    return _table(["op", "mode", "shape", "impl", "dtype", "median ms", "throughput", "of peak", "speedup", "baseline"], body)


def _cpu_micro_section(rows: list[dict]) -> str:
    micro = [r for r in rows if r["bench"] == "cpu_micro"]
    if not micro:
        return ""
    body = [[r["shape"], r["mode"], r["impl"], r["dtype"], f"{r['ms_median']:.3f}", f"{r['ms_p20']:.3f}", f"{r['ms_p80']:.3f}"]
            for r in micro]
    return ("\n## CPU reference micro-benchmarks (pytest-benchmark)\n\n"
            + _table(["op / shape", "mode", "impl", "dtype", "median ms", "p20 ms", "p80 ms"], body))


def plot_speedups(rows: list[dict], path: Path) -> Path | None:
    """Horizontal bars: speedup of every row with a baseline (log scale, 1x marked)."""
    sp = _speedup_rows(rows)
    if not sp:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = [f"{r['bench']} {r['mode']} · {r['shape'][:48]} · {r['impl'][:32]} vs {str(r.get('baseline'))[:28]}" for r in sp]
    values = [r["speedup_vs_baseline"] for r in sp]
    fig, ax = plt.subplots(figsize=(12, 1.5 + 0.28 * len(sp)))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(sp)), values, color=colors)
    ax.set_yticks(range(len(sp)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("speedup over the baseline (x, log scale)")
    ax.set_title("invnext vs baselines, same run and card")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_breakdown(rows: list[dict], path: Path) -> Path | None:
    """Stacked horizontal bars: ms per step of each region, one bar per (stage/preset, path)."""
    bd = [r for r in rows if r["bench"] == "train_step_breakdown"]
    if not bd:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, dict[str, float]] = {}
    for r in bd:
        groups.setdefault(f"{r['shape']} · {r['impl']}", {})[r["mode"]] = r["ms_median"]
    regions = [g for g in REGION_ORDER if any(g in v for v in groups.values())]
    names = list(groups)
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.45 * len(names)))
    left = [0.0] * len(names)
    cmap = plt.get_cmap("tab10")
    for i, g in enumerate(regions):
        vals = [groups[n].get(g, 0.0) for n in names]
        ax.barh(range(len(names)), vals, left=left, label=g, color=cmap(i % 10))
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step")
    ax.set_title("step-time breakdown per region")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def render_report(out: Path, statuses, *, gpu: str, date: str, peaks: dict | None = None, quick: bool = False) -> Path:
    """Write ``out/REPORT_<gpu>_<date>.md`` (+ PNG plots) and return its path."""
    out = Path(out)
    stem = f"REPORT_{slug(gpu)}_{date}"
    results = load_results(out, gpu, date)
    rows = [r for _, _, rs in results for r in rs]
    meta = next((m for _, m, _ in results if m), {})
    peaks = peaks or meta.get("peaks") or {}
    parts = [f"# invnext benchmarks · {gpu} · {date}{' · --quick' if quick else ''}\n"]
    parts.append(f"torch {meta.get('torch', '?')}, CUDA {meta.get('cuda')}, triton {meta.get('triton', '?')}. ")
    if peaks:
        parts.append(f"Measured peaks of this card: {peaks.get('matmul_bf16_tflops', float('nan')):.0f} TFLOP/s bf16 "
                     f"matmul, {peaks.get('copy_gbps', float('nan')):.0f} GB/s device copy (read + write); every "
                     "fraction of peak below is against these.\n")
    else:
        parts.append("No GPU: no peaks measured, no fractions of peak.\n")
    parts.append("\n## Suite\n\n")
    parts.append(_table(["module", "status", "seconds", "detail", "log", "result files"],
                        [[s.name, s.status, f"{s.seconds:.0f}", s.detail, s.log or "", ", ".join(s.files)]
                         for s in statuses]))
    parts.append("\n## End-to-end training step\n\n" + _step_section(rows, quick) + _max_batch_section(rows))
    parts.append("\n## Step-time breakdown\n\n" + _breakdown_section(rows))
    bd_png = plot_breakdown(rows, out / f"{stem}_breakdown.png")
    if bd_png is not None:
        parts.append(f"\n![step-time breakdown]({bd_png.name})\n")
    parts.append("\n## Kernels against their baselines\n\n" + _speedup_section(rows))
    sp_png = plot_speedups(rows, out / f"{stem}_speedup.png")
    if sp_png is not None:
        parts.append(f"\n![speedup per op]({sp_png.name})\n")
    parts.append(_cpu_micro_section(rows))
    parts.append("\n## Result files and notes\n\n")
    for name, m, rs in results:
        note = m.get("notes") or ""
        parts.append(f"- `{name}` ({len(rs)} rows){': ' + _cell(note) if note else ''}\n")
    if not results:
        parts.append("- none\n")
    path = out / f"{stem}.md"
    path.write_text("".join(parts))
    return path
