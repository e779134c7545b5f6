"""Triton gather_visible vs a per-sample torch formulation, bit for bit (scatter_tokens: its own
file, test_scatter_tokens_triton.py, with the helpers here; the round trips stay here).

Forward values are copies or one add: the reference adds in fp32 and rounds once, as the
kernels must, so outputs are compared with ``torch.equal``. Gradients are copies or sums:
the upstream gradient holds small multiples of 1/4, so every partial sum is exact in fp32
and any summation order gives the float64 reference's value; equality is again exact.

Runs on the CPU interpreter here (keep shapes small) and compiled on a GPU with
TRITON_INTERPRET=0.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from invnext._kernels_path import ensure_kernels_importable

ensure_kernels_importable()
tk = importlib.import_module("invnext_kernels.tokens")

pytestmark = pytest.mark.triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Visible counts per sample of N = 24 places: ragged, one single-token sample, one sample
# with everything hidden (only its prefix, or nothing at all when P = 0), one fully visible.
N = 24
COUNTS = [7, 1, 0, 24, 13]


# ----------------------------------------------------------------------------------------
# problem construction (independent of the kernels and of invnext.ops.tokens)
# ----------------------------------------------------------------------------------------
def _hidden(counts, n, device):
    rows = []
    for k in counts:
        h = torch.ones(n, dtype=torch.bool)
        h[torch.randperm(n)[:k]] = False
        rows.append(h)
    return torch.stack(rows).to(device)


def _structure(hidden, P):
    """index int64[total] and cu_seqlens int32[B+1] of the packed layout, one sample at a time."""
    B, n = hidden.shape
    index, cu = [], [0]
    for b in range(B):
        places = (~hidden[b]).nonzero().flatten().cpu() + b * n
        index.append(torch.cat([torch.full((P,), -1, dtype=torch.int64), places]))
        cu.append(cu[-1] + P + places.numel())
    dev = hidden.device
    return torch.cat(index).to(dev), torch.tensor(cu, dtype=torch.int32, device=dev)


def _dyadic(shape, dtype, device):
    """Values in {-2, -1.75, ..., 2}: sums of a few hundred are exact in fp32 and fp64."""
    return (torch.randint(-8, 9, shape) / 4).to(dtype).to(device)


def _ref_gather(x, hidden, pos, prefix):
    """Per-sample boolean indexing; differentiable, any dtype."""
    B = x.shape[0]
    parts = []
    for b in range(B):
        vis = ~hidden[b]
        tok = x[b][vis]
        if pos is not None:
            tok = tok + pos[b if pos.shape[0] > 1 else 0][vis]
        if prefix is not None:
            tok = torch.cat([prefix[b if prefix.shape[0] > 1 else 0], tok])
        parts.append(tok)
    return torch.cat(parts)


def _ref_scatter(packed, hidden, P, mask_token, pos):
    """mask_token everywhere, each sample's visible rows at its visible places, then + pos."""
    B, n = hidden.shape
    out = mask_token.expand(B, n, -1).clone()
    start = 0
    for b in range(B):
        vis = ~hidden[b]
        k = int(vis.sum())
        out[b, vis] = packed[start + P : start + P + k]
        start += P + k
    return out if pos is None else out + pos


def _det(t):
    return None if t is None else t.detach()


def _fp32(t):
    return None if t is None else t.float()


def _f64_leaf(t):
    return None if t is None else t.double().requires_grad_(True)


def _grad_of(t):
    return None if t is None else t.grad


def _assert_same(got, want, dtype, what):
    assert got is not None and want is not None, what
    want = want.to(dtype)
    assert got.dtype == dtype, what
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.equal(got, want), f"{what}: max |diff| {(got.double() - want.double()).abs().max().item()}"


# ----------------------------------------------------------------------------------------
# gather_visible
# ----------------------------------------------------------------------------------------
def _check_gather(device, dtype, C, P, pos_batch, prefix_batch, counts=COUNTS, n=N):
    B = len(counts)
    hidden = _hidden(counts, n, device)
    index, cu = _structure(hidden, P)
    x = torch.randn(B, n, C).to(dtype).to(device).requires_grad_(True)
    pos = None if pos_batch is None else torch.randn(pos_batch, n, C).to(dtype).to(device).requires_grad_(True)
    prefix = None if P == 0 else torch.randn(prefix_batch, P, C).to(dtype).to(device).requires_grad_(True)

    out = tk.gather_visible_triton(x, index, cu, pos, prefix)
    want = _ref_gather(x.detach().float(), hidden, _fp32(_det(pos)), _fp32(_det(prefix)))
    _assert_same(out, want, dtype, "forward")

    g = _dyadic(out.shape, dtype, device)
    out.backward(g)
    leaves = [_f64_leaf(x.detach()), _f64_leaf(_det(pos)), _f64_leaf(_det(prefix))]
    _ref_gather(leaves[0], hidden, leaves[1], leaves[2]).backward(g.double())
    for name, got, ref in zip(("dx", "dpos", "dprefix"), (x.grad, _grad_of(pos), _grad_of(prefix)), leaves):
        if ref is not None:
            _assert_same(got, ref.grad, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("C", [13, 64])
@pytest.mark.parametrize("P", [0, 4])
@pytest.mark.parametrize("batched", ["pos_B", "pos_1"])
def test_gather_forward_and_grads(triton_device, dtype, C, P, batched):
    # pos and prefix take opposite batch modes so both modes of each are covered.
    B = len(COUNTS)
    pos_batch, prefix_batch = (B, 1) if batched == "pos_B" else (1, B)
    _check_gather(triton_device, dtype, C, P, pos_batch, prefix_batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gather_without_pos(triton_device, dtype):
    _check_gather(triton_device, dtype, 13, 4, None, 1)
    _check_gather(triton_device, dtype, 13, 0, None, 1)


def test_gather_wide_rows_and_many_samples(triton_device):
    # C > 1024 spans several column tiles; 9 samples (with empty ones: P = 0) take 4 search steps.
    counts = [3, 0, 5, 1, 0, 0, 6, 2, 4]
    _check_gather(triton_device, torch.bfloat16, 1100, 0, 9, 1, counts=counts, n=6)
    _check_gather(triton_device, torch.float32, 1100, 2, 1, 9, counts=counts, n=6)


def test_gather_grads_for_subsets_of_inputs(triton_device):
    # Only pos needs a gradient (x frozen): the backward must still produce it, nothing else.
    B, C, P = len(COUNTS), 64, 4
    hidden = _hidden(COUNTS, N, triton_device)
    index, cu = _structure(hidden, P)
    x = torch.randn(B, N, C, device=triton_device)
    prefix = torch.randn(1, P, C, device=triton_device)
    for pos_batch in (1, B):
        pos = torch.randn(pos_batch, N, C, device=triton_device, requires_grad=True)
        out = tk.gather_visible_triton(x, index, cu, pos, prefix)
        g = _dyadic(out.shape, torch.float32, triton_device)
        (dpos,) = torch.autograd.grad(out, pos, g)
        ref = pos.detach().double().requires_grad_(True)
        (want,) = torch.autograd.grad(_ref_gather(x.double(), hidden, ref, prefix.double()), ref, g.double())
        _assert_same(dpos, want, torch.float32, f"dpos (Bp={pos_batch})")


# ----------------------------------------------------------------------------------------
# scatter_tokens
# ----------------------------------------------------------------------------------------
def _check_scatter(device, dtype, C, P, pos_batch, counts=COUNTS, n=N):
    B = len(counts)
    hidden = _hidden(counts, n, device)
    index, _ = _structure(hidden, P)
    total = index.numel()
    packed = torch.randn(total, C).to(dtype).to(device).requires_grad_(True)
    mask_token = torch.randn(C).to(dtype).to(device).requires_grad_(True)
    pos = None if pos_batch is None else torch.randn(pos_batch, n, C).to(dtype).to(device).requires_grad_(True)

    out = tk.scatter_tokens_triton(packed, index, mask_token, pos, B, n)
    want = _ref_scatter(packed.detach().float(), hidden, P, mask_token.detach().float(), _fp32(_det(pos)))
    _assert_same(out, want, dtype, "forward")

    g = _dyadic(out.shape, dtype, device)
    out.backward(g)
    leaves = [_f64_leaf(packed.detach()), _f64_leaf(mask_token.detach()), _f64_leaf(_det(pos))]
    _ref_scatter(leaves[0], hidden, P, leaves[1], leaves[2]).backward(g.double())
    for name, got, ref in zip(
        ("dpacked", "dmask_token", "dpos"), (packed.grad, mask_token.grad, _grad_of(pos)), leaves
    ):
        if ref is not None:
            _assert_same(got, ref.grad, dtype, name)


def test_empty_batch(triton_device):
    # Every sample fully hidden and no prefix: zero packed rows, no kernel touches memory.
    B, C = 3, 8
    hidden = torch.ones(B, N, dtype=torch.bool, device=triton_device)
    index, cu = _structure(hidden, 0)
    x = torch.randn(B, N, C, device=triton_device, requires_grad=True)
    out = tk.gather_visible_triton(x, index, cu, None, None)
    assert out.shape == (0, C)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    mask_token = torch.randn(C, device=triton_device)
    full = tk.scatter_tokens_triton(out.detach(), index, mask_token, None, B, N)
    assert torch.equal(full, mask_token.expand(B, N, C))


@pytest.mark.requires_cuda
def test_no_host_sync(triton_device):
    if triton_device.type != "cuda":
        pytest.skip("the sync check needs compiled kernels on a GPU (TRITON_INTERPRET=0)")
    B, C, P = len(COUNTS), 64, 4
    hidden = _hidden(COUNTS, N, triton_device)
    index, cu = _structure(hidden, P)
    x = torch.randn(B, N, C, device=triton_device, requires_grad=True)
    pos = torch.randn(1, N, C, device=triton_device, requires_grad=True)
    prefix = torch.randn(1, P, C, device=triton_device, requires_grad=True)
    mask_token = torch.randn(C, device=triton_device, requires_grad=True)
    tk.gather_visible_triton(x, index, cu, pos, prefix)  # compile outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        packed = tk.gather_visible_triton(x, index, cu, pos, prefix)
        out = tk.scatter_tokens_triton(packed, index, mask_token, pos, B, N)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and pos.grad is not None and prefix.grad is not None and mask_token.grad is not None


# ----------------------------------------------------------------------------------------
# argument errors: the public op checks them before dispatching to the Triton entry (the
# entry's index and cu_seqlens are built by the public op, so they cannot be bad)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"x": torch.randn(2, 5)}, ValueError, "gather_visible: x must have 3 dimensions"),
        ({"x": torch.randn(2, 5, 4).int()}, TypeError, "gather_visible: x must have dtype"),
        ({"pos": torch.randn(3, 5, 4)}, ValueError, "gather_visible: pos must have shape"),
        ({"pos": torch.ones(1, 5, 4, dtype=torch.int32)}, TypeError, "gather_visible: pos must have dtype"),
        ({"prefix": torch.randn(1, 1, 3)}, ValueError, "gather_visible: prefix must have shape"),
    ],
)
def test_gather_bad_inputs(triton_device, change, error, match):
    ops = _public_tokens()
    args = {"x": torch.randn(2, 5, 4), "hidden": _hidden([2, 3], 5, "cpu"), "pos": None, "prefix": None}
    args.update(change)
    args = {k: v.to(triton_device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        ops.gather_visible(**args, backend="triton")


# ----------------------------------------------------------------------------------------
# the public ops: backend="triton" against backend="torch" (when invnext.ops.tokens exists)
# ----------------------------------------------------------------------------------------
def _public_tokens():
    try:
        return importlib.import_module("invnext.ops.tokens")
    except ImportError:
        pytest.skip("invnext.ops.tokens is not present in this checkout")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_ops_triton_matches_torch_backend(triton_device, dtype):
    ops = _public_tokens()
    B, C, P = len(COUNTS), 64, 4
    hidden = _hidden(COUNTS, N, triton_device)
    x = torch.randn(B, N, C).to(dtype).to(triton_device)
    pos = torch.randn(1, N, C).to(dtype).to(triton_device)
    prefix = torch.randn(B, P, C).to(dtype).to(triton_device)
    mask_token = torch.randn(C).to(dtype).to(triton_device)
    g = _dyadic((B, N, C), dtype, triton_device)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_(True) for t in (x, pos, prefix, mask_token)]
        packed = ops.gather_visible(leaves[0], hidden, pos=leaves[1], prefix=leaves[2], backend=backend)
        out = ops.scatter_tokens(packed.tokens, packed.index, leaves[3], pos=leaves[1], N=N, batch_size=B, backend=backend)
        out.backward(g)
        results[backend] = [packed.tokens.detach(), out.detach()] + [t.grad for t in leaves]
    names = ("packed", "scattered", "dx", "dpos", "dprefix", "dmask_token")
    for name, a, b in zip(names, results["torch"], results["triton"]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_public_keep_ids_triton_matches_torch_backend(triton_device, dtype):
    # Index lists in any order (ragged, one empty sample) with an fp32 position table and a
    # [1, 1, C] mask token cast to bf16 tokens: the kernels take the same index as the reference.
    ops = _public_tokens()
    B, C, P = 3, 16, 2
    keep_ids = [torch.tensor([5, 0, 23, 7]), torch.tensor([], dtype=torch.int64), torch.tensor([11, 3])]
    keep_ids = [ids.to(triton_device) for ids in keep_ids]
    x = torch.randn(B, N, C).to(dtype).to(triton_device)
    pos = torch.randn(1, N, C).to(triton_device)
    prefix = torch.randn(1, P, C).to(dtype).to(triton_device)
    mask_token = torch.randn(1, 1, C).to(triton_device)
    g = _dyadic((B, N, C), dtype, triton_device)
    results = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_(True) for t in (x, pos, prefix, mask_token)]
        packed = ops.gather_visible(leaves[0], pos=leaves[1], prefix=leaves[2], keep_ids=keep_ids, backend=backend)
        out = ops.scatter_tokens(packed.tokens, packed.index, leaves[3], pos=leaves[1], N=N, batch_size=B,
                                 backend=backend)  # fmt: skip
        out.backward(g)
        results[backend] = [packed.tokens.detach(), out.detach()] + [t.grad for t in leaves]
    assert results["torch"][0].shape == (3 * P + 6, C)
    names = ("packed", "scattered", "dx", "dpos", "dprefix", "dmask_token")
    for name, a, b in zip(names, results["torch"], results["triton"]):
        assert torch.equal(a, b), name
