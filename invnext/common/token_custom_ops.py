"""``torch.library`` glue shared by the token-op backends (docs/ops_contract.md, "Custom ops").

``define_token_ops`` registers ``invnext::gather_visible_<backend>_fwd`` / ``_bwd`` and
``invnext::scatter_tokens_<backend>_fwd`` / ``_bwd`` around a backend's four launchers: the
schemas, the fakes (``total`` is ``index.shape[0]``, so no output size depends on tensor
values) and the autograd formulas, so ``torch.compile`` keeps every launch as one graph node.

Gradients (``keep`` drops the ones autograd did not ask for)::

    gather_visible:  (dx, dpos, dprefix) = gather_bwd(grad, ...)
    scatter_tokens:  (dpacked, dmask_token, dpos summed over the batch) = scatter_bwd(grad, ...)
                     dpos = grad where every sample has its own ``pos`` (the identity)

Launcher signatures (the real implementations; shapes as in the op table of the contract)::

    gather_forward(x, index, cu_seqlens, pos, prefix) -> out [total, C]
    gather_backward(grad, index, cu_seqlens, B, N, pos_batch, prefix_batch, P,
                    need_x, need_pos, need_prefix) -> (dx [B|0, N, C], dpos [Bp|0, N, C], dprefix [Bq|0, P, C])
    scatter_forward(packed, index, mask_token, pos, batch_size, N) -> (out [B, N, C], inv int32[B*N])
    scatter_backward(grad, index, inv, need_packed, need_mask, need_pos_sum)
                    -> (dpacked [total|0, C], dmask_token [C|0], dpos [1|0, N, C])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def _keep(g: Tensor | None, need: bool) -> Tensor | None:
    return g if need else None


def define_token_ops(
    backend: str,
    *,
    gather_forward: Callable,
    gather_backward: Callable,
    scatter_forward: Callable,
    scatter_backward: Callable,
    device_types: str | Sequence[str] | None = None,
    absent_batch: int = 0,
    sum_pos_grad: Callable[[int, int], bool] = lambda pos_batch, batch_size: pos_batch == 1,
):
    """Register (or, on a second import, look up) the four token ops of ``backend``.

    Args:
        backend: the name part of ``invnext::<op>_<backend>_{fwd,bwd}`` ("triton", "cuda").
        gather_forward, gather_backward, scatter_forward, scatter_backward: the launchers
            (signatures in the module docstring).
        device_types: devices the launchers are registered for (``None``: every device).
        absent_batch: the ``pos_batch`` / ``prefix_batch`` passed to ``gather_backward`` when
            that table is absent (its gradient is then never requested).
        sum_pos_grad: ``(pos.shape[0], batch_size) -> bool``, whether scatter's d pos is the
            grid gradient summed over the batch (by ``scatter_backward``) rather than the
            gradient itself.
    Returns:
        ``(gather_fwd, gather_bwd, scatter_fwd, scatter_bwd)`` op handles.
    """
    names = tuple(f"{op}_{backend}_{p}" for op in ("gather_visible", "scatter_tokens") for p in ("fwd", "bwd"))
    ns = torch.ops.invnext
    if all(hasattr(ns, n) for n in names):
        return tuple(getattr(ns, n) for n in names)  # a second import of the backend's module
    gather_fwd_name, gather_bwd_name, scatter_fwd_name, scatter_bwd_name = names
    op = lambda name: torch.library.custom_op(f"invnext::{name}", mutates_args=(), device_types=device_types)

    @op(gather_fwd_name)
    def gather_fwd(x: Tensor, index: Tensor, cu_seqlens: Tensor, pos: Tensor | None, prefix: Tensor | None) -> Tensor:
        return gather_forward(x, index, cu_seqlens, pos, prefix)

    gather_fwd.register_fake(lambda x, index, cu, pos, prefix: x.new_empty((index.shape[0], x.shape[2])))

    @op(gather_bwd_name)
    def gather_bwd(
        grad: Tensor, index: Tensor, cu_seqlens: Tensor, batch_size: int, N: int, pos_batch: int,
        prefix_batch: int, P: int, need_x: bool, need_pos: bool, need_prefix: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        return gather_backward(
            grad, index, cu_seqlens, batch_size, N, pos_batch, prefix_batch, P, need_x, need_pos, need_prefix
        )

    @gather_bwd.register_fake
    def _(grad, index, cu_seqlens, batch_size, N, pos_batch, prefix_batch, P, need_x, need_pos, need_prefix):
        C = grad.shape[1]
        return (
            grad.new_empty((batch_size if need_x else 0, N, C)),
            grad.new_empty((pos_batch if need_pos else 0, N, C)),
            grad.new_empty((prefix_batch if need_prefix else 0, P, C)),
        )

    def gather_setup(ctx, inputs, output):
        x, index, cu_seqlens, pos, prefix = inputs
        ctx.save_for_backward(index, cu_seqlens)
        B, N, _ = x.shape
        Bp = absent_batch if pos is None else pos.shape[0]
        Bq, P = (absent_batch, 0) if prefix is None else (prefix.shape[0], prefix.shape[1])
        ctx.dims = (B, N, Bp, Bq, P)

    def gather_grad(ctx, grad):
        index, cu_seqlens = ctx.saved_tensors
        need_x, _, _, need_pos, need_prefix = ctx.needs_input_grad
        if not (need_x or need_pos or need_prefix):
            return None, None, None, None, None
        dx, dpos, dprefix = gather_bwd(grad, index, cu_seqlens, *ctx.dims, need_x, need_pos, need_prefix)
        return _keep(dx, need_x), None, None, _keep(dpos, need_pos), _keep(dprefix, need_prefix)

    gather_fwd.register_autograd(gather_grad, setup_context=gather_setup)

    @op(scatter_fwd_name)
    def scatter_fwd(
        packed: Tensor, index: Tensor, mask_token: Tensor, pos: Tensor | None, batch_size: int, N: int
    ) -> tuple[Tensor, Tensor]:
        return scatter_forward(packed, index, mask_token, pos, batch_size, N)

    @scatter_fwd.register_fake
    def _(packed, index, mask_token, pos, batch_size, N):
        out = packed.new_empty((batch_size, N, packed.shape[1]))
        return out, packed.new_empty((batch_size * N,), dtype=torch.int32)

    @op(scatter_bwd_name)
    def scatter_bwd(
        grad: Tensor, index: Tensor, inv: Tensor, need_packed: bool, need_mask: bool, need_pos_sum: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        return scatter_backward(grad, index, inv, need_packed, need_mask, need_pos_sum)

    @scatter_bwd.register_fake
    def _(grad, index, inv, need_packed, need_mask, need_pos_sum):
        _, N, C = grad.shape
        return (
            grad.new_empty((index.shape[0] if need_packed else 0, C)),
            grad.new_empty((C if need_mask else 0,)),
            grad.new_empty((1 if need_pos_sum else 0, N, C)),
        )

    def scatter_setup(ctx, inputs, output):
        _, index, _, pos, batch_size, _ = inputs
        ctx.save_for_backward(index, output[1])
        ctx.pos_sum = pos is not None and sum_pos_grad(pos.shape[0], batch_size)
        ctx.mark_non_differentiable(output[1])

    def scatter_grad(ctx, grad, _dinv):
        index, inv = ctx.saved_tensors
        need_packed, _, need_mask, need_pos = ctx.needs_input_grad[:4]
        pos_sum = need_pos and ctx.pos_sum
        dpacked = dmask = dpos = None
        if need_packed or need_mask or pos_sum:
            dpacked, dmask, dpos = scatter_bwd(grad, index, inv, need_packed, need_mask, pos_sum)
        if need_pos and not pos_sum:
            dpos = grad  # d(out)/d(pos) is the identity when every sample has its own table
        return _keep(dpacked, need_packed), None, _keep(dmask, need_mask), _keep(dpos, need_pos), None, None

    scatter_fwd.register_autograd(scatter_grad, setup_context=scatter_setup)
    return gather_fwd, gather_bwd, scatter_fwd, scatter_bwd
