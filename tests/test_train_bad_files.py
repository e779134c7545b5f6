"""The trainer over a real video folder that holds a truncated mp4 and a text file named ``.mp4``."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from invnext.cli import main
from invnext.data.video import write_video

SETS = [
    "model.overrides.encoder={depth: 2, num_frames: 2, img_size: 32, width: 32, heads: 2, pool_heads: 2}",
    "model.overrides.predictor={depth: 1, width: 32, heads: 2, mlp_hidden: 32}",
    "model.overrides.decoder={depth: 1, width: 32}",
    "model.overrides.teacher={img_size: 32, depth: 2, layers: [0, 1], width: 16, heads: 1, pooled_dim: 16}",
    "teacher=random",
    "data.workers=0",
    "schedule={steps: 3, warmup_steps: 1}",
    "batch={global_size: 4, per_device: 4}",
    "save_every=3",
    "log_every=1",
    "progress=false",
    "tensorboard=false",
    "threads=1",
]


pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def _clip(seed: int, frames: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(frames, 40, 48, 3), dtype=np.uint8)


def test_training_skips_and_names_a_truncated_mp4_and_a_text_file(tmp_path, capsys, caplog):
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(4):
        write_video(str(videos / f"good_{i}.mp4"), _clip(i), fps=8)
    whole = tmp_path / "whole.mp4"
    write_video(str(whole), _clip(9), fps=8)
    data = whole.read_bytes()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (videos / "text.mp4").write_text("not a video, only text\n")

    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="invnext.data"):
        code = main(["pretrain", "--stage", "1", "--preset", "tiny", "--out", str(out),
                     "--set", f"data.source={videos}", *[a for s in SETS for a in ("--set", s)]])
    assert code == 0
    logged = caplog.text + capsys.readouterr().out
    for name in ("truncated.mp4", "text.mp4"):
        assert name in logged, f"{name} is not named in the log"
    assert "good_" not in caplog.text, "a good file was reported as bad"

    summary = json.loads((out / "stage1" / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 3
    assert summary["bad_files"] == 2
    recs = [json.loads(line) for line in (out / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in recs)


@pytest.mark.parametrize("files", [2, 16])  # every file seen within the run / only some of them drawn
def test_a_source_of_only_bad_videos_stops_with_an_error_naming_it(tmp_path, capsys, files):
    # It used to exit 0 ("final loss n/a") after optimizer steps on zero gradients, whose weight
    # decay alone changed the weights.
    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(files):
        (videos / f"text_{i}.mp4").write_text("not a video\n")
    out = tmp_path / "run"
    code = main(["pretrain", "--stage", "1", "--preset", "tiny", "--out", str(out),
                 "--set", f"data.source={videos}", *[a for s in SETS for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 1
    assert f"no readable clip in the data source {videos}" in err and f"invnext data check {videos}" in err
    assert not (out / "stage1" / "checkpoints").exists() and not (out / "stage1" / "summary.json").exists()
