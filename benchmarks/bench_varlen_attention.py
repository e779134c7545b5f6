"""flash-attn's varlen attention (``invnext.ops.varlen_attention``): invnext's Triton kernels
against the baselines available in the same run, bf16, forward / backward / forward+backward.

    python -m benchmarks.bench_varlen_attention [--quick] [--max-seconds S]

Shapes: a causal GQA decoder batch (Hq 32 on Hk 8, D 128), the same with a sliding window
(flash-attn's ``window_size=(255, 0)``), a non-causal encoder batch (D 64), and an attentive
pooler (16 queries per sample over ~1000 keys: cross-attention with different lengths).

FLOPs count real tokens only: forward ``4 * D * Hq * (allowed query-key pairs)``, counted
exactly from the bottom-right aligned causal / window rule per sample; backward 2.5x that,
forward+backward 3.5x. Padded baselines are charged the same FLOPs, so their extra work shows
as time. Fraction of peak = TFLOP/s / this card's measured bf16 matmul TFLOP/s.

Baselines (each skipped with a note when missing or failing):
* ``sdpa-<backend> padded``: scatter q and k/v into ``[B, H, Lmax, D]`` (timed, as is the copy
  back), then ``scaled_dot_product_attention`` with one backend forced, ``enable_gqa``, and a
  boolean ``[B, 1, Lq_max, Lk_max]`` mask of the same rule (the efficient and cuDNN kernels).
* ``torch varlen``: ``torch.nn.attention.varlen.varlen_attn`` where present (no window).
* ``flex``: ``flex_attention`` compiled once over the packed batch (one sequence of ``total_q``
  queries and ``total_k`` keys) with a block mask of the same rule, built outside the timed
  region (its build time is in ``extra``).
* ``flash-attn varlen``: ``flash_attn_varlen_func`` with the same arguments, when importable.

Results: ``benchmarks/results/bench_varlen_attention_<gpu>_<date>.{json,md}``, rewritten after
every shape so a run cut short keeps what it measured.
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
NAME = "bench_varlen_attention"
DEVICE = "cuda"  # module constants so that the wiring test can run it on the CPU interpreter
WARMUP_MS = 25


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)


class Problem:
    """One shape: packed q, k, v, both cu_seqlens, the mask rule, and its allowed-pair count."""

    def __init__(self, label, lq, lk, heads_q, heads_k, dim, *, causal=False, window=(-1, -1)):
        self.label, self.lq, self.lk = label, list(lq), list(lk)
        self.hq, self.hk, self.dim, self.causal, self.window = heads_q, heads_k, dim, causal, tuple(window)
        self.B = len(lq)
        self.cu_q, self.cu_k = _cu(self.lq), _cu(self.lk)
        self.max_q, self.max_k = max(self.lq), max(self.lk)
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.q = torch.randn(sum(lq), heads_q, dim, generator=gen).to(DEVICE, DTYPE)
        self.k = torch.randn(sum(lk), heads_k, dim, generator=gen).to(DEVICE, DTYPE)
        self.v = torch.randn(sum(lk), heads_k, dim, generator=gen).to(DEVICE, DTYPE)
        self.dout = torch.randn(sum(lq), heads_q, dim, generator=gen).to(DEVICE, DTYPE)
        self.inputs = (self.q, self.k, self.v)  # what every implementation takes
        self.pairs = sum(self._pairs(nq, nk) for nq, nk in zip(self.lq, self.lk))

    def bounds(self):
        """(left, right) with causal folded in; -1 = unbounded."""
        left, right = self.window
        return left, (0 if self.causal else right)

    def _pairs(self, nq: int, nk: int) -> int:
        left, right = self.bounds()
        i = torch.arange(nq) + (nk - nq)
        lo = (i - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
        hi = (i + right).clamp(max=nk - 1) if right >= 0 else torch.full_like(i, nk - 1)
        return int((hi - lo + 1).clamp(min=0).sum())

    def allowed(self, pad_q: int, pad_k: int) -> torch.Tensor:
        """bool ``[B, 1, pad_q, pad_k]``: the rule on the padded layout (padding never allowed,
        except a row's own column 0 where it would see nothing, so no softmax row is empty)."""
        left, right = self.bounds()
        lq = torch.tensor(self.lq, device=DEVICE)[:, None, None]
        lk = torch.tensor(self.lk, device=DEVICE)[:, None, None]
        i = torch.arange(pad_q, device=DEVICE)[None, :, None]
        j = torch.arange(pad_k, device=DEVICE)[None, None, :]
        d = j - i - (lk - lq)
        ok = (j < lk) & (i < lq)
        if left >= 0:
            ok = ok & (d >= -left)
        if right >= 0:
            ok = ok & (d <= right)
        empty = ~ok.any(-1, keepdim=True)
        return (ok | (empty & (j == 0)))[:, None]

    def flops(self, mode: str) -> float:
        fwd = 4.0 * self.pairs * self.dim * self.hq
        return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]

    def shape(self) -> str:
        rule = "causal" if self.causal else "full"
        if self.window != (-1, -1):
            rule += f" window={self.window}"
        return (f"{self.label}: B={self.B} Lq~{sum(self.lq) // self.B} (max {self.max_q}) "
                f"Lk~{sum(self.lk) // self.B} (max {self.max_k}) Hq={self.hq} Hk={self.hk} D={self.dim} {rule}")


# --------------------------------------------------------------------------- implementations
# Each maker returns fn(q, k, v) -> out[total_q, Hq, D] (differentiable), or raises.


def make_invnext(p: Problem):
    from invnext.ops import varlen_attention

    def fn(q, k, v):
        return varlen_attention(q, k, v, p.cu_q, p.cu_k, p.max_q, p.max_k, causal=p.causal, window_size=p.window,
                                backend="triton")

    return fn


def _padding_index(lengths, pad: int):
    lens = torch.tensor(lengths, device=DEVICE)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=DEVICE), lens)
    starts = torch.cumsum(lens, 0) - lens
    return seg * pad + torch.arange(int(lens.sum()), device=DEVICE) - starts[seg]


def make_sdpa_padded(p: Problem, backend: str):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH}[backend]
    B, Lq, Lk = p.B, p.max_q, p.max_k
    fq, fk = _padding_index(p.lq, Lq), _padding_index(p.lk, Lk)
    mask = p.allowed(Lq, Lk)
    seen = _sees_something(p)[:, None, None]

    def pad(x, idx, L):
        out = x.new_zeros(B * L, *x.shape[1:]).index_put((idx,), x)
        return out.view(B, L, x.shape[1], x.shape[2]).transpose(1, 2)

    def fn(q, k, v):
        qp, kp, vp = pad(q, fq, Lq), pad(k, fk, Lk), pad(v, fk, Lk)
        with sdpa_kernel([which]):
            o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=p.hq != p.hk)
        o = o.transpose(1, 2).reshape(B * Lq, p.hq, p.dim)[fq]
        # rows that see nothing attended to their padding key 0 above: the op gives 0 there
        return torch.where(seen, o, torch.zeros_like(o))

    return fn


def _sees_something(p: Problem) -> torch.Tensor:
    """bool ``[total_q]``: the row may see at least one real key."""
    left, right = p.bounds()
    out = []
    for nq, nk in zip(p.lq, p.lk):
        i = torch.arange(nq, device=DEVICE) + (nk - nq)
        lo = (i - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
        hi = (i + right).clamp(max=nk - 1) if right >= 0 else torch.full_like(i, nk - 1)
        out.append(hi >= lo)
    return torch.cat(out)


def make_torch_varlen(p: Problem):
    from torch.nn.attention import varlen

    if not hasattr(varlen, "varlen_attn"):
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn is missing")
    if p.window != (-1, -1):
        raise RuntimeError("varlen_attn takes no window")
    if p.hq != p.hk:
        raise RuntimeError("varlen_attn: no GQA in this torch")

    def fn(q, k, v):
        return varlen.varlen_attn(q, k, v, p.cu_q, p.cu_k, p.max_q, p.max_k, is_causal=p.causal)

    return fn


_FLEX = {}


def make_flex(p: Problem):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    lq, lk = p.cu_q.diff().long(), p.cu_k.diff().long()
    seg_q = torch.repeat_interleave(torch.arange(p.B, device=DEVICE), lq)
    seg_k = torch.repeat_interleave(torch.arange(p.B, device=DEVICE), lk)
    diag = torch.arange(int(lq.sum()), device=DEVICE) - p.cu_q.long()[seg_q] + (lk - lq)[seg_q]
    pos_k = torch.arange(int(lk.sum()), device=DEVICE) - p.cu_k.long()[seg_k]
    left, right = p.bounds()

    def mask_mod(b, h, qi, ki):
        d = pos_k[ki] - diag[qi]
        ok = seg_q[qi] == seg_k[ki]
        if left >= 0:
            ok = ok & (d >= -left)
        if right >= 0:
            ok = ok & (d <= right)
        return ok

    _sync()
    t0 = time.perf_counter()
    bm = create_block_mask(mask_mod, None, None, int(lq.sum()), int(lk.sum()), device=DEVICE, _compile=True)
    _sync()
    build_ms = 1e3 * (time.perf_counter() - t0)

    def fn(q, k, v):
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        return flex(q4, k4, v4, block_mask=bm, enable_gqa=p.hq != p.hk).squeeze(0).transpose(0, 1)

    fn.extra = {"block_mask_build_ms (first build, includes its compile)": round(build_ms, 2)}
    return fn


def make_flash_attn(p: Problem):
    from flash_attn import flash_attn_varlen_func

    def fn(q, k, v):
        return flash_attn_varlen_func(q, k, v, p.cu_q, p.cu_k, p.max_q, p.max_k, causal=p.causal,
                                      window_size=p.window)

    return fn


# --------------------------------------------------------------------------- timing


def run_problem(p: Problem, baselines, modes, rep_ms, peak, rows, notes):
    impls = [("invnext-triton", lambda: make_invnext(p))] + baselines
    run_attention_problem("varlen_attention", p, impls, modes, rep_ms, peak, rows, notes)


def _lengths(batch: int, lo: int, hi: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (batch,), generator=g).tolist()


def problems(quick: bool):
    """In priority order (``--max-seconds`` cuts the tail)."""
    dec = _lengths(8, 512, 2048, 0)
    enc = _lengths(16, 900, 1150, 1)
    out = [
        Problem("decoder causal gqa", dec, dec, 32, 8, 128, causal=True),
        Problem("decoder sliding window", dec, dec, 32, 8, 128, causal=True, window=(255, 0)),
        Problem("attentive pooler", [16] * 16, enc, 12, 12, 64),
    ]
    if quick:
        return out
    return out + [
        Problem("encoder", enc, enc, 12, 12, 64),
        Problem("decoder causal mqa (D=64)", dec, dec, 16, 1, 64, causal=True),
        Problem("chunked prefill (Lq < Lk)", [256] * 8, dec, 32, 8, 128, causal=True),
    ]


def baselines_for(p: Problem, quick: bool = False):
    return [
        ("sdpa-cudnn padded (incl. gather)", lambda: make_sdpa_padded(p, "cudnn")),
        ("sdpa-efficient padded (incl. gather)", lambda: make_sdpa_padded(p, "efficient")),
        ("torch varlen", lambda: make_torch_varlen(p)),
        ("flex (same block mask)", lambda: make_flex(p)),
        ("flash-attn varlen", lambda: make_flash_attn(p)),
    ]


def main(argv=None) -> int:
    return attention_main(NAME, __doc__, "3 shapes, rep 50 ms", argv, problems, baselines_for, run_problem)


if __name__ == "__main__":
    sys.exit(main())
