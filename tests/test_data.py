"""Video data: index parsing, sparse sampling, transforms, decoding real mp4 files, bad files, ``data check``."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch

from invnext.data.check import run_data_check
from invnext.data.dataset import (
    BadFileLog,
    BadSample,
    VideoDataset,
    VideoLoader,
    collate_videos,
    read_index,
)
from invnext.data.video import (
    DecodeError,
    crop_resize,
    eval_transform,
    make_reader,
    random_resized_crop_box,
    read_clip,
    sample_indices,
    to_model_input,
    train_transform,
    write_video,
)

FPS = 10


def colour_of(t: int) -> tuple[int, int, int]:
    """A distinct, yuv420p-safe flat colour for frame t."""
    return (20 + 20 * t, 230 - 15 * t, 60 + 10 * (t % 5))


def solid_clip(num: int, h: int = 48, w: int = 64) -> np.ndarray:
    frames = np.empty((num, h, w, 3), dtype=np.uint8)
    for t in range(num):
        frames[t] = colour_of(t)
    return frames


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder with 3 good clips (10, 7, 3 frames), a truncated mp4 and a text file named .mp4."""
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    write_video(str(root / "a.mp4"), solid_clip(10), fps=FPS)
    write_video(str(root / "sub" / "b.mp4"), solid_clip(7), fps=FPS)
    write_video(str(root / "c.mp4"), solid_clip(3), fps=FPS)
    full = root / "full.mp4"
    write_video(str(full), solid_clip(10), fps=FPS)
    data = full.read_bytes()
    full.unlink()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (root / "notes.mp4").write_text("this is a text file, not a video\n")
    (root / "readme.txt").write_text("ignored")
    return root


# --------------------------------------------------------------------------- index


def test_csv_index_relative_paths_window_and_labels(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "index.csv").write_text(
        "path,start,end,label,camera\nclips/x.mp4,1.5,3,run,7\n/abs/y.mp4,,,jump,\nclips/z.mp4,0,,run,2\n"
    )
    index = read_index(tmp_path / "index.csv")
    assert index.kind == "csv"
    assert index.label_columns == ("label", "camera")
    e = index.entries
    assert [x.path for x in e] == [str(tmp_path / "clips" / "x.mp4"), "/abs/y.mp4", str(tmp_path / "clips" / "z.mp4")]
    assert (e[0].start, e[0].end) == (1.5, 3.0)
    assert (e[1].start, e[1].end) == (None, None)
    assert (e[2].start, e[2].end) == (0.0, None)
    assert e[0].labels == {"label": "run", "camera": "7"}


def test_jsonl_index_keeps_unknown_keys_as_labels(tmp_path):
    lines = [
        {"path": "v/a.mp4", "label": 3, "appearance": 1},
        {"path": "v/b.mp4", "start": 0.5, "end": 2.0, "label": 4, "dynamics": 5},
    ]
    (tmp_path / "i.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    index = read_index(tmp_path / "i.jsonl")
    assert index.kind == "jsonl"
    assert index.label_columns == ("label", "appearance", "dynamics")
    assert index.entries[1].path == str(tmp_path / "v" / "b.mp4")
    assert (index.entries[1].start, index.entries[1].end) == (0.5, 2.0)
    assert index.entries[0].labels == {"label": "3", "appearance": "1", "dynamics": ""}


def test_folder_index_is_recursive_sorted_and_filtered(videos):
    index = read_index(videos)
    names = [p.removeprefix(str(videos) + "/") for p in (e.path for e in index.entries)]
    assert names == ["a.mp4", "c.mp4", "notes.mp4", "sub/b.mp4", "truncated.mp4"]
    assert index.kind == "folder" and index.label_columns == ()


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("i.csv", "file,label\na.mp4,1\n", "'path' column"),
        ("i.csv", "path,start,end\na.mp4,2,1\n", r"i.csv:2: end \(1.0\) must be greater than start"),
        ("i.csv", "path,start\na.mp4,soon\n", "start must be a number"),
        ("i.csv", "path,label\n,1\n", "empty or missing 'path'"),
        ("i.jsonl", '{"path": "a.mp4"}\n{"path": \n', r"i.jsonl:2: not valid JSON"),
        ("i.jsonl", '{"file": "a.mp4"}\n', r"i.jsonl:1: no 'path' key"),
        ("i.jsonl", "[1, 2]\n", "must be a JSON object"),
        ("i.csv", "path,label\n", "no entries"),
        ("i.txt", "a.mp4\n", "must be a folder, a .csv or a .jsonl"),
    ],
)
def test_invalid_index_raises_naming_the_problem(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=match):
        read_index(tmp_path / name)


def test_missing_index_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_index(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="no video files"):
        read_index(tmp_path)


# --------------------------------------------------------------------------- sampling


def test_eval_sampling_takes_segment_centres():
    assert sample_indices(16, 4).tolist() == [2, 6, 10, 14]
    assert sample_indices(10, 5).tolist() == [1, 3, 5, 7, 9]
    # shorter than T: frames repeat, in order
    assert sample_indices(3, 4).tolist() == [0, 1, 1, 2]
    assert sample_indices(1, 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="num_available"):
        sample_indices(0, 4)
    with pytest.raises(ValueError, match="num_frames"):
        sample_indices(5, 0)


@pytest.mark.parametrize("n, T", [(16, 4), (37, 5), (7, 3), (3, 8)])
def test_train_sampling_jitters_inside_each_segment(n, T):
    rng = np.random.default_rng(0)
    draws = np.stack([sample_indices(n, T, rng) for _ in range(400)])
    lo = np.floor(np.arange(T) * n / T).astype(int)
    hi = np.ceil((np.arange(T) + 1) * n / T).astype(int) - 1
    assert (draws >= lo).all() and (draws <= hi).all()
    if n >= T:  # every frame of a segment is reachable (and nothing else)
        for i in range(T):
            assert set(draws[:, i].tolist()) == set(range(lo[i], hi[i] + 1))
    assert (np.diff(draws, axis=1) >= 0).all()


# --------------------------------------------------------------------------- transforms


def test_crop_box_respects_scale_ratio_and_bounds():
    rng = np.random.default_rng(1)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(90, 160, rng, (0.3, 0.8), (0.75, 4 / 3))
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 160
        assert 0.3 * 0.9 <= h * w / (90 * 160) <= 0.8 * 1.1  # rounding of the sides
        assert 0.75 * 0.9 <= w / h <= 4 / 3 * 1.1
    # an impossible draw falls back to the largest centred box with the aspect clamped
    box = random_resized_crop_box(10, 200, np.random.default_rng(0), (0.99, 1.0), (1.0, 1.0))
    assert box == (0, 95, 10, 10)


def tent_weights(n_in: int, n_out: int) -> torch.Tensor:
    """float64 [n_out, n_in]: the antialiased (downscaling) linear interpolation matrix, half-pixel centres."""
    scale = n_in / n_out
    centre = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5
    x = torch.arange(n_in, dtype=torch.float64)
    w = (1 - (x[None, :] - centre[:, None]).abs() / scale).clamp_min(0)
    return w / w.sum(1, keepdim=True)


def test_crop_resize_identity_flip_and_antialiased_downscale():
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (3, 20, 30, 3), dtype=torch.uint8, generator=g)
    same = crop_resize(video, (2, 5, 12, 12), 12)
    assert torch.equal(same, video[:, 2:14, 5:17])
    assert torch.equal(crop_resize(video, (2, 5, 12, 12), 12, flip=True), video[:, 2:14, 5:17].flip(2))
    # an antialiased downscale by s: a triangle filter stretched by s, weights renormalised at the border
    small = crop_resize(video, (0, 4, 20, 25), 10)
    ref = torch.einsum("ih,jw,thwc->tijc", tent_weights(20, 10), tent_weights(25, 10), video[:, :, 4:29].double())
    assert small.dtype == torch.uint8 and small.shape == (3, 10, 10, 3)
    assert (small.double() - ref).abs().max() <= 0.5 + 1e-6


def test_eval_transform_takes_the_centred_square():
    video = torch.zeros(2, 32, 64, 3, dtype=torch.uint8)
    video[:, :, :32, 0] = 255  # left half red
    video[:, :, 32:, 2] = 255  # right half blue
    out = eval_transform(video, 16)
    assert out.shape == (2, 16, 16, 3) and out.dtype == torch.uint8
    # the centred 32x32 square spans columns 16..47: half red, half blue
    assert (out[:, :, :7, 0] == 255).all() and (out[:, :, :7, 2] == 0).all()
    assert (out[:, :, 9:, 2] == 255).all() and (out[:, :, 9:, 0] == 0).all()


def test_train_transform_is_deterministic_given_the_generator():
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (4, 40, 50, 3), dtype=torch.uint8, generator=g)
    a = train_transform(video, 24, np.random.default_rng(5))
    b = train_transform(video, 24, np.random.default_rng(5))
    c = train_transform(video, 24, np.random.default_rng(6))
    assert a.shape == (4, 24, 24, 3) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="uint8"):
        train_transform(video.float(), 24, np.random.default_rng(0))


def test_to_model_input_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    video = torch.randint(0, 256, (2, 3, 5, 7, 3), dtype=torch.uint8, generator=g)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = to_model_input(video, mean, std)
    ref = (video.double() / 255 - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(std, dtype=torch.float64)
    ref = ref.permute(0, 4, 1, 2, 3)
    assert out.shape == (2, 3, 3, 5, 7) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max() < 1e-5
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(video.float(), mean, std)


# --------------------------------------------------------------------------- decoding


def test_real_mp4_decodes_with_frame_count_and_colours(videos):
    clip = read_clip(str(videos / "a.mp4"), 5)
    assert clip.shape == (5, 48, 64, 3) and clip.dtype == np.uint8
    for got, t in zip(clip, [1, 3, 5, 7, 9]):  # the segment centres of 10 frames
        assert np.abs(got.astype(int) - np.array(colour_of(t))).max() <= 6, t
    # a [0.3, 0.8) s window at 10 fps holds frames 3..7
    window = read_clip(str(videos / "a.mp4"), 5, start=0.3, end=0.8)
    for got, t in zip(window, [3, 4, 5, 6, 7]):
        assert np.abs(got.astype(int) - np.array(colour_of(t))).max() <= 6, t


def test_reader_reports_counts_and_empty_windows(videos):
    reader = make_reader("pyav")
    seen = []
    frames, info = reader.read(str(videos / "sub" / "b.mp4"), None, None, lambda n: seen.append(n) or np.arange(n))
    assert seen == [7] and info.num_frames == 7 and frames.shape == (7, 48, 64, 3)
    with pytest.raises(DecodeError, match="no decodable frames"):
        reader.read(str(videos / "c.mp4"), 50.0, 60.0, lambda n: np.zeros(1, dtype=np.int64))
    # bounds between frames: the nearest frame to each bound counts (frames 3..8 of [0.31, 0.86) s at 10 fps)
    seen.clear()
    frames, info = reader.read(str(videos / "a.mp4"), 0.31, 0.86, lambda n: seen.append(n) or np.arange(n))
    assert seen == [6] and info.num_frames == 6
    for got, t in zip(frames, range(3, 9)):
        assert np.abs(got.astype(int) - np.array(colour_of(t))).max() <= 6, t


def test_reader_recounts_when_the_metadata_is_wrong(videos, monkeypatch, tmp_path):
    from invnext.data.video import PyAVReader

    monkeypatch.setattr(PyAVReader, "_claimed", staticmethod(lambda stream, start, end: 13))
    seen = []
    frames, info = make_reader("pyav").read(
        str(videos / "a.mp4"), None, None, lambda n: seen.append(n) or sample_indices(n, 5)
    )
    assert seen == [13, 10] and (info.num_frames, info.claimed_frames) == (10, 13)
    for got, t in zip(frames, [1, 3, 5, 7, 9]):
        assert np.abs(got.astype(int) - np.array(colour_of(t))).max() <= 6, t
    out = io.StringIO()
    assert run_data_check(videos / "a.mp4", out=out) == 2  # a video is not an index
    index = write_index(tmp_path, [(str(videos / "a.mp4"), 1)])
    assert run_data_check(index, out=out) == 0
    assert "metadata claims 13 frames, 10 decodable" in out.getvalue()


def test_optional_decoders_fail_with_install_hint():
    for name in ("torchcodec", "decord"):
        try:
            __import__(name)
        except ImportError:
            with pytest.raises(ImportError, match=f"pip install {name}"):
                make_reader(name)
    with pytest.raises(ValueError, match="decoder must be one of"):
        make_reader("ffmpeg-cli")


# --------------------------------------------------------------------------- dataset


def write_index(root, rows) -> str:
    path = root / "index.csv"
    path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    return str(path)


def test_dataset_samples_are_reproducible_per_seed_epoch_index(videos):
    index = write_index(videos, [("a.mp4", "x"), ("sub/b.mp4", "y"), ("c.mp4", "x")])
    ds = VideoDataset(index, num_frames=4, size=16, train=True, seed=3)
    assert ds.label_classes == {"label": ("x", "y")} and ds.num_classes("label") == 2
    first = ds[0]
    assert first["video"].shape == (4, 16, 16, 3) and first["video"].dtype == torch.uint8
    assert first["labels"] == {"label": 0} and ds[1]["labels"] == {"label": 1}
    # the same (seed, epoch, index): the same sample, whatever was drawn before or in which process
    _ = ds[2]
    assert torch.equal(ds[0]["video"], first["video"])
    # per-epoch reseeding changes the frames; going back restores them
    by_epoch = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        by_epoch.append(ds.frame_indices(0, 40).tolist())
    assert len({tuple(x) for x in by_epoch}) > 1
    ds.set_epoch(0)
    assert torch.equal(ds[0]["video"], first["video"])
    # another seed: another sample
    other = VideoDataset(index, num_frames=4, size=16, train=True, seed=4)
    assert other.frame_indices(0, 40).tolist() != by_epoch[0]
    # evaluation is deterministic and epoch-independent: centres and a centre crop
    ev = VideoDataset(index, num_frames=4, size=16, train=False)
    a = ev[0]["video"]
    ev.set_epoch(5)
    assert torch.equal(ev[0]["video"], a)
    assert ev.frame_indices(0, 10).tolist() == [1, 3, 6, 8]


def test_dataset_validates_arguments(videos):
    index = write_index(videos, [("a.mp4", "x")])
    with pytest.raises(ValueError, match="num_frames"):
        VideoDataset(index, num_frames=0, size=16, train=True)
    with pytest.raises(ValueError, match=r"labels \['dynamics'\] are not columns"):
        VideoDataset(index, num_frames=2, size=16, train=True, labels=("dynamics",))
    with pytest.raises(ValueError, match="decoder must be one of"):
        VideoDataset(index, num_frames=2, size=16, train=True, decoder="opencv")


def test_bad_files_are_skipped_named_and_counted(videos, caplog):
    ds = VideoDataset(videos, num_frames=3, size=16, train=True)
    bad = {s.path.rsplit("/", 1)[1]: s for s in (ds[i] for i in range(len(ds))) if isinstance(s, BadSample)}
    assert sorted(bad) == ["notes.mp4", "truncated.mp4"]
    assert "Invalid data" in bad["notes.mp4"].reason and bad["truncated.mp4"].reason
    # collate drops them and lists them
    batch = collate_videos([ds[0], bad["notes.mp4"], ds[1]])
    assert batch["video"].shape == (2, 3, 16, 16, 3) and batch["index"].tolist() == [0, 1]
    assert [b.path for b in batch["bad"]] == [bad["notes.mp4"].path]
    empty = collate_videos([bad["notes.mp4"]])
    assert empty["index"].numel() == 0 and len(empty["bad"]) == 1
    # the main-process log warns once per file, counts every drop
    log = BadFileLog()
    with caplog.at_level(logging.WARNING, logger="invnext.data"):
        log.update(batch)
        log.update(batch)
    assert log.count == 1 and log.skipped == 2
    assert len([r for r in caplog.records if "notes.mp4" in r.getMessage()]) == 1


def test_loader_with_two_workers_yields_good_batches_and_reports_bad_files(videos, caplog):
    ds = VideoDataset(videos, num_frames=3, size=16, train=True, seed=1)
    loader = VideoLoader(ds, batch_size=2, shuffle=True, num_workers=2, seed=1)
    with caplog.at_level(logging.WARNING, logger="invnext.data"):
        for epoch in range(2):
            loader.set_epoch(epoch)
            seen = []
            for batch in loader:
                assert batch["video"].dtype == torch.uint8 and batch["video"].shape[1:] == (3, 16, 16, 3)
                assert batch["video"].shape[0] == batch["index"].numel() >= 1
                seen += batch["index"].tolist()
            good = sorted(i for i, e in enumerate(ds.index.entries) if e.path.endswith(("a.mp4", "b.mp4", "c.mp4")))
            assert sorted(seen) == good
    assert loader.bad_files.count == 2 and loader.bad_files.skipped == 4  # 2 files x 2 epochs
    summary = loader.bad_files.summary()
    assert "truncated.mp4" in summary and "notes.mp4" in summary and "2 file(s)" in summary
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("truncated.mp4" in m for m in warned) == 1 and sum("notes.mp4" in m for m in warned) == 1


def test_set_epoch_reaches_persistent_workers(videos):
    index = write_index(videos, [("a.mp4", "x"), ("sub/b.mp4", "y")])
    ds = VideoDataset(index, num_frames=3, size=16, train=True, seed=0)
    loader = VideoLoader(ds, batch_size=2, shuffle=False, num_workers=1, persistent_workers=True)
    out = []
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        out.append(torch.cat([b["video"] for b in loader]))
    expect = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        expect.append(torch.stack([ds[0]["video"], ds[1]["video"]]))
    assert torch.equal(out[0], expect[0]) and torch.equal(out[1], expect[1]) and torch.equal(out[2], expect[0])
    assert not torch.equal(out[0], out[1])


# --------------------------------------------------------------------------- data check


def test_data_check_exit_codes(videos, tmp_path):
    good = write_index(tmp_path, [(str(videos / "a.mp4"), 1), (str(videos / "sub" / "b.mp4"), 2)])
    out = io.StringIO()
    assert run_data_check(good, out=out) == 0
    assert "2 entries: 2 ok, 0 bad" in out.getvalue()

    out = io.StringIO()
    assert run_data_check(videos, out=out) == 1
    text = out.getvalue()
    assert "5 entries: 3 ok, 2 bad" in text
    assert f"BAD   {videos / 'truncated.mp4'}" in text and f"BAD   {videos / 'notes.mp4'}" in text

    (tmp_path / "bad.csv").write_text("file\nx.mp4\n")
    out = io.StringIO()
    assert run_data_check(tmp_path / "bad.csv", out=out) == 2
    assert "'path' column" in out.getvalue()
    assert run_data_check(tmp_path / "missing.jsonl", out=io.StringIO()) == 2

    missing = write_index(tmp_path, [("gone.mp4", 1)])
    out = io.StringIO()
    assert run_data_check(missing, out=out) == 1 and "gone.mp4: file not found" in out.getvalue()


def test_data_check_reports_non_files_and_warns_on_single_frame_clips(tmp_path):
    # A folder named x.mp4 and a dangling symlink used to vanish from the index without a word, and
    # a 1-frame clip (repeated to fill every clip drawn from it) passed as fine.
    root = tmp_path / "v"
    root.mkdir()
    write_video(str(root / "good.mp4"), solid_clip(4), fps=FPS)
    write_video(str(root / "still.mp4"), solid_clip(1), fps=FPS)
    (root / "x.mp4").mkdir()
    (root / "link.mp4").symlink_to(root / "gone.mp4")
    out = io.StringIO()
    assert run_data_check(root, out=out) == 1
    text = out.getvalue()
    assert f"BAD   {root / 'x.mp4'}: a directory, not a video file" in text
    assert f"BAD   {root / 'link.mp4'}: dangling symbolic link" in text
    assert f"WARN  {root / 'still.mp4'}: a single decodable frame" in text
    assert "4 entries: 2 ok, 2 bad, 1 with warnings" in text
    assert [e.path for e in read_index(root).entries] == [str(root / "good.mp4"), str(root / "still.mp4")]


@pytest.mark.parametrize(
    "text, match",
    [
        ("path,label\na.mp4,1\nb.mp4,2,3\n", r"i\.csv:3: 3 fields, but the header has 2 \(path, label\); extra: \['3'\]"),
        ('path,label\na.mp4,1\n"b.mp4,2\nc.mp4,3\n', r"i\.csv:3: malformed CSV row .*a quote left open"),
        ('path,label\n"a.mp4,1\nb.mp4",2\n', r"i\.csv:2-3: the 'path' value spans several lines"),
        ("path,label\na\0.mp4,1\n", r"i\.csv:2: the 'path' value holds a NUL byte"),
        (b"path,label\n\xff.mp4,1\n", r"i\.csv is not UTF-8 text"),
    ],
)
def test_csv_rows_with_extra_fields_or_an_open_quote_are_rejected(tmp_path, text, match):
    (tmp_path / "i.csv").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=match):
        read_index(tmp_path / "i.csv")
    out = io.StringIO()
    assert run_data_check(tmp_path / "i.csv", out=out) == 2 and "invalid index" in out.getvalue()
