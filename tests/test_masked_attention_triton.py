"""The Triton masked-attention kernel (``invnext_kernels.attention``) against float64 ground truth.

Tolerance rule (kernels.md): the kernel's max abs error against the float64 reference is at
most 2x (output) / 3x (gradients) the error of the *same-dtype PyTorch computation*. That
computation is plain attention written as PyTorch would run it in the input dtype: RoPE in
fp32 rounded to the dtype (``apply_rope_3d``), ``q @ k^T`` as a matmul in the dtype, softmax in
fp32 (as SDPA does), the probabilities rounded to the dtype, ``p @ v`` in the dtype; its
gradients come from autograd through the same graph. (The reference op itself upcasts 16-bit
inputs to fp32, so its error would not be "the same dtype".) Ground truth is the reference
op on float64 copies of the inputs.

dq and dk are held to ``max(3 x same-dtype error, one fp32 rounding of their largest term)``
(:func:`fp32_floor`): a one-token sample or ``window=(1, 1, 1)`` without prefix gives dq = dk = 0
exactly in PyTorch, while the kernel's delta pre-pass leaves that rounding (1e-7..3e-6), and
3 x 0 would demand exact zeros.

Under the CPU interpreter the kernels run with 16/32-row tiles (``_INTERPRET_BLOCKS``) so
samples of 7-113 tokens still span several tiles: boundary tiles, full tiles, skipped tiles.

bfloat16 under the interpreter: Triton 3.9's interpreter converts fp32 to bfloat16 by
truncation, where GPUs (and torch) round to nearest even. Left so, the CPU bf16 tests would
measure the interpreter's truncation of p, of the rotated tiles and of every output, not the
kernel. An autouse fixture (``_bf16_rounds_to_nearest``) makes the interpreter round as the GPU
does, and ``test_interpreter_bf16_conversion_rounds_like_the_gpu`` pins that. The CPU run checks
the kernels' logic in bf16; their bf16 *accuracy* is verified on a GPU by the ``test_gpu_*``
tests (compiled kernels, ``TRITON_INTERPRET=0``).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from invnext.common import registry
from invnext.ops._dispatch import BackendUnavailableError

from invnext._kernels_path import ensure_kernels_importable
from invnext.ops.attention import dense_attention_mask, masked_attention, prefix_mask
from invnext.ops.rope import apply_rope_3d

ensure_kernels_importable()

from invnext_kernels import _attention_common as common
from invnext_kernels import attention as kattn
from test_masked_attention_reference import make_coords, make_cu, out_and_grads

pytestmark = pytest.mark.triton
F64 = torch.float64
ON_GPU = os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


@pytest.fixture(autouse=True)
def _untuned(monkeypatch):
    # one config per kernel: on the GPU, autotuning every variant would triple the compiles
    monkeypatch.setenv("INVNEXT_ATTN_AUTOTUNE", "0")


def _bf16_round_to_nearest_even(data: np.ndarray) -> np.ndarray:
    """fp32 -> bfloat16 bits (uint16) rounded to nearest even, NaN kept quiet (the GPU's cvt.rn)."""
    bits = np.asarray(data, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


@pytest.fixture(autouse=True)
def _bf16_rounds_to_nearest(monkeypatch):
    """Under the interpreter, fp32 -> bf16 casts round to nearest even as on a GPU (module docstring)."""
    if ON_GPU:
        return
    from triton.runtime import interpreter

    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_bf16_round_to_nearest_even(src.data), tl.bfloat16)
        return truncating(self, src, dst_type)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_impl)


@triton.jit
def _to_bf16_kernel(X, Y, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, tl.load(X + offs).to(tl.bfloat16))


def test_interpreter_bf16_conversion_rounds_like_the_gpu(triton_device):
    """A kernel's fp32 -> bf16 cast gives torch's (round to nearest even) bits, ties, NaN and inf
    included; the interpreter's own cast truncated, so bf16 tests measured truncation."""
    torch.manual_seed(0)
    tie_even, tie_odd = 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8  # halfway: round down, round up
    special = [tie_even, tie_odd, -tie_odd, float("inf"), float("-inf"), float("nan"), 3.4e38, 1e-40, 0.0]
    x = torch.cat([torch.tensor(special), torch.randn(64 - len(special))]).to(triton_device)
    y = torch.empty(64, dtype=torch.bfloat16, device=triton_device)
    _to_bf16_kernel[(1,)](x, y, N=64)
    want = x.to(torch.bfloat16)
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y[~want.isnan()], want[~want.isnan()])


# --------------------------------------------------------------------------- inputs


def same_dtype_attention(q, k, v, cu, scale, coords, rope, window, num_prefix):
    """Attention as PyTorch computes it in q's dtype (module docstring); dense over the packed batch."""
    total, _, _ = q.shape
    if rope is not None:
        pm = prefix_mask(cu, total, num_prefix)
        q = apply_rope_3d(q, coords, rope[0], rope[1], pm)
        k = apply_rope_3d(k, coords, rope[0], rope[1], pm)
    allowed = dense_attention_mask(cu, total, coords, window, num_prefix)
    s = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0))  # [H, total, total] in the dtype
    s = (s.float() * scale).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.matmul(p, v.transpose(0, 1)).transpose(0, 1)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def fp32_floor(dout, v, other, scale) -> float:
    """One fp32 rounding of the largest term of dq (``other = k``) or dk (``other = q``).

    The kernel's backward forms ``ds = p (dout . v - delta)`` with ``delta = rowsum(out * dout)``
    in fp32; where the exact ds is 0 (a row that sees only itself) the two fp32 dot products
    differ by a rounding of ``sum_d |dout_d v_d|``, carried to dq/dk by ``scale * k`` (or q).
    PyTorch's autograd subtracts the very same number there and gets exactly 0, so 3 x its
    error would demand exact zeros of the kernel."""
    terms = torch.einsum("ihd,jhd->hij", dout.abs().double(), v.abs().double()).max().item()
    return torch.finfo(torch.float32).eps * scale * terms * other.abs().max().item()


def check_case(lengths, heads, dim, dtype, device, *, rope=None, window=None, num_prefix=0, grid=(4, 6, 6),
               packed=False, scale=None):
    cu = make_cu(lengths, device)
    total = sum(lengths)
    coords = make_coords(lengths, num_prefix, grid, device)
    base = torch.randn(total, 3, heads, dim, device=device)
    dout = torch.randn(total, heads, dim, device=device)
    kw = {"softmax_scale": scale, "coords": coords, "rope": rope, "window": window, "num_prefix": num_prefix}
    run = out_and_grads(base, dout, packed)

    gt_out, gt_grads = run(F64, lambda q, k, v: masked_attention(q, k, v, cu, max(lengths), backend="torch", **kw))
    out, grads = run(dtype, lambda q, k, v: masked_attention(q, k, v, cu, max(lengths), backend="triton", **kw))
    sc = scale if scale is not None else dim**-0.5
    ref_out, ref_grads = run(dtype, lambda q, k, v: same_dtype_attention(q, k, v, cu, sc, coords, rope, window, num_prefix))

    assert out.dtype == dtype and out.shape == (total, heads, dim)
    e_k, e_t = max_err(out, gt_out), max_err(ref_out, gt_out)
    assert e_k <= 2 * e_t, f"out: kernel err {e_k:.3g} > 2x same-dtype torch err {e_t:.3g}"
    q64, k64, v64 = base.double().unbind(1)
    floors = {"q": fp32_floor(dout, v64, k64, sc), "k": fp32_floor(dout, v64, q64, sc), "v": 0.0}
    for name, g, g_gt, g_ref in zip("qkv", grads, gt_grads, ref_grads):
        e_k, e_t = max_err(g, g_gt), max_err(g_ref, g_gt)
        bound = max(3 * e_t, floors[name])  # (module docstring: a zero same-dtype error)
        assert e_k <= bound, f"d{name}: kernel err {e_k:.3g} > max(3x same-dtype torch err {e_t:.3g}, {floors[name]:.3g})"
    return out, grads


# --------------------------------------------------------------------------- numerics (interpreter-sized)


def test_plain_ragged_bf16_d64(triton_device):
    # one-token sample, odd lengths, no window: every key tile full but each sample's last.
    check_case([1, 7, 113, 30], 1, 64, torch.bfloat16, triton_device)


def test_rope_window3d_prefix_fp16_d88(triton_device):
    # padded head dim (88 -> 128), RoPE over all channels, a box window that skips tiles.
    check_case([7, 113, 45], 1, 88, torch.float16, triton_device, rope=(100.0, (24, 32, 32)),
               window=(3, 3, 5), num_prefix=4, grid=(8, 4, 4))


def test_window1d_fp32_d64(triton_device):
    check_case([1, 0, 7, 113], 1, 64, torch.float32, triton_device, window=9, scale=0.3)


def test_self_only_window_rope_prefix_bf16(triton_device):
    # (1, 1, 1): a grid token sees itself and the 4 prefix tokens only.
    check_case([5, 60, 33], 1, 64, torch.bfloat16, triton_device, rope=(50.0, (16, 24, 24)),
               window=(1, 1, 1), num_prefix=4)


def test_rope_passthrough_channels_fp16_d32(triton_device):
    # sections cover 24 of 32 channels (the last 8 pass through); one axis section is empty.
    check_case([113, 9], 1, 32, torch.float16, triton_device, rope=(10.0, (8, 0, 16)), num_prefix=4)


def test_window_covering_sample_is_all_full_tiles_packed_qkv(triton_device):
    # a window larger than the grid: every pair allowed, so the window lists hold only
    # full tiles (plus boundary ones); q, k, v are strided views of one packed qkv.
    check_case([1, 70, 51], 2, 64, torch.bfloat16, triton_device, window=(9, 13, 13), packed=True)


def test_even_window_sizes_fp32_rope_d48(triton_device):
    check_case([40, 3, 77], 1, 48, torch.float32, triton_device, rope=(1000.0, (16, 16, 16)),
               window=(2, 4, 4), num_prefix=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_that_see_only_themselves_have_zero_dq_dk(triton_device, dtype):
    # one-token samples and a (1, 1, 1) window without prefix: softmax over one key, so dq = dk = 0
    # exactly; PyTorch gets exact zeros, the kernel one fp32 rounding (the floor of the rule).
    check_case([1, 1, 1], 1, 32, dtype, triton_device)
    check_case([5, 40], 1, 32, dtype, triton_device, window=(1, 1, 1), grid=(4, 6, 6))


def test_max_seqlen_larger_than_samples_and_empty_sample(triton_device):
    # programs past a sample's end (here: all of the empty one's) exit without writing, so a
    # larger max_seqlen changes nothing, bit for bit, forward and backward.
    lengths = [20, 0, 9]
    cu = make_cu(lengths, triton_device)
    x = torch.randn(29, 3, 1, 32, device=triton_device, dtype=torch.float16)
    dout = torch.randn(29, 1, 32, device=triton_device, dtype=torch.float16)
    coords = make_coords(lengths, 0, (2, 4, 4), triton_device)
    results = []
    for max_seqlen in (20, 100):
        leaf = x.clone().requires_grad_(True)
        out = masked_attention(leaf, None, None, cu, max_seqlen, coords=coords, window=(1, 3, 3), backend="triton")
        results.append((out, *torch.autograd.grad(out, leaf, dout)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_loose_max_seqlen_is_taken_as_total(triton_device, monkeypatch):
    # max_seqlen is a bound; one past the batch's size only sized the launch grid: 10**12 meant
    # 3 * 10**10 programs, all exiting at once (hours under the interpreter, a launch error on a GPU).
    lengths = [20, 9]
    cu = make_cu(lengths, triton_device)
    q, k, v = (torch.randn(29, 1, 32, device=triton_device) for _ in range(3))
    seen, real = [], kattn.masked_attention_triton

    def spy(*args):
        seen.append(args[4])
        assert args[4] <= 29, "the kernel would be launched for the loose bound"
        return real(*args)

    monkeypatch.setitem(registry._IMPLEMENTATIONS["masked_attention"], "triton", spy)
    loose = masked_attention(q, k, v, cu, 10**12, backend="triton")
    tight = masked_attention(q, k, v, cu, 20, backend="triton")
    assert seen == [29, 20] and torch.equal(loose, tight)


# --------------------------------------------------------------------------- tile classification


@pytest.mark.parametrize("by_key", [False, True])
def test_window_tiles_match_dense_mask(by_key):
    """``full`` tiles have every pair allowed, skipped tiles none (masked tiles are conservative:
    their bounding boxes meet, some may hold no allowed pair); some tiles are skipped."""
    torch.manual_seed(1)
    lengths, P, bm, bn = [5, 120, 64, 37], 4, 16, 32
    cu = make_cu(lengths, "cpu")
    coords = make_coords(lengths, P, (6, 6, 6), "cpu")
    window = (3, 3, 5)
    wc, radius = common.window_geometry(window, coords, cu, sum(lengths))
    full, part = common.window_tiles(cu, max(lengths), wc, radius, P, bm, bn, by_key)
    allowed = dense_attention_mask(cu, sum(lengths), coords, window, P)
    skipped = 0
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        L = e - s
        for i in range(full.shape[1]):
            for j in range(full.shape[2]):
                q0, k0 = i * bm, j * bn
                blk = allowed[s + q0: s + min(q0 + bm, L), s + k0: s + min(k0 + bn, L)]
                streamed_whole = (q0 + bm <= L) if by_key else (k0 + bn <= L)
                if full[b, i, j]:
                    assert blk.numel() and bool(blk.all()) and streamed_whole
                elif not part[b, i, j]:
                    assert not bool(blk.any())
                    skipped += int(q0 < L and k0 < L)
    assert skipped > 0


def test_window_1d_geometry_is_position_box():
    cu = make_cu([3, 5], "cpu")
    wc, radius = common.window_geometry(7, None, cu, 8)
    assert radius == (0, 0, 3)
    assert wc.tolist() == [[0, 0, p] for p in [0, 1, 2, 0, 1, 2, 3, 4]]


def test_window_plans_built_once_per_declared_structure(triton_device, monkeypatch):
    """Layers that share a cu_seqlens and coords declared immutable (``static_structure``) share
    their window tile lists (built once per kernel kind); a new cu_seqlens, an in-place write to
    it or other coordinates rebuild them, and every call still matches the reference. The plan
    table empties when cu_seqlens dies."""
    import gc

    from invnext.ops import static_structure
    from invnext_kernels import _attention_plans as plans

    built = []
    real = kattn.window_lists
    monkeypatch.setattr(kattn, "window_lists", lambda *a: built.append(a[-1]) or real(*a))
    lengths = [7, 20]
    cu, coords = static_structure(make_cu(lengths, triton_device), make_coords(lengths, 0, (3, 4, 4), triton_device))
    q, k, v = (torch.randn(sum(lengths), 1, 16, device=triton_device, requires_grad=True) for _ in range(3))

    def layer(cu, coords, window):
        kw = {"coords": coords, "window": window}
        out = masked_attention(q, k, v, cu, max(lengths), backend="triton", **kw)
        want = masked_attention(q.double(), k.double(), v.double(), cu, max(lengths), backend="torch", **kw)
        assert max_err(out, want) < 1e-5
        out.sum().backward()

    for window in (5, (1, 3, 3)):  # 1D (synthetic coordinates, cached too) and 3D
        built.clear()
        layer(cu, coords, window)
        layer(cu, coords, window)  # a second layer over the same batch: nothing rebuilt
        assert sorted(built) == [False, False, True], built  # fwd, dq (query-owned), dk/dv (key-owned)
    built.clear()
    layer(static_structure(make_cu(lengths, triton_device))[0], coords, (1, 3, 3))  # equal values, another tensor
    assert len(built) == 3
    built.clear()
    layer(cu, static_structure(cu, coords.clone())[1], (1, 3, 3))  # other coordinates
    assert len(built) == 3
    built.clear()
    layer(cu, coords.clone(), (1, 3, 3))  # undeclared coordinates: built per call
    layer(cu, coords.clone(), (1, 3, 3))
    assert len(built) == 6
    built.clear()
    cu.add_(0)  # an in-place write bumps the version
    layer(cu, coords, (1, 3, 3))
    assert len(built) == 3
    key = id(cu)
    assert key in plans._TABLES
    del cu
    gc.collect()
    assert key not in plans._TABLES


def test_window_plans_of_undeclared_cu_seqlens_follow_writes_the_version_misses(triton_device):
    """A cu_seqlens whose values change without a version bump (the numpy array under
    ``torch.from_numpy`` written, a write through ``.data``) gets plans of its current values:
    a cache keyed by identity and version reused the old plan and returned NaN rows."""
    import numpy as np

    total = 40
    q, k, v = (torch.randn(total, 1, 16, device=triton_device) for _ in range(3))
    coords = torch.randint(0, 4, (total, 3), dtype=torch.int32, device=triton_device)
    host = np.array([0, 7, total], dtype=np.int32)
    from_numpy = torch.from_numpy(host)
    via_data = make_cu([7, 33], triton_device)
    for cu, write, window in ((from_numpy, host.__setitem__, 5), (via_data, via_data.data.__setitem__, (1, 3, 3))):
        version = cu._version
        for first in (7, 33):
            write(1, first)
            cu_dev = cu.to(triton_device)  # the same tensor on the CPU interpreter
            kw = {"coords": coords, "window": window}
            out = masked_attention(q, k, v, cu_dev, 33, backend="triton", **kw)
            want = masked_attention(q.double(), k.double(), v.double(), cu_dev, 33, backend="torch", **kw)
            assert max_err(out, want) < 1e-5, (first, window)
        assert cu._version == version  # the writes really bypassed the counter


def test_rope_tables_pair_channels():
    ftab, partner, pmat = common.rope_tables(10.0, (4, 0, 2), 8, torch.device("cpu"))
    assert partner.tolist() == [2, 3, 0, 1, 5, 4, 6, 7]
    assert ftab[3].tolist() == [-1, -1, 1, 1, -1, 1, 0, 0]
    assert ftab[0, :4].tolist() == pytest.approx([1.0, 10.0**-0.5, 1.0, 10.0**-0.5])
    assert ftab[2, 4:6].tolist() == [1.0, 1.0] and ftab[1].abs().sum() == 0
    g = torch.randn(3, 8)
    assert torch.equal((g.bfloat16().float() @ pmat.float()), g.bfloat16().float()[:, partner.long()])


@pytest.mark.parametrize("dtype,dim,window", [(torch.bfloat16, 64, (2, 3, 3)), (torch.float32, 40, None)])
def test_rope_prepass_and_inline_agree_bit_for_bit(triton_device, monkeypatch, dtype, dim, window):
    """The RoPE pre-pass (default) and the in-loop rotation round the same fp32 rotation to the
    dtype and run the same tile math: forward and every gradient are identical."""
    lengths, prefix = [9, 70, 1 + 2], 2
    cu = make_cu(lengths, triton_device)
    coords = make_coords(lengths, prefix, (3, 5, 5), triton_device)
    base = torch.randn(sum(lengths), 3, 2, dim, device=triton_device).to(dtype)
    dout = torch.randn(sum(lengths), 2, dim, device=triton_device).to(dtype)

    def run(mode):
        monkeypatch.setenv("INVNEXT_ATTN_ROPE", mode)
        leaf = base.clone().requires_grad_(True)
        q, k, v = leaf.unbind(1)
        out = masked_attention(q, k, v, cu, max(lengths), coords=coords, rope=(100.0, (dim // 4 // 2 * 2,) * 2 + (8,)),
                               window=window, num_prefix=prefix, backend="triton")
        (grad,) = torch.autograd.grad(out, leaf, dout)
        return out.detach(), grad

    pre, inline = run("prepass"), run("inline")
    assert torch.equal(pre[0], inline[0])
    assert torch.equal(pre[1], inline[1])


def test_head_major_layouts_give_the_packed_results(triton_device):
    """q, k, v whose heads are not D apart (``[H, total, D]`` transposed) are copied to the tile
    layout first (head strides are kernel constants): same output and gradients as packed inputs."""
    lengths = [5, 33]
    cu = make_cu(lengths, triton_device)
    total, heads, dim = sum(lengths), 2, 32
    base = torch.randn(3, heads, total, dim, device=triton_device)
    dout = torch.randn(total, heads, dim, device=triton_device)

    def run(head_major):
        leaf = base.clone().requires_grad_(True)
        q, k, v = (t.transpose(0, 1) if head_major else t.transpose(0, 1).contiguous() for t in leaf.unbind(0))
        assert (q.stride(1) == total * dim) == head_major
        out = masked_attention(q, k, v, cu, max(lengths), num_prefix=1, backend="triton")
        return out.detach(), torch.autograd.grad(out, leaf, dout)[0]

    (out_a, grad_a), (out_b, grad_b) = run(True), run(False)
    assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b)


def test_rope_mode_is_checked(monkeypatch):
    monkeypatch.setenv("INVNEXT_ATTN_ROPE", "fused")
    with pytest.raises(ValueError, match="INVNEXT_ATTN_ROPE must be one of"):
        kattn.rope_mode()


# --------------------------------------------------------------------------- torch.library / compile


def _tiny_args(device, rope=True):
    lengths = [3, 17]
    cu = make_cu(lengths, device)
    coords = make_coords(lengths, 1, (2, 4, 4), device)
    q, k, v = (torch.randn(20, 1, 16, device=device, requires_grad=True) for _ in range(3))
    return q, k, v, cu, 17, 0.25, coords, (10.0 if rope else 0.0), ([4, 4, 4] if rope else []), [1, 3, 3], 1


def test_opcheck_custom_op(triton_device):
    args = _tiny_args(triton_device)
    torch.library.opcheck(kattn.masked_attention_triton_fwd, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compile_traces_through_op(triton_device):
    q, k, v, cu, ms, sc, coords, *_ = _tiny_args(triton_device)

    def f(q, k, v):
        # the kernel entry (the public op's value checks read CPU tensors on the host)
        return kattn.masked_attention_triton(q, k, v, cu, ms, sc, coords, (10.0, (4, 4, 4)), (1, 3, 3), 1).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v)
    gq = torch.autograd.grad(got, q)[0]
    want = f(q, k, v)
    assert torch.equal(got, want)
    assert torch.equal(gq, torch.autograd.grad(want, q)[0])


# --------------------------------------------------------------------------- bad input


def test_rejects_float64(triton_device):
    q = torch.randn(4, 1, 32, dtype=F64, device=triton_device)
    with pytest.raises(BackendUnavailableError, match="cannot run these inputs.*not float64"):
        masked_attention(q, q, q, make_cu([4], triton_device), 4, backend="triton")


def test_rejects_head_dim_over_128(triton_device):
    q = torch.randn(4, 1, 160, device=triton_device)
    with pytest.raises(BackendUnavailableError, match="head dims 16..128, not 160"):
        masked_attention(q, q, q, make_cu([4], triton_device), 4, backend="triton")


# --------------------------------------------------------------------------- GPU only (compiled kernels)


@pytest.mark.requires_cuda
@pytest.mark.skipif(not ON_GPU, reason="compiled kernels only (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("dim", [32, 64, 80, 88, 96, 128])
def test_gpu_large_bf16_all_head_dims(dim):
    torch.manual_seed(dim)
    sec = dim // 3 // 2 * 2
    rope = (10000.0, (sec, sec, sec)) if dim in (64, 88, 96) else None
    window = (3, 7, 7) if dim in (64, 88, 128) else None
    prefix = 0 if dim in (32, 80) else 4
    lengths = [1500, 1, 1031, 7, 600] if prefix == 0 else [1500, 4, 1031, 7, 600]
    check_case(lengths, 3, dim, torch.bfloat16, "cuda", rope=rope, window=window, num_prefix=prefix, grid=(16, 16, 16))


@pytest.mark.requires_cuda
@pytest.mark.skipif(not ON_GPU, reason="compiled kernels only (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("rope,window", [(None, None), ((10000.0, (16, 24, 24)), (4, 8, 8))])
def test_gpu_backward_deterministic(rope, window):
    torch.manual_seed(3)
    lengths = [1028, 913, 1150]
    cu = make_cu(lengths, "cuda")
    coords = make_coords(lengths, 4, (16, 16, 16), "cuda")
    q, k, v = (torch.randn(sum(lengths), 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)

    def grads():
        out = masked_attention(q, k, v, cu, max(lengths), coords=coords, rope=rope, window=window, num_prefix=4,
                               backend="triton")
        return torch.autograd.grad(out, (q, k, v), dout)

    first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.requires_cuda
@pytest.mark.skipif(not ON_GPU, reason="compiled kernels only (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_dtypes_window_rope(dtype):
    torch.manual_seed(5)
    check_case([1200, 3, 777], 2, 64, dtype, "cuda", rope=(100.0, (16, 24, 24)), window=(4, 8, 8),
               num_prefix=4, grid=(16, 16, 16))
