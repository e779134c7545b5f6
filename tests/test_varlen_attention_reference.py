"""``invnext.ops.varlen_attention`` (the pure-PyTorch reference) against a float64 dense masked
softmax built independently here, on flash-attn's own parameter grid.

The oracle (:func:`dense_varlen`) attends over the whole packed batch at once: ``[Hq, total_q,
total_k]`` scores, a mask written out cell by cell from flash-attn's documented rule (key ``j`` of
the same sample is allowed for query ``i`` iff ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``,
causal = ``right = 0``, -1 unbounded) and an explicit softmax; key/value heads repeated for GQA.
The grid mirrors flash-attn's ``test_flash_attn_varlen_output``: MHA / GQA / MQA, causal or not,
local windows drawn at random (asymmetric), query and key lengths drawn independently per
sample (so ``Lq > Lk`` and ``Lq < Lk`` both occur), lengths 1 and 0 included, head dims from
its list (32 .. 256, odd ones too).
"""
from __future__ import annotations

import re

import pytest
import torch

from invnext.ops import varlen_attention
from invnext.ops._dispatch import BackendUnavailableError
from invnext.ops.attention import masked_attention
from invnext.ops.varlen import varlen_attention_reference, varlen_dense_mask

F64 = torch.float64


# --------------------------------------------------------------------------- independent oracle


def cu_of(lengths, dtype=torch.int32, device=None) -> torch.Tensor:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=dtype, device=device)


def allowed_cells(lq: list[int], lk: list[int], causal: bool, window: tuple[int, int]) -> torch.Tensor:
    """``bool[total_q, total_k]``, written out pair by pair from flash-attn's rule (module docstring)."""
    left, right = window
    if causal:
        right = 0
    mask = torch.zeros(sum(lq), sum(lk), dtype=torch.bool)
    q0 = k0 = 0
    for nq, nk in zip(lq, lk):
        for i in range(nq):
            for j in range(nk):
                ok = True
                if left >= 0 and j < i + nk - nq - left:
                    ok = False
                if right >= 0 and j > i + nk - nq + right:
                    ok = False
                mask[q0 + i, k0 + j] = ok
        q0, k0 = q0 + nq, k0 + nk
    return mask


def dense_varlen(q, k, v, allowed, scale):
    """(out ``[total_q, Hq, D]``, lse ``[Hq, total_q]``) in float64: dense masked softmax, rows
    that see nothing give 0 and -inf (where()s keep NaN out of the values and the gradients)."""
    group = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = torch.einsum("ihd,jhd->hij", q, kr) * scale
    s = torch.where(allowed, s, torch.full_like(s, float("-inf")))
    any_ = allowed.any(-1)[None, :, None]
    s_safe = torch.where(any_, s, torch.zeros_like(s))
    m = s_safe.amax(-1, keepdim=True).detach()
    e = torch.where(allowed, torch.exp(s_safe - m), torch.zeros_like(s))
    z = e.sum(-1, keepdim=True)
    z_safe = torch.where(any_, z, torch.ones_like(z))
    out = torch.einsum("hij,jhd->ihd", e / z_safe, vr)
    lse = torch.where(any_, m + torch.log(z_safe), torch.full_like(z, float("-inf"))).squeeze(-1)
    return out, lse


def random_lengths(batch: int, seqlen: int, gen: torch.Generator, allow_zero: bool) -> list[int]:
    """flash-attn's "random" padding: lengths in ``[max(1, seqlen - 20), seqlen]``; one sample forced
    to 1 and, where allowed, one to 0."""
    lens = torch.randint(max(1, seqlen - 20), seqlen + 1, (batch,), generator=gen).tolist()
    lens[0] = 1
    if allow_zero and batch > 2:
        lens[2] = 0
    return lens


def lse_loss_weights(lse: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum(w * lse)`` over finite entries: a loss that sends a gradient through lse."""
    return (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * w).sum()


def compare(lq, lk, hq, hk, d, causal, window, *, seed=0, cu_dtype=torch.int32, scale=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), hq, d, dtype=F64, generator=gen)
    k = torch.randn(sum(lk), hk, d, dtype=F64, generator=gen)
    v = torch.randn(sum(lk), hk, d, dtype=F64, generator=gen)
    dout = torch.randn(sum(lq), hq, d, dtype=F64, generator=gen)
    # lse is float32 by contract, so its gradient passes a float32 cast: weights exact in float32
    wl = torch.randn(hq, sum(lq), dtype=F64, generator=gen).float().double()
    sc = scale if scale is not None else d**-0.5

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = fn(*leaves)
        loss = (out * dout).sum() + lse_loss_weights(lse.double(), wl)
        return out.detach(), lse.detach(), torch.autograd.grad(loss, leaves)

    cq, ck = cu_of(lq, cu_dtype), cu_of(lk, cu_dtype)
    got = grads(lambda a, b, c: varlen_attention(a, b, c, cq, ck, max(lq), max(lk), softmax_scale=scale,
                                                 causal=causal, window_size=window, return_lse=True,
                                                 backend="torch"))
    allowed = allowed_cells(lq, lk, causal, window)
    want = grads(lambda a, b, c: dense_varlen(a, b, c, allowed, sc))
    out, lse, g = got
    out_w, lse_w, g_w = want
    assert out.dtype == F64 and out.shape == (sum(lq), hq, d)
    assert lse.dtype == torch.float32 and lse.shape == (hq, sum(lq))
    torch.testing.assert_close(out, out_w, rtol=1e-10, atol=1e-10)
    # lse is float32 by contract (flash-attn's); -inf exactly where a row sees nothing
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_w.float()))
    fin = torch.isfinite(lse_w)
    torch.testing.assert_close(lse[fin].double(), lse_w[fin], rtol=2e-7, atol=2e-7)
    for name, a, b in zip("qkv", g, g_w):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")
    return allowed


# --------------------------------------------------------------------------- flash-attn's grid

# (seqlen_q, seqlen_k) pairs from flash-attn's varlen test, shortened where a float64 dense
# oracle with a per-cell Python mask would be slow; the ratios (q shorter, longer, equal) stay.
SEQLENS = [(1, 147), (113, 203), (128, 217), (108, 256), (256, 128), (61, 61), (60, 63), (63, 60)]
HEAD_DIMS = [32, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
MHA_TYPES = {"mha": (6, 6), "gqa": (6, 2), "mqa": (6, 1)}


def _grid():
    cases = []
    i = 0
    for (sq, sk) in SEQLENS:
        for mha in MHA_TYPES:
            for causal in (False, True):
                for local in (False, True):
                    d = HEAD_DIMS[i % len(HEAD_DIMS)]
                    cases.append((sq, sk, mha, causal, local, d, i))
                    i += 1
    return cases


@pytest.mark.parametrize("sq,sk,mha,causal,local,d,seed", _grid(),
                         ids=lambda x: str(x) if not isinstance(x, bool) else ("T" if x else "F"))
def test_flash_attn_grid(sq, sk, mha, causal, local, d, seed, one_torch_thread):
    gen = torch.Generator().manual_seed(seed)
    batch = 4
    lq = random_lengths(batch, sq, gen, allow_zero=True)
    lk = random_lengths(batch, sk, gen, allow_zero=seed % 2 == 0)
    # flash-attn draws window_size = randint(0, seqlen_k, (2,)): asymmetric in general
    window = tuple(torch.randint(0, sk, (2,), generator=gen).tolist()) if local else (-1, -1)
    hq, hk = MHA_TYPES[mha]
    # smaller heads at the long lengths: the per-cell mask of the oracle is the cost
    compare(lq, lk, hq if sq * sk < 20000 else 2 * hq // 6 or 1, hk if sq * sk < 20000 else max(1, 2 * hk // 6),
            d, causal, window, seed=seed)


@pytest.mark.parametrize("window", [(0, 0), (3, 0), (0, 3), (2, 7), (7, 2), (-1, 4), (4, -1), (500, 500)])
@pytest.mark.parametrize("causal", [False, True])
def test_windows_small(window, causal):
    # unequal, tiny and empty samples: rows that see nothing in several ways
    compare([5, 1, 9, 0, 4, 12], [3, 1, 14, 2, 0, 12], 4, 2, 16, causal, window, seed=7)


def test_int64_cu_seqlens_give_the_int32_results():
    lq, lk = [7, 0, 19, 3], [11, 5, 2, 3]
    q, k, v = torch.randn(29, 4, 16, dtype=F64), torch.randn(21, 2, 16, dtype=F64), torch.randn(21, 2, 16, dtype=F64)
    runs = []
    for dq, dk in ((torch.int32, torch.int32), (torch.int64, torch.int64), (torch.int32, torch.int64)):
        runs.append(varlen_attention(q, k, v, cu_of(lq, dq), cu_of(lk, dk), causal=True, window_size=(4, -1),
                                     return_lse=True))
    for out, lse in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])
    compare(lq, lk, 4, 2, 16, True, (4, -1), cu_dtype=torch.int64)


# --------------------------------------------------------------------------- conventions


def test_causal_is_aligned_bottom_right_as_flash_attn_documents():
    """flash-attn's docstring: Lq = 2, Lk = 5 causal gives rows [1 1 1 1 0], [1 1 1 1 1];
    Lq = 5, Lk = 2 gives rows 0 0 / 0 0 / 0 0 / 1 0 / 1 1 (the first three see nothing: 0, -inf)."""
    want_25 = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    want_52 = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]], dtype=torch.bool)
    assert torch.equal(allowed_cells([2], [5], True, (-1, -1)), want_25)
    assert torch.equal(allowed_cells([5], [2], True, (-1, -1)), want_52)
    assert torch.equal(varlen_dense_mask(cu_of([2]), cu_of([5]), -1, 0), want_25)
    assert torch.equal(varlen_dense_mask(cu_of([5]), cu_of([2]), -1, 0), want_52)

    q = torch.randn(5, 1, 16, dtype=F64, requires_grad=True)
    k, v = torch.randn(2, 1, 16, dtype=F64, requires_grad=True), torch.randn(2, 1, 16, dtype=F64, requires_grad=True)
    out, lse = varlen_attention(q, k, v, cu_of([5]), cu_of([2]), causal=True, return_lse=True)
    assert torch.equal(out[:3], torch.zeros(3, 1, 16, dtype=F64))
    assert torch.isneginf(lse[0, :3]).all() and torch.isfinite(lse[0, 3:]).all()
    torch.testing.assert_close(out[4], torch.softmax(q[4] @ k.squeeze(1).T / 4, -1) @ v.squeeze(1))
    out.sum().backward()
    assert torch.equal(q.grad[:3], torch.zeros(3, 1, 16, dtype=F64))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_window_matches_flash_attn_formula_and_masked_attention_1d_window():
    """``window_size=(w, w)`` on equal lengths is masked_attention's 1D window ``2w + 1``."""
    lengths = [9, 1, 30]
    q, k, v = (torch.randn(40, 2, 16, dtype=F64) for _ in range(3))
    cu = cu_of(lengths)
    got = varlen_attention(q, k, v, cu, cu, window_size=(3, 3))
    want = masked_attention(q, k, v, cu, window=7)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(varlen_attention(q, k, v, cu, cu), masked_attention(q, k, v, cu))


def test_gqa_equals_mha_with_repeated_heads():
    lq, lk = [6, 13], [9, 4]
    q = torch.randn(19, 6, 32, dtype=F64)
    k, v = torch.randn(13, 2, 32, dtype=F64), torch.randn(13, 2, 32, dtype=F64)
    args = (cu_of(lq), cu_of(lk))
    got = varlen_attention(q, k, v, *args, causal=True)
    want = varlen_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), *args, causal=True)
    assert torch.equal(got, want)


def test_large_windows_are_unbounded():
    lq, lk = [6, 13], [9, 4]
    q, k, v = torch.randn(19, 2, 16, dtype=F64), torch.randn(13, 2, 16, dtype=F64), torch.randn(13, 2, 16, dtype=F64)
    a = varlen_attention(q, k, v, cu_of(lq), cu_of(lk), window_size=(13, 13))
    b = varlen_attention(q, k, v, cu_of(lq), cu_of(lk))
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precisions_round_the_fp32_result(dtype):
    lq, lk = [5, 20], [7, 3]
    base = [torch.randn(25, 4, 32), torch.randn(10, 2, 32), torch.randn(10, 2, 32)]
    x = [t.to(dtype) for t in base]
    out, lse = varlen_attention(*x, cu_of(lq), cu_of(lk), causal=True, return_lse=True)
    want, want_lse = varlen_attention(*(t.double() for t in x), cu_of(lq), cu_of(lk), causal=True, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(out, want.to(torch.float32).to(dtype)) or (out.double() - want).abs().max() <= 2 * (
        want.to(dtype).double() - want).abs().max() + 1e-6
    fin = torch.isfinite(want_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin].double() - want_lse[fin].double()).abs().max() < 1e-5


def test_return_lse_false_returns_the_output_only_and_defaults():
    lq = [3, 4]
    q = torch.randn(7, 2, 16, dtype=F64)
    out = varlen_attention(q, q, q, cu_of(lq), cu_of(lq))
    assert isinstance(out, torch.Tensor) and out.shape == (7, 2, 16)
    # max_seqlen None is read from cu_seqlens; a loose bound is taken as the total
    assert torch.equal(out, varlen_attention(q, q, q, cu_of(lq), cu_of(lq), 4, 4))
    assert torch.equal(out, varlen_attention(q, q, q, cu_of(lq), cu_of(lq), 10**12, 10**9))


def test_empty_batches_keep_the_graph():
    q = torch.randn(0, 2, 16, dtype=F64, requires_grad=True)
    k = torch.randn(5, 1, 16, dtype=F64, requires_grad=True)
    out, lse = varlen_attention(q, k, k, cu_of([0, 0]), cu_of([2, 3]), return_lse=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    out.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))
    q2 = torch.randn(4, 2, 16, dtype=F64, requires_grad=True)
    k2 = torch.randn(0, 2, 16, dtype=F64)
    out, lse = varlen_attention(q2, k2, k2, cu_of([4]), cu_of([0]), return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    assert torch.equal(q2.grad, torch.zeros_like(q2))


def test_reference_is_the_registered_torch_backend():
    from invnext.ops._dispatch import resolve

    assert resolve("varlen_attention", "torch", "cpu")[1] is varlen_attention_reference
    assert resolve("varlen_attention", "auto", "cpu")[1] is varlen_attention_reference


# --------------------------------------------------------------------------- bad input


def _good():
    return {
        "q": torch.randn(8, 4, 16, dtype=F64),
        "k": torch.randn(6, 2, 16, dtype=F64),
        "v": torch.randn(6, 2, 16, dtype=F64),
        "cu_seqlens_q": cu_of([3, 5]),
        "cu_seqlens_k": cu_of([4, 2]),
        "max_seqlen_q": 5,
        "max_seqlen_k": 4,
    }


BAD = [
    ("q not tensor", lambda a: a.update(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("q int", lambda a: a.update(q=a["q"].long()), TypeError, "q must have dtype"),
    ("q 4d", lambda a: a.update(q=a["q"][None]), ValueError, "q must have 3 dimensions"),
    ("k dtype", lambda a: a.update(k=a["k"].float()), TypeError, "k has dtype"),
    ("v shape", lambda a: a.update(v=a["v"][:, :1]), ValueError, "v has shape"),
    ("k device", lambda a: a.update(k=a["k"].to("meta")), ValueError, "k is on meta"),
    ("k head dim", lambda a: a.update(k=a["k"][..., :8], v=a["v"][..., :8]), ValueError, "k has head dim 8"),
    ("gqa groups", lambda a: a.update(k=torch.randn(6, 3, 16, dtype=F64), v=torch.randn(6, 3, 16, dtype=F64)),
     ValueError, "Hq=4 must be a multiple of k's heads Hk=3"),
    ("head dim big", lambda a: a.update(q=torch.randn(8, 4, 264, dtype=F64), k=torch.randn(6, 2, 264, dtype=F64),
                                        v=torch.randn(6, 2, 264, dtype=F64)), ValueError, "head dim D"),
    ("cu_q dtype", lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].float()), TypeError,
     "cu_seqlens_q must have dtype"),
    ("cu_k 2d", lambda a: a.update(cu_seqlens_k=a["cu_seqlens_k"][None]), ValueError, "cu_seqlens_k must have 1"),
    ("cu_q end", lambda a: a.update(cu_seqlens_q=cu_of([3, 4])), ValueError, "cu_seqlens_q must end at total=8"),
    ("cu_k end", lambda a: a.update(cu_seqlens_k=cu_of([4, 3])), ValueError, "cu_seqlens_k must end at total=6"),
    ("cu_k decreasing", lambda a: a.update(cu_seqlens_k=torch.tensor([0, 5, 4, 6], dtype=torch.int32),
                                           cu_seqlens_q=cu_of([3, 5, 0])), ValueError,
     "cu_seqlens_k must be non-decreasing"),
    ("cu_q start", lambda a: a.update(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must start at 0"),
    ("batch mismatch", lambda a: a.update(cu_seqlens_k=cu_of([4, 2, 0])), ValueError,
     "cu_seqlens_q has 3 entries but cu_seqlens_k has 4"),
    ("max_q small", lambda a: a.update(max_seqlen_q=4), ValueError, "max_seqlen_q=4 is smaller"),
    ("max_k small", lambda a: a.update(max_seqlen_k=3), ValueError, "max_seqlen_k=3 is smaller"),
    ("max_k type", lambda a: a.update(max_seqlen_k=4.0), TypeError, "max_seqlen_k must be an int"),
    ("max_q negative", lambda a: a.update(max_seqlen_q=-1), ValueError, "max_seqlen_q must be >= 0"),
    ("scale zero", lambda a: a.update(softmax_scale=0.0), ValueError, "softmax_scale"),
    ("scale type", lambda a: a.update(softmax_scale="0.1"), TypeError, "softmax_scale"),
    ("causal type", lambda a: a.update(causal=1), TypeError, "causal must be a bool"),
    ("lse type", lambda a: a.update(return_lse="yes"), TypeError, "return_lse must be a bool"),
    ("window form", lambda a: a.update(window_size=3), TypeError, "window_size must be a pair"),
    ("window three", lambda a: a.update(window_size=(1, 2, 3)), TypeError, "window_size must be a pair"),
    ("window float", lambda a: a.update(window_size=(1.0, 2)), TypeError, "window_size must be an int"),
    ("window -2", lambda a: a.update(window_size=(-2, 2)), ValueError, "window_size entries must be -1"),
    ("backend", lambda a: a.update(backend="flash"), ValueError, "backend must be"),
]


@pytest.mark.parametrize("name,edit,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(name, edit, exc, msg):
    args = _good()
    varlen_attention(**args)  # the unedited call is valid
    edit(args)
    with pytest.raises(exc, match="varlen_attention: .*" + re.escape(msg)):
        varlen_attention(**args)


def test_max_seqlen_none_on_meta_says_what_to_pass():
    a = _good()
    q, k, v = (a[n].to("meta") for n in "qkv")
    with pytest.raises(ValueError, match="varlen_attention: cu_seqlens_q is a meta tensor .* pass max_seqlen_q"):
        varlen_attention(q, k, v, a["cu_seqlens_q"].to("meta"), a["cu_seqlens_k"].to("meta"))


def test_triton_on_cpu_tensors_without_the_interpreter_says_why(monkeypatch):
    from invnext.ops._dispatch import _triton_import_error

    # Import Triton under the suite's setting first: triton.language's own jit helpers (tl.cdiv, ...)
    # take the interpreter mode of the environment they are first imported in, for the whole process.
    _triton_import_error()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="varlen_attention: backend 'triton' is unavailable"):
        varlen_attention(**_good(), backend="triton")


def test_nonfinite_inputs_are_named_when_values_are_checked(monkeypatch):
    a = _good()
    a["v"][2, 1, 3] = float("nan")
    monkeypatch.setenv("INVNEXT_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match="varlen_attention: v holds 1 non-finite value"):
        varlen_attention(**a)


def test_masked_attention_takes_int64_cu_seqlens():
    lengths = [5, 1, 12]
    q, k, v = (torch.randn(18, 2, 16, dtype=F64) for _ in range(3))
    for window in (None, 3):
        a = masked_attention(q, k, v, cu_of(lengths), window=window, num_prefix=1)
        b = masked_attention(q, k, v, cu_of(lengths, torch.int64), window=window, num_prefix=1)
        assert torch.equal(a, b)


def test_the_public_name_stays_the_function_after_the_module_is_imported():
    import importlib

    import invnext.ops as ops

    ops.load_all()
    importlib.import_module("invnext.ops.varlen")
    assert callable(ops.varlen_attention) and ops.varlen_attention.__name__ == "varlen_attention"
    assert "varlen_attention" in dir(ops)


# --------------------------------------------------------------------------- RoPE from tables


def _positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)


def llama_tables(positions: torch.Tensor, head_dim: int, theta: float = 500.0):
    """transformers' Llama cos/sin rows for these positions, ``[total, head_dim]`` (float64)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=F64), positions[None])
    return cos[0], sin[0]


def test_rotate_half_tables_are_llamas_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from invnext.ops.rope import apply_rope_tables

    S, H, D = 11, 3, 16
    cos, sin = llama_tables(torch.arange(S), D)
    q, k = torch.randn(S, H, D, dtype=F64), torch.randn(S, H, D, dtype=F64)
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(apply_rope_tables(q, cos, sin, "rotate_half"), want_q[0].transpose(0, 1),
                               rtol=0, atol=1e-14)
    torch.testing.assert_close(apply_rope_tables(k, cos, sin), want_k[0].transpose(0, 1), rtol=0, atol=1e-14)


def test_interleaved_tables_are_coheres_apply_rotary_pos_emb():
    from transformers import CohereConfig
    from transformers.models.cohere.modeling_cohere import CohereRotaryEmbedding, apply_rotary_pos_emb

    from invnext.ops.rope import apply_rope_tables

    S, H, D = 9, 2, 16
    cfg = CohereConfig(hidden_size=H * D, num_attention_heads=H, num_key_value_heads=H)
    cos, sin = CohereRotaryEmbedding(cfg)(torch.zeros(1, dtype=F64), torch.arange(S)[None])
    q, k = torch.randn(S, H, D, dtype=F64), torch.randn(S, H, D, dtype=F64)
    want_q, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    got = apply_rope_tables(q, cos[0], sin[0], "interleaved")
    # (Cohere's function rotates in float32 whatever the input dtype)
    torch.testing.assert_close(got, want_q[0].transpose(0, 1), rtol=0, atol=1e-6)
    assert not torch.allclose(got, apply_rope_tables(q, cos[0], sin[0], "rotate_half"), atol=1e-2)


def test_partial_interleaved_tables_are_gptjs_rotary_dim():
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb, create_sinusoidal_positions

    from invnext.ops.rope import apply_rope_tables

    S, H, D, R = 10, 2, 32, 12
    sincos = create_sinusoidal_positions(64, R).double()[torch.arange(S)]
    sin, cos = sincos[:, : R // 2], sincos[:, R // 2 :]
    q = torch.randn(S, H, D, dtype=F64)
    rot = apply_rotary_pos_emb(q[None, :, :, :R], sin[None], cos[None])[0]  # GPT-J: [B, S, H, rotary_dim]
    want = torch.cat([rot, q[..., R:]], dim=-1)
    got = apply_rope_tables(q, cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1), "interleaved")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("pairing", ["rotate_half", "interleaved"])
def test_rope_is_attention_over_rotated_q_and_k(pairing):
    """Per-sample positions (restarting at 0), keys at other positions than the queries (rope_k),
    GQA, causal: the op with tables equals the op on q, k rotated beforehand; the tables take no
    gradient, q and k get theirs through the rotation."""
    from invnext.ops.rope import apply_rope_tables

    lq, lk = [5, 9, 1], [7, 9, 4]
    D = 16
    cos_q, sin_q = llama_tables(_positions(lq) + 3, D)
    cos_k, sin_k = llama_tables(_positions(lk), D)
    if pairing == "interleaved":  # same angles, interleaved layout
        cos_q, sin_q, cos_k, sin_k = (t[:, : D // 2].repeat_interleave(2, -1) for t in (cos_q, sin_q, cos_k, sin_k))
    q = torch.randn(sum(lq), 4, D, dtype=F64, requires_grad=True)
    k, v = (torch.randn(sum(lk), 2, D, dtype=F64, requires_grad=True) for _ in range(2))
    tables = [t.clone().requires_grad_(True) for t in (cos_q, sin_q)]
    args = (cu_of(lq), cu_of(lk))
    got = varlen_attention(q, k, v, *args, causal=True, rope=tuple(tables), rope_k=(cos_k, sin_k), rope_pairing=pairing)
    want = varlen_attention(apply_rope_tables(q, cos_q, sin_q, pairing), apply_rope_tables(k, cos_k, sin_k, pairing),
                            v, *args, causal=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    dout = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (q, k, v), dout)
    g_want = torch.autograd.grad(want, (q, k, v), dout)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert all(t.grad is None for t in tables)
    # self-attention: one pair of tables rotates q and k alike
    x = torch.randn(sum(lq), 2, D, dtype=F64)
    a = varlen_attention(x, x, x, cu_of(lq), cu_of(lq), rope=(cos_q, sin_q), rope_pairing=pairing)
    b = varlen_attention(x, x, x, cu_of(lq), cu_of(lq), rope=(cos_q, sin_q), rope_k=(cos_q, sin_q), rope_pairing=pairing)
    assert torch.equal(a, b)


def _rope_good():
    a = _good()
    cos, sin = llama_tables(_positions([3, 5]), 16)
    a["rope"] = (cos, sin)
    a["rope_k"] = tuple(t[:6] for t in (cos, sin))
    return a


ROPE_BAD = [
    ("rope not pair", lambda a: a.update(rope=a["rope"][0]), TypeError, "rope must be a pair (cos, sin)"),
    ("rope rows", lambda a: a.update(rope=tuple(t[:7] for t in a["rope"])), ValueError,
     "rope tables have 7 rows but the tokens they rotate number 8"),
    ("rope odd", lambda a: a.update(rope=tuple(t[:, :7] for t in a["rope"])), ValueError, "width R=7 must be even"),
    ("rope wide", lambda a: a.update(rope=tuple(torch.cat([t, t], 1) for t in a["rope"])), ValueError,
     "width R=32 must be even and in [2, head dim 16]"),
    ("rope dtype", lambda a: a.update(rope=(a["rope"][0].long(), a["rope"][1])), TypeError, "rope cos must have dtype"),
    ("rope shapes", lambda a: a.update(rope=(a["rope"][0], a["rope"][1][:, :8])), ValueError,
     "rope cos has shape [8, 16] but sin has [8, 8]"),
    ("rope_k needed", lambda a: a.update(rope_k=None), ValueError, "needs total_k == total_q"),
    ("rope_k width", lambda a: a.update(rope_k=tuple(t[:, :8] for t in a["rope_k"])), ValueError,
     "rope_k's width R=8 differs from rope's R=16"),
    ("rope_k alone", lambda a: a.update(rope=None), ValueError, "rope_k was given without rope"),
    ("pairing", lambda a: a.update(rope_pairing="neox"), ValueError, "rope_pairing must be one of"),
]


@pytest.mark.parametrize("name,edit,exc,msg", ROPE_BAD, ids=[b[0] for b in ROPE_BAD])
def test_bad_rope_raises(name, edit, exc, msg):
    args = _rope_good()
    varlen_attention(**args)
    edit(args)
    with pytest.raises(exc, match="varlen_attention: .*" + re.escape(msg)):
        varlen_attention(**args)


@pytest.mark.parametrize(
    "scale, error, match",
    [(True, TypeError, "softmax_scale must be a float"), (float("nan"), ValueError, "softmax_scale must be finite and > 0"), (0.0, ValueError, "softmax_scale must be finite and > 0")],
)
def test_softmax_scale_is_checked_alike_by_both_attention_ops(scale, error, match):
    """masked_attention and varlen_attention share one softmax_scale check; None means 1/sqrt(D)."""
    q = torch.randn(5, 2, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    with pytest.raises(error, match=f"varlen_attention: {match}"):
        varlen_attention(q, q, q, cu, cu, softmax_scale=scale)
    with pytest.raises(error, match=f"masked_attention: {match}"):
        masked_attention(q, q, q, cu, 3, softmax_scale=scale)
    default = varlen_attention(q, q, q, cu, cu)
    torch.testing.assert_close(default, varlen_attention(q, q, q, cu, cu, softmax_scale=16**-0.5), rtol=0, atol=0)
