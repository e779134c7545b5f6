"""CUDA implementations of the token ops (csrc/), with the canonical signatures of
docs/ops_contract.md. Each op is one ``torch.autograd.Function`` that launches the kernels
on torch's current stream; adds and sums run in fp32 (fp64 for fp64) and are rounded once.

Gradients::

    gather_visible:  d x     = grad rows put back at index (zeros elsewhere)
                     d pos   = d x (pos batch B) or d x summed over the batch (batch 1)
                     d prefix = the grads of the prefix rows (summed over samples for batch 1)
    scatter_tokens:  d packed = grad[index] (zeros for rows with index -1)
                     d mask_token = grad summed over the places no row fills
                     d pos   = grad (batch B) or grad summed over the batch (batch 1)

Both ops take ``index`` entries as distinct (gather_visible's packing guarantees it). The
position row of a gathered token is ``pos[index // N or 0, index % N]``, which is the
contract's ``pos[b or 0, index % N]`` because sample b's tokens lie in ``[b*N, (b+1)*N)``;
keying it on the index makes d pos a function of d x alone.
"""
from __future__ import annotations

import contextlib

import torch

from invnext import native

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
# Places per partial row of the d mask_token reduction (one fp32 row of C per chunk).
_CHUNK_ROWS = 256


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _check(lib, code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"invnext CUDA kernel {what} failed: {lib.error_string(code)} (cudaError {code})")


def _dtype_code(op: str, t: torch.Tensor) -> int:
    code = _DTYPE_CODE.get(t.dtype)
    if code is None:
        names = ", ".join(str(d).replace("torch.", "") for d in _DTYPE_CODE)
        raise TypeError(f"{op}: the CUDA kernels take {names}; got {str(t.dtype).replace('torch.', '')}")
    return code


def _require_cuda(op: str, **tensors: torch.Tensor | None) -> torch.device:
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"{op}: the CUDA kernels need CUDA tensors; {name} is on {t.device}")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")
    return device


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _on(device: torch.device):
    """Make ``device`` current for the launch (the kernels run on the current device)."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()  # the common case; a device switch costs microseconds
    return torch.cuda.device(device)


class _GatherVisible(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, cu_seqlens, pos, prefix):
        lib = native.kernels()
        B, N, C = x.shape
        total = index.shape[0]
        Bp = pos.shape[0] if pos is not None else 1
        Bq, P = (prefix.shape[0], prefix.shape[1]) if prefix is not None else (1, 0)
        dtype = _dtype_code("gather_visible", x)
        out = torch.empty(total, C, dtype=x.dtype, device=x.device)
        with _on(x.device):
            code = lib.gather_visible_forward(
                _ptr(out), _ptr(x), _ptr(index), _ptr(cu_seqlens), _ptr(pos), _ptr(prefix),
                total, B, N, C, Bp, Bq, P, dtype, _stream(x.device),
            )  # fmt: skip
        _check(lib, code, "gather_visible forward")
        ctx.save_for_backward(index, cu_seqlens)
        ctx.dims = (B, N, C, Bp, Bq, P, total, dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        lib = native.kernels()
        index, cu_seqlens = ctx.saved_tensors
        B, N, C, Bp, Bq, P, total, dtype = ctx.dims
        need_x, _, _, need_pos, need_prefix = ctx.needs_input_grad
        grad = grad.contiguous()
        dx = inv = dprefix = dpos = None
        if need_x or need_pos:
            dx = torch.empty(B * N, C, dtype=grad.dtype, device=grad.device)
            inv = torch.empty(B * N, dtype=torch.int32, device=grad.device)
        if need_prefix:
            dprefix = torch.empty(Bq, P, C, dtype=grad.dtype, device=grad.device)
        with _on(grad.device):
            stream = _stream(grad.device)
            if dx is not None or dprefix is not None:
                code = lib.gather_visible_backward(
                    _ptr(dx), _ptr(inv), _ptr(dprefix), _ptr(grad), _ptr(index), _ptr(cu_seqlens),
                    total, B, N, C, Bq, P, dtype, stream,
                )  # fmt: skip
                _check(lib, code, "gather_visible backward")
            if need_pos:
                if Bp == B:
                    dpos = dx.view(B, N, C).clone() if need_x else dx.view(B, N, C)
                else:
                    dpos = torch.empty(1, N, C, dtype=grad.dtype, device=grad.device)
                    _check(lib, lib.sum_batch(_ptr(dpos), _ptr(dx), B, N, C, dtype, stream), "sum_batch")
        return (dx.view(B, N, C) if need_x else None), None, None, dpos, dprefix


class _ScatterTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed, index, mask_token, pos, batch_size, N):
        lib = native.kernels()
        total, C = packed.shape
        B = batch_size
        Bp = pos.shape[0] if pos is not None else 1
        dtype = _dtype_code("scatter_tokens", packed)
        out = torch.empty(B, N, C, dtype=packed.dtype, device=packed.device)
        inv = torch.empty(B * N, dtype=torch.int32, device=packed.device)
        with _on(packed.device):
            code = lib.scatter_tokens_forward(
                _ptr(out), _ptr(inv), _ptr(packed), _ptr(index), _ptr(mask_token), _ptr(pos),
                total, B, N, C, Bp, dtype, _stream(packed.device),
            )  # fmt: skip
        _check(lib, code, "scatter_tokens forward")
        ctx.save_for_backward(index, inv)
        ctx.dims = (B, N, C, Bp, total, dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        lib = native.kernels()
        index, inv = ctx.saved_tensors
        B, N, C, Bp, total, dtype = ctx.dims
        need_packed, _, need_mask, need_pos = ctx.needs_input_grad[:4]
        grad = grad.contiguous()
        dpacked = partial = dmask = dpos = None
        if need_packed:
            dpacked = torch.empty(total, C, dtype=grad.dtype, device=grad.device)
        if need_mask:
            acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
            chunks = -(-(B * N) // _CHUNK_ROWS)
            partial = torch.empty(chunks, C, dtype=acc, device=grad.device)
        with _on(grad.device):
            stream = _stream(grad.device)
            if dpacked is not None or partial is not None:
                code = lib.scatter_tokens_backward(
                    _ptr(dpacked), _ptr(partial), _ptr(grad), _ptr(index), _ptr(inv),
                    total, B, N, C, _CHUNK_ROWS, dtype, stream,
                )  # fmt: skip
                _check(lib, code, "scatter_tokens backward")
            if need_pos:
                if Bp == B:
                    dpos = grad
                else:
                    dpos = torch.empty(1, N, C, dtype=grad.dtype, device=grad.device)
                    _check(lib, lib.sum_batch(_ptr(dpos), _ptr(grad), B, N, C, dtype, stream), "sum_batch")
        if partial is not None:
            dmask = partial.sum(0).to(grad.dtype)
        return dpacked, None, dmask, dpos, None, None


def gather_visible(
    x: torch.Tensor,
    index: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pos: torch.Tensor | None,
    prefix: torch.Tensor | None,
) -> torch.Tensor:
    """Packed rows of ``x`` (docs/ops_contract.md, gather_visible) on the GPU.

    Args:
        x: [B, N, C] float32/float16/bfloat16/float64, CUDA.
        index: int64[total], flat place ``b*N + n`` of each packed row (prefix rows: ignored).
        cu_seqlens: int32[B+1], sample b owns rows ``cu_seqlens[b] : cu_seqlens[b+1]``.
        pos: [1 or B, N, C] or None, added to every gathered token.
        prefix: [1 or B, P, C] or None, the first P rows of every sample.
    Returns:
        [total, C] in x's dtype; differentiable w.r.t. x, pos and prefix.
    """
    op = "gather_visible"
    _require_cuda(op, x=x, index=index, cu_seqlens=cu_seqlens, pos=pos, prefix=prefix)
    _dtype_code(op, x)
    if x.dim() != 3 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{op}: x must have shape [B >= 1, N >= 1, C], got {list(x.shape)}")
    # One dtype for the kernel: tables follow x (a no-op when they already match).
    pos = None if pos is None else pos.to(x.dtype).contiguous()
    prefix = None if prefix is None else prefix.to(x.dtype).contiguous()
    return _GatherVisible.apply(
        x.contiguous(), index.to(torch.int64).contiguous(), cu_seqlens.to(torch.int32).contiguous(), pos, prefix
    )


def scatter_tokens(
    packed: torch.Tensor,
    index: torch.Tensor,
    mask_token: torch.Tensor,
    pos: torch.Tensor | None,
    batch_size: int,
    N: int,
) -> torch.Tensor:
    """Packed rows back on the [B, N, C] grid (docs/ops_contract.md, scatter_tokens) on the GPU.

    Args:
        packed: [total, C] float32/float16/bfloat16/float64, CUDA.
        index: int64[total], the place of each row; -1 (or any value outside [0, B*N)) drops the row.
        mask_token: [C], written at every place no row fills.
        pos: [1 or B, N, C] or None, added at every place.
        batch_size, N: the grid.
    Returns:
        [B, N, C] in packed's dtype; differentiable w.r.t. packed, mask_token and pos.
    """
    op = "scatter_tokens"
    _require_cuda(op, packed=packed, index=index, mask_token=mask_token, pos=pos)
    _dtype_code(op, packed)
    if batch_size < 1 or N < 1:
        raise ValueError(f"{op}: batch_size and N must be >= 1, got {batch_size} and {N}")
    mask_token = mask_token.to(packed.dtype).contiguous()
    pos = None if pos is None else pos.to(packed.dtype).contiguous()
    return _ScatterTokens.apply(packed.contiguous(), index.to(torch.int64).contiguous(), mask_token, pos, batch_size, N)
