"""flash-attn's varlen attention: the public op and its pure-PyTorch reference.

(The module is ``varlen``, not ``varlen_attention``: a submodule named like the function it
exports would replace that function on ``invnext.ops`` as soon as anything imported it.)

``varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
softmax_scale, causal, window_size, return_lse, backend)`` computes what flash-attn's
``flash_attn_varlen_func`` computes (without dropout, softcap or ALiBi). Queries and keys are
two packed ragged batches of the same ``B`` samples: sample ``b`` has ``Lq = cu_seqlens_q[b+1] -
cu_seqlens_q[b]`` queries and ``Lk = cu_seqlens_k[b+1] - cu_seqlens_k[b]`` keys, either may be 0.
For query ``i`` (0-based within its sample) and query head ``h``::

    out[i, h] = sum_j softmax_j(scale * <q[i, h], k[j, h // G]>  over allowed j) v[j, h // G]
    lse[h, i] = log sum_j exp(scale * <q[i, h], k[j, h // G]>)  over allowed j   (natural log)

with ``G = Hq // Hk`` (GQA / MQA: query heads ``h*G .. h*G + G - 1`` share key/value head ``h``),
``scale`` default ``1 / sqrt(D)``. Key ``j`` of the same sample is allowed iff

    i + (Lk - Lq) - left  <=  j  <=  i + (Lk - Lq) + right

where ``window_size = (left, right)``, ``-1`` meaning unbounded on that side, and ``causal=True``
sets ``right = 0``. Both the causal mask and the window are aligned to the *bottom-right* corner of
the ``Lq x Lk`` score matrix, as in flash-attn (2.1 and later): with ``Lq = 2, Lk = 5`` and causal,
query 0 sees keys 0..3 and query 1 sees keys 0..4; with ``Lq = 5, Lk = 2`` queries 0..2 see no key.

A query row that may see no key at all (an empty key sample; causal or a window with ``Lk < Lq``;
a window that misses every key) gets output **0** and ``lse = -inf``, and passes no gradient.
This matches flash-attn's docs ("the output will be zero") and FlashAttention-3's lse; the
non-split kernel of FlashAttention-2 writes ``+inf`` into that lse entry instead.

Inputs: ``q [total_q, Hq, D]``, ``k, v [total_k, Hk, D]``, one float dtype (float16, bfloat16,
float32, float64) and device, ``Hq % Hk == 0``, ``1 <= D <= 256``; ``cu_seqlens_q/k`` int32 or
int64 ``[B+1]`` (0, non-decreasing, ending at ``total_q`` / ``total_k``; the two may differ in
dtype); ``max_seqlen_q/k`` ints >= every sample's length (None: read from ``cu_seqlens``, a host
sync on a GPU). Outputs: ``out [total_q, Hq, D]`` in q's dtype and, with ``return_lse=True``,
``lse`` float32 ``[Hq, total_q]``; both differentiable in q, k, v.

The reference computes in float32 (float64 for float64 inputs) per sample, with an explicit
masked softmax over chunks of query rows, and rounds once at the end.
"""
from __future__ import annotations

from itertools import pairwise

import torch

from invnext.common import validate as V
from invnext.ops._dispatch import dispatch, register_reference
from invnext.ops.rope import ROPE_PAIRINGS, apply_rope_tables, check_rope_tables

_OP = "varlen_attention"
HEAD_DIM_RANGE = (1, 256)

# Score elements (heads x query rows x keys) materialised at once per sample in the reference.
_CHUNK_ELEMENTS = 1 << 24


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_OP}: {name} must be an int, got {type(value).__name__} {value!r}")
    return value


def _check_window(window_size: object) -> tuple[int, int]:
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise TypeError(f"{_OP}: window_size must be a pair (left, right) of ints, got {window_size!r}")
    left, right = (_check_int("window_size", w) for w in window_size)
    if left < -1 or right < -1:
        raise ValueError(f"{_OP}: window_size entries must be -1 (unbounded) or >= 0, got {tuple(window_size)}")
    return left, right


def _lengths_bound(name: str, cu: torch.Tensor, given: object, total: int) -> int:
    """``max_seqlen_*``: checked against the lengths where they can be read; clipped to the total."""
    lengths = None
    if given is None:
        V.check_host_readable(_OP, name.replace("max_seqlen", "cu_seqlens"), cu,
                              f"{name}=None reads it: pass {name}")
    if given is None or V.values_checked(cu):
        lengths = (cu[1:] - cu[:-1]).cpu()
    longest = int(lengths.max()) if lengths is not None and lengths.numel() else 0
    if given is None:
        given = longest
    bound = _check_int(name, given)
    if bound < 0:
        raise ValueError(f"{_OP}: {name} must be >= 0, got {bound}")
    if lengths is not None and bound < longest:
        raise ValueError(f"{_OP}: {name}={bound} is smaller than the longest sample ({longest} tokens)")
    # no sample is longer than its packed batch: a larger bound would only size empty launch grids
    return min(bound, total)


def _check_rope(rope, rope_k, pairing, total_q: int, total_k: int, head_dim: int, device):
    """``(cos_q, sin_q, cos_k, sin_k, pairing)`` with detached tables, or None without ``rope``."""
    if rope is None:
        if rope_k is not None:
            raise ValueError(f"{_OP}: rope_k was given without rope (the queries' tables)")
        return None
    if pairing not in ROPE_PAIRINGS:
        raise ValueError(f"{_OP}: rope_pairing must be one of {ROPE_PAIRINGS}, got {pairing!r}")
    cos_q, sin_q = check_rope_tables(_OP, "rope", rope, total_q, head_dim, device)
    if rope_k is None:
        if total_k != total_q:
            raise ValueError(
                f"{_OP}: rope without rope_k rotates the keys with the queries' tables, which needs "
                f"total_k == total_q (got {total_k} keys, {total_q} queries): pass rope_k"
            )
        cos_k, sin_k = cos_q, sin_q
    else:
        cos_k, sin_k = check_rope_tables(_OP, "rope_k", rope_k, total_k, head_dim, device)
        if cos_k.shape[-1] != cos_q.shape[-1]:
            raise ValueError(f"{_OP}: rope_k's width R={cos_k.shape[-1]} differs from rope's R={cos_q.shape[-1]}")
    # constants of the op: no gradient flows to them on any backend
    return (cos_q.detach(), sin_q.detach(), cos_k.detach(), sin_k.detach(), pairing)


# --------------------------------------------------------------------------- public op


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    return_lse: bool = False,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_k: tuple[torch.Tensor, torch.Tensor] | None = None,
    rope_pairing: str = "rotate_half",
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over packed ragged batches with flash-attn's varlen semantics (module docstring).

    Args:
        q: ``[total_q, Hq, D]`` float16/bfloat16/float32/float64, ``1 <= D <= 256``.
        k, v: ``[total_k, Hk, D]``, q's dtype and device, ``Hq % Hk == 0``.
        cu_seqlens_q: int32/int64 ``[B+1]``: 0, non-decreasing, ends at ``total_q``.
        cu_seqlens_k: int32/int64 ``[B+1]`` (the same ``B``), ends at ``total_k``.
        max_seqlen_q, max_seqlen_k: ints >= every sample's query / key length (a larger bound is
            taken as the total). None = computed from ``cu_seqlens_*`` (a host read).
        softmax_scale: finite float > 0; default ``1 / sqrt(D)``.
        causal: bottom-right aligned causal mask (sets the window's right side to 0).
        window_size: ``(left, right)`` ints, -1 = unbounded, else >= 0; bottom-right aligned.
        return_lse: also return the logsumexp.
        rope: ``(cos, sin)``, float ``[total_q, R]`` each (``R`` even, ``<= D``): rotary embedding
            of the queries from precomputed per-token tables (any frequencies, positions or
            scaling: one row per token, e.g. transformers' ``cos, sin`` rows packed like q);
            the first ``R`` channels rotate, the rest pass through. The tables take no gradient.
        rope_k: ``(cos, sin)`` ``[total_k, R]`` for the keys; default ``rope`` itself, which needs
            ``total_k == total_q`` (self-attention: keys at the queries' positions).
        rope_pairing: ``"rotate_half"`` (channel ``c`` with ``c + R/2``: Llama, NeoX, Qwen) or
            ``"interleaved"`` (``2j`` with ``2j+1``: GPT-J, Cohere); see ``ops.rope.apply_rope_tables``.
        backend: "auto", "torch" or "triton" (Triton: float16/bfloat16/float32, ``8 <= D <= 256``;
            ``auto`` on a GPU runs the reference outside that, with a one-time warning saying why).

    Under ``INVNEXT_CHECK_VALUES=1`` a NaN or inf in q, k or v is an error naming it.

    Returns:
        ``out [total_q, Hq, D]`` in q's dtype, or ``(out, lse)`` with ``return_lse``:
        ``lse`` float32 ``[Hq, total_q]`` (natural log; ``-inf`` where a row sees no key, whose
        output is 0). Differentiable in q, k, v, through ``lse`` too.
    """
    V.check_backend(_OP, backend)
    V.check_tensor(_OP, "q", q, ndim=3, dtypes=V.FLOAT_DTYPES)
    device = q.device
    for name, t in (("k", k), ("v", v)):
        V.check_tensor(_OP, name, t, ndim=3, device=device)
        if t.dtype != q.dtype:
            raise TypeError(f"{_OP}: {name} has dtype {t.dtype} but q has {q.dtype}; q, k, v must share one dtype")
    if v.shape != k.shape:
        raise ValueError(f"{_OP}: v has shape {list(v.shape)} but k has {list(k.shape)}; k and v must match")
    total_q, heads_q, head_dim = q.shape
    total_k, heads_k, head_dim_k = k.shape
    if head_dim_k != head_dim:
        raise ValueError(f"{_OP}: k has head dim {head_dim_k} but q has {head_dim}; q, k, v must share D")
    if heads_k < 1 or heads_q % heads_k:
        raise ValueError(
            f"{_OP}: q's heads Hq={heads_q} must be a multiple of k's heads Hk={heads_k} (GQA/MQA groups)"
        )
    lo, hi = HEAD_DIM_RANGE
    if not lo <= head_dim <= hi:
        raise ValueError(f"{_OP}: head dim D (last dim of q) must be in [{lo}, {hi}], got {head_dim}")

    cu_seqlens_q = V.check_cu_seqlens(_OP, cu_seqlens_q, total_q, device, name="cu_seqlens_q",
                                      dtypes=V.CU_SEQLENS_DTYPES)
    cu_seqlens_k = V.check_cu_seqlens(_OP, cu_seqlens_k, total_k, device, name="cu_seqlens_k",
                                      dtypes=V.CU_SEQLENS_DTYPES)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"{_OP}: cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has "
            f"{cu_seqlens_k.numel()}; both must be [B+1] for the same B"
        )
    max_seqlen_q = _lengths_bound("max_seqlen_q", cu_seqlens_q, max_seqlen_q, total_q)
    max_seqlen_k = _lengths_bound("max_seqlen_k", cu_seqlens_k, max_seqlen_k, total_k)

    softmax_scale = V.check_softmax_scale(_OP, softmax_scale, head_dim)
    if not isinstance(causal, bool):
        raise TypeError(f"{_OP}: causal must be a bool, got {causal!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"{_OP}: return_lse must be a bool, got {return_lse!r}")
    left, right = _check_window(window_size)
    if causal:
        right = 0  # flash-attn: causal is the window's right side at 0 (left stays as given)
    rope_args = _check_rope(rope, rope_k, rope_pairing, total_q, total_k, head_dim, device)
    V.check_finite(_OP, q=q, k=k, v=v)

    out, lse = dispatch(_OP, backend, device, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        softmax_scale, left, right, rope_args)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------- masks


def varlen_dense_mask(
    cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, window_left: int = -1, window_right: int = -1
) -> torch.Tensor:
    """``bool[total_q, total_k]``: entry ``[i, j]`` True iff packed query ``i`` may attend to packed
    key ``j`` (same sample, inside the bottom-right aligned window; -1 = unbounded). ``O(total^2)``:
    small batches, tests and dense baselines only."""
    device = cu_seqlens_q.device
    cq, ck = cu_seqlens_q.long(), cu_seqlens_k.long()
    lq, lk = cq[1:] - cq[:-1], ck[1:] - ck[:-1]
    total_q, total_k = int(cq[-1]), int(ck[-1])
    seg_q = torch.repeat_interleave(torch.arange(lq.numel(), device=device), lq, output_size=total_q)
    seg_k = torch.repeat_interleave(torch.arange(lk.numel(), device=device), lk, output_size=total_k)
    # position on the key axis that the query's diagonal passes through (bottom-right aligned)
    diag = torch.arange(total_q, device=device) - cq[seg_q] + (lk - lq)[seg_q]
    pos_k = torch.arange(total_k, device=device) - ck[seg_k]
    d = pos_k[None, :] - diag[:, None]
    allowed = seg_q[:, None] == seg_k[None, :]
    if window_left >= 0:
        allowed &= d >= -window_left
    if window_right >= 0:
        allowed &= d <= window_right
    return allowed


# --------------------------------------------------------------------------- reference


def _sample_attention(q, k, v, scale: float, allowed: torch.Tensor | None):
    """q ``[H, r, D]``, k/v ``[H, L, D]``, allowed ``bool[r, L]`` or None -> (``[H, r, D]``, lse ``[H, r]``)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # The max only guards exp() from overflow (softmax is shift-invariant): no gradient through
    # it. A row that may see nothing has max -inf; shifting it by 0 keeps its exps at 0.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    total = e.sum(dim=-1, keepdim=True)
    seen = total > 0
    # the where()s keep 0/0 and log(0) out of both the values and their gradients
    safe = torch.where(seen, total, torch.ones_like(total))
    out = torch.matmul(e / safe, v)
    lse = torch.where(seen, m + torch.log(safe), torch.full_like(m, float("-inf")))
    return out, lse.squeeze(-1)


@register_reference("varlen_attention")
def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    window_left: int,
    window_right: int,
    rope: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch ``varlen_attention`` with the canonical (already validated) arguments.

    ``window_left``, ``window_right``: -1 = unbounded, causal already folded in (right = 0).
    ``rope``: None or ``(cos_q, sin_q, cos_k, sin_k, pairing)``, applied in the compute dtype
    (:func:`invnext.ops.rope.apply_rope_tables`).
    Loops over the samples (host read of both ``cu_seqlens``) and chunks of query rows, with an
    explicit masked softmax in float32 (float64 for float64 inputs); k and v heads are repeated
    to the query heads, so autograd sums each GQA group's gradients.

    Returns ``(out [total_q, Hq, D] in q's dtype, lse float32 [Hq, total_q])``.
    """
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    total_q, heads, _ = q.shape
    group = heads // k.shape[1]
    qc, kc, vc = (t.to(cdt) for t in (q, k, v))
    if rope is not None:
        cos_q, sin_q, cos_k, sin_k, pairing = rope
        qc = apply_rope_tables(qc, cos_q, sin_q, pairing)
        kc = apply_rope_tables(kc, cos_k, sin_k, pairing)
    if group > 1:
        kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    # An exact 0 in the graph of q, k and v (a sum over no element: NaN-free even for inf inputs),
    # so outputs built without them (rows that see no key, an empty batch) still backpropagate.
    anchor = qc[:0].sum() + kc[:0].sum() + vc[:0].sum()
    outs, lses = [], []
    for (q0, q1), (k0, k1) in zip(pairwise(bq), pairwise(bk)):
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        if lk == 0:  # nothing to attend to: output 0, lse -inf, and no gradient
            outs.append(qc.new_zeros(heads, lq, q.shape[-1]) + anchor)
            lses.append(qc.new_full((heads, lq), float("-inf")))
            continue
        qs, ks, vs = qc[q0:q1].transpose(0, 1), kc[k0:k1].transpose(0, 1), vc[k0:k1].transpose(0, 1)
        rows = max(1, _CHUNK_ELEMENTS // (heads * lk))
        for r0 in range(0, lq, rows):
            r1 = min(r0 + rows, lq)
            allowed = None
            if window_left >= 0 or window_right >= 0:
                diag = torch.arange(r0, r1, device=q.device)[:, None] + (lk - lq)  # bottom-right aligned
                d = torch.arange(lk, device=q.device)[None, :] - diag
                allowed = torch.ones(r1 - r0, lk, dtype=torch.bool, device=q.device)
                if window_left >= 0:
                    allowed &= d >= -window_left
                if window_right >= 0:
                    allowed &= d <= window_right
            o, lse = _sample_attention(qs[:, r0:r1], ks, vs, softmax_scale, allowed)
            outs.append(o)
            lses.append(lse)
    if not outs:  # no query at all: empty results, still in the graph of q, k, v
        return (q.new_zeros(q.shape) + anchor.to(q.dtype),
                torch.zeros(heads, total_q, dtype=torch.float32, device=q.device) + anchor.float())
    out = torch.cat(outs, dim=1).transpose(0, 1).to(q.dtype)
    lse = torch.cat(lses, dim=1).to(torch.float32)
    return out, lse
