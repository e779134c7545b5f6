"""The CuPy/NVRTC launchers (``invnext.native._cupy``) against the kernels' PTX signatures.

CuPy packs each kernel argument by its numpy type, so an argument of the wrong width shifts
every argument after it, and only a GPU would show it. Here a recording stand-in for CuPy
runs every launcher of :class:`CupyKernels`, and each launch is checked against the kernel's
``.entry`` in the PTX that nvcc makes of the very text NVRTC compiles: the kernel exists and
takes as many parameters as the launch passes, each as wide; blocks hold 32..1024 threads,
grids are non-empty and dynamic shared memory stays under 48 KiB.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import types

import numpy as np
import pytest

from invnext.native import _cupy

_PTR = 1 << 20  # a 16-byte aligned stand-in address; the launchers never dereference it
_WIDTH = {"u8": 1, "s8": 1, "b8": 1, "u16": 2, "s16": 2, "b16": 2, "f16": 2, "u32": 4, "s32": 4, "b32": 4, "f32": 4,
          "u64": 8, "s64": 8, "b64": 8, "f64": 8}  # fmt: skip


@pytest.fixture(scope="module")
def ptx_params(tmp_path_factory) -> dict[str, list[int]]:
    """kernel name -> parameter widths in bytes, from nvcc's PTX of both NVRTC sources."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    tmp = tmp_path_factory.mktemp("cupy_ptx")
    sources = {"tokens": _cupy.kernel_source().read_text(), "masks": _cupy.mask_source_text()}
    procs = []
    for name, text in sources.items():
        (tmp / f"{name}.cu").write_text(text)
        cmd = [nvcc, "-std=c++17", "--ptx", "-arch=compute_80", f"{name}.cu", "-o", f"{name}.ptx"]
        procs.append(subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    params = {}
    for name in sources:
        for entry, body in re.findall(r"\.entry\s+(\w+)\s*\((.*?)\)", (tmp / f"{name}.ptx").read_text(), re.S):
            params[entry] = [_WIDTH[t] for t in re.findall(r"\.param\s+(?:\.align\s+\d+\s+)?\.(\w+)", body)]
    return params


class _Recorder:
    """A stand-in for the parts of CuPy that CupyKernels uses; every launch lands in ``log``."""

    def __init__(self):
        self.log: list[tuple] = []
        recorder = self

        class RawModule:
            def __init__(self, code, options=()):
                self.code = code

            def get_function(self, name):
                def launch(grid, block, args, shared_mem=0):
                    recorder.log.append((name, tuple(grid), tuple(block), tuple(args), shared_mem))

                return launch

        runtime = types.SimpleNamespace(memsetAsync=lambda *a: None, CUDARuntimeError=RuntimeError)
        self.module = types.SimpleNamespace(
            RawModule=RawModule,
            cuda=types.SimpleNamespace(ExternalStream=lambda ptr: contextlib.nullcontext(), runtime=runtime),
        )


@pytest.fixture
def recorded(monkeypatch):
    rec = _Recorder()
    monkeypatch.setitem(__import__("sys").modules, "cupy", rec.module)
    return _cupy.CupyKernels(), rec.log


def _drive_every_launcher(k: _cupy.CupyKernels) -> None:
    p, s = _PTR, 7  # pointer, stream
    for dtype in range(4):
        for C in (768, 13):  # 16-byte vectors and scalar rows
            assert k.gather_visible_forward(p, p, p, p, p, p, 100, 3, 64, C, 1, 3, 2, dtype, s) == 0
            assert k.gather_visible_forward(p, p, p, p, 0, 0, 100, 3, 64, C, 1, 1, 0, dtype, s) == 0
            assert k.gather_visible_backward(p, p, p, p, p, p, 100, 3, 64, C, 1, 2, dtype, s) == 0
            assert k.scatter_tokens_forward(p, p, p, p, p, p, 100, 3, 64, C, 3, dtype, s) == 0
            assert k.scatter_tokens_forward(p, p, p, p, p, 0, 100, 3, 64, C, 1, dtype, s) == 0
            assert k.scatter_tokens_backward(p, p, p, p, p, 100, 3, 64, C, 256, dtype, s) == 0
            assert k.sum_batch(p, p, 3, 64, C, dtype, s) == 0
    assert k.tube_mask(p, p, 4, 8, 16, 16, 200, 5, 1, s) == 0
    assert k.tube_mask(p, 0, 4, 8, 16, 16, 200, 5, 0, s) == 0
    assert k.multiblock_mask(p, p, p, 14, 32, 16, 16, 8, 4, s) == 0
    for mode in (0, 1):
        for dtype in range(4):
            assert k.semantic_mask(p, p, p, 16, 16, 256, 51, mode, dtype, 3, 4, s) == 0


def _mismatches(log, ptx_params) -> list[str]:
    problems = []
    for name, grid, block, args, shared in log:
        if name not in ptx_params:
            problems.append(f"{name}: no such kernel in the NVRTC source")
            continue
        widths = [np.asarray(a).dtype.itemsize for a in args]
        if widths != ptx_params[name]:
            problems.append(f"{name}: launched with widths {widths}, the kernel takes {ptx_params[name]}")
        if not (32 <= int(np.prod(block)) <= 1024 and all(g >= 1 for g in grid)):
            problems.append(f"{name}: grid {grid}, block {block}")
        if not 0 <= shared <= 48 * 1024:
            problems.append(f"{name}: {shared} bytes of dynamic shared memory")
    return problems


def _kind(name: str) -> str:
    return re.sub(r"_(f32|f16|bf16|f64)(_v\d+)?$", "", name)


def test_every_launch_matches_its_kernel_signature(recorded, ptx_params):
    kernels, log = recorded
    _drive_every_launcher(kernels)
    assert {_kind(name) for name, *_ in log} == {_kind(n) for n in ptx_params}  # every kernel kind is launched
    assert _mismatches(log, ptx_params) == []


def test_a_wrong_width_is_caught(recorded, ptx_params, monkeypatch):
    """The check can fail: with 32-bit ints where the kernels take 64-bit ones, it reports them."""
    kernels, log = recorded
    monkeypatch.setattr(_cupy, "_i", np.int32)
    _drive_every_launcher(kernels)
    assert any("launched with widths" in m for m in _mismatches(log, ptx_params))
