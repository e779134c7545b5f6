"""invnext.nn: one module per op, named after it, equal to its functional op.

Each module's forward is checked against the op it wraps, called with the same tensors and
settings (the reference backend on the CPU: the modules add no arithmetic of their own);
learned tokens (class tokens, the mask token) receive gradients and live in the state dict;
``set_ops_backend`` reaches the modules; bad settings are named.
"""
from __future__ import annotations

import pytest
import torch
from test_masked_attention_reference import make_coords, make_cu

from invnext import nn as inn
from invnext import ops
from invnext.models.switches import set_ops_backend

F64 = torch.float64


def _module_for(op: str) -> type:
    matches = [getattr(inn, name) for name in inn.__all__ if name.lower() == op.replace("_", "")]
    assert len(matches) == 1, f"no single invnext.nn module named after {op}: {matches}"
    return matches[0]


def test_every_op_has_a_module_named_alike():
    assert ops.ops(), "no ops declared"
    for op in ops.ops():
        assert _module_for(op).op == op
    assert len(inn.__all__) == len(ops.ops())  # and nothing else


def test_masked_attention_module_is_the_op():
    torch.manual_seed(0)
    lengths, P = [7, 1, 13], 1
    total, cu = sum(lengths), make_cu(lengths)
    coords = make_coords(lengths, P, grid=(3, 4, 5))
    q, k, v = (torch.randn(total, 2, 16, dtype=F64, requires_grad=True) for _ in range(3))
    settings = {"softmax_scale": 0.3, "rope": (100.0, (4, 6, 6)), "window": (3, 3, 5), "num_prefix": P}
    module = inn.MaskedAttention(**settings, backend="torch")
    got = module(q, k, v, cu, max(lengths), coords)
    want = ops.masked_attention(q, k, v, cu, max(lengths), coords=coords, backend="torch", **settings)
    assert torch.equal(got, want)
    (gq,) = torch.autograd.grad(got.sum(), q)
    assert torch.isfinite(gq).all() and gq.abs().sum() > 0
    assert list(module.parameters()) == []
    assert "window=(3, 3, 5)" in repr(module) and "backend='torch'" in repr(module)


def test_varlen_attention_module_is_the_op():
    torch.manual_seed(0)
    lq, lk = [7, 1, 13], [4, 9, 0]
    cq, ck = make_cu(lq), make_cu(lk)
    q = torch.randn(sum(lq), 4, 16, dtype=F64, requires_grad=True)
    k, v = (torch.randn(sum(lk), 2, 16, dtype=F64, requires_grad=True) for _ in range(2))
    settings = {"softmax_scale": 0.3, "causal": True, "window_size": (3, -1), "return_lse": True,
                "rope_pairing": "interleaved"}
    tables_q = (torch.rand(sum(lq), 8, dtype=F64), torch.rand(sum(lq), 8, dtype=F64))
    tables_k = (torch.rand(sum(lk), 8, dtype=F64), torch.rand(sum(lk), 8, dtype=F64))
    module = inn.VarlenAttention(**settings, backend="torch")
    got, lse = module(q, k, v, cq, ck, max(lq), max(lk), tables_q, tables_k)
    want, want_lse = ops.varlen_attention(q, k, v, cq, ck, max(lq), max(lk), rope=tables_q, rope_k=tables_k,
                                          backend="torch", **settings)
    assert torch.equal(got, want) and torch.equal(lse, want_lse)
    (gk,) = torch.autograd.grad(got.sum(), k)
    assert torch.isfinite(gk).all() and gk.abs().sum() > 0
    assert list(module.parameters()) == []
    assert "window_size=(3, -1)" in repr(module) and "causal=True" in repr(module)


def test_gather_and_scatter_modules_own_their_tokens():
    torch.manual_seed(1)
    B, N, C, P = 3, 10, 8, 2
    x = torch.randn(B, N, C, dtype=F64)
    pos = torch.randn(1, N, C, dtype=F64)
    hidden = torch.rand(B, N) < 0.5
    hidden[:, 0] = False  # every sample keeps a token
    gather = inn.GatherVisible(C, num_prefix=P).double()
    packed = gather(x, hidden, pos, num_visible=(~hidden).sum(1).tolist())
    want = ops.gather_visible(x, hidden, pos, gather.prefix, backend="torch")
    assert torch.equal(packed.tokens, want.tokens) and torch.equal(packed.index, want.index)
    assert torch.equal(packed.cu_seqlens, want.cu_seqlens) and packed.max_seqlen == want.max_seqlen

    scatter = inn.ScatterTokens(C).double()
    grid = scatter(packed.tokens, packed.index, N, B, pos)
    assert torch.equal(grid, ops.scatter_tokens(packed.tokens, packed.index, scatter.mask_token, pos, N, batch_size=B))
    (grid.square().sum() + packed.tokens.square().sum()).backward()  # prefix rows leave through the tokens
    assert gather.prefix.grad is not None and gather.prefix.grad.abs().sum() > 0  # class tokens learn
    assert scatter.mask_token.grad is not None and scatter.mask_token.grad.abs().sum() > 0  # so does the mask token
    assert set(gather.state_dict()) == {"prefix"} and set(scatter.state_dict()) == {"mask_token"}
    assert inn.GatherVisible(C).prefix is None and list(inn.GatherVisible(C).parameters()) == []


def test_token_modules_take_their_models_tokens_per_call():
    """Without learned tokens of their own, the modules place the ones given per call (an encoder's
    class tokens plus positions, a predictor's embedded mask token); one source at a time."""
    torch.manual_seed(4)
    B, N, C, P = 2, 6, 4, 1
    x, pos, prefix = torch.randn(B, N, C), torch.randn(1, N, C), torch.randn(1, P, C)
    hidden = torch.rand(B, N) < 0.5
    packed = inn.GatherVisible(C)(x, hidden, pos, prefix=prefix)
    want = ops.gather_visible(x, hidden, pos, prefix)
    assert torch.equal(packed.tokens, want.tokens) and torch.equal(packed.index, want.index)
    token = torch.randn(C)
    scatter = inn.ScatterTokens(C, learned_token=False)
    assert list(scatter.parameters()) == []
    got = scatter(packed.tokens, packed.index, N, B, pos, mask_token=token)
    assert torch.equal(got, ops.scatter_tokens(packed.tokens, packed.index, token, pos, N, batch_size=B))
    with pytest.raises(ValueError, match="GatherVisible: this module places its own learned prefix"):
        inn.GatherVisible(C, num_prefix=P)(x, hidden, prefix=prefix)
    with pytest.raises(ValueError, match="ScatterTokens: this module holds no mask token: pass one"):
        scatter(packed.tokens, packed.index, N, B)
    with pytest.raises(ValueError, match="ScatterTokens: this module holds a learned mask token: pass none"):
        inn.ScatterTokens(C)(packed.tokens, packed.index, N, B, mask_token=token)


def test_diffusion_modules_are_the_ops():
    torch.manual_seed(2)
    sched = ops.make_schedule(1000, "cosine", respace=50)
    M, C = 9, 6
    x0, noise, x_t = (torch.randn(M, C, dtype=F64) for _ in range(3))
    model_out = torch.randn(M, 2 * C, dtype=F64)
    t = torch.randint(0, sched.num_steps, (M,))
    t[0], t[1] = 0, sched.num_steps - 1
    assert torch.equal(inn.QSample(sched)(x0, noise, t), ops.q_sample(x0, noise, t, sched))
    for reduction in ("mean", "sum", "none"):
        got = inn.DiffusionLoss(sched, reduction=reduction)(model_out, x0, x_t, noise, t)
        assert torch.equal(got, ops.diffusion_loss(model_out, x0, x_t, noise, t, sched, reduction=reduction))
    got = inn.PSampleStep(sched, temperature=0.7)(model_out, x_t, t, noise)
    assert torch.equal(got, ops.p_sample_step(model_out, x_t, t, sched, noise, temperature=0.7))
    got = inn.DDIMStep(sched, eta=0.5)(model_out, x_t, t, noise)
    assert torch.equal(got, ops.ddim_step(model_out, x_t, t, sched, noise, eta=0.5))
    shift, scale = torch.randn(C, dtype=F64), torch.randn(M, C, dtype=F64)
    got = inn.AdaLNModulate(eps=1e-5)(x0, shift, scale)
    assert torch.equal(got, ops.adaln_modulate(x0, shift, scale, eps=1e-5))


class _Denoiser(torch.nn.Module):
    def __init__(self, C: int):
        super().__init__()
        self.proj = torch.nn.Linear(2 * C, 2 * C, dtype=F64)

    def forward(self, x_t, t, cond):
        return torch.tanh(self.proj(torch.cat([x_t, cond], -1)) * (1.0 + t[:, None].to(F64) / 1000.0))


def test_sample_loop_modules_are_the_ops_and_own_the_denoiser():
    torch.manual_seed(3)
    sched = ops.make_schedule(1000, "cosine", respace=8)
    M, C = 5, 4
    den = _Denoiser(C)
    cond, x_T = torch.randn(M, C, dtype=F64), torch.randn(M, C, dtype=F64)
    step_noise = torch.randn(sched.num_steps, M, C, dtype=F64)
    loop = inn.PSampleLoop(den, sched, C, temperature=0.9)
    got = loop(cond, x_T, step_noise)
    want = ops.p_sample_loop(den, cond, sched, channels=C, noise=x_T, step_noise=step_noise, temperature=0.9)
    assert torch.isfinite(got).all() and torch.equal(got, want)
    ddim = inn.DDIMSampleLoop(den, sched, C, eta=0.0)
    want = ops.ddim_sample_loop(den, cond, sched, channels=C, noise=x_T, eta=0.0)
    assert torch.equal(ddim(cond, x_T), want)
    assert "denoise_fn.proj.weight" in dict(loop.named_parameters())  # moves with the sampler
    # A schedule and temperature for one call (a model choosing its respacing per call).
    other = ops.make_schedule(1000, "cosine", respace=4)
    want = ops.p_sample_loop(den, cond, other, channels=C, noise=x_T, step_noise=step_noise[:4], temperature=0.5)
    assert torch.equal(loop(cond, x_T, step_noise[:4], schedule=other, temperature=0.5), want)
    with pytest.raises(TypeError, match="PSampleLoop: give noise, or cond as a tensor"):
        loop([cond], None)
    with pytest.raises(TypeError, match=r"PSampleLoop: unexpected keyword\(s\) \['eta'\]"):
        loop(cond, x_T, eta=0.5)


def test_mask_modules_are_the_ops():
    grid = (3, 6, 6)
    assert torch.equal(inn.TubeMask(0.75)(4, grid, seed=5), ops.tube_mask(4, grid, 0.75, seed=5))
    mb = inn.MultiblockMask(4, (0.1, 0.3), (0.5, 2.0), (0.4, 1.0))
    want = ops.multiblock_mask(4, grid, 4, (0.1, 0.3), (0.5, 2.0), (0.4, 1.0), seed=5)
    assert torch.equal(mb(4, grid, seed=5), want)
    hidden, counts = mb(4, grid, seed=5, return_counts=True)
    assert torch.equal(hidden, want) and torch.equal(counts, want.sum(1))
    attn = torch.rand(2, 3, 36)
    for mode in ("topk", "sample"):
        assert torch.equal(inn.SemanticMask(9, mode)(attn, seed=1), ops.semantic_mask(attn, 9, mode, seed=1))
        assert torch.equal(inn.SemanticMask(None, mode)(attn, keep=9, seed=1), ops.semantic_mask(attn, 9, mode, seed=1))
    with pytest.raises(ValueError, match="SemanticMask: this module needs keep per call"):
        inn.SemanticMask(None)(attn, seed=1)
    with pytest.raises(ValueError, match="SemanticMask: this module keeps 9 per frame: pass keep=None"):
        inn.SemanticMask(9)(attn, keep=4, seed=1)
    tokens = torch.randn(2, 3, 36, 5)
    assert torch.equal(inn.MotionMask(0.5)(tokens), ops.motion_mask(tokens, 0.5))
    with pytest.raises(ValueError, match="multiblock_mask: spatial_scale"):
        inn.MultiblockMask(2, (0.5, 0.2))(1, grid, seed=0)  # the op validates the settings


def test_set_ops_backend_reaches_the_modules():
    sched = ops.make_schedule(100, "linear")
    stack = torch.nn.ModuleList(
        [inn.MaskedAttention(), inn.GatherVisible(8), inn.ScatterTokens(8), inn.DiffusionLoss(sched), inn.TubeMask(0.5)]
    )
    assert all(m.backend == "auto" for m in stack)
    set_ops_backend(stack, "torch")
    assert all(m.backend == "torch" for m in stack)
    set_ops_backend(stack, "triton")  # the ops with a Triton kernel take it; the tube mask has none
    assert [m.backend for m in stack] == ["triton", "triton", "triton", "triton", "auto"]
    assert inn.ScatterTokens(8, backend="cuda").backend == "cuda"


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: inn.MaskedAttention(backend="gpu"), ValueError, "MaskedAttention: backend must be one of"),
        (lambda: inn.GatherVisible(0), ValueError, "GatherVisible: dim must be an int >= 1"),
        (lambda: inn.GatherVisible(8, num_prefix=-1), ValueError, "GatherVisible: num_prefix must be an int >= 0"),
        (lambda: inn.ScatterTokens(2.5), ValueError, "ScatterTokens: dim must be an int >= 1"),
        (lambda: inn.DiffusionLoss(None), TypeError, "DiffusionLoss: schedule must be an invnext.ops.Diffusion"),
        (
            lambda: inn.DiffusionLoss(ops.make_schedule(50, "linear"), reduction="avg"),
            ValueError,
            "DiffusionLoss: reduction must be",
        ),
        (lambda: inn.PSampleLoop(3, ops.make_schedule(50, "linear"), 4), TypeError, "denoise_fn must be callable"),
        (
            lambda: inn.DDIMSampleLoop(_Denoiser(2), ops.make_schedule(50, "linear"), 0),
            ValueError,
            "DDIMSampleLoop: channels must be an int >= 1",
        ),
    ],
)
def test_bad_settings_are_named(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
