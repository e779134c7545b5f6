"""Models and objectives on the CPU (tiny preset): training steps, packing, pairing, shapes, counts."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from invnext import ops
from invnext.config import EncoderConfig, PredictorConfig, get_preset, override
from invnext.models import (
    ConvPatchEmbed,
    DiffusionDecoder,
    Encoder,
    Predictor,
    Stage1Model,
    Stage2Model,
    TeacherOutput,
    TinyTeacher,
    kept_per_frame,
    load_weights,
    save_weights,
)
from invnext.models.layers import resize_grid_table, sincos_3d
from invnext.models.teacher_interface import token_attention

TINY = get_preset("tiny")


def _video(B: int, cfg: EncoderConfig, seed: int = 0, frames: int | None = None, size: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    T = cfg.num_frames if frames is None else frames
    s = cfg.img_size if size is None else size
    return torch.randn(B, 3, T, s, s, generator=g)


def _unzero_decoder(decoder: DiffusionDecoder) -> None:
    """Zero-initialised modulation/output layers pass no gradient upstream on the first step; give them small values."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for block in decoder.blocks:
            for p in block.modulation[1].parameters():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        for lin in (decoder.final.modulation[1], decoder.final.linear):
            for p in lin.parameters():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def _check_step(model: torch.nn.Module, out: dict, frozen_prefix: str) -> dict[str, torch.Tensor]:
    """Backward + AdamW step; every trainable parameter got a finite non-zero gradient, frozen ones none."""
    for k, v in out.items():
        if v.dtype.is_floating_point:
            assert torch.isfinite(v).all(), k
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(frozen_prefix)}
    assert frozen_before, "the frozen module has parameters"
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().max() > 0)]
    assert not missing, f"no gradient reached: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in trainable)
    for n, p in model.named_parameters():
        if n.startswith(frozen_prefix):
            assert not p.requires_grad and p.grad is None, n
    opt.step()
    for n, p in model.named_parameters():
        if n.startswith(frozen_prefix):
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"
        elif p.requires_grad:
            assert not torch.equal(p, before[n]), f"{n} did not move"
    return frozen_before


# --------------------------------------------------------------------------- training steps


def test_stage1_training_step():
    torch.manual_seed(0)
    model = Stage1Model(TINY.stage1)
    _unzero_decoder(model.decoder)
    model.train()
    assert not model.teacher.training, "the frozen teacher stays in eval mode"
    video = _video(2, TINY.stage1.encoder)
    out = model(video, generator=torch.Generator().manual_seed(1))
    for key in ("loss", "align", "pool", "diffusion"):
        assert out[key].dim() == 0
    assert out["align_per_layer"].shape == (2,)
    expected = out["align"] + out["pool"] + out["diffusion"]  # weights 1 : 1 : 1
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=0)
    # Semantic mask: every frame keeps the same count, ratio 0.8 of 49 -> 39 hidden, 10 kept.
    T, H, W = TINY.stage1.encoder.grid
    hidden = out["hidden"].view(2, T, H * W)
    assert (hidden.sum(-1) == H * W - kept_per_frame(0.8, H * W)).all()
    assert kept_per_frame(0.8, 49) == 10
    _check_step(model, out, "teacher.")


def test_stage1_release_mask_settings():
    """The release's mask (ratio 0.75, sampled by attention) is reachable by configuration."""
    torch.manual_seed(0)
    cfg = override(TINY.stage1, {"mask_ratio": 0.75, "mask_mode": "sample", "encoder": {"depth": 2}})
    model = Stage1Model(cfg).eval()
    video = _video(1, cfg.encoder, seed=4)
    with torch.no_grad():
        a = model(video, generator=torch.Generator().manual_seed(0))
        b = model(video, generator=torch.Generator().manual_seed(0))
        c = model(video, generator=torch.Generator().manual_seed(1))
    T, H, W = cfg.encoder.grid
    assert (a["hidden"].view(T, H * W).sum(-1) == H * W - kept_per_frame(0.75, H * W)).all()
    assert torch.equal(a["hidden"], b["hidden"]) and torch.equal(a["loss"], b["loss"])
    assert not torch.equal(a["hidden"], c["hidden"])
    assert torch.isfinite(a["loss"])


def test_stage1_tube_mask_ablation_ignores_the_teacher():
    """mask_mode 'tube': the same count per frame as the semantic mask, at places the teacher did not pick."""
    torch.manual_seed(0)
    cfg = override(TINY.stage1, {"mask_mode": "tube", "encoder": {"depth": 2}})
    model = Stage1Model(cfg).eval()
    video = _video(2, cfg.encoder, seed=5)
    with torch.no_grad():
        a = model(video, generator=torch.Generator().manual_seed(0))
        tout = model.run_teacher(video)
    T, H, W = cfg.encoder.grid
    hidden = a["hidden"].view(2, T, H * W)
    assert (hidden.sum(-1) == H * W - kept_per_frame(cfg.mask_ratio, H * W)).all()
    assert (hidden == hidden[:, :1]).all()  # a tube: the same places in every frame
    attn = token_attention(tout.attn, cfg.encoder.tubelet_size)
    semantic = ops.semantic_mask(attn, kept_per_frame(cfg.mask_ratio, H * W), "topk").view(2, T, H * W)
    assert not torch.equal(hidden, semantic)
    assert torch.isfinite(a["loss"])


def test_stage1_rejects_teacher_of_another_grid():
    cfg = override(TINY.stage1, {"encoder": {"depth": 2}, "teacher": {"img_size": 128, "layers": [1, 3]}})
    model = Stage1Model(cfg)
    with pytest.raises(ValueError, match="teacher's grid must match the student's"):
        model(_video(1, cfg.encoder))


@pytest.mark.parametrize("align_frames", ["each", "mean"])
def test_stage1_tubelet_tokens_align_with_their_frames(align_frames):
    """A token spanning 2 frames: its head predicts each frame's teacher feature ("each") or their
    re-normalised mean ("mean"); the semantic mask reads the frames' mean attention."""
    torch.manual_seed(0)
    cfg = override(TINY.stage1, {"encoder": {"depth": 2, "num_frames": 8, "tubelet_size": 2}, "align_frames": align_frames})
    model = Stage1Model(cfg).eval()
    video = _video(2, cfg.encoder, seed=6)
    with torch.no_grad():
        tout = model.run_teacher(video)
        targets = model.alignment_targets(tout)
        out = model(video, generator=torch.Generator().manual_seed(0))
    T, H, W = cfg.encoder.grid
    S = H * W
    assert tout.attn.shape[1] == 8 and T == 4
    u = 2 if align_frames == "each" else 1
    assert targets.shape == (2, 2, T * S, u, model.teacher.feature_dim)
    assert model.align_heads[0].fc2.out_features == u * model.teacher.feature_dim
    for t, s in ((0, 0), (3, 17), (1, S - 1)):
        pair = tout.features[:, :, 2 * t : 2 * t + 2, s]  # [B, K, 2, Ct]
        want = pair if align_frames == "each" else F.normalize(pair.sum(2), dim=-1)[:, :, None]
        torch.testing.assert_close(targets[:, :, t * S + s], want)
    semantic = ops.semantic_mask(tout.attn.view(2, T, 2, S).mean(2), kept_per_frame(cfg.mask_ratio, S), "topk")
    assert torch.equal(out["hidden"], semantic)
    assert torch.isfinite(out["loss"])


def test_stage2_training_step():
    torch.manual_seed(0)
    stage1_encoder = Encoder(TINY.stage1.encoder)
    model = Stage2Model(TINY.stage2, init_encoder=stage1_encoder)
    model.train()
    assert not model.target.training
    for name, p in model.encoder.state_dict().items():
        assert torch.equal(p, stage1_encoder.state_dict()[name]), "student initialised from stage 1"
    video = _video(2, TINY.stage2.encoder, seed=3)
    target_before = model.targets(video)
    out = model(video, generator=torch.Generator().manual_seed(2))
    views = [f"view{i}" for i in range(len(TINY.stage2.views))]
    assert set(out) >= {"loss", *views}
    torch.testing.assert_close(out["loss"], sum(out[v] for v in views), rtol=1e-6, atol=0)
    _check_step(model, out, "target.")
    # The frozen target gives the same features after the step (no EMA, no update).
    assert torch.equal(model.targets(video), target_before)


def test_stage2_keeps_every_context_token(monkeypatch):
    """Samples with different context sizes are packed whole: no truncation to the smallest."""
    torch.manual_seed(0)
    cfg = override(TINY.stage2, {"views": [{"num_blocks": 1}], "encoder": {"depth": 1}, "predictor": {"depth": 1}})
    model = Stage2Model(cfg).eval()
    T, H, W = cfg.encoder.grid
    N = T * H * W
    hidden = torch.zeros(3, N, dtype=torch.bool)
    hidden[0, :10] = True
    hidden[1, 5:150] = True
    hidden[2, ::3] = True
    seen = []
    original = model.encoder.forward_packed

    def spy(tokens, cu_seqlens, *args, **kwargs):
        seen.append((tokens.shape[0], cu_seqlens.tolist()))
        return original(tokens, cu_seqlens, *args, **kwargs)

    monkeypatch.setattr(model.encoder, "forward_packed", spy)
    out = model(_video(3, cfg.encoder), masks=[hidden])
    P = cfg.encoder.num_class_tokens
    lengths = [P + N - int(h.sum()) for h in hidden]
    assert seen == [(sum(lengths), [0, lengths[0], lengths[0] + lengths[1], sum(lengths)])]
    assert torch.isfinite(out["loss"])


def test_stage2_masks_with_host_counts():
    """view_masks gives (mask, host counts) pairs; forward takes them as they are or as bare
    masks with the same result, and a malformed pair is named."""
    torch.manual_seed(0)
    paper_views = [{"num_blocks": 8}, {"num_blocks": 2, "spatial_scale": [0.7, 0.7]}]
    cfg = override(TINY.stage2, {"encoder": {"depth": 1}, "predictor": {"depth": 1}, "views": paper_views})
    model = Stage2Model(cfg).eval()
    video = _video(3, cfg.encoder)
    views = model.view_masks(3, cfg.encoder.grid, "cpu", torch.Generator().manual_seed(4))
    assert len(views) == len(cfg.views)
    for hidden, counts in views:
        assert counts.device.type == "cpu" and torch.equal(counts, hidden.sum(1))
    with torch.no_grad():
        paired = model(video, masks=views)
        bare = model(video, masks=[h for h, _ in views])
        sampled = model(video, generator=torch.Generator().manual_seed(4))
    assert torch.equal(paired["loss"], bare["loss"]) and torch.equal(paired["loss"], sampled["loss"])
    with pytest.raises(ValueError, match=r"masks\[0\]: num_hidden must be a CPU tensor of shape \[3\]"):
        model(video, masks=[(views[0][0], views[0][1][:2]), views[1]])
    with pytest.raises(TypeError, match=r"masks\[1\] must be a bool\[B, N\] mask or a \(mask, num_hidden\)"):
        model(video, masks=[views[0], (views[1][0],)])


def test_stage2_future_and_past_views_hide_whole_token_steps():
    """Future views (``hide_last`` k) hide the last k token steps of every sample, past views
    (``hide_first``) the first; a mix with a multi-block view keeps that view's sampler; a view
    longer than the clip is named."""
    assert [v.hide_last for v in TINY.stage2.views] == [1]
    cfg = override(TINY.stage2, {"encoder": {"depth": 1}, "predictor": {"depth": 1}, "views": [{"hide_last": 1}, {"hide_last": 2}]})
    model = Stage2Model(cfg).eval()
    T, H, W = cfg.encoder.grid
    step = torch.arange(T * H * W) // (H * W)
    views = model.view_masks(3, cfg.encoder.grid, "cpu", torch.Generator().manual_seed(0))
    for (hidden, counts), k in zip(views, (1, 2)):
        assert torch.equal(hidden, (step >= T - k).expand(3, -1)) and counts.tolist() == [k * H * W] * 3
    with torch.no_grad():
        out = model(_video(2, cfg.encoder), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"]) and torch.equal(out["hidden1"], (step >= T - 2).expand(2, -1))

    mixed = override(cfg, {"views": [{"num_blocks": 2, "spatial_scale": [0.7, 0.7]}, {"hide_last": 1}]})
    m = Stage2Model(mixed)
    assert len(m.view_samplers) == 1
    (box, _), (last, _) = m.view_masks(2, mixed.encoder.grid, "cpu", torch.Generator().manual_seed(0))
    assert box[:, step < T - 1].any() and torch.equal(last, (step >= T - 1).expand(2, -1))

    past = Stage2Model(override(cfg, {"views": [{"hide_first": 1}]}))
    (first, n_first), = past.view_masks(2, cfg.encoder.grid, "cpu", None)
    assert torch.equal(first, (step < 1).expand(2, -1)) and n_first.tolist() == [H * W] * 2
    with pytest.raises(ValueError, match="not both"):
        override(cfg, {"views": [{"hide_first": 1, "hide_last": 1}]})
    too_long = Stage2Model(override(cfg, {"views": [{"hide_last": T}]}))
    with pytest.raises(ValueError, match=rf"views\[\]\.hide_last={T} must lie in \[1, {T - 1}\]"):
        too_long.view_masks(1, cfg.encoder.grid, "cpu", None)
    with pytest.raises(ValueError, match="hide_last"):
        override(cfg, {"views": [{"hide_last": -1}]})


def test_predictor_without_global_layers_attends_only_in_its_box():
    """``global_every: 0`` makes every layer local: with a 3x3x3 box each layer reaches one place
    further, so after ``depth`` layers a token changes nothing beyond that Chebyshev distance."""
    cfg = TINY.stage2.predictor
    assert cfg.global_every == 0 and cfg.local_window_3d == (3, 3, 3)
    assert not any(cfg.layer_is_global(cfg.first_layer_id + i) for i in range(cfg.depth))
    torch.manual_seed(0)
    grid = TINY.stage2.encoder.grid
    pred = Predictor(cfg, 96, grid).eval()
    T, H, W = grid
    N = T * H * W
    x = torch.randn(N, 96)
    index = torch.arange(N)
    y = x.clone()
    y[0] += 1.0  # the token at (t, h, w) = (0, 0, 0)
    with torch.no_grad():
        changed = (pred(x, index, 1, grid) - pred(y, index, 1, grid)).abs().reshape(N, -1).amax(1) > 0
    coords = torch.stack((index // (H * W), index // W % H, index % W), 1)
    reach = coords.amax(1)
    assert changed[0] and changed[reach <= 1].all()
    assert (reach > cfg.depth).any() and not changed[reach > cfg.depth].any()
    with pytest.raises(ValueError, match="global_every"):
        override(cfg, {"global_every": -1})


# --------------------------------------------------------------------------- alignment pairing


class _FixedTeacher(torch.nn.Module):
    """An ImageTeacher returning given outputs (so the test controls every teacher layer)."""

    def __init__(self, like: TinyTeacher, out: TeacherOutput):
        super().__init__()
        for name in ("layers", "feature_dim", "pooled_dim", "img_size", "patch_size", "mean", "std"):
            setattr(self, name, getattr(like, name))
        self.out = out
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a parameter, to check it stays frozen

    def forward(self, video: torch.Tensor) -> TeacherOutput:
        return self.out


def test_stage1_alignment_pairs_layer_i_with_teacher_layer_i():
    """Head i sees student block student_layers[i] and is scored against teacher layer i.

    Fails on the release's bug (every head fed the stacked outputs at a stale index) and on
    any permutation of the teacher layers.
    """
    torch.manual_seed(0)
    cfg = override(
        TINY.stage1,
        {"encoder": {"drop_path": 0.0, "num_frames": 4, "tubelet_size": 1}, "teacher": {"layers": [0, 1, 3]}, "align_layers": [1, 2, 3]},
    )
    model = Stage1Model(cfg).eval()
    with torch.no_grad():  # LayerScale starts at 1e-5, so consecutive blocks are nearly equal: separate them
        for block in model.encoder.blocks:
            block.ls1.gamma.fill_(1.0)
            block.ls2.gamma.fill_(1.0)
    video = _video(2, cfg.encoder, seed=5)
    K, B = 3, 2
    T, H, W = cfg.encoder.grid
    N = T * H * W

    # An independent evaluation: all blocks' outputs, visible rows found by boolean selection.
    with torch.no_grad():
        tout = model.teacher(model.teacher_input(video))
        hidden = ops.semantic_mask(tout.attn, kept_per_frame(cfg.mask_ratio, H * W), "topk")
        enc = model.encoder.forward_masked(video, hidden, return_layers=range(cfg.encoder.depth))
        vis = enc.index >= 0
        place = enc.index[vis]
        pos = model.align_pos.weight[0, place % N]
        student = {
            (i, blk): F.normalize(model.align_heads[i](enc.hidden[blk][vis] + pos), dim=-1)
            for i, blk in enumerate(cfg.align_layers)
        }
        # Teacher layer i := the mean direction of head i's correct output, the same at every token:
        # the right pairing scores well below 2, any other pairing near 2.
        u = torch.stack([F.normalize(student[i, blk].mean(0), dim=0) for i, blk in enumerate(cfg.align_layers)])
    features = u[None, :, None, None, :].expand(B, K, T, H * W, -1).contiguous()
    fixed = _FixedTeacher(model.teacher, TeacherOutput(features, tout.pooled, tout.attn))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("teacher.")}
    model = Stage1Model(cfg, teacher=fixed).eval()
    assert model.load_state_dict(state, strict=False).missing_keys == ["teacher.anchor"]

    seen_inputs: dict[int, torch.Tensor] = {}
    hooks = [
        head.register_forward_hook(lambda mod, args, out, i=i: seen_inputs.__setitem__(i, args[0].detach()))
        for i, head in enumerate(model.align_heads)
    ]
    out = model(video)
    for h in hooks:
        h.remove()
    assert torch.equal(out["hidden"], hidden)

    def loss(i: int, blk: int, layer: int) -> torch.Tensor:
        return (2 - 2 * (student[i, blk] @ u[layer])).mean()

    for i, blk in enumerate(cfg.align_layers):
        torch.testing.assert_close(seen_inputs[i], enc.hidden[blk][vis] + pos, rtol=1e-5, atol=1e-5)
        for other in set(cfg.align_layers) - {blk}:  # the check above can tell blocks apart
            assert (enc.hidden[other][vis] - enc.hidden[blk][vis]).abs().max() > 0.1
        expected = loss(i, blk, i)
        torch.testing.assert_close(out["align_per_layer"][i], expected, rtol=1e-5, atol=1e-5)
        for layer in set(range(K)) - {i}:
            assert float(loss(i, blk, layer) - expected) > 0.1
    torch.testing.assert_close(out["align"], out["align_per_layer"].mean())
    out["loss"].backward()
    assert model.teacher.anchor.grad is None and not model.teacher.anchor.requires_grad


# --------------------------------------------------------------------------- encoder packing


@pytest.fixture(params=[False, True])
def encoder64(request):
    """``(cfg, encoder)`` in float64, without and with RoPE: packing must not change a value
    beyond float64 rounding, whichever position scheme the encoder uses."""
    torch.manual_seed(0)
    cfg = override(TINY.stage1.encoder, {"use_rope": request.param, "depth": 2})
    return cfg, Encoder(cfg).double().eval()


def test_encoder_ragged_batch_equals_samples_alone(encoder64):
    cfg, enc = encoder64
    video = _video(3, cfg, seed=1).double()
    T, H, W = cfg.grid
    N = T * H * W
    g = torch.Generator().manual_seed(4)
    hidden = torch.rand(3, N, generator=g) < torch.tensor([[0.2], [0.9], [1.0]])  # 3rd sample: class tokens only
    out = enc.forward_masked(video, hidden, return_layers=[0])
    cu = out.cu_seqlens.tolist()
    assert cu[1] - cu[0] > cu[2] - cu[1] > cu[3] - cu[2] == cfg.num_class_tokens
    for b in range(3):
        alone = enc.forward_masked(video[b : b + 1], hidden[b : b + 1], return_layers=[0])
        torch.testing.assert_close(out.tokens[cu[b] : cu[b + 1]], alone.tokens, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.hidden[0][cu[b] : cu[b + 1]], alone.hidden[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.pooled[b], alone.pooled[0], rtol=1e-12, atol=1e-12)
        assert torch.equal(out.index[cu[b] : cu[b + 1]] - b * N * (out.index[cu[b] : cu[b + 1]] >= 0), alone.index)


def test_encoder_nothing_hidden_equals_full_clip(encoder64):
    cfg, enc = encoder64
    video = _video(2, cfg, seed=2).double()
    N = math.prod(cfg.grid)
    masked = enc.forward_masked(video, torch.zeros(2, N, dtype=torch.bool))
    full = enc(video)
    assert torch.equal(masked.cu_seqlens, full.cu_seqlens) and torch.equal(masked.index, full.index)
    torch.testing.assert_close(masked.tokens, full.tokens, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(masked.pooled, full.pooled, rtol=1e-12, atol=1e-12)
    tokens, pooled = enc.encode(video)
    assert tokens.shape == (2, N, cfg.width) and pooled.shape == (2, cfg.embed_dim)
    torch.testing.assert_close(tokens, full.tokens.view(2, -1, cfg.width)[:, cfg.num_class_tokens :], rtol=0, atol=0)


def test_encoder_other_grid_and_position_resampling():
    cfg = TINY.stage1.encoder
    enc = Encoder(cfg).eval()
    tokens, pooled = enc.encode(_video(1, cfg, frames=4, size=64))  # grid (2, 4, 4) instead of (4, 7, 7)
    assert tokens.shape == (1, 32, cfg.width) and torch.isfinite(tokens).all() and torch.isfinite(pooled).all()
    # Linear-in-time content, constant in space: bicubic keeps constants, linear keeps lines,
    # align_corners=False maps new frame i to old position (i + 1/2) * T0 / T - 1/2 (clamped).
    T0, T = 4, 7
    table = torch.arange(T0, dtype=torch.float32).repeat_interleave(9)[None, :, None].expand(1, T0 * 9, 5)
    out = resize_grid_table(table, (T0, 3, 3), (T, 2, 4)).view(T, 8, 5)
    src = ((torch.arange(T) + 0.5) * T0 / T - 0.5).clamp(0, T0 - 1)
    torch.testing.assert_close(out, src[:, None, None].expand(T, 8, 5), rtol=0, atol=1e-5)
    assert resize_grid_table(table, (T0, 3, 3), (T0, 3, 3)) is table
    # Class-token rows of the fixed table are zero; grid rows are distinct.
    fixed = sincos_3d(96, (2, 3, 3), num_prefix=4)
    assert fixed.shape == (22, 96) and fixed[:4].abs().max() == 0
    assert torch.cdist(fixed[4:], fixed[4:]).add(torch.eye(18)).min() > 0.1


def test_stage2_init_resamples_position_table():
    s1 = Encoder(TINY.stage1.encoder)
    cfg = override(TINY.stage2, {"encoder": {"num_frames": 16}})
    model = Stage2Model(cfg, init_encoder=s1)
    P = TINY.stage1.encoder.num_class_tokens
    want = resize_grid_table(s1.pos_embed.weight[:, P:].detach(), (4, 7, 7), (8, 7, 7))  # tubelets of 2 frames
    torch.testing.assert_close(model.encoder.pos_embed.weight[:, P:], want, rtol=0, atol=0)
    torch.testing.assert_close(model.target.pos_embed.weight[:, :P], s1.pos_embed.weight[:, :P], rtol=0, atol=0)
    torch.testing.assert_close(model.encoder.blocks[1].mlp.fc2.weight, s1.blocks[1].mlp.fc2.weight, rtol=0, atol=0)


def test_preprocess():
    enc = Encoder(TINY.stage1.encoder)
    frames = torch.zeros(2, 3, 4, 5, 3, dtype=torch.uint8)
    frames[..., 0] = 255
    frames[..., 2] = 51
    x = enc.preprocess(frames)
    assert x.shape == (2, 3, 3, 4, 5) and x.dtype == torch.float32
    want = [(1.0 - enc.mean[0]) / enc.std[0], (0.0 - enc.mean[1]) / enc.std[1], (0.2 - enc.mean[2]) / enc.std[2]]
    for c in range(3):
        torch.testing.assert_close(x[:, c], torch.full_like(x[:, c], want[c]), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        enc.preprocess(frames.float())
    with pytest.raises(ValueError, match="frames"):
        enc.preprocess(frames[..., :2])


def test_encoder_rejects_bad_video():
    enc = Encoder(TINY.stage1.encoder)
    with pytest.raises(ValueError, match="multiples of patch"):
        enc.encode(torch.zeros(1, 3, 4, 100, 112))
    with pytest.raises(ValueError, match="video must be"):
        enc.encode(torch.zeros(1, 4, 4, 112, 112))


# --------------------------------------------------------------------------- parameter counts


def _meta_params(cfg: EncoderConfig) -> int:
    with torch.device("meta"):
        enc = Encoder(cfg)
    assert all(p.is_meta for p in enc.parameters())
    return sum(p.numel() for p in enc.parameters())


def test_encoder_parameter_counts_match_method():
    base = _meta_params(get_preset("base").stage1.encoder)
    large = _meta_params(get_preset("large").stage1.encoder)
    giant = _meta_params(get_preset("1b").stage1.encoder)
    print(f"encoder parameters: base {base:,}  large {large:,}  1b {giant:,}")
    assert abs(base / 91e6 - 1) < 0.05, base
    assert abs(large / 0.3e9 - 1) < 0.05, large
    assert abs(giant / 1.0e9 - 1) < 0.05, giant


# --------------------------------------------------------------------------- predictor


def _rotate_half_rope(x: torch.Tensor, n: torch.Tensor, theta: float) -> torch.Tensor:
    """ModernBERT's RoPE on ``x[..., N, D]`` at positions ``n``: cat(freqs, freqs), rotate_half."""
    D = x.shape[-1]
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = n.to(torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat((-x2, x1), -1) * sin


def _reference_predictor(pred: Predictor, dense: torch.Tensor, grid) -> torch.Tensor:
    """Dense float64 ModernBERT-layer stack on ``dense[B, N, in]`` (mask token already at hidden places)."""
    cfg = pred.cfg
    B, N, _ = dense.shape
    x = pred.embed(dense) + pred.pos_embed.weight  # the input MLP at every place
    n = torch.arange(N)
    T, H, W = grid
    coords = torch.stack((n // (H * W), (n // W) % H, n % W), -1)
    heads, D = cfg.heads, cfg.width // cfg.heads
    for layer in pred.layers:
        h = layer.attn_norm(x)
        q, k, v = (h @ layer.attn.Wqkv.weight.T).view(B, N, 3, heads, D).permute(2, 0, 3, 1, 4)
        theta = cfg.global_rope_theta if layer.layer_id % cfg.global_every == 0 else cfg.local_rope_theta
        q, k = _rotate_half_rope(q, n, theta), _rotate_half_rope(k, n, theta)
        s = q @ k.transpose(-1, -2) / math.sqrt(D)
        if layer.layer_id % cfg.global_every != 0:
            if cfg.local_window_3d is None:
                allowed = (n[:, None] - n[None, :]).abs() <= cfg.local_window // 2
            else:
                half = torch.tensor(cfg.local_window_3d) // 2
                allowed = ((coords[:, None] - coords[None, :]).abs() <= half).all(-1)
            s = s.masked_fill(~allowed, float("-inf"))
        a = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, N, -1)
        x = x + a @ layer.attn.Wo.weight.T
        up, gate = (layer.mlp_norm(x) @ layer.mlp.Wi.weight.T).chunk(2, -1)
        x = x + (F.gelu(up) * gate) @ layer.mlp.Wo.weight.T
    return pred.final_norm(x)


@pytest.mark.parametrize("window_3d", [None, (1, 3, 3)])
def test_predictor_matches_dense_modernbert_reference(window_3d):
    torch.manual_seed(0)
    cfg = PredictorConfig(width=64, depth=3, heads=2, mlp_hidden=48, first_layer_id=0, local_window=9,
                          local_window_3d=window_3d, global_rope_theta=160000.0, local_rope_theta=10000.0)
    grid = (2, 3, 4)
    N = 24
    pred = Predictor(cfg, in_dim=40, grid=grid).double().eval()
    assert isinstance(pred.layers[0].attn_norm, torch.nn.Identity)  # ModernBERT layer 0
    assert [layer.is_global for layer in pred.layers] == [True, False, False]
    with torch.no_grad():
        pred.pos_embed.weight.normal_()
        for layer in pred.layers[1:]:
            layer.attn_norm.weight.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(3)
    grid_tokens = torch.randn(2, N, 40, generator=g, dtype=torch.float64)
    hidden = torch.rand(2, N, generator=g) < 0.6
    packed = ops.gather_visible(grid_tokens, hidden, prefix=torch.randn(1, 3, 40, dtype=torch.float64))
    out = pred(packed.tokens, packed.index, 2, grid)
    dense = torch.where(hidden[..., None], pred.mask_token.expand(2, N, 40), grid_tokens)
    torch.testing.assert_close(out, _reference_predictor(pred, dense, grid), rtol=1e-10, atol=1e-10)
    # The batch structure (cu_seqlens, coordinates) is made once and reused, so the attention's
    # window plans are too; another batch size gets its own.
    first = pred._structure(2, grid, torch.device("cpu"))
    assert all(a is b for a, b in zip(first, pred._structure(2, grid, torch.device("cpu"))))
    # Declared immutable (ops.static_structure): the Triton kernels reuse plans only for such tensors.
    from invnext.ops.attention import _STATIC_ATTR

    assert all(getattr(t, _STATIC_ATTR, False) for t in first if t is not None)
    assert pred._structure(3, grid, torch.device("cpu"))[0].tolist() == [0, N, 2 * N, 3 * N]
    assert torch.equal(pred(packed.tokens, packed.index, 2, grid), out)


def test_predictor_layer_pattern_of_modernbert_large_tail():
    pred_cfg = get_preset("base").stage1.predictor
    with torch.device("meta"):
        pred = Predictor(pred_cfg, in_dim=768, grid=(16, 16, 16))
    ids = [layer.layer_id for layer in pred.layers]
    assert ids == [23, 24, 25, 26, 27]
    assert [layer.is_global for layer in pred.layers] == [False, True, False, False, True]
    assert [layer.attn.window for layer in pred.layers] == [128, None, 128, 128, None]
    assert [layer.attn.theta for layer in pred.layers] == [10000.0, 160000.0, 10000.0, 10000.0, 160000.0]
    assert all(isinstance(layer.attn_norm, torch.nn.LayerNorm) and layer.attn_norm.bias is None for layer in pred.layers)
    layer = pred.layers[0]
    assert layer.attn.Wqkv.weight.shape == (3072, 1024) and layer.attn.Wqkv.bias is None
    assert layer.mlp.Wi.weight.shape == (5248, 1024) and layer.mlp.Wo.weight.shape == (1024, 2624)


# --------------------------------------------------------------------------- decoder


def test_decoder_zero_init_loss_and_sampling():
    torch.manual_seed(0)
    cfg = TINY.stage1.decoder
    dec = DiffusionDecoder(cfg, target_dim=12, cond_dim=8)
    M = 5
    cond = torch.randn(M, 8)
    x = torch.randn(M, 12)
    t = torch.tensor([0, 1, 500, 998, 999])
    assert torch.equal(dec(x, t, cond), torch.zeros(M, 24))  # zero-init output layer and modulations
    loss = dec.loss(cond, x.clamp(-1, 1), generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    # Same generator, same draws: the loss is reproducible.
    again = dec.loss(cond, x.clamp(-1, 1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss, again)
    _unzero_decoder(dec)
    a = dec.sample(cond, num_steps=4, generator=torch.Generator().manual_seed(1))
    b = dec.sample(cond, num_steps=4, generator=torch.Generator().manual_seed(1))
    c = dec.sample(cond, num_steps=4, temperature=0.0, generator=torch.Generator().manual_seed(2))
    assert a.shape == (M, 12) and torch.isfinite(a).all() and torch.equal(a, b) and not torch.equal(a, c)
    assert dec.schedule(cond.device, respace=4).num_steps == 4
    with pytest.raises(ValueError, match="target"):
        dec.loss(cond, x[:, :5])


@pytest.mark.requires_cuda
def test_decoder_loss_draws_on_the_gpu_from_a_cpu_generator():
    torch.manual_seed(0)
    dec = DiffusionDecoder(TINY.stage1.decoder, target_dim=12, cond_dim=8).cuda()
    _unzero_decoder(dec)
    cond, x = torch.randn(64, 8, device="cuda"), torch.rand(64, 12, device="cuda") * 2 - 1
    gen = torch.Generator().manual_seed(3)
    loss = dec.loss(cond, x, generator=gen)
    after_one = gen.get_state()
    assert loss.device.type == "cuda" and torch.isfinite(loss)
    # Deterministic given the CPU generator, which advances by exactly one draw (the seed).
    assert torch.equal(loss, dec.loss(cond, x, generator=torch.Generator().manual_seed(3)))
    probe = torch.Generator().manual_seed(3)
    torch.randint(0, 2**62, (1,), generator=probe)
    assert torch.equal(after_one, probe.get_state())


# --------------------------------------------------------------------------- teacher and io


def test_tiny_teacher_outputs():
    teacher = TinyTeacher(TINY.stage1.teacher).eval()
    video = torch.randn(2, 3, 3, 112, 112)
    out = teacher(video)
    assert out.features.shape == (2, 2, 3, 49, 64)
    assert out.pooled.shape == (2, 3, 64) and out.attn.shape == (2, 3, 49)
    torch.testing.assert_close(out.features.norm(dim=-1), torch.ones(2, 2, 3, 49))
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(2, 3))
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(2, 3))
    assert (out.attn >= 0).all()
    # Per frame: a frame's outputs do not depend on the other frames.
    alone = teacher(video[:, :, 1:2])
    torch.testing.assert_close(alone.features[:, :, 0], out.features[:, :, 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stem", ["linear", "conv"])
def test_teacher_patch_embed_option_builds_and_reloads(stem, tmp_path):
    cfg = override(TINY.stage1.teacher, {"patch_embed": stem, "img_size": 64, "depth": 2, "layers": [0, 1]})
    torch.manual_seed(0)
    teacher = TinyTeacher(cfg).eval()
    assert isinstance(teacher.patch_embed, ConvPatchEmbed if stem == "conv" else torch.nn.Linear)
    video = torch.randn(1, 3, 2, 64, 64)
    with torch.no_grad():
        out = teacher(video)
    assert out.features.shape == (1, 2, 2, 16, 64) and torch.isfinite(out.pooled).all()
    path = tmp_path / "teacher.safetensors"
    save_weights(teacher, path)
    torch.manual_seed(1)
    again = TinyTeacher(cfg)
    load_weights(again, path)
    with torch.no_grad():
        assert torch.equal(again.eval()(video).features, out.features)
    other = override(cfg, {"patch_embed": "linear" if stem == "conv" else "conv"})
    with pytest.raises(RuntimeError, match="patch_embed"):  # the other stem's weights do not fit
        load_weights(TinyTeacher(other), path)


def test_default_teacher_cache_records_its_stem_and_old_caches_still_load(tmp_path, monkeypatch):
    import json

    from invnext import teacher_pretrain as tp

    cfg = override(TINY.stage1.teacher, {"depth": 2, "layers": [0, 1]})
    assert cfg.patch_embed == "conv"  # the tiny preset's (and the default) teacher has the conv stem
    torch.manual_seed(0)
    teacher = TinyTeacher(cfg).eval()
    settings = tp._settings(cfg, (3, 2, 1), 0)
    assert settings["config"]["patch_embed"] == "conv" and settings["patch_embed"]["kind"] == "conv"
    save_weights(teacher, tmp_path / tp.WEIGHTS_NAME)
    # a cache written before TeacherConfig.patch_embed existed: no key in its configs
    old_cfg = {k: v for k, v in settings["config"].items() if k != "patch_embed"}
    record = {"settings": {**settings, "config": old_cfg}, "config": old_cfg, "stats": {}}
    (tmp_path / tp.CONFIG_NAME).write_text(json.dumps(record))
    monkeypatch.setattr(tp, "train_teacher", lambda *a, **k: pytest.fail("a valid cache must not be retrained"))
    assert tp.ensure_teacher(tmp_path, cfg=cfg, steps=(3, 2, 1)) == tmp_path / tp.WEIGHTS_NAME
    loaded = tp.load_default_teacher(tmp_path, cfg)
    assert isinstance(loaded.patch_embed, ConvPatchEmbed) and not loaded.training
    video = torch.randn(1, 3, 1, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(video).pooled, teacher(video).pooled)
    with pytest.raises(ValueError, match="patch_embed"):
        tp.load_default_teacher(tmp_path, override(cfg, {"patch_embed": "linear"}))


def test_save_load_weights_roundtrip(tmp_path):
    torch.manual_seed(0)
    a = Encoder(TINY.stage1.encoder)
    b = Encoder(TINY.stage1.encoder)
    path = tmp_path / "enc.safetensors"
    save_weights(a, path, metadata={"preset": "tiny"})
    assert path.read_bytes()[:2] != b"\x80\x02"  # not a pickle
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"preset": "tiny"}
        assert set(f.keys()) == set(a.state_dict())
    load_weights(b, path)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_predictor_init_scales_with_fan_in_where_configured():
    """ModernBERT's std 0.02 stays the default; "fan_in" (the tiny preset's) draws each Linear at 1/sqrt(fan-in)."""
    base = PredictorConfig(width=128, depth=1, heads=4, mlp_hidden=256, first_layer_id=0)
    grid = (2, 4, 4)
    assert TINY.stage1.predictor.init == "fan_in" and TINY.stage2.predictor.init == "fan_in"
    for init in ("modernbert", "fan_in"):
        torch.manual_seed(0)
        pred = Predictor(override(base, {"init": init}), 96, grid)
        for name, m in pred.named_modules():
            if isinstance(m, torch.nn.Linear):
                want = m.in_features**-0.5 if init == "fan_in" else 0.02
                # a normal cut at 2 std keeps 0.88 of its std
                got = float(m.weight.detach().std())
                assert got == pytest.approx(0.88 * want, rel=0.1), f"{init}: {name} std {got:.4f}, expected ~{0.88 * want:.4f}"
                assert float(m.weight.detach().abs().max()) <= 2 * want + 1e-7
