"""The bundled default dataset (moving sklearn digits) and its pretrained teacher."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from invnext import teacher_pretrain
from invnext.data import bundled
from invnext.data.check import run_data_check
from invnext.data.dataset import VideoDataset, read_index
from invnext.data.video import sample_indices
from invnext.models.layers import l2norm
from invnext.models.teacher import ImageTeacher, TinyTeacher
from invnext.teacher_pretrain import (
    ConvPatchEmbed,
    frame_forward,
    load_default_teacher,
    normalise_frames,
    render_clip_frames,
    teacher_stats,
    train_teacher,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = {"num_train": 24, "num_val": 10, "frames": 6, "size": 48, "teacher": False, "workers": 1}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache") / "default_data"
    return teacher_pretrain.ensure_default_dataset(root, **SMALL)


def test_small_dataset_is_valid_labelled_and_decodable(small):
    assert small.teacher_weights is None and (small.clip_frames, small.size) == (6, 48)
    manifest = json.loads((small.root / "manifest.json").read_text())
    assert manifest["version"] == bundled.DATA_VERSION and manifest["config"]["num_train"] == 24
    for split, n in (("train", 24), ("val", 10)):
        index = read_index(small.root / f"{split}.csv")
        assert len(index.entries) == n and index.label_columns == ("appearance", "dynamics")
        for e in index.entries:
            assert 0 <= int(e.labels["appearance"]) < 10 and 0 <= int(e.labels["dynamics"]) < 8
        assert run_data_check(small.root / f"{split}.csv", out=io.StringIO()) == 0
    ds = VideoDataset(small.val_index, num_frames=4, size=48, train=False)
    sample = ds[0]
    assert sample["video"].shape == (4, 48, 48, 3) and set(sample["labels"]) == {"appearance", "dynamics"}
    # nothing left behind by the atomic write
    assert sorted(p.name for p in small.root.parent.iterdir() if not p.name.endswith(".lock")) == ["default_data"]


def test_labels_are_balanced_over_pairs():
    labels = bundled._balanced_labels(160, np.random.default_rng(0))
    pairs, counts = np.unique(labels[:, 0] * 8 + labels[:, 1], return_counts=True)
    assert len(pairs) == 80 and (counts == 2).all()


def test_cache_is_reused_and_regenerated_on_a_config_change(small):
    stamp = (small.root / "train.csv").stat().st_mtime_ns
    again = teacher_pretrain.ensure_default_dataset(small.root, **SMALL)
    assert again == small and (small.root / "train.csv").stat().st_mtime_ns == stamp
    # a damaged cache (a clip gone) or another config is regenerated in place
    first = next(iter(sorted((small.root / "val").iterdir())))
    first.unlink()
    teacher_pretrain.ensure_default_dataset(small.root, **SMALL)
    assert first.is_file()
    other = teacher_pretrain.ensure_default_dataset(small.root, **{**SMALL, "num_val": 8})
    assert len(read_index(other.val_index).entries) == 8


def test_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INVNEXT_CACHE", str(tmp_path / "c"))
    assert bundled.default_cache_root() == tmp_path / "c" / "default_data"
    monkeypatch.delenv("INVNEXT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert bundled.default_cache_root() == tmp_path / "x" / "invnext" / "default_data"


def test_ensure_default_dataset_validates_arguments(tmp_path):
    with pytest.raises(ValueError, match="size must be even"):
        teacher_pretrain.ensure_default_dataset(tmp_path / "d", size=47)
    with pytest.raises(ValueError, match="num_train"):
        teacher_pretrain.ensure_default_dataset(tmp_path / "d", num_train=0)


def test_split_is_by_image_and_covers_every_digit():
    split = bundled.digit_split(0)
    (tr, tc), (va, vc) = split["train"], split["val"]
    assert len(tc) + len(vc) == 1797 and set(tc.tolist()) == set(vc.tolist()) == set(range(10))
    assert 0.24 < len(vc) / 1797 < 0.27
    # no val image is a train image
    train_rows = {row.tobytes() for row in tr.reshape(len(tr), -1)}
    assert sum(row.tobytes() in train_rows for row in va.reshape(len(va), -1)) == 0


def test_render_digits_places_the_digit():
    image = torch.zeros(1, 8, 8)
    image[0, 2:6, 2:6] = 1.0  # a filled square, 4/8 of the side
    out = bundled.render_digits(
        image, torch.tensor([[20.0, 40.0]]), torch.tensor([16.0]),
        torch.ones(1, 3), torch.zeros(1, 3), torch.zeros(1, 3), torch.zeros(1), 64,
    )  # fmt: skip
    lit = (out[0, :, :, 0] > 127).nonzero()
    # the square spans the middle half of a 16 px box centred at (20, 40): rows 16..23, cols 36..43
    assert lit[:, 0].min() == 16 and lit[:, 0].max() == 23 and lit[:, 1].min() == 36 and lit[:, 1].max() == 43
    assert out.dtype == torch.uint8 and out.shape == (1, 64, 64, 3)


def _centroids(frames: np.ndarray) -> np.ndarray:
    """Digit centroid (row, col) per frame, relative to the canvas centre: ``[..., 2]``."""
    grey = frames.astype(np.float64).mean(-1)
    w = np.clip(grey - np.median(grey, axis=(-2, -1), keepdims=True) - 40, 0, None)
    size = frames.shape[-2]
    idx = np.arange(size) - (size - 1) / 2
    total = w.sum((-2, -1))
    return np.stack([(w.sum(-1) * idx).sum(-1) / total, (w.sum(-2) * idx).sum(-1) / total], -1)


def test_dynamics_needs_frame_order_not_any_single_frame():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import PolynomialFeatures, StandardScaler

    rng = np.random.default_rng(0)
    images, _ = bundled.digit_split(0)["train"]
    n, frames, size = 400, 16, 64
    labels = bundled._balanced_labels(n, rng)[:, 1]
    clips = np.stack([bundled.make_clip(images[rng.integers(len(images))], int(d), frames, size, rng) for d in labels])
    picks = sample_indices(frames, 4)  # the evaluation frames a probe sees
    traj = _centroids(clips[:, picks]).reshape(n, -1)  # [n, 8] digit positions over time
    single = rng.integers(0, frames, n)
    one = clips[np.arange(n), single]  # one frame per clip, at a random time
    grey8 = one.astype(np.float64).mean(-1).reshape(n, 8, 8, 8, 8).mean((2, 4)).reshape(n, -1) / 255.0
    features = {
        "trajectory": PolynomialFeatures(2).fit_transform(traj),  # holds cross(p_t, p_t+1) and |p_t+1 - p_t|^2
        "single frame": np.concatenate(
            [grey8, PolynomialFeatures(2).fit_transform(_centroids(one)), single[:, None] / frames],
            axis=1,
        ),
    }
    acc = {}
    for name, x in features.items():
        x = StandardScaler().fit_transform(x)
        clf = LogisticRegression(max_iter=1000, C=1.0).fit(x[:300], labels[:300])
        acc[name] = clf.score(x[300:], labels[300:])
    chance = 1 / len(bundled.DYNAMICS)
    assert acc["trajectory"] > 0.9, acc
    assert acc["single frame"] < chance + 0.1, acc


def test_single_frame_geometry_does_not_depend_on_dynamics():
    """Exactly: every frame's angle on the circle is uniform; compare the per-class angle histograms."""
    rng = np.random.default_rng(1)
    t = 9
    angles = {}
    for d in range(len(bundled.DYNAMICS)):
        centres = np.stack([bundled.clip_geometry(d, t + 1, 112, rng)[0][t] for _ in range(2000)])
        rel = centres - centres.mean(0)
        angles[d] = np.histogram(np.arctan2(rel[:, 0], rel[:, 1]), bins=8, range=(-np.pi, np.pi))[0] / 2000
    for d, hist in angles.items():
        assert np.abs(hist - 1 / 8).max() < 0.035, (d, hist)


def test_conv_patch_embed_inverts_patchify():
    from invnext.models.layers import patchify

    embed = ConvPatchEmbed(8, 16)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = embed.feature_map(x).flatten(2).transpose(1, 2)
        tokens = embed(patchify(x[:, :, None], 16))
    assert tokens.shape == (2, 9, 8) and torch.equal(tokens, ref)
    with pytest.raises(ValueError, match="multiple of 4"):
        ConvPatchEmbed(8, 14)


def test_teacher_on_a_small_budget_learns_digits():
    from invnext.config import get_preset, override

    # a 64 px teacher (4x4 tokens) learns like the 112 px one per step, at a third of the cost
    cfg = override(get_preset("tiny").stage1.teacher, {"img_size": 64})
    torch.manual_seed(123)
    before = torch.rand(3)
    small, stats = train_teacher(cfg, stem_steps=150, pool_steps=60, steps=4, seed=0)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), before)  # the caller's RNG stream is left alone
    assert stats["val_accuracy"] > 0.25 and stats["val_accuracy_augmented"] > 0.25, stats  # chance: 0.1
    assert small.img_size == 64 and small.grid == (4, 4)


def test_teacher_matches_tiny_teacher_forward(monkeypatch):
    monkeypatch.setattr(teacher_pretrain, "EVAL_SAMPLES", 20)
    teacher, _ = train_teacher(stem_steps=2, pool_steps=2, steps=2, seed=0)
    assert isinstance(teacher, TinyTeacher) and isinstance(teacher, ImageTeacher)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    # frame_forward (batched SDPA) is TinyTeacher.forward (the packed op) on single frames
    frames, _ = render_clip_frames(bundled.digit_split(0)["val"], 6, 112, np.random.default_rng(0))
    x = normalise_frames(frames, teacher)
    with torch.no_grad():
        out = teacher(x.view(2, 3, 3, 112, 112).permute(0, 2, 1, 3, 4))
        pooled, attn = frame_forward(teacher, x)
    assert torch.allclose(out.pooled.reshape(6, -1), l2norm(pooled), atol=1e-5)
    assert torch.allclose(out.attn.reshape(6, -1), attn, atol=1e-6)
    assert out.features.shape == (2, 2, 3, 49, 64)


def test_default_teacher_is_cached_and_reloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(teacher_pretrain, "EVAL_SAMPLES", 20)
    with_teacher = {**SMALL, "teacher": True, "teacher_steps": (10, 5, 2)}
    data = teacher_pretrain.ensure_default_dataset(tmp_path / "d", **with_teacher)
    assert data.teacher_weights is not None and data.teacher_weights.is_file()
    stamp = data.teacher_weights.stat().st_mtime_ns
    assert teacher_pretrain.ensure_default_dataset(tmp_path / "d", **with_teacher) == data
    assert data.teacher_weights.stat().st_mtime_ns == stamp
    assert teacher_stats(data)["stem_steps"] == 10
    teacher = load_default_teacher(data)
    assert isinstance(teacher.patch_embed, ConvPatchEmbed) and not teacher.training
    x = torch.randn(1, 3, 2, 112, 112)
    with torch.no_grad():
        assert teacher(x).pooled.shape == (1, 2, 64)
    from invnext.config import get_preset, override

    other = override(get_preset("tiny").stage1.teacher, {"depth": 5, "layers": [1, 4]})
    with pytest.raises(ValueError, match="depth"):
        load_default_teacher(data, other)
    with pytest.raises(FileNotFoundError, match="no trained teacher"):
        load_default_teacher(tmp_path)
