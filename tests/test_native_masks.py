"""CUDA mask samplers (csrc/mask_kernels.cuh, invnext.native.masks) against the torch references.

CPU (runs anywhere nvcc is installed): the exact text the NVRTC path compiles builds as device
code and defines every kernel the launchers name; Philox of the header, compiled as host code,
reproduces invnext.ops.philox bit for bit (the multi-block boxes are drawn on the host and
passed in, so no box arithmetic runs on the device); the Python side agrees with the C API,
and an emulation of the C API over the wrappers' raw pointers (ctypes) gives the reference
masks, so argument order and layouts are checked before a GPU sees them; dispatch knows the
"cuda" entries.

GPU (``requires_cuda``, once per kernel source: compiled extension and CuPy/NVRTC): every mask
equals the reference's bit for bit on many seeds and awkward grids (ties, ratio 0, keep = S,
one-token frames, 8190-position frames); cu_seqlens from the sampler equal mask_counts; no
host synchronisation (sync debug mode, CUDA-graph capture); bad arguments give error codes;
inputs the kernels decline fall back to the reference. The statistics tests of
tests/test_{tube,multiblock,semantic}_mask_reference.py are re-run with the samplers on the
GPU, for the reference on the GPU and for the cuda backend. Each sampler's exactness against
its reference is in tests/test_<op>_cuda.py.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import test_multiblock_mask_reference  # tests/ is on sys.path under pytest's default import mode
import test_semantic_mask_reference
import test_tube_mask_reference
import torch

from invnext import native
from invnext.common.registry import implementation
from invnext.native.c_api import c_function
from invnext.ops import masks as ops_masks
from invnext.ops._dispatch import _ACCELERATED, BackendUnavailableError, availability
from invnext.ops.philox import philox_bits

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
MASK_KERNELS = (CSRC / "mask_kernels.cuh").read_text()
HEADER = (CSRC / "invnext_native.h").read_text()

# Host program over the header's math: "bits seed stream first count" prints philox bits.
HARNESS = r"""
#define INVNEXT_MASK_MATH_ONLY
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include "mask_kernels.cuh"
int main() {
  char cmd[8];
  while (std::scanf("%7s", cmd) == 1) {
    if (!std::strcmp(cmd, "bits")) {
      unsigned long long seed, stream, first, count;
      if (std::scanf("%llu %llu %llu %llu", &seed, &stream, &first, &count) != 4) return 2;
      for (unsigned long long i = 0; i < count; ++i) std::printf("%u\n", invnext_philox::bits(seed, stream, first + i));
    } else {
      return 2;
    }
  }
  return 0;
}
"""


# ----------------------------------------------------------------------------- CPU: nvcc


@pytest.fixture(scope="module")
def nvcc_outputs(tmp_path_factory):
    """Two compiles in parallel: the NVRTC source as PTX (nvcc), and the host harness. The
    harness needs no device pass, so the host compiler builds it with the CUDA qualifiers
    defined away (what nvcc's host pass does)."""
    nvcc, cxx = shutil.which("nvcc"), shutil.which("g++") or shutil.which("c++")
    if nvcc is None or cxx is None:
        pytest.skip("nvcc or a host C++ compiler not found")
    from invnext.native import _cupy

    tmp = tmp_path_factory.mktemp("mask_nvcc")
    (tmp / "nvrtc_source.cu").write_text(_cupy.mask_source_text())
    (tmp / "harness.cu").write_text(HARNESS)
    ptx = subprocess.Popen(
        [nvcc, "-std=c++17", "--ptx", "-arch=compute_80", "nvrtc_source.cu", "-o", "masks.ptx"],
        cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    host = subprocess.Popen(
        [cxx, "-std=c++17", "-O1", "-D__host__=", "-D__device__=", "-D__forceinline__=inline",
         f"-I{CSRC}", "-x", "c++", "harness.cu", "-o", "harness"],
        cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    results = {}
    for name, proc in (("ptx", ptx), ("harness", host)):
        out, _ = proc.communicate(timeout=300)
        results[name] = (proc.returncode, out)
    return tmp, results


def _run_harness(nvcc_outputs, lines: list[str]) -> list[str]:
    tmp, results = nvcc_outputs
    rc, out = results["harness"]
    assert rc == 0, out
    done = subprocess.run([str(tmp / "harness")], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_nvrtc_source_builds_every_launched_kernel(nvcc_outputs):
    tmp, results = nvcc_outputs
    rc, out = results["ptx"]
    assert rc == 0, out
    entries = set(re.findall(r"\.entry (\w+)\(", (tmp / "masks.ptx").read_text()))
    launched = set(re.findall(r"\b(invnext_\w+)<<<", (CSRC / "mask_ops.cu").read_text()))
    cupy_src = (ROOT / "invnext" / "native" / "_cupy.py").read_text()
    launched |= set(re.findall(r'_mask_fn\("(\w+)"\)', cupy_src))
    launched |= {f"invnext_semantic_mask_{m}_{d}" for m in ("topk", "sample") for d in ("f32", "f16", "bf16", "f64")}
    assert len(launched) == 11 and launched <= entries, launched - entries


def test_mask_headers_hold_device_code_only():
    includes = re.findall(r"#include\s*[<\"]([^>\"]+)", MASK_KERNELS)
    assert set(includes) == {"philox.cuh", "cuda_fp16.h", "cuda_bf16.h"}
    philox = (CSRC / "philox.cuh").read_text()
    assert not re.findall(r"#include", philox)
    for text in (MASK_KERNELS, philox):
        for host_only in ("<<<", "cudaMalloc", "cudaMemset", "cudaStream", "std::", "printf"):
            assert host_only not in text
    assert "__host__" not in MASK_KERNELS  # only through INVNEXT_HD (philox.cuh)


def test_philox_bits_match_reference_on_host(nvcc_outputs):
    cases = [(5, 1, 0, 64), (2**64 - 1, 2**40 + 3, 2**33 - 5, 64), (123456789012345, 3, 0, 2000), (0, 0, 2**62, 8)]
    got = _run_harness(nvcc_outputs, [f"bits {s} {st} {c0} {n}" for s, st, c0, n in cases])
    want = []
    for seed, stream, first, count in cases:
        want += philox_bits(seed, stream, torch.arange(first, first + count)).tolist()
    assert [int(v) for v in got] == want


# ----------------------------------------------------------------------------- CPU: plumbing


def test_python_side_matches_the_c_api():
    from invnext.native import _cupy
    from invnext.native import masks as nm

    defines = {k: int(v) for k, v in re.findall(r"#define INVNEXT_(MASK_\w+) (\d+)", HEADER)}
    assert defines == {"MASK_THREADS": 512, "MASK_KEY_BYTES": 45056, "MASK_MAX_BLOCKS": 1024}
    assert (nm.MASK_KEY_BYTES, nm.MASK_MAX_BLOCKS) == (defines["MASK_KEY_BYTES"], defines["MASK_MAX_BLOCKS"])
    assert (_cupy.MASK_THREADS, _cupy.MASK_KEY_BYTES, _cupy.MASK_MAX_BLOCKS) == tuple(defines.values())
    modes = dict(re.findall(r"INVNEXT_MASK_(TOPK|SAMPLE) = (\d)", HEADER))
    assert {"topk": int(modes["TOPK"]), "sample": int(modes["SAMPLE"])} == nm.MODES
    # Block sizes: csrc/mask_ops.cu block_threads.
    assert [_cupy._mask_threads(n) for n in (1, 32, 33, 256, 511, 8190)] == [32, 32, 64, 256, 512, 512]
    bindings = (CSRC / "bindings.cpp").read_text()
    for op in ("tube_mask", "multiblock_mask", "semantic_mask"):
        assert f'"{op}"' in bindings and callable(getattr(_cupy.CupyKernels, op))
        assert f"int invnext_{op}(" in HEADER
        assert "cuda" in _ACCELERATED[op] and implementation(op, "cuda") is getattr(nm, f"{op}_cuda")
    assert "csrc/mask_ops.cu" in (ROOT / "CMakeLists.txt").read_text()


def test_cuda_backend_on_cpu_says_why(monkeypatch):
    for op in ("tube_mask", "multiblock_mask", "semantic_mask"):
        ok, why = availability(op, "cuda", "cpu")
        assert not ok and "CUDA tensors" in why
    with pytest.raises(BackendUnavailableError, match="tube_mask: backend 'cuda' is unavailable: the CUDA kernels"):
        ops_masks.tube_mask(2, (2, 4, 4), 0.5, seed=0, backend="cuda")
    from invnext.native import masks as nm

    assert nm.tube_mask_cuda.unsupported(2, (1, 4, 4), 0.5, 0, torch.device("cpu")).startswith(
        "the CUDA kernels need a CUDA device"
    )
    monkeypatch.setattr(nm, "_common_reason", lambda *args: None)
    ratios = tuple(i / 16 for i in range(nm.TUBE_MAX_DISTINCT_COUNTS + 1))  # S = 16: counts 0, 1, 2, ...
    assert "distinct hidden counts" in nm.tube_mask_cuda.unsupported(len(ratios), (1, 4, 4), ratios, 0, "cpu")
    assert nm.tube_mask_cuda.unsupported(len(ratios) - 1, (1, 4, 4), ratios[:-1], 0, "cpu") is None
    monkeypatch.undo()
    assert "CUDA device" in nm.semantic_mask_cuda.unsupported(torch.rand(1, 2, 3), 1, "topk", 0)
    boxes = ops_masks.multiblock_boxes(2, (1, 4, 4), 2, (0.1, 0.2), (1.0, 1.0), (1.0, 1.0), 0)
    assert "CUDA device" in nm.multiblock_mask_cuda.unsupported(boxes, (1, 4, 4), torch.device("cpu"))


class _EmulatedMaskLib:
    """The C API's mask samplers in Python over raw pointers (ctypes), as csrc/invnext_native.h
    documents them: a uint8 mask [B, N] written at ``hidden`` and, when ``cu_seqlens`` is not
    NULL, int32 [B + 1] prefix sums of P + visible; inputs read from their pointers."""

    @staticmethod
    def _read(ptr: int, count: int, dtype: torch.dtype) -> torch.Tensor:
        import ctypes

        nbytes = count * torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(bytearray((ctypes.c_uint8 * nbytes).from_address(ptr)), dtype=dtype).clone()

    @staticmethod
    def _write(mask: torch.Tensor, hidden: int, cu_seqlens: int, P: int) -> int:
        import ctypes

        painted = mask.to(torch.uint8).contiguous()  # held: memmove reads it after data_ptr()
        ctypes.memmove(hidden, painted.data_ptr(), painted.numel())
        if cu_seqlens:
            lengths = P + mask.shape[1] - mask.sum(1)
            prefix_sums = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
            ctypes.memmove(cu_seqlens, prefix_sums.data_ptr(), 4 * prefix_sums.numel())
        return 0

    # Argument lists from invnext.native.c_api (the header's, as data); ``a`` holds their values.

    @c_function
    def tube_mask(self, a):
        # per sample the num_hidden positions with the smallest philox_bits(seed, 1, b*S + p), every frame
        B, S = a.B, a.H * a.W
        keys = philox_bits(a.seed, 1, torch.arange(B * S, dtype=torch.int64)).view(B, S)
        order = torch.sort(keys, dim=1, stable=True).indices
        frame = torch.zeros(B, S, dtype=torch.bool).scatter_(1, order[:, : a.num_hidden], True)
        return self._write(frame.repeat(1, a.T), a.hidden, a.cu_seqlens, a.P)

    @c_function
    def multiblock_mask(self, a):
        box = self._read(a.boxes, a.B * a.num_blocks * 6, torch.int32).view(a.B, a.num_blocks, 6)
        mask = ops_masks.multiblock_mask_reference(box.long(), (a.T, a.H, a.W), torch.device("cpu"))
        return self._write(mask, a.hidden, a.cu_seqlens, a.P)

    @c_function
    def semantic_mask(self, a):
        dt = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64}[a.dtype]
        scores = self._read(a.attn, a.B * a.T * a.S, dt).view(a.B, a.T, a.S)
        mask = ops_masks.semantic_mask_reference(scores, a.keep, ("topk", "sample")[a.mode], a.seed)
        return self._write(mask, a.hidden, a.cu_seqlens, a.P)


def test_mask_wrappers_pass_what_the_c_api_reads(monkeypatch):
    """invnext.native.masks hands the C API its arguments in the header's order and layout
    (the host's int32 boxes [B, J, 6], attention of any float dtype, strided or not, the
    dtype and mode codes, P): an emulation of the C API over the same pointers gives the
    reference masks and exact cu_seqlens and max_seqlen."""
    import contextlib

    from invnext.native import masks as nm

    monkeypatch.setattr(nm, "_lib", lambda op: _EmulatedMaskLib())
    monkeypatch.setattr(nm, "_stream", lambda device: 0)
    monkeypatch.setattr(nm, "_on", lambda device: contextlib.nullcontext())
    cpu = torch.device("cpu")
    for B, grid, J, s, a, t in [
        (3, (4, 5, 7), 3, (0.1, 0.6), (0.5, 2.0), (0.3, 1.0)),
        (2, (2, 16, 16), 8, (0.15, 0.15), (0.75, 1.5), (1.0, 1.0)),
    ]:
        boxes = ops_masks.multiblock_boxes(B, grid, J, s, a, t, 7)
        want = ops_masks.multiblock_mask(B, grid, J, s, a, t, seed=7)
        assert torch.equal(nm.multiblock_mask_cuda(boxes, grid, cpu), want)
        hidden, cu, max_seqlen = nm.multiblock_mask_with_cu_seqlens(B, grid, J, s, a, t, 7, cpu, 4)
        want_cu, want_max = ops_masks.mask_counts(want, 4)
        assert torch.equal(hidden, want) and torch.equal(cu, want_cu) and max_seqlen == want_max
    for B, grid, ratio in [(3, (2, 3, 5), 0.6), (1, (1, 1, 1), 0.0)]:
        want = ops_masks.tube_mask(B, grid, ratio, seed=11)
        assert torch.equal(nm.tube_mask_cuda(B, grid, ratio, 11, cpu), want)
        hidden, cu, max_seqlen = nm.tube_mask_with_cu_seqlens(B, grid, ratio, 11, cpu, 2)
        assert (torch.equal(hidden, want), max_seqlen) == (True, ops_masks.mask_counts(want, 2)[1])
        assert torch.equal(cu, ops_masks.mask_counts(want, 2)[0])
    # Per-sample ratios: one launch per distinct hidden count, each row from its own count's launch.
    for B, grid, ratios in [(5, (2, 3, 5), (0.6, 0.1, 0.6, 0.0, 0.9)), (2, (1, 4, 4), (0.5, 0.5))]:
        want = ops_masks.tube_mask(B, grid, list(ratios), seed=12)
        assert torch.equal(nm.tube_mask_cuda(B, grid, ratios, 12, cpu), want)
    base = torch.rand(2, 3, 20, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for mode in ("topk", "sample"):
            attn = base.to(dtype)[:, :, ::2]  # strided: the wrapper hands the kernel a contiguous copy
            want = ops_masks.semantic_mask(attn, 4, mode, seed=5)
            assert torch.equal(nm.semantic_mask_cuda(attn, 4, mode, 5), want), (dtype, mode)
            hidden, cu, max_seqlen = nm.semantic_mask_with_cu_seqlens(attn, 4, mode, 5, 1)
            assert torch.equal(hidden, want) and torch.equal(cu, ops_masks.mask_counts(want, 1)[0])
            assert max_seqlen == 1 + 3 * 4


# ----------------------------------------------------------------------------- GPU: helpers


CUDA = torch.device("cuda")
SEEDS = (0, 1, 2**64 - 1, 0x0123456789ABCDEF, 987654321)


def _assert_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == torch.bool and got.shape == want.shape, what
    got, want = got.cpu(), want.cpu()
    diff = (got != want).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.shape[0]} positions differ, first {diff[:5].tolist()}"


MULTIBLOCK_CASES = [
    (1, (1, 1, 1), 1, (0.0, 0.0), (1.0, 1.0), (0.0, 0.0)),
    (5, (3, 7, 5), 3, (0.05, 0.6), (0.3, 3.0), (0.2, 1.0)),
    (16, (16, 14, 14), 8, (0.15, 0.15), (0.75, 1.5), (1.0, 1.0)),
    (14, (32, 16, 16), 8, (0.15, 0.15), (0.75, 1.5), (1.0, 1.0)),  # Stage-2 view A
    (14, (32, 16, 16), 2, (0.7, 0.7), (0.75, 1.5), (1.0, 1.0)),  # Stage-2 view B
    (4, (4, 64, 64), 33, (0.0, 1.0), (0.01, 100.0), (0.0, 1.0)),
    (3, (7, 1, 13), 4, (0.2, 0.9), (0.5, 2.0), (0.1, 0.6)),
]


def _attn_values(kind: str, shape, dtype, gen) -> torch.Tensor:
    if kind == "rand":
        x = torch.rand(shape, generator=gen, dtype=torch.float64)
    elif kind == "ties":  # few distinct values: long runs of equal scores, zeros among them
        x = torch.randint(0, 4, shape, generator=gen).to(torch.float64)
    else:  # "signed zeros": -0.0 and +0.0 tie, a few positives
        x = torch.where(torch.rand(shape, generator=gen) < 0.5, -0.0, 0.0).to(torch.float64)
        positive = torch.rand(shape, generator=gen, dtype=torch.float64)
        x = torch.where(torch.rand(shape, generator=gen) < 0.1, positive, x)
    return x.to(dtype)


# ----------------------------------------------------------------------------- GPU: counts, syncs, streams


@pytest.mark.requires_cuda
@pytest.mark.parametrize("P", [0, 4])
def test_cu_seqlens_from_the_sampler(kernels_from, P):
    from invnext.native import masks as nm

    cases = [
        nm.tube_mask_with_cu_seqlens(37, (3, 7, 5), 0.6, 5, CUDA, P),
        nm.multiblock_mask_with_cu_seqlens(70, (32, 16, 16), 8, (0.15, 0.15), (0.75, 1.5), (1.0, 1.0), 5, CUDA, P),
        nm.multiblock_mask_with_cu_seqlens(3, (2, 5, 6), 3, (0.1, 0.9), (0.5, 2.0), (0.3, 1.0), 9, CUDA, P),
        nm.semantic_mask_with_cu_seqlens(torch.rand(33, 4, 256, device=CUDA), 51, "sample", 5, P),
    ]
    for i, (hidden, cu, max_seqlen) in enumerate(cases):
        want_cu, want_max = ops_masks.mask_counts(hidden.cpu(), P)
        assert cu.dtype == torch.int32 and cu.device.type == "cuda"
        assert torch.equal(cu.cpu(), want_cu), i
        assert max_seqlen == want_max, i  # multi-block: counted from the host's boxes
    # The masks themselves are the plain samplers'.
    assert torch.equal(cases[0][0], nm.tube_mask_cuda(37, (3, 7, 5), 0.6, 5, CUDA))


@pytest.mark.requires_cuda
def test_no_host_sync_and_graph_capture(kernels_from):
    from invnext.native import masks as nm

    attn = torch.rand(4, 8, 256, device=CUDA)
    view_a = (14, (32, 16, 16), 8, (0.15, 0.15), (0.75, 1.5), (1.0, 1.0), 2, CUDA, 4)

    def sample():
        return (
            nm.tube_mask_with_cu_seqlens(16, (8, 16, 16), 0.8, 1, CUDA, 4)[:2]
            + nm.semantic_mask_with_cu_seqlens(attn, 51, "sample", 3, 4)[:2]
        )

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = sample()
        # Multi-block copies its host boxes in (pinned, non-blocking): no sync either, and the
        # public op's host counts need none.
        multiblock = nm.multiblock_mask_with_cu_seqlens(*view_a)
        hidden, counts = ops_masks.multiblock_mask(*view_a[:6], seed=2, device=CUDA, backend="cuda", return_counts=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(hidden, multiblock[0]) and torch.equal(hidden.sum(1).cpu(), counts)
    # Warm up on the capture stream (the NVRTC path compiles at first use) outside the capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sample()
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        captured = sample()
    for t in captured:
        t.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        assert torch.equal(got, want)


@pytest.mark.requires_cuda
def test_runs_on_the_current_stream(kernels_from):
    from invnext.native import masks as nm

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        boxes = ops_masks.multiblock_boxes(64, (32, 16, 16), 8, (0.15, 0.15), (0.75, 1.5), (1.0, 1.0), 4)
        hidden = nm.multiblock_mask_cuda(boxes, (32, 16, 16), CUDA)
    stream.synchronize()
    want = ops_masks.multiblock_mask(64, (32, 16, 16), 8, (0.15, 0.15), (0.75, 1.5), seed=4)
    _assert_equal(hidden, want, "multiblock on a side stream")


# ----------------------------------------------------------------------------- GPU: bad input, fallback


@pytest.mark.requires_cuda
def test_bad_arguments_return_an_error_code(kernels_from):
    lib = native.kernels()
    buf = torch.empty(1 << 16, dtype=torch.uint8, device=CUDA)
    out, cu = buf.data_ptr(), buf[-64:].data_ptr()
    s = torch.cuda.current_stream().cuda_stream
    assert lib.tube_mask(out, 0, 1, 1, 2, 2, 1, 0, 0, s) == 0
    assert lib.tube_mask(0, 0, 1, 1, 2, 2, 1, 0, 0, s) == 1  # no output
    assert lib.tube_mask(out, 0, 0, 1, 2, 2, 1, 0, 0, s) == 1  # B = 0
    assert lib.tube_mask(out, 0, 1, 1, 2, 2, 5, 0, 0, s) == 1  # num_hidden > H*W
    assert lib.tube_mask(out, 0, 1, 1, 120, 120, 1, 0, 0, s) == 1  # frame beyond the shared-memory sort
    assert lib.tube_mask(out, cu, 1, 1, 2, 2, 1, 0, -1, s) == 1  # P < 0
    boxes = torch.tensor([[0, 1, 0, 2, 1, 3]] * 4, dtype=torch.int32, device=CUDA)  # B = 2, J = 2
    good = (out, cu, boxes.data_ptr(), 2, 2, 4, 4, 2, 0, s)
    assert lib.multiblock_mask(*good) == 0
    for i, bad in ((0, 0), (2, 0), (3, 0), (4, 0), (7, 0), (7, 1025), (8, -1)):
        args = list(good)
        args[i] = bad
        assert lib.multiblock_mask(*args) == 1, (i, bad)
    attn = torch.rand(2, 3, 8, device=CUDA)
    good = [out, cu, attn.data_ptr(), 2, 3, 8, 2, 0, 0, 0, 0, s]
    assert lib.semantic_mask(*good) == 0
    for i, bad in ((2, 0), (6, 0), (6, 9), (7, 2), (8, 4)):
        args = list(good)
        args[i] = bad
        assert lib.semantic_mask(*args) == 1, (i, bad)
    assert "invalid argument" in lib.error_string(1)
    torch.cuda.synchronize()
    from invnext.native import masks as nm

    with pytest.raises(ValueError, match="tube_mask: num_prefix must be an int >= 0"):
        nm.tube_mask_with_cu_seqlens(2, (1, 2, 2), 0.5, 0, CUDA, -1)
    with pytest.raises(ValueError, match="semantic_mask: cu_seqlens would overflow int32"):
        nm.semantic_mask_with_cu_seqlens(attn, 2, "topk", 0, 2**30)


@pytest.mark.requires_cuda
def test_declined_inputs_fall_back_to_the_reference(kernels_from):
    grid = (1, 120, 120)  # 14400 positions: beyond the shared-memory sort
    with pytest.raises(BackendUnavailableError, match="cannot run these inputs: a frame of 14400 positions"):
        ops_masks.tube_mask(2, grid, 0.5, seed=3, device=CUDA, backend="cuda")
    auto = ops_masks.tube_mask(2, grid, 0.5, seed=3, device=CUDA)
    _assert_equal(auto, ops_masks.tube_mask(2, grid, 0.5, seed=3), "tube fallback")
    attn = torch.rand(1, 2, 6000, device=CUDA)
    with pytest.raises(BackendUnavailableError, match="a frame of 6000 tokens"):
        ops_masks.semantic_mask(attn, 10, "sample", seed=1, backend="cuda")
    want = ops_masks.semantic_mask(attn, 10, "sample", seed=1, backend="torch")
    _assert_equal(ops_masks.semantic_mask(attn, 10, "sample", seed=1), want, "semantic fallback")
    # fp32 topk keys are half as wide: the same frame is accepted.
    want = ops_masks.semantic_mask(attn, 10, "topk", backend="torch")
    _assert_equal(ops_masks.semantic_mask(attn, 10, "topk", backend="cuda"), want, "semantic topk 6000")


# ----------------------------------------------------------------------------- GPU: the statistics suite


STAT_TESTS = {
    test_tube_mask_reference: (
        "test_tube_exact_count_and_constant_in_time",
        "test_tube_position_frequency_uniform",
        "test_tube_follows_documented_rng_layout",
        "test_tube_seeds_and_generators",
    ),
    test_multiblock_mask_reference: (
        "test_multiblock_coverage_matches_geometry",
        "test_multiblock_temporal_extent_consecutive_and_uniform",
        "test_multiblock_sizes_and_aspect_within_range",
        "test_multiblock_mask_is_union_of_boxes",
        "test_multiblock_stage2_views",
        "test_multiblock_seeds",
    ),
    test_semantic_mask_reference: (
        "test_semantic_topk_picks_top_k",
        "test_semantic_topk_ties_lowest_index",
        "test_semantic_topk_keep_all_and_one_token",
        "test_semantic_sample_frequencies_proportional_keep1",
        "test_semantic_sample_without_replacement_keep2",
        "test_semantic_sample_fills_with_zero_attention_in_index_order",
        "test_semantic_sample_follows_documented_rng_layout",
        "test_semantic_seeds_and_generator_use",
    ),
}


def _stat_module(name: str):
    return next(module for module, names in STAT_TESTS.items() if name in names)


def _stat_cases():
    """(name, kwargs) for every case of the listed tests, read from their parametrize marks."""
    for name in (n for names in STAT_TESTS.values() for n in names):
        fn = getattr(_stat_module(name), name)
        combos = [{}]
        for mark in getattr(fn, "pytestmark", []):
            if mark.name != "parametrize":
                continue
            argnames = [a.strip() for a in mark.args[0].split(",")]
            rows = [getattr(v, "values", v) for v in mark.args[1]]
            rows = [r if len(argnames) > 1 else (r,) for r in rows]
            combos = [dict(c, **dict(zip(argnames, r))) for c in combos for r in rows]
        for i, kwargs in enumerate(combos):
            yield pytest.param(name, kwargs, id=f"{name}-{i}")


def _sampler_on_gpu(fn, backend: str, takes_tensor: bool):
    def call(*args, **kwargs):
        if takes_tensor:
            args = (args[0].to(CUDA),) + args[1:]
        else:
            kwargs["device"] = CUDA
        hidden = fn(*args, backend=backend, **kwargs)
        assert hidden.device.type == "cuda"
        return hidden.cpu()

    return call


@pytest.fixture(params=["torch", "cuda-compiled", "cuda-cupy"])
def gpu_backend(request, monkeypatch):
    """The backend under test on the GPU: the reference itself, or the kernels of one source."""
    if not torch.cuda.is_available():
        pytest.skip("requires a CUDA GPU (none visible to torch)")
    if request.param == "torch":
        yield "torch"
        return
    source = request.param.split("-")[1]
    monkeypatch.setenv(native.SOURCE_ENV, source)
    native._reset()
    why = native.unavailable_reason()
    if why is not None:
        native._reset()
        pytest.skip(f"{source} kernels unavailable: {why}")
    yield "cuda"
    native._reset()


@pytest.mark.requires_cuda
@pytest.mark.parametrize("name,kwargs", list(_stat_cases()))
def test_statistics_on_gpu(gpu_backend, monkeypatch, name, kwargs):
    module = _stat_module(name)
    # Each test module calls its own sampler by name: that name is the one to swap.
    for sampler, takes_tensor in (("tube_mask", False), ("multiblock_mask", False), ("semantic_mask", True)):
        if hasattr(module, sampler):
            monkeypatch.setattr(module, sampler, _sampler_on_gpu(getattr(ops_masks, sampler), gpu_backend, takes_tensor))
    getattr(module, name)(**kwargs)
