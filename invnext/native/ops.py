"""CUDA implementations of the token ops (csrc/), with the canonical signatures of
docs/ops_contract.md. Each pass is a ``torch.library`` custom op (``invnext::gather_visible_cuda_fwd``
/ ``_bwd``, ``invnext::scatter_tokens_cuda_fwd`` / ``_bwd``) with a fake and a registered autograd
formula, so ``torch.compile`` keeps it as one graph node; it launches the kernels on torch's
current stream. Adds and sums run in fp32 (fp64 for fp64) and are rounded once.

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

import torch

from invnext import native
from invnext.common.token_custom_ops import define_token_ops
from invnext.common.registry import implements
from invnext.native._launch import DTYPE_CODE as _DTYPE_CODE
from invnext.native._launch import check as _check
from invnext.native._launch import on as _on
from invnext.native._launch import ptr as _ptr
from invnext.native._launch import stream as _stream

# Places per partial row of the d mask_token reduction (one fp32 row of C per chunk).
_CHUNK_ROWS = 256


def _dtype_code(op: str, t: torch.Tensor) -> int:
    code = _DTYPE_CODE.get(t.dtype)
    if code is None:
        names = ", ".join(str(d).replace("torch.", "") for d in _DTYPE_CODE)
        raise TypeError(f"{op}: the CUDA kernels take {names}; got {str(t.dtype).replace('torch.', '')}")
    return code


# ----------------------------------------------------------------------------------------
# launchers (the real implementations of the custom ops below)
# ----------------------------------------------------------------------------------------
def _gather_forward(x, index, cu_seqlens, pos, prefix):
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
    return out


def _gather_backward(grad, index, cu_seqlens, B, N, pos_batch, prefix_batch, P, need_x, need_pos, need_prefix):
    """(dx, dpos, dprefix); a gradient that is not needed comes back with a leading dim of 0."""
    lib = native.kernels()
    total, C = grad.shape
    dtype = _dtype_code("gather_visible", grad)
    grad = grad.contiguous()
    empty = lambda *shape: torch.empty(*shape, dtype=grad.dtype, device=grad.device)
    dx = empty(B * N, C) if need_x or need_pos else None  # d pos is derived from d x
    inv = torch.empty(B * N, dtype=torch.int32, device=grad.device) if dx is not None else None
    dprefix = empty(prefix_batch if need_prefix else 0, P, C)
    dpos = empty(0, N, C)
    with _on(grad.device):
        stream = _stream(grad.device)
        if dx is not None or need_prefix:
            code = lib.gather_visible_backward(
                _ptr(dx), _ptr(inv), _ptr(dprefix if need_prefix else None), _ptr(grad), _ptr(index),
                _ptr(cu_seqlens), total, B, N, C, prefix_batch, P, dtype, stream,
            )  # fmt: skip
            _check(lib, code, "gather_visible backward")
        if need_pos:
            if pos_batch == B:
                dpos = dx.view(B, N, C).clone() if need_x else dx.view(B, N, C)
            else:
                dpos = empty(1, N, C)
                _check(lib, lib.sum_batch(_ptr(dpos), _ptr(dx), B, N, C, dtype, stream), "sum_batch")
    dx = dx.view(B, N, C) if need_x else empty(0, N, C)
    return dx, dpos, dprefix


def _scatter_forward(packed, index, mask_token, pos, batch_size, N):
    """(out [B, N, C], inv int32[B*N]); ``inv`` is kept for the backward."""
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
    return out, inv


def _scatter_backward(grad, index, inv, need_packed, need_mask, need_pos_sum):
    """(dpacked [total, C], dmask_token [C], dpos summed over the batch [1, N, C]); an output
    that is not needed has a leading dim of 0 (a per-sample ``pos`` gets ``grad`` itself)."""
    lib = native.kernels()
    B, N, C = grad.shape
    total = index.shape[0]
    dtype = _dtype_code("scatter_tokens", grad)
    grad = grad.contiguous()
    empty = lambda *shape: torch.empty(*shape, dtype=grad.dtype, device=grad.device)
    dpacked = empty(total if need_packed else 0, C)
    dpos = empty(1 if need_pos_sum else 0, N, C)
    partial = None
    if need_mask:
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        partial = torch.empty(-(-(B * N) // _CHUNK_ROWS), C, dtype=acc, device=grad.device)
    with _on(grad.device):
        stream = _stream(grad.device)
        if need_packed or need_mask:
            code = lib.scatter_tokens_backward(
                _ptr(dpacked if need_packed else None), _ptr(partial), _ptr(grad), _ptr(index), _ptr(inv),
                total, B, N, C, _CHUNK_ROWS, dtype, stream,
            )  # fmt: skip
            _check(lib, code, "scatter_tokens backward")
        if need_pos_sum:
            _check(lib, lib.sum_batch(_ptr(dpos), _ptr(grad), B, N, C, dtype, stream), "sum_batch")
    dmask = partial.sum(0).to(grad.dtype) if need_mask else empty(0)
    return dpacked, dmask, dpos


# ----------------------------------------------------------------------------------------
# torch.library ops (docs/ops_contract.md, "Custom ops"): CUDA only; the fakes give the
# launchers' shapes (``total`` is ``index.shape[0]``), so torch.compile traces them on any host.
# ----------------------------------------------------------------------------------------
_OP_NAMES = ("gather_visible_cuda_fwd", "gather_visible_cuda_bwd", "scatter_tokens_cuda_fwd", "scatter_tokens_cuda_bwd")

(
    gather_visible_cuda_fwd,
    gather_visible_cuda_bwd,
    scatter_tokens_cuda_fwd,
    scatter_tokens_cuda_bwd,
) = define_token_ops(
    "cuda",
    gather_forward=_gather_forward,
    gather_backward=_gather_backward,
    scatter_forward=_scatter_forward,
    scatter_backward=_scatter_backward,
    device_types="cuda",
    # An absent table has batch 1, as the forward launcher passes it to the kernels; d pos is
    # grad itself whenever pos has the grid's batch (also for batch_size = 1).
    absent_batch=1,
    sum_pos_grad=lambda pos_batch, batch_size: pos_batch != batch_size,
)


# ----------------------------------------------------------------------------------------
# public entries (canonical signatures). Named ``<op>_cuda``: they take the packed structure
# (index, cu_seqlens) that ``invnext.ops.gather_visible`` builds from the mask, so they are
# not that op's signature and must not pass for it.
# ----------------------------------------------------------------------------------------
@implements("gather_visible", "cuda")
def gather_visible_cuda(
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
    # The kernels need a non-empty grid; the public op does not require one (the reference takes B = 0 or N = 0).
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"gather_visible: x must have shape [B >= 1, N >= 1, C], got {list(x.shape)}")
    contig = lambda t: None if t is None else t.contiguous()
    return gather_visible_cuda_fwd(
        x.contiguous(), index.contiguous(), cu_seqlens.contiguous(), contig(pos), contig(prefix)
    )


@implements("scatter_tokens", "cuda")
def scatter_tokens_cuda(
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
    out, _ = scatter_tokens_cuda_fwd(
        packed.contiguous(), index.contiguous(), mask_token.contiguous(), None if pos is None else pos.contiguous(),
        batch_size, N,
    )  # fmt: skip
    return out
