"""Typed configs: strict from_dict, clear errors, presets with method.md's shapes."""
from __future__ import annotations

import json

import pytest

from invnext.config import (
    PRESETS,
    ConfigError,
    DecoderConfig,
    EncoderConfig,
    MaskViewConfig,
    PredictorConfig,
    Preset,
    Stage1Config,
    Stage2Config,
    TeacherConfig,
    from_dict,
    get_preset,
    override,
    to_dict,
)


def test_unknown_key_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"EncoderConfig: unknown key 'widht' .*did you mean 'width'"):
        from_dict(EncoderConfig, {"widht": 768})
    with pytest.raises(ConfigError, match=r"Stage1Config\.predictor: unknown key 'local_windw'.*'local_window'"):
        from_dict(Stage1Config, {"predictor": {"local_windw": 64}})
    with pytest.raises(ConfigError, match=r"unknown key 'zzz'.*valid keys: .*num_blocks"):
        from_dict(Stage2Config, {"views": [{"zzz": 1}]})
    assert issubclass(ConfigError, ValueError)


def test_wrong_types_name_the_path():
    with pytest.raises(TypeError, match=r"Stage1Config\.encoder\.width: expected int, got str '768'"):
        from_dict(Stage1Config, {"encoder": {"width": "768"}})
    with pytest.raises(TypeError, match=r"EncoderConfig\.depth: expected int, got bool"):
        from_dict(EncoderConfig, {"depth": True})
    with pytest.raises(TypeError, match=r"EncoderConfig\.heads: expected int, got float"):
        from_dict(EncoderConfig, {"heads": 12.0})
    with pytest.raises(TypeError, match=r"EncoderConfig\.use_rope: expected bool, got int"):
        from_dict(EncoderConfig, {"use_rope": 1})
    with pytest.raises(TypeError, match=r"Stage1Config\.encoder: expected a mapping"):
        from_dict(Stage1Config, {"encoder": 3})
    with pytest.raises(TypeError, match=r"PredictorConfig\.local_window_3d: expected a list/tuple"):
        from_dict(PredictorConfig, {"local_window_3d": 4})
    with pytest.raises(TypeError, match=r"Stage2Config\.views\[1\]\.spatial_scale\[0\]: expected float, got str"):
        from_dict(Stage2Config, {"views": [{}, {"spatial_scale": ["a", 0.2]}]})
    with pytest.raises(TypeError, match=r"EncoderConfig\.width"):
        EncoderConfig(width="a")  # direct construction is checked too


def test_literals_tuples_and_ranges():
    with pytest.raises(ValueError, match=r"Stage1Config\.mask_mode: must be one of 'topk', 'sample', 'tube', got 'top'"):
        from_dict(Stage1Config, {"mask_mode": "top"})
    with pytest.raises(ValueError, match=r"Stage1Config\.align_frames: must be one of 'each', 'mean', got 'both'"):
        from_dict(Stage1Config, {"align_frames": "both"})
    with pytest.raises(ValueError, match=r"DecoderConfig\.schedule"):
        from_dict(DecoderConfig, {"schedule": "cos"})
    with pytest.raises(ValueError, match=r"spatial_scale: expected 2 entries"):
        from_dict(MaskViewConfig, {"spatial_scale": [0.1]})
    with pytest.raises(ValueError, match=r"EncoderConfig\.heads: must divide width=768"):
        from_dict(EncoderConfig, {"heads": 5})
    with pytest.raises(ValueError, match=r"Stage1Config\.mask_ratio: must lie in \[0, 1\)"):
        from_dict(Stage1Config, {"mask_ratio": 1.0})
    with pytest.raises(ValueError, match=r"align_layers: must pair one student block per teacher layer \(6\)"):
        from_dict(Stage1Config, {"align_layers": [1, 2]})
    with pytest.raises(ValueError, match=r"MaskViewConfig\.aspect_ratio"):
        from_dict(MaskViewConfig, {"aspect_ratio": [1.5, 0.75]})
    # Ints are accepted for floats (converted); lists for tuples; None for optional fields.
    cfg = from_dict(Stage1Config, {"mask_ratio": 0.75, "mask_mode": "sample", "align_weight": 2,
                                   "predictor": {"local_window_3d": [2, 4, 4]}, "encoder": {"pool_dim": None}})
    assert cfg.align_weight == 2.0 and isinstance(cfg.align_weight, float)
    assert cfg.predictor.local_window_3d == (2, 4, 4)
    assert cfg.mask_mode == "sample" and cfg.mask_ratio == 0.75  # the release's settings are reachable
    views = from_dict(Stage2Config, {"views": [{"num_blocks": 4, "spatial_scale": [0.1, 0.2]}]}).views
    assert views == (MaskViewConfig(4, (0.1, 0.2)),)


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_roundtrip(name):
    preset = get_preset(name)
    assert isinstance(preset, Preset)
    plain = to_dict(preset)
    assert from_dict(Preset, json.loads(json.dumps(plain))) == preset
    assert preset.stage1.teacher.grid == preset.stage1.encoder.grid[1:], "teacher and student grids match"


def test_real_presets_follow_method():
    for name, (width, depth, heads, mlp) in {
        "base": (768, 12, 12, 3072),
        "large": (1024, 24, 16, 4096),
        "1b": (1408, 40, 16, 6144),
    }.items():
        p = get_preset(name)
        enc = p.stage1.encoder
        assert (enc.width, enc.depth, enc.heads, enc.mlp_hidden) == (width, depth, heads, mlp)
        assert enc.grid == (16, 16, 16) and enc.patch_dim == 588 and enc.num_class_tokens == 4
        assert enc.layer_scale_init == 1e-5 and enc.norm_eps == 1e-6 and not enc.use_rope
        assert p.stage2.encoder.grid == (32, 16, 16)
        pred = p.stage1.predictor
        assert (pred.width, pred.heads, pred.mlp_hidden, pred.depth) == (1024, 16, 2624, 5)
        assert (pred.local_window, pred.global_every, pred.global_rope_theta, pred.local_rope_theta) == (
            128, 3, 160000.0, 10000.0,
        )
        dec = p.stage1.decoder
        assert (dec.depth, dec.width, dec.num_steps, dec.schedule) == (6, 1536, 1000, "cosine")
        s1 = p.stage1
        assert (s1.mask_ratio, s1.mask_mode) == (0.8, "topk")
        assert (s1.align_weight, s1.pool_weight, s1.diffusion_weight) == (1.0, 1.0, 1.0)
        assert len(s1.teacher.layers) == 6 and s1.student_layers == tuple(range(depth - 6, depth))
        assert s1.teacher.img_size == 256 and s1.teacher.patch_size == 16
        views = p.stage2.views
        assert [(v.num_blocks, v.spatial_scale) for v in views] == [(8, (0.15, 0.15)), (2, (0.7, 0.7))]
        assert all(v.aspect_ratio == (0.75, 1.5) and v.temporal_scale == (1.0, 1.0) for v in views)
    assert get_preset("base").stage1.encoder.drop_path == 0.1
    assert get_preset("large").stage1.encoder.drop_path == 0.2


def test_large_preset_pools_to_768_like_the_release():
    # The release's large (width 1024) projects its attention pool to 768; base pools at its width.
    large, base = get_preset("large"), get_preset("base")
    assert large.stage1.encoder.embed_dim == large.stage2.encoder.embed_dim == 768
    assert large.stage1.encoder.width == 1024 and base.stage1.encoder.embed_dim == 768


def test_get_preset_unknown_and_override():
    with pytest.raises(ConfigError, match=r"unknown preset 'lage'.*did you mean 'large'"):
        get_preset("lage")
    base = get_preset("base").stage1
    changed = override(base, {"encoder": {"depth": 6}, "mask_ratio": 0.75})
    assert changed.encoder.depth == 6 and changed.encoder.width == 768 and changed.mask_ratio == 0.75
    assert base.encoder.depth == 12  # the original is untouched (frozen dataclasses)
    with pytest.raises(ConfigError, match="depht"):
        override(base, {"encoder": {"depht": 6}})
    with pytest.raises(TypeError, match=r"to_dict: expected a config dataclass instance"):
        to_dict({"a": 1})
    with pytest.raises(TypeError, match="from_dict: cls must be a config dataclass"):
        from_dict(dict, {})


def test_teacher_patch_embed_option():
    assert TeacherConfig().patch_embed == "linear" and get_preset("tiny").stage1.teacher.patch_embed == "conv"
    assert from_dict(TeacherConfig, {"kind": "tiny", "patch_embed": "conv"}).patch_embed == "conv"
    with pytest.raises(ValueError, match=r"TeacherConfig\.patch_embed: must be one of 'linear', 'conv', got 'cnn'"):
        from_dict(TeacherConfig, {"kind": "tiny", "patch_embed": "cnn"})
    with pytest.raises(ValueError, match=r"TeacherConfig\.patch_embed: the conv stem exists for kind 'tiny' only"):
        from_dict(TeacherConfig, {"kind": "siglip2", "patch_embed": "conv"})
    with pytest.raises(ValueError, match=r"TeacherConfig\.patch_embed: the conv stem needs patch_size a multiple of 4"):
        from_dict(TeacherConfig, {"kind": "tiny", "patch_size": 14, "img_size": 112, "patch_embed": "conv"})
