"""The Triton varlen-attention kernels (``invnext_kernels.attention.varlen_attention_triton``,
the masked-attention kernels run with two packings, GQA and a band) against float64 ground truth.

Tolerance rule, as for masked_attention (``test_masked_attention_triton``, kernels.md): the
kernel's max abs error against the float64 reference is at most 2x (output, lse) / 3x
(gradients) the error of the *same-dtype PyTorch computation* - dense attention in the input
dtype (scores as a matmul in the dtype, fp32 softmax, probabilities rounded to the dtype, ``p @ v``
in the dtype; gradients by autograd through that graph) - with dq, dk held to at least one fp32
rounding of their largest term (:func:`fp32_floor_cross`). Ground truth: the reference op on float64
copies. Every case also sends a gradient through ``lse``.

Under the CPU interpreter the kernels run with 16/32-row tiles, so samples of 1-70 tokens span
several tiles: band ends (masked), band middles (full), skipped blocks, partial last blocks.
"""
from __future__ import annotations

import os

import pytest
import torch

from invnext._kernels_path import ensure_kernels_importable
from invnext.common import registry
from invnext.ops import varlen_attention
from invnext.ops._dispatch import BackendUnavailableError

ensure_kernels_importable()

from invnext_kernels import attention as kattn
from test_masked_attention_triton import (  # noqa: F401 - autouse fixtures: untuned launches, bf16 RNE casts
    _bf16_rounds_to_nearest,
    _untuned,
    max_err,
)
from test_varlen_attention_reference import allowed_cells, cu_of

pytestmark = pytest.mark.triton
F64 = torch.float64
ON_GPU = os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def same_dtype_attention(q, k, v, allowed, scale):
    """(out, lse) as PyTorch computes them in q's dtype, dense over the packed batch (module docstring)."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.matmul(q.transpose(0, 1), kr.permute(1, 2, 0))  # [H, total_q, total_k] in the dtype
    s = (s.float() * scale).masked_fill(~allowed, float("-inf"))
    seen = allowed.any(-1)[None, :, None]
    s = torch.where(seen, s, torch.zeros_like(s))  # rows that see nothing: no NaN, dropped below
    p = torch.where(allowed, torch.softmax(s, dim=-1), torch.zeros_like(s)).to(q.dtype)
    out = torch.matmul(p, vr.transpose(0, 1)).transpose(0, 1)
    lse = torch.where(seen.squeeze(-1), torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1),
                      torch.full_like(s[..., 0], float("-inf")))
    return out, lse


def same_dtype_rope(x, cos, sin, pairing):
    """RoPE as transformers computes it in x's dtype: ``x * cos + rotate(x) * sin``, tables cast to it."""
    width = cos.shape[-1]
    xr = x[..., :width]
    if pairing == "rotate_half":
        rot = torch.cat([-xr[..., width // 2:], xr[..., : width // 2]], dim=-1)
    else:
        rot = torch.stack([-xr[..., 1::2], xr[..., 0::2]], dim=-1).flatten(-2)
    y = xr * cos.to(x.dtype)[:, None] + rot * sin.to(x.dtype)[:, None]
    return torch.cat([y, x[..., width:]], dim=-1)


def rope_tables_for(lengths, width, offset=0, theta=100.0, interleave=False):
    """Per-token cos/sin rows (positions restart per sample, shifted by ``offset``), float32."""
    pos = torch.cat([torch.arange(n) for n in lengths]).double() + offset
    freqs = pos[:, None] * theta ** (-torch.arange(0, width, 2).double() / width)
    emb = freqs.repeat_interleave(2, -1) if interleave else torch.cat([freqs, freqs], -1)
    return emb.cos().float(), emb.sin().float()


def lse_term(lse, w):
    return (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).double() * w).sum()


def check_case(lq, lk, hq, hk, dim, dtype, device, *, causal=False, window=(-1, -1), scale=None,
               cu_dtype=torch.int32, seed=0, rope=None, pairing="rotate_half"):
    """``rope``: None or (width, q position offset): tables from :func:`rope_tables_for`."""
    gen = torch.Generator().manual_seed(seed)
    q0 = torch.randn(sum(lq), hq, dim, generator=gen)
    k0 = torch.randn(sum(lk), hk, dim, generator=gen)
    v0 = torch.randn(sum(lk), hk, dim, generator=gen)
    dout = torch.randn(sum(lq), hq, dim, generator=gen)
    wl = torch.randn(hq, sum(lq), generator=gen).double()  # float32-exact weights of the lse term
    cq, ck = cu_of(lq, cu_dtype, device), cu_of(lk, cu_dtype, device)
    sc = scale if scale is not None else dim**-0.5
    allowed = allowed_cells(lq, lk, causal, window).to(device)
    kw = {}
    if rope is not None:
        width, offset = rope
        inter = pairing == "interleaved"
        tq = tuple(t.to(device) for t in rope_tables_for(lq, width, offset, interleave=inter))
        tk = tuple(t.to(device) for t in rope_tables_for(lk, width, interleave=inter))
        kw = {"rope": tq, "rope_k": tk, "rope_pairing": pairing}

    def run(dt, fn):
        leaves = [t.to(device=device, dtype=dt).requires_grad_(True) for t in (q0, k0, v0)]
        out, lse = fn(*leaves)
        loss = (out.double() * dout.to(device).double()).sum() + lse_term(lse, wl.to(device))
        return out.detach(), lse.detach(), torch.autograd.grad(loss, leaves)

    def op(backend):
        return lambda q, k, v: varlen_attention(q, k, v, cq, ck, max(lq), max(lk), softmax_scale=scale, causal=causal,
                                                window_size=window, return_lse=True, backend=backend, **kw)

    def same_dtype(q, k, v):
        if kw:
            q, k = same_dtype_rope(q, *tq, pairing), same_dtype_rope(k, *tk, pairing)
        return same_dtype_attention(q, k, v, allowed, sc)

    gt_out, gt_lse, gt_grads = run(F64, op("torch"))
    out, lse, grads = run(dtype, op("triton"))
    ref_out, ref_lse, ref_grads = run(dtype, same_dtype)

    assert out.dtype == dtype and out.shape == (sum(lq), hq, dim)
    assert lse.dtype == torch.float32 and lse.shape == (hq, sum(lq))
    # rows that see nothing: exactly 0 and -inf, as the reference
    empty = torch.isneginf(gt_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert torch.equal(out.transpose(0, 1)[empty], torch.zeros_like(out.transpose(0, 1)[empty]))
    e_k, e_t = max_err(out, gt_out), max_err(ref_out, gt_out)
    assert e_k <= 2 * e_t, f"out: kernel err {e_k:.3g} > 2x same-dtype torch err {e_t:.3g}"
    fin = ~empty
    if fin.any():
        e_k, e_t = max_err(lse[fin], gt_lse[fin]), max_err(ref_lse[fin], gt_lse[fin])
        floor = 4 * torch.finfo(torch.float32).eps * gt_lse[fin].abs().max().item()
        assert e_k <= max(2 * e_t, floor), f"lse: kernel err {e_k:.3g} > max(2x torch err {e_t:.3g}, {floor:.3g})"
    group = hq // hk
    q64, k64, v64 = q0.double(), k0.double().repeat_interleave(group, 1), v0.double().repeat_interleave(group, 1)
    # dq's largest term: scale * |dout . v| * |k|; dk sums a GQA group's queries (fp32 roundings add up)
    floors = {"q": fp32_floor_cross(dout, v64, k64, sc), "k": group * fp32_floor_cross(dout, v64, q64, sc), "v": 0.0}
    for name, g, g_gt, g_ref in zip("qkv", grads, gt_grads, ref_grads):
        e_k, e_t = max_err(g, g_gt), max_err(g_ref, g_gt)
        bound = max(3 * e_t, floors[name])
        assert e_k <= bound, (f"d{name}: kernel err {e_k:.3g} > max(3x same-dtype torch err {e_t:.3g}, "
                              f"{floors[name]:.3g})")
    return out, lse, grads


def fp32_floor_cross(dout, v, other, scale) -> float:
    """:func:`test_masked_attention_triton.fp32_floor` where queries and keys are different token
    sets (``v``'s heads repeated to q's)."""
    if not (v.numel() and dout.numel()):
        return 0.0
    terms = torch.einsum("ihd,jhd->hij", dout.abs().double(), v.abs()).max().item()
    return torch.finfo(torch.float32).eps * scale * terms * (other.abs().max().item() if other.numel() else 0.0)


# --------------------------------------------------------------------------- numerics (interpreter-sized)


def test_causal_gqa_cross_lengths_bf16(triton_device):
    # Lq > Lk (rows that see nothing), Lq < Lk, equal, 1 and 0 tokens; 4 query heads on 2 kv heads
    check_case([40, 7, 1, 0, 33], [29, 50, 1, 3, 33], 4, 2, 64, torch.bfloat16, triton_device, causal=True)


def test_asymmetric_window_mqa_fp16_d40(triton_device):
    # padded head dim (40 -> 64); band ends masked, band middle full, blocks outside skipped
    check_case([70, 5, 12], [66, 9, 0], 3, 1, 40, torch.float16, triton_device, window=(9, 20), seed=1)


def test_causal_local_window_fp32_int64_cu(triton_device):
    check_case([64, 1, 45], [70, 4, 20], 2, 2, 32, torch.float32, triton_device, causal=True, window=(17, 5),
               cu_dtype=torch.int64, scale=0.3, seed=2)


def test_plain_cross_attention_mha_fp32(triton_device):
    # no mask at all: every key of the sample (a pooler's few queries over many keys, and the reverse)
    check_case([3, 60], [65, 2], 2, 2, 16, torch.float32, triton_device, seed=3)


def test_right_only_window_and_rows_without_keys_fp16(triton_device):
    # window (0, 0) on Lk < Lq: one key per row at most, many rows see none
    check_case([40, 6], [10, 6], 2, 1, 32, torch.float16, triton_device, window=(0, 0), seed=4)
    check_case([9, 30], [30, 9], 2, 2, 32, torch.float16, triton_device, window=(-1, 3), seed=5)


def test_rope_tables_rotate_half_gqa_causal_bf16(triton_device):
    # queries 3 positions past their keys' start (a chunk continuing a sequence), partial rotary (48 of 64)
    check_case([30, 1, 17], [33, 4, 20], 4, 2, 64, torch.bfloat16, triton_device, causal=True, rope=(48, 3), seed=6)


def test_rope_tables_interleaved_window_fp32(triton_device):
    check_case([40, 9], [40, 9], 2, 1, 32, torch.float32, triton_device, window=(6, 6), rope=(32, 0),
               pairing="interleaved", seed=7)


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_table_kernel_transpose_is_the_rotations_adjoint(triton_device, interleaved):
    """The backward's ``R^T`` pass is the adjoint of the rotation for any tables (cos and sin of a
    pair's two channels need not agree): autograd of the reference rotation gives the same."""
    from invnext.ops.rope import apply_rope_tables

    total, heads, dim, width = 37, 3, 40, 24
    x = torch.randn(total, heads, dim, dtype=F64, requires_grad=True)
    g = torch.randn(total, heads, dim, dtype=F64)
    cos, sin = torch.randn(total, width, dtype=F64), torch.randn(total, width, dtype=F64)
    pairing = "interleaved" if interleaved else "rotate_half"
    (want,) = torch.autograd.grad(apply_rope_tables(x, cos, sin, pairing), x, g)
    dev = triton_device
    got = kattn._rope_tables(g.float().to(dev), cos.float().to(dev), sin.float().to(dev), interleaved, True)
    fwd = kattn._rope_tables(x.detach().float().to(dev), cos.float().to(dev), sin.float().to(dev), interleaved, False)
    torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fwd.double().cpu(), apply_rope_tables(x.detach(), cos, sin, pairing), rtol=1e-5, atol=1e-5)


def test_loose_max_seqlen_and_empty_samples_change_nothing(triton_device):
    lq, lk = [20, 0, 9], [5, 7, 0]
    cq, ck = cu_of(lq, device=triton_device), cu_of(lk, device=triton_device)
    q = torch.randn(29, 2, 32, device=triton_device, dtype=torch.float16)
    k, v = (torch.randn(12, 1, 32, device=triton_device, dtype=torch.float16) for _ in range(2))
    dout = torch.randn_like(q)
    results = []
    for mq, mk in ((20, 7), (100, 64)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = varlen_attention(*leaves, cq, ck, mq, mk, causal=True, return_lse=True, backend="triton")
        results.append((out, lse, *torch.autograd.grad(out, leaves, dout)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    out, lse = results[0][:2]
    assert torch.equal(out[20:], torch.zeros_like(out[20:])) and torch.isneginf(lse[:, 20:]).all()


def test_no_keys_at_all_and_no_queries_at_all(triton_device):
    q = torch.randn(5, 2, 16, device=triton_device, requires_grad=True)
    k = torch.randn(0, 2, 16, device=triton_device, requires_grad=True)
    out, lse = varlen_attention(q, k, k, cu_of([5], device=triton_device), cu_of([0], device=triton_device),
                                return_lse=True, backend="triton")
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    (gq,) = torch.autograd.grad(out.sum(), q)
    assert torch.equal(gq, torch.zeros_like(gq))
    q = torch.randn(0, 2, 16, device=triton_device, requires_grad=True)
    k = torch.randn(4, 2, 16, device=triton_device, requires_grad=True)
    out = varlen_attention(q, k, k, cu_of([0], device=triton_device), cu_of([4], device=triton_device),
                           backend="triton")
    (gk,) = torch.autograd.grad(out.sum(), k)
    assert out.shape == (0, 2, 16) and torch.equal(gk, torch.zeros_like(gk))


def test_masked_attention_int64_cu_seqlens_triton(triton_device):
    """masked_attention's kernels read int64 cu_seqlens too (windowed: the host tile lists as well)."""
    from invnext.ops.attention import masked_attention

    lengths = [5, 40]
    q, k, v = (torch.randn(45, 1, 16, device=triton_device) for _ in range(3))
    for window in (None, 5):
        a = masked_attention(q, k, v, cu_of(lengths, torch.int32, triton_device), 40, window=window, backend="triton")
        b = masked_attention(q, k, v, cu_of(lengths, torch.int64, triton_device), 40, window=window, backend="triton")
        assert torch.equal(a, b)


def test_band_is_resolved_in_kernel_not_per_length(triton_device, monkeypatch):
    """Lengths and windows are runtime values: no host tile lists are built for a band, and the
    kernel gets the same constexprs (one compiled variant) for other lengths and windows."""
    monkeypatch.setattr(kattn, "window_lists", lambda *a: pytest.fail("a band needs no host tile lists"))
    seen = []
    real = kattn._Prep.flags

    def spy(self):
        flags = real(self)
        seen.append(tuple(sorted(flags.items())))
        return flags

    monkeypatch.setattr(kattn._Prep, "flags", spy)
    for lq, lk, window in (([9, 20], [5, 30], (3, 4)), ([33], [2], (0, 7)), ([1, 2, 3], [60, 1, 2], (40, 0))):
        q = torch.randn(sum(lq), 2, 32, device=triton_device)
        k = torch.randn(sum(lk), 1, 32, device=triton_device)
        varlen_attention(q, k, k, cu_of(lq, device=triton_device), cu_of(lk, device=triton_device),
                         window_size=window, backend="triton")
    # SEQ_BUCKET is an autotuning key only (a power-of-two bucket, runtime value in the kernel)
    assert len({tuple(kv for kv in f if kv[0] != "SEQ_BUCKET") for f in seen}) == 1


def test_band_parameters():
    assert kattn._band(-1, -1, 10, 20) == []
    assert kattn._band(-1, 0, 10, 20) == [20, 0]
    assert kattn._band(5, -1, 10, 20) == [5, 10]
    assert kattn._band(10**9, 10**9, 10, 20) == [20, 10]


def test_auto_on_a_gpu_takes_head_dims_to_256_and_says_why_it_falls_back(monkeypatch):
    """A GPU faked from the device check alone (invnext.ops._dispatch): the kernels take D = 192
    (masked_attention's do not), decline D = 4, and auto's fallback then warns naming the limit."""
    import invnext.ops as ops
    from invnext.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_on_gpu", lambda dev: True)
    monkeypatch.setattr(_dispatch, "_warned", set())
    cu = cu_of([5])
    q = torch.randn(5, 2, 192)
    assert ops.explain(ops.varlen_attention, q, q, q, cu, cu).chosen == "triton"
    assert ops.explain(ops.masked_attention, q, q, q, cu, 5).chosen == "torch"
    small = torch.randn(5, 2, 4)
    with pytest.warns(RuntimeWarning, match=r"varlen_attention: backend='auto' .* head dims 8\.\.256, not 4"):
        varlen_attention(small, small, small, cu, cu)


# --------------------------------------------------------------------------- torch.library / compile


def _tiny(device):
    cq, ck = cu_of([3, 17], device=device), cu_of([9, 4], device=device)
    q = torch.randn(20, 4, 16, device=device, requires_grad=True)
    k, v = (torch.randn(13, 2, 16, device=device, requires_grad=True) for _ in range(2))
    return q, k, v, cq, ck


def test_opcheck_custom_op(triton_device):
    q, k, v, cq, ck = _tiny(triton_device)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(kattn.varlen_attention_triton_fwd, (q, k, v, cq, ck, 17, 9, 0.25, [3, 0]), test_utils=utils)
    tq, tk = torch.rand(20, 2, 8, device=triton_device).unbind(1), torch.rand(13, 2, 8, device=triton_device).unbind(1)
    torch.library.opcheck(kattn.varlen_attention_triton_fwd, (q, k, v, cq, ck, 17, 9, 0.25, []),
                          {"rope_cos_q": tq[0], "rope_sin_q": tq[1], "rope_cos_k": tk[0], "rope_sin_k": tk[1],
                           "rope_interleaved": True}, test_utils=utils)


def test_compile_traces_through_op(triton_device):
    q, k, v, cq, ck = _tiny(triton_device)

    def f(q, k, v):
        out, lse = kattn.varlen_attention_triton(q, k, v, cq, ck, 17, 9, 0.25, 3, 0)
        return out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(q, k, v)
    grads = torch.autograd.grad(got, (q, k, v))
    want = f(q, k, v)
    assert torch.equal(got, want)
    for a, b in zip(grads, torch.autograd.grad(want, (q, k, v))):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- bad input


def test_rejects_float64(triton_device):
    q = torch.randn(4, 1, 32, dtype=F64, device=triton_device)
    cu = cu_of([4], device=triton_device)
    with pytest.raises(BackendUnavailableError, match="varlen_attention: backend 'triton' cannot run.*not float64"):
        varlen_attention(q, q, q, cu, cu, backend="triton")


def test_rejects_head_dims_outside_8_to_256(triton_device):
    cu = cu_of([4], device=triton_device)
    for d in (4, 7):
        q = torch.randn(4, 1, d, device=triton_device)
        with pytest.raises(BackendUnavailableError, match=f"head dims 8..256, not {d}"):
            varlen_attention(q, q, q, cu, cu, backend="triton")


def test_head_dims_256_and_8(triton_device):
    # D = 200 pads to 256 (the smaller GPU tiles); D = 8 pads to 16
    check_case([20, 1], [37, 3], 2, 1, 200, torch.bfloat16, triton_device, causal=True, seed=8)
    check_case([33, 5], [12, 40], 2, 2, 8, torch.float16, triton_device, window=(4, 9), seed=9)


def test_auto_takes_the_kernel_where_it_can(triton_device, monkeypatch):
    if triton_device.type == "cpu":
        pytest.skip("auto picks the reference for CPU tensors")
    calls = []
    real = kattn.varlen_attention_triton
    monkeypatch.setitem(registry._IMPLEMENTATIONS["varlen_attention"], "triton",
                        lambda *a: calls.append(1) or real(*a))
    q = torch.randn(4, 1, 32, device=triton_device, dtype=torch.bfloat16)
    cu = cu_of([4], device=triton_device)
    varlen_attention(q, q, q, cu, cu)
    assert calls


# --------------------------------------------------------------------------- GPU only (compiled kernels)


@pytest.mark.requires_cuda
@pytest.mark.skipif(not ON_GPU, reason="compiled kernels only (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("dim", [32, 64, 80, 128, 192, 256])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (200, 37))])
def test_gpu_large_bf16(dim, causal, window):
    torch.manual_seed(dim)
    check_case([1500, 1, 1031, 7, 600], [1200, 30, 1031, 0, 900], 8, 2, dim, torch.bfloat16, "cuda",
               causal=causal, window=window)


@pytest.mark.requires_cuda
@pytest.mark.skipif(not ON_GPU, reason="compiled kernels only (TRITON_INTERPRET=0)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_dtypes_causal_gqa(dtype):
    check_case([700, 3, 513], [900, 3, 200], 6, 2, 64, dtype, "cuda", causal=True, window=(128, -1))
