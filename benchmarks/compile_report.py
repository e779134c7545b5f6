"""What every kernel compiles to on Hopper, read without a GPU: registers, spills, shared memory
and the instructions that decide speed.

    python -m benchmarks.compile_report [--only attention tokens diffusion csrc] [--all-configs]
                                        [--arch 90a] [--out DIR]

Triton kernels: the real host launchers run on small CPU tensors with the interpreter off and
Triton's active driver replaced by an offline one that names an sm_90 target, so every launch
becomes a compile-only warmup with exactly the tile sizes, flags and (``--all-configs``) autotune
candidates a Hopper GPU would get. CUDA kernels (``csrc/``): nvcc for the same target. Each
binary then goes through ``ptxas -v`` (registers, spill bytes) and ``cuobjdump -sass``
(instruction mix). Run it with the Triton version the GPU machine has (for example in a venv with
``pip install triton==3.6.0``): a kernel that fails to compile there fails here, before a GPU
slot is spent on it.

What the columns mean for speed:
- ``spill``: bytes stored to / loaded from local memory per thread; non-zero in an inner loop
  usually costs more than a smaller tile would.
- ``ld128 / ld64 / ld32 / ld16`` (``st...`` alike): global loads (stores) by width in bits. A
  memory-bound kernel wants its data on 128-bit accesses; 64-bit and narrower ones need more
  instructions and more bytes in flight per SM for the same bandwidth.
- ``wgmma / mma``: Hopper warpgroup MMAs (``HGMMA``) against the older warp-level ``HMMA``; a
  bf16 attention kernel without ``HGMMA`` is capped well below the card's matmul peak.

- ``warps/SM``: how many warps of the kernel one multiprocessor holds at once, from registers,
  shared memory and warps per program against sm_90's limits (Triton kernels; csrc/ kernels set
  their block size at launch). Bandwidth-bound kernels need enough of them to keep bytes in flight.

Rows go to ``<out>/compile_<target>_triton-<version>_<date>.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("attention", "tokens", "diffusion", "csrc")


@dataclass
class KernelReport:
    group: str
    variant: str  # what the host asked for, e.g. "bf16 D=64 rope window"
    kernel: str
    config: str  # tile constexprs, warps, stages
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    sass: dict = field(default_factory=dict)
    error: str | None = None
    warps: int | None = None  # per program (Triton); unknown for csrc/ (set at launch)
    warps_per_sm: int | None = None  # resident on one sm_90 multiprocessor (resident_warps)


# sm_90 multiprocessor limits: 64K 32-bit registers (allocated per warp in units of 256), 228 KB
# of shared memory with 1 KB reserved per block, 64 warps, 32 blocks.
_SM90 = {"regs": 65536, "reg_unit": 256, "smem": 233472, "smem_per_block": 1024, "warps": 64, "blocks": 32}


def resident_warps(registers: int | None, warps: int | None, shared: int | None) -> int | None:
    """Warps of this kernel one sm_90 multiprocessor holds at once (occupancy = that / 64): what
    hides memory latency in a bandwidth-bound kernel."""
    if not registers or not warps:
        return None
    per_warp = -(-registers * 32 // _SM90["reg_unit"]) * _SM90["reg_unit"]
    blocks = min(_SM90["regs"] // (per_warp * warps), _SM90["smem"] // ((shared or 0) + _SM90["smem_per_block"]),
                 _SM90["blocks"], _SM90["warps"] // warps)
    return blocks * warps


# --------------------------------------------------------------------------- binary inspection
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_GLOBAL = re.compile(r"\b(LDG|STG)(?![A-Z])((?:\.[A-Z0-9_]+)*)")  # not LDGSTS (counted apart)


def _width(suffixes: str) -> int:
    for bits in ("128", "64", "16", "8"):
        if f".{bits}" in suffixes or f".U{bits}" in suffixes or f".S{bits}" in suffixes:
            return int(bits)
    return 32


def sass_mix(sass: str) -> dict:
    """Counts of global accesses by width, MMA kinds, async copies and local-memory traffic."""
    mix: dict[str, int] = {}
    for op, suffixes in _GLOBAL.findall(sass):
        key = f"{'ld' if op == 'LDG' else 'st'}{_width(suffixes)}"
        mix[key] = mix.get(key, 0) + 1
    counts = {
        "wgmma": r"\bHGMMA\b",
        "mma": r"\bHMMA\b",
        "ldgsts": r"\bLDGSTS\b",  # cp.async
        "tma": r"\bUTMALDG\b",
        "local": r"\b(?:LDL|STL)\b",
    }
    for key, pat in counts.items():
        n = len(re.findall(pat, sass))
        if n:
            mix[key] = n
    return mix


def _tool(name: str) -> str:
    """Triton's bundled copy of a CUDA tool (same version on every machine), else the PATH's."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else name


def ptxas_stats(ptx: str, arch: str) -> tuple[int | None, int | None, int | None, int | None]:
    """(registers, spill stores, spill loads, static smem) from ``ptxas -v``. Triton bundles two
    assemblers and newer releases emit PTX only the newer one (``ptxas-blackwell``) accepts."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        log = ""
        for tool in (_tool("ptxas"), _tool("ptxas-blackwell")):
            try:
                res = subprocess.run([tool, "-v", f"--gpu-name=sm_{arch}", str(src), "-o", str(Path(d) / "k.o")],
                                     capture_output=True, text=True, check=False)
            except OSError:
                continue
            log = res.stderr
            if res.returncode == 0:
                break
    return _parse_ptxas(log)


def _parse_ptxas(log: str):
    regs = _PTXAS_REGS.search(log)
    spill = _PTXAS_SPILL.search(log)
    smem = _PTXAS_SMEM.search(log)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None,
            int(spill.group(2)) if spill else None, int(smem.group(1)) if smem else None)


def cubin_sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=False)
    return res.stdout


# --------------------------------------------------------------------------- offline Triton
class _OfflineDriver:
    """Just enough of a Triton driver to compile for a named target with no GPU present."""

    def __init__(self, arch: str):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", int(arch.rstrip("a")), 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


class _Recorder:
    """Turns every JIT launch into a compile-only warmup and keeps what was compiled."""

    def __init__(self, all_configs: bool):
        self.all_configs = all_configs
        self.variant = ""
        self.group = ""
        self.compiled: list[tuple[str, str, str, object, dict]] = []
        self._seen: set[int] = set()

    @contextlib.contextmanager
    def installed(self, arch: str):
        import triton
        from triton.runtime import autotuner, jit
        from triton.runtime.driver import driver

        jit_run, tuner_run = jit.JITFunction.run, autotuner.Autotuner.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            kernel = jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
            if kernel is not None and id(kernel) not in recorder._seen:
                recorder._seen.add(id(kernel))
                meta = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
                recorder.compiled.append((recorder.group, recorder.variant, fn.fn.__name__, kernel, meta))
            return kernel

        def tune(tuner, *args, **kwargs):
            kwargs.pop("warmup", None)
            grid = kwargs.pop("grid", None)
            for cfg in tuner.configs if recorder.all_configs else tuner.configs[:1]:
                tuner.fn.run(*args, grid=grid, warmup=True, **kwargs, **cfg.all_kwargs())

        jit.JITFunction.run, autotuner.Autotuner.run = run, tune
        before = driver._active
        driver.set_active(_OfflineDriver(arch))
        try:
            yield triton
        finally:
            jit.JITFunction.run, autotuner.Autotuner.run = jit_run, tuner_run
            driver._active = before

    def reports(self, arch: str) -> list[KernelReport]:
        out = []
        for group, variant, name, kernel, meta in self.compiled:
            md = kernel.metadata
            warps, stages = getattr(md, "num_warps", meta.get("num_warps")), getattr(md, "num_stages", meta.get("num_stages"))
            tiles = " ".join(f"{k}={v}" for k, v in sorted(meta.items()) if k.startswith("BLOCK"))
            rep = KernelReport(group, variant, name, f"{tiles} w{warps} s{stages}".strip(),
                               shared_bytes=getattr(md, "shared", None))
            regs, st, ld, _ = ptxas_stats(kernel.asm["ptx"], arch)
            rep.registers, rep.spill_stores, rep.spill_loads = regs, st, ld
            rep.warps = warps
            rep.warps_per_sm = resident_warps(regs, warps, rep.shared_bytes)
            rep.sass = sass_mix(cubin_sass(kernel.asm["cubin"]))
            out.append(rep)
        return out


# --------------------------------------------------------------------------- what to compile
def _attention_cases(all_variants: bool):
    import torch

    dtypes = (torch.bfloat16, torch.float16, torch.float32) if all_variants else (torch.bfloat16, torch.float32)
    for dtype in dtypes:
        dims = (64, 88, 128) if dtype != torch.float32 else (64,)
        for d in (dims if not all_variants else (32, 64, 80, 88, 96, 128)):
            for rope in (False, True):
                for window in (False, True):
                    yield dtype, d, rope, window


def _varlen_cases(all_variants: bool):
    """(dtype, D, causal, window): the band variants of ``varlen_attention`` (GQA, cross lengths)."""
    import torch

    dtypes = (torch.bfloat16, torch.float16, torch.float32) if all_variants else (torch.bfloat16, torch.float32)
    for dtype in dtypes:
        for d in ((64, 128, 256) if dtype != torch.float32 else (64, 256)):
            yield dtype, d, False, (-1, -1)
            yield dtype, d, True, (-1, -1)
            yield dtype, d, False, (256, 64)


def compile_varlen(rec: _Recorder, all_variants: bool, matches: tuple[str, ...]) -> None:
    import torch
    from invnext_kernels.attention import varlen_attention_triton

    lq, lk = [1000, 37], [700, 1028]
    cq = torch.tensor([0, lq[0], sum(lq)], dtype=torch.int32)
    ck = torch.tensor([0, lk[0], sum(lk)], dtype=torch.int32)
    for dtype, d, causal, window in _varlen_cases(all_variants):
        name = str(dtype).replace("torch.", "")
        kind = "causal" if causal else ("local" if window != (-1, -1) else "full")
        rec.variant = f"{name} D={d} varlen {kind} gqa{' rope' if causal else ''}"
        if matches and not any(m in rec.variant for m in matches):
            continue
        q = torch.randn(sum(lq), 4, d, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(sum(lk), 2, d, dtype=dtype, requires_grad=True) for _ in range(2))
        right = 0 if causal else window[1]
        # the causal variant also rotates q and k from per-token tables (the RoPE pre-pass and its R^T)
        rope = None
        if causal:
            cos_q, sin_q = torch.randn(sum(lq), d), torch.randn(sum(lq), d)
            cos_k, sin_k = torch.randn(sum(lk), d), torch.randn(sum(lk), d)
            rope = (cos_q, sin_q, cos_k, sin_k, "rotate_half")
        out, _ = varlen_attention_triton(q, k, v, cq, ck, max(lq), max(lk), d**-0.5, window[0], right, rope)
        out.backward(torch.ones_like(out))


def compile_attention(rec: _Recorder, all_variants: bool, match: str | tuple[str, ...] = "") -> None:
    import torch
    from invnext_kernels.attention import masked_attention_triton

    matches = (match,) if isinstance(match, str) and match else tuple(m for m in match if m)

    lens = [1000, 1028]
    cu = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    coords = torch.cat([torch.stack(torch.meshgrid(torch.arange(8), torch.arange(12), torch.arange(12), indexing="ij"), -1)
                        .reshape(-1, 3)[:n] for n in lens]).to(torch.int32)
    heads = 2
    for dtype, d, rope, window in _attention_cases(all_variants):
        name = str(dtype).replace("torch.", "")
        rec.variant = f"{name} D={d}{' rope' if rope else ''}{' window' if window else ''}"
        if matches and not any(m in rec.variant for m in matches):
            continue
        total = sum(lens)
        qkv = torch.randn(total, 3, heads, d, dtype=dtype, requires_grad=True)
        q, k, v = qkv.unbind(1)
        sections = (d // 4 // 2 * 2, d // 4 // 2 * 2 + 2, d // 4 // 2 * 2 - 2) if d >= 32 else (4, 4, 4)
        out = masked_attention_triton(q, k, v, cu, max(lens), d**-0.5, coords,
                               (10000.0, sections) if rope else None, (3, 5, 5) if window else None, 1)
        out.backward(torch.ones_like(out))
    compile_varlen(rec, all_variants, matches)


def compile_tokens(rec: _Recorder, dtypes=None) -> None:
    import torch
    from invnext_kernels.tokens import gather_visible_triton, scatter_tokens_triton

    B, N, C, P = 2, 512, 768, 1
    keep = torch.rand(B, N).argsort(1)[:, : N // 5].sort(1).values
    index = torch.cat([torch.cat([torch.tensor([-1] * P), b * N + keep[b]]) for b in range(B)])
    cu = torch.arange(0, (B + 1) * (P + N // 5), P + N // 5, dtype=torch.int32)
    for dtype in dtypes or (torch.bfloat16, torch.float32):
        name = str(dtype).replace("torch.", "")
        rec.variant = f"{name} C={C} pos prefix"
        x = torch.randn(B, N, C, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, N, C, dtype=dtype, requires_grad=True)
        prefix = torch.randn(1, P, C, dtype=dtype, requires_grad=True)
        packed = gather_visible_triton(x, index, cu, pos, prefix)
        packed.backward(torch.ones_like(packed))
        rec.variant = f"{name} C={C} mask token pos"
        rows = torch.randn(index.shape[0], C, dtype=dtype, requires_grad=True)
        token = torch.randn(C, dtype=dtype, requires_grad=True)
        grid = scatter_tokens_triton(rows, index, token, pos, B, N)
        grid.backward(torch.ones_like(grid))


def compile_diffusion(rec: _Recorder, dtypes=None, rows: int = 1000) -> None:
    import torch
    from invnext_kernels import diffusion as kd

    from invnext.ops.diffusion_schedule import make_schedule

    M, C, W = rows, 588, 1536
    sched = make_schedule(1000)
    t = torch.randint(0, 1000, (M,))
    for dtype in dtypes or (torch.bfloat16, torch.float32):
        name = str(dtype).replace("torch.", "")
        rec.variant = f"{name} M={M} C={C}"
        x0 = torch.randn(M, C, dtype=dtype, requires_grad=True)
        noise = torch.randn(M, C, dtype=dtype, requires_grad=True)
        kd.q_sample_triton(x0, noise, t, sched).backward(torch.ones(M, C, dtype=dtype))
        mo = torch.randn(M, 2 * C, dtype=dtype, requires_grad=True)
        xt = torch.randn(M, C, dtype=dtype)
        kd.diffusion_loss_triton(mo, x0.detach(), xt, noise.detach(), t, sched).sum().backward()
        with torch.no_grad():
            kd.p_sample_step_triton(mo, xt, t, sched, noise, 1.0)
            kd.ddim_step_triton(mo, xt, t, sched, noise, 0.5)
        rec.variant = f"{name} M={M} W={W}"
        x = torch.randn(M, W, dtype=dtype, requires_grad=True)
        shift = torch.randn(M, W, dtype=dtype, requires_grad=True)
        scale = torch.randn(M, W, dtype=dtype, requires_grad=True)
        kd.adaln_modulate_triton(x, shift, scale, 1e-6).backward(torch.ones(M, W, dtype=dtype))


# ``--quick``: one variant per kernel family, the one that exercises the most code (CI's check
# that every kernel still builds for the GPU, a minute or two on a 2-core CPU).
QUICK_ATTENTION = ("bfloat16 D=64 rope window", "bfloat16 D=64 varlen causal gqa")


def compile_triton(groups, arch: str, all_configs: bool, all_variants: bool, match: str = "",
                   quick: bool = False) -> list[KernelReport]:
    os.environ["TRITON_INTERPRET"] = "0"
    from invnext._kernels_path import ensure_kernels_importable

    ensure_kernels_importable()
    os.environ["INVNEXT_ATTN_AUTOTUNE"] = "1"  # through the autotuner, so --all-configs sees every candidate
    rec = _Recorder(all_configs)
    import torch

    bf16 = (torch.bfloat16,) if quick else None
    steps = {
        "attention": lambda: compile_attention(rec, all_variants, QUICK_ATTENTION if quick else match),
        "tokens": lambda: compile_tokens(rec, bf16),
        # an odd row count in --quick: the paired-row kernels and the row kernel for the last row
        "diffusion": lambda: compile_diffusion(rec, bf16, 999 if quick else 1000),
    }
    errors = []
    with rec.installed(arch):
        for group in groups:
            if group not in steps:
                continue
            rec.group = group
            try:
                steps[group]()
            except Exception as exc:  # noqa: BLE001  (a compile failure is a finding: report it, go on)
                errors.append(KernelReport(group, rec.variant, "?", "", error=f"{type(exc).__name__}: {exc}"[:2000]))
                print(f"[{group}] {rec.variant}: {type(exc).__name__}: {str(exc)[:400]}", file=sys.stderr)
    return rec.reports(arch) + errors


# --------------------------------------------------------------------------- CUDA (csrc/)
_NVCC_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_\w+'")


def compile_csrc(arch: str) -> list[KernelReport]:
    """Every ``csrc/*.cu`` through nvcc for ``sm_<arch>`` with ptxas's per-kernel report."""
    import shutil

    if shutil.which("nvcc") is None:
        return [KernelReport("csrc", "*.cu", "?", "", error="nvcc not found on PATH: csrc/ not compiled")]
    reports = []
    for cu in sorted((ROOT / "csrc").glob("*.cu")):
        with tempfile.TemporaryDirectory() as d:
            cubin = Path(d) / "k.cubin"
            res = subprocess.run(["nvcc", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                                  "-cubin", "-Xptxas", "-v", "-I", str(ROOT / "csrc"), str(cu), "-o", str(cubin)],
                                 capture_output=True, text=True, check=False)
            if res.returncode != 0:
                reports.append(KernelReport("csrc", cu.name, "?", "", error=res.stderr[-2000:]))
                continue
            sass = cubin_sass(cubin.read_bytes())
        # ptxas prints one block per entry: split the log and the SASS per function
        blocks = re.split(r"(?=ptxas info\s+: Compiling entry function)", res.stderr)
        funcs = re.split(r"\n\s*Function : ", sass)
        by_name = {f.split("\n", 1)[0].strip(): f for f in funcs[1:]}
        for block in blocks:
            m = _NVCC_ENTRY.search(block)
            if not m:
                continue
            mangled = m.group(1)
            regs, st, ld, smem = _parse_ptxas(block)
            rep = KernelReport("csrc", cu.name, _demangle(mangled), "", regs, st, ld, smem)
            rep.sass = sass_mix(by_name.get(mangled, ""))
            reports.append(rep)
    return reports


def _demangle(name: str) -> str:
    try:
        res = subprocess.run(["c++filt", name], capture_output=True, text=True, check=False)
        full = res.stdout.strip() or name
    except OSError:
        full = name
    return full.split("(")[0][:120]


# --------------------------------------------------------------------------- output
def _fmt_mix(mix: dict) -> str:
    keys = [k for k in ("ld128", "ld64", "ld32", "ld16", "ld8", "st128", "st64", "st32", "st16", "st8",
                        "wgmma", "mma", "ldgsts", "tma", "local") if k in mix]
    return " ".join(f"{k}:{mix[k]}" for k in keys)


def render(reports: list[KernelReport], header: str) -> str:
    lines = [header, "",
             "| group | variant | kernel | config | regs | spill st/ld (B) | smem (B) | warps/SM | SASS mix |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        if r.error:
            lines.append(f"| {r.group} | {r.variant} | {r.kernel} | | | | | | **failed**: {r.error.splitlines()[0][:200]} |")
            continue
        spill = f"{r.spill_stores}/{r.spill_loads}" if r.spill_stores is not None else ""
        occ = f"{r.warps_per_sm} ({r.warps_per_sm / _SM90['warps']:.0%})" if r.warps_per_sm else ""
        lines.append(f"| {r.group} | {r.variant} | {r.kernel} | {r.config} | {r.registers} | {spill} | "
                     f"{r.shared_bytes if r.shared_bytes is not None else ''} | {occ} | {_fmt_mix(r.sass)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS))
    ap.add_argument("--all-configs", action="store_true", help="every autotune candidate, not only the first")
    ap.add_argument("--all-variants", action="store_true", help="every attention dtype and head dim")
    ap.add_argument("--match", default="", help="only attention variants whose label contains this, e.g. 'D=88 rope'")
    ap.add_argument("--quick", action="store_true",
                    help=f"one variant per family ({', '.join(QUICK_ATTENTION)}, bf16 tokens "
                    "and diffusion); exits 1 if any kernel fails to build")
    ap.add_argument("--arch", default="90a")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))

    import triton

    reports = compile_triton([g for g in args.only if g != "csrc"], args.arch, args.all_configs, args.all_variants,
                             args.match, args.quick)
    if "csrc" in args.only:
        reports += compile_csrc(args.arch)
    date = _dt.date.today().isoformat()
    stem = f"compile_sm{args.arch}_triton-{triton.__version__}_{date}{'_quick' if args.quick else ''}"
    header = (f"# Kernels compiled for sm_{args.arch}, Triton {triton.__version__}, {date}\n\n"
              f"Static: no GPU ran these (`python -m benchmarks.compile_report`). Registers and spills from "
              f"ptxas -v; warps/SM: resident warps per sm_90 multiprocessor (of 64) from registers, shared memory "
              f"and warps per program; the SASS mix from cuobjdump (ldN/stN: global accesses N bits wide; "
              f"wgmma: HGMMA; mma: HMMA; local: local-memory instructions).")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps([asdict(r) for r in reports], indent=1))
    table = render(reports, header)
    (args.out / f"{stem}.md").write_text(table)
    print(table)
    failed = [r for r in reports if r.error]
    print(f"compile_report: {len(reports) - len(failed)} kernels compiled, {len(failed)} failed -> {args.out / stem}.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
