"""The C API of ``csrc/invnext_native.h`` as data: each launcher's typed argument list, the dtype
and mask-mode codes and the mask samplers' limits, written once.

The header and ``csrc/bindings.cpp`` are C++ and are compiled as they are; the tests check both
against this table (tests/test_native.py, tests/test_masks_native.py). The Python twins of the C
functions take their argument lists from here: the CuPy/NVRTC launchers (``invnext.native._cupy``)
and the tests' emulations of the C API define each function with :func:`c_function`. Imports
nothing, so reading it loads no torch, CuPy or extension.
"""
from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace
from typing import Callable

ABI = 1  # INVNEXT_NATIVE_ABI
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}  # enum invnext_dtype
MASK_MODES = {"topk": 0, "sample": 1}  # enum invnext_mask_mode
MASK_THREADS = 512  # INVNEXT_MASK_THREADS
MASK_KEY_BYTES = 45056  # INVNEXT_MASK_KEY_BYTES
MASK_MAX_BLOCKS = 1024  # INVNEXT_MASK_MAX_BLOCKS

# Every launcher returns an int cudaError_t; the name drops the header's ``invnext_`` prefix.
FUNCTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "gather_visible_forward": (
        ("void*", "out"), ("const void*", "x"), ("const int64_t*", "index"), ("const int32_t*", "cu_seqlens"),
        ("const void*", "pos"), ("const void*", "prefix"), ("int64_t", "total"), ("int64_t", "B"), ("int64_t", "N"),
        ("int64_t", "C"), ("int64_t", "Bp"), ("int64_t", "Bq"), ("int64_t", "P"), ("int", "dtype"),
        ("uintptr_t", "stream"),
    ),
    "gather_visible_backward": (
        ("void*", "dx"), ("int32_t*", "inv"), ("void*", "dprefix"), ("const void*", "grad"),
        ("const int64_t*", "index"), ("const int32_t*", "cu_seqlens"), ("int64_t", "total"), ("int64_t", "B"),
        ("int64_t", "N"), ("int64_t", "C"), ("int64_t", "Bq"), ("int64_t", "P"), ("int", "dtype"),
        ("uintptr_t", "stream"),
    ),
    "scatter_tokens_forward": (
        ("void*", "out"), ("int32_t*", "inv"), ("const void*", "packed"), ("const int64_t*", "index"),
        ("const void*", "mask_token"), ("const void*", "pos"), ("int64_t", "total"), ("int64_t", "B"),
        ("int64_t", "N"), ("int64_t", "C"), ("int64_t", "Bp"), ("int", "dtype"), ("uintptr_t", "stream"),
    ),
    "scatter_tokens_backward": (
        ("void*", "dpacked"), ("void*", "partial"), ("const void*", "grad"), ("const int64_t*", "index"),
        ("const int32_t*", "inv"), ("int64_t", "total"), ("int64_t", "B"), ("int64_t", "N"), ("int64_t", "C"),
        ("int64_t", "chunk_rows"), ("int", "dtype"), ("uintptr_t", "stream"),
    ),
    "sum_batch": (
        ("void*", "out"), ("const void*", "in"), ("int64_t", "B"), ("int64_t", "M"), ("int64_t", "C"),
        ("int", "dtype"), ("uintptr_t", "stream"),
    ),
    "tube_mask": (
        ("uint8_t*", "hidden"), ("int32_t*", "cu_seqlens"), ("int64_t", "B"), ("int64_t", "T"), ("int64_t", "H"),
        ("int64_t", "W"), ("int64_t", "num_hidden"), ("uint64_t", "seed"), ("int64_t", "P"), ("uintptr_t", "stream"),
    ),
    "multiblock_mask": (
        ("uint8_t*", "hidden"), ("int32_t*", "cu_seqlens"), ("const int32_t*", "boxes"), ("int64_t", "B"),
        ("int64_t", "T"), ("int64_t", "H"), ("int64_t", "W"), ("int64_t", "num_blocks"), ("int64_t", "P"),
        ("uintptr_t", "stream"),
    ),
    "semantic_mask": (
        ("uint8_t*", "hidden"), ("int32_t*", "cu_seqlens"), ("const void*", "attn"), ("int64_t", "B"),
        ("int64_t", "T"), ("int64_t", "S"), ("int64_t", "keep"), ("int", "mode"), ("int", "dtype"),
        ("uint64_t", "seed"), ("int64_t", "P"), ("uintptr_t", "stream"),
    ),
}

# C names that are Python keywords: bindings.cpp's py::arg spells them so.
_PYTHON_NAMES = {"in": "inp"}


def argument_names(function: str) -> tuple[str, ...]:
    """The Python names of ``function``'s arguments, in the header's order."""
    return tuple(_PYTHON_NAMES.get(name, name) for _, name in FUNCTIONS[function])


def c_declaration(function: str) -> str:
    """The header's prototype of ``function``, whitespace normalised."""
    return f"int invnext_{function}({', '.join(f'{t} {n}' for t, n in FUNCTIONS[function])});"


def c_function(body: Callable) -> Callable:
    """A method with the arguments of the C function it is named after, from :data:`FUNCTIONS`.

    ``body(self, a)`` gets the arguments as ``a``, a namespace with one attribute per argument
    (``a.out``, ``a.total``, ...); the method takes them positionally in the header's order or
    by name, as the compiled extension does.
    """
    names = argument_names(body.__name__)
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)]
    params += [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    signature = inspect.Signature(params)

    @functools.wraps(body)
    def method(self, *args, **kwargs):
        if kwargs or len(args) != len(names):  # the callers' usual form (all positional) skips bind's cost
            args = signature.bind(self, *args, **kwargs).arguments
            args = [args[n] for n in names]
        return body(self, SimpleNamespace(**dict(zip(names, args))))

    method.__signature__ = signature
    return method
