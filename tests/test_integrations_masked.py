"""Masked pretraining on ragged per-sample masks: invnext.integrations.masked.encode_visible packs
the visible tokens of a batch whose samples hide different numbers of tokens (tube_mask with one
ratio per sample), runs the patched model once and equals running the unpatched model on one clip
at a time (VideoMAE: its own bool_masked_pos; V-JEPA 2 and timm ViT: the same layers on that clip's
visible tokens), forward (fp32, 1e-5) and every parameter gradient (float64, 1e-5; see
integration_checks.py).
"""
from __future__ import annotations

import copy

import pytest
import torch

from integration_checks import assert_close, assert_same_grads, weights_like

from invnext import ops
from invnext.integrations import masked

RATIOS = [0.5, 0.25, 0.75]
TIMM_MISSING = "timm is not importable here (scripts/setup.sh installs it and its torchvision into .venv/test-site)"


def _hf_models(family: str):
    transformers = pytest.importorskip("transformers")
    from invnext.integrations import transformers as inx_hf

    inx_hf.register()
    if family == "videomae":
        cfg = transformers.VideoMAEConfig(
            image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=96, use_mean_pooling=False,
        )  # fmt: skip
        ref = transformers.VideoMAEModel(cfg)
    else:
        cfg = transformers.VJEPA2Config(
            crop_size=32, patch_size=8, frames_per_clip=4, tubelet_size=2, hidden_size=96, num_hidden_layers=2,
            num_attention_heads=2, mlp_ratio=2.0, pred_hidden_size=64, pred_num_hidden_layers=1,
            pred_num_attention_heads=2, pred_num_mask_tokens=2,
        )  # fmt: skip
        ref = transformers.VJEPA2Model(cfg)
    ref = ref.eval()
    pat = copy.deepcopy(ref)
    pat.set_attn_implementation("invnext")
    return ref, pat


def _one_clip(family: str, model, inputs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The unpatched model on one clip's visible tokens: [K_b (+ P), C]."""
    ids = (~hidden[0]).nonzero().squeeze(1)
    if family == "videomae":
        return model(inputs, bool_masked_pos=hidden).last_hidden_state[0]
    if family == "vjepa2":
        x = model.encoder.embeddings(inputs)[:, ids]
        for layer in model.encoder.layer:
            x = layer(x, position_mask=ids[None])[0]
        return model.encoder.layernorm(x)[0]
    P = model.num_prefix_tokens
    x = model._pos_embed(model.patch_embed(inputs))
    x = model.norm_pre(torch.cat([x[:, :P], x[:, P:][:, ids]], dim=1))
    return model.norm(model.blocks(x))[0]


def _models(family: str):
    if family != "timm":
        return (*_hf_models(family), None)
    timm = pytest.importorskip("timm", reason=TIMM_MISSING)
    from invnext.integrations import timm as inx_timm

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                            embed_dim=64, num_heads=2, reg_tokens=2, num_classes=0).eval()  # fmt: skip
    pat = copy.deepcopy(ref)
    return ref, pat, inx_timm.patch(pat)


@pytest.mark.parametrize("family", ["videomae", "vjepa2", "timm"])
def test_ragged_masks_equal_one_clip_at_a_time(family):
    torch.manual_seed(1)
    ref, pat, handle = _models(family)
    if family == "timm":
        inputs, grid = torch.randn(3, 3, 32, 32), (1, 4, 4)
    else:
        inputs, grid = torch.randn(3, 4, 3, 32, 32), (2, 4, 4)
    B, N = 3, grid[0] * grid[1] * grid[2]
    hidden = ops.tube_mask(B, grid, RATIOS, seed=7)
    assert len(set((~hidden).sum(1).tolist())) == 3  # three different visible counts
    P = 3 if family == "timm" else 0

    out = masked.encode_visible(pat, inputs, hidden)
    want = [_one_clip(family, ref, inputs[b : b + 1], hidden[b : b + 1]) for b in range(B)]
    assert out.cu_seqlens.tolist() == [0, *torch.tensor([w.shape[0] for w in want]).cumsum(0).tolist()]
    assert_close(out.tokens, torch.cat(want), f"{family}: packed outputs")
    grid_out = out.scatter()
    for b in range(B):
        vis = (~hidden[b]).nonzero().squeeze(1)
        assert_close(grid_out[b, vis], want[b][P:], f"{family}: scattered sample {b}")
        assert not grid_out[b, hidden[b]].any()
    if P:
        assert_close(out.prefix(), torch.stack([w[:P] for w in want]), f"{family}: prefix outputs")

    # Gradients in float64 (integration_checks.py says why), through the scattered grid.
    ref64, pat64 = copy.deepcopy(ref).double(), copy.deepcopy(pat).double()
    x64 = inputs.double()
    out64 = masked.encode_visible(pat64, x64, hidden).scatter()
    w = weights_like(out64, 3)
    (out64 * w).sum().backward()
    loss = 0
    for b in range(B):
        vis = (~hidden[b]).nonzero().squeeze(1)
        loss = loss + (_one_clip(family, ref64, x64[b : b + 1], hidden[b : b + 1])[P:] * w[b, vis]).sum()
    loss.backward()
    assert_same_grads(pat64, ref64, f"{family}: ragged masks (float64)")
    if handle is not None:
        handle.restore()


def test_keep_ids_and_num_visible_give_the_same_packing():
    ref, pat, _ = _models("videomae")
    video = torch.randn(2, 4, 3, 32, 32)
    hidden = ops.tube_mask(2, (2, 4, 4), [0.5, 0.25], seed=3)
    a = masked.encode_visible(pat, video, hidden, num_visible=(~hidden).sum(1).tolist())
    keep = [(~hidden[b]).nonzero().squeeze(1) for b in range(2)]
    b = masked.encode_visible(pat, video, keep_ids=keep)
    assert torch.equal(a.index, b.index) and torch.equal(a.cu_seqlens, b.cu_seqlens)
    assert_close(b.tokens, a.tokens, "keep_ids vs hidden")
    assert a.prefix() is None


def test_unknown_model_is_named():
    with pytest.raises(TypeError, match="no built-in split for Linear; build a ModelParts"):
        masked.encode_visible(torch.nn.Linear(2, 2), torch.randn(1, 2), torch.zeros(1, 1, dtype=torch.bool))


def test_a_model_whose_attention_is_not_invnexts_is_refused():
    # Packed samples through the model's own attention would attend to each other.
    ref, _, _ = _models("videomae")
    video = torch.randn(1, 4, 3, 32, 32)
    with pytest.raises(ValueError, match="runs attn_implementation='(sdpa|eager)'; packed samples would attend"):
        masked.encode_visible(ref, video, torch.zeros(1, 32, dtype=torch.bool))


def test_an_unpatched_timm_model_is_refused():
    timm = pytest.importorskip("timm", reason=TIMM_MISSING)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    with pytest.raises(ValueError, match="is not patched; packed samples would attend to each other"):
        masked.encode_visible(vit, torch.randn(1, 3, 32, 32), torch.zeros(1, 16, dtype=torch.bool))
