"""The native CUDA chain: csrc/ kernels -> C API -> invnext.native loader -> invnext.native.ops.

CPU tests check the loader's reasons (it never raises, and loads nothing at import), the
install-time build decision of setup.py, that the CUDA sources stay torch-free and
consistent with the Python side, and (through a ctypes emulation of the C API over the raw
pointers) that the launchers pass the arguments and buffers the header documents.
``requires_cuda`` tests here check the plumbing (error codes, streams, the public ops on the
cuda backend); each op's comparison, forward and every gradient, bit for bit against a float64
torch formulation rounded once, for the compiled extension and the CuPy/NVRTC path, is in
test_gather_visible_cuda.py and test_scatter_tokens_cuda.py (with the helpers here).

Exactness: forward values are single adds of two values of the dtype (exact in fp32, so the
kernel's fp32 add rounded once equals float64 rounded once); upstream gradients lie on the
grid k/64 (|k| <= 128), so every sum a backward forms is exact in fp32 and the only rounding
is the final one, in kernel and reference alike.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import math
import re
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from invnext import native
from invnext.native.c_api import c_function

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader with no cached answer and no source override; restored afterwards."""
    monkeypatch.delenv(native.SOURCE_ENV, raising=False)
    native._reset()
    yield native
    native._reset()


def _fake_extension(runtime_info, abi=native.ABI) -> types.ModuleType:
    mod = types.ModuleType("invnext.native._C")
    mod.abi_version = lambda: abi
    mod.runtime_info = lambda: runtime_info
    mod.error_string = lambda code: f"error {code}"
    return mod


class _FailingFinder(importlib.abc.MetaPathFinder):
    def __init__(self, name: str, message: str) -> None:
        self.name, self.message = name, message

    def find_spec(self, fullname, path=None, target=None):
        # Other modules (returning None): the normal finders look next.
        if fullname == self.name:
            raise ImportError(self.message)


# ----------------------------------------------------------------------------- loader (CPU)


def test_import_loads_nothing():
    code = (
        "import sys, invnext.native as n\n"
        "bad = [m for m in ('torch', 'cupy', 'invnext.native._C', 'invnext.native.ops') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr


def test_reason_when_not_built_and_no_cupy(fresh_loader, monkeypatch):
    monkeypatch.setitem(sys.modules, "invnext.native._C", None)
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert native.unavailable_reason() == (
        "not built (installed without nvcc or with INVNEXT_SKIP_CUDA_BUILD=1); "
        "the run-time NVRTC path is unavailable too: cupy is not installed"
    )
    assert native.source() is None
    with pytest.raises(RuntimeError, match="not built"):
        native.kernels()


def test_reason_when_extension_fails_to_load(fresh_loader, monkeypatch):
    monkeypatch.delitem(sys.modules, "invnext.native._C", raising=False)
    failing = _FailingFinder("invnext.native._C", "undefined symbol: cudaFoo")
    monkeypatch.setattr(sys, "meta_path", [failing, *sys.meta_path])
    monkeypatch.setenv(native.SOURCE_ENV, "compiled")
    assert native.unavailable_reason() == "the compiled extension failed to load: undefined symbol: cudaFoo"


@pytest.mark.parametrize(
    "info, expected",
    [
        ((0, 13000, 13000, 0), "no CUDA GPU visible"),
        ((35, 13000, 0, 0), "no CUDA GPU visible"),
        ((100, 13000, 13000, 0), "no CUDA GPU visible"),
        (
            (35, 13000, 12040, 0),
            (
                "the CUDA driver (12.4) is older than the CUDA runtime the extension was built with (13.0); "
                "update the driver or rebuild with an older CUDA toolkit"
            ),
        ),
        ((3, 13000, 13000, 0), "the CUDA runtime cannot start: error 3"),
    ],
    ids=["no-device", "no-driver", "error-no-device", "old-driver", "other-error"],
)
def test_reason_from_runtime_info(fresh_loader, monkeypatch, info, expected):
    monkeypatch.setitem(sys.modules, "invnext.native._C", _fake_extension(info))
    monkeypatch.setenv(native.SOURCE_ENV, "compiled")
    assert native.unavailable_reason() == expected
    assert native.source() is None


def test_usable_extension_is_the_compiled_source(fresh_loader, monkeypatch):
    fake = _fake_extension((0, 13000, 13000, 2))
    monkeypatch.setitem(sys.modules, "invnext.native._C", fake)
    assert native.unavailable_reason() is None
    assert native.source() == "compiled"
    assert native.kernels() is fake


def test_stale_extension_is_refused(fresh_loader, monkeypatch):
    monkeypatch.setitem(sys.modules, "invnext.native._C", _fake_extension((0, 13000, 13000, 1), abi=native.ABI + 1))
    monkeypatch.setenv(native.SOURCE_ENV, "compiled")
    assert "stale" in native.unavailable_reason()


def test_source_override(fresh_loader, monkeypatch):
    monkeypatch.setitem(sys.modules, "invnext.native._C", _fake_extension((0, 13000, 13000, 1)))
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setenv(native.SOURCE_ENV, "cupy")  # skips the (working) extension
    assert native.unavailable_reason() == "cupy is not installed"
    native._reset()
    monkeypatch.setenv(native.SOURCE_ENV, "nvrtc")
    assert native.unavailable_reason() == "INVNEXT_NATIVE_SOURCE must be 'auto', 'compiled' or 'cupy', got 'nvrtc'"


def test_ops_refuse_cpu_tensors():
    # The public ops refuse them before the CUDA entries are reached (dispatch: the backend is unavailable).
    from invnext.ops import tokens
    from invnext.ops._dispatch import BackendUnavailableError

    x = torch.zeros(1, 4, 8)
    hidden = torch.tensor([[False, True, False, True]])
    index = torch.tensor([0, 2])
    cuda_needs_cuda = "backend 'cuda' is unavailable: the CUDA kernels need CUDA tensors"
    with pytest.raises(BackendUnavailableError, match=f"gather_visible: {cuda_needs_cuda}"):
        tokens.gather_visible(x, hidden, backend="cuda")
    with pytest.raises(BackendUnavailableError, match=f"scatter_tokens: {cuda_needs_cuda}"):
        tokens.scatter_tokens(torch.zeros(2, 8), index, torch.zeros(8), None, 4, batch_size=1, backend="cuda")


class _EmulatedTokenLib:
    """The token half of the C API (csrc/invnext_native.h) in Python over raw pointers (ctypes):
    each function reads its inputs at the pointers and with the shapes the header documents,
    and writes what the header says it writes, in plain torch."""

    _DT = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64}

    @staticmethod
    def _read(ptr, shape, dtype):
        import ctypes

        count = math.prod(shape)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        raw = bytearray((ctypes.c_uint8 * nbytes).from_address(ptr)) if count else bytearray()
        return torch.frombuffer(raw, dtype=dtype).clone().view(shape) if count else torch.empty(shape, dtype=dtype)

    @staticmethod
    def _write(ptr, t):
        import ctypes

        t = t.contiguous()  # held: memmove reads it after data_ptr()
        ctypes.memmove(ptr, t.data_ptr(), t.numel() * t.element_size())

    # Argument lists from invnext.native.c_api (the header's, as data); ``a`` holds their values.

    @c_function
    def gather_visible_forward(self, a):
        from invnext.ops.tokens import gather_visible_reference

        dt, B, N, C = self._DT[a.dtype], a.B, a.N, a.C
        args = (
            self._read(a.x, (B, N, C), dt),
            self._read(a.index, (a.total,), torch.int64),
            self._read(a.cu_seqlens, (B + 1,), torch.int32),
            self._read(a.pos, (a.Bp, N, C), dt) if a.pos else None,
            self._read(a.prefix, (a.Bq, a.P, C), dt) if a.prefix else None,
        )  # fmt: skip
        self._write(a.out, gather_visible_reference(*args))
        return 0

    @c_function
    def gather_visible_backward(self, a):
        dt, B, N, C, P = self._DT[a.dtype], a.B, a.N, a.C, a.P
        g = self._read(a.grad, (a.total, C), dt)
        idx = self._read(a.index, (a.total,), torch.int64)
        if a.dx:
            d = torch.zeros(B * N, C, dtype=dt)
            d[idx[idx >= 0]] = g[idx >= 0]
            self._write(a.dx, d)
        if a.dprefix:
            starts = self._read(a.cu_seqlens, (B + 1,), torch.int32)[:-1].long()
            rows = g[(starts[:, None] + torch.arange(P)).reshape(-1)].view(B, P, C)
            acc = torch.float64 if dt == torch.float64 else torch.float32
            self._write(a.dprefix, rows if a.Bq == B else rows.to(acc).sum(0, keepdim=True).to(dt))
        return 0

    @c_function
    def scatter_tokens_forward(self, a):
        from invnext.ops.tokens import scatter_tokens_reference

        dt, B, N, C, total = self._DT[a.dtype], a.B, a.N, a.C, a.total
        idx = self._read(a.index, (total,), torch.int64)
        args = (self._read(a.packed, (total, C), dt), idx, self._read(a.mask_token, (C,), dt),
                self._read(a.pos, (a.Bp, N, C), dt) if a.pos else None, B, N)  # fmt: skip
        self._write(a.out, scatter_tokens_reference(*args))
        where = torch.full((B * N,), -1, dtype=torch.int32)
        where[idx[idx >= 0]] = torch.arange(total, dtype=torch.int32)[idx >= 0]
        self._write(a.inv, where)
        return 0

    @c_function
    def scatter_tokens_backward(self, a):
        dt, B, N, C, total, chunk_rows = self._DT[a.dtype], a.B, a.N, a.C, a.total, a.chunk_rows
        g = self._read(a.grad, (B * N, C), dt)
        idx = self._read(a.index, (total,), torch.int64)
        if a.dpacked:
            d = torch.zeros(total, C, dtype=dt)
            d[idx >= 0] = g[idx[idx >= 0]]
            self._write(a.dpacked, d)
        if a.partial:
            acc = torch.float64 if dt == torch.float64 else torch.float32
            unfilled = (self._read(a.inv, (B * N,), torch.int32) < 0)[:, None]
            chunks = -(-(B * N) // chunk_rows)
            padded = torch.zeros(chunks * chunk_rows, C, dtype=acc)
            padded[: B * N] = torch.where(unfilled, g.to(acc), 0)
            self._write(a.partial, padded.view(chunks, chunk_rows, C).sum(1))
        return 0

    @c_function
    def sum_batch(self, a):
        dt = self._DT[a.dtype]
        acc = torch.float64 if dt == torch.float64 else torch.float32
        self._write(a.out, self._read(a.inp, (a.B, a.M, a.C), dt).to(acc).sum(0).to(dt))
        return 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("pos_batch, prefix_batch", [(1, 3), (3, 1), (None, 3)])
def test_token_launchers_pass_what_the_c_api_reads(monkeypatch, dtype, pos_batch, prefix_batch):
    """invnext.native.ops' launchers hand the C API its arguments in the header's order, with
    the buffers it documents: an emulation of the C API over the same pointers gives the
    reference forward and gradients (through the launchers' own sum_batch and partial sums)."""
    from invnext.native import ops as nops
    from invnext.ops.tokens import gather_visible_reference, scatter_tokens_reference, packed_structure

    monkeypatch.setattr(native, "kernels", lambda: _EmulatedTokenLib())
    monkeypatch.setattr(nops, "_on", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(nops, "_stream", lambda device: 0)
    monkeypatch.setattr(nops, "_CHUNK_ROWS", 7)  # several partial rows, the last one short
    torch.manual_seed(0)
    B, N, C, P = 3, 10, 8, 2
    hidden = torch.rand(B, N) < 0.5
    hidden[2] = True  # a sample with only its prefix
    cu, _, index = packed_structure(hidden, P)
    total = index.shape[0]
    x = torch.randn(B, N, C).to(dtype)
    pos = torch.randn(pos_batch, N, C).to(dtype) if pos_batch else None
    prefix = torch.randn(prefix_batch, P, C).to(dtype)

    out = nops._gather_forward(x, index, cu, pos, prefix)
    assert torch.equal(out, gather_visible_reference(x, index, cu, pos, prefix))
    grad = torch.randn(total, C).to(dtype)
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, pos, prefix)]
    inputs = [t for t in leaves if t is not None]
    want = torch.autograd.grad(gather_visible_reference(leaves[0], index, cu, *leaves[1:]), inputs, grad)
    need_pos = pos is not None
    batches = (pos_batch or 1, prefix.shape[0])
    dx, dpos, dprefix = nops._gather_backward(grad, index, cu, B, N, *batches, P, True, need_pos, True)
    got = [dx] + ([dpos] if pos is not None else []) + [dprefix]
    for name, g, w in zip(("dx", "dpos", "dprefix") if pos is not None else ("dx", "dprefix"), got, want):
        torch.testing.assert_close(g, w, msg=name)

    mask_token = torch.randn(C).to(dtype)
    grid, inv = nops._scatter_forward(out, index, mask_token, pos, B, N)
    assert torch.equal(grid, scatter_tokens_reference(out, index, mask_token, pos, B, N))
    g2 = torch.randn(B, N, C).to(dtype)
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (out, mask_token, pos)]
    inputs = [t for t in leaves if t is not None]
    want = torch.autograd.grad(scatter_tokens_reference(leaves[0], index, leaves[1], leaves[2], B, N), inputs, g2)
    sum_pos = pos is not None and pos.shape[0] == 1
    dpacked, dmask, dpos = nops._scatter_backward(g2, index, inv, True, True, sum_pos)
    torch.testing.assert_close(dpacked, want[0])
    torch.testing.assert_close(dmask, want[1])
    if sum_pos:
        torch.testing.assert_close(dpos, want[2])


# ----------------------------------------------------------------------------- sources (CPU)


def test_cuda_sources_are_torch_free():
    files = sorted(CSRC.glob("*"))
    assert {f.name for f in files} >= {"token_kernels.cuh", "token_ops.cu", "invnext_native.h", "bindings.cpp"}
    for f in files:
        text = f.read_text()
        includes = re.findall(r"#include\s*[<\"]([^>\"]+)", text)
        assert not [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "Python.h")], (f.name, includes)
        assert not re.search(r"\b(torch|at|c10)::", text), f"{f.name} uses a torch namespace"
        if f.name != "bindings.cpp":
            assert not any(i.startswith("pybind11") for i in includes), f"{f.name} includes pybind11"
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert not re.search(r"find_package\(\s*Torch", cmake)


def test_kernel_header_is_nvrtc_compatible():
    text = (CSRC / "token_kernels.cuh").read_text()
    assert set(re.findall(r"#include\s*[<\"]([^>\"]+)", text)) == {"cuda_fp16.h", "cuda_bf16.h"}
    for host_only in ("<<<", "cudaMalloc", "cudaMemset", "cudaStream", "__host__", "std::"):
        assert host_only not in text, f"token_kernels.cuh contains host code ({host_only})"


def test_python_side_matches_the_c_api():
    from invnext.native import _cupy, ops

    header = (CSRC / "invnext_native.h").read_text()
    codes = {name: int(v) for name, v in re.findall(r"INVNEXT_(F32|F16|BF16|F64) = (\d+)", header)}
    assert codes == {"F32": 0, "F16": 1, "BF16": 2, "F64": 3}
    assert int(re.search(r"#define INVNEXT_NATIVE_ABI (\d+)", header).group(1)) == native.ABI
    assert {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3} == ops._DTYPE_CODE
    # Every kernel the NVRTC path asks for is defined by the header.
    kernels = (CSRC / "token_kernels.cuh").read_text()
    kinds = set(re.findall(r"void __launch_bounds__\(256\) invnext_(\w+)_##SUFFIX", kernels))
    suffixes = set(re.findall(r"^INVNEXT_TOKEN_KERNELS\((\w+),", kernels, re.MULTILINE))
    defined = {f"invnext_{k}_{s}" for k in kinds for s in suffixes}
    used = {"gather_visible_fwd", "expand_rows", "gather_rows", "prefix_grad", "sum_batch", "masked_colsum"}
    for suffix, itemsize, vec in _cupy._DTYPES.values():
        assert itemsize * vec == 16
        for kind in used:
            for width in (vec, 1):
                assert f"invnext_{kind}_{suffix}_v{width}" in defined
    assert "invnext_build_inverse(" in kernels


def test_header_and_bindings_match_the_c_api_table():
    """csrc/invnext_native.h declares every launcher of invnext.native.c_api with its typed
    arguments in order, and csrc/bindings.cpp binds each under its name with those argument names
    (the Python twins take theirs from the table: tests/test_cupy_launches.py, the emulations here)."""
    from invnext.native import c_api

    header = (CSRC / "invnext_native.h").read_text()
    declared = {m.group(1): " ".join(m.group(0).split()).replace("( ", "(")
                for m in re.finditer(r"int invnext_(\w+)\(([^)]*)\);", header)}  # fmt: skip
    launchers = {name: text for name, text in declared.items() if name not in ("runtime_info", "abi_version")}
    assert launchers == {name: c_api.c_declaration(name) for name in c_api.FUNCTIONS}
    bindings = (CSRC / "bindings.cpp").read_text()
    for name in c_api.FUNCTIONS:
        body = re.search(rf'm\.def\(\s*"{name}",(.*?)nogil\);', bindings, re.S)
        assert body, name
        assert tuple(re.findall(r'py::arg\("(\w+)"\)', body.group(1))) == c_api.argument_names(name), name
    defines = dict(re.findall(r"#define INVNEXT_(\w+) (\d+)", header))
    assert int(defines["NATIVE_ABI"]) == c_api.ABI
    assert (c_api.MASK_THREADS, c_api.MASK_KEY_BYTES, c_api.MASK_MAX_BLOCKS) == tuple(
        int(defines[k]) for k in ("MASK_THREADS", "MASK_KEY_BYTES", "MASK_MAX_BLOCKS")
    )


def test_c_function_binds_by_the_table():
    from invnext.native.c_api import FUNCTIONS, argument_names

    class Lib:
        @c_function
        def sum_batch(self, a):
            return a

    names = argument_names("sum_batch")
    assert names == ("out", "inp", "B", "M", "C", "dtype", "stream") and len(FUNCTIONS["sum_batch"]) == 7
    assert vars(Lib().sum_batch(*range(7))) == dict(zip(names, range(7)))
    assert vars(Lib().sum_batch(0, 1, 2, 3, 4, dtype=5, stream=6)) == dict(zip(names, range(7)))
    with pytest.raises(TypeError):
        Lib().sum_batch(0, 1, 2)


def test_cupy_row_launch_mirrors_the_c_launcher():
    from invnext.native import _cupy

    # csrc/token_launch.cuh row_launch: x over a row's pieces (multiple of 32, <= 256), y over rows.
    assert _cupy._row_launch(10, 96) == ((5,), (96, 2))
    assert _cupy._row_launch(7, 13) == ((1,), (32, 8))
    assert _cupy._row_launch(3, 1000) == ((3,), (256, 1))
    assert _cupy._row_launch(1 << 40, 1) == ((1 << 24,), (32, 8))
    assert _cupy._row_launch(17, 96, 4) == ((3,), (96, 2))  # gather_visible_fwd: 4 rows per thread
    assert _cupy._vector_ok(2, 768, 256, 512) and not _cupy._vector_ok(2, 13, 0) and not _cupy._vector_ok(4, 8, 4)


# ----------------------------------------------------------------------------- setup.py (CPU)


@pytest.fixture(scope="module")
def setup_py():
    return runpy.run_path(str(ROOT / "setup.py"), run_name="invnext_setup_under_test")


def test_setup_build_plan(setup_py, tmp_path):
    plan = setup_py["cuda_build_plan"]
    tools = {"nvcc": "/opt/cuda/bin/nvcc", "cmake": "/usr/bin/cmake"}
    which = tools.get
    assert plan({}, which) == ("/opt/cuda/bin/nvcc", None)
    assert plan({"INVNEXT_SKIP_CUDA_BUILD": "1"}, which) == (None, "INVNEXT_SKIP_CUDA_BUILD=1")
    assert plan({"INVNEXT_SKIP_CUDA_BUILD": "0"}, which) == ("/opt/cuda/bin/nvcc", None)
    assert plan({}, lambda name: None) == (None, "nvcc not found")
    assert plan({}, {"nvcc": "/x/nvcc"}.get) == (None, "cmake not found")
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    assert plan({"CUDA_HOME": str(tmp_path)}, {"cmake": "/usr/bin/cmake"}.get) == (str(nvcc), None)
    assert setup_py["skip_message"]("nvcc not found") == (
        "invnext: nvcc not found; installing without the CUDA extension (Triton and PyTorch backends only)"
    )


def test_setup_skips_with_one_line(setup_py, monkeypatch, capsys):
    from setuptools import Distribution

    dist = Distribution({"ext_modules": [setup_py["CMakeExtension"]("invnext.native._C")]})
    cmd = setup_py["BuildExt"](dist)
    cmd.ensure_finalized()
    monkeypatch.setenv("INVNEXT_SKIP_CUDA_BUILD", "1")
    monkeypatch.delenv("INVNEXT_FORCE_CUDA_BUILD", raising=False)
    cmd.run()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "invnext: INVNEXT_SKIP_CUDA_BUILD=1; installing without the CUDA extension (Triton and PyTorch backends only)"
    ]
    assert cmd.extensions == [] and cmd.get_outputs() == []
    monkeypatch.setenv("INVNEXT_FORCE_CUDA_BUILD", "1")
    cmd = setup_py["BuildExt"](dist)
    cmd.ensure_finalized()
    with pytest.raises(RuntimeError, match="INVNEXT_FORCE_CUDA_BUILD=1 but INVNEXT_SKIP_CUDA_BUILD=1"):
        cmd.run()


def test_setup_packages(setup_py):
    packages = setup_py["_packages"]()
    assert {"invnext", "invnext.native", "invnext.ops", "invnext_kernels"} <= set(packages)
    assert not any(p == "kernels" or p.startswith("kernels.") for p in packages)


# ----------------------------------------------------------------------------- GPU: helpers


def _grid_values(shape, dtype, device, gen):
    """Values k/64 with |k| <= 128: exact in every dtype, and their sums are exact in fp32."""
    k = torch.randint(-128, 129, shape, generator=gen)
    return (k.to(torch.float64) / 64).to(device=device, dtype=dtype)


def _randn(shape, dtype, device, gen, misaligned=False):
    values = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if not misaligned:
        return values.to(device)
    # Same values, contiguous, but one element past a 16-byte boundary: forces the scalar kernels.
    buf = torch.empty(values.numel() + 1, dtype=dtype, device=device)
    out = buf[1:].view(shape)
    out.copy_(values)
    return out


def _packing(counts, N, P, gen):
    """index (int64, -1 at prefix rows) and cu_seqlens for samples with the given visible counts."""
    rows, cu = [], [0]
    for b, k in enumerate(counts):
        places = torch.randperm(N, generator=gen)[:k].sort().values
        rows.append(torch.cat([torch.full((P,), -1, dtype=torch.int64), b * N + places]))
        cu.append(cu[-1] + P + k)
    return torch.cat(rows), torch.tensor(cu, dtype=torch.int32)


def _gather_reference(x, index, cu, pos, prefix):
    """Float64 formulation of gather_visible: per sample, prefix rows then x[index] + pos."""
    B, N, C = x.shape
    P = 0 if prefix is None else prefix.shape[1]
    flat = x.reshape(B * N, C)
    out = []
    for b in range(B):
        idx = index[int(cu[b]) + P : int(cu[b + 1])]
        rows = flat[idx]
        if pos is not None:
            rows = rows + pos[b if pos.shape[0] > 1 else 0][idx % N]
        if P:
            rows = torch.cat([prefix[b if prefix.shape[0] > 1 else 0], rows])
        out.append(rows)
    return torch.cat(out)


def _scatter_reference(packed, index, mask_token, pos, B, N):
    """Float64 formulation of scatter_tokens: mask everywhere, packed rows put at index, + pos."""
    C = packed.shape[1]
    keep = index >= 0
    out = mask_token.expand(B * N, C).clone()
    out[index[keep]] = packed[keep]
    out = out.view(B, N, C)
    return out if pos is None else out + pos


def _leaf64(t):
    return None if t is None else t.detach().cpu().to(torch.float64).requires_grad_(True)


def _assert_same(got, want, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    assert torch.equal(got.cpu(), want), f"{what}: max diff {(got.cpu().double() - want.double()).abs().max()}"


# (visible counts per sample, N, P): ragged, a one-token sample, a prefix-only sample, a full sample.
_LAYOUTS = [([7, 1, 0], 16, 2), ([1], 5, 0), ([40, 113], 113, 0), ([3, 0, 9, 1], 12, 1)]


def token_kernel_cases(test):
    """The one grid both token kernels are checked over, so a case added for one reaches the other:
    every dtype, a wide and an odd C, every layout, and ``tables`` none / shared / per-sample."""
    for mark in (
        pytest.mark.parametrize("tables", ["none", "batch1", "batchB"]),
        pytest.mark.parametrize("layout", range(len(_LAYOUTS))),
        pytest.mark.parametrize("C", [768, 13]),
        pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", "")),
        pytest.mark.requires_cuda,
    ):
        test = mark(test)
    return test


def _assert_exact_with_grads(out, want, grad, dtype, leaves):
    """``out`` and the gradients of ``leaves`` ((name, leaf or None, its float64 twin)) equal the
    float64 formulation ``want`` rounded once to ``dtype``, bit for bit."""
    _assert_same(out, want.detach().to(dtype), "forward")
    out.backward(grad)
    want.backward(grad.cpu().to(torch.float64))
    for name, leaf, leaf64 in leaves:
        if leaf is not None:
            _assert_same(leaf.grad, leaf64.grad.to(dtype), f"d {name}")


# ----------------------------------------------------------------------------- GPU: plumbing


@pytest.mark.requires_cuda
def test_bad_arguments_return_an_error_code(kernels_from):
    from invnext.native import ops

    lib = native.kernels()
    code = lib.gather_visible_forward(0, 0, 0, 0, 0, 0, 4, 0, 8, 16, 1, 1, 0, 0, 0)  # B = 0
    assert code == 1
    assert "invalid argument" in lib.error_string(code)
    with pytest.raises(RuntimeError, match="invalid argument"):
        ops._check(lib, code, "gather_visible forward")
    assert lib.sum_batch(0, 0, 1, 4, 4, 9, 0) == 1  # unknown dtype code


@pytest.mark.requires_cuda
def test_runs_on_the_current_stream(kernels_from):
    from invnext.native import ops

    B, N, C = 2, 64, 256
    gen = torch.Generator().manual_seed(5)
    index, cu = _packing([30, 64], N, 0, gen)
    x = _randn((B, N, C), torch.float16, torch.device("cuda"), gen)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ops.gather_visible_cuda(x, index.cuda(), cu.cuda(), None, None)
        back = ops.scatter_tokens_cuda(out, index.cuda(), torch.zeros(C, dtype=x.dtype, device="cuda"), None, B, N)
    stream.synchronize()
    hidden = torch.ones(B * N, dtype=torch.bool)
    hidden[index] = False
    want = x.view(B * N, C).cpu().clone()
    want[hidden] = 0
    _assert_same(back, want.view(B, N, C), "gather then scatter")


@pytest.mark.requires_cuda
def test_public_ops_on_the_cuda_backend(kernels_from):
    """invnext.ops dispatches here with backend="cuda" and agrees with its own reference."""
    from invnext.ops import tokens
    from invnext.ops._dispatch import BackendUnavailableError

    B, N, C, P = 3, 50, 768, 4
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(3)
    hidden = (torch.rand(B, N, generator=gen) < 0.75).to(dev)
    hidden[1] = True  # a sample of prefix tokens only
    x = _randn((B, N, C), torch.bfloat16, dev, gen)
    pos = _randn((1, N, C), torch.bfloat16, dev, gen)
    prefix = _randn((1, P, C), torch.bfloat16, dev, gen)
    mask = _randn((C,), torch.bfloat16, dev, gen)
    got = tokens.gather_visible(x, hidden, pos, prefix, backend="cuda")
    ref = tokens.gather_visible(x, hidden, pos, prefix, backend="torch")
    assert torch.equal(got.cu_seqlens, ref.cu_seqlens) and torch.equal(got.index, ref.index)
    assert torch.equal(got.tokens, ref.tokens)
    back = tokens.scatter_tokens(got.tokens, got.index, mask, pos, N, batch_size=B, backend="cuda")
    back_ref = tokens.scatter_tokens(ref.tokens, ref.index, mask, pos, N, batch_size=B, backend="torch")
    assert torch.equal(back, back_ref)
