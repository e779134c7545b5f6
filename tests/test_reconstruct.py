"""invnext.eval.reconstruct on a tiny randomly initialised Stage-1 model and a tiny mp4 written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from invnext.config import DecoderConfig, EncoderConfig, PredictorConfig, Stage1Config, TeacherConfig
from invnext.data.video import write_video
from invnext.eval.reconstruct import GAP, grid_image, load_stage1, reconstruct, unpatchify
from invnext.loading import config_metadata, save_encoder
from invnext.models import Stage1Model, save_weights
from invnext.models.layers import patchify

S = 32  # encoder input side; patch 8 -> a 4x4 grid per frame


def _cfg() -> Stage1Config:
    return Stage1Config(
        encoder=EncoderConfig(
            img_size=S, patch_size=8, num_frames=4, width=32, depth=2, heads=2, pool_heads=2, drop_path=0.0
        ),
        predictor=PredictorConfig(width=32, depth=1, heads=2, mlp_hidden=64, first_layer_id=0, local_window=8),
        decoder=DecoderConfig(width=32, depth=1, sample_steps=5),
        teacher=TeacherConfig(
            kind="tiny", name="tiny", img_size=S, patch_size=8, width=32, depth=2, heads=2, layers=(0, 1), pooled_dim=16
        ),
    )


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon")
    torch.manual_seed(0)
    model = Stage1Model(_cfg())
    with_teacher = root / "with_teacher.safetensors"
    save_weights(model, with_teacher, metadata=config_metadata(model.cfg))
    # the trainer's checkpoints leave the frozen teacher out
    trainer_style = root / "stage1" / "model.safetensors"
    trainer_style.parent.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("teacher.")}
    save_file(state, str(trainer_style), metadata=config_metadata(model.cfg))
    rng = np.random.default_rng(0)
    video = root / "clip.mp4"
    write_video(str(video), rng.integers(0, 256, (6, 48, 64, 3), dtype=np.uint8))
    return {"root": root, "with_teacher": with_teacher, "trainer": trainer_style, "video": video, "model": model}


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 6, 12, 20, dtype=torch.float64)
    p = patchify(x, 4, 2)
    torch.testing.assert_close(unpatchify(p, (3, 3, 5), 4, 2), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit grid"):
        unpatchify(p, (3, 3, 4), 4, 2)


def _check_rows(res, frames: int):
    rows = res["rows"]
    hidden = res["hidden"].view(frames, S // 8, S // 8)  # (t, h, w) raster
    pix_hidden = hidden.repeat_interleave(8, 1).repeat_interleave(8, 2).numpy()  # [T, S, S]
    orig, masked, recon = rows["original"], rows["masked"], rows["reconstructed"]
    for r in (orig, masked, recon):
        assert r.shape == (frames, S, S, 3) and r.dtype == np.uint8
    # visible pixels pass through untouched; hidden ones are grey in the masked row
    np.testing.assert_array_equal(recon[~pix_hidden], orig[~pix_hidden])
    np.testing.assert_array_equal(masked[~pix_hidden], orig[~pix_hidden])
    assert set(np.unique(masked[pix_hidden]).tolist()) <= {127, 128}
    assert not np.array_equal(recon[pix_hidden], orig[pix_hidden])  # sampled, not copied
    return hidden


def test_reconstruct_semantic_with_the_files_teacher(files, tmp_path):
    out = tmp_path / "grid.png"
    res = reconstruct(files["with_teacher"], files["video"], steps=5, frames=4, out=out, seed=1, device="cpu")
    assert res["mask"] == "semantic" and "teacher.*" in res["teacher"]
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (4 * S + 5 * GAP, 3 * S + 4 * GAP)  # (width, height)
        png = np.asarray(im.convert("RGB"))
    rows = res["rows"]
    np.testing.assert_array_equal(png, grid_image([rows["original"], rows["masked"], rows["reconstructed"]]))
    hidden = _check_rows(res, 4)
    # Stage 1's semantic mask keeps the same number of tokens in every frame: 16 - round(0.8 * 16) = 3
    assert hidden.flatten(1).logical_not().sum(1).tolist() == [3, 3, 3, 3]
    assert res["hidden_fraction"] == pytest.approx(13 / 16)
    assert np.isfinite(res["psnr_hidden"])
    # the baseline paints hidden pixels with the clip's mean colour: recompute it from the rows
    orig = rows["original"].astype(np.float64) / 255.0
    pix_hidden = hidden.repeat_interleave(8, 1).repeat_interleave(8, 2).numpy()
    mse = ((orig[pix_hidden] - orig.reshape(-1, 3).mean(0)) ** 2).mean()
    assert res["psnr_hidden_mean_colour"] == pytest.approx(-10 * np.log10(mse), abs=0.05)
    # same seed, same picture
    again = reconstruct(
        files["with_teacher"], files["video"], steps=5, frames=4, out=tmp_path / "b.png", seed=1, device="cpu"
    )
    np.testing.assert_array_equal(again["rows"]["reconstructed"], rows["reconstructed"])


def test_reconstruct_tube_fallback_on_trainer_checkpoint(files, tmp_path, monkeypatch):
    monkeypatch.setenv("INVNEXT_CACHE", str(tmp_path / "empty_cache"))  # no default teacher to fall back on
    res = reconstruct(files["trainer"].parent, files["video"], steps=4, frames=2, out=tmp_path / "t.png", device="cpu")
    assert res["mask"] == "tube" and res["teacher"].startswith("none")
    from PIL import Image

    with Image.open(tmp_path / "t.png") as im:
        assert im.size == (2 * S + 3 * GAP, 3 * S + 4 * GAP)
    hidden = _check_rows(res, 2)
    assert torch.equal(hidden[0], hidden[1]) and int(hidden[0].sum()) == 13  # a tube: one spatial mask for all frames


def test_load_stage1_parts_match_the_model(files):
    parts = load_stage1(files["with_teacher"], teacher="auto")
    model = files["model"]
    for name in ("encoder", "predictor", "decoder", "teacher"):
        ours, theirs = getattr(parts, name).state_dict(), getattr(model, name).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_reconstruct_rejects_bad_input(files, tmp_path):
    enc_only = tmp_path / "enc.safetensors"
    save_encoder(files["model"].encoder, enc_only)
    with pytest.raises(ValueError, match="not a Stage-1 checkpoint"):
        reconstruct(enc_only, files["video"], device="cpu")
    with pytest.raises(ValueError, match=r"steps must be an int in \[2, 1000\]"):
        reconstruct(files["with_teacher"], files["video"], steps=1, device="cpu")
    with pytest.raises(ValueError, match="mask='semantic' needs a teacher"):
        reconstruct(files["with_teacher"], files["video"], mask="semantic", teacher="none", device="cpu")
    with pytest.raises(ValueError, match="is not a file"):
        reconstruct(files["with_teacher"], tmp_path / "missing.mp4", device="cpu")


def test_cli_reconstruct(files, tmp_path, capsys):
    from invnext.cli import main

    out = tmp_path / "cli.png"
    argv = [
        "reconstruct",
        "--checkpoint",
        str(files["with_teacher"]),
        "--video",
        str(files["video"]),
        "--steps",
        "3",
        "--frames",
        "4",
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert '"mask": "semantic"' in capsys.readouterr().out
    from PIL import Image

    with Image.open(out) as im:
        assert im.size == (4 * S + 5 * GAP, 3 * S + 4 * GAP)
    assert main(argv[:-2] + ["--steps", "1"]) == 2
    assert "steps must be an int in [2, 1000]" in capsys.readouterr().err


def test_reconstruct_a_tubelet_encoder_with_the_teachers_frames_averaged(tmp_path, files):
    """Tubelet 2: the teacher's 4 frames make 2 token steps; frames default to the encoder's."""
    cfg = _cfg()
    cfg = Stage1Config(**{**cfg.__dict__, "encoder": EncoderConfig(**{**cfg.encoder.__dict__, "tubelet_size": 2})})
    torch.manual_seed(0)
    model = Stage1Model(cfg)
    path = tmp_path / "tubelet.safetensors"
    save_weights(model, path, metadata=config_metadata(model.cfg))
    res = reconstruct(path, files["video"], steps=5, out=tmp_path / "t.png", seed=1, device="cpu")
    assert res["frames"] == 4 and res["mask"] == "semantic"
    hidden = res["hidden"].view(2, 4, 4)
    assert (hidden.flatten(1).sum(1) == hidden[0].sum()).all()  # the same count per token step
    assert res["rows"]["original"].shape == (4, S, S, 3)
