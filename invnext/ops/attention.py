"""Masked attention over a ragged batch: the public op and its pure-PyTorch reference.

``masked_attention(q, k, v, cu_seqlens, max_seqlen, *, softmax_scale, coords, rope, window,
num_prefix, backend)`` computes, for every token ``i`` of sample ``b`` and head ``h``::

    out[i, h] = sum_j softmax_j( scale * <R_i q[i, h], R_j k[j, h]> + bias_ij ) v[j, h]

over the keys ``j`` of the same sample, where ``bias_ij = 0`` if ``i`` may attend to ``j``
and ``-inf`` otherwise, and ``R_i`` is the 3D RoPE rotation of token ``i`` (identity without
``rope`` and for prefix tokens; see :mod:`invnext.ops.rope`). ``scale`` defaults to
``1 / sqrt(D)``.

Who may attend to whom (``p`` = a token's position within its sample, 0-based):

* Samples never see each other (block-diagonal over ``cu_seqlens``).
* The first ``num_prefix`` tokens of every sample are prefix (class) tokens: never rotated;
  every query of the sample attends to every prefix key, and a prefix query attends to every
  key of its sample, whatever the window.
* ``window=None``: every token sees its whole sample.
* ``window=w`` (int >= 1, 1D): non-prefix ``i`` sees non-prefix ``j`` iff
  ``|p_i - p_j| <= w // 2`` (a ModernBERT local window of 128 is half-width 64).
* ``window=(wt, wh, ww)`` (ints >= 1, needs ``coords``): non-prefix ``i`` sees non-prefix ``j``
  iff ``|dt| <= wt // 2 and |dh| <= wh // 2 and |dw| <= ww // 2`` on their (t, h, w) coords.
  ``(1, 1, 1)`` lets a grid token see only itself (plus the prefix).

A token always sees itself, so no softmax row is ever empty. The coordinates of prefix rows
are ignored everywhere (they may hold anything).

Inputs: ``q, k, v`` ``[total, H, D]`` of one float dtype (float32/float16/bfloat16/float64) and
device, or one packed ``qkv[total, 3, H, D]`` passed as ``q`` with ``k = v = None``; head dim
``D`` in [16, 256] (the Triton kernel takes 16..128; ``auto`` on a GPU warns when it falls back
to the reference for a larger one); ``cu_seqlens`` int32 or int64 ``[B+1]`` (None = one sample
of all ``total`` tokens); ``max_seqlen`` an int >= every sample
length (None = computed from ``cu_seqlens``, a host sync on GPU); ``coords`` int32/int64
``[total, 3]``, needed by ``rope`` and a 3D ``window`` (passed on as int32).
Output: ``[total, H, D]`` in q's dtype.

The reference computes in float32 (float64 for float64 inputs) and rounds once at the end.
"""
from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from invnext.common import validate as V
from invnext.ops._dispatch import dispatch, register_reference
from invnext.ops.rope import COORD_DTYPES, apply_rope_3d, check_rope

_OP = "masked_attention"
HEAD_DIM_RANGE = (16, 256)

# Score elements (heads x query rows x keys) materialised at once per sample; bounds the
# reference's forward memory on long samples (a 4096-token, 16-head sample runs in 16 chunks).
_CHUNK_ELEMENTS = 1 << 24

# The padded path (one SDPA call over [B, H, Lmax, D]) runs while B * H * Lmax^2 stays at or
# below this. That product is the padded score matrix: what SDPA's math kernel holds (128 MiB
# in float32 at the limit, a few such tensors with the backward), and the work a fused kernel
# spends, padding included (fused kernels hold only the mask, [B, 1, Lmax, Lmax] at most).
# Past it, e.g. when one long sample pads many short ones, the per-sample loop costs less.
_PADDED_ELEMENTS = 1 << 25
_CUDA_MASK_BYTES = 1 << 30  # a windowed padded batch's bool mask on the GPU

# On the CPU the padded path pins SDPA to its math kernel, the formulation the per-sample loop
# gets (SDPA takes its 3D calls there). The fused CPU kernel is ~20% faster on the tiny
# preset's shapes, but its float32 gradients land 2-5x further from float64 than the math
# kernel's, past kernels.md's 3x rule; True lets SDPA choose. CUDA always lets SDPA choose.
_CPU_FUSED_SDPA = False


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_OP}: {name} must be an int, got {type(value).__name__} {value!r}")
    return value


def _check_window(window: object, coords: torch.Tensor | None) -> None | int | tuple[int, int, int]:
    if window is None:
        return None
    if isinstance(window, (tuple, list)):
        if not (len(window) == 3 and all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
            raise TypeError(f"{_OP}: window must be None, an int or three ints (wt, wh, ww), got {window!r}")
        if any(w < 1 for w in window):
            raise ValueError(f"{_OP}: window sizes must be >= 1, got {tuple(window)}")
        if coords is None:
            raise ValueError(f"{_OP}: window={tuple(window)} is spatio-temporal and needs coords[total, 3]")
        return tuple(window)  # type: ignore[return-value]
    w = _check_int("window", window)
    if w < 1:
        raise ValueError(f"{_OP}: window must be >= 1, got {w}")
    return w


def _unpack_qkv(q: object, k: object, v: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    V.check_tensor(_OP, "q", q, ndim=(3, 4), dtypes=V.FLOAT_DTYPES)
    if k is None and v is None:
        if q.dim() != 4 or q.shape[1] != 3:
            raise ValueError(f"{_OP}: with k=v=None, q must be a packed qkv[total, 3, H, D], got shape {list(q.shape)}")
        return q.unbind(1)  # strided views, no copy
    if k is None or v is None:
        given = "k" if v is None else "v"
        raise ValueError(f"{_OP}: pass both k and v, or neither (packed qkv in q); got {given} only")
    if q.dim() != 3:
        raise ValueError(f"{_OP}: q must have shape [total, H, D] when k and v are given, got {list(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        V.check_tensor(_OP, name, t, ndim=3, device=q.device)
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: {name} has dtype {t.dtype} but q has {q.dtype}; q, k, v must share one dtype")
        if t.shape != q.shape:
            raise ValueError(f"{_OP}: {name} has shape {list(t.shape)} but q has {list(q.shape)}; q, k, v must match")
    return q, k, v


# --------------------------------------------------------------------------- public op


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    softmax_scale: float | None = None,
    coords: torch.Tensor | None = None,
    rope: tuple[float, tuple[int, int, int]] | None = None,
    window: None | int | tuple[int, int, int] = None,
    num_prefix: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention within each sample of a packed ragged batch (semantics: module docstring).

    Args:
        q, k, v: ``[total, H, D]``, one float dtype and device; or ``q = qkv[total, 3, H, D]``
            with ``k = v = None``. ``16 <= D <= 256``.
        cu_seqlens: int32 or int64 ``[B+1]``: 0, non-decreasing, ends at ``total``. None = one sample.
        max_seqlen: int >= every sample length (a larger bound is taken as ``total``). None =
            computed from ``cu_seqlens`` (not possible for meta tensors).
        softmax_scale: finite float > 0; default ``1 / sqrt(D)``.
        coords: int32/int64 ``[total, 3]``, (t, h, w) per token; needed by ``rope`` and a
            3D ``window``; prefix rows ignored.
        rope: ``(theta, (st, sh, sw))``: 3D RoPE on q and k, sections even, sum <= D.
        window: None, int ``w`` (1D, half-width ``w // 2``) or ``(wt, wh, ww)``; all >= 1.
        num_prefix: prefix (class) tokens at the start of every sample; each sample must
            have at least this many tokens.
        backend: "auto", "torch", "triton" or "cuda" (see ``invnext.ops._dispatch``).

    Under ``INVNEXT_CHECK_VALUES=1`` a NaN or inf in q, k or v is an error naming it.

    Returns:
        ``[total, H, D]`` in q's dtype; differentiable in q, k, v.
    """
    V.check_backend(_OP, backend)
    q, k, v = _unpack_qkv(q, k, v)
    total, _, head_dim = q.shape
    lo, hi = HEAD_DIM_RANGE
    if not lo <= head_dim <= hi:
        raise ValueError(f"{_OP}: head dim D (last dim of q) must be in [{lo}, {hi}], got {head_dim}")
    device = q.device

    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, total], dtype=torch.int32, device=device)
    cu_seqlens = V.check_cu_seqlens(_OP, cu_seqlens, total, device, dtypes=V.CU_SEQLENS_DTYPES)
    num_prefix = _check_int("num_prefix", num_prefix)
    if num_prefix < 0:
        raise ValueError(f"{_OP}: num_prefix must be >= 0, got {num_prefix}")
    if max_seqlen is None:
        V.check_host_readable(_OP, "cu_seqlens", cu_seqlens, "max_seqlen=None reads it: pass max_seqlen")
    lengths = None
    if max_seqlen is None or V.values_checked(cu_seqlens):
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).cpu()
    longest = int(lengths.max()) if lengths is not None else None
    if max_seqlen is None:
        max_seqlen = longest
    max_seqlen = _check_int("max_seqlen", max_seqlen)
    if max_seqlen < 0:
        raise ValueError(f"{_OP}: max_seqlen must be >= 0, got {max_seqlen}")
    if longest is not None and max_seqlen < longest:
        raise ValueError(f"{_OP}: max_seqlen={max_seqlen} is smaller than the longest sample ({longest} tokens)")
    # No sample is longer than the batch: a larger bound would only size empty launch grids
    # (Triton) and padding (the reference) by it, e.g. 10**12 programs that all exit.
    max_seqlen = min(max_seqlen, total)
    if lengths is not None and num_prefix > 0 and int(lengths.min()) < num_prefix:
        raise ValueError(
            f"{_OP}: every sample needs its num_prefix={num_prefix} prefix tokens, "
            f"but one has {int(lengths.min())} (cu_seqlens={cu_seqlens.tolist()})"
        )

    softmax_scale = V.check_softmax_scale(_OP, softmax_scale, head_dim)

    if coords is not None:
        V.check_tensor(_OP, "coords", coords, ndim=2, dtypes=COORD_DTYPES, device=device)
        V.check_shape(_OP, "coords", coords, (total, 3))
        if coords.dtype == torch.int64 and V.values_checked(coords) and coords.numel():
            lo_c, hi_c = int(coords.min()), int(coords.max())
            if lo_c < -(2**31) or hi_c >= 2**31:
                raise ValueError(f"{_OP}: coords must fit in int32, found values in [{lo_c}, {hi_c}]")
        coords = coords.to(torch.int32).contiguous()
    if rope is not None:
        if coords is None:
            raise ValueError(f"{_OP}: rope needs coords[total, 3] (the (t, h, w) of every token)")
        rope = check_rope(_OP, rope, head_dim)
    window = _check_window(window, coords)
    V.check_finite(_OP, q=q, k=k, v=v)

    return dispatch(_OP, backend, device, q, k, v, cu_seqlens, max_seqlen, softmax_scale, coords, rope, window, num_prefix)


# --------------------------------------------------------------------------- plan reuse

# Shared as a literal with invnext_kernels._attention_plans (which does not import invnext).
_STATIC_ATTR = "_invnext_static_structure"


def static_structure(
    cu_seqlens: torch.Tensor, coords: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Declare ``cu_seqlens`` (and ``coords``) immutable; returns them, unchanged.

    A windowed ``masked_attention`` on the Triton backend builds host-side tile lists from
    ``cu_seqlens`` and the coordinates (about 120 small launches per kernel kind). For declared
    tensors it builds them once and reuses them in every later call with the same tensors
    (every windowed layer of a forward, its backward, later steps); for any other tensors it
    builds them per call. Declare only tensors nothing writes to: an in-place write is noticed
    (version counter) and rebuilds, but a write that bypasses the counter (through ``.data``,
    or to the numpy array under ``torch.from_numpy``) would reuse a stale plan.
    """
    V.check_tensor("static_structure", "cu_seqlens", cu_seqlens, ndim=1, dtypes=V.CU_SEQLENS_DTYPES)
    if coords is not None:
        V.check_tensor("static_structure", "coords", coords, ndim=2, dtypes=COORD_DTYPES, device=cu_seqlens.device)
    for t in (cu_seqlens, coords):
        if t is not None:
            setattr(t, _STATIC_ATTR, True)
    return cu_seqlens, coords


# --------------------------------------------------------------------------- masks


def prefix_mask(cu_seqlens: torch.Tensor, total: int, num_prefix: int) -> torch.Tensor:
    """``bool[total]``, True at the first ``num_prefix`` tokens of every sample (lengths >= num_prefix)."""
    mask = torch.zeros(total, dtype=torch.bool, device=cu_seqlens.device)
    if num_prefix > 0:
        starts = cu_seqlens[:-1].long()
        mask[(starts[:, None] + torch.arange(num_prefix, device=mask.device)).flatten()] = True
    return mask


def dense_attention_mask(
    cu_seqlens: torch.Tensor,
    total: int,
    coords: torch.Tensor | None = None,
    window: None | int | tuple[int, int, int] = None,
    num_prefix: int = 0,
) -> torch.Tensor:
    """``bool[total, total]``: entry ``[i, j]`` True iff query ``i`` may attend to key ``j``.

    Built over the whole packed batch by broadcast comparisons (an independent formulation
    of the rules in the module docstring, for tests and for benchmarks' dense baselines).
    ``O(total^2)`` memory: small batches only.
    """
    device = cu_seqlens.device
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=total)
    pos = torch.arange(total, device=device) - cu_seqlens.long()[seg]
    is_prefix = pos < num_prefix
    allowed = seg[:, None] == seg[None, :]
    if window is None:
        return allowed
    if isinstance(window, int):
        near = (pos[:, None] - pos[None, :]).abs() <= window // 2
    else:
        if coords is None:
            raise ValueError("dense_attention_mask: a 3D window needs coords")
        c = coords.long()
        half = torch.tensor([w // 2 for w in window], device=device)
        near = ((c[:, None, :] - c[None, :, :]).abs() <= half).all(dim=-1)
    return allowed & (near | is_prefix[:, None] | is_prefix[None, :])


def _chunk_mask(
    r0: int, r1: int, length: int, coords: torch.Tensor | None, window, num_prefix: int, device
) -> torch.Tensor:
    """``bool[r1 - r0, length]`` for query rows ``r0:r1`` of one sample (local positions)."""
    qi = torch.arange(r0, r1, device=device)[:, None]
    kj = torch.arange(length, device=device)[None, :]
    if isinstance(window, int):
        near = (qi - kj).abs() <= window // 2
    else:
        near = torch.ones(r1 - r0, length, dtype=torch.bool, device=device)
        for a, w in enumerate(window):  # per axis: avoids a [rows, keys, 3] temporary
            c = coords[:, a]
            near &= (c[r0:r1, None] - c[None, :]).abs() <= w // 2
    return near | (qi < num_prefix) | (kj < num_prefix)


# --------------------------------------------------------------------------- reference


def _explicit_attention(q, k, v, scale: float, allowed: torch.Tensor | None) -> torch.Tensor:
    """q ``[H, r, D]``, k/v ``[H, L, D]``, allowed ``bool[r, L]`` or None -> ``[H, r, D]``."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # Softmax is shift-invariant, so the max only guards exp() from overflow and carries no
    # gradient. It is finite: every row allows at least its own token.
    m = s.amax(dim=-1, keepdim=True).detach()
    e = torch.exp(s - m)
    return torch.matmul(e / e.sum(dim=-1, keepdim=True), v)


def _masked_attention_math(q, k, v, scale: float, allowed: torch.Tensor) -> torch.Tensor:
    """SDPA's math kernel with the mask applied by ``masked_fill`` (``allowed`` broadcasts over the scores).

    SDPA adds a boolean mask to the scores as ``-inf``, and ``NaN + -inf`` is NaN: a non-finite
    key outside a query's window reached that query. Replacing the masked scores instead keeps
    it to the rows that may see it, as the float64 path and the Triton kernel do.
    """
    # The scale on q (not on the [.., L, L] scores) and an in-place fill (matmul's backward needs
    # its inputs, not its output) keep this as fast as the SDPA math kernel it replaces.
    s = torch.matmul(q * scale, k.transpose(-1, -2)).masked_fill_(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _upcast_rotate(q, k, v, cu_seqlens, coords, rope, num_prefix) -> torch.Tensor:
    """``qkv [total, 3H, D]`` in the compute dtype, its q and k heads rotated by RoPE."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads = q.shape[1]
    # One [total, 3H, D] tensor: q and k share each token's angles (one RoPE call), and the
    # padded path pads q, k and v with one index.
    qkv = torch.cat([q, k, v], dim=1).to(cdt)
    if rope is not None:
        pm = prefix_mask(cu_seqlens, q.shape[0], num_prefix)
        qk = apply_rope_3d(qkv[:, : 2 * heads], coords, rope[0], rope[1], pm)
        qkv = torch.cat([qk, qkv[:, 2 * heads :]], dim=1)
    return qkv


def _sample_bounds(cu_seqlens: torch.Tensor, num_prefix: int) -> list[int]:
    bounds = cu_seqlens.tolist()
    if num_prefix and min(e - s for s, e in pairwise(bounds)) < num_prefix:
        raise ValueError(f"{_OP}: every sample needs its num_prefix={num_prefix} prefix tokens, cu_seqlens={bounds}")
    return bounds


def _reference(
    q, k, v, cu_seqlens, softmax_scale, coords, rope, window, num_prefix, *, explicit: bool, bounds=None
):
    """The per-sample loop; ``explicit=False`` lets SDPA do the per-chunk softmax (same math).

    ``bounds``: ``cu_seqlens`` as a checked host list, if the caller already has it.
    """
    heads = q.shape[1]
    if bounds is None:
        bounds = _sample_bounds(cu_seqlens, num_prefix)
    qc, kc, vc = _upcast_rotate(q, k, v, cu_seqlens, coords, rope, num_prefix).split(heads, dim=1)
    local_coords = coords.long() if coords is not None else None
    outs = []
    for start, end in pairwise(bounds):
        length = end - start
        if length == 0:
            continue
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (qc, kc, vc))  # [H, L, D]
        cs = local_coords[start:end] if local_coords is not None else None
        if window is None and not explicit:
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale))
            continue
        rows = max(1, _CHUNK_ELEMENTS // (heads * length))
        for r0 in range(0, length, rows):
            r1 = min(r0 + rows, length)
            allowed = None if window is None else _chunk_mask(r0, r1, length, cs, window, num_prefix, q.device)
            if explicit:
                outs.append(_explicit_attention(qs[:, r0:r1], ks, vs, softmax_scale, allowed))
            elif q.device.type == "cpu":
                outs.append(_masked_attention_math(qs[:, r0:r1], ks, vs, softmax_scale, allowed))
            else:
                o = F.scaled_dot_product_attention(qs[:, r0:r1], ks, vs, attn_mask=allowed, scale=softmax_scale)
                outs.append(o)
    if not outs:
        return _empty_output(q, k, v)
    return torch.cat(outs, dim=1).transpose(0, 1).to(q.dtype)


def _empty_output(q, k, v) -> torch.Tensor:
    """The ``[0, H, D]`` output of an empty batch, still in the autograd graph of q, k, v, so a
    ``backward()`` through it runs (and gives empty gradients) as it does on the Triton backend."""
    return q + k + v


def _padded_mask(lengths, longest: int, coords_p, window, num_prefix: int, ragged: bool) -> torch.Tensor | None:
    """``bool[B or 1, 1, 1 or Lmax, Lmax]`` for the padded batch (None: attend to everything).

    ``lengths`` int64[B]; ``coords_p`` int32 ``[B, Lmax, 3]`` (zeros on padding) or None.
    """
    pos = torch.arange(longest, device=lengths.device)
    if window is None:
        if not ragged:
            return None
        # Key padding only. Padded query rows see their sample's keys (harmless: they are
        # dropped); an empty sample keeps its padded key 0 so no softmax row is empty.
        return (pos < lengths.clamp(min=1)[:, None])[:, None, None, :]
    if isinstance(window, int):
        near = ((pos[:, None] - pos[None, :]).abs() <= window // 2)[None]  # [1, L, L]
    else:
        near = torch.ones(coords_p.shape[0], longest, longest, dtype=torch.bool, device=lengths.device)
        for a, w in enumerate(window):  # per axis: avoids a [B, L, L, 3] temporary
            c = coords_p[..., a]
            near &= (c[:, :, None] - c[:, None, :]).abs() <= w // 2
    is_prefix = pos < num_prefix
    allowed = near | is_prefix[:, None] | is_prefix[None, :]
    if ragged:
        # Keys past a sample's end are padding. A padded query row may see no real key at all,
        # so it keeps its own (zero) key: SDPA kernels disagree on fully masked rows (zeros in
        # some, NaN in others), and a NaN there would reach dk, dv through the backward.
        eye = torch.eye(longest, dtype=torch.bool, device=lengths.device)
        allowed = (allowed & (pos < lengths[:, None])[:, None, :]) | eye
    return allowed[:, None]


def _padded_reference(q, k, v, cu_seqlens, softmax_scale, coords, rope, window, num_prefix, *, longest: int):
    """All samples in one SDPA call: pad to ``[B, H, longest, D]``, mask, unpad (same math as the loop).

    ``longest``: the padded length, at least every sample's length; needs no host read.
    """
    total, heads, dim = q.shape
    batch = cu_seqlens.numel() - 1
    if total == 0:
        return _empty_output(q, k, v)
    device = q.device
    x = _upcast_rotate(q, k, v, cu_seqlens, coords, rope, num_prefix)  # [total, 3H, D]
    if device.type == "cuda":
        # The plain-PyTorch GPU baseline: SDPA's fused kernels in the input dtype (they
        # accumulate in fp32), as a model written with padded SDPA would run.
        x = x.to(q.dtype)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ragged = batch * longest != total
    coords_p = None
    if isinstance(window, tuple):
        coords_p = coords
    if ragged:
        # Token r of sample b goes to padded row b * Lmax + (r - cu[b]); the same index unpads.
        shift = torch.arange(batch, device=device) * longest - cu_seqlens[:-1].long()
        dst = torch.arange(total, device=device) + torch.repeat_interleave(shift, lengths, output_size=total)
        x = x.new_zeros(batch * longest, 3 * heads, dim).index_copy(0, dst, x)
        if coords_p is not None:
            coords_p = coords_p.new_zeros(batch * longest, 3).index_copy(0, dst, coords_p)
    if coords_p is not None:
        coords_p = coords_p.view(batch, longest, 3)
    qp, kp, vp = x.view(batch, longest, 3 * heads, dim).transpose(1, 2).split(heads, dim=1)  # [B, H, L, D]
    mask = _padded_mask(lengths, longest, coords_p, window, num_prefix, ragged)
    if device.type == "cpu" and not _CPU_FUSED_SDPA and window is not None:
        # (Without a window the mask hides only padding keys, which are zeros.)
        out = _masked_attention_math(qp, kp, vp, softmax_scale, mask)
    elif device.type == "cpu" and not _CPU_FUSED_SDPA:
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=softmax_scale)
    else:
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=softmax_scale)
    out = out.transpose(1, 2).reshape(batch * longest, heads, dim)
    if ragged:
        out = out.index_select(0, dst)
    return out.to(q.dtype)


def uses_padded_path(
    dtype: torch.dtype, batch: int, heads: int, longest: int, device_type: str = "cpu", windowed: bool = True
) -> bool:
    """Whether the reference runs one padded SDPA call (else the per-sample loop).

    float64 always takes the loop: its explicit softmax is the tests' oracle. On the CPU the
    padded path runs while ``batch * heads * longest**2 <= _PADDED_ELEMENTS`` (the math kernel
    holds the scores). On CUDA, SDPA's fused kernels never hold the scores, so only a window's
    boolean mask ``[B, 1, L, L]`` limits it: ``batch * longest**2 <= _CUDA_MASK_BYTES``.
    """
    if dtype == torch.float64:
        return False
    if device_type == "cuda":
        return not windowed or batch * longest * longest <= _CUDA_MASK_BYTES
    return batch * heads * longest * longest <= _PADDED_ELEMENTS


@register_reference("masked_attention")
def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    softmax_scale: float,
    coords: torch.Tensor | None,
    rope: tuple[float, tuple[int, int, int]] | None,
    window: None | int | tuple[int, int, int],
    num_prefix: int,
) -> torch.Tensor:
    """Pure-PyTorch ``masked_attention`` with the canonical (already validated) arguments.

    Upcasts to float32 (float64 for float64 inputs) and applies RoPE to q and k, then takes
    one of two paths (:func:`uses_padded_path`):

    * padded: the packed batch is padded to ``[B, H, Lmax, D]`` with one index, attended by a
      single ``F.scaled_dot_product_attention`` call under a boolean mask, and unpadded with
      the same index -- the usual "gather + padded SDPA" baseline;
    * per-sample loop, query rows chunked to bound memory: float64 (an explicit masked
      softmax, the tests' oracle) and batches whose padded scores exceed ``_PADDED_ELEMENTS``
      (lower precisions then use SDPA per chunk).

    Under a window the CPU paths apply the mask with ``masked_fill`` (:func:`_masked_attention_math`),
    not as SDPA's additive mask, so a NaN/inf key reaches only the rows that may see it, as in
    float64 and the Triton kernel. On CUDA the padded path stays the plain padded-SDPA baseline
    (fused kernels add the mask): a non-finite key there reaches every row of its sample.

    Returns ``[total, H, D]`` in q's dtype.
    """
    if V.values_checked(cu_seqlens):
        # Eager CPU: read the lengths (exact Lmax; the loop needs them anyway).
        bounds = _sample_bounds(cu_seqlens, num_prefix)
        longest = max(e - s for s, e in pairwise(bounds))
    else:
        # GPU or torch.compile: pad to the caller's max_seqlen (a bound, exact or not), so the
        # padded path reads nothing back to the host (as a padded-SDPA model would run).
        bounds, longest = None, int(max_seqlen)
    batch = cu_seqlens.numel() - 1
    # Meta tensors (shape propagation) have no lengths to loop over: the padded path needs none.
    meta = q.device.type == "meta"
    if meta or uses_padded_path(q.dtype, batch, q.shape[1], longest, q.device.type, window is not None):
        return _padded_reference(q, k, v, cu_seqlens, softmax_scale, coords, rope, window, num_prefix, longest=longest)
    if bounds is None:
        bounds = _sample_bounds(cu_seqlens, num_prefix)
    return _reference(
        q, k, v, cu_seqlens, softmax_scale, coords, rope, window, num_prefix,
        explicit=q.dtype == torch.float64, bounds=bounds,
    )
