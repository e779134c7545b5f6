"""invnext.eval probing: heads, multi-view clips, the feature cache, run_probe end to end.

Data: tiny synthetic clips written here (8 frames of 32x40, so crops move along the width)
with two labels: ``colour`` (6 background hues: linearly separable) and ``random`` (iid
uniform over 4 classes, independent of the pixels). The encoder: a 1-block random ViT saved
with ``save_encoder`` (so ``load_encoder`` reads it like any checkpoint).
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from invnext.config import ConfigError, EncoderConfig, TeacherConfig
from invnext.data.dataset import VideoDataset
from invnext.data.video import crop_resize, read_clip, sample_indices, write_video
from invnext.eval import sources
from invnext.eval.heads import AttentiveProbe, LinearProbe
from invnext.eval.probe import ProbeConfig, average_view_logits, confusion_matrix, run_probe, topk_accuracy
from invnext.eval.sources import TeacherSource, register_source
from invnext.eval.views import MultiViewDataset, clip_frame_indices, crop_boxes, parse_views
from invnext.loading import build_encoder, load_encoder, save_encoder
from invnext.models.encoder import Encoder
from invnext.models.teacher import TinyTeacher

T_CLIP, H, W = 8, 32, 40
N_TRAIN, N_VAL = 48, 48
HUES = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [200, 40, 200], [40, 200, 200]])
RANDOM_CLASSES = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_split(root, split: str, n: int, rng: np.random.Generator) -> str:
    os.makedirs(root / split, exist_ok=True)
    rows = []
    for i in range(n):
        colour = i % len(HUES)
        frames = HUES[colour][None, None, None, :] + rng.normal(0, 20, (T_CLIP, H, W, 3))
        y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
        for t in range(T_CLIP):  # a moving square of a random colour
            yy = (y + 2 * t) % (H - 8)
            frames[t, yy : yy + 8, x : x + 8] = rng.integers(0, 256, 3)
        name = f"{split}/{i:03d}.mp4"
        write_video(str(root / name), np.clip(frames, 0, 255).astype(np.uint8))
        rows.append((name, colour, int(rng.integers(0, RANDOM_CLASSES))))
    path = root / f"{split}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "colour", "random"])
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_data")
    rng = np.random.default_rng(0)
    train = _write_split(root, "train", N_TRAIN, rng)
    val = _write_split(root, "val", N_VAL, rng)
    torch.manual_seed(0)
    cfg = EncoderConfig(
        img_size=32, patch_size=8, num_frames=4, width=32, depth=1, heads=2, pool_heads=2, drop_path=0.0
    )
    enc_path = root / "encoder.safetensors"
    save_encoder(build_encoder(cfg), enc_path)
    return {"root": root, "train": train, "val": val, "encoder": str(enc_path)}


def _binomial_bounds(n: int, p: float, alpha: float = 1e-6) -> tuple[int, int]:
    """(lo, hi): P(X < lo) <= alpha and P(X > hi) <= alpha for X ~ Binomial(n, p)."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    lo = next(k for k in range(n + 1) if sum(pmf[: k + 1]) > alpha)
    hi = next(k for k in range(n, -1, -1) if sum(pmf[k:]) > alpha)
    return lo, hi


# --------------------------------------------------------------------------- heads and metrics


def test_heads_shapes_and_validation():
    torch.manual_seed(0)
    att = AttentiveProbe(24, 7, heads=3)
    x = torch.randn(5, 11, 24)
    out = att(x)
    assert out.shape == (5, 7) and out.dtype == torch.float32
    # the pooled vector of a clip does not depend on the order of its tokens (attention pooling)
    perm = torch.randperm(11)
    torch.testing.assert_close(att(x[:, perm]), out, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="heads=5 must divide dim=24"):
        AttentiveProbe(24, 7, heads=5)
    with pytest.raises(ValueError, match=r"tokens must be \[B, N >= 1, 24\]"):
        att(torch.randn(5, 11, 23))
    lin = LinearProbe(6, 3)
    f = torch.randn(40, 6, dtype=torch.float64) * 5 + 3
    lin.standardise(f)
    z = (f - f.mean(0)) / f.std(0, unbiased=False)
    torch.testing.assert_close(((f - lin.mean) / lin.std), z)
    with pytest.raises(ValueError, match=r"pooled must be \[B, 6\]"):
        lin(torch.randn(2, 5))


def _mha_pool(probe: AttentiveProbe, tokens: torch.Tensor) -> torch.Tensor:
    """The textbook formulation: project every token to k and v, one learned query, softmax per head."""
    B, N, C = tokens.shape
    H, D = probe.heads, C // probe.heads
    x = probe.norm_kv(tokens)
    k = probe.k(x).view(B, N, H, D)
    v = probe.v(x).view(B, N, H, D)
    q = probe.q(probe.query).view(H, D)
    a = torch.softmax(torch.einsum("hd,bnhd->bnh", q, k) / math.sqrt(D), dim=1)
    out = torch.einsum("bnh,bnhd->bhd", a, v).reshape(B, C)
    z = probe.query[:, 0] + probe.proj(out)
    return z + probe.mlp(probe.norm_mlp(z))


def test_attentive_pool_equals_multihead_attention_float64():
    torch.manual_seed(1)
    probe = AttentiveProbe(30, 4, heads=5).double()
    for p in probe.parameters():  # move off the init (zero biases, small weights) so every term matters
        p.data.normal_(0.0, 0.5)
    x = torch.randn(3, 13, 30, dtype=torch.float64, requires_grad=True)
    got, want = probe.pool(x), _mha_pool(probe, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, [x, *probe.parameters()], g, allow_unused=True)
    refs = torch.autograd.grad(want, [x, *probe.parameters()], g, allow_unused=True)
    for a, b in zip(grads, refs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_metrics():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    y = torch.tensor([1, 2, 2, 1])
    assert topk_accuracy(logits, y, 1) == 0.5
    assert topk_accuracy(logits, y, 2) == 0.75
    cm = confusion_matrix(logits.argmax(1), y, 3)
    assert cm.tolist() == [[0, 0, 0], [1, 1, 0], [1, 0, 1]]
    # multi-view averaging: the mean over views of [M, V, K] logits, computed in float64 here
    lv = torch.randn(4, 6, 5)
    torch.testing.assert_close(average_view_logits(lv), (lv.double().sum(1) / 6).float())
    with pytest.raises(ValueError, match=r"\[M, V, K\]"):
        average_view_logits(torch.randn(4, 5))


# --------------------------------------------------------------------------- views


def test_view_geometry():
    assert parse_views("2x3").clips == 2 and parse_views("2X3").crops == 3 and parse_views((1, 1)).count == 1
    with pytest.raises(ValueError, match="CLIPSxCROPS"):
        parse_views("2by3")
    # one clip = the dataset's evaluation sampling; two clips split the video into halves
    np.testing.assert_array_equal(clip_frame_indices(37, 5, 1)[0], sample_indices(37, 5))
    two = clip_frame_indices(40, 4, 2)
    np.testing.assert_array_equal(two, [[2, 7, 12, 17], [22, 27, 32, 37]])
    assert clip_frame_indices(3, 4, 2).max() == 2  # short videos repeat frames, never overflow
    assert crop_boxes(32, 40, 3) == [(0, 0, 32, 32), (0, 4, 32, 32), (0, 8, 32, 32)]
    assert crop_boxes(50, 30, 2) == [(0, 0, 30, 30), (20, 0, 30, 30)]
    assert crop_boxes(32, 40, 1) == [(0, 4, 32, 32)]


def test_multiview_dataset_views(data):
    one = MultiViewDataset(data["val"], 4, 16, parse_views("1x1"))[3]
    ref = VideoDataset(data["val"], 4, 16, train=False)[3]
    assert one["video"].shape == (1, 4, 16, 16, 3)
    torch.testing.assert_close(one["video"][0], ref["video"], rtol=0, atol=0)
    assert one["labels"] == ref["labels"]
    ds = MultiViewDataset(data["val"], 4, 16, parse_views("2x3"))
    item = ds[3]
    assert item["video"].shape == (6, 4, 16, 16, 3)
    frames = torch.from_numpy(read_clip(ds.index.entries[3].path, 8))  # the 8 frames = the 2 clips' 4 + 4
    idx = clip_frame_indices(T_CLIP, 4, 2)
    np.testing.assert_array_equal(idx.reshape(-1), np.arange(8))
    for c in range(2):
        for k, box in enumerate(crop_boxes(H, W, 3)):
            want = crop_resize(frames[torch.from_numpy(idx[c])], box, 16)
            torch.testing.assert_close(item["video"][c * 3 + k], want, rtol=0, atol=0)


# --------------------------------------------------------------------------- run_probe


@pytest.mark.parametrize("protocol", ["linear", "attentive"])
def test_probe_separable_and_shuffled(data, tmp_path, protocol):
    res = run_probe(
        data["encoder"],
        data["train"],
        data["val"],
        ProbeConfig(protocol=protocol, epochs=40, lr=3e-3, batch_size=16, frames=4, size=32),
        cache=tmp_path / "cache",
        out=tmp_path / "out",
        verbose=False,
    )
    colour, shuffled = res["results"]["colour"], res["results"]["random"]
    assert colour["num_classes"] == 6 and colour["top1"] >= 0.9 and colour["top5"] >= colour["top1"]
    assert shuffled["num_classes"] == RANDOM_CLASSES and "top5" not in shuffled  # top-5 only with > 5 classes
    # Val labels are iid uniform and independent of everything the probe saw, so its number of
    # hits is Binomial(n, 1/K) whatever it predicts: outside these bounds only with prob 2e-6.
    n = shuffled["val_clips"]
    lo, hi = _binomial_bounds(n, 1 / RANDOM_CLASSES)
    assert lo <= round(shuffled["top1"] * n) <= hi, (shuffled["top1"], lo / n, hi / n)

    # the JSON and the confusion matrices
    saved = json.loads((tmp_path / "out" / f"probe_{protocol}.json").read_text())
    assert saved["protocol"] == protocol and saved["settings"]["views"] == "1x1"
    assert saved["settings"]["epochs"] == 40 and saved["settings"]["frames"] == 4
    assert saved["results"]["colour"]["top1"] == colour["top1"]
    cm = np.array(saved["results"]["colour"]["confusion"])
    assert cm.shape == (6, 6) and cm.sum() == N_VAL and np.trace(cm) == round(colour["top1"] * N_VAL)
    import matplotlib.image as mpimg

    for name in ("colour", "random"):
        png = tmp_path / "out" / f"confusion_{protocol}_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(png)
        assert img.ndim == 3 and min(img.shape[:2]) >= 200


def test_feature_cache(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = Encoder.forward

    def spy(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Encoder, "forward", spy)
    kw = {"protocol": "attentive", "frames": 4, "size": 32, "label": "colour", "batch_size": 16}
    call = {"cache": tmp_path, "verbose": False}
    first = run_probe(data["encoder"], data["train"], data["val"], {**kw, "epochs": 2}, **call)
    assert calls["n"] > 0 and not first["features"]["train"]["cache_hit"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2

    # other probe settings and the other protocol: no encoder call at all
    calls["n"] = 0
    second = run_probe(data["encoder"], data["train"], data["val"], {**kw, "epochs": 3, "lr": 5e-4}, **call)
    linear = run_probe(data["encoder"], data["train"], data["val"], {**kw, "protocol": "linear", "epochs": 2}, **call)
    assert calls["n"] == 0
    assert second["features"]["train"]["cache_hit"] and second["features"]["val"]["cache_hit"]
    assert linear["features"]["val"]["cache_hit"]

    # other preprocessing: re-encoded, under a new key
    third = run_probe(data["encoder"], data["train"], data["val"], {**kw, "epochs": 2, "frames": 8}, **call)
    assert calls["n"] > 0 and not third["features"]["val"]["cache_hit"]
    assert third["features"]["val"]["cache"] != first["features"]["val"]["cache"]

    # a touched index file (same bytes, new mtime): re-encoded
    calls["n"] = 0
    st = os.stat(data["val"])
    os.utime(data["val"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fourth = run_probe(data["encoder"], data["train"], data["val"], {**kw, "epochs": 2}, **call)
    assert calls["n"] > 0 and fourth["features"]["train"]["cache_hit"] and not fourth["features"]["val"]["cache_hit"]


def test_multiview_probe(data, tmp_path):
    encoder = load_encoder(data["encoder"], verbose=False).train()  # an in-memory Encoder, as the trainer passes
    res = run_probe(
        encoder,
        data["train"],
        data["val"],
        ProbeConfig(protocol="linear", label="colour", views="2x3", epochs=20, lr=3e-3, batch_size=16, frames=4, size=32),
        cache=tmp_path,
        verbose=False,
    )
    assert res["features"]["val"]["views"] == 6 and res["features"]["train"]["views"] == 1
    assert res["settings"]["views"] == "2x3" and res["results"]["colour"]["top1"] >= 0.9
    assert encoder.training  # the caller's module comes back in its own mode
    from safetensors import safe_open

    with safe_open(res["features"]["val"]["cache"], "pt") as f:
        assert f.get_slice("pooled").get_shape() == [N_VAL, 6, 32]


def test_teacher_source_averages_frames(data, tmp_path, monkeypatch):
    cfg = TeacherConfig(
        kind="tiny", name="t", img_size=16, patch_size=8, width=32, depth=2, heads=2, layers=(0, 1), pooled_dim=24
    )
    torch.manual_seed(0)
    teacher = TinyTeacher(cfg).eval()
    src = TeacherSource(teacher, name="tiny-teacher")
    frames = torch.randint(0, 256, (2, 3, 32, 32, 3), dtype=torch.uint8)  # resized to the teacher's 16 px
    with torch.no_grad():
        tokens, pooled = src.encode(frames)
        x = frames.permute(0, 4, 1, 2, 3).double() / 255
        x = torch.nn.functional.interpolate(x.transpose(1, 2).reshape(6, 3, 32, 32), size=(16, 16), mode="bilinear")
        ref = teacher.double()(((x - 0.5) / 0.5).view(2, 3, 3, 16, 16).transpose(1, 2))
    torch.testing.assert_close(tokens.double(), ref.features[:, -1].mean(1), rtol=1e-5, atol=1e-6)  # [B, S, Ct]
    torch.testing.assert_close(pooled.double(), ref.pooled.mean(1), rtol=1e-5, atol=1e-6)  # [B, Cp]
    assert tokens.shape == (2, 4, 32) and pooled.shape == (2, 24)

    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))  # the registration ends with the test
    register_source("tinyteacher", lambda spec: TeacherSource(TinyTeacher(cfg), name=f"tinyteacher:{spec}"))
    res = run_probe(
        "tinyteacher:a",
        data["train"],
        data["val"],
        ProbeConfig(protocol="linear", label="colour", frames=2, epochs=20, lr=3e-3, batch_size=16),
        cache=tmp_path,
        verbose=False,
    )
    assert res["source"] == "tinyteacher:a" and res["settings"]["size"] == 16
    assert res["results"]["colour"]["top1"] >= 0.9


def test_probe_rejects_bad_arguments(data, tmp_path):
    with pytest.raises(ValueError, match="protocol must be one of"):
        run_probe(data["encoder"], data["train"], data["val"], {"protocol": "knn"}, cache=False)
    with pytest.raises(ValueError, match="CLIPSxCROPS"):
        run_probe(data["encoder"], data["train"], data["val"], ProbeConfig(views="6"), cache=False)
    with pytest.raises(ValueError, match="size=30 must be a multiple of the encoder's patch size 8"):
        run_probe(data["encoder"], data["train"], data["val"], ProbeConfig(size=30), cache=False, verbose=False)
    with pytest.raises(ValueError, match="label 'shape' is not a column of the train index"):
        run_probe(data["encoder"], data["train"], data["val"], {"label": "shape"}, cache=tmp_path)
    with pytest.raises(ConfigError, match=r"unknown key 'epoch' for ProbeConfig \(did you mean 'epochs'\?\)"):
        run_probe(data["encoder"], data["train"], data["val"], {"epoch": 2}, cache=tmp_path)
    with pytest.raises(ValueError, match=r"ProbeConfig\.batch_size: must be >= 1"):
        ProbeConfig(batch_size=0)
    with pytest.raises(TypeError, match=r"ProbeConfig\.epochs: expected"):
        ProbeConfig(epochs=2.5)
    assert not list(tmp_path.iterdir())  # refused before anything was encoded


def test_cli_probe(data, tmp_path, capsys):
    from invnext.cli import main

    out = tmp_path / "out"
    argv = [
        "probe",
        "--encoder",
        data["encoder"],
        "--train",
        data["train"],
        "--val",
        data["val"],
        "--protocol",
        "linear",
        "--label",
        "colour",
        "--epochs",
        "30",
        "--lr",
        "3e-3",
        "--batch-size",
        "16",
        "--frames",
        "4",
        "--size",
        "32",
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
    ]
    assert main(argv) == 0
    saved = json.loads((out / "probe_linear.json").read_text())
    assert list(saved["results"]) == ["colour"] and saved["results"]["colour"]["top1"] >= 0.9
    assert (out / "confusion_linear_colour.png").is_file()
    assert main(argv[:-4] + ["--views", "2by3", "--no-cache"]) == 2
    assert "invnext probe: error: views must be CLIPSxCROPS" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "no_metadata"])
def test_damaged_feature_cache_entry_is_re_encoded(data, tmp_path, damage):
    # A damaged entry crashed the probe with a raw SafetensorError although the cache promises a re-encode.
    from safetensors.torch import save_file

    kw = {"protocol": "linear", "frames": 4, "size": 32, "label": "colour", "batch_size": 16, "epochs": 1}
    call = {"cache": tmp_path, "verbose": False}
    first = run_probe(data["encoder"], data["train"], data["val"], kw, **call)
    entry = first["features"]["val"]["cache"]
    if damage == "truncated":
        raw = open(entry, "rb").read()
        open(entry, "wb").write(raw[: len(raw) // 2])
    elif damage == "garbage":
        open(entry, "wb").write(b"\xff" * 64)
    else:
        save_file({"pooled": torch.zeros(1, 1, 1)}, entry)
    again = run_probe(data["encoder"], data["train"], data["val"], kw, **call)
    assert not again["features"]["val"]["cache_hit"] and again["features"]["train"]["cache_hit"]
    assert again["results"]["colour"]["top1"] == first["results"]["colour"]["top1"]
    assert run_probe(data["encoder"], data["train"], data["val"], kw, **call)["features"]["val"]["cache_hit"]  # rewritten
