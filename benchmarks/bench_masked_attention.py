"""Masked attention on ragged packed batches: invnext's Triton kernel against the baselines
available in the same run, bf16, forward / backward / forward+backward.

    python -m benchmarks.bench_masked_attention [--quick] [--max-seconds S]

FLOPs count real tokens only: forward ``4 * D * H * (allowed query-key pairs)`` (two matmuls,
2 flops per multiply-add; ``L^2`` pairs per sample without a window, the exact count of
allowed pairs from the mask geometry with one), backward 2.5x that, forward+backward 3.5x.
Padded baselines are charged the same real-token FLOPs, so their extra work shows as time.
Fraction of peak = TFLOP/s / this card's measured bf16 matmul TFLOP/s.

Baselines (each skipped with a note when missing or failing):
* ``sdpa-<backend> padded``: scatter the packed q/k/v into ``[B, H, Lmax, D]`` (the gather is
  timed, as is the copy back), then ``scaled_dot_product_attention`` with one backend forced.
  The efficient and cuDNN rows mask padded keys with a ``[B, 1, 1, Lmax]`` boolean mask; the
  flash backend takes no mask, so its row attends to padding too (a lower bound on its time,
  the results of short samples are not the same op).
* ``torch varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen) if present.
* ``flex``: ``flex_attention`` compiled once, on the packed batch as one sequence of
  ``total`` tokens with a block mask (same sample; and for windows: ``|dt| <= wt // 2``, ... or
  either token a prefix token), built once outside the timed region with 128x128 blocks
  (its build time is reported in ``extra``; a trainer whose masks change every batch pays it
  every step).
* ``xformers`` (BlockDiagonalMask) and ``flash-attn`` varlen, when importable.

Results: ``benchmarks/results/bench_masked_attention_<gpu>_<date>.{json,md}``, rewritten after every
shape so a run cut short keeps what it measured.
"""
from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # run by path (python benchmarks/x.py): the repo root must be importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.common import attention_main, run_attention_problem

DTYPE = torch.bfloat16
NAME = "bench_masked_attention"
DEVICE = "cuda"  # a module constant so the harness can be smoke-run elsewhere


# --------------------------------------------------------------------------- problem setup


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Problem:
    """One benchmark shape: packed qkv, cu_seqlens, coords, window, and its allowed-pair count."""

    def __init__(self, label, lengths, heads, dim, *, window=None, num_prefix=4, grid=None, rope=None):
        self.label, self.lengths, self.heads, self.dim = label, list(lengths), heads, dim
        self.window, self.num_prefix, self.rope = window, num_prefix, rope
        dev = DEVICE
        self.B = len(lengths)
        self.total = sum(lengths)
        self.max_seqlen = max(lengths)
        self.cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.qkv = torch.randn(self.total, 3, heads, dim, generator=gen).to(dev, DTYPE)
        self.dout = torch.randn(self.total, heads, dim, generator=gen).to(dev, DTYPE)
        self.inputs = (self.qkv,)  # what every implementation takes
        self.coords = self._coords(grid or (16, 16, 16), gen).to(dev)
        lens = self.cu.diff().long()
        self.seg = torch.repeat_interleave(torch.arange(self.B, device=dev), lens)
        self.pos = torch.arange(self.total, device=dev) - self.cu.long()[self.seg]
        self.pairs = self._allowed_pairs()

    def _coords(self, grid, gen):
        """Per sample: prefix rows (0,0,0), then a random subset of the grid in raster order
        (all of it when the sample fills the grid, as the windowed shapes do)."""
        T, H, W = grid
        rows = []
        for n in self.lengths:
            keep = n - self.num_prefix
            idx = torch.randperm(T * H * W, generator=gen)[:keep].sort().values
            rows.append(torch.zeros(self.num_prefix, 3, dtype=torch.int64))
            rows.append(torch.stack([idx // (H * W), (idx // W) % H, idx % W], dim=-1))
        return torch.cat(rows).to(torch.int32)

    def _allowed_pairs(self) -> int:
        if self.window is None:
            return sum(n * n for n in self.lengths)
        half = torch.tensor([w // 2 for w in self.window], device=DEVICE)
        c = self.coords.long()
        count = 0
        for s, e in zip(self.cu[:-1].tolist(), self.cu[1:].tolist()):
            cs, ps = c[s:e], self.pos[s:e]
            for r0 in range(0, e - s, 1024):
                near = ((cs[r0:r0 + 1024, None, :] - cs[None, :, :]).abs() <= half).all(-1)
                pre = (ps[r0:r0 + 1024, None] < self.num_prefix) | (ps[None, :] < self.num_prefix)
                count += int((near | pre).sum())
        return count

    def flops(self, mode: str) -> float:
        fwd = 4.0 * self.pairs * self.dim * self.heads
        return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]

    def shape(self) -> str:
        w = "" if self.window is None else f" win={self.window}"
        r = "" if self.rope is None else f" rope{self.rope[1]}"
        return (f"{self.label}: B={self.B} L~{self.total // self.B} (max {self.max_seqlen}) "
                f"H={self.heads} D={self.dim} P={self.num_prefix}{w}{r}")


# --------------------------------------------------------------------------- implementations
# Each maker returns fn(qkv[total, 3, H, D]) -> out[total, H, D] (differentiable), or raises.


def make_invnext(p: Problem):
    from invnext.ops import masked_attention

    def fn(qkv):
        return masked_attention(qkv, None, None, p.cu, p.max_seqlen, coords=p.coords, rope=p.rope, window=p.window,
                                num_prefix=p.num_prefix, backend="triton")

    return fn


def make_invnext_without_rope(p: Problem):
    from invnext.ops import masked_attention

    def fn(qkv):
        return masked_attention(qkv, None, None, p.cu, p.max_seqlen, coords=p.coords, window=p.window,
                                num_prefix=p.num_prefix, backend="triton")

    return fn


def make_invnext_rope_inline(p: Problem):
    """The same op with the RoPE rotation inside the tile loops (``INVNEXT_ATTN_ROPE=inline``)."""
    import os

    inner = make_invnext(p)

    def fn(qkv):
        before = os.environ.get("INVNEXT_ATTN_ROPE")
        os.environ["INVNEXT_ATTN_ROPE"] = "inline"
        try:
            return inner(qkv)
        finally:
            if before is None:
                del os.environ["INVNEXT_ATTN_ROPE"]
            else:
                os.environ["INVNEXT_ATTN_ROPE"] = before

    return fn


def make_sdpa_padded(p: Problem, backend: str):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    B, Lm = p.B, p.max_seqlen
    flat = (p.seg * Lm + p.pos).contiguous()  # packed token -> row of the padded [B * Lmax] layout
    key_ok = (torch.arange(Lm, device=DEVICE)[None, :] < p.cu.diff()[:, None]).view(B, 1, 1, Lm)
    mask = None if backend == "flash" else key_ok

    def fn(qkv):
        pad = qkv.new_zeros(B * Lm, *qkv.shape[1:])
        pad = pad.index_put((flat,), qkv)
        q, k, v = pad.view(B, Lm, 3, p.heads, p.dim).permute(2, 0, 3, 1, 4).unbind(0)
        with sdpa_kernel([which]):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2).reshape(B * Lm, p.heads, p.dim)[flat]

    return fn


def make_varlen(p: Problem):
    from torch.nn.attention import varlen

    if not hasattr(varlen, "varlen_attn"):
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn is missing")

    def fn(qkv):
        q, k, v = qkv.unbind(1)
        return varlen.varlen_attn(q, k, v, p.cu, p.cu, p.max_seqlen, p.max_seqlen)

    return fn


_FLEX = {}


def make_flex(p: Problem):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    seg, pos, c, P = p.seg, p.pos, p.coords, p.num_prefix
    if p.window is None:
        def mask_mod(b, h, qi, ki):
            return seg[qi] == seg[ki]
    else:
        rt, rh, rw = (w // 2 for w in p.window)
        ct, ch, cw = c[:, 0].contiguous(), c[:, 1].contiguous(), c[:, 2].contiguous()

        def mask_mod(b, h, qi, ki):
            near = ((ct[qi] - ct[ki]).abs() <= rt) & ((ch[qi] - ch[ki]).abs() <= rh) & ((cw[qi] - cw[ki]).abs() <= rw)
            return (seg[qi] == seg[ki]) & (near | (pos[qi] < P) | (pos[ki] < P))

    _sync()
    t0 = time.perf_counter()
    bm = create_block_mask(mask_mod, None, None, p.total, p.total, device=DEVICE, _compile=True)
    _sync()
    build_ms = 1e3 * (time.perf_counter() - t0)

    def fn(qkv):
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in qkv.unbind(1))  # [1, H, total, D]
        return flex(q, k, v, block_mask=bm).squeeze(0).transpose(0, 1)

    fn.extra = {"block_mask_build_ms (first build, includes its compile)": round(build_ms, 2)}
    return fn


def make_xformers(p: Problem):
    from xformers.ops import fmha, memory_efficient_attention

    if p.window is not None:
        raise RuntimeError("no equivalent xformers bias for a 3D window")
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(p.lengths)

    def fn(qkv):
        q, k, v = (t.unsqueeze(0) for t in qkv.unbind(1))
        return memory_efficient_attention(q, k, v, attn_bias=bias).squeeze(0)

    return fn


def make_flash_attn(p: Problem):
    from flash_attn import flash_attn_varlen_func

    if p.window is not None:
        raise RuntimeError("flash-attn has no 3D window")

    def fn(qkv):
        q, k, v = qkv.unbind(1)
        return flash_attn_varlen_func(q, k, v, p.cu, p.cu, p.max_seqlen, p.max_seqlen)

    return fn


# --------------------------------------------------------------------------- timing


def run_problem(p: Problem, baselines, modes, rep_ms, peak, rows, notes):
    impls = [("invnext-triton", lambda: make_invnext(p))] + baselines
    # The unmasked and unrotated rows compute something else: timed, not compared.
    run_attention_problem("masked_attention", p, impls, modes, rep_ms, peak, rows, notes,
                          compare=lambda name: "(no key mask" not in name and "without rope" not in name)


def encoder_lengths(batch: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(900, 1151, (batch,), generator=g).tolist()


def problems(quick: bool):
    """In priority order (``--max-seconds`` cuts the tail)."""
    enc = encoder_lengths(16)
    grid = (32, 16, 16)

    def win(w):
        return Problem(f"windowed {w}", [4 + 32 * 16 * 16] * 2, 12, 64, window=w, grid=grid)

    if quick:
        return [Problem("stage1-encoder", enc, 12, 64), Problem("stage2-target", [8196] * 2, 12, 64, grid=grid),
                win((4, 8, 8)), Problem("stage1-encoder+rope", enc, 12, 64, rope=(10000.0, (16, 24, 24)))]
    return [
        Problem("stage1-encoder", enc, 12, 64),
        Problem("stage2-target", [8196] * 2, 12, 64, grid=grid),
        win((4, 8, 8)),
        win((8, 16, 16)),
        Problem("predictor", [4100] * 4, 16, 64, grid=grid),
        Problem("large", enc, 16, 64),
        Problem("1b (D=88)", enc, 16, 88),
        Problem("stage1-encoder+rope", enc, 12, 64, rope=(10000.0, (16, 24, 24))),
    ]


def baselines_for(p: Problem, quick: bool):
    if p.rope is not None:  # no baseline fuses RoPE: show what the rotation costs, and the in-loop variant
        return [("invnext-triton without rope (reference point)", lambda: make_invnext_without_rope(p)),
                ("invnext-triton rope inline (in-loop rotation)", lambda: make_invnext_rope_inline(p))]
    if p.window is not None:
        return [("flex (same block mask)", lambda: make_flex(p))]
    out = [
        ("sdpa-flash padded (no key mask; incl. gather)", lambda: make_sdpa_padded(p, "flash")),
        ("sdpa-cudnn padded (incl. gather)", lambda: make_sdpa_padded(p, "cudnn")),
        ("sdpa-efficient padded (incl. gather)", lambda: make_sdpa_padded(p, "efficient")),
        ("torch varlen", lambda: make_varlen(p)),
    ]
    if p.label == "stage1-encoder":  # flex compiles per shape: one unwindowed point is enough
        out.append(("flex (document mask)", lambda: make_flex(p)))
    out += [("xformers", lambda: make_xformers(p)), ("flash-attn varlen", lambda: make_flash_attn(p))]
    return out


def main(argv=None) -> int:
    return attention_main(NAME, __doc__, "3 shapes, rep 50 ms (~3 min on an H100 with compiles)", argv, problems,
                          baselines_for, run_problem)


if __name__ == "__main__":
    sys.exit(main())
