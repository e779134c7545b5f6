"""invnext's attention registered with transformers ('invnext') equals the models' own attention.

Random-weight models from tiny configs (no downloads): VideoMAE (pretraining), V-JEPA 2 (encoder,
predictor and the classifier's cross-attention pooler), ViT and SigLIP vision towers. Equal-length
batches: outputs and every parameter gradient to 1e-5 (fp32) of the unpatched model. Packed
ragged batches through transformers' varlen keywords (ViT's attention forwards them) equal the
unpatched encoder run one sample at a time. The attention function alone: cross-attention with
grouped heads, causal, sliding windows and 2-D padding masks against transformers' SDPA function.
Ragged masks through whole models: tests/test_integrations_masked.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from integration_checks import (  # noqa: E402
    assert_close,
    assert_same_grads,
    assert_same_grads_fp32,
    weights_like,
)

from invnext.integrations import _packing  # noqa: E402
from invnext.integrations import transformers as inx_hf  # noqa: E402

VIDEO = (2, 4, 3, 32, 32)  # B, T, 3, H, W: 2 x 4 x 4 = 32 tokens with tubelet 2, patch 8


@pytest.fixture(scope="module", autouse=True)
def _registered():
    inx_hf.register()


def _videomae():
    cfg = transformers.VideoMAEConfig(
        image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=96, decoder_hidden_size=32, decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2, decoder_intermediate_size=64, use_mean_pooling=False,
    )  # fmt: skip
    return transformers.VideoMAEForPreTraining(cfg)


def _vjepa2_config():
    return transformers.VJEPA2Config(
        crop_size=32, patch_size=8, frames_per_clip=4, tubelet_size=2, hidden_size=96, num_hidden_layers=2,
        num_attention_heads=2, mlp_ratio=2.0, pred_hidden_size=64, pred_num_hidden_layers=1,
        pred_num_attention_heads=2, pred_num_mask_tokens=2, num_pooler_layers=1,
    )  # fmt: skip


def _patched_pair(build, seed=0):
    torch.manual_seed(seed)
    ref = build().eval()
    pat = copy.deepcopy(ref)
    pat.set_attn_implementation("invnext")
    return ref, pat


def _count_calls(monkeypatch):
    calls = []
    real = inx_hf.attend

    def counting(*args, **kwargs):
        calls.append(kwargs.get("layout"))
        return real(*args, **kwargs)

    monkeypatch.setattr(inx_hf, "attend", counting)
    return calls


def _check(ref, pat, run, what, monkeypatch):
    """fp32: outputs to 1e-5 relative, gradients at the model's scale; float64 copies: every
    parameter's gradient to 1e-5 relative (integration_checks.py says why)."""
    calls = _count_calls(monkeypatch)
    want, got = run(ref), run(pat)
    assert calls, f"{what}: the invnext attention function was not called"
    assert_close(got, want, what)
    (want * weights_like(want, 1)).sum().backward()
    (got * weights_like(got, 1)).sum().backward()
    assert_same_grads_fp32(pat, ref, what)
    ref64, pat64 = copy.deepcopy(ref).double(), copy.deepcopy(pat).double()
    ref64.zero_grad(), pat64.zero_grad()
    with _inputs_as(torch.float64):
        want, got = run(ref64), run(pat64)
    (want * weights_like(want, 1)).sum().backward()
    (got * weights_like(got, 1)).sum().backward()
    assert_same_grads(pat64, ref64, what + " (float64)")


_DTYPE = [torch.float32]


class _inputs_as:
    """Inside: float inputs made by _input() have this dtype."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        _DTYPE.append(self.dtype)

    def __exit__(self, *exc):
        _DTYPE.pop()


def _input(t: torch.Tensor) -> torch.Tensor:
    return t.to(_DTYPE[-1])


def test_videomae_pretraining_equals_its_own_attention(monkeypatch):
    ref, pat = _patched_pair(_videomae)
    video = torch.randn(VIDEO)
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[0, ::2] = True
    mask[1, 1::2] = True  # HF's VideoMAE needs equal counts per sample
    _check(ref, pat, lambda m: m(_input(video), bool_masked_pos=mask).logits, "VideoMAEForPreTraining", monkeypatch)


def test_vjepa2_encoder_and_predictor_equal_its_own_attention(monkeypatch):
    ref, pat = _patched_pair(lambda: transformers.VJEPA2Model(_vjepa2_config()))
    video = torch.randn(VIDEO)
    context = [torch.tensor([[0, 3, 5, 8, 13, 21, 30, 31]] * 2)]
    target = [torch.tensor([[1, 2, 4, 6], [7, 9, 10, 11]])]

    def run(m):
        out = m(_input(video), context_mask=context, target_mask=target)
        return torch.cat([out.last_hidden_state.flatten(), out.predictor_output.last_hidden_state.flatten()])

    _check(ref, pat, run, "VJEPA2Model", monkeypatch)


def test_vjepa2_attentive_pooler_cross_attention(monkeypatch):
    cfg = _vjepa2_config()
    cfg.num_labels = 3
    ref, pat = _patched_pair(lambda: transformers.VJEPA2ForVideoClassification(cfg))
    video = torch.randn(VIDEO)
    _check(ref, pat, lambda m: m(_input(video)).logits, "VJEPA2ForVideoClassification", monkeypatch)


@pytest.mark.parametrize("family", ["vit", "siglip"])
def test_vision_towers_equal_their_own_attention(family, monkeypatch):
    if family == "vit":
        cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=96)  # fmt: skip
        build = lambda: transformers.ViTModel(cfg)  # noqa: E731
    else:
        cfg = transformers.SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=96)  # fmt: skip
        build = lambda: transformers.SiglipVisionModel(cfg)  # noqa: E731
    ref, pat = _patched_pair(build)
    images = torch.randn(3, 3, 32, 32)
    def run(m):
        out = m(_input(images))
        return torch.cat([out.last_hidden_state.flatten(), out.pooler_output.flatten()])

    _check(ref, pat, run, family, monkeypatch)


def _vit_encoder(model, x, **kwargs):
    for layer in model.layers:
        x = layer(x, None, **kwargs)
        x = x[0] if isinstance(x, tuple) else x
    return model.layernorm(x)


def test_vit_packed_ragged_batch_through_the_varlen_keywords(monkeypatch):
    # ViT's attention forwards its keywords: a packed batch of samples of 17, 9 and 4 tokens
    # (class token + a ragged subset of patches) equals each sample through the unpatched layers.
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=96)  # fmt: skip
    ref, pat = _patched_pair(lambda: transformers.ViTModel(cfg))
    emb = ref.embeddings(torch.randn(3, 3, 32, 32)).detach()  # [3, 17, 64]
    samples = [emb[0], emb[1, :9], emb[2, [0, 5, 9, 16]]]
    cu = torch.tensor([0, 17, 26, 30], dtype=torch.int32)
    calls = _count_calls(monkeypatch)
    x = torch.cat(samples)[None].requires_grad_(True)
    got = _vit_encoder(pat, x, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=17, max_length_k=17)[0]
    assert calls and calls[0] is not None, "the varlen keywords did not reach the attention function"
    per_sample = [s[None].clone().requires_grad_(True) for s in samples]
    want = torch.cat([_vit_encoder(ref, s)[0] for s in per_sample])
    assert_close(got, want, "packed ViT encoder")
    w = weights_like(want, 2)
    (got * w).sum().backward()
    (want * w).sum().backward()
    assert_close(x.grad[0], torch.cat([s.grad[0] for s in per_sample]), "packed ViT: input gradient")
    assert_same_grads_fp32(pat, ref, "packed ViT")


# --------------------------------------------------------------------------- the function alone


class _Module(torch.nn.Module):
    def __init__(self, is_causal=False, groups=1):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = groups


def _sdpa(module, q, k, v, mask=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0]


@pytest.mark.parametrize("case", ["cross_gqa", "causal", "sliding_window", "mqa_causal"])
def test_function_matches_transformers_sdpa(case):
    fn = inx_hf.make_attention_function()
    torch.manual_seed(3)
    Hq, Hk, L, S, D = {"cross_gqa": (4, 2, 5, 9, 16), "causal": (2, 2, 7, 7, 16),
                       "sliding_window": (2, 2, 9, 9, 16), "mqa_causal": (4, 1, 6, 6, 32)}[case]  # fmt: skip
    q = torch.randn(2, Hq, L, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, Hk, S, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, Hk, S, D, dtype=torch.float64, requires_grad=True)
    module = _Module(is_causal=case in ("causal", "mqa_causal"), groups=Hq // Hk)
    if case == "sliding_window":
        w = 3  # transformers' flash path: window (w - 1, w - 1), symmetric
        i = torch.arange(L)
        band = (i[:, None] - i[None, :]).abs() <= w - 1
        want = _sdpa(module, q, k, v, band[None, None], scaling=0.3)
        got = fn(module, q, k, v, None, scaling=0.3, sliding_window=w)[0]
    else:
        want = _sdpa(module, q, k, v, scaling=0.3, is_causal=module.is_causal)
        got = fn(module, q, k, v, None, scaling=0.3)[0]
    assert_close(got, want, case)
    gw = torch.autograd.grad((want * weights_like(want, 4)).sum(), (q, k, v))
    gg = torch.autograd.grad((got * weights_like(got, 4)).sum(), (q, k, v))
    for name, a, b in zip("qkv", gg, gw):
        assert_close(a, b, f"{case}: d{name}")


def test_function_unpads_a_2d_padding_mask():
    fn = inx_hf.make_attention_function()
    q, k, v = (torch.randn(3, 2, 6, 16, dtype=torch.float64) for _ in range(3))
    keep = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    got = fn(_Module(), q, k, v, keep)[0]  # [B, L, H, D]
    for b in range(3):
        rows = keep[b].bool()
        want = _sdpa(_Module(), q[b : b + 1, :, rows], k[b : b + 1, :, rows], v[b : b + 1, :, rows])[0]
        assert_close(got[b, rows], want, f"sample {b}")
        assert not got[b, ~rows].any()


def test_packed_block_gives_the_layout_to_keywordless_models():
    fn = inx_hf.make_attention_function()
    q = torch.randn(1, 2, 10, 16, dtype=torch.float64)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with _packing.packed(cu, 6):
        got = fn(_Module(), q, q, q, None)[0][0]
    for lo, hi in ((0, 4), (4, 10)):
        assert_close(got[lo:hi], _sdpa(_Module(), q[:, :, lo:hi], q[:, :, lo:hi], q[:, :, lo:hi])[0], "packed block")
    assert _packing.current_packing() is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dropout": 0.1}, "attention dropout"),
        ({"softcap": 30.0}, "softcap is not supported"),
        ({"s_aux": torch.zeros(2)}, "attention sinks"),
        ({"attention_mask": torch.ones(1, 1, 4, 4)}, "only 2-D padding masks"),
    ],
)
def test_function_refuses_what_it_does_not_support(kwargs, match):
    fn = inx_hf.make_attention_function()
    module = _Module().train()
    q = torch.randn(1, 2, 4, 16)
    mask = kwargs.pop("attention_mask", None)
    with pytest.raises(NotImplementedError, match=match):
        fn(module, q, q, q, mask, **kwargs)


def test_registration_names_invnext_for_attention_and_masks():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert inx_hf.register() == "invnext" and inx_hf.register() == "invnext"
    assert "invnext" in AttentionInterface._global_mapping and "invnext" in AttentionMaskInterface._global_mapping
    fn = AttentionInterface._global_mapping["invnext"]
    assert fn.backend == "auto" and fn.__name__ == "invnext_attention_forward"
    inx_hf.register("invnext_torch", backend="torch")
    assert AttentionInterface._global_mapping["invnext_torch"].backend == "torch"
