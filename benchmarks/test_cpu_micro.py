"""pytest-benchmark micro-benchmarks of the pure-PyTorch reference ops on the CPU, at the tiny preset's shapes.

    python -m pytest benchmarks/test_cpu_micro.py --benchmark-only

Not part of the default test run (``pytest`` collects ``tests/`` only). ``benchmarks.run``
runs this file on CPU machines and turns the timings into result rows. Each benchmark's
``extra_info`` (impl, mode, shape, dtype) labels its row; each also checks its output's
shape and finiteness, so a broken reference fails instead of timing garbage.

Shapes (tiny preset: 4 x 7 x 7 grid, N = 196, encoder width 96 / 4 heads, predictor 128 / 4
heads, window 32, 16-px patches of 768 values): batch 2, 80% hidden for Stage 1 (40 visible +
4 class tokens per clip).
"""
from __future__ import annotations

import pytest
import torch

from invnext import ops

B, GRID, N = 2, (4, 7, 7), 196
P, C_ENC, C_PRED, PATCH = 4, 96, 128, 768
KEEP = 10  # per frame: 80% of 49 hidden, as kept_per_frame(0.8, 49)


def _info(benchmark, impl, mode, shape, dtype="float32"):
    benchmark.extra_info.update({"impl": impl, "mode": mode, "shape": shape, "dtype": dtype})


@pytest.fixture(scope="module")
def gen():
    return torch.Generator().manual_seed(0)


def _encoder_batch(gen, heads=4):
    L = P + 4 * KEEP
    cu = torch.arange(B + 1, dtype=torch.int32) * L
    q, k, v = (torch.randn(B * L, heads, C_ENC // heads, generator=gen) for _ in range(3))
    return q, k, v, cu, L


def test_attention_encoder_fwd(benchmark, gen):
    q, k, v, cu, L = _encoder_batch(gen)
    _info(benchmark, "torch reference", "fwd", f"encoder B={B} L={L} H=4 D=24 P={P}")
    out = benchmark(lambda: ops.masked_attention(q, k, v, cu, L, num_prefix=P, backend="torch"))
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_attention_encoder_fwd_bwd(benchmark, gen):
    q, k, v, cu, L = _encoder_batch(gen)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    dout = torch.randn(q.shape, generator=gen)
    _info(benchmark, "torch reference", "fwd+bwd", f"encoder B={B} L={L} H=4 D=24 P={P}")

    def run():
        out = ops.masked_attention(q, k, v, cu, L, num_prefix=P, backend="torch")
        return torch.autograd.grad(out, (q, k, v), dout)

    grads = benchmark(run)
    assert all(g.shape == q.shape and torch.isfinite(g).all() for g in grads)


def test_attention_predictor_window_rope_fwd(benchmark, gen):
    heads, D = 4, C_PRED // 4
    qkv = torch.randn(B * N, 3, heads, D, generator=gen)
    cu = torch.arange(B + 1, dtype=torch.int32) * N
    n = torch.arange(N).repeat(B)
    coords = torch.stack([torch.zeros_like(n), torch.zeros_like(n), n], 1).to(torch.int32)
    _info(benchmark, "torch reference", "fwd", f"predictor B={B} N={N} H={heads} D={D} window 32 rope1d")
    out = benchmark(lambda: ops.masked_attention(qkv, None, None, cu, N, coords=coords, rope=(10000.0, (0, 0, D)),
                                                 window=32, backend="torch"))
    assert out.shape == (B * N, heads, D) and torch.isfinite(out).all()


def _hidden(gen):
    order = torch.rand(B, N, generator=gen).argsort(1)
    hidden = torch.ones(B, N, dtype=torch.bool)
    hidden.scatter_(1, order[:, : 4 * KEEP], False)
    return hidden


def test_gather_visible_fwd(benchmark, gen):
    x = torch.randn(B, N, C_ENC, generator=gen)
    pos = torch.randn(1, N, C_ENC, generator=gen)
    prefix = torch.randn(1, P, C_ENC, generator=gen)
    hidden = _hidden(gen)
    _info(benchmark, "torch reference", "fwd", f"gather_visible B={B} N={N} C={C_ENC} visible {4 * KEEP} P={P}")
    packed = benchmark(lambda: ops.gather_visible(x, hidden, pos, prefix, num_visible=[4 * KEEP] * B, backend="torch"))
    assert packed.tokens.shape == (B * (P + 4 * KEEP), C_ENC) and torch.isfinite(packed.tokens).all()


def test_scatter_tokens_fwd(benchmark, gen):
    hidden = _hidden(gen)
    x = torch.randn(B, N, C_PRED, generator=gen)
    packed = ops.gather_visible(x, hidden, num_visible=[4 * KEEP] * B, backend="torch")
    mask = torch.randn(C_PRED, generator=gen)
    pos = torch.randn(1, N, C_PRED, generator=gen)
    _info(benchmark, "torch reference", "fwd", f"scatter_tokens B={B} N={N} C={C_PRED}")
    out = benchmark(lambda: ops.scatter_tokens(packed.tokens, packed.index, mask, pos=pos, N=N, batch_size=B, backend="torch"))
    assert out.shape == (B, N, C_PRED) and torch.isfinite(out).all()


def test_diffusion_loss_fwd_bwd(benchmark, gen):
    M = B * (N - 4 * KEEP)
    sched = ops.make_schedule(1000, "cosine")
    x0 = torch.rand(M, PATCH, generator=gen) * 2 - 1
    noise = torch.randn(M, PATCH, generator=gen)
    t = torch.randint(0, 1000, (M,), generator=gen)
    x_t = ops.q_sample(x0, noise, t, sched, backend="torch")
    out = torch.randn(M, 2 * PATCH, generator=gen, requires_grad=True)
    _info(benchmark, "torch reference", "fwd+bwd", f"diffusion_loss M={M} C={PATCH}")

    def run():
        loss = ops.diffusion_loss(out, x0, x_t, noise, t, sched, backend="torch")
        return torch.autograd.grad(loss, out)[0]

    g = benchmark(run)
    assert g.shape == out.shape and torch.isfinite(g).all()


def test_semantic_mask_topk(benchmark, gen):
    attn = torch.rand(B, GRID[0], GRID[1] * GRID[2], generator=gen).softmax(-1)
    _info(benchmark, "torch reference", "sample", f"semantic_mask topk B={B} grid={GRID} keep={KEEP}")
    hidden = benchmark(lambda: ops.semantic_mask(attn, KEEP, "topk", backend="torch"))
    assert hidden.shape == (B, N) and int((~hidden).sum()) == B * GRID[0] * KEEP


def test_multiblock_mask(benchmark):
    _info(benchmark, "torch reference", "sample", f"multiblock_mask B={B} grid={GRID} 8 blocks x 15%")
    hidden = benchmark(lambda: ops.multiblock_mask(B, GRID, 8, (0.15, 0.15), (0.75, 1.5), seed=0, backend="torch"))
    assert hidden.shape == (B, N) and hidden.dtype == torch.bool
