"""invnext.integrations.timm.patch routes timm's ViT Attention through invnext: equal-length
batches equal the unpatched model (fp32 outputs 1e-5; gradients fp32 at the model's scale and
float64 per tensor, see integration_checks.py), with class and register tokens as the prefix;
the patch is restorable and touches nothing else. Ragged masks: tests/test_integrations_masked.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

from integration_checks import assert_close, assert_same_grads, assert_same_grads_fp32, weights_like
from test_integrations_masked import TIMM_MISSING

timm = pytest.importorskip("timm", reason=TIMM_MISSING)

from invnext.integrations import _packing  # noqa: E402
from invnext.integrations import timm as inx_timm  # noqa: E402


def _vit(**kwargs):
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2, num_classes=5)
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kwargs}).eval()


@pytest.mark.parametrize("tokens", [{"class_token": True}, {"reg_tokens": 4}, {"class_token": False, "global_pool": "avg"}])
def test_patched_vit_equals_its_own_attention(tokens, monkeypatch):
    ref = _vit(**tokens)
    pat = copy.deepcopy(ref)
    images = torch.randn(3, 3, 32, 32)
    calls = []
    real = inx_timm.attend
    monkeypatch.setattr(inx_timm, "attend", lambda *a, **k: calls.append(k["num_prefix"]) or real(*a, **k))
    with inx_timm.patch(pat) as handle:
        assert len(handle.modules) == 2 and handle.num_prefix == ref.num_prefix_tokens
        got = pat(images)
        want = ref(images)
        assert calls == [ref.num_prefix_tokens] * 2
        assert_close(got, want, f"timm ViT {tokens}")
        w = weights_like(want, 5)
        (got * w).sum().backward()
        (want * w).sum().backward()
        assert_same_grads_fp32(pat, ref, f"timm ViT {tokens}")
        ref64, pat64 = copy.deepcopy(ref).double(), copy.deepcopy(pat).double()  # the copy stays patched
        (pat64(images.double()) * w.double()).sum().backward()
        (ref64(images.double()) * w.double()).sum().backward()
        assert_same_grads(pat64, ref64, f"timm ViT {tokens} (float64)")
    assert "forward" not in pat.blocks[0].attn.__dict__  # restored


def test_packed_block_runs_each_sample_alone():
    model = _vit(reg_tokens=2)
    x = model.norm_pre(model._pos_embed(model.patch_embed(torch.randn(2, 3, 32, 32)))).detach()  # [2, 19, 64]
    samples = [x[0], x[1, :7]]
    cu = torch.tensor([0, 19, 26], dtype=torch.int32)
    want = torch.cat([model.blocks(s[None])[0] for s in samples])
    with inx_timm.patch(model), _packing.packed(cu, 19, num_prefix=3):
        got = model.blocks(torch.cat(samples)[None])[0]
    assert_close(got, want, "packed timm blocks")


def test_restore_puts_back_an_instance_forward_and_leaves_the_class_alone():
    from timm.layers import Attention

    model = _vit()
    own = model.blocks[1].attn.forward
    model.blocks[1].attn.forward = own  # an instance attribute set before patching
    class_forward = Attention.forward
    handle = inx_timm.patch(model, backend="torch")
    assert model.blocks[0].attn._invnext_backend == "torch"
    assert Attention.forward is class_forward
    handle.restore()
    assert model.blocks[1].attn.__dict__["forward"] is own and "forward" not in model.blocks[0].attn.__dict__
    assert not hasattr(model.blocks[0].attn, "_invnext_backend")
    handle.restore()  # twice is harmless


def test_unsupported_calls_and_models_are_named():
    model = _vit()
    with inx_timm.patch(model):
        with pytest.raises(NotImplementedError, match="attn_mask is not supported"):
            model.blocks[0].attn(torch.randn(1, 17, 64), attn_mask=torch.ones(17, 17, dtype=torch.bool))
    dropout = _vit(attn_drop_rate=0.1).train()
    with inx_timm.patch(dropout), pytest.raises(NotImplementedError, match="attention dropout"):
        dropout(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="Linear has no timm.layers.Attention module"):
        inx_timm.patch(torch.nn.Linear(2, 2))
