"""``invnext.load_encoder``: presets, our safetensors checkpoints, and the authors' released names."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import invnext
from invnext.config import EncoderConfig, get_preset
from invnext.loading import config_metadata, load_encoder, save_encoder
from invnext.models import Stage2Model, save_weights
from invnext.models.release import RELEASE_TO_INVNEXT, release_names

# A small release-shaped encoder: width 64 (not a release preset, so heads must be given),
# 3 blocks, patch 8 at 16 px (2x2 grid), 3 frames, 4 class tokens, pooled width 40.
W, DEPTH, HEADS, POOL_HEADS, PATCH, IMG, FRAMES, P, POOL_DIM, HIDDEN = 64, 3, 4, 4, 8, 16, 3, 4, 40, 256
N = FRAMES * (IMG // PATCH) ** 2
OVERRIDES = {"heads": HEADS, "pool_heads": POOL_HEADS, "img_size": IMG}


def _release_shape(name: str) -> tuple[int, ...]:
    """The shape the authors' model gives ``name`` (from their InternVideo2 definition)."""
    leaf = name.split(".", 2)[-1] if name.startswith("blocks.") else name
    shapes = {
        "patch_embed.proj.weight": (W, 3, 1, PATCH, PATCH),
        "patch_embed.proj.bias": (W,),
        "patch_embed.norm_before.weight": (1 * PATCH * PATCH * 3,),
        "patch_embed.norm.weight": (W,),
        "cls_token": (1, P, W),
        "pos_embed": (1, P + N, W),
        "attn.qkv.weight": (3 * W, W),
        "attn.proj.weight": (W, W),
        "mlp.fc1.weight": (HIDDEN, W),
        "mlp.fc1.bias": (HIDDEN,),
        "mlp.fc2.weight": (W, HIDDEN),
        "clip_projector.cross_attn.q.weight": (W, W),
        "clip_projector.cross_attn.k.weight": (W, W),
        "clip_projector.cross_attn.v.weight": (W, W),
        "clip_projector.cross_attn.proj.weight": (POOL_DIM, W),
        "clip_projector.cross_attn.proj.bias": (POOL_DIM,),
    }
    return shapes.get(leaf, (W,))


def _release_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = release_names(DEPTH)
    state = {}
    for name in names:
        t = torch.randn(_release_shape(name), generator=g, dtype=torch.float64)
        if name.endswith(
            (
                "norm1.weight",
                "norm2.weight",
                "norm.weight",
                "norm_before.weight",
                "q_norm.weight",
                "k_norm.weight",
                "norm1_q.weight",
                "norm1_k.weight",
                "norm1_v.weight",
            )
        ):
            t = 1.0 + 0.3 * t  # norms near 1, but not 1, so a permuted or dropped weight shows
        elif name.endswith("gamma"):
            t = 0.5 * t  # LayerScale large enough that every block changes the output
        else:
            t = 0.2 * t
        state[name] = t.float().double()  # fp32-exact: the encoder's parameters are fp32 until .double()
    return state


def test_release_table_uses_the_authors_names():
    names = set(release_names(DEPTH))
    # Literal names read from InternVideo-Next/models/InternVideo_next.py (InternVideo2, Block,
    # Attention, PatchEmbed, AttentionPoolingBlock, CrossAttention): a wrong table fails here.
    for literal in (
        "patch_embed.proj.weight",
        "patch_embed.norm_before.weight",
        "patch_embed.norm.weight",
        "cls_token",
        "pos_embed",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.q_norm.weight",
        "blocks.2.attn.k_norm.weight",
        "blocks.1.attn.proj.bias",
        "blocks.0.ls1.gamma",
        "blocks.2.ls2.gamma",
        "blocks.1.norm2.weight",
        "blocks.1.mlp.fc1.weight",
        "blocks.2.mlp.fc2.bias",
        "clip_projector.norm1_q.weight",
        "clip_projector.norm1_v.bias",
        "clip_projector.cross_attn.q.weight",
        "clip_projector.cross_attn.q_bias",
        "clip_projector.cross_attn.v_bias",
        "clip_projector.cross_attn.proj.weight",
    ):
        assert literal in names, literal
    assert len(names) == 6 + 13 * DEPTH + 14
    assert len({t for _, t in RELEASE_TO_INVNEXT}) == len(RELEASE_TO_INVNEXT)  # one-to-one


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _release_forward(sd: dict[str, torch.Tensor], video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' encoder forward (their layouts and order of operations), written out in float64."""
    B, C, T, H, Wd = video.shape
    p, h, w = PATCH, H // PATCH, Wd // PATCH
    # PatchEmbed: RMSNorm over each patch flattened as (t, y, x, c), back to pixels, Conv3d, RMSNorm.
    x = video.permute(0, 2, 3, 4, 1).reshape(B, T, h, p, w, p, C).permute(0, 1, 2, 4, 3, 5, 6)
    x = _rms(x.reshape(B, T, h, w, p * p * C), sd["patch_embed.norm_before.weight"])
    x = x.reshape(B, T, h, w, p, p, C).permute(0, 6, 1, 2, 4, 3, 5).reshape(B, C, T, H, Wd)
    x = F.conv3d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(1, p, p))
    x = _rms(x.flatten(3).permute(0, 2, 3, 1).reshape(B, T * h * w, -1), sd["patch_embed.norm.weight"])
    x = torch.cat((sd["cls_token"].expand(B, -1, -1), x), 1) + sd["pos_embed"]
    L, D = x.shape[1], W // HEADS
    for i in range(DEPTH):

        def b(n: str, i: int = i) -> torch.Tensor:
            return sd[f"blocks.{i}.{n}"]

        y = _rms(x, b("norm1.weight"))
        q, k, v = (y @ b("attn.qkv.weight").T).view(B, L, 3, W).unbind(2)
        q, k = _rms(q, b("attn.q_norm.weight")), _rms(k, b("attn.k_norm.weight"))
        q, k, v = (t.view(B, L, HEADS, D).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, -1) @ v
        x = x + b("ls1.gamma") * (a.transpose(1, 2).reshape(B, L, W) @ b("attn.proj.weight").T + b("attn.proj.bias"))
        # Their default block MLP is flash-attn's FusedMLP, whose GELU is the tanh approximation.
        y = F.gelu(_rms(x, b("norm2.weight")) @ b("mlp.fc1.weight").T + b("mlp.fc1.bias"), approximate="tanh")
        x = x + b("ls2.gamma") * (y @ b("mlp.fc2.weight").T + b("mlp.fc2.bias"))

    # No final norm. AttentionPoolingBlock: query = LN(mean of all tokens), k = LN(x), v = LN(x).
    def cp(n: str) -> torch.Tensor:
        return sd[f"clip_projector.{n}"]

    def ln(t: torch.Tensor, n: str) -> torch.Tensor:
        return F.layer_norm(t, (W,), cp(f"{n}.weight"), cp(f"{n}.bias"), eps=1e-5)

    d = W // POOL_HEADS
    q = (ln(x.mean(1, keepdim=True), "norm1_q") @ cp("cross_attn.q.weight").T + cp("cross_attn.q_bias")).view(
        B, 1, POOL_HEADS, d
    )
    k = (ln(x, "norm1_k") @ cp("cross_attn.k.weight").T + cp("cross_attn.k_bias")).view(B, L, POOL_HEADS, d)
    v = (ln(x, "norm1_v") @ cp("cross_attn.v.weight").T + cp("cross_attn.v_bias")).view(B, L, POOL_HEADS, d)
    att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q * d**-0.5, k), -1)
    pooled = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, W) @ cp("cross_attn.proj.weight").T + cp(
        "cross_attn.proj.bias"
    )
    return x[:, P:], pooled


def test_authors_checkpoint_loads_and_matches_their_forward(tmp_path, capsys):
    sd = _release_state()
    skipped = {
        "clip_pos_embed": torch.zeros(1, P + N, W),
        "diff_pos_embed": torch.zeros(1, P + N, W),
        "bert_mask_token": torch.zeros(1, 1, W),
        "to_bert_proj.head.0.weight": torch.zeros(W, W),
        "bert_decoder.layers.0.attn.Wqkv.weight": torch.zeros(96, 32),
        "selfdist_proj_clip.norm.weight": torch.zeros(W),
    }
    # A DeepSpeed-style file: {"module": state dict}, names with a DDP "module." prefix, bf16 and fp64 mixed.
    wrapped = {"module." + k: v for k, v in {**sd, **skipped}.items()}
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": wrapped}, path)

    enc = load_encoder(path, config=OVERRIDES)
    printed = capsys.readouterr().out
    assert f"{len(sd)} tensors" in printed and f"skipped {len(skipped)}" in printed and "bert_decoder: 1" in printed
    cfg = enc.cfg
    assert (cfg.width, cfg.depth, cfg.heads, cfg.patch_size, cfg.img_size, cfg.num_frames) == (
        W,
        DEPTH,
        HEADS,
        PATCH,
        IMG,
        FRAMES,
    )
    assert (cfg.num_class_tokens, cfg.pool_dim, cfg.mlp_hidden, cfg.final_norm) == (P, POOL_DIM, HIDDEN, False)
    assert cfg.activation == "gelu_tanh"
    assert not enc.training
    # Nothing missing or unexpected: every one of our tensors came from one of theirs.
    assert len(enc.state_dict()) == len(sd)
    ours = enc.state_dict()
    assert torch.equal(ours["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"].float())
    assert torch.equal(ours["blocks.2.ls2.gamma"], sd["blocks.2.ls2.gamma"].float())
    assert torch.equal(ours["pool.q.bias"], sd["clip_projector.cross_attn.q_bias"].float())
    assert torch.equal(ours["pool.norm_v.bias"], sd["clip_projector.norm1_v.bias"].float())
    assert torch.equal(ours["cls_tokens"], sd["cls_token"].float())
    assert torch.equal(ours["patch_embed.proj.weight"], sd["patch_embed.proj.weight"].reshape(W, -1).float())
    # The patch norm's weight is permuted from their (t, y, x, c) order to our (c, t, y, x).
    theirs = sd["patch_embed.norm_before.weight"].view(PATCH, PATCH, 3)
    assert torch.equal(ours["patch_embed.pre_norm.weight"].view(3, PATCH, PATCH), theirs.permute(2, 0, 1).float())

    enc = enc.double()
    video = torch.randn(2, 3, FRAMES, IMG, IMG, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tokens, pooled = enc.encode(video)
    ref_tokens, ref_pooled = _release_forward(sd, video)
    torch.testing.assert_close(tokens, ref_tokens, rtol=1e-10, atol=1e-10)
    # Our attention pool scores and averages in float32 even for float64 inputs (by design, for
    # bf16), hence a float32-level tolerance here; a mapping error would be off by O(1).
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=5e-6)


def test_authors_checkpoint_fp32_features_match_their_fused_mlp_path(tmp_path):
    # The release's features in fp32: the tanh-GELU activation (set on loading) keeps ours within
    # 5e-6 relative of their forward; exact GELU was off by ~1e-4 and grew with activation scale.
    sd = _release_state(seed=3)
    path = tmp_path / "release.pt"
    torch.save({"model": sd}, path)
    enc = load_encoder(path, config=OVERRIDES, verbose=False)
    video = torch.randn(2, 3, FRAMES, IMG, IMG, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        tokens, pooled = enc.encode(video.float())
    ref_tokens, ref_pooled = _release_forward(sd, video)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b).norm() / b.norm())

    assert rel(tokens, ref_tokens) < 5e-6, rel(tokens, ref_tokens)
    assert rel(pooled, ref_pooled) < 5e-6, rel(pooled, ref_pooled)
    # The activation is a setting: exact GELU is still what our own checkpoints use by default.
    assert EncoderConfig().activation == "gelu"
    exact = load_encoder(path, config={**OVERRIDES, "activation": "gelu"}, verbose=False)
    with torch.no_grad():
        assert rel(exact.encode(video.float())[0], ref_tokens) > 1e-5


def test_authors_safetensors_and_release_defaults(tmp_path):
    # Width 768 is the release's base: heads (12) and pool heads (16) come from the release presets,
    # and a 224 px grid from the release resolution.
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    C, depth, p, frames = 768, 1, 14, 1
    n = frames * 16 * 16
    names = release_names(depth)
    shapes = {
        "patch_embed.proj.weight": (C, 3, 1, p, p),
        "patch_embed.norm_before.weight": (p * p * 3,),
        "cls_token": (1, 4, C),
        "pos_embed": (1, 4 + n, C),
        "blocks.0.attn.qkv.weight": (3 * C, C),
        "blocks.0.attn.proj.weight": (C, C),
        "blocks.0.mlp.fc1.weight": (4 * C, C),
        "blocks.0.mlp.fc1.bias": (4 * C,),
        "blocks.0.mlp.fc2.weight": (C, 4 * C),
        **{f"clip_projector.cross_attn.{m}.weight": (C, C) for m in "qkv"},
        "clip_projector.cross_attn.proj.weight": (C, C),
    }
    state = {k: torch.randn(shapes.get(k, (C,)), generator=g).to(torch.bfloat16) for k in names}
    path = tmp_path / "release.safetensors"
    save_file(state, str(path))
    enc = load_encoder(path, verbose=False)
    assert (enc.cfg.heads, enc.cfg.pool_heads, enc.cfg.img_size, enc.cfg.num_frames, enc.cfg.pool_dim) == (
        12,
        16,
        224,
        1,
        None,
    )
    assert torch.equal(enc.blocks[0].mlp.fc2.weight, state["blocks.0.mlp.fc2.weight"].float())


def test_authors_checkpoint_errors(tmp_path):
    sd = _release_state()
    bad = tmp_path / "bad.pt"
    torch.save({**sd, "blocks.0.attn.relative_position_bias": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match=r"no counterpart: \['blocks.0.attn.relative_position_bias'\]"):
        load_encoder(bad, config=OVERRIDES, verbose=False)
    # The release saves argparse.Namespace next to the weights: never unpickled.
    pickled = tmp_path / "checkpoint-100.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1.0)}, pickled)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_encoder(pickled, config=OVERRIDES, verbose=False)
    # Width 64 is no release preset: heads must be given.
    ok = tmp_path / "ok.pt"
    torch.save(sd, ok)
    with pytest.raises(ValueError, match="heads"):
        load_encoder(ok, config={"img_size": IMG}, verbose=False)
    with pytest.raises(ValueError, match="does not fit img_size=24"):
        load_encoder(ok, config={**OVERRIDES, "img_size": 24}, verbose=False)
    # A wrong width for a tensor is a load error that names it.
    torch.save({**sd, "blocks.1.mlp.fc2.bias": torch.zeros(W + 1)}, bad)
    with pytest.raises(ValueError, match=r"bad\.pt.*blocks\.1\.mlp\.fc2\.bias: file \[65\], model \[64\]"):
        load_encoder(bad, config=OVERRIDES, verbose=False)


def test_presets_and_preprocess_encode():
    enc = load_encoder("tiny")
    assert enc.cfg == get_preset("tiny").stage2.encoder and not enc.training
    frames = torch.randint(0, 256, (1, 8, 112, 112, 3), dtype=torch.uint8)
    tokens, pooled = enc.encode(enc.preprocess(frames))
    assert tokens.shape == (1, 4 * 7 * 7, 96) and pooled.shape == (1, 96)  # 8 frames in tubelets of 2
    assert load_encoder("tiny", config={"depth": 2}).cfg.depth == 2
    with pytest.raises(ValueError, match=r"neither a preset .*tiny, base, large, 1b"):
        load_encoder("tiney")
    with pytest.raises(TypeError, match="source"):
        load_encoder(3)


def test_our_checkpoints_roundtrip(tmp_path):
    torch.manual_seed(0)
    enc = load_encoder("tiny")
    path = tmp_path / "enc.safetensors"
    save_encoder(enc, path)
    back = load_encoder(path)
    assert back.cfg == enc.cfg
    for k, v in enc.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    video = torch.randn(1, 3, 4, 112, 112)
    torch.testing.assert_close(back.encode(video)[1], enc.encode(video)[1], rtol=0, atol=0)
    # A folder holding the one file works too.
    assert load_encoder(tmp_path).cfg == enc.cfg

    # A whole Stage-2 model saved with its config: the student encoder is read from "encoder.".
    cfg2 = get_preset("tiny").stage2
    model = Stage2Model(cfg2)
    with torch.no_grad():
        model.encoder.blocks[0].ls1.gamma.fill_(0.25)
    stage2_path = tmp_path / "stage2" / "model.safetensors"
    stage2_path.parent.mkdir()
    save_weights(model, stage2_path, metadata=config_metadata(cfg2))
    enc2 = load_encoder(stage2_path.parent)
    assert torch.equal(enc2.blocks[0].ls1.gamma, torch.full((96,), 0.25))
    assert enc2.cfg == cfg2.encoder

    # Without metadata the config must be given.
    bare = tmp_path / "bare.safetensors"
    save_weights(enc, bare)
    with pytest.raises(ValueError, match="no invnext config"):
        load_encoder(bare)
    assert load_encoder(bare, config=enc.cfg).cfg == enc.cfg


def test_import_invnext_stays_cheap():
    code = (
        "import sys, invnext; assert 'torch' not in sys.modules, 'torch'; "
        "f = invnext.load_encoder; assert 'transformers' not in sys.modules, 'transformers'; print(f.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "load_encoder"
    assert invnext.load_encoder is load_encoder
    assert isinstance(EncoderConfig(final_norm=False), EncoderConfig)


def test_damaged_files_and_weights_name_the_file_and_the_tensor(tmp_path):
    # These raised a raw SafetensorError / JSONDecodeError / load_state_dict message naming no file,
    # and NaN weights loaded silently.
    import json

    from safetensors.torch import load_file, save_file

    from invnext.models import load_weights

    torch.manual_seed(0)
    enc = load_encoder("tiny")
    good = tmp_path / "enc.safetensors"
    save_encoder(enc, good)
    state, meta = load_file(good), config_metadata(enc.cfg)

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"'.*cut\.safetensors' is not a readable safetensors file"):
        load_encoder(cut)
    with pytest.raises(ValueError, match=r"weights file '.*cut\.safetensors' is not a readable safetensors file"):
        load_weights(enc, cut)

    badjson = tmp_path / "badjson.safetensors"
    save_file(state, badjson, metadata={**meta, "invnext.config": "{not json"})
    with pytest.raises(ValueError, match=r"badjson\.safetensors'.*'invnext\.config' metadata is not valid JSON"):
        load_encoder(badjson)
    badcfg = tmp_path / "badcfg.safetensors"
    save_file(state, badcfg, metadata={**meta, "invnext.config": json.dumps({"widht": 8})})
    with pytest.raises(ValueError, match=r"badcfg\.safetensors'.*not a valid EncoderConfig.*widht"):
        load_encoder(badcfg)

    shape = tmp_path / "shape.safetensors"
    save_file({**state, "blocks.1.mlp.fc2.bias": torch.zeros(7)}, shape, metadata=meta)
    with pytest.raises(ValueError, match=r"shape\.safetensors'.*blocks\.1\.mlp\.fc2\.bias: file \[7\], model \[96\]"):
        load_encoder(shape)
    with pytest.raises(ValueError, match=r"shape\.safetensors'.*blocks\.1\.mlp\.fc2\.bias: file \[7\]"):
        load_weights(enc, shape)

    nan = tmp_path / "nan.safetensors"
    w = state["blocks.0.attn.qkv.weight"].clone()
    w[0, 0] = float("nan")
    save_file({**state, "blocks.0.attn.qkv.weight": w}, nan, metadata=meta)
    with pytest.raises(ValueError, match=r"nan\.safetensors'.*hold NaN or inf.*blocks\.0\.attn\.qkv\.weight"):
        load_encoder(nan)
    with pytest.raises(ValueError, match=r"nan\.safetensors'.*hold NaN or inf.*blocks\.0\.attn\.qkv\.weight"):
        load_weights(enc, nan)
