"""Mask sampling time per batch: the CUDA samplers against the torch reference on the same GPU.

The cases and the timing of the mask benchmarks, one per op (each takes the cases of its op)::

    python -m benchmarks.bench_tube_mask [--quick]
    python -m benchmarks.bench_semantic_mask [--quick]
    python -m benchmarks.bench_multiblock_mask [--quick]

Shapes (kernels.md, method.md): Stage 1 = 16 clips x 16 frames x 16x16 (4096 tokens), semantic
masks keeping 51 of 256 tokens per frame (80% hidden; "topk" as in the paper, "sample" as in
the release) and the VideoMAE tube mask at 80%; Stage 2 = 14 clips x 32 frames x 16x16 (8192
tokens), multi-block view A (8 tubes of 15%), view B (2 tubes of 70%), and the batch's both
views together, with the host counts a training step uses. Target: a Stage-2 batch (both
views) in under 50 microseconds.

Multi-block boxes are drawn on the host (numpy Philox, a few hundred numbers) and copied in, so
the 'call' rows of multi-block cases include that host work (which a training step overlaps
with the GPU's); their 'graph' rows replay the device's share alone, painting boxes already on
the device (host data cannot be captured).

Rows per case: the reference on the GPU (the baseline), the cuda backend through the public
op, and the sampler that also returns cu_seqlens (what gather_visible and varlen attention
consume). Each is timed by do_bench (calls at the host's pace) and as a CUDA-graph replay
(device time). ``host_sync`` in a row's extra says whether the call synchronises with the host
(torch's sync debug mode): the cuda samplers never do, so a training step can sample its masks
without waiting for the GPU. The reference on the CPU (the dataloader's option) is timed by
wall clock for context.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.common import Row, do_bench, graph_bench, markdown_table, quick_cli, write_results

TARGET_STAGE2_US = 50.0


@dataclass
class Case:
    name: str
    op: str  # "tube_mask" | "multiblock_mask" | "semantic_mask"
    B: int
    grid: tuple[int, int, int]
    call: Callable[[str, torch.device], object]  # (backend, device) -> hidden (a tuple: one per view)
    with_cu: Callable[[], tuple]  # the native sampler(s) that also write cu_seqlens (CUDA only)
    dtype: str = "bool"  # the input's dtype (semantic attention), else the mask's
    views: int = 1  # masks sampled per clip
    # Multi-block: what the 'graph' rows replay instead, given the boxes already on the device
    # (host data cannot be captured); (backend) -> masks.
    device_share: Callable[[str], object] | None = None

    @property
    def tokens(self) -> int:
        return self.views * self.B * self.grid[0] * self.grid[1] * self.grid[2]


def _cases(dtypes: list[torch.dtype], cuda: torch.device | None = None) -> list[Case]:
    """The cases; ``cuda`` is where inputs are staged (default the GPU; a test builds them on the CPU)."""
    cuda = torch.device("cuda") if cuda is None else cuda
    from invnext.native import masks as nm
    from invnext.ops import masks as om

    cases = []
    B1, g1 = 16, (16, 16, 16)
    keep = 256 - om.hidden_count(0.8, 256)  # 51
    cases.append(
        Case(
            f"stage1 tube {B1}x{g1} 80%", "tube_mask", B1, g1,
            lambda b, d: om.tube_mask(B1, g1, 0.8, seed=1, device=d, backend=b),
            lambda: nm.tube_mask_with_cu_seqlens(B1, g1, 0.8, 1, cuda, 4),
        )
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        attn_cpu = torch.softmax(torch.randn(B1, g1[0], 256, generator=gen), -1).to(dtype)
        attn_gpu = attn_cpu.to(cuda)
        for mode in ("topk", "sample"):

            def call(b, d, mode=mode, attn_cpu=attn_cpu, attn_gpu=attn_gpu):
                return om.semantic_mask(attn_gpu if d.type == "cuda" else attn_cpu, keep, mode, seed=1, backend=b)

            cases.append(
                Case(
                    f"stage1 semantic {mode} {B1}x{g1} keep {keep}/256", "semantic_mask", B1, g1, call,
                    lambda mode=mode, attn=attn_gpu: nm.semantic_mask_with_cu_seqlens(attn, keep, mode, 1, 4),
                    str(dtype).replace("torch.", ""),
                )
            )  # fmt: skip
    B2, g2 = 14, (32, 16, 16)
    views = {
        "A": (B2, g2, 8, (0.15, 0.15), (0.75, 1.5), (1.0, 1.0)),
        "B": (B2, g2, 2, (0.7, 0.7), (0.75, 1.5), (1.0, 1.0)),
    }
    def painted(b: str, seeds_args):
        from invnext.ops._dispatch import dispatch

        on_device = [(om.multiblock_boxes(*a, seed).to(cuda), a[1]) for seed, a in seeds_args]
        return lambda: tuple(dispatch("multiblock_mask", b, cuda, boxes, grid, cuda) for boxes, grid in on_device)

    for view, args in views.items():
        cases.append(
            Case(
                f"stage2 multi-block view {view} {B2}x{g2} ({args[2]} x {args[3][0]:.0%})", "multiblock_mask", B2, g2,
                lambda b, d, args=args: om.multiblock_mask(*args, seed=1, device=d, backend=b),
                lambda args=args: nm.multiblock_mask_with_cu_seqlens(*args, 1, cuda, 4),
                device_share=lambda b, args=args: painted(b, [(1, args)]),
            )
        )  # fmt: skip
    # A Stage-2 batch: both views of every clip (the 50 us target), with the host counts the
    # training step sizes its packed batches by (Stage2Model.view_masks).
    both = list(enumerate(views.values()))
    cases.append(
        Case(
            f"stage2 batch: views A + B {B2}x{g2}", "multiblock_mask", B2, g2,
            lambda b, d: tuple(
                om.multiblock_mask(*a, seed=1 + i, device=d, backend=b, return_counts=True) for i, a in both
            ),
            lambda: tuple(nm.multiblock_mask_with_cu_seqlens(*a, 1 + i, cuda, 4) for i, a in both),
            device_share=lambda b: painted(b, [(1 + i, a) for i, a in both]),
            views=2,
        )
    )  # fmt: skip
    return cases


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def _syncs(fn: Callable[[], object]) -> bool:
    """True when ``fn`` synchronises with the host (torch's sync debug mode raises)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError as exc:
        if "synchroniz" not in str(exc):
            raise
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def _bench(fn: Callable[[], object], quick: bool) -> tuple[float, float, float]:
    return do_bench(fn, warmup_ms=10 if quick else 25, rep_ms=40 if quick else 100)


def _bench_graph(fn: Callable[[], object], quick: bool) -> tuple[float, float, float] | None:
    return graph_bench(fn, lambda replay: _bench(replay, quick), "mask benchmark")


def _cpu_ms(fn: Callable[[], object], reps: int) -> tuple[float, float, float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    at = lambda q: times[min(len(times) - 1, int(q * len(times)))]
    return at(0.5), at(0.2), at(0.8)


def bench_case(case: Case, quick: bool) -> list[Row]:
    from invnext.ops._dispatch import availability

    cuda = torch.device("cuda")
    ok, why = availability(case.op, "cuda", cuda)
    ref = case.call("torch", cuda)
    impls: dict[str, Callable[[], object]] = {"torch reference (GPU)": lambda: case.call("torch", cuda)}
    if ok:
        got = case.call("cuda", cuda)
        if not _same(got, ref):
            raise SystemExit(f"bench_{case.op}: {case.name}: the cuda mask differs from the reference")
        impls["invnext-cuda"] = lambda: case.call("cuda", cuda)
        impls["invnext-cuda + cu_seqlens"] = case.with_cu
    else:
        print(f"bench_{case.op}: backend 'cuda' skipped: {why}")

    rows: list[Row] = []
    t = {name: _bench(fn, quick) for name, fn in impls.items()}
    graphed = dict(impls)
    if case.device_share is not None:
        graphed = {"torch reference (GPU)": case.device_share("torch")}
        if ok:
            graphed["invnext-cuda"] = case.device_share("cuda")
    tg = {name: _bench_graph(graphed[name], quick) if name in graphed else None for name in impls}
    base, base_g = t["torch reference (GPU)"][0], (tg["torch reference (GPU)"] or (None,))[0]
    stage2 = case.op == "multiblock_mask"
    for name, fn in impls.items():
        syncs = _syncs(fn)
        for mode, timing, b_ms in (("call", t[name], base), ("graph", tg[name], base_g)):
            if timing is None:
                continue
            extra = {"host_sync": syncs, "us": timing[0] * 1e3}
            if stage2 and name != "torch reference (GPU)":
                extra["target_us"] = TARGET_STAGE2_US
                extra["meets_target"] = timing[0] * 1e3 < TARGET_STAGE2_US
            is_base = name == "torch reference (GPU)"
            rows.append(
                Row(
                    "mask_sampling", name, mode, case.name, case.dtype, timing[0], timing[1], timing[2],
                    case.tokens / (timing[0] * 1e-3) / 1e6, "Mtok/s", None,
                    None if is_base or b_ms is None else "torch reference (GPU)",
                    None if is_base or b_ms is None else b_ms / timing[0], extra,
                )
            )  # fmt: skip
    cpu = _cpu_ms(lambda: case.call("torch", torch.device("cpu")), 3 if quick else 10)
    rows.append(
        Row(
            "mask_sampling", "torch reference (CPU, dataloader)", "wall clock", case.name, case.dtype, cpu[0], cpu[1],
            cpu[2], case.tokens / (cpu[0] * 1e-3) / 1e6, "Mtok/s", None, None, None, {"host_sync": False},
        )
    )  # fmt: skip
    return rows


def main(op: str, argv: list[str] | None = None) -> int:
    """``bench_<op>``: every case of ``op`` (``tube_mask``, ``semantic_mask`` or ``multiblock_mask``)."""
    name = f"bench_{op}"
    args = quick_cli(name, __doc__, "fp32 attention only, shorter timing (seconds on an H100)", argv)
    if args is None:
        return 0
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    rows: list[Row] = []
    for case in _cases(dtypes):
        if case.op == op:
            rows += bench_case(case, args.quick)
    notes = (
        "Time to sample one batch of masks. 'call' rows are do_bench of the Python call (host pace, "
        "includes launch overhead and, for multi-block, drawing the boxes on the host); 'graph' rows replay a "
        "captured CUDA graph (device time; multi-block: painting boxes already on the device). "
        "host_sync: whether the call synchronises with the host (torch sync debug mode). "
        f"Stage-2 target: under {TARGET_STAGE2_US:.0f} us per batch. The cuda masks equal the reference's bit for bit "
        "(checked before timing). '+ cu_seqlens' samplers also write cu_seqlens (4 prefix tokens) on the device."
    )
    path = write_results(name + ("_quick" if args.quick else ""), rows, notes)
    print(markdown_table(rows, {"gpu": torch.cuda.get_device_name(0), "peaks": {}}))
    print(f"results: {path}")
    return 0

