"""Fused masked-token attention for ragged packed batches: Triton forward and backward with 3D RoPE
applied inside the kernel and spatio-temporal windows that skip whole tiles.

Math (per sample ``b``, head ``h``; ``R_i`` the RoPE rotation of token ``i``, identity for prefix
tokens and without rope)::

    out_i = sum_j softmax_j(scale * <R_i q_i, R_j k_j> + bias_ij) v_j,   bias_ij in {0, -inf}

with the visibility rules of ``invnext.ops.attention`` (samples never mix; the first
``num_prefix`` tokens of a sample see and are seen by all of it; a window box elsewhere).
The kernels never build the ``[L, L]`` score matrix: an online softmax runs over key tiles in
fp32 and only the per-row logsumexp is kept for the backward (FlashAttention-2).

Layout: ``q, k, v [total, H, D]`` with unit stride on ``D`` and heads ``D`` apart (views of
one packed ``qkv[total, 3, H, D]`` need no copy; other layouts are copied once),
``cu_seqlens`` int32 or int64 ``[B+1]``. Launch grid ``(ceil(max_seqlen / BLOCK_M), H, B)``: programs past
their sample's length exit at once, so lengths are runtime values and nothing recompiles per
length. Head dims 16..128 are padded to the next power of two with masks (64 and 128 exact;
80, 88, 96 run as 128).

Windows and token order. Tile skipping works on the bounding boxes of each block of tokens
(``BLOCK`` consecutive tokens of a sample), so it pays off when consecutive tokens are close in
(t, h, w). Raster order (t, then h, then w) - the order ``gather_visible`` keeps - makes a block
of 64-128 tokens a few rows of one frame: compact in t and h, spanning w. With a
``(wt, wh, ww)`` window a query block then reaches about ``wt`` frames x ``(rows + wh)`` rows of
keys; the rest of the sample is skipped. An order by (t, h-bands, w-bands) (e.g. 8x8 patches
of a frame, raster inside) would make blocks square in (h, w) and skip more when ``ww`` is
small against the frame width; the kernel accepts any order (it reads coords, never assumes a
layout), so such a reordering can be added by the caller without touching it. The tile lists
are built on the host per call, or once per batch structure and kind for a structure declared
immutable (``invnext.ops.static_structure``, ``_attention_plans``): every windowed layer of a
forward and its backward then reuses them.

RoPE. By default (``INVNEXT_ATTN_ROPE=prepass``) one small kernel rotates q and k per token
before the tile loops (``_attention_rope``), and the loops run the RoPE-free code; with
``inline`` every tile is rotated as it is loaded. Both round the same fp32 rotation to the
input dtype, so their results are identical bit for bit; the pre-pass is the default because the
in-loop rotation spills registers on sm_90 (``python -m benchmarks.compile_report``). Either way
dq and dk leave through ``R^T``, applied once per output tile after the loop.

varlen_attention (flash-attn's interface) runs the same kernels with three generalisations,
which masked_attention uses in their trivial form (one ``cu_seqlens`` passed twice, ``group``
1, no band): queries and keys packed separately (``cu_seqlens_q``, ``cu_seqlens_k``; the
key-owned dk/dv programs swap the two), key/value head ``h // group`` for query head ``h``
(GQA/MQA), and a *band* - query ``i`` sees keys ``i + Lk - Lq - left .. i + Lk - Lq + right``
(flash-attn's bottom-right aligned causal mask and local window) - that each program resolves
itself: the reachable key blocks, full ones in the middle, masked ones at the two ends; no host
tile lists. A row that may see no key writes output 0 and lse ``+inf`` (the public op reports
``-inf``).

Backward: a delta pre-pass, a dk/dv kernel (programs own key blocks) and a dq kernel
(programs own query blocks); no atomics, so it is deterministic (bitwise reproducible) and
needs no separate ``deterministic`` mode. Tuning: ``triton.autotune`` over 2-3 warp/stage
configs per kernel, keyed on head dim, flags, dtypes and max_seqlen rounded up to a power of
two; ``INVNEXT_ATTN_AUTOTUNE=0`` launches each kernel with its first config instead.

Precision: fp16/bf16 inputs run the two matmuls on tensor cores with fp32 accumulation and
fp32 softmax; fp32 inputs run them in full fp32 (``input_precision="ieee"``, no TF32), as
PyTorch does by default. RoPE angles, cos/sin and the rotation run in fp32; the rotated tile
is rounded to the input dtype before its matmul, as a PyTorch RoPE-then-attention would be.
"""
import math
import os

import torch
import triton

from invnext.common.registry import implements

from . import _attention_plans as plans
from ._attention_bwd import attn_bwd_delta_kernel, attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
from ._attention_common import head_dim_padded, log2e, rope_tables, window_geometry, window_lists
from ._attention_fwd import attn_fwd_kernel
from ._attention_rope import attn_rope_kernel, rope_table_kernel

__all__ = ["HEAD_DIM_RANGE", "SUPPORTED_DTYPES", "VARLEN_HEAD_DIM_RANGE", "masked_attention_triton",
           "varlen_attention_triton"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIM_RANGE = (16, 128)
# varlen_attention (no in-loop RoPE: its tables rotate in a pre-pass) also takes head dims padded
# to 16 (D = 8..15) and to 256 (129..256), on the smaller tiles of ``_gpu_blocks``. masked_attention
# stays at 128: its in-loop R^T reads a [DP, DP] permutation matrix, 4x larger at 256.
VARLEN_HEAD_DIM_RANGE = (8, 256)

# Tile shapes (BLOCK_M query rows, BLOCK_N key rows) per kernel. Fixed per head-dim class so
# that window tile lists built on the host match the kernel; only warps/stages are tuned
# (plus BLOCK_N of the unwindowed forward, which needs no list). The interpreter uses tiny
# tiles so that small test samples still span several blocks.
_INTERPRET_BLOCKS = {"fwd": (32, 32), "dkdv": (16, 32), "dq": (32, 16)}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _gpu_blocks(kind: str, head_dp: int, fp32: bool) -> tuple[int, int]:
    if head_dp > 128:  # (varlen only) sm_90 builds without spills: compile_report's D=256 rows
        if fp32:
            return 16, 16
        return {"fwd": (64, 32), "dkdv": (32, 32), "dq": (64, 32)}[kind]
    if fp32:  # fp32 matmuls run on CUDA cores (no TF32): small tiles keep them in registers
        # (on sm_90, dk/dv at 32 x 64 spilled 0.7 KB per thread with a window; at head dims
        # padded to 128 every fp32 tile spilled 0.4-2.6 KB at 4 or 8 warps and none at 16)
        if head_dp > 64:
            return {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32)}[kind]
        return {"fwd": (64, 32), "dkdv": (32, 32), "dq": (64, 32)}[kind]
    if kind == "fwd":
        return 128, 64
    if kind == "dkdv":  # (query rows streamed, key rows owned)
        return (64, 128) if head_dp <= 64 else (64, 64)
    return (128, 64) if head_dp <= 64 else (64, 64)  # dq


def _blocks(kind: str, head_dp: int, fp32: bool) -> tuple[int, int]:
    return _INTERPRET_BLOCKS[kind] if _interpret() else _gpu_blocks(kind, head_dp, fp32)


def _seq_bucket(max_seqlen: int) -> int:
    return max(64, triton.next_power_of_2(max(1, max_seqlen)))


# --------------------------------------------------------------------------- autotuning

_TUNERS: dict = {}


def _tunes_block_n(kind: str, head_dp: int, window: bool, fp32: bool) -> bool:
    # Only the unwindowed forward may pick its key tile: nothing on the host depends on it.
    return kind == "fwd" and not window and head_dp <= 64 and not fp32 and not _interpret()


def _configs(kind: str, head_dp: int, window: bool, fp32: bool):
    """Candidate (warps, stages[, BLOCK_N]); the first is the untuned default. Chosen from sm_90
    builds of the variants (registers / spills): with 4 warps the dk/dv kernel at BLOCK_N=128,
    the dq kernel and RoPE forwards spill."""
    C = triton.Config
    if head_dp > 128:  # one stage for dk/dv: two spilled 16-300 bytes on sm_90
        return [C({}, num_warps=8, num_stages=1 if kind == "dkdv" else 2)]
    if fp32 and head_dp > 64:
        return [C({}, num_warps=16, num_stages=2), C({}, num_warps=8, num_stages=2)]
    if fp32:
        return [C({}, num_warps=8, num_stages=2), C({}, num_warps=4, num_stages=2)]
    if _tunes_block_n(kind, head_dp, window, fp32):
        return [C({"BLOCK_N": 64}, num_warps=4, num_stages=3), C({"BLOCK_N": 128}, num_warps=8, num_stages=3),
                C({"BLOCK_N": 64}, num_warps=8, num_stages=3)]
    if kind == "fwd":
        return [C({}, num_warps=8, num_stages=3), C({}, num_warps=4, num_stages=3), C({}, num_warps=8, num_stages=2)]
    if kind == "dkdv":
        return [C({}, num_warps=8, num_stages=2), C({}, num_warps=8, num_stages=3), C({}, num_warps=4, num_stages=2)]
    return [C({}, num_warps=8, num_stages=2), C({}, num_warps=8, num_stages=3), C({}, num_warps=4, num_stages=3)]


ROPE_MODES = ("prepass", "inline")


def rope_mode() -> str:
    """``INVNEXT_ATTN_ROPE``: ``prepass`` (default: rotate q, k once before the tile loops) or
    ``inline`` (rotate every tile as it is loaded). Same results bit for bit; see ``_attention_rope``."""
    mode = os.environ.get("INVNEXT_ATTN_ROPE", "prepass")
    if mode not in ROPE_MODES:
        raise ValueError(f"INVNEXT_ATTN_ROPE must be one of {ROPE_MODES}, got {mode!r}")
    return mode


def _autotune_enabled() -> bool:
    # INVNEXT_ATTN_AUTOTUNE=0: launch each kernel with its first config (tests: fewer compiles).
    return os.environ.get("INVNEXT_ATTN_AUTOTUNE", "1") not in ("", "0")


def _launcher(kind: str, kernel, head_dp: int, window: bool, fp32: bool, band: bool = False):
    """The kernel itself under the interpreter; on the GPU an autotuner (one per kernel and
    variant) keyed on the head dim, flags and a power-of-two bucket of max_seqlen (Triton adds
    the tensors' dtypes to the key), or the kernel bound to its first config."""
    if _interpret():
        return kernel
    if not _autotune_enabled():
        cfg = _configs(kind, head_dp, window, fp32)[0]
        return _Bound(kernel, cfg)
    key = (kind, head_dp, window, fp32, band)
    tuner = _TUNERS.get(key)
    if tuner is None:
        tuner = triton.autotune(
            configs=_configs(kind, head_dp, window, fp32),
            key=["HEAD_DIM", "HEAD_DP", "HAS_ROPE", "HAS_WINDOW", "IS_BAND", "SEQ_BUCKET"]
            + (["ROPE_OUT"] if kind != "fwd" else []),
        )(kernel)
        _TUNERS[key] = tuner
    return tuner


class _Bound:
    """``kernel[grid](...)`` with one config's meta-parameters, warps and stages filled in."""

    def __init__(self, kernel, cfg):
        self.kernel, self.cfg = kernel, cfg

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = {**kwargs, **self.cfg.kwargs}
            g = grid(meta) if callable(grid) else grid
            return self.kernel[g](*args, **meta, num_warps=self.cfg.num_warps, num_stages=self.cfg.num_stages)

        return launch


def _meta(kind: str, head_dp: int, window: bool, fp32: bool) -> dict:
    """Launch-time tile constexprs (those the autotuner does not choose)."""
    bm, bn = _blocks(kind, head_dp, fp32)
    if _tunes_block_n(kind, head_dp, window, fp32):
        return {"BLOCK_M": bm}
    return {"BLOCK_M": bm, "BLOCK_N": bn}


# --------------------------------------------------------------------------- argument prep


def _tile_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its channels are contiguous and its heads ``D`` apart (any token stride:
    views of a packed qkv qualify), else a contiguous copy. Head strides are compile-time constants
    of the kernels, so a layout whose head stride varied with the batch (a transposed
    ``[H, total, D]``, say) would otherwise recompile them for every sequence length."""
    return t if t.stride(-1) == 1 and t.stride(1) == t.shape[-1] else t.contiguous()


def _static_geometry(win, coords, cu_seqlens, total):
    # Synthetic coordinates are a function of cu_seqlens alone: declared immutable with it, so
    # the tile lists built from them are reused exactly when the geometry is.
    wc, radius = window_geometry(win, coords, cu_seqlens, total)
    if plans.is_static(cu_seqlens):
        plans.mark_static(wc)
    return wc, radius


class _Prep:
    """Everything the launches share: shapes, RoPE tables, window coords and radius, band.

    ``cu_k``, ``max_seqlen_k``, ``k_heads`` describe the keys when they differ from the queries
    (``varlen_attention``); ``band`` is ``()`` or ``(left, right)``, both >= 0 (``varlen_attention``'s
    causal / local window, unbounded sides already replaced by the longest sample)."""

    def __init__(self, q, cu_seqlens, max_seqlen, softmax_scale, coords, rope_theta, rope_sections, window, num_prefix,
                 *, cu_k=None, max_seqlen_k=None, k_heads=None, band=()):
        self.total, self.heads, self.head_dim = q.shape
        self.batch = cu_seqlens.numel() - 1
        self.max_seqlen = int(max_seqlen)
        self.cu_k = cu_seqlens if cu_k is None else cu_k
        self.max_seqlen_k = self.max_seqlen if max_seqlen_k is None else int(max_seqlen_k)
        self.k_heads = self.heads if k_heads is None else int(k_heads)
        self.group = self.heads // self.k_heads if self.k_heads else 1
        self.has_band = len(band) == 2
        self.band = (int(band[0]), int(band[1])) if self.has_band else (0, 0)
        self.head_dp = head_dim_padded(self.head_dim)
        self.sm_scale = float(softmax_scale)
        self.qk_scale = self.sm_scale * log2e()
        self.num_prefix = int(num_prefix)
        self.fp32 = q.dtype == torch.float32
        self.dot_prec = "ieee" if self.fp32 else "tf32"
        self.fast_trig = q.dtype != torch.float32 and not _interpret()
        dev = q.device
        self.cu = cu_seqlens
        self.has_rope = len(rope_sections) == 3 and sum(rope_sections) > 0
        self.rope_prepass = self.has_rope and rope_mode() == "prepass"
        if self.has_rope:
            self.ftab, self.ptab, self.pmat = rope_tables(rope_theta, tuple(rope_sections), self.head_dp, dev)
            self.crd_r = coords
        else:
            self.ftab = self.ptab = self.pmat = self.crd_r = cu_seqlens  # never read
        self.has_window = len(window) > 0
        if self.has_window:
            win = window[0] if len(window) == 1 else tuple(window)
            if isinstance(win, int):  # synthetic coordinates: built once per cu_seqlens
                geometry = ("geometry", win, self.total)
                self.crd_w, self.radius = plans.cached(
                    cu_seqlens, None, geometry, lambda: _static_geometry(win, coords, cu_seqlens, self.total)
                )
            else:
                self.crd_w, self.radius = window_geometry(win, coords, cu_seqlens, self.total)
        else:
            self.crd_w, self.radius = cu_seqlens, (0, 0, 0)
        self.bucket = _seq_bucket(max(self.max_seqlen, self.max_seqlen_k))
        self.variant = (self.head_dp, self.has_window, self.fp32, self.has_band)

    def lists(self, kind: str):
        """Window tile lists for ``kind`` (dummies without a window) and their row lengths."""
        bm, bn = _blocks(kind, self.head_dp, self.fp32)
        nq, nk = triton.cdiv(self.max_seqlen, bm), triton.cdiv(self.max_seqlen_k, bn)
        if not self.has_window:
            d = self.cu
            return (d, d, d, d), nq, nk
        by_key = kind == "dkdv"
        key = ("lists", self.max_seqlen, self.radius, self.num_prefix, bm, bn, by_key)
        lists = plans.cached(
            self.cu, self.crd_w, key,
            lambda: window_lists(self.cu, self.max_seqlen, self.crd_w, self.radius, self.num_prefix, bm, bn, by_key),
        )  # fmt: skip
        return lists, nq, nk

    def common(self):
        rt, rh, rw = self.radius
        return {
            "total": self.total, "num_heads": self.heads, "group": self.group, "qk_scale": self.qk_scale,
            "num_prefix": self.num_prefix, "rad_t": rt, "rad_h": rh, "rad_w": rw,
            "band_left": self.band[0], "band_right": self.band[1],
        }

    def flags(self):
        return {
            "SEQ_BUCKET": self.bucket, "HEAD_DIM": self.head_dim, "HEAD_DP": self.head_dp,
            "HAS_ROPE": self.has_rope and not self.rope_prepass, "HAS_WINDOW": self.has_window,
            "DOT_PREC": self.dot_prec, "FAST_TRIG": self.fast_trig, "IS_BAND": self.has_band,
        }

    def launcher(self, kind: str, kernel, rows: str):
        """``kernel`` ready to launch over this batch: ``(ceil(max_seqlen / meta[rows]), H, B)``
        programs (key-owned ``dkdv``: the keys' longest sample and heads), with its tuned (or first)
        config and the tile sizes ``lists(kind)`` was built for."""
        fn = _launcher(kind, kernel, *self.variant)
        meta = _meta(kind, *self.variant[:3])
        longest, heads = (self.max_seqlen_k, self.k_heads) if kind == "dkdv" else (self.max_seqlen, self.heads)

        def grid(m):
            return (triton.cdiv(longest, m[rows]), heads, self.batch)

        return lambda *args, **kwargs: fn[grid](*args, **kwargs, **meta)

    def rotated(self, q, k):
        """``(q, k)`` as the tile loops read them: rotated by the pre-pass, or as given (inline / no RoPE)."""
        if not self.rope_prepass:
            return q, k
        qr = torch.empty((self.total, self.heads, self.head_dim), dtype=q.dtype, device=q.device)
        kr = torch.empty_like(qr)
        # 64 x 64 or 32 x 128 elements a program; half that in fp32 (libdevice cos/sin need registers)
        block = 32 if _interpret() else max(16, (2048 if self.fp32 else 4096) // self.head_dp)
        attn_rope_kernel[(triton.cdiv(self.max_seqlen, block), self.heads, self.batch)](
            q, k, qr, kr, self.cu, self.crd_r, self.ftab, self.ptab,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), qr.stride(0), qr.stride(1), self.num_prefix,
            HEAD_DIM=self.head_dim, HEAD_DP=self.head_dp, BLOCK=block, FAST_TRIG=self.fast_trig, num_warps=4,
        )
        return qr, kr


def _forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, coords, rope_theta, rope_sections, window, num_prefix,
             **keys):
    """The forward launch: ``(out, lse)``. Shapes, RoPE tables and window geometry (``_Prep``;
    ``keys``: its key-side and band arguments), the layout the kernel's constant head strides need,
    the RoPE pre-pass, the window's tile lists, then one program per (query block, head, sample)."""
    prep = _Prep(q, cu_seqlens, max_seqlen, softmax_scale, coords, rope_theta, rope_sections, window, num_prefix,
                 **keys)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((prep.heads, prep.total), dtype=torch.float32, device=q.device)
    if prep.total == 0 or prep.max_seqlen == 0 or prep.heads == 0:
        return out, lse
    if k.shape[0] == 0 or prep.max_seqlen_k == 0:  # no sample has a key: every row sees nothing
        return out.zero_(), lse.fill_(float("inf"))
    q, k, v = _tile_layout(q), _tile_layout(k), _tile_layout(v)
    q, k = prep.rotated(q, k)
    (fi, fc, pi, pc), nq, nk = prep.lists("fwd")
    prep.launcher("fwd", attn_fwd_kernel, rows="BLOCK_M")(
        q, k, v, out, lse, cu_seqlens, prep.cu_k, prep.crd_r, prep.crd_w, prep.ftab, prep.ptab, fi, fc, pi, pc,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        list_nq=nq, list_nk=nk, **prep.common(), **prep.flags(),
    )
    return out, lse


def _backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, coords, rope_theta, rope_sections,
              window, num_prefix, dlse=None, **keys):
    """The backward launches: ``(dq, dk, dv)`` from the delta pre-pass, then dk/dv (programs own
    key blocks of a key/value head) and dq (programs own query blocks), each over its own window
    tile lists or band. ``dlse``: the gradient of the natural-log lse, or None."""
    prep = _Prep(q, cu_seqlens, max_seqlen, softmax_scale, coords, rope_theta, rope_sections, window, num_prefix,
                 **keys)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if prep.total == 0 and k.shape[0] == 0 or prep.heads == 0:
        return dq, dk, dv
    if prep.max_seqlen == 0 or prep.max_seqlen_k == 0 or prep.total == 0 or k.shape[0] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v, out, dout = (_tile_layout(t) for t in (q, k, v, out, dout))
    q, k = prep.rotated(q, k)

    delta = torch.empty_like(lse)
    block = 64 if not _interpret() else 32
    attn_bwd_delta_kernel[(triton.cdiv(prep.total, block), prep.heads)](
        out, dout, delta, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), prep.total,
        HEAD_DIM=prep.head_dim, HEAD_DP=prep.head_dp, BLOCK=block,
    )
    if dlse is not None:  # (_attention_bwd: dS = P * (dP - delta + dlse))
        delta = delta - dlse.to(torch.float32)
    common = prep.common()
    common["sm_scale"] = prep.sm_scale
    common["ROPE_OUT"] = prep.has_rope  # dq, dk leave through R^T in either RoPE mode
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1))

    (fi, fc, pi, pc), nq, nk = prep.lists("dkdv")
    prep.launcher("dkdv", attn_bwd_dkdv_kernel, rows="BLOCK_N")(
        q, k, v, dout, dk, dv, lse, delta, cu_seqlens, prep.cu_k, prep.crd_r, prep.crd_w, prep.ftab, prep.ptab,
        prep.pmat, fi, fc, pi, pc, *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        list_nk=nk, list_nq=nq, **common, **prep.flags(),
    )
    (fi, fc, pi, pc), nq, nk = prep.lists("dq")
    prep.launcher("dq", attn_bwd_dq_kernel, rows="BLOCK_M")(
        q, k, v, dout, dq, lse, delta, cu_seqlens, prep.cu_k, prep.crd_r, prep.crd_w, prep.ftab, prep.ptab,
        prep.pmat, fi, fc, pi, pc, *strides, dq.stride(0), dq.stride(1),
        list_nq=nq, list_nk=nk, **common, **prep.flags(),
    )
    return dq, dk, dv


# --------------------------------------------------------------------------- torch.library ops
# Two custom ops (forward, backward) with fake implementations, so torch.compile traces
# through the kernel as one opaque node, and autograd registered on the forward op.


def _define_ops():
    ns = torch.ops.invnext
    if hasattr(ns, "masked_attention_triton_fwd") and hasattr(ns, "masked_attention_triton_bwd"):
        return ns.masked_attention_triton_fwd, ns.masked_attention_triton_bwd  # a second import of this module

    @torch.library.custom_op("invnext::masked_attention_triton_fwd", mutates_args=())
    def fwd_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
        softmax_scale: float, coords: torch.Tensor | None, rope_theta: float, rope_sections: list[int],
        window: list[int], num_prefix: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(q, k, v, cu_seqlens, max_seqlen, softmax_scale, coords, rope_theta, rope_sections,
                        window, num_prefix)

    @fwd_op.register_fake
    def _(q, k, v, cu_seqlens, max_seqlen, softmax_scale, coords, rope_theta, rope_sections, window, num_prefix):
        total, heads, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((heads, total), dtype=torch.float32)

    @torch.library.custom_op("invnext::masked_attention_triton_bwd", mutates_args=())
    def bwd_op(
        dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
        cu_seqlens: torch.Tensor, max_seqlen: int, softmax_scale: float, coords: torch.Tensor | None,
        rope_theta: float, rope_sections: list[int], window: list[int], num_prefix: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, coords, rope_theta,
                         rope_sections, window, num_prefix)

    @bwd_op.register_fake
    def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, coords, rope_theta, rope_sections,
          window, num_prefix):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens, max_seqlen, softmax_scale, coords, rope_theta, rope_sections, window, num_prefix = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, coords)
        ctx.args = (max_seqlen, softmax_scale, rope_theta, rope_sections, window, num_prefix)
        ctx.mark_non_differentiable(lse)

    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, cu_seqlens, coords = ctx.saved_tensors
        max_seqlen, softmax_scale, rope_theta, rope_sections, window, num_prefix = ctx.args
        dq, dk, dv = bwd_op(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, softmax_scale, coords, rope_theta,
                            list(rope_sections), list(window), num_prefix)
        return dq, dk, dv, None, None, None, None, None, None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op, bwd_op


masked_attention_triton_fwd, masked_attention_triton_bwd = _define_ops()


# --------------------------------------------------------------------------- public entry


@implements("masked_attention", "triton")
def masked_attention_triton(q, k, v, cu_seqlens, max_seqlen, softmax_scale, coords, rope, window, num_prefix):
    """Canonical implementation of ``invnext.ops.masked_attention`` (arguments already validated).

    Args (checked by the public op; dtypes and head dims outside the kernel's are declined by
    ``masked_attention.unsupported`` before this runs):
        q, k, v: ``[total, H, D]`` float16/bfloat16/float32, unit stride on D (may be views of a
            packed ``qkv[total, 3, H, D]``); ``16 <= D <= 128``.
        cu_seqlens: int32 ``[B+1]``; max_seqlen: int >= every sample length.
        softmax_scale: float.
        coords: int32 ``[total, 3]`` (t, h, w) or None; needed by ``rope`` and a 3D window.
        rope: None or ``(theta, (st, sh, sw))``.
        window: None, int ``w`` or ``(wt, wh, ww)``.
        num_prefix: int, prefix tokens per sample.

    Returns:
        ``[total, H, D]`` in q's dtype, differentiable in q, k, v (backward: Triton kernels).
    """
    # The custom op's schema takes flat lists: no rope is an empty section list, no window an empty one.
    theta, sections = (0.0, []) if rope is None else (float(rope[0]), [int(s) for s in rope[1]])
    if window is None:
        win: list[int] = []
    elif isinstance(window, int):
        win = [int(window)]
    else:
        win = [int(w) for w in window]
    cu = cu_seqlens.contiguous()
    crd = coords.contiguous() if coords is not None else None
    out, _ = masked_attention_triton_fwd(q, k, v, cu, int(max_seqlen), float(softmax_scale), crd, theta, sections,
                                         win, int(num_prefix))
    return out


def _unsupported(q, k, v, *_) -> str | None:
    """Why this kernel cannot take these inputs (None when it can); ``backend="auto"`` then uses the reference."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernel takes float16/bfloat16/float32, not {str(q.dtype).replace('torch.', '')}"
    lo, hi = HEAD_DIM_RANGE
    if not lo <= q.shape[-1] <= hi:
        return f"the Triton kernel takes head dims {lo}..{hi}, not {q.shape[-1]}"
    return None


masked_attention_triton.unsupported = _unsupported


# --------------------------------------------------------------------------- varlen_attention
# flash-attn's varlen interface over the same kernels: queries and keys packed separately
# (cu_seqlens_q, cu_seqlens_k), GQA through ``group``, and causal / local windows as a band
# that the kernels resolve per tile (no host-side tile lists, nothing recompiled per length).


def _band(window_left: int, window_right: int, max_seqlen_q: int, max_seqlen_k: int) -> list[int]:
    """``[left, right]`` for the kernels, or ``[]`` when neither side is bounded. An unbounded
    side (-1) or one past every sample becomes the longest sample: ``j - i - (Lk - Lq)`` lies in
    ``[-(Lk - 1), Lq - 1]``, so ``left >= max Lk`` and ``right >= max Lq`` bound nothing (and stay
    small enough for the kernels' 32-bit arithmetic)."""
    if window_left < 0 and window_right < 0:
        return []
    left = max_seqlen_k if window_left < 0 else min(window_left, max_seqlen_k)
    right = max_seqlen_q if window_right < 0 else min(window_right, max_seqlen_q)
    return [int(left), int(right)]


def _rope_tables(x, cos, sin, interleaved: bool, transpose: bool) -> torch.Tensor:
    """``x [total, H, D]`` rotated by the per-token tables (``R^T`` with ``transpose``), in x's dtype."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total, heads, dim = x.shape
    if y.numel() == 0:
        return y
    x = _tile_layout(x)
    cos, sin = cos.contiguous(), sin.contiguous()
    head_dp = head_dim_padded(dim)
    block = 32 if _interpret() else max(16, 4096 // head_dp)
    rope_table_kernel[(triton.cdiv(total, block), heads)](
        x, y, cos, sin, total, x.stride(0), x.stride(1), y.stride(0), y.stride(1), cos.stride(0), sin.stride(0),
        WIDTH=cos.shape[-1], HEAD_DIM=dim, HEAD_DP=head_dp, BLOCK=block, INTERLEAVED=bool(interleaved),
        TRANSPOSE=bool(transpose), num_warps=4,
    )
    return y


def _rotated_qk(q, k, tables, interleaved: bool, transpose: bool = False):
    """``(q, k)`` through the RoPE tables ``(cos_q, sin_q, cos_k, sin_k)``, or as given without them."""
    cos_q, sin_q, cos_k, sin_k = tables
    if cos_q is None:
        return q, k
    return (_rope_tables(q, cos_q, sin_q, interleaved, transpose),
            _rope_tables(k, cos_k, sin_k, interleaved, transpose))


def _varlen_keys(k, cu_seqlens_k, max_seqlen_k, band):
    return {"cu_k": cu_seqlens_k, "max_seqlen_k": max_seqlen_k, "k_heads": k.shape[1], "band": tuple(band)}


def _define_varlen_ops():
    ns = torch.ops.invnext
    if hasattr(ns, "varlen_attention_triton_fwd") and hasattr(ns, "varlen_attention_triton_bwd"):
        return ns.varlen_attention_triton_fwd, ns.varlen_attention_triton_bwd

    # RoPE tables (cos_q, sin_q, cos_k, sin_k: [total, R] each, or all None) rotate q and k in a
    # pre-pass before the tile loops, as masked_attention's 3D RoPE does; the backward rotates
    # again (nothing extra is saved) and sends dq, dk back through R^T in a second pass.

    @torch.library.custom_op("invnext::varlen_attention_triton_fwd", mutates_args=())
    def fwd_op(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, band: list[int],
        rope_cos_q: torch.Tensor | None = None, rope_sin_q: torch.Tensor | None = None,
        rope_cos_k: torch.Tensor | None = None, rope_sin_k: torch.Tensor | None = None, rope_interleaved: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(out [total_q, Hq, D], lse2 fp32 [Hq, total_q])``: lse2 is the base-2 logsumexp of the
        scaled scores, ``+inf`` for a row that may see no key (the backward reads it as is)."""
        q, k = _rotated_qk(q, k, (rope_cos_q, rope_sin_q, rope_cos_k, rope_sin_k), rope_interleaved)
        return _forward(q, k, v, cu_seqlens_q, max_seqlen_q, softmax_scale, None, 0.0, [], [], 0,
                        **_varlen_keys(k, cu_seqlens_k, max_seqlen_k, band))

    @fwd_op.register_fake
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, band, *rope):
        total, heads, _ = q.shape
        return q.new_empty(q.shape), q.new_empty((heads, total), dtype=torch.float32)

    @torch.library.custom_op("invnext::varlen_attention_triton_bwd", mutates_args=())
    def bwd_op(
        dout: torch.Tensor, dlse2: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        out: torch.Tensor, lse2: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
        max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, band: list[int],
        rope_cos_q: torch.Tensor | None = None, rope_sin_q: torch.Tensor | None = None,
        rope_cos_k: torch.Tensor | None = None, rope_sin_k: torch.Tensor | None = None, rope_interleaved: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tables = (rope_cos_q, rope_sin_q, rope_cos_k, rope_sin_k)
        q, k = _rotated_qk(q, k, tables, rope_interleaved)
        # lse_nat = lse2 * ln 2, so the gradient of the natural lse is dlse2 * log2(e)
        dlse = None if dlse2 is None else dlse2 * log2e()
        dq, dk, dv = _backward(dout, q, k, v, out, lse2, cu_seqlens_q, max_seqlen_q, softmax_scale, None, 0.0, [], [],
                               0, dlse=dlse, **_varlen_keys(k, cu_seqlens_k, max_seqlen_k, band))
        dq, dk = _rotated_qk(dq, dk, tables, rope_interleaved, transpose=True)
        return dq, dk, dv

    @bwd_op.register_fake
    def _(dout, dlse2, q, k, v, out, lse2, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
          band, *rope):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, band, *rope = inputs
        out, lse2 = output
        tables = list(rope[:4]) + [None] * (4 - len(rope[:4]))
        ctx.save_for_backward(q, k, v, out, lse2, cu_seqlens_q, cu_seqlens_k, *tables)
        ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, band, bool(rope[4]) if len(rope) > 4 else False)

    def backward(ctx, dout, dlse2):
        q, k, v, out, lse2, cu_seqlens_q, cu_seqlens_k, *tables = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, softmax_scale, band, interleaved = ctx.args
        dq, dk, dv = bwd_op(dout, dlse2, q, k, v, out, lse2, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale, list(band), *tables, interleaved)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)
    return fwd_op, bwd_op


varlen_attention_triton_fwd, varlen_attention_triton_bwd = _define_varlen_ops()


@implements("varlen_attention", "triton")
def varlen_attention_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                            window_left, window_right, rope=None):
    """Canonical implementation of ``invnext.ops.varlen_attention`` (arguments already validated).

    Args (checked by the public op; dtypes and head dims outside the kernel's are declined by
    ``varlen_attention_triton.unsupported`` before this runs):
        q: ``[total_q, Hq, D]``; k, v: ``[total_k, Hk, D]``, ``Hq % Hk == 0``; float16/bfloat16/
            float32, one dtype; ``8 <= D <= 256`` (``VARLEN_HEAD_DIM_RANGE``).
        cu_seqlens_q, cu_seqlens_k: int32 or int64 ``[B+1]``.
        max_seqlen_q, max_seqlen_k: ints >= every sample's query / key length.
        softmax_scale: float.
        window_left, window_right: ints, -1 = unbounded; causal already folded in (right = 0).
        rope: None or ``(cos_q, sin_q, cos_k, sin_k, pairing)``: tables ``[total_q or total_k, R]``
            (any float dtype, constants: no gradient), pairing "rotate_half" or "interleaved".

    Returns:
        ``(out [total_q, Hq, D] in q's dtype, lse float32 [Hq, total_q])``, natural log, ``-inf``
        (and output 0) for a row that may see no key; differentiable in q, k, v (and through lse).
    """
    band = _band(int(window_left), int(window_right), int(max_seqlen_q), int(max_seqlen_k))
    tables = {}
    if rope is not None:
        cos_q, sin_q, cos_k, sin_k, pairing = rope
        tables = {"rope_cos_q": cos_q, "rope_sin_q": sin_q, "rope_cos_k": cos_k, "rope_sin_k": sin_k,
                  "rope_interleaved": pairing == "interleaved"}
    out, lse2 = varlen_attention_triton_fwd(q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                                            int(max_seqlen_q), int(max_seqlen_k), float(softmax_scale), band,
                                            **tables)
    lse = torch.where(torch.isinf(lse2), float("-inf"), lse2 * math.log(2.0))
    return out, lse


def _varlen_unsupported(q, k, v, *rest) -> str | None:
    """Why the kernels cannot take these inputs (None when they can)."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the Triton kernel takes float16/bfloat16/float32, not {str(q.dtype).replace('torch.', '')}"
    lo, hi = VARLEN_HEAD_DIM_RANGE
    if not lo <= q.shape[-1] <= hi:
        return f"the Triton kernel takes head dims {lo}..{hi}, not {q.shape[-1]}"
    return None


varlen_attention_triton.unsupported = _varlen_unsupported
