"""Token movement: gather_visible / scatter_tokens bandwidth against eager PyTorch.

The cases, eager formulations and timing of the two token benchmarks, one per op::

    python -m benchmarks.bench_gather_visible [--quick]
    python -m benchmarks.bench_scatter_tokens [--quick]

Shapes (method.md): Stage 1 = 16 clips x 4096 tokens x 768, 80% hidden (819 visible per
clip), 4 prefix tokens, a shared position table; Stage 2 = 14 clips x 8192 tokens x 768,
multi-block view A masks (8 tubes of 15% of the frame: 20-50% visible), 4 prefix tokens.
For each shape, dtype, op and direction (fwd; bwd = the gradients of every input) it times
the invnext backends (Triton; CUDA when built) and eager PyTorch formulations.

Throughput is GB/s of the *minimal* traffic: each byte an ideal kernel must read or write,
counted once (visible rows, the touched part of the position table, the outputs, the index);
"of peak" divides it by this card's measured device-copy bandwidth.

Two comparisons, because eager code that starts from a boolean mask pays for turning it
into an index (nonzero: a host sync) while the kernels receive the index:
- "index given": the best eager formulation handed the same index and cu_seqlens;
- "incl. mask->index": the best eager formulation starting from the mask (boolean indexing,
  or index derivation followed by the index-given code).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.common import Row, do_bench, graph_bench, markdown_table, measured_peaks, quick_cli, write_results

P = 4
C = 768


@dataclass
class Case:
    name: str
    B: int
    grid: tuple[int, int, int]
    hidden: torch.Tensor  # bool[B, N] on the GPU

    @property
    def N(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


def _stage1(device) -> Case:
    # Semantic masks keep a fixed count per clip; any fixed-count random subset moves the same bytes.
    B, grid = 16, (16, 16, 16)
    N = grid[0] * grid[1] * grid[2]
    keep = round(0.2 * N)
    gen = torch.Generator().manual_seed(0)
    order = torch.rand(B, N, generator=gen).argsort(1)
    hidden = torch.ones(B, N, dtype=torch.bool)
    hidden.scatter_(1, order[:, :keep], False)
    return Case(f"stage1 {B}x{N}x{C} (80% hidden)", B, grid, hidden.to(device))


def _stage2(device) -> Case:
    B, grid = 14, (32, 16, 16)
    N = grid[0] * grid[1] * grid[2]
    try:
        from invnext.ops.masks import multiblock_mask

        hidden = multiblock_mask(B, grid, 8, (0.15, 0.15), (0.75, 1.5), seed=0, device="cpu")
        how = "multi-block view A"
    except Exception as exc:  # noqa: BLE001 - any failure of the masks module: fall back to random masks
        print(f"token benchmarks: multiblock_mask unavailable ({exc}); using random masks of 25-55% visible")
        gen = torch.Generator().manual_seed(0)
        frac = 0.25 + 0.3 * torch.rand(B, 1, generator=gen)
        hidden = torch.rand(B, N, generator=gen) >= frac
        how = "random 25-55% visible"
    vis = (~hidden).float().mean().item()
    return Case(f"stage2 {B}x{N}x{C} ({how}, {100 * vis:.0f}% visible)", B, grid, hidden.to(device))


# ----------------------------------------------------------------------------------------
# eager formulations
# ----------------------------------------------------------------------------------------
def derive_index(hidden: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager mask -> (index int64[total], cu_seqlens int32[B+1]); ``nonzero`` syncs with the host."""
    B, N = hidden.shape
    keep = torch.cat([torch.ones(B, num_prefix, dtype=torch.bool, device=hidden.device), ~hidden], 1)
    flat = keep.reshape(-1).nonzero().squeeze(1)
    b, t = flat // (N + num_prefix), flat % (N + num_prefix)
    index = torch.where(t >= num_prefix, b * N + t - num_prefix, torch.full_like(flat, -1))
    cu = torch.zeros(B + 1, dtype=torch.int32, device=hidden.device)
    cu[1:] = keep.sum(1).cumsum(0)
    return index, cu


def gather_boolean(x, hidden, pos, prefix):
    """``x[~hidden]`` style: pos added to the whole clip, prefix concatenated, boolean pick."""
    B = x.shape[0]
    full = torch.cat([prefix.expand(B, -1, -1), x + pos], 1)
    keep = torch.cat([torch.ones(B, prefix.shape[1], dtype=torch.bool, device=x.device), ~hidden], 1)
    return full[keep]


def _prefix_source(index, cu, B, N, Bq, num_prefix):
    """Row of every packed token in ``cat([x.view(B*N, C), prefix.view(Bq*P, C)])`` (no sync)."""
    total = index.numel()
    r = torch.arange(total, device=index.device)
    b = torch.searchsorted(cu[1:].to(torch.int64), r, right=True)
    j = r - cu.to(torch.int64)[b]
    return torch.where(index >= 0, index, B * N + (b if Bq > 1 else 0) * num_prefix + j)


def gather_table(x, index, cu, pos, prefix):
    """torch.gather from one table of ``x + pos`` rows and prefix rows."""
    B, N, C_ = x.shape
    table = torch.cat([(x + pos).reshape(B * N, C_), prefix.reshape(-1, C_)])
    src = _prefix_source(index, cu, B, N, prefix.shape[0], prefix.shape[1])
    return torch.gather(table, 0, src[:, None].expand(-1, C_))


def gather_index_select(x, index, cu, pos, prefix):
    """index_select of the visible rows and their pos rows, add, then the prefix rows by where."""
    B, N, C_ = x.shape
    safe = index.clamp_min(0)
    out = x.reshape(B * N, C_).index_select(0, safe) + pos.reshape(-1, C_).index_select(0, safe % N)
    src = _prefix_source(index, cu, B, N, prefix.shape[0], prefix.shape[1]) - B * N
    pre = prefix.reshape(-1, C_).index_select(0, src.clamp_min(0))
    return torch.where((index < 0)[:, None], pre, out)


def scatter_boolean(packed, index, hidden, mask_token, pos):
    """``full[~hidden] = packed[index >= 0]``: two boolean index ops, each a host sync."""
    B, N = hidden.shape
    full = mask_token.expand(B, N, -1).clone()
    full[~hidden] = packed[index >= 0]
    return full + pos


def _dump_target(index, places):
    return torch.where(index >= 0, index, torch.full_like(index, places))


def scatter_index_copy(packed, index, mask_token, pos, B, N):
    """index_copy into the grid plus one dump row that takes the prefix rows."""
    buf = mask_token.expand(B * N + 1, -1).index_copy(0, _dump_target(index, B * N), packed)
    return buf[: B * N].view(B, N, -1) + pos


def scatter_index_put(packed, index, mask_token, pos, B, N):
    buf = mask_token.expand(B * N + 1, -1).index_put((_dump_target(index, B * N),), packed)
    return buf[: B * N].view(B, N, -1) + pos


# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------
@dataclass
class Impl:
    name: str
    fn: Callable[[], object]
    kind: str  # "invnext" | "index" (eager, given the index) | "mask" (eager, from the mask) | "copy"
    graph: bool = True  # capturable in a CUDA graph (no host sync)


Timing = tuple[float, float, float]


def _bench(fn: Callable[[], object], quick: bool) -> Timing:
    return do_bench(fn, warmup_ms=10 if quick else 25, rep_ms=40 if quick else 100)


def _bench_graph(fn: Callable[[], object], quick: bool) -> Timing | None:
    return graph_bench(fn, lambda replay: _bench(replay, quick), "token benchmark")


def _backward_of(make: Callable[[], torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor):
    out = make()
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def _invnext_impls(op: str, device) -> dict[str, Callable]:
    from invnext.ops._dispatch import availability, resolve

    impls = {}
    for backend in ("triton", "cuda"):
        ok, why = availability(op, backend, device)
        if ok:
            impls[f"invnext-{backend}"] = resolve(op, backend, device)[1]
        else:
            print(f"bench_{op}: backend {backend!r} skipped: {why}")
    return impls


SAME_BYTES_COPY = "device copy of the same bytes (reference)"


def _same_bytes_copy(nbytes: int, device: torch.device) -> Callable[[], object]:
    """A plain device copy that reads and writes ``nbytes`` in all, like the op it stands beside.

    The card's copy peak comes from a 1 GiB copy; at a Stage-1 batch (tens of MB) launch, ramp
    and tail weigh more, so this row shows what fraction a copy of the op's own size reaches.
    """
    src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _measure(
    bench: str, mode: str, shape: str, dtype: torch.dtype, nbytes: int, impls: list[Impl], quick: bool,
    copy_gbps: float, device: torch.device,
) -> list[Row]:
    """Time every impl (do_bench, and graph replay where capturable) and build the rows.

    Each invnext row is compared with the best eager impl given the index and, in a second
    row, with the best eager impl starting from the mask; graph rows with the best captured
    eager impl. Every invnext row also records ``of_same_bytes_copy``: the time of a device
    copy of the same bytes over its own (graph rows against the copy's graph replay).
    """
    dt = str(dtype).replace("torch.", "")
    impls = [*impls, Impl(SAME_BYTES_COPY, _same_bytes_copy(nbytes, device), "copy")]
    t = {i.name: _bench(i.fn, quick) for i in impls}
    tg = {i.name: _bench_graph(i.fn, quick) for i in impls if i.graph and i.kind != "mask"}
    tg = {k: v for k, v in tg.items() if v is not None}

    def row(impl, timing, mode_, baseline=None, base_ms=None, **extra):
        gbps = nbytes / (timing[0] * 1e-3) / 1e9
        speedup = base_ms / timing[0] if base_ms is not None else None
        frac = gbps / copy_gbps if copy_gbps else None
        return Row(
            bench,
            impl,
            mode_,
            shape,
            dt,
            timing[0],
            timing[1],
            timing[2],
            gbps,
            "GB/s",
            frac,
            baseline,
            speedup,
            dict(extra, minimal_bytes=nbytes),
        )

    def best(names, table):
        names = [n for n in names if n in table]
        return min(names, key=lambda n: table[n][0]) if names else None

    eager_index = [i.name for i in impls if i.kind == "index"]
    eager_mask = [i.name for i in impls if i.kind == "mask"]
    ours = [i.name for i in impls if i.kind == "invnext"]
    b_index, b_mask, b_graph = best(eager_index, t), best(eager_mask, t), best(eager_index, tg)
    plain = eager_index + eager_mask + [SAME_BYTES_COPY]
    rows = [row(n, t[n], mode) for n in plain]
    rows += [row(n, tg[n], f"{mode} graph") for n in eager_index + [SAME_BYTES_COPY] if n in tg]
    for n in ours:
        vs_copy = {"of_same_bytes_copy": t[SAME_BYTES_COPY][0] / t[n][0]}
        rows.append(row(n, t[n], mode, f"best eager, index given: {b_index}", t[b_index][0], **vs_copy))
        rows.append(row(n, t[n], mode, f"best eager incl. mask->index: {b_mask}", t[b_mask][0], **vs_copy))
        if n in tg and b_graph is not None:
            vs_copy = {"of_same_bytes_copy": tg[SAME_BYTES_COPY][0] / tg[n][0]} if SAME_BYTES_COPY in tg else {}
            graph_base = f"best eager (graph), index given: {b_graph}"
            rows.append(row(n, tg[n], f"{mode} graph", graph_base, tg[b_graph][0], **vs_copy))
    return rows


OPS = ("gather_visible", "scatter_tokens")


def bench_case(case: Case, dtype: torch.dtype, quick: bool, copy_gbps: float, timed: tuple[str, ...] = OPS) -> list[Row]:
    """The rows of the ops in ``timed`` (forward and backward each) on ``case``."""
    dev = case.hidden.device
    B, N, hidden = case.B, case.N, case.hidden
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(B, N, C, device=dev, dtype=dtype, generator=gen)
    pos = torch.randn(1, N, C, device=dev, dtype=dtype, generator=gen)
    prefix = torch.randn(1, P, C, device=dev, dtype=dtype, generator=gen)
    mask_token = torch.randn(C, device=dev, dtype=dtype, generator=gen)
    index, cu = derive_index(hidden, P)
    total = index.numel()
    visible = total - B * P
    esize = x.element_size()
    pos_rows_touched = int((~hidden).any(0).sum())
    idx_bytes = 8 * total + 4 * (B + 1)
    shape = f"{case.name}, total={total}"
    rows: list[Row] = []
    measure = lambda bench, mode, nbytes, impls: _measure(bench, mode, shape, dtype, nbytes, impls, quick, copy_gbps, dev)

    if "gather_visible" in timed:
        # -------- gather_visible forward --------
        g_impls = _invnext_impls("gather_visible", dev)
        impls = [Impl(n, lambda f=f: f(x, index, cu, pos, prefix), "invnext") for n, f in g_impls.items()]
        try:  # the public op from the mask, with host-known counts (the mask sampler has them): no sync
            ops = importlib.import_module("invnext.ops.tokens")
            counts = (~hidden).sum(1).tolist()
            impls.append(
                Impl(
                    "invnext-triton public op (mask given, num_visible)",
                    lambda: ops.gather_visible(x, hidden, pos=pos, prefix=prefix, num_visible=counts, backend="triton"),
                    "invnext",
                    graph=False,
                )
            )
        except ImportError:
            pass
        impls += [
            Impl("eager torch.gather (index given)", lambda: gather_table(x, index, cu, pos, prefix), "index"),
            Impl(
                "eager index_select+add (index given)", lambda: gather_index_select(x, index, cu, pos, prefix), "index"
            ),
            Impl(
                "eager bool-index x[keep] (mask given)", lambda: gather_boolean(x, hidden, pos, prefix), "mask", False
            ),
            Impl(
                "eager mask->index + torch.gather",
                lambda: gather_table(x, *derive_index(hidden, P), pos, prefix),
                "mask",
                False,
            ),
            Impl(
                "eager mask->index + index_select+add",
                lambda: gather_index_select(x, *derive_index(hidden, P), pos, prefix),
                "mask",
                False,
            ),
        ]
        nbytes = esize * (visible * C + pos_rows_touched * C + P * C + total * C) + idx_bytes
        rows += measure("gather_visible", "fwd", nbytes, impls)

        # -------- gather_visible backward (dx, dpos, dprefix) --------
        leaves = [t_.clone().requires_grad_(True) for t_ in (x, pos, prefix)]
        grad = torch.randn(total, C, device=dev, dtype=dtype, generator=gen)
        bwd = lambda make: _backward_of(make, leaves, grad)
        impls = [
            Impl(n, bwd(lambda f=f: f(leaves[0], index, cu, leaves[1], leaves[2])), "invnext")
            for n, f in g_impls.items()
        ]
        impls += [
            Impl(
                "eager torch.gather (index given)",
                bwd(lambda: gather_table(leaves[0], index, cu, leaves[1], leaves[2])),
                "index",
            ),
            Impl(
                "eager index_select+add (index given)",
                bwd(lambda: gather_index_select(leaves[0], index, cu, leaves[1], leaves[2])),
                "index",
            ),
            Impl(
                "eager bool-index x[keep] (mask given)",
                bwd(lambda: gather_boolean(leaves[0], hidden, leaves[1], leaves[2])),
                "mask",
            ),
        ]
        nbytes = esize * (total * C + B * N * C + N * C + P * C) + idx_bytes
        rows += measure("gather_visible", "bwd", nbytes, impls)
        del leaves, grad, impls

    if "scatter_tokens" in timed:
        # -------- scatter_tokens forward --------
        packed = torch.randn(total, C, device=dev, dtype=dtype, generator=gen)
        s_impls = _invnext_impls("scatter_tokens", dev)
        impls = [Impl(n, lambda f=f: f(packed, index, mask_token, pos, B, N), "invnext") for n, f in s_impls.items()]
        impls += [
            Impl(
                "eager index_copy (index given)",
                lambda: scatter_index_copy(packed, index, mask_token, pos, B, N),
                "index",
            ),
            Impl(
                "eager index_put (index given)",
                lambda: scatter_index_put(packed, index, mask_token, pos, B, N),
                "index",
            ),
            Impl(
                "eager bool-mask assign (mask given)",
                lambda: scatter_boolean(packed, index, hidden, mask_token, pos),
                "mask",
                False,
            ),
            Impl(
                "eager mask->index + index_copy",
                lambda: scatter_index_copy(packed, derive_index(hidden, P)[0], mask_token, pos, B, N),
                "mask",
                False,
            ),
        ]
        nbytes = esize * (visible * C + N * C + C + B * N * C) + 8 * total
        rows += measure("scatter_tokens", "fwd", nbytes, impls)

        # -------- scatter_tokens backward (dpacked, dmask_token, dpos) --------
        leaves = [t_.clone().requires_grad_(True) for t_ in (packed, mask_token, pos)]
        grad = torch.randn(B, N, C, device=dev, dtype=dtype, generator=gen)
        bwd = lambda make: _backward_of(make, leaves, grad)
        impls = [
            Impl(n, bwd(lambda f=f: f(leaves[0], index, leaves[1], leaves[2], B, N)), "invnext")
            for n, f in s_impls.items()
        ]
        impls += [
            Impl(
                "eager index_copy (index given)",
                bwd(lambda: scatter_index_copy(leaves[0], index, leaves[1], leaves[2], B, N)),
                "index",
            ),
            Impl(
                "eager index_put (index given)",
                bwd(lambda: scatter_index_put(leaves[0], index, leaves[1], leaves[2], B, N)),
                "index",
            ),
            Impl(
                "eager bool-mask assign (mask given)",
                bwd(lambda: scatter_boolean(leaves[0], index, hidden, leaves[1], leaves[2])),
                "mask",
            ),
        ]
        nbytes = esize * (B * N * C + total * C + N * C + C) + 8 * total
        rows += measure("scatter_tokens", "bwd", nbytes, impls)
    return rows


def _check_agreement(case: Case) -> None:
    """The timed kernels must compute what the eager code computes (bf16 forward, exact)."""
    dev = case.hidden.device
    from invnext._kernels_path import ensure_kernels_importable

    ensure_kernels_importable()
    tk = importlib.import_module("invnext_kernels.tokens")
    x = torch.randn(case.B, case.N, C, device=dev, dtype=torch.bfloat16)
    pos = torch.randn(1, case.N, C, device=dev, dtype=torch.bfloat16)
    prefix = torch.randn(1, P, C, device=dev, dtype=torch.bfloat16)
    mask_token = torch.randn(C, device=dev, dtype=torch.bfloat16)
    index, cu = derive_index(case.hidden, P)
    packed = tk.gather_visible_triton(x, index, cu, pos, prefix)
    want = gather_boolean(x.float(), case.hidden, pos.float(), prefix.float()).to(torch.bfloat16)
    if not torch.equal(packed, want):
        raise SystemExit("token benchmarks: the Triton gather disagrees with the eager formulation")
    full = tk.scatter_tokens_triton(packed, index, mask_token, pos, case.B, case.N)
    want = scatter_boolean(packed.float(), index, case.hidden, mask_token.float(), pos.float()).to(torch.bfloat16)
    if not torch.equal(full, want):
        raise SystemExit("token benchmarks: the Triton scatter disagrees with the eager formulation")


def main(op: str, argv: list[str] | None = None) -> int:
    """``bench_<op>``: ``op`` (``gather_visible`` or ``scatter_tokens``) on both cases."""
    name = f"bench_{op}"
    args = quick_cli(name, __doc__, "bf16 only, shorter timing (under a minute on an H100)", argv)
    if args is None:
        return 0
    dev = torch.device("cuda")
    copy_gbps = measured_peaks().get("copy_gbps", 0.0)
    dtypes = [torch.bfloat16] if args.quick else [torch.bfloat16, torch.float32]
    rows: list[Row] = []
    for make in (_stage1, _stage2):
        case = make(dev)
        _check_agreement(case)
        for dtype in dtypes:
            rows += bench_case(case, dtype, args.quick, copy_gbps, (op,))
            torch.cuda.empty_cache()
    notes = (
        "GB/s counts the minimal bytes (visible rows, touched pos rows, outputs, index). "
        "Each invnext row appears twice: speedup vs the best eager code given the index, and vs the best "
        "eager code starting from the mask (incl. the synchronising mask->index step). "
        "Modes ending in 'graph' time a CUDA-graph replay (device time without launch overhead) "
        "against the best capturable eager code; the others time calls with do_bench."
    )
    path = write_results(name + ("_quick" if args.quick else ""), rows, notes)
    print(markdown_table(rows, {"gpu": torch.cuda.get_device_name(0), "peaks": measured_peaks()}))
    print(f"results: {path}")
    return 0
