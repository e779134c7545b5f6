"""Diffusion-decoder kernels, a decoder train step and the reverse sampler, against eager PyTorch.

The inputs, decoder and timing of the diffusion benchmarks, one per op (and one for the step)::

    python -m benchmarks.bench_q_sample [--quick] [--sweep]
    python -m benchmarks.bench_diffusion_loss [--quick] [--sweep]
    python -m benchmarks.bench_p_sample_step [--quick] [--sweep]
    python -m benchmarks.bench_adaln_modulate [--quick]
    python -m benchmarks.bench_p_sample_loop [--quick]        (the sampler below)
    python -m benchmarks.bench_decoder_train_step [--quick]

Element ops at the Stage-1 shape (method.md): 16 clips x 3300 hidden tokens = 52800 rows of
C = 588 pixels (3x14x14), bf16 and fp32, timestep t random per row over 1000 cosine steps;
AdaLN at W = 1536 with a per-token (shift, scale), as the decoder's per-token condition gives.
Each Triton kernel is timed against the eager reference (``invnext.ops`` backend ``torch``,
the pure-PyTorch path) in the same run. Throughput is GB/s of the *minimal* traffic (each
byte an ideal kernel must read or write, once); "of peak" divides by this card's measured
device-copy bandwidth:

    q_sample          x0, noise in; x_t out                                   3 MC
    loss fwd+bwd      fwd: model_out (2C), x0, x_t, noise in, a float per row;
                      bwd: the same in again (recomputed, nothing saved), d model_out out   12 MC (+ 8 M bytes)
    p_sample_step     model_out (2C), x_t, noise in; x_{t-1} out             5 MC
    adaln fwd         x, shift, scale in; y out (+ mean, rstd)                4 MW (+ 8 M bytes)
    adaln bwd         dy, x, scale in; dx, dscale out (dshift = dy)           5 MW (+ 8 M bytes)

Decoder train step: a SimpleMLPAdaLN decoder D6 W1536 (method.md; written inline below) on the
52800 rows in bf16: q_sample, forward, hybrid loss, backward. "fused" uses the Triton
adaln_modulate, q_sample and diffusion_loss; "eager" plain torch (layer_norm * (1 + scale) +
shift in bf16, the reference q_sample and loss).

Where a row is 8 bytes off 16-byte alignment (bf16 at C = 588) q_sample and p_sample_step are
also timed with the paired-row tiling off (``PAIR_ROWS``), so the run shows what it buys.

``--sweep`` adds bf16 timings of alternative (rows, warps) tiles of the op's kernel families
(``invnext_kernels.diffusion.TUNE``), to re-derive the defaults on a new card.

Sampler: one clip's 4096 tokens, conditions [4096, 1024], the same decoder in bf16 (eval),
100 respaced steps (and the full 1000 without --quick): the CUDA-graph sampler (Triton step,
fused decoder) vs the eager reference loop (torch step, plain decoder), plus the eager loop
with the fused decoder and Triton step, to separate kernel from launch savings. clips/s.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import Row, do_bench, markdown_table, measured_peaks, need_gpu, write_results

ROWS = 16 * 3300  # Stage-1 hidden tokens per batch
C = 588
WIDTH = 1536
DEPTH = 6
COND = 1024
SAMPLER_TOKENS = 4096
SAMPLER_STEPS = (100, 1000)  # --quick: the first only
# tests/test_bench_diffusion.py runs every function here on the CPU interpreter with tiny
# shapes (a dry run of the wiring); a real run is on the GPU.
DEVICE = "cuda"


def _kernels():
    from invnext._kernels_path import ensure_kernels_importable

    ensure_kernels_importable()
    return importlib.import_module("invnext_kernels.diffusion"), importlib.import_module("invnext_kernels.sampler")


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _bench(fn: Callable[[], object], quick: bool) -> tuple[float, float, float]:
    return do_bench(fn, warmup_ms=10 if quick else 25, rep_ms=50 if quick else 150)


ROW_TILES = "invnext-triton, row tiles (PAIR_ROWS off)"


def _row_tiles(kd, fn):
    """``fn`` with the paired-row tiling switched off (``invnext_kernels.diffusion.PAIR_ROWS``)."""

    def run():
        kd.PAIR_ROWS = False
        try:
            return fn()
        finally:
            kd.PAIR_ROWS = True

    return run


def _bw_rows(bench, mode, shape, dtype, nbytes, timings, copy_gbps) -> list[Row]:
    """One row per impl; the Triton row names the eager reference as its baseline."""
    rows = []
    base = timings["torch-eager (reference)"]
    for impl, t in timings.items():
        gbps = nbytes / (t[0] * 1e-3) / 1e9
        is_kernel = impl.startswith("invnext")
        rows.append(
            Row(bench, impl, mode, shape, _dt(dtype), t[0], t[1], t[2], gbps, "GB/s",
                gbps / copy_gbps if copy_gbps else None,
                "torch-eager (reference)" if is_kernel else None,
                base[0] / t[0] if is_kernel else None, {"minimal_bytes": nbytes})
        )  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------
# element ops
# ----------------------------------------------------------------------------------------
def _decoder_rows(dtype: torch.dtype):
    """The Stage-1 decoder's ROWS x C hidden-token rows at random timesteps, seed 0.

    Returns (generator, schedule, x0, noise, t, x_t, model_out [ROWS, 2C], per-row weight); the
    generator is returned so that later inputs keep drawing from the same stream.
    """
    from invnext.ops import diffusion as R

    dev = torch.device(DEVICE)
    sched = R.make_schedule(1000, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    x0 = (torch.rand(ROWS, C, device=dev, generator=gen) * 2 - 1).to(dtype)
    noise = torch.randn(ROWS, C, device=dev, generator=gen, dtype=dtype)
    t = torch.randint(0, 1000, (ROWS,), device=dev, generator=gen)
    x_t = R.q_sample_reference(x0, noise, t, sched)
    mo = torch.randn(ROWS, 2 * C, device=dev, generator=gen, dtype=dtype)
    g_row = torch.rand(ROWS, device=dev, generator=gen)
    return gen, sched, x0, noise, t, x_t, mo, g_row


ELEMENT_OPS = ("q_sample", "diffusion_loss", "p_sample_step", "adaln_modulate")


def bench_ops(dtype: torch.dtype, quick: bool, copy_gbps: float, ops: tuple[str, ...] = ELEMENT_OPS) -> list[Row]:
    """The rows of the element ops ``ops`` in ``dtype``."""
    from invnext.ops import diffusion as R

    kd, _ = _kernels()
    dev = torch.device(DEVICE)
    es = torch.finfo(dtype).bits // 8
    M = ROWS
    gen, sched, x0, noise, t, x_t, mo, g_row = _decoder_rows(dtype)
    shape = f"{M}x{C}"
    rows: list[Row] = []

    if "q_sample" in ops:
        timings = {
            "torch-eager (reference)": _bench(lambda: R.q_sample_reference(x0, noise, t, sched), quick),
            "invnext-triton": _bench(lambda: kd.q_sample_triton(x0, noise, t, sched), quick),
        }
        if kd._pairable("stream", C, (x0, noise, x0)):  # the same kernel on row tiles (8-byte accesses), for comparison
            timings[ROW_TILES] = _bench(_row_tiles(kd, lambda: kd.q_sample_triton(x0, noise, t, sched)), quick)
        rows += _bw_rows("q_sample", "fwd", shape, dtype, 3 * M * C * es, timings, copy_gbps)

    if "diffusion_loss" in ops:
        # loss forward + backward w.r.t. model_out
        def loss_step(fn):
            m = mo.detach().requires_grad_()

            def run():
                loss = fn(m, x0, x_t, noise, t, sched)
                return torch.autograd.grad(loss, m, g_row)

            return run

        timings = {
            "torch-eager (reference)": _bench(loss_step(R.diffusion_loss_reference), quick),
            "invnext-triton": _bench(loss_step(kd.diffusion_loss_triton), quick),
        }
        rows += _bw_rows("diffusion_loss", "fwd+bwd", shape, dtype, 12 * M * C * es + 8 * M, timings, copy_gbps)

    if "p_sample_step" in ops:
        # one ancestral reverse step
        timings = {
            "torch-eager (reference)": _bench(lambda: R.p_sample_step_reference(mo, x_t, t, sched, noise, 1.0), quick),
            "invnext-triton": _bench(lambda: kd.p_sample_step_triton(mo, x_t, t, sched, noise, 1.0), quick),
        }
        if kd._pairable("step", C, (x_t, noise, x_t), mo):
            step = lambda: kd.p_sample_step_triton(mo, x_t, t, sched, noise, 1.0)
            timings[ROW_TILES] = _bench(_row_tiles(kd, step), quick)
        rows += _bw_rows("p_sample_step", "step", shape, dtype, 5 * M * C * es, timings, copy_gbps)

    if "adaln_modulate" in ops:
        # AdaLN at W = 1536, per-token modulation
        W = WIDTH
        x = torch.randn(M, W, device=dev, generator=gen, dtype=dtype)
        shift = torch.randn(M, W, device=dev, generator=gen, dtype=dtype)
        scale = torch.randn(M, W, device=dev, generator=gen, dtype=dtype) * 0.1
        dy = torch.randn(M, W, device=dev, generator=gen, dtype=dtype)
        ashape = f"{M}x{W}"
        with torch.no_grad():
            timings = {
                "torch-eager (reference)": _bench(lambda: R.adaln_modulate_reference(x, shift, scale, 1e-6), quick),
                "invnext-triton": _bench(lambda: kd.adaln_modulate_triton(x, shift, scale, 1e-6), quick),
            }
        rows += _bw_rows("adaln_modulate", "fwd", ashape, dtype, 4 * M * W * es + 8 * M, timings, copy_gbps)

        def adaln_bwd(fn):
            args = [z.detach().requires_grad_() for z in (x, shift, scale)]
            y = fn(*args, 1e-6)
            return lambda: torch.autograd.grad(y, args, dy, retain_graph=True)

        timings = {
            "torch-eager (reference)": _bench(adaln_bwd(R.adaln_modulate_reference), quick),
            "invnext-triton": _bench(adaln_bwd(kd.adaln_modulate_triton), quick),
        }
        rows += _bw_rows("adaln_modulate", "bwd", ashape, dtype, 5 * M * W * es + 8 * M, timings, copy_gbps)
    return rows


# ----------------------------------------------------------------------------------------
# the decoder (SimpleMLPAdaLN, method.md), inline
# ----------------------------------------------------------------------------------------
def _modulate_eager(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift


def _modulate_fused(x, shift, scale):
    kd, _ = _kernels()
    return kd.adaln_modulate_triton(x, shift, scale, 1e-6)


class _ResBlock(nn.Module):
    def __init__(self, width: int, modulate):
        super().__init__()
        self.modulate = modulate
        self.ada = nn.Linear(width, 3 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x, y_act):
        shift, scale, gate = self.ada(y_act).chunk(3, dim=-1)  # strided views, read in place
        h = self.fc2(F.silu(self.fc1(self.modulate(x, shift, scale))))
        return x + gate * h


class Decoder(nn.Module):
    """Per-token MLP with AdaLN: input proj, time MLP + cond proj -> y, D gated res blocks, final AdaLN + Linear."""

    def __init__(self, fused: bool, width=WIDTH, depth=DEPTH, channels=C, cond_dim=COND):
        super().__init__()
        mod = _modulate_fused if fused else _modulate_eager
        self.modulate = mod
        self.inp = nn.Linear(channels, width)
        self.cond = nn.Linear(cond_dim, width)
        self.time = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(_ResBlock(width, mod) for _ in range(depth))
        self.final_ada = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, 2 * channels)

    def forward(self, x_t, t_model, cond):
        from invnext.ops.diffusion import timestep_embedding

        x = self.inp(x_t)
        y = self.time(timestep_embedding(t_model, 256).to(x.dtype)) + self.cond(cond)
        y_act = F.silu(y)
        for blk in self.blocks:
            x = blk(x, y_act)
        shift, scale = self.final_ada(y_act).chunk(2, dim=-1)
        return self.out(self.modulate(x, shift, scale))


def _decoder_pair(dev, dtype):
    shape = {"width": WIDTH, "depth": DEPTH, "channels": C, "cond_dim": COND}
    eager = Decoder(fused=False, **shape).to(dev, dtype)
    fused = Decoder(fused=True, **shape).to(dev, dtype)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def bench_train_step(quick: bool) -> list[Row]:
    from invnext.ops import diffusion as R

    kd, _ = _kernels()
    dev, dtype = torch.device(DEVICE), torch.bfloat16
    sched = R.make_schedule(1000, device=dev)
    M = ROWS
    gen = torch.Generator(device=dev).manual_seed(1)
    x0 = (torch.rand(M, C, device=dev, generator=gen) * 2 - 1).to(dtype)
    noise = torch.randn(M, C, device=dev, generator=gen, dtype=dtype)
    t = torch.randint(0, 1000, (M,), device=dev, generator=gen)
    cond = torch.randn(M, COND, device=dev, generator=gen, dtype=dtype).requires_grad_()
    eager, fused = _decoder_pair(dev, dtype)

    def step(model, q_sample, loss_fn):
        def run():
            model.zero_grad(set_to_none=True)
            cond.grad = None
            x_t = q_sample(x0, noise, t, sched)
            loss = loss_fn(model(x_t, t, cond), x0, x_t, noise, t, sched).mean()
            loss.backward()

        return run

    t_eager = _bench(step(eager, R.q_sample_reference, R.diffusion_loss_reference), quick)
    t_fused = _bench(step(fused, kd.q_sample_triton, kd.diffusion_loss_triton), quick)
    params = sum(p.numel() for p in eager.parameters())
    flop = 6 * params * M  # matmul FLOPs of fwd + bwd (every parameter is a weight used once per row)
    shape = f"D{DEPTH} W{WIDTH}, {M} rows x {C}"
    rows = []
    for impl, tm, base in (("eager torch", t_eager, None), ("invnext fused (triton adaln + loss)", t_fused, t_eager)):
        tflops = flop / (tm[0] * 1e-3) / 1e12
        peak = measured_peaks().get("matmul_bf16_tflops")
        rows.append(
            Row("decoder_train_step", impl, "fwd+bwd", shape, "bfloat16", tm[0], tm[1], tm[2], tflops, "TFLOP/s",
                tflops / peak if peak else None, "eager torch" if base else None,
                base[0] / tm[0] if base else None, {"params": params, "flop": flop})
        )  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------
def _sync() -> None:
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def _time_calls(fn: Callable[[], object], reps: int) -> tuple[float, float, float]:
    fn()  # warm-up: compilation, graph capture, allocator
    _sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return statistics.median(times), q(0.2), q(0.8)


def bench_sampler(quick: bool) -> list[Row]:
    from invnext.ops import diffusion as R

    _, ks = _kernels()
    dev, dtype = torch.device(DEVICE), torch.bfloat16
    eager, fused = _decoder_pair(dev, dtype)
    eager.eval()
    fused.eval()
    M = SAMPLER_TOKENS
    gen = torch.Generator(device=dev).manual_seed(2)
    cond = torch.randn(M, COND, device=dev, generator=gen, dtype=dtype)
    x_T = torch.randn(M, C, device=dev, generator=gen, dtype=dtype)
    rows = []
    for steps in SAMPLER_STEPS[:1] if quick else SAMPLER_STEPS:
        sched = R.make_schedule(1000, respace=None if steps == 1000 else steps, device=dev)
        graph = dev.type == "cuda"  # (the dry run on the CPU loops eagerly)
        reps = 3 if steps == 1000 else 5

        def seed():
            return torch.Generator(device=dev).manual_seed(3)

        def reference(sched=sched):
            return R.p_sample_loop_reference(eager, cond, sched, x_T, None, seed(), 1.0)

        def ours(sched=sched, graph=graph):
            return ks.p_sample_loop_triton(fused, cond, sched, x_T, None, seed(), 1.0, use_graph=graph)

        impls = {
            "eager reference loop (torch step, plain decoder)": reference,
            "eager loop (triton step, fused decoder)": lambda: ours(graph=False),
            "invnext cuda-graph sampler": ours,
        }
        with torch.no_grad():
            timings = {name: _time_calls(fn, reps) for name, fn in impls.items()}
        base_name = "eager reference loop (torch step, plain decoder)"
        base = timings[base_name][0]
        for name, tm in timings.items():
            rows.append(
                Row("p_sample_loop", name, f"{steps} steps", f"{M} tokens x {C}, D{DEPTH} W{WIDTH}", "bfloat16",
                    tm[0], tm[1], tm[2], 1e3 / tm[0], "clips/s", None,
                    None if name == base_name else base_name, None if name == base_name else base / tm[0],
                    {"ms_per_step": tm[0] / steps})
            )  # fmt: skip
        ks.clear_graph_cache()
    return rows


# ----------------------------------------------------------------------------------------
# tile sweep (--sweep): the alternatives to the default (rows, warps) of each kernel family
# ----------------------------------------------------------------------------------------
SWEEP = {
    "stream": [(16, 4), (32, 4), (64, 4), (32, 8)],
    "step": [(16, 4), (32, 4), (32, 8), (64, 8)],
    # (4, 2) and (8, 2): 8 bf16 per thread, so the paired tiles' loads can be 16 bytes wide
    # (at (4, 4) a thread holds 4: 8-byte loads whatever the alignment).
    "loss_fwd": [(4, 4), (4, 2), (8, 2), (8, 4), (16, 4), (16, 8)],
    "loss_bwd": [(8, 4), (16, 4), (32, 4), (32, 8)],
}


# the sweep's kernel families of each op (--sweep)
SWEEP_KINDS = {"q_sample": ("stream",), "p_sample_step": ("step",), "diffusion_loss": ("loss_fwd", "loss_bwd")}


def bench_sweep(
    quick: bool, copy_gbps: float, dtype=torch.bfloat16, kinds: tuple[str, ...] = tuple(SWEEP)
) -> list[Row]:
    """bf16 timings of the alternative tiles of the kernel families ``kinds``."""
    kd, _ = _kernels()
    es = torch.finfo(dtype).bits // 8
    M = ROWS
    _, sched, x0, noise, t, x_t, mo, g_row = _decoder_rows(dtype)
    mo.requires_grad_()
    loss = kd.diffusion_loss_triton(mo, x0, x_t, noise, t, sched)
    cases = {
        "stream": ("q_sample", 3 * M * C * es, lambda: kd.q_sample_triton(x0, noise, t, sched)),
        "step": ("p_sample_step", 5 * M * C * es,
                 lambda: kd.p_sample_step_triton(mo.detach(), x_t, t, sched, noise, 1.0)),
        "loss_fwd": ("diffusion_loss fwd", 5 * M * C * es + 4 * M,
                     lambda: kd.diffusion_loss_triton(mo.detach(), x0, x_t, noise, t, sched)),
        "loss_bwd": ("diffusion_loss bwd", 7 * M * C * es + 4 * M,
                     lambda: torch.autograd.grad(loss, mo, g_row, retain_graph=True)),
    }  # fmt: skip
    rows = []
    for kind, configs in SWEEP.items():
        if kind not in kinds:
            continue
        name, nbytes, fn = cases[kind]
        d_rows, _, d_warps = kd._tile(kind, C)
        for rows_, warps in configs:
            kd.TUNE[kind] = (rows_, warps)
            tm = _bench(fn, quick)
            gbps = nbytes / (tm[0] * 1e-3) / 1e9
            rows.append(
                Row(name, f"invnext-triton rows={rows_} warps={warps}", "sweep", f"{M}x{C}", _dt(dtype),
                    tm[0], tm[1], tm[2], gbps, "GB/s", gbps / copy_gbps if copy_gbps else None,
                    extra={"minimal_bytes": nbytes, "default": (rows_, warps) == (d_rows, d_warps)})
            )  # fmt: skip
        kd.TUNE.pop(kind)
        print(f"sweep {kind}: default rows={d_rows} warps={d_warps}")
    return rows


BENCHMARKS = (*ELEMENT_OPS, "decoder_train_step", "p_sample_loop")


def main(name: str, argv: list[str] | None = None) -> int:
    """``bench_<name>``: an element op of :data:`ELEMENT_OPS` in bf16 and fp32, the decoder train step
    (``decoder_train_step``) or the sampler (``p_sample_loop``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short timings; sampler at 100 steps only")
    if name in SWEEP_KINDS:
        parser.add_argument("--sweep", action="store_true", help="also time alternative tile shapes (bf16)")
    args = parser.parse_args(argv)
    if not need_gpu(f"bench_{name}"):
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    copy_gbps = measured_peaks().get("copy_gbps", 0.0)
    rows: list[Row] = []
    if name in ELEMENT_OPS:
        for dtype in (torch.bfloat16, torch.float32):
            rows += bench_ops(dtype, args.quick, copy_gbps, (name,))
            torch.cuda.empty_cache()
    elif name == "decoder_train_step":
        rows += bench_train_step(args.quick)
    elif name == "p_sample_loop":
        rows += bench_sampler(args.quick)
    else:
        raise ValueError(f"unknown diffusion benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if getattr(args, "sweep", False):
        rows += bench_sweep(args.quick, copy_gbps, kinds=SWEEP_KINDS[name])
    path = write_results(f"bench_{name}" + ("_quick" if args.quick else ""), rows, notes="quick" if args.quick else "")
    print(markdown_table(rows, {"gpu": torch.cuda.get_device_name(0), "peaks": measured_peaks()}))
    print(f"written: {path}")
    return 0
