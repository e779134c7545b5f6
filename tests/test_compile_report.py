"""benchmarks/compile_report.py: sm_90 builds read without a GPU.

The parsers are checked on fixed ptxas / cuobjdump text; one real kernel goes through the whole
path (offline driver, compile-only launch, ptxas, cuobjdump) in a subprocess with the
interpreter off, since this test process runs Triton under the interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks.compile_report import KernelReport, _parse_ptxas, render, resident_warps, sass_mix

ROOT = Path(__file__).resolve().parent.parent

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'attn_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for attn_fwd_kernel
    728 bytes stack frame, 728 bytes spill stores, 1212 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 544 bytes cmem[0]
"""

SASS = """
        /*0100*/                   LDG.E.128.CONSTANT R4, desc[UR6][R2.64] ;
        /*0110*/                   LDG.E.64 R8, desc[UR6][R2.64+0x10] ;
        /*0120*/                   LDG.E R10, desc[UR6][R2.64+0x20] ;
        /*0130*/                   LDG.E.U16 R11, desc[UR6][R2.64+0x30] ;
        /*0140*/                   STG.E.128 desc[UR6][R12.64], R4 ;
        /*0150*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0160*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR6][R14.64] ;
        /*0170*/                   STL [R1+0x8], R5 ;
        /*0180*/                   LDL R6, [R1+0x8] ;
"""


def test_ptxas_log_is_parsed():
    assert _parse_ptxas(PTXAS_LOG) == (255, 728, 1212, 1024)
    assert _parse_ptxas("garbage") == (None, None, None, None)


def test_sass_mix_counts_widths_and_kinds():
    mix = sass_mix(SASS)
    assert mix == {"ld128": 1, "ld64": 1, "ld32": 1, "ld16": 1, "st128": 1, "wgmma": 1, "ldgsts": 1, "local": 2}


def test_resident_warps_follow_sm90_limits():
    assert resident_warps(255, 8, 65536) == 8  # registers: one 8-warp program
    assert resident_warps(32, 4, 0) == 64  # the 64-warp ceiling
    assert resident_warps(40, 4, 0) == 48  # 40 regs -> 1280 a warp (256-register units): 12 programs
    assert resident_warps(32, 4, 100_000) == 8  # shared memory: two programs
    assert resident_warps(16, 1, 0) == 32  # the 32-program ceiling
    assert resident_warps(None, 4, 0) is None


def test_render_marks_failures():
    ok = KernelReport("g", "v", "k", "w4 s3", 40, 0, 0, 0, {"ld128": 2}, warps=4, warps_per_sm=48)
    bad = KernelReport("g", "v2", "?", "", error="CompilationError: boom\nmore")
    table = render([ok, bad], "# head")
    assert "| g | v | k | w4 s3 | 40 | 0/0 | 0 | 48 (75%) | ld128:2 |" in table
    assert "**failed**: CompilationError: boom |" in table


def test_one_kernel_compiles_for_sm90_without_a_gpu(tmp_path):
    script = textwrap.dedent(
        """
        import json, os, sys
        sys.path.insert(0, os.getcwd())
        os.environ["TRITON_INTERPRET"] = "0"
        from invnext._kernels_path import ensure_kernels_importable
        ensure_kernels_importable()
        import torch
        from benchmarks.compile_report import _Recorder
        rec = _Recorder(all_configs=False)
        with rec.installed("90a"):
            from invnext_kernels.tokens import _inverse_map
            _inverse_map(torch.zeros(100, dtype=torch.int64), 200)
        print(json.dumps([r.__dict__ for r in rec.reports("90a")]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    (report,) = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["kernel"] == "_invert_index_kernel" and report["error"] is None
    assert report["registers"] and report["registers"] > 0
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0
    assert report["sass"].get("st32", 0) > 0  # the scatter of row ids


def test_every_kernel_family_builds_for_sm90(tmp_path):
    """CI's guard for what the interpreter cannot see: each Triton kernel family (attention with
    RoPE and a window, tokens, the diffusion kernels on paired and single rows) compiles for sm_90a
    with the installed Triton, the bf16 attention matmuls land on HGMMA without large spills, and
    the paired diffusion tiles keep their 16-byte accesses."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "benchmarks.compile_report", "--quick", "--only", "attention", "tokens", "diffusion",
           "--out", str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    (path,) = tmp_path.glob("compile_sm90a_*_quick.json")
    reports = json.loads(path.read_text())
    assert not [r for r in reports if r["error"]]
    kernels = {(r["group"], r["kernel"]) for r in reports}
    for name in ("attn_rope_kernel", "attn_fwd_kernel", "attn_bwd_delta_kernel", "attn_bwd_dkdv_kernel",
                 "attn_bwd_dq_kernel"):
        assert ("attention", name) in kernels, name
    for r in reports:
        if r["kernel"] in ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"):
            assert r["sass"].get("wgmma", 0) > 0, r
            assert r["spill_stores"] <= 64, r  # the in-loop RoPE spilled 488-3656 bytes
    q_sample = [r for r in reports if r["kernel"] == "q_sample_fwd_kernel"]
    assert len(q_sample) == 2  # 999 rows: 499 pairs, then the last row alone
    assert max(r["sass"].get("ld128", 0) for r in q_sample) > 0
