"""Offline loading of local transformers checkpoints: ModernBERT -> predictor layers, SigLIP/SigLIP2 -> teacher.

Tiny models are built with random weights, saved with ``save_pretrained`` into tmp_path, and read
back with ``HF_HUB_OFFLINE=1`` and every socket connection refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import socket

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from invnext.config import DecoderConfig, EncoderConfig, PredictorConfig, Stage1Config, TeacherConfig  # noqa: E402
from invnext.models import Predictor, SiglipTeacher, Stage1Model, build_teacher  # noqa: E402
from invnext.models.layers import l2norm, uniform_cu_seqlens  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _perturb_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights start at 1; move them so a dropped or misplaced norm changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------- ModernBERT


def _modernbert(tmp_path, masked_lm: bool = False):
    """A 6-layer ModernBERT (width 64, 4 heads, GeGLU 96, window 8, global every 3) saved to tmp_path."""
    cfg = transformers.ModernBertConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        num_attention_heads=4,
        local_attention=8,
        global_attn_every_n_layers=3,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        cls_token_id=1,
        sep_token_id=2,
    )
    torch.manual_seed(0)
    model = (transformers.ModernBertForMaskedLM if masked_lm else transformers.ModernBertModel)(cfg)
    _perturb_norms(model, 1)
    folder = tmp_path / ("mlm" if masked_lm else "modernbert")
    model.save_pretrained(folder)
    return folder


def _predictor_cfg(folder, depth: int, **kw) -> PredictorConfig:
    base = dict(
        width=64,
        depth=depth,
        heads=4,
        mlp_hidden=96,
        first_layer_id=6 - depth,
        global_every=3,
        local_window=8,
        global_rope_theta=160000.0,
        local_rope_theta=10000.0,
        init_from=str(folder),
    )
    return PredictorConfig(**{**base, **kw})


# transformers builds ModernBERT's RoPE cos/sin tables in float32 even in a float64 model, which
# leaves ~1e-10 differences on O(1) outputs; a wrong theta, window or weight is off by ~1e-1.
TOL = dict(rtol=1e-8, atol=1e-8)


def _hf_states(folder, x: torch.Tensor):
    hf = transformers.ModernBertModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    hf = hf.double().eval()
    with torch.no_grad():
        return hf(inputs_embeds=x, output_hidden_states=True)


def _run_layer(layer, h: torch.Tensor) -> torch.Tensor:
    """One predictor layer on ``h[B, N, C]`` in raster order (1D RoPE positions 0..N-1)."""
    B, N, C = h.shape
    n = torch.arange(N).repeat(B)
    coords = F.pad(n[:, None], (2, 0)).to(torch.int32)
    return layer(h.reshape(B * N, C), uniform_cu_seqlens(B, N, h.device), N, coords, None).view(B, N, C)


def test_predictor_loads_last_modernbert_layers_and_matches_them(tmp_path, capsys):
    folder = _modernbert(tmp_path)
    grid = (3, 1, 7)  # N = 21 tokens: longer than the local window (|i - j| <= 4)
    pred = Predictor(_predictor_cfg(folder, 3), in_dim=16, grid=grid)
    printed = capsys.readouterr().out
    assert "ModernBERT layers 3..5 of 6" in printed
    for src, dst in (
        ("layers.3.attn_norm.weight", "layers.0.attn_norm.weight"),
        ("layers.4.attn.Wqkv.weight", "layers.1.attn.Wqkv.weight"),
        ("layers.5.mlp.Wo.weight", "layers.2.mlp.Wo.weight"),
        ("final_norm.weight", "final_norm.weight"),
    ):
        assert any(line.split() == [src, "->", dst] for line in printed.splitlines()), (src, dst)
    assert [layer.is_global for layer in pred.layers] == [True, False, False]  # ModernBERT layers 3, 4, 5

    pred = pred.double().eval()
    x = torch.randn(2, 21, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = _hf_states(folder, x)
    hs = out.hidden_states  # [0] = embedding norm, [j + 1] = output of layer j (the last one final-normed)
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(_run_layer(pred.layers[i], hs[3 + i]), hs[4 + i], **TOL)
        torch.testing.assert_close(pred.final_norm(_run_layer(pred.layers[2], hs[5])), out.last_hidden_state, **TOL)
        torch.testing.assert_close(pred.forward_grid(hs[3], grid), out.last_hidden_state, **TOL)


def test_predictor_from_all_layers_of_a_masked_lm_file(tmp_path, capsys):
    # All 6 layers: layer 0 has no attn_norm (Identity) on both sides; a ForMaskedLM save prefixes "model.".
    folder = _modernbert(tmp_path, masked_lm=True)
    pred = Predictor(_predictor_cfg(folder / "model.safetensors", 6), in_dim=16, grid=(1, 4, 5))
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["model.layers.0.attn.Wqkv.weight", "->", "layers.0.attn.Wqkv.weight"] in lines
    assert ["model.final_norm.weight", "->", "final_norm.weight"] in lines
    mapping = pred.init_from_modernbert(folder, verbose=False)
    assert (
        "layers.0.attn_norm.weight" not in mapping
        and mapping["layers.1.attn_norm.weight"] == "layers.1.attn_norm.weight"
    )
    assert len(mapping) == 6 * 6 - 1 + 1
    pred = pred.double().eval()
    x = torch.randn(1, 20, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = _hf_states(folder, x)
    with torch.no_grad():
        torch.testing.assert_close(pred.forward_grid(out.hidden_states[0], (1, 4, 5)), out.last_hidden_state, **TOL)


def test_predictor_init_rejects_what_does_not_fit(tmp_path, capsys):
    folder = _modernbert(tmp_path)
    cases = [
        (dict(first_layer_id=0), "first_layer_id=3"),
        (dict(local_window=16), "local_attention=8 but predictor.local_window=16"),
        (dict(local_rope_theta=5000.0), "local RoPE theta=10000.0"),
        (dict(global_every=2), "global_every=2"),
        (dict(mlp_hidden=64), "intermediate_size=96"),
        (dict(depth=7, first_layer_id=0), "has 6 layers"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            Predictor(_predictor_cfg(folder, **{"depth": 3, **changes}), in_dim=16, grid=(1, 1, 4))
    with pytest.raises(ValueError, match="no such file"):
        Predictor(_predictor_cfg(tmp_path / "missing", 3), in_dim=16, grid=(1, 1, 4))
    pickled = tmp_path / "pytorch_model.bin"
    pickled.write_bytes(b"\x80\x02")
    with pytest.raises(ValueError, match="pickled weights are not loaded"):
        Predictor(_predictor_cfg(pickled, 3), in_dim=16, grid=(1, 1, 4))
    # A lone safetensors file: no config.json, so only shapes are checked (and said so).
    lone = tmp_path / "lone" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copy(folder / "model.safetensors", lone)
    capsys.readouterr()
    Predictor(_predictor_cfg(lone, 3), in_dim=16, grid=(1, 1, 4))
    assert "no config.json" in capsys.readouterr().out


# --------------------------------------------------------------------------- SigLIP / SigLIP2

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, patch_size=8)
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def _save_tower(tmp_path, kind: str):
    """kind: "siglip" (vision tower), "siglip-full" (vision + text model) or "siglip2" (naflex tower)."""
    torch.manual_seed(0)
    if kind == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION, image_size=32))
    elif kind == "siglip-full":
        text = dict(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        model = transformers.SiglipModel(
            transformers.SiglipConfig(vision_config={**VISION, "image_size": 32}, text_config=text)
        )
    else:
        model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**VISION, num_patches=16))
    _perturb_norms(model, 5)
    head = model.vision_model.head if kind == "siglip-full" else model.head
    with torch.no_grad():  # a random init leaves the probe's attention near uniform; sharpen it
        head.attention.in_proj_weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(6))
    folder = tmp_path / kind
    model.save_pretrained(folder)
    if kind == "siglip":
        # Non-default statistics, to show that the saved preprocessor config is the one used.
        transformers.SiglipImageProcessor(image_mean=IMAGENET[0], image_std=IMAGENET[1]).save_pretrained(folder)
    return folder


def _processor_patches(frames: torch.Tensor, p: int) -> torch.Tensor:
    """``[F, C, H, W] -> [F, S, p*p*C]`` as SigLIP2's image processor patchifies (its own function when
    importable: the module moved between transformers versions; else F.unfold in its (y, x, c) order)."""
    try:
        from transformers.models.siglip2.image_processing_pil_siglip2 import convert_image_to_patches

        return torch.stack([torch.from_numpy(convert_image_to_patches(f.numpy(), p)) for f in frames])
    except ImportError:
        pass
    try:
        from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

        return torch.stack([convert_image_to_patches(f, p) for f in frames])
    except ImportError:
        cols = F.unfold(frames, kernel_size=p, stride=p)  # [F, C*p*p, S], vector order (c, y, x)
        Fn, _, S = cols.shape
        return cols.view(Fn, -1, p, p, S).permute(0, 4, 2, 3, 1).reshape(Fn, S, -1)


def _reference(teacher: SiglipTeacher, frames: torch.Tensor):
    """Independent per-frame reference: block outputs by forward hooks, pooled output, and the probe
    attention computed from the head's projection weights in float64 (checked against the head's output)."""
    tower = teacher.tower
    blocks, kept = tower.encoder.layers, {}
    hooks = [
        blocks[i].register_forward_hook(lambda m, a, o, i=i: kept.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i in teacher.layers
    ]
    try:
        with torch.no_grad():
            if teacher.kind == "siglip":
                out = tower(pixel_values=frames)
            else:
                patches = _processor_patches(frames, teacher.patch_size)
                F_, S = patches.shape[:2]
                g = math.isqrt(S)
                out = tower(
                    pixel_values=patches,
                    pixel_attention_mask=torch.ones(F_, S, dtype=torch.long),
                    spatial_shapes=torch.tensor([[g, g]] * F_),
                )
    finally:
        for h in hooks:
            h.remove()
    head = tower.head
    x = out.last_hidden_state.double()
    C, H = x.shape[-1], head.attention.num_heads
    Wq, Wk, Wv = head.attention.in_proj_weight.double().chunk(3)
    bq, bk, bv = head.attention.in_proj_bias.double().chunk(3)
    q = (head.probe.double()[0] @ Wq.T + bq).view(1, H, C // H)
    k = (x @ Wk.T + bk).view(*x.shape[:2], H, C // H)
    v = (x @ Wv.T + bv).view(*x.shape[:2], H, C // H)
    w = torch.softmax(torch.einsum("qhd,fshd->fhs", q, k) / math.sqrt(C // H), -1)  # [F, H, S]
    o = (
        torch.einsum("fhs,fshd->fhd", w, v).reshape(-1, C) @ head.attention.out_proj.weight.double().T
        + head.attention.out_proj.bias.double()
    )
    with torch.no_grad():
        o = o + head.mlp.double()(head.layernorm.double()(o))
        head.float()
    torch.testing.assert_close(
        o.float(), out.pooler_output, rtol=1e-5, atol=1e-5
    )  # the reference is the head's computation
    return [kept[i] for i in teacher.layers], out.pooler_output, w.mean(1)


@pytest.mark.parametrize("kind", ["siglip", "siglip-full", "siglip2"])
def test_siglip_teacher_outputs_match_the_tower(tmp_path, kind):
    folder = _save_tower(tmp_path, kind)
    teacher = SiglipTeacher(folder, layers=(1, 3))
    assert teacher.kind == ("siglip2" if kind == "siglip2" else "siglip")
    assert (teacher.img_size, teacher.patch_size, teacher.feature_dim, teacher.pooled_dim, teacher.grid) == (
        32,
        8,
        32,
        32,
        (4, 4),
    )
    assert teacher.mean == (tuple(IMAGENET[0]) if kind == "siglip" else (0.5, 0.5, 0.5))
    assert teacher.std == (tuple(IMAGENET[1]) if kind == "siglip" else (0.5, 0.5, 0.5))

    B, T = 2, 3
    video = torch.randn(B, 3, T, 32, 32, generator=torch.Generator().manual_seed(4))
    teacher.frames_per_pass = 4  # 6 frames in two passes
    out = teacher(video)
    assert out.features.shape == (B, 2, T, 16, 32) and out.pooled.shape == (B, T, 32) and out.attn.shape == (B, T, 16)

    frames = video.transpose(1, 2).reshape(B * T, 3, 32, 32)
    feats, pooled, attn = _reference(teacher, frames)
    for i, f in enumerate(feats):
        torch.testing.assert_close(out.features[:, i], l2norm(f).view(B, T, 16, 32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pooled, l2norm(pooled).view(B, T, 32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.attn, attn.float().view(B, T, 16), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(B, T))
    assert out.attn.std() > 1e-2  # far from uniform: the attention carries information


def test_siglip_teacher_resizes_and_normalises(tmp_path):
    teacher = SiglipTeacher(_save_tower(tmp_path, "siglip"), layers=(0,))
    frames = torch.randint(0, 256, (1, 2, 40, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    x = teacher.preprocess(frames)
    assert x.shape == (1, 3, 2, 32, 32) and x.dtype == torch.float32
    rgb = frames[0].permute(0, 3, 1, 2).double() / 255.0
    ref = F.interpolate(rgb, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    ref = (ref - torch.tensor(IMAGENET[0], dtype=torch.float64)[:, None, None]) / torch.tensor(
        IMAGENET[1], dtype=torch.float64
    )[:, None, None]
    torch.testing.assert_close(x[0].transpose(0, 1).double(), ref, rtol=1e-5, atol=1e-5)
    # forward resizes frames of another size itself (resizing commutes with the per-channel normalisation).
    full = (rgb - torch.tensor(IMAGENET[0], dtype=torch.float64)[:, None, None]) / torch.tensor(
        IMAGENET[1], dtype=torch.float64
    )[:, None, None]
    big = teacher(full.float().transpose(0, 1)[None])
    torch.testing.assert_close(big.pooled, teacher(x).pooled, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        teacher.preprocess(frames.float())
    with pytest.raises(ValueError, match="layers must name blocks in"):
        SiglipTeacher(tmp_path / "siglip", layers=(4,))


def test_stage1_runs_with_a_siglip_teacher_from_config(tmp_path):
    folder = _save_tower(tmp_path, "siglip2")
    teacher_cfg = TeacherConfig(
        kind="siglip2",
        path=str(folder),
        img_size=32,
        patch_size=8,
        width=32,
        depth=4,
        heads=4,
        layers=(1, 3),
        pooled_dim=32,
    )
    cfg = Stage1Config(
        encoder=EncoderConfig(
            img_size=32, patch_size=8, num_frames=2, width=32, depth=2, heads=2, pool_heads=2, drop_path=0.0
        ),
        predictor=PredictorConfig(width=32, depth=2, heads=2, mlp_hidden=48, first_layer_id=0, local_window=8),
        decoder=DecoderConfig(width=32, depth=1, sample_steps=4, num_steps=10),
        teacher=teacher_cfg,
    )
    model = Stage1Model(cfg)
    assert isinstance(model.teacher, SiglipTeacher) and not model.teacher.training
    out = model(torch.randn(2, 3, 2, 32, 32), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and out["align_per_layer"].shape == (2,)
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    with pytest.raises(ValueError, match=r"TeacherConfig\.width=64 but the checkpoint"):
        build_teacher(dataclasses.replace(teacher_cfg, width=64))
    with pytest.raises(ValueError, match=r"teacher\.path is not set"):
        build_teacher(TeacherConfig(kind="siglip2"))
    not_siglip = tmp_path / "other"
    not_siglip.mkdir()
    (not_siglip / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="holds a 'bert' model"):
        SiglipTeacher(not_siglip, layers=(0,))
