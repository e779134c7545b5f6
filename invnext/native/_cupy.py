"""The run-time path: ``token_kernels.cuh`` and ``mask_kernels.cuh`` compiled by NVRTC through CuPy.

Used when the prebuilt extension is absent. :class:`CupyKernels` has the same functions,
arguments and integer error codes as ``invnext.native._C`` (csrc/bindings.cpp), and mirrors
the launch choices of ``csrc/token_launch.cuh`` and ``csrc/mask_ops.cu``: change both together.
The mask module is compiled at the first mask call. CuPy caches compiled modules on disk, so
only the first process pays the compile.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

_THREADS = 256
_MAX_BLOCKS = 1 << 24
_GATHER_ROWS = 4  # kGatherRows in token_kernels.cuh
_MAX_INT32 = 2**31 - 1
_OK, _BAD_ARG = 0, 1  # cudaSuccess, cudaErrorInvalidValue
# Mask samplers: INVNEXT_MASK_* of csrc/invnext_native.h, launch shapes of csrc/mask_ops.cu.
MASK_THREADS = 512
MASK_KEY_BYTES = 45056
MASK_MAX_BLOCKS = 1024
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

    # The functions of csrc/bindings.cpp, same argument order.

    def gather_visible_forward(self, out, x, index, cu_seqlens, pos, prefix, total, B, N, C, Bp, Bq, P, dtype, stream):
        if (
            dtype not in _DTYPES
            or not _sizes_ok(total, B, N, C)
            or P < 0
            or (P > 0 and (not prefix or Bq not in (1, B)))
            or (pos and Bp not in (1, B))
            or (total > 0 and C > 0 and not (out and x and index and cu_seqlens))
        ):
            return _BAD_ARG
        if total == 0 or C == 0:
            return _OK
        itemsize = _DTYPES[dtype][1]
        fn, vec = self._kernel("gather_visible_fwd", dtype, _vector_ok(itemsize, C, out, x, pos, prefix))
        grid, block = _row_launch(total, C // vec, _GATHER_ROWS)
        args = (_p(out), _p(x), _p(index), _p(cu_seqlens), _p(pos), _p(prefix), _i(total), _i(B), _i(N), _i(C),
                _i(Bp if pos else 1), _i(Bq if P > 0 else 1), _i(P))
        self._launch(fn, grid, block, args, stream)
        return _OK

    def gather_visible_backward(self, dx, inv, dprefix, grad, index, cu_seqlens, total, B, N, C, Bq, P, dtype, stream):
        if (
            dtype not in _DTYPES
            or not _sizes_ok(total, B, N, C)
            or P < 0
            or (dprefix and P > 0 and Bq not in (1, B))
            or (dx and not inv)
            or (total > 0 and C > 0 and not (grad and index and cu_seqlens))
        ):
            return _BAD_ARG
        if C == 0:
            return _OK
        itemsize = _DTYPES[dtype][1]
        BN = B * N
        if dx:
            self._build_inverse(inv, index, cu_seqlens, total, B, BN, P, stream)
            fn, vec = self._kernel("expand_rows", dtype, _vector_ok(itemsize, C, dx, grad))
            grid, block = _row_launch(BN, C // vec)
            args = (_p(dx), _p(inv), _p(grad), _p(0), _p(0), _i(total), _i(BN), _i(N), _i(C), _i(1))
            self._launch(fn, grid, block, args, stream)
        if dprefix and P > 0:
            fn, vec = self._kernel("prefix_grad", dtype, _vector_ok(itemsize, C, dprefix, grad))
            grid, block = _row_launch(Bq * P, C // vec)
            args = (_p(dprefix), _p(grad), _p(cu_seqlens), _i(total), _i(B), _i(P), _i(Bq), _i(C))
            self._launch(fn, grid, block, args, stream)
        return _OK

    def scatter_tokens_forward(self, out, inv, packed, index, mask_token, pos, total, B, N, C, Bp, dtype, stream):
        if (
            dtype not in _DTYPES
            or not _sizes_ok(total, B, N, C)
            or not inv
            or (pos and Bp not in (1, B))
            or (C > 0 and not (out and mask_token))
            or (total > 0 and not (index and packed))
        ):
            return _BAD_ARG
        BN = B * N
        self._build_inverse(inv, index, 0, total, B, BN, 0, stream)
        if C == 0:
            return _OK
        itemsize = _DTYPES[dtype][1]
        fn, vec = self._kernel("expand_rows", dtype, _vector_ok(itemsize, C, out, packed, mask_token, pos))
        grid, block = _row_launch(BN, C // vec)
        args = (_p(out), _p(inv), _p(packed), _p(mask_token), _p(pos), _i(total), _i(BN), _i(N), _i(C),
                _i(Bp if pos else 1))
        self._launch(fn, grid, block, args, stream)
        return _OK

    def scatter_tokens_backward(self, dpacked, partial, grad, index, inv, total, B, N, C, chunk_rows, dtype, stream):
        if (
            dtype not in _DTYPES
            or not _sizes_ok(total, B, N, C)
            or (C > 0 and not grad)
            or (dpacked and total > 0 and not index)
            or (partial and (not inv or chunk_rows < 1))
        ):
            return _BAD_ARG
        if C == 0:
            return _OK
        itemsize = _DTYPES[dtype][1]
        BN = B * N
        if dpacked and total > 0:
            fn, vec = self._kernel("gather_rows", dtype, _vector_ok(itemsize, C, dpacked, grad))
            grid, block = _row_launch(total, C // vec)
            self._launch(fn, grid, block, (_p(dpacked), _p(grad), _p(index), _i(total), _i(BN), _i(C)), stream)
        if partial:
            fn, vec = self._kernel("masked_colsum", dtype, _vector_ok(itemsize, C, grad))
            pieces = C // vec
            bx = min(_THREADS, (pieces + 31) // 32 * 32)
            chunks = (BN + chunk_rows - 1) // chunk_rows
            grid = ((pieces + bx - 1) // bx, min(chunks, 65535))
            args = (_p(partial), _p(grad), _p(inv), _i(BN), _i(total), _i(C), _i(chunk_rows))
            self._launch(fn, grid, (bx,), args, stream)
        return _OK

    def sum_batch(self, out, inp, B, M, C, dtype, stream):
        if dtype not in _DTYPES or B < 1 or M < 0 or C < 0 or (M > 0 and C > 0 and not (out and inp)):
            return _BAD_ARG
        if M == 0 or C == 0:
            return _OK
        fn, vec = self._kernel("sum_batch", dtype, _vector_ok(_DTYPES[dtype][1], C, out, inp))
        grid, block = _row_launch(M, C // vec)
        self._launch(fn, grid, block, (_p(out), _p(inp), _i(B), _i(M), _i(C)), stream)
        return _OK

    # Mask samplers (csrc/mask_ops.cu, same checks and launch shapes).

    def tube_mask(self, hidden, cu_seqlens, B, T, H, W, num_hidden, seed, P, stream):
        S = H * W
        if not hidden or not _mask_grid_ok(B, T, H, W, cu_seqlens, P) or S * 4 > MASK_KEY_BYTES:
            return _BAD_ARG
        if not 0 <= num_hidden <= S:
            return _BAD_ARG
        args = (_p(hidden), _i(T), np.int32(S), np.int32(num_hidden), np.uint64(seed))
        self._launch(self._mask_fn("invnext_tube_mask_kernel"), (B,), (_mask_threads(S),), args, stream, S * 4)
        self._mask_cu_seqlens(cu_seqlens, B, T * (S - num_hidden), P, stream)
        return _OK

    def multiblock_mask(self, hidden, cu_seqlens, boxes, B, T, H, W, num_blocks, P, stream):
        if not hidden or not boxes or not _mask_grid_ok(B, T, H, W, cu_seqlens, P):
            return _BAD_ARG
        if not 1 <= num_blocks <= MASK_MAX_BLOCKS:
            return _BAD_ARG
        visible = (cu_seqlens + 4) if cu_seqlens else 0
        args = (_p(hidden), _p(visible), _p(boxes), np.int32(T), np.int32(H), np.int32(W), np.int32(num_blocks))
        fn = self._mask_fn("invnext_multiblock_mask_kernel")
        self._launch(fn, (B,), (_mask_threads(T * H * W),), args, stream, num_blocks * _BOX_BYTES)
        self._mask_cu_seqlens(cu_seqlens, B, -1, P, stream)
        return _OK

    def semantic_mask(self, hidden, cu_seqlens, attn, B, T, S, keep, mode, dtype, seed, P, stream):
        if not hidden or not attn or not _mask_grid_ok(B, T, 1, S, cu_seqlens, P) or B * T > _MAX_INT32:
            return _BAD_ARG
        if not 1 <= keep <= S or mode not in (0, 1) or dtype not in _DTYPES:
            return _BAD_ARG
        key_bytes = 8 if mode == 1 or dtype == 3 else 4
        if S * key_bytes > MASK_KEY_BYTES:
            return _BAD_ARG
        name = f"invnext_semantic_mask_{'sample' if mode == 1 else 'topk'}_{_DTYPES[dtype][0]}"
        args = (_p(hidden), _p(attn), np.int32(S), np.int32(keep), np.uint64(seed))
        self._launch(self._mask_fn(name), (B * T,), (_mask_threads(S),), args, stream, S * key_bytes)
        self._mask_cu_seqlens(cu_seqlens, B, T * keep, P, stream)
        return _OK

    def error_string(self, code: int) -> str:
        return str(self._cupy.cuda.runtime.CUDARuntimeError(code))
