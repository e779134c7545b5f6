"""Launch conventions of every ctypes call into the CUDA kernels (csrc/invnext_native.h), shared by
``invnext.native.ops`` (tokens) and ``invnext.native.masks`` so both read one dtype table, one
error message and one rule for the device and stream a kernel runs on.

The two modules import these names into their own namespace and call them from there, so a
test can swap ``_on`` / ``_stream`` per module.
"""
from __future__ import annotations

import contextlib

import torch

from invnext.native.c_api import DTYPE_CODES

DTYPE_CODE = {getattr(torch, name): code for name, code in DTYPE_CODES.items()}


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def check(lib, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"invnext CUDA kernel {what} failed: {lib.error_string(code)} (cudaError {code})")


def stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def on(device: torch.device):
    """Make ``device`` current for the launch (the kernels run on the current device)."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()  # the common case; a device switch costs microseconds
    return torch.cuda.device(device)
