"""Every accelerated op is a ``torch.library`` custom op that ``torch.compile`` keeps in its graph.

For each Triton op: ``torch.compile(fullgraph=True)`` of a function calling the kernel entry
gives the eager results and gradients bit for bit (the same kernels run, in the same order), and
the AOT forward / backward graphs hold the ``invnext::<op>_triton_fwd`` / ``_bwd`` nodes (the
op was not decomposed or skipped). The backend is ``aot_eager`` (AOTAutograd with no-op
compilers) plus a hook that keeps the graphs. ``torch.library.opcheck`` checks each custom op's
schema, fake (shapes, dtypes, strides vs the real kernel) and autograd registration.

The CUDA-native ops run only on a GPU; on the CPU their fakes are checked under FakeTensorMode
on fake CUDA tensors (no GPU is touched). Triton ops run on the CPU interpreter here, so every
shape is tiny.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import FakeTensorMode

from invnext._kernels_path import ensure_kernels_importable
from invnext.ops import diffusion as R

ensure_kernels_importable()
tk = importlib.import_module("invnext_kernels.tokens")
kd = importlib.import_module("invnext_kernels.diffusion")

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

# Sample lengths over N = 9 places: ragged, one sample with nothing visible.
N = 9
COUNTS = [4, 0, 9]
OTHER_COUNTS = [2, 7, 1]  # a second mask: another `total`, same graph (dynamic shapes)


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------
def _compile(fn):
    """``fn`` compiled like backend="aot_eager" (fullgraph), keeping the forward and backward graphs."""
    graphs = {"fw": [], "bw": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True, dynamic=True), graphs


def _targets(gms) -> set[str]:
    return {str(n.target) for gm in gms for n in gm.graph.nodes if n.op == "call_function"}


def _assert_in_graphs(graphs, fwd: str, bwd: str | None):
    assert f"invnext.{fwd}.default" in _targets(graphs["fw"]), _targets(graphs["fw"])
    if bwd is not None:
        assert f"invnext.{bwd}.default" in _targets(graphs["bw"]), _targets(graphs["bw"])


def _packing(counts, n, P, device):
    """index int64[total] (-1 on prefix rows), cu_seqlens int32[B+1]; places picked at random."""
    index, cu = [], [0]
    for b, k in enumerate(counts):
        places = torch.randperm(n)[:k].sort().values + b * n
        index.append(torch.cat([torch.full((P,), -1, dtype=torch.int64), places]))
        cu.append(cu[-1] + P + k)
    return torch.cat(index).to(device), torch.tensor(cu, dtype=torch.int32, device=device)


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _run(fn, inputs, upstream):
    """(outputs, grads of sum(out * upstream) w.r.t. the inputs that require grad)."""
    leaves = _leaves(*inputs)
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * u).sum() for o, u in zip(outs, upstream))
    wrt = [t for t in leaves if t is not None]
    return [o.detach() for o in outs], torch.autograd.grad(loss, wrt)


def _assert_equal(got, want):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), f"output {i}: max |diff| {(a.double() - b.double()).abs().max().item()}"


def _eager_vs_compiled(fn, inputs, upstream):
    compiled, graphs = _compile(fn)
    want_out, want_grad = _run(fn, inputs, upstream)
    got_out, got_grad = _run(compiled, inputs, upstream)
    _assert_equal(got_out, want_out)
    _assert_equal(got_grad, want_grad)
    return compiled, graphs


_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def _opcheck(op, args, *, with_grad=False):
    """opcheck; ``with_grad`` adds AOT dispatch with dynamic shapes through the autograd formula."""
    torch.library.opcheck(op, args, test_utils=_CHECKS + (("test_aot_dispatch_dynamic",) if with_grad else ()))


# ----------------------------------------------------------------------------------------
# tokens (Triton)
# ----------------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gather_visible_compiles(triton_device, dtype):
    B, C, P = len(COUNTS), 13, 2
    dev = triton_device
    index, cu = _packing(COUNTS, N, P, dev)
    x = torch.randn(B, N, C).to(dtype).to(dev)
    pos = torch.randn(1, N, C).to(dtype).to(dev)  # shared table: dpos is a batch sum
    prefix = torch.randn(B, P, C).to(dtype).to(dev)

    def f(x, pos, prefix, index, cu):
        return tk.gather_visible_triton(x, index, cu, pos, prefix)

    def with_mask(index, cu):
        return lambda x, pos, prefix: f(x, pos, prefix, index, cu)

    compiled, graphs = _compile(f)
    for idx, c in ((index, cu), _packing(OTHER_COUNTS, N, P, dev)):
        up = [torch.randn(idx.numel(), C, device=dev)]
        want = _run(with_mask(idx, c), (x, pos, prefix), up)
        got = _run(lambda *t, idx=idx, c=c: compiled(*t, idx, c), (x, pos, prefix), up)
        _assert_equal(got[0], want[0])
        _assert_equal(got[1], want[1])
    assert len(graphs["fw"]) == 1, "a new total recompiled: the fake must keep it symbolic"
    _assert_in_graphs(graphs, "gather_visible_triton_fwd", "gather_visible_triton_bwd")


@pytest.mark.triton
def test_scatter_tokens_compiles(triton_device):
    B, C, P = len(COUNTS), 13, 1
    dev = triton_device
    index, _ = _packing(COUNTS, N, P, dev)
    packed = torch.randn(index.numel(), C, device=dev)
    mask_token = torch.randn(C, device=dev)
    pos = torch.randn(B, N, C, device=dev)  # per-sample table: dpos is the gradient itself

    def f(packed, mask_token, pos):
        return tk.scatter_tokens_triton(packed, index, mask_token, pos, B, N)

    _, graphs = _eager_vs_compiled(f, (packed, mask_token, pos), [torch.randn(B, N, C, device=dev)])
    _assert_in_graphs(graphs, "scatter_tokens_triton_fwd", "scatter_tokens_triton_bwd")


@pytest.mark.triton
def test_gather_then_scatter_is_one_graph(triton_device):
    # The encoder -> predictor path: both ops and both backwards in one compiled graph.
    B, C, P = len(COUNTS), 8, 2
    dev = triton_device
    index, cu = _packing(COUNTS, N, P, dev)
    inputs = (torch.randn(B, N, C, device=dev), torch.randn(1, P, C, device=dev), torch.randn(C, device=dev))

    def f(x, prefix, mask_token):
        packed = tk.gather_visible_triton(x, index, cu, None, prefix)
        return tk.scatter_tokens_triton(torch.tanh(packed), index, mask_token, None, B, N)

    _, graphs = _eager_vs_compiled(f, inputs, [torch.randn(B, N, C, device=dev)])
    for op in ("gather_visible", "scatter_tokens"):
        _assert_in_graphs(graphs, f"{op}_triton_fwd", f"{op}_triton_bwd")


@pytest.mark.triton
def test_opcheck_token_ops(triton_device):
    B, C, P = len(COUNTS), 5, 2
    dev = triton_device
    index, cu = _packing(COUNTS, N, P, dev)
    total = index.numel()
    x, pos, prefix = _leaves(torch.randn(B, N, C, device=dev), torch.randn(B, N, C, device=dev),
                             torch.randn(1, P, C, device=dev))  # fmt: skip
    _opcheck(tk.gather_visible_triton_fwd, (x, index, cu, pos, prefix), with_grad=True)
    _opcheck(tk.gather_visible_triton_fwd, (x, index, cu, None, None))
    g = torch.randn(total, C, device=dev)
    for need in ((True, True, True), (False, True, False), (False, False, True)):
        _opcheck(tk.gather_visible_triton_bwd, (g, index, cu, B, N, 1, 1, P, *need))
    packed, mask_token = _leaves(torch.randn(total, C, device=dev), torch.randn(C, device=dev))
    _opcheck(tk.scatter_tokens_triton_fwd, (packed, index, mask_token, pos, B, N), with_grad=True)
    _, inv = tk.scatter_tokens_triton_fwd(packed.detach(), index, mask_token.detach(), None, B, N)
    gs = torch.randn(B, N, C, device=dev)
    for need in ((True, True, True), (False, True, False), (True, False, False)):
        _opcheck(tk.scatter_tokens_triton_bwd, (gs, index, inv, *need))


# ----------------------------------------------------------------------------------------
# diffusion (Triton)
# ----------------------------------------------------------------------------------------
def _diffusion_case(device, M=5, C=6, dtype=torch.float32):
    s = R.make_schedule(50, device=device)
    t = torch.tensor([0, 1, 49, 17, 3][:M], device=device)
    mo = (torch.randn(M, 2 * C) * 0.5).to(dtype).to(device)
    x0 = (torch.rand(M, C) * 2 - 1).to(dtype).to(device)
    noise = torch.randn(M, C).to(dtype).to(device)
    x_t = R.q_sample_reference(x0, noise, t, s)
    return s, t, mo, x0, noise, x_t


@pytest.mark.triton
def test_q_sample_compiles(triton_device):
    s, t, _, x0, noise, _ = _diffusion_case(triton_device, dtype=torch.bfloat16)

    def f(x0, noise):
        return kd.q_sample_triton(x0, noise, t, s)

    _, graphs = _eager_vs_compiled(f, (x0, noise), [torch.randn(x0.shape, device=triton_device)])
    _assert_in_graphs(graphs, "q_sample_triton_fwd", "q_sample_triton_bwd")


@pytest.mark.triton
def test_diffusion_loss_compiles(triton_device):
    s, t, mo, x0, noise, x_t = _diffusion_case(triton_device)

    def f(model_out):
        # the decoder's use: eps and v halves as one [M, 2C] output, a mean over rows
        return kd.diffusion_loss_triton(model_out, x0, x_t, noise, t, s).mean()

    _, graphs = _eager_vs_compiled(f, (mo,), [torch.ones((), device=triton_device)])
    _assert_in_graphs(graphs, "diffusion_loss_triton_fwd", "diffusion_loss_triton_bwd")


@pytest.mark.triton
def test_adaln_modulate_compiles(triton_device):
    M, W = 6, 24
    dev = triton_device
    x = torch.randn(M, W, device=dev)
    shift, scale = torch.randn(2, W, device=dev), torch.randn(2, W, device=dev)

    def f(x, shift, scale):
        # per-sample modulation as the public op passes it: stride-0 views of [2, W] rows
        rows = lambda p: p[:, None, :].expand(2, M // 2, W).reshape(M, W)
        return kd.adaln_modulate_triton(x, rows(shift), rows(scale), 1e-6)

    _, graphs = _eager_vs_compiled(f, (x, shift, scale), [torch.randn(M, W, device=dev)])
    _assert_in_graphs(graphs, "adaln_modulate_triton_fwd", "adaln_modulate_triton_bwd")


@pytest.mark.triton
def test_sampling_steps_compile(triton_device):
    # Forward-only ops (sampling runs under no_grad; with autograd recording the kernels are
    # declined and dispatch runs the reference, ordinary torch ops for the compiler).
    s, t, mo, _, noise, x_t = _diffusion_case(triton_device)

    def steps(mo, x_t):
        return kd.p_sample_step_triton(mo, x_t, t, s, noise, 0.8), kd.ddim_step_triton(mo, x_t, t, s, noise, 0.5)

    compiled, graphs = _compile(steps)
    with torch.no_grad():
        _assert_equal(compiled(mo, x_t), steps(mo, x_t))
    _assert_in_graphs(graphs, "p_sample_step_triton_fwd", None)
    _assert_in_graphs(graphs, "ddim_step_triton_fwd", None)


@pytest.mark.triton
def test_opcheck_diffusion_ops(triton_device):
    s, t, mo, x0, noise, x_t = _diffusion_case(triton_device)
    a, sm = s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod
    post = kd._tables(s, *kd._POSTERIOR)
    x0g, noiseg, mog = _leaves(x0, noise, mo)
    _opcheck(kd.q_sample_triton_fwd, (x0g, noiseg, t, a, sm), with_grad=True)
    g = torch.randn(x0.shape, device=triton_device)
    _opcheck(kd.q_sample_triton_bwd, (g, t, a, sm, torch.float32, torch.bfloat16, True, True))
    _opcheck(kd.q_sample_triton_bwd, (g, t, a, sm, torch.float32, torch.float32, False, True))
    _opcheck(kd.diffusion_loss_triton_fwd, (mog, x0, x_t, noise, t, post), with_grad=True)
    _opcheck(kd.diffusion_loss_triton_bwd, (torch.rand(5, device=triton_device), mo, x0, x_t, noise, t, post))
    _opcheck(kd.p_sample_step_triton_fwd, (mo, x_t, t, post, noise, 0.8))
    ddim_tables = kd._tables(s, *kd._DDIM_TABLES)
    _opcheck(kd.ddim_step_triton_fwd, (mo, x_t, t, ddim_tables, noise, 1.0))
    _opcheck(kd.ddim_step_triton_fwd, (mo, x_t, t, ddim_tables, None, 0.0))
    x, shift, scale = _leaves(*(torch.randn(4, 10, device=triton_device) for _ in range(3)))
    _opcheck(kd.adaln_modulate_triton_fwd, (x, shift, scale, 1e-5), with_grad=True)
    _, mean, rstd = kd.adaln_modulate_triton_fwd(x.detach(), shift.detach(), scale.detach(), 1e-5)
    dy = torch.randn(4, 10, device=triton_device)
    for need in ((True, True), (False, True), (True, False)):
        _opcheck(kd.adaln_modulate_triton_bwd, (dy, x.detach(), scale.detach(), mean, rstd, *need))


# ----------------------------------------------------------------------------------------
# tokens (CUDA native)
# ----------------------------------------------------------------------------------------
def _native_ops():
    return importlib.import_module("invnext.native.ops")


def test_native_fakes_on_fake_cuda_tensors():
    """Schema and fake of every native op, traced on fake CUDA tensors: runs on any host."""
    ops = _native_ops()
    B, C, P = len(COUNTS), 7, 2
    with FakeTensorMode():
        dev = torch.device("cuda")
        index = torch.empty(sum(COUNTS) + B * P, dtype=torch.int64, device=dev)
        cu = torch.empty(B + 1, dtype=torch.int32, device=dev)
        x = torch.empty(B, N, C, dtype=torch.bfloat16, device=dev)
        prefix = torch.empty(1, P, C, dtype=torch.bfloat16, device=dev)
        out = ops.gather_visible_cuda_fwd(x, index, cu, None, prefix)
        assert (out.shape, out.dtype, out.device, out.stride()) == ((index.shape[0], C), x.dtype, x.device, (C, 1))
        dx, dpos, dprefix = ops.gather_visible_cuda_bwd(out, index, cu, B, N, B, 1, P, True, False, True)
        assert [tuple(t.shape) for t in (dx, dpos, dprefix)] == [(B, N, C), (0, N, C), (1, P, C)]
        assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in (dx, dpos, dprefix))
        mask = torch.empty(C, dtype=torch.bfloat16, device=dev)
        full, inv = ops.scatter_tokens_cuda_fwd(out, index, mask, None, B, N)
        assert (tuple(full.shape), full.dtype, tuple(inv.shape), inv.dtype) == (
            (B, N, C), torch.bfloat16, (B * N,), torch.int32,
        )  # fmt: skip
        dpacked, dmask, dpos = ops.scatter_tokens_cuda_bwd(full, index, inv, True, False, True)
        assert [tuple(t.shape) for t in (dpacked, dmask, dpos)] == [(index.shape[0], C), (0,), (1, N, C)]
    for name in ops._OP_NAMES:
        schema = getattr(torch.ops.invnext, name).default._schema
        assert not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments), name


@pytest.mark.requires_cuda
def test_native_ops_opcheck_and_compile():
    from invnext import native

    if native.unavailable_reason() is not None:
        pytest.skip(f"CUDA kernels unavailable: {native.unavailable_reason()}")
    ops = _native_ops()
    dev = torch.device("cuda")
    B, C, P = len(COUNTS), 24, 2
    index, cu = _packing(COUNTS, N, P, dev)
    x, pos, prefix = _leaves(torch.randn(B, N, C, device=dev), torch.randn(1, N, C, device=dev),
                             torch.randn(B, P, C, device=dev))  # fmt: skip
    _opcheck(ops.gather_visible_cuda_fwd, (x, index, cu, pos, prefix), with_grad=True)
    g = torch.randn(index.numel(), C, device=dev)
    for need in ((True, True, True), (False, True, False)):
        _opcheck(ops.gather_visible_cuda_bwd, (g, index, cu, B, N, 1, B, P, *need))
    packed, mask_token = _leaves(torch.randn(index.numel(), C, device=dev), torch.randn(C, device=dev))
    _opcheck(ops.scatter_tokens_cuda_fwd, (packed, index, mask_token, pos, B, N), with_grad=True)
    _, inv = ops.scatter_tokens_cuda_fwd(packed.detach(), index, mask_token.detach(), None, B, N)
    _opcheck(ops.scatter_tokens_cuda_bwd, (torch.randn(B, N, C, device=dev), index, inv, True, True, True))

    def f(x, pos, prefix, mask_token):
        packed = ops.gather_visible_cuda(x, index, cu, pos, prefix)
        return ops.scatter_tokens_cuda(torch.tanh(packed), index, mask_token, pos, B, N)

    _, graphs = _eager_vs_compiled(f, (x, pos, prefix, mask_token), [torch.randn(B, N, C, device=dev)])
    for op in ("gather_visible", "scatter_tokens"):
        _assert_in_graphs(graphs, f"{op}_cuda_fwd", f"{op}_cuda_bwd")
