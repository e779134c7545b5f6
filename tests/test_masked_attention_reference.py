"""The pure-PyTorch reference of ``masked_attention`` and the 3D RoPE helper.

Every numerical check is float64 against an independent formulation: dense attention over
all packed tokens with a mask built by broadcast comparisons (itself checked against a
token-by-token loop over the rules), and RoPE as an explicit per-token rotation matrix.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from invnext.ops import attention as attn_mod
from invnext.ops.attention import dense_attention_mask, masked_attention, prefix_mask
from invnext.ops.rope import apply_rope_3d, rope_cos_sin

F64 = torch.float64


# --------------------------------------------------------------------------- helpers


def make_cu(lengths: list[int], device=None) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def make_coords(lengths: list[int], num_prefix: int, grid=(4, 8, 8), device=None) -> torch.Tensor:
    """Per sample: distinct grid cells in raster order (like visible tokens); prefix rows garbage."""
    rows = []
    T, H, W = grid
    for n in lengths:
        idx = torch.randperm(T * H * W)[: n - num_prefix].sort().values
        cells = torch.stack([idx // (H * W), (idx // W) % H, idx % W], dim=-1)
        garbage = torch.randint(-1000, 1000, (num_prefix, 3))
        rows += [garbage, cells]
    return torch.cat(rows).to(device=device, dtype=torch.int32)


def out_and_grads(base: torch.Tensor, dout: torch.Tensor, packed: bool):
    """``run(dtype, fn) -> (out, (dq, dk, dv))`` for ``fn(q, k, v)`` on ``base [total, 3, H, D]`` cast
    to ``dtype``, q/k/v as views of one packed tensor or as separate copies, so every formulation
    a test compares sees the same inputs and the same upstream gradient ``dout``."""

    def run(dt, fn):
        leaf = base.to(dt).requires_grad_(True)
        q, k, v = leaf.unbind(1) if packed else (t.contiguous() for t in leaf.unbind(1))
        out = fn(q, k, v)
        (grad,) = torch.autograd.grad(out, leaf, dout.to(dt))
        return out.detach(), grad.unbind(1)

    return run


def qkv(total: int, heads: int, dim: int, dtype=F64, grad=False):
    return [torch.randn(total, heads, dim, dtype=dtype, requires_grad=grad) for _ in range(3)]


def positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)


def rotation_matrices(coords, theta, sections, dim, rotate) -> torch.Tensor:
    """``[total, D, D]``: identity with a 2x2 rotation on each rotate-half pair."""
    total = coords.shape[0]
    R = torch.eye(dim, dtype=F64).repeat(total, 1, 1)
    off = 0
    for a, s in enumerate(sections):
        for j in range(s // 2):
            ang = torch.where(rotate, coords[:, a].to(F64) * theta ** (-2.0 * j / s), 0.0)
            i1, i2 = off + j, off + s // 2 + j
            R[:, i1, i1], R[:, i1, i2] = ang.cos(), -ang.sin()
            R[:, i2, i1], R[:, i2, i2] = ang.sin(), ang.cos()
        off += s
    return R


def dense_attention(q, k, v, lengths, scale=None, coords=None, rope=None, window=None, num_prefix=0):
    """Attention over all packed tokens at once under the dense mask (float64)."""
    total, _, dim = q.shape
    cu = make_cu(lengths)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    if rope is not None:
        R = rotation_matrices(coords, rope[0], rope[1], dim, positions(lengths) >= num_prefix)
        q = torch.einsum("tij,thj->thi", R, q)
        k = torch.einsum("tij,thj->thi", R, k)
    allowed = dense_attention_mask(cu, total, coords, window, num_prefix)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hij,jhd->ihd", p, v)


# --------------------------------------------------------------------------- masks


@pytest.mark.parametrize("window", [None, 1, 2, 5, (1, 1, 1), (2, 3, 5)])
@pytest.mark.parametrize("num_prefix", [0, 2])
def test_dense_mask_matches_token_loop(window, num_prefix):
    lengths = [2, 9, 3, 13]
    cu = make_cu(lengths)
    total = sum(lengths)
    coords = make_coords(lengths, num_prefix, grid=(3, 3, 4))
    got = dense_attention_mask(cu, total, coords, window, num_prefix)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).tolist()
    pos = positions(lengths).tolist()
    c = coords.tolist()
    want = torch.zeros(total, total, dtype=torch.bool)
    for i in range(total):
        for j in range(total):
            if seg[i] != seg[j]:
                continue
            if window is None or pos[i] < num_prefix or pos[j] < num_prefix:
                want[i, j] = True
            elif isinstance(window, int):
                want[i, j] = abs(pos[i] - pos[j]) <= window // 2
            else:
                want[i, j] = all(abs(c[i][a] - c[j][a]) <= window[a] // 2 for a in range(3))
    assert torch.equal(got, want)


def test_prefix_mask():
    cu = make_cu([3, 2, 5])
    assert prefix_mask(cu, 10, 2).tolist() == [1, 1, 0, 1, 1, 1, 1, 0, 0, 0]
    assert not prefix_mask(cu, 10, 0).any()


# --------------------------------------------------------------------------- vs dense


SMALL_SHAPES = [
    # lengths, heads, head dim
    ([1, 7, 113], 3, 64),
    ([113, 1, 7], 2, 88),
    ([7, 0, 5], 2, 64),  # an empty sample in the middle
]
CONFIGS = [  # window, num_prefix, rope on
    (None, 0, False),
    (None, 1, True),
    (9, 0, False),
    (9, 1, True),
    ((1, 3, 5), 0, True),
    ((2, 5, 4), 1, False),
]
# The 1031-token sample is the slow one: one head, D = 16, three configurations.
CASES = [(*shape, *cfg) for shape in SMALL_SHAPES for cfg in CONFIGS] + [
    ([1031, 7], 1, 16, *CONFIGS[0]),
    ([1031, 7], 1, 16, *CONFIGS[3]),
    ([7, 1031], 1, 16, *CONFIGS[4]),
]


@pytest.mark.parametrize("lengths,heads,dim,window,num_prefix,use_rope", CASES)
def test_matches_dense(lengths, heads, dim, window, num_prefix, use_rope):
    lengths = [max(n, num_prefix) for n in lengths]  # a sample holds at least its prefix
    total = sum(lengths)
    grid = (8, 16, 16) if total > 500 else (4, 8, 8)
    coords = make_coords(lengths, num_prefix, grid)
    rope = (100.0, (dim // 4 & ~1,) * 3) if use_rope else None
    q, k, v = qkv(total, heads, dim)
    out = masked_attention(
        q, k, v, make_cu(lengths), max(lengths), coords=coords, rope=rope, window=window, num_prefix=num_prefix
    )
    want = dense_attention(q, k, v, lengths, coords=coords, rope=rope, window=window, num_prefix=num_prefix)
    assert out.dtype == F64 and out.shape == (total, heads, dim)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_sdpa_path_matches_explicit_path():
    """float32 goes through SDPA, float64 through the explicit softmax: same problem, same answer."""
    lengths, heads, dim = [1, 7, 113], 3, 88
    coords = make_coords(lengths, 1)
    cu = make_cu(lengths)
    q, k, v = qkv(sum(lengths), heads, dim, dtype=torch.float32)
    for window in (None, 7, (1, 3, 3)):
        args = (q, k, v, cu, 0.3, coords, (50.0, (8, 8, 8)), window, 1)
        sdpa = attn_mod._reference(*args, explicit=False)
        explicit = attn_mod._reference(*args, explicit=True)
        exact = attn_mod._reference(*(t.double() for t in args[:3]), *args[3:], explicit=True)
        # logits reach ~10 here, so float32 rounding alone moves outputs by a few 1e-6
        torch.testing.assert_close(sdpa, explicit, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sdpa.double(), exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(explicit.double(), exact, rtol=1e-5, atol=1e-5)


def test_chunked_rows_match_unchunked(monkeypatch):
    lengths, heads, dim = [113, 7], 2, 16
    coords = make_coords(lengths, 1)
    q, k, v = qkv(sum(lengths), heads, dim)
    kwargs = dict(coords=coords, window=(2, 3, 3), num_prefix=1, rope=(10.0, (4, 4, 4)))
    whole = masked_attention(q, k, v, make_cu(lengths), 113, **kwargs)
    monkeypatch.setattr(attn_mod, "_CHUNK_ELEMENTS", heads * 113 * 10)  # 10 rows per chunk
    chunked = masked_attention(q, k, v, make_cu(lengths), 113, **kwargs)
    torch.testing.assert_close(chunked, whole, rtol=1e-14, atol=1e-14)


def test_packed_qkv_equals_separate():
    lengths = [7, 1, 20]
    coords = make_coords(lengths, 1)
    packed = torch.randn(sum(lengths), 3, 4, 64, dtype=F64)
    kwargs = dict(coords=coords, rope=(1e4, (20, 22, 22)), window=(3, 3, 3), num_prefix=1)
    out_packed = masked_attention(packed, cu_seqlens=make_cu(lengths), max_seqlen=20, **kwargs)
    q, k, v = (t.contiguous() for t in packed.unbind(1))
    out_sep = masked_attention(q, k, v, make_cu(lengths), 20, **kwargs)
    assert torch.equal(out_packed, out_sep)


def test_one_token_sample_returns_its_value():
    lengths = [5, 1, 3]
    q, k, v = qkv(9, 2, 32)
    out = masked_attention(q, k, v, make_cu(lengths), 5)
    assert torch.equal(out[5], v[5])  # softmax over one key is exactly 1


def test_defaults_single_sample_and_scale():
    q, k, v = qkv(13, 2, 16)
    out = masked_attention(q, k, v)  # cu_seqlens=None: one sample; max_seqlen computed
    torch.testing.assert_close(out, dense_attention(q, k, v, [13], scale=0.25), rtol=1e-12, atol=1e-12)
    out = masked_attention(q, k, v, make_cu([6, 7]), softmax_scale=0.7)
    torch.testing.assert_close(out, dense_attention(q, k, v, [6, 7], scale=0.7), rtol=1e-12, atol=1e-12)


def test_int64_coords_and_noncontiguous_inputs():
    lengths = [9, 12]
    coords = make_coords(lengths, 0)
    base = torch.randn(sum(lengths), 3, 2, 32, dtype=F64)
    q, k, v = base[:, 0], base[:, 1], base[:, 2]  # strided, non-contiguous
    kwargs = dict(rope=(30.0, (8, 8, 8)), window=(3, 3, 3))
    a = masked_attention(q, k, v, make_cu(lengths), 12, coords=coords, **kwargs)
    b = masked_attention(q.contiguous(), k, v, make_cu(lengths), 12, coords=coords.long(), **kwargs)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- windows


def test_window_111_sees_only_itself_and_prefix():
    lengths = [1, 6, 11]
    q, k, v = qkv(sum(lengths), 2, 16)
    coords = make_coords(lengths, 0)  # distinct cells per sample
    out = masked_attention(q, k, v, make_cu(lengths), 11, coords=coords, window=(1, 1, 1))
    assert torch.equal(out, v)

    # With one prefix token: a grid token attends to {prefix, itself}; the prefix to everything.
    P, cu = 1, make_cu(lengths)
    coords = make_coords(lengths, P)
    out = masked_attention(q, k, v, cu, 11, coords=coords, window=(1, 1, 1), num_prefix=P)
    scale = 0.25
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        for i in range(s + P, e):
            logits = torch.stack([(q[i] * k[s]).sum(-1), (q[i] * k[i]).sum(-1)]) * scale  # [2, H]
            w = torch.softmax(logits, dim=0)
            torch.testing.assert_close(out[i], w[0, :, None] * v[s] + w[1, :, None] * v[i], rtol=1e-13, atol=1e-13)
        full = dense_attention(q[s:e], k[s:e], v[s:e], [e - s])
        torch.testing.assert_close(out[s], full[0], rtol=1e-13, atol=1e-13)


def test_1d_window_semantics():
    lengths = [10, 4]
    cu = make_cu(lengths)
    q, k, v = qkv(14, 1, 16)
    # window 1 (half-width 0): each token alone; widths 4 and 5 share half-width 2.
    assert torch.equal(masked_attention(q, k, v, cu, 10, window=1), v)
    torch.testing.assert_close(
        masked_attention(q, k, v, cu, 10, window=4), masked_attention(q, k, v, cu, 10, window=5), rtol=0, atol=0
    )
    # Query 5 of sample 0 with half-width 2 sees exactly keys 3..7.
    out = masked_attention(q, k, v, cu, 10, window=5)
    w = torch.softmax((q[5] * k[3:8]).sum(-1) * 0.25, dim=0)  # [5, 1]
    torch.testing.assert_close(out[5], (w[:, :, None] * v[3:8]).sum(0), rtol=1e-13, atol=1e-13)
    # A window covering the whole sample is no window at all.
    torch.testing.assert_close(masked_attention(q, k, v, cu, 10, window=19), masked_attention(q, k, v, cu, 10))


# --------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("dim,sections", [(64, (20, 22, 22)), (88, (24, 28, 28)), (32, (8, 0, 12))])
def test_rope_matches_rotation_matrix(dim, sections):
    lengths, P = [1, 7, 30], 1
    total = sum(lengths)
    coords = make_coords(lengths, P)
    x = torch.randn(total, 3, dim, dtype=F64)
    pm = positions(lengths) < P
    got = apply_rope_3d(x, coords, 500.0, sections, pm)
    want = torch.einsum("tij,thj->thi", rotation_matrices(coords, 500.0, sections, dim, ~pm), x)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert torch.equal(got[pm], x[pm])  # prefix rows bit-identical
    assert torch.equal(got[..., sum(sections) :], x[..., sum(sections) :])  # channels past the sections


def test_rope_cos_sin_layout():
    coords = torch.tensor([[2, 3, 5], [0, 1, 7]])
    cos, sin = rope_cos_sin(coords, 10.0, (4, 2, 6), torch.float64)
    assert cos.shape == sin.shape == (2, 6)
    axis = [0, 0, 1, 2, 2, 2]
    freq = [1.0, 10.0 ** -0.5, 1.0, 1.0, 10.0 ** (-1 / 3), 10.0 ** (-2 / 3)]
    ang = torch.tensor([[coords[r, a].item() * f for a, f in zip(axis, freq)] for r in range(2)], dtype=F64)
    torch.testing.assert_close(cos, ang.cos(), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(sin, ang.sin(), rtol=1e-15, atol=1e-15)
    c32, _ = rope_cos_sin(coords, 10.0, (4, 2, 6), torch.float32)
    assert c32.dtype == torch.float32


def test_rope_scores_depend_only_on_coordinate_differences():
    total, P = 40, 2
    coords = make_coords([total], P)
    pm = torch.arange(total) < P
    q, k, _ = qkv(total, 2, 64)
    sec = (20, 22, 22)

    def scores(c):
        qr, kr = apply_rope_3d(q, c, 1e4, sec, pm), apply_rope_3d(k, c, 1e4, sec, pm)
        return torch.einsum("ihd,jhd->hij", qr, kr)

    shifted = coords + torch.tensor([3, -5, 11], dtype=torch.int32)
    base, moved = scores(coords), scores(shifted)
    g = slice(P, None)  # grid tokens; prefix tokens are unrotated, so only prefix-prefix is invariant too
    torch.testing.assert_close(moved[:, g, g], base[:, g, g], rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(moved[:, :P, :P], base[:, :P, :P], rtol=0, atol=0)
    # and they do depend on the coordinates (RoPE is not a no-op)
    stretched = coords * 2
    stretched[:P] = coords[:P]
    assert (scores(stretched) - base)[:, P:, P:].abs().max() > 1e-3


def test_rope_dtype_and_fp32_accuracy():
    coords = make_coords([50], 0)
    x = torch.randn(50, 2, 64, dtype=F64)
    exact = apply_rope_3d(x, coords, 1e4, (16, 16, 16))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2**-7)):
        y = apply_rope_3d(x.to(dtype), coords, 1e4, (16, 16, 16))
        assert y.dtype == dtype
        ref = apply_rope_3d(x.to(dtype).double(), coords, 1e4, (16, 16, 16))
        assert ((y.double() - ref).abs() <= tol * ref.abs() + 1e-6).all()
    assert (apply_rope_3d(x.float(), coords, 1e4, (16, 16, 16)).double() - exact).abs().max() < 1e-5


# --------------------------------------------------------------------------- autograd and dtypes


@pytest.mark.parametrize("window", [(1, 3, 3), 3])
def test_gradcheck(window):
    lengths, P = [2, 5, 1], 1
    coords = make_coords(lengths, P, grid=(2, 3, 3))
    coords[3:7] = torch.tensor([[0, 0, 0], [0, 1, 1], [1, 0, 2], [1, 2, 2]], dtype=torch.int32)
    q, k, v = qkv(sum(lengths), 1, 16, grad=True)
    cu = make_cu(lengths)
    allowed = dense_attention_mask(cu, sum(lengths), coords, window, P)
    assert not allowed[2:7, 2:7].all()  # the window really masks some pairs of the long sample

    def f(q, k, v):
        return masked_attention(q, k, v, cu, 6, coords=coords, rope=(20.0, (4, 4, 4)), window=window, num_prefix=P)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_float32_path_match_float64():
    lengths = [5, 17]
    coords = make_coords(lengths, 1)
    q, k, v = qkv(22, 2, 16, grad=True)
    kwargs = dict(coords=coords, rope=(20.0, (4, 4, 4)), num_prefix=1)
    cu = make_cu(lengths)
    for window in (None, (1, 3, 3)):
        g = torch.randn(22, 2, 16, dtype=F64)
        gd = torch.autograd.grad(masked_attention(q, k, v, cu, 17, window=window, **kwargs), (q, k, v), g)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        out32 = masked_attention(q32, k32, v32, cu, 17, window=window, **kwargs)
        gf = torch.autograd.grad(out32, (q32, k32, v32), g.float())
        for a, b in zip(gf, gd):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,unit", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_half_inputs_round_once(dtype, unit):
    lengths = [7, 1, 60]
    coords = make_coords(lengths, 1)
    q, k, v = qkv(sum(lengths), 4, 64, dtype=dtype)
    for window in (None, (2, 3, 3)):
        kwargs = dict(coords=coords, rope=(1e4, (20, 22, 22)), window=window, num_prefix=1)
        out = masked_attention(q, k, v, make_cu(lengths), 60, **kwargs)
        ref = masked_attention(q.double(), k.double(), v.double(), make_cu(lengths), 60, **kwargs)
        assert out.dtype == dtype
        # one rounding of the float32 result (unit roundoff) plus float32 arithmetic error
        assert ((out.double() - ref).abs() <= unit * ref.abs() + 1e-5).all()


# --------------------------------------------------------------------------- padded path
#
# float32 / 16-bit inputs run as one SDPA call over the padded [B, H, Lmax, D] batch (within a
# size budget); float64 keeps the per-sample explicit softmax, the oracle here. Tolerance rule (kernels.md): the
# padded path's max error against the float64 oracle is at most 2x (output) / 3x (gradients)
# the error of the same-dtype PyTorch computation, i.e. plain attention as PyTorch runs it in
# the input dtype (as in test_masked_attention_triton.py). Since the reference upcasts 16-bit inputs,
# that bound is loose for bfloat16, so the padded path must also stay within the same factors
# of the per-sample loop it replaces (same upcast, same dtype).


def same_dtype_attention(q, k, v, cu, scale, coords, rope, window, num_prefix):
    """Dense attention over the packed batch in q's dtype: RoPE, matmuls in the dtype, softmax in fp32."""
    total = q.shape[0]
    if rope is not None:
        pm = prefix_mask(cu, total, num_prefix)
        q = apply_rope_3d(q, coords, rope[0], rope[1], pm)
        k = apply_rope_3d(k, coords, rope[0], rope[1], pm)
    allowed = dense_attention_mask(cu, total, coords, window, num_prefix)
    s = torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0))  # [H, total, total]
    s = (s.float() * scale).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).to(q.dtype)
    return torch.matmul(p, v.transpose(0, 1)).transpose(0, 1)


class SdpaCalls:
    """Stands in for ``F.scaled_dot_product_attention`` and for the reference's masked math (what
    the CPU runs instead of SDPA under a window): records each call's q shape, then runs it."""

    def __init__(self, monkeypatch):
        self.shapes: list[tuple[int, ...]] = []
        sdpa, math_ = torch.nn.functional.scaled_dot_product_attention, attn_mod._masked_attention_math
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", self.recording(sdpa))
        monkeypatch.setattr(attn_mod, "_masked_attention_math", self.recording(math_))

    def recording(self, fn):
        def call(q, *args, **kwargs):
            self.shapes.append(tuple(q.shape))
            return fn(q, *args, **kwargs)

        return call


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


PADDED_CASES = [
    # lengths, heads, dim, window, num_prefix, rope sections or None, packed qkv
    ([1, 7, 113, 0], 2, 64, None, 0, (16, 16, 16), False),  # ragged, empty last sample
    ([7, 0, 113, 1], 2, 32, 9, 0, None, True),  # 1D window: padded rows of the 1-token sample see no real key
    ([1, 113, 7, 30], 3, 48, 9, 1, (8, 8, 8), False),
    ([113, 0, 7, 1], 2, 64, (2, 3, 3), 0, (16, 16, 16), True),
    ([5, 113, 7, 9], 2, 32, (1, 3, 5), 4, (10, 10, 10), False),
    ([44, 44, 44, 44], 4, 24, None, 4, (8, 8, 8), True),  # encoder-like, equal lengths: no padding
    ([50, 50, 50], 2, 32, 9, 0, (0, 0, 32), False),  # equal lengths, 1D window
    ([30, 30], 2, 32, (2, 3, 3), 1, None, False),  # equal lengths, 3D window
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths,heads,dim,window,num_prefix,sections,packed", PADDED_CASES)
def test_padded_path_matches_float64(monkeypatch, lengths, heads, dim, window, num_prefix, sections, packed, dtype):
    cu, total = make_cu(lengths), sum(lengths)
    coords = make_coords(lengths, num_prefix)
    rope = None if sections is None else (100.0, sections)
    scale = 0.3
    base = torch.randn(total, 3, heads, dim, dtype=F64)
    dout = torch.randn(total, heads, dim, dtype=F64)
    args = (cu, scale, coords, rope, window, num_prefix)
    run = out_and_grads(base, dout, packed)

    def op(q, k, v):
        return masked_attention(q, k, v, cu, max(lengths), softmax_scale=scale, coords=coords, rope=rope,
                                window=window, num_prefix=num_prefix)

    gt_out, gt_grads = run(F64, op)  # the explicit per-sample loop (checked against dense above)
    calls = SdpaCalls(monkeypatch)
    out, grads = run(dtype, op)
    assert [s[0] for s in calls.shapes] == [len(lengths)]  # one call, batched over the samples
    plain_out, plain_grads = run(dtype, lambda q, k, v: same_dtype_attention(q, k, v, *args))
    loop_out, loop_grads = run(dtype, lambda q, k, v: attn_mod._reference(q, k, v, *args, explicit=False))

    assert out.dtype == dtype and out.shape == (total, heads, dim)
    assert all(torch.isfinite(g).all() for g in grads)
    e = max_err(out, gt_out)
    assert e <= 2 * max_err(plain_out, gt_out), "out vs same-dtype attention"
    assert e <= 2 * max_err(loop_out, gt_out), "out vs per-sample loop"
    for name, g, g_gt, g_plain, g_loop in zip("qkv", grads, gt_grads, plain_grads, loop_grads):
        e = max_err(g, g_gt)
        assert e <= 3 * max_err(g_plain, g_gt), f"d{name} vs same-dtype attention"
        assert e <= 3 * max_err(g_loop, g_gt), f"d{name} vs per-sample loop"


def test_path_choice(monkeypatch):
    """One batched SDPA call within the budget, the per-sample loop past it, none for float64."""
    lengths, heads, dim = [44, 41, 0, 47], 4, 24
    cu, total = make_cu(lengths), sum(lengths)
    q, k, v = qkv(total, heads, dim, dtype=torch.float32)
    padded_size = len(lengths) * heads * 47 * 47  # B * H * Lmax^2
    assert attn_mod.uses_padded_path(torch.float32, len(lengths), heads, 47)
    assert attn_mod.uses_padded_path(torch.bfloat16, len(lengths), heads, 47)
    assert not attn_mod.uses_padded_path(torch.float64, len(lengths), heads, 47)

    monkeypatch.setattr(attn_mod, "_PADDED_ELEMENTS", padded_size)  # the limit is inclusive
    calls = SdpaCalls(monkeypatch)
    padded = masked_attention(q, k, v, cu, 47, window=9)
    assert calls.shapes == [(4, heads, 47, dim)]

    monkeypatch.setattr(attn_mod, "_PADDED_ELEMENTS", padded_size - 1)
    calls.shapes.clear()
    loop = masked_attention(q, k, v, cu, 47, window=9)
    assert calls.shapes == [(heads, n, dim) for n in lengths if n]  # one chunk per non-empty sample
    torch.testing.assert_close(padded, loop, rtol=1e-6, atol=1e-6)

    monkeypatch.setattr(attn_mod, "_PADDED_ELEMENTS", padded_size)
    calls.shapes.clear()
    masked_attention(q.double(), k.double(), v.double(), cu, 47, window=9)
    assert calls.shapes == []  # float64 stays on the explicit softmax (the oracle) whatever the budget


@pytest.mark.parametrize("num_prefix", [0, 1])
@pytest.mark.parametrize("window", [None, 3, (1, 1, 1), (2, 3, 5)])
def test_padded_mask(window, num_prefix):
    """Each sample's block of the padded mask is its block of the dense mask; no row is empty."""
    lengths, P = [1, 113, 7, 30] if num_prefix else [1, 113, 0, 7, 30], num_prefix
    cu, longest = make_cu(lengths), max(lengths)
    coords = make_coords(lengths, P)
    dense = dense_attention_mask(cu, sum(lengths), coords, window, P)
    coords_p = torch.zeros(len(lengths), longest, 3, dtype=torch.int32)
    for b, (s, n) in enumerate(zip(cu.tolist(), lengths)):
        coords_p[b, :n] = coords[s : s + n]
    mask = attn_mod._padded_mask(torch.tensor(lengths), longest, coords_p, window, P, ragged=True)
    mask = mask.expand(len(lengths), 1, longest, longest)[:, 0]  # [B, L, L]
    for b, (s, n) in enumerate(zip(cu.tolist(), lengths)):
        assert torch.equal(mask[b, :n, :n], dense[s : s + n, s : s + n])
        assert not mask[b, :n, n:].any()  # real queries never see padding
    # Padded query rows keep a key: SDPA kernels differ on empty rows (NaN in some backwards).
    assert mask.any(dim=-1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("padded", [True, False])
def test_nonfinite_key_reaches_only_rows_that_see_it(monkeypatch, dtype, padded):
    """A NaN (or inf) key outside a query's window leaves that query's output as float64 has it,
    on both lower-precision paths. SDPA adds its boolean mask as -inf, and NaN + -inf is NaN, so
    the key used to turn every row of its sample non-finite."""
    monkeypatch.setattr(attn_mod, "_PADDED_ELEMENTS", (1 << 25) if padded else 0)
    lengths, heads = [10, 20], 2
    cu, total = make_cu(lengths), sum(lengths)
    coords = make_coords(lengths, 1)
    q, k, v = qkv(total, heads, 16)
    k[15, 1, 3] = float("nan")
    k[25, 0, 2] = float("inf")  # +inf or -inf scores by the sign of q: some rows that see it stay finite
    for window in (5, (1, 3, 3)):
        kw = dict(coords=coords, window=window, num_prefix=1)
        want = masked_attention(q, k, v, cu, 20, **kw)
        got = masked_attention(q.to(dtype), k.to(dtype), v.to(dtype), cu, 20, **kw)
        bad = ~torch.isfinite(want).all(-1)  # [total, heads]
        assert 0 < int(bad.sum()) < total  # the key reaches some rows, not all
        assert torch.equal(~torch.isfinite(got).all(-1), bad), window
        assert max_err(got[~bad], want[~bad]) < 2e-2


def test_empty_batch_output_is_in_the_graph():
    """total = 0: the output is still a function of q, k, v, so backward() runs and gives empty
    gradients (the Triton backend's autograd op does the same)."""
    for dtype in (torch.float32, torch.float64):
        for cu, window in ((_cu(0, 0), None), (_cu(0, 0, 0), 3)):
            q, k, v = qkv(0, 2, 16, dtype=dtype, grad=True)
            out = masked_attention(q, k, v, cu, 0, window=window, backend="torch")
            assert out.shape == (0, 2, 16) and out.dtype == dtype and out.grad_fn is not None
            out.sum().backward()
            assert q.grad.shape == k.grad.shape == v.grad.shape == (0, 2, 16)


def test_padded_rows_stay_finite():
    """A 1-token sample padded to 113 rows under a 1D window: its padded query rows see no real key."""
    lengths = [1, 113]
    assert attn_mod.uses_padded_path(torch.float32, 2, 1, 113)
    q, k, v = qkv(114, 1, 16, dtype=torch.float32, grad=True)
    out = masked_attention(q, k, v, make_cu(lengths), 113, window=3)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(out[0], v[0].detach())  # the 1-token sample attends to itself only


# --------------------------------------------------------------------------- bad inputs


def _cu(*values):
    return torch.tensor(values, dtype=torch.int32)


def _good():
    lengths = [3, 5]
    q, k, v = qkv(8, 2, 16)
    return dict(q=q, k=k, v=v, cu_seqlens=make_cu(lengths), max_seqlen=5, coords=make_coords(lengths, 1), num_prefix=1)


BAD = [
    ("q", lambda a: a.update(q=a["q"].numpy()), TypeError, "q must be a torch.Tensor"),
    ("q int", lambda a: a.update(q=a["q"].long()), TypeError, "q must have dtype"),
    ("k only", lambda a: a.update(v=None), ValueError, "pass both k and v"),
    ("k dtype", lambda a: a.update(k=a["k"].float()), TypeError, "k has dtype"),
    ("v shape", lambda a: a.update(v=a["v"][:, :1]), ValueError, "v has shape"),
    ("k device", lambda a: a.update(k=a["k"].to("meta")), ValueError, "k is on meta"),
    (
        "packed shape",
        lambda a: a.update(q=torch.randn(8, 2, 2, 16, dtype=F64), k=None, v=None),
        ValueError,
        "packed qkv",
    ),
    ("4D with k", lambda a: a.update(q=a["q"][:, None]), ValueError, "q must have shape [total, H, D]"),
    (
        "head dim small",
        lambda a: a.update(q=a["q"][..., :8], k=a["k"][..., :8], v=a["v"][..., :8]),
        ValueError,
        "head dim",
    ),
    (
        "head dim big",
        lambda a: a.update(**{n: torch.randn(8, 1, 264, dtype=F64) for n in "qkv"}),
        ValueError,
        "head dim",
    ),
    ("cu dtype", lambda a: a.update(cu_seqlens=a["cu_seqlens"].float()), TypeError, "cu_seqlens must have dtype"),
    ("cu decreasing", lambda a: a.update(cu_seqlens=_cu(0, 6, 3, 8)), ValueError, "cu_seqlens must be non-decreasing"),
    ("cu end", lambda a: a.update(cu_seqlens=_cu(0, 3, 7)), ValueError, "cu_seqlens must end at total"),
    ("cu start", lambda a: a.update(cu_seqlens=_cu(1, 3, 8)), ValueError, "cu_seqlens must start at 0"),
    ("max_seqlen small", lambda a: a.update(max_seqlen=4), ValueError, "max_seqlen=4"),
    ("max_seqlen type", lambda a: a.update(max_seqlen=5.0), TypeError, "max_seqlen must be an int"),
    ("scale zero", lambda a: a.update(softmax_scale=0.0), ValueError, "softmax_scale"),
    ("scale nan", lambda a: a.update(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ("scale type", lambda a: a.update(softmax_scale="0.1"), TypeError, "softmax_scale"),
    ("coords float", lambda a: a.update(coords=a["coords"].float()), TypeError, "coords must have dtype"),
    ("coords shape", lambda a: a.update(coords=a["coords"][:, :2]), ValueError, "coords must have shape"),
    ("coords rows", lambda a: a.update(coords=a["coords"][:7]), ValueError, "coords must have shape"),
    (
        "coords int64 range",
        lambda a: a.update(coords=a["coords"].long() * 2**33),
        ValueError,
        "coords must fit in int32",
    ),
    ("rope no coords", lambda a: a.update(rope=(1e4, (4, 4, 4)), coords=None), ValueError, "rope needs coords"),
    ("rope odd", lambda a: a.update(rope=(1e4, (4, 3, 4))), ValueError, "rope sections must be even"),
    ("rope sum", lambda a: a.update(rope=(1e4, (6, 6, 6))), ValueError, "sum to 18 > head dim 16"),
    ("rope theta", lambda a: a.update(rope=(-1.0, (4, 4, 4))), ValueError, "rope theta"),
    ("rope form", lambda a: a.update(rope=(1e4, 4, 4)), TypeError, "rope must be a pair"),
    ("rope sections form", lambda a: a.update(rope=(1e4, (4, 4))), TypeError, "rope sections must be three ints"),
    ("window zero", lambda a: a.update(window=0), ValueError, "window must be >= 1"),
    ("window tuple zero", lambda a: a.update(window=(1, 0, 1)), ValueError, "window sizes must be >= 1"),
    ("window no coords", lambda a: a.update(window=(1, 1, 1), coords=None), ValueError, "needs coords"),
    ("window type", lambda a: a.update(window=2.0), TypeError, "window must be an int"),
    ("window bool", lambda a: a.update(window=True), TypeError, "window must be an int"),
    ("window pair", lambda a: a.update(window=(1, 2)), TypeError, "window must be None, an int or three ints"),
    ("prefix negative", lambda a: a.update(num_prefix=-1), ValueError, "num_prefix must be >= 0"),
    ("prefix too long", lambda a: a.update(num_prefix=4), ValueError, "num_prefix=4"),
    ("prefix type", lambda a: a.update(num_prefix=1.0), TypeError, "num_prefix must be an int"),
    ("backend", lambda a: a.update(backend="cudnn"), ValueError, "backend must be"),
]


@pytest.mark.parametrize("name,edit,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, edit, exc, msg):
    args = _good()
    masked_attention(**args)  # the unedited call is valid
    edit(args)
    with pytest.raises(exc, match="masked_attention: .*" + re.escape(msg)):
        masked_attention(**args)


def test_nonfinite_inputs_are_named_when_values_are_checked(monkeypatch):
    q, k, v = qkv(8, 2, 16)
    v[3, 1, 2] = float("inf")
    cu = make_cu([3, 5])
    assert torch.isinf(masked_attention(q, k, v, cu, 5)).any()  # opt-in only: inf flows by default
    monkeypatch.setenv("INVNEXT_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match="masked_attention: v holds 1 non-finite value"):
        masked_attention(q, k, v, cu, 5)


def test_meta_tensors_propagate_shapes_or_say_what_is_missing():
    """Meta tensors hold no values: the reference ran its float64 per-sample loop over them
    (NotImplementedError from reading cu_seqlens); it now takes the padded path, which reads none."""
    q, k, v = (t.to("meta").requires_grad_() for t in qkv(8, 2, 16))
    cu = make_cu([3, 5]).to("meta")
    coords = make_coords([3, 5], 1).to("meta")
    for window in (None, 3, (1, 3, 3)):
        out = masked_attention(q, k, v, cu, 5, coords=coords, window=window, num_prefix=1)
        assert out.device.type == "meta" and out.shape == (8, 2, 16) and out.dtype == F64 and out.grad_fn is not None
    with pytest.raises(ValueError, match="masked_attention: cu_seqlens is a meta tensor .* pass max_seqlen"):
        masked_attention(q, k, v, cu)


def test_max_seqlen_must_be_non_negative():
    q, k, v = qkv(0, 1, 16)
    with pytest.raises(ValueError, match="masked_attention: max_seqlen must be >= 0, got -1"):
        masked_attention(q, k, v, _cu(0, 0), -1)
