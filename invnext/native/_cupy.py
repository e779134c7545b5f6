"""The run-time path: ``token_kernels.cuh`` and ``mask_kernels.cuh`` compiled by NVRTC through CuPy.

Used when the prebuilt extension is absent. :class:`CupyKernels` has the same functions and
integer error codes as ``invnext.native._C`` (csrc/bindings.cpp), with the argument lists of
``invnext.native.c_api``, and mirrors
the launch choices of ``csrc/token_launch.cuh`` and ``csrc/mask_ops.cu``: change both together.
The mask module is compiled at the first mask call. CuPy caches compiled modules on disk, so
only the first process pays the compile.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from invnext.native.c_api import MASK_KEY_BYTES, MASK_MAX_BLOCKS, MASK_THREADS, c_function

_THREADS = 256
_MAX_BLOCKS = 1 << 24
_GATHER_ROWS = 4  # kGatherRows in token_kernels.cuh
_MAX_INT32 = 2**31 - 1
_OK, _BAD_ARG = 0, 1  # cudaSuccess, cudaErrorInvalidValue
_BOX_BYTES = 24  # sizeof(invnext_masks::Box): six ints

# dtype code -> (kernel suffix, element size, elements per 16 bytes)
_DTYPES = {0: ("f32", 4, 4), 1: ("f16", 2, 8), 2: ("bf16", 2, 8), 3: ("f64", 8, 2)}


def kernel_source(name: str = "token_kernels.cuh") -> Path:
    """A kernel header (token_kernels.cuh, mask_kernels.cuh): installed beside this file, or in csrc/ of a checkout."""
    here = Path(__file__).resolve().parent
    for path in (here / name, here.parent.parent / "csrc" / name):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} is neither installed in invnext/native nor in a csrc/ checkout")


def mask_source_text() -> str:
    """mask_kernels.cuh with philox.cuh pasted in place of its #include: one text, so CuPy's
    cache (keyed on the source text) sees a change to either header."""
    mask = kernel_source("mask_kernels.cuh").read_text()
    include = '#include "philox.cuh"'
    if mask.count(include) != 1:
        raise RuntimeError("mask_kernels.cuh must include philox.cuh exactly once")
    text = mask.replace(include, kernel_source("philox.cuh").read_text())
    return "\n".join(line for line in text.splitlines() if line.strip() != "#pragma once") + "\n"


def _vector_ok(itemsize: int, C: int, *ptrs: int) -> bool:
    return (C * itemsize) % 16 == 0 and all(p % 16 == 0 for p in ptrs)


def _row_launch(rows: int, pieces: int, rows_per_thread: int = 1) -> tuple[tuple[int], tuple[int, int]]:
    bx = min(_THREADS, max(32, (pieces + 31) // 32 * 32))
    by = _THREADS // bx
    return (min((rows + by * rows_per_thread - 1) // (by * rows_per_thread), _MAX_BLOCKS),), (bx, by)


def _sizes_ok(total: int, B: int, N: int, C: int) -> bool:
    return total >= 0 and B >= 1 and N >= 1 and C >= 0 and total <= _MAX_INT32 and B * N <= _MAX_INT32


def _bad_token_args(a, *launcher_checks: bool) -> bool:
    """The checks every token launcher of csrc/token_ops.cu makes (dtype code, sizes), or any of its own."""
    return a.dtype not in _DTYPES or not _sizes_ok(a.total, a.B, a.N, a.C) or any(launcher_checks)


def _mask_threads(n: int) -> int:
    """csrc/mask_ops.cu block_threads: a multiple of 32 covering n, at most MASK_THREADS."""
    return min(MASK_THREADS, max(32, (n + 31) // 32 * 32))


def _mask_grid_ok(B: int, T: int, H: int, W: int, cu: int, P: int) -> bool:
    """csrc/mask_ops.cu grid_ok."""
    if min(B, T, H, W) < 1 or P < 0 or B > _MAX_INT32 or T * H * W > _MAX_INT32:
        return False
    return not cu or B * (T * H * W + P) <= _MAX_INT32


def _p(ptr: int) -> np.uint64:
    return np.uint64(ptr)


def _i(v: int) -> np.int64:
    return np.int64(v)


class CupyKernels:
    """NVRTC-compiled twin of ``invnext.native._C`` (pointers and streams are ints)."""

    def __init__(self) -> None:
        import cupy

        self._cupy = cupy
        code = kernel_source().read_text()
        self._module = cupy.RawModule(code=code, options=("--std=c++17",))
        self._functions: dict[str, object] = {}
        self._mask_module = None  # mask_kernels.cuh, compiled at the first mask call
        self._streams: dict[int, object] = {}  # torch stream handle -> CuPy wrapper
        self._fn("invnext_build_inverse")  # compile now, so a failure shows up as the unavailable reason

    def _fn(self, name: str):
        fn = self._functions.get(name)
        if fn is None:
            fn = self._functions[name] = self._module.get_function(name)
        return fn

    def _kernel(self, kind: str, dtype: int, vector: bool):
        suffix, _, vec = _DTYPES[dtype]
        return self._fn(f"invnext_{kind}_{suffix}_v{vec if vector else 1}"), (vec if vector else 1)

    def _stream(self, ptr: int):
        wrapped = self._streams.get(ptr)
        if wrapped is None:
            with warnings.catch_warnings():  # CuPy 14 deprecates ExternalStream; older CuPy has only it
                warnings.simplefilter("ignore", DeprecationWarning)
                wrapped = self._streams[ptr] = self._cupy.cuda.ExternalStream(ptr)
        return wrapped

    def _launch(self, fn, grid, block, args, stream: int, shared_mem: int = 0) -> None:
        with self._stream(stream):
            fn(grid, block, args, shared_mem=shared_mem)

    def _rows(self, kind: str, dtype: int, C: int, rows: int, vector_ptrs, args, stream: int, per_thread: int = 1):
        """A row kernel of ``kind`` over ``rows`` rows of C elements: 16-byte accesses where C and
        every pointer in ``vector_ptrs`` allow them (csrc/token_launch.cuh decides the same way)."""
        fn, vec = self._kernel(kind, dtype, _vector_ok(_DTYPES[dtype][1], C, *vector_ptrs))
        grid, block = _row_launch(rows, C // vec, per_thread)
        self._launch(fn, grid, block, args, stream)

    def _mask_fn(self, name: str):
        if self._mask_module is None:
            self._mask_module = self._cupy.RawModule(code=mask_source_text(), options=("--std=c++17",))
        key = f"mask:{name}"
        fn = self._functions.get(key)
        if fn is None:
            fn = self._functions[key] = self._mask_module.get_function(name)
        return fn

    def _mask_cu_seqlens(self, cu: int, B: int, fixed: int, P: int, stream: int) -> None:
        if cu:
            args = (_p(cu), _i(B), _i(fixed), _i(P))
            self._launch(self._mask_fn("invnext_mask_cu_seqlens"), (1,), (32,), args, stream)

    def _build_inverse(self, inv: int, index: int, cu: int, total: int, B: int, BN: int, P: int, stream: int) -> None:
        self._cupy.cuda.runtime.memsetAsync(inv, 0xFF, BN * 4, stream)
        if total == 0:
            return
        blocks = min((total + _THREADS - 1) // _THREADS, _MAX_BLOCKS)
        self._launch(
            self._fn("invnext_build_inverse"),
            (blocks,),
            (_THREADS,),
            (_p(inv), _p(index), _p(cu), _i(total), _i(B), _i(BN), _i(P)),
            stream,
        )

    # The functions of csrc/bindings.cpp: argument lists from invnext.native.c_api, ``a`` their values.

    @c_function
    def gather_visible_forward(self, a):
        if _bad_token_args(
            a,
            a.P < 0,
            (a.P > 0 and (not a.prefix or a.Bq not in (1, a.B))),
            (a.pos and a.Bp not in (1, a.B)),
            (a.total > 0 and a.C > 0 and not (a.out and a.x and a.index and a.cu_seqlens)),
        ):
            return _BAD_ARG
        if a.total == 0 or a.C == 0:
            return _OK
        args = (_p(a.out), _p(a.x), _p(a.index), _p(a.cu_seqlens), _p(a.pos), _p(a.prefix), _i(a.total), _i(a.B),
                _i(a.N), _i(a.C), _i(a.Bp if a.pos else 1), _i(a.Bq if a.P > 0 else 1), _i(a.P))
        vector_ptrs = (a.out, a.x, a.pos, a.prefix)
        self._rows("gather_visible_fwd", a.dtype, a.C, a.total, vector_ptrs, args, a.stream, _GATHER_ROWS)
        return _OK

    @c_function
    def gather_visible_backward(self, a):
        if _bad_token_args(
            a,
            a.P < 0,
            (a.dprefix and a.P > 0 and a.Bq not in (1, a.B)),
            (a.dx and not a.inv),
            (a.total > 0 and a.C > 0 and not (a.grad and a.index and a.cu_seqlens)),
        ):
            return _BAD_ARG
        if a.C == 0:
            return _OK
        BN = a.B * a.N
        if a.dx:
            self._build_inverse(a.inv, a.index, a.cu_seqlens, a.total, a.B, BN, a.P, a.stream)
            args = (_p(a.dx), _p(a.inv), _p(a.grad), _p(0), _p(0), _i(a.total), _i(BN), _i(a.N), _i(a.C), _i(1))
            self._rows("expand_rows", a.dtype, a.C, BN, (a.dx, a.grad), args, a.stream)
        if a.dprefix and a.P > 0:
            args = (_p(a.dprefix), _p(a.grad), _p(a.cu_seqlens), _i(a.total), _i(a.B), _i(a.P), _i(a.Bq), _i(a.C))
            self._rows("prefix_grad", a.dtype, a.C, a.Bq * a.P, (a.dprefix, a.grad), args, a.stream)
        return _OK

    @c_function
    def scatter_tokens_forward(self, a):
        if _bad_token_args(
            a,
            not a.inv,
            (a.pos and a.Bp not in (1, a.B)),
            (a.C > 0 and not (a.out and a.mask_token)),
            (a.total > 0 and not (a.index and a.packed)),
        ):
            return _BAD_ARG
        BN = a.B * a.N
        self._build_inverse(a.inv, a.index, 0, a.total, a.B, BN, 0, a.stream)
        if a.C == 0:
            return _OK
        args = (_p(a.out), _p(a.inv), _p(a.packed), _p(a.mask_token), _p(a.pos), _i(a.total), _i(BN), _i(a.N),
                _i(a.C), _i(a.Bp if a.pos else 1))
        self._rows("expand_rows", a.dtype, a.C, BN, (a.out, a.packed, a.mask_token, a.pos), args, a.stream)
        return _OK

    @c_function
    def scatter_tokens_backward(self, a):
        if _bad_token_args(
            a,
            (a.C > 0 and not a.grad),
            (a.dpacked and a.total > 0 and not a.index),
            (a.partial and (not a.inv or a.chunk_rows < 1)),
        ):
            return _BAD_ARG
        if a.C == 0:
            return _OK
        BN = a.B * a.N
        if a.dpacked and a.total > 0:
            args = (_p(a.dpacked), _p(a.grad), _p(a.index), _i(a.total), _i(BN), _i(a.C))
            self._rows("gather_rows", a.dtype, a.C, a.total, (a.dpacked, a.grad), args, a.stream)
        if a.partial:
            fn, vec = self._kernel("masked_colsum", a.dtype, _vector_ok(_DTYPES[a.dtype][1], a.C, a.grad))
            pieces = a.C // vec
            bx = min(_THREADS, (pieces + 31) // 32 * 32)
            chunks = (BN + a.chunk_rows - 1) // a.chunk_rows
            grid = ((pieces + bx - 1) // bx, min(chunks, 65535))
            args = (_p(a.partial), _p(a.grad), _p(a.inv), _i(BN), _i(a.total), _i(a.C), _i(a.chunk_rows))
            self._launch(fn, grid, (bx,), args, a.stream)
        return _OK

    @c_function
    def sum_batch(self, a):
        if a.dtype not in _DTYPES or a.B < 1 or a.M < 0 or a.C < 0 or (a.M > 0 and a.C > 0 and not (a.out and a.inp)):
            return _BAD_ARG
        if a.M == 0 or a.C == 0:
            return _OK
        args = (_p(a.out), _p(a.inp), _i(a.B), _i(a.M), _i(a.C))
        self._rows("sum_batch", a.dtype, a.C, a.M, (a.out, a.inp), args, a.stream)
        return _OK

    # Mask samplers (csrc/mask_ops.cu, same checks and launch shapes).

    @c_function
    def tube_mask(self, a):
        S = a.H * a.W
        if not a.hidden or not _mask_grid_ok(a.B, a.T, a.H, a.W, a.cu_seqlens, a.P) or S * 4 > MASK_KEY_BYTES:
            return _BAD_ARG
        if not 0 <= a.num_hidden <= S:
            return _BAD_ARG
        args = (_p(a.hidden), _i(a.T), np.int32(S), np.int32(a.num_hidden), np.uint64(a.seed))
        self._launch(self._mask_fn("invnext_tube_mask_kernel"), (a.B,), (_mask_threads(S),), args, a.stream, S * 4)
        self._mask_cu_seqlens(a.cu_seqlens, a.B, a.T * (S - a.num_hidden), a.P, a.stream)
        return _OK

    @c_function
    def multiblock_mask(self, a):
        if not a.hidden or not a.boxes or not _mask_grid_ok(a.B, a.T, a.H, a.W, a.cu_seqlens, a.P):
            return _BAD_ARG
        if not 1 <= a.num_blocks <= MASK_MAX_BLOCKS:
            return _BAD_ARG
        visible = (a.cu_seqlens + 4) if a.cu_seqlens else 0
        args = (_p(a.hidden), _p(visible), _p(a.boxes), np.int32(a.T), np.int32(a.H), np.int32(a.W),
                np.int32(a.num_blocks))
        fn = self._mask_fn("invnext_multiblock_mask_kernel")
        self._launch(fn, (a.B,), (_mask_threads(a.T * a.H * a.W),), args, a.stream, a.num_blocks * _BOX_BYTES)
        self._mask_cu_seqlens(a.cu_seqlens, a.B, -1, a.P, a.stream)
        return _OK

    @c_function
    def semantic_mask(self, a):
        B, T, S = a.B, a.T, a.S
        if not a.hidden or not a.attn or not _mask_grid_ok(B, T, 1, S, a.cu_seqlens, a.P) or B * T > _MAX_INT32:
            return _BAD_ARG
        if not 1 <= a.keep <= S or a.mode not in (0, 1) or a.dtype not in _DTYPES:
            return _BAD_ARG
        key_bytes = 8 if a.mode == 1 or a.dtype == 3 else 4
        if S * key_bytes > MASK_KEY_BYTES:
            return _BAD_ARG
        name = f"invnext_semantic_mask_{'sample' if a.mode == 1 else 'topk'}_{_DTYPES[a.dtype][0]}"
        args = (_p(a.hidden), _p(a.attn), np.int32(S), np.int32(a.keep), np.uint64(a.seed))
        self._launch(self._mask_fn(name), (B * T,), (_mask_threads(S),), args, a.stream, S * key_bytes)
        self._mask_cu_seqlens(a.cu_seqlens, B, T * a.keep, a.P, a.stream)
        return _OK

    def error_string(self, code: int) -> str:
        return str(self._cupy.cuda.runtime.CUDARuntimeError(code))
