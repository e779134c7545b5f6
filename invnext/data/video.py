"""Video decoding, sparse frame sampling and the clip transforms.

Everything here works on one clip; :mod:`invnext.data.dataset` turns it into a Dataset.

Sampling (method.md "Data": frames spread evenly over the video). A clip window of ``n``
decodable frames is cut into ``T`` equal segments ``[n*i/T, n*(i+1)/T)``; training takes a
uniformly random frame inside each segment, evaluation the frame at each segment's centre::

    train:  idx_i = floor(n * (i + u_i) / T),  u_i ~ U[0, 1)
    eval:   idx_i = floor(n * (i + 1/2) / T)

so a clip shorter than ``T`` frames repeats frames (never an error); only a clip with no
decodable frame is bad.

Transforms work on ``uint8 [T, H, W, 3]`` tensors and return ``uint8 [T, size, size, 3]``
(the loader moves uint8; :func:`to_model_input` normalises on the device):

* train: random resized crop, one box for the whole clip (area fraction ``scale``, default
  (0.4, 1.0): a milder floor than ImageNet's 0.08 because a clip's objects must stay in
  view across frames; aspect ratio ``ratio`` log-uniform in (3/4, 4/3)), then a horizontal
  flip with probability 1/2;
* eval: the centred square of side ``min(H, W)`` resized to ``size`` (the same as "resize
  the shorter side to ``size``, then centre crop").

Resizing is ``F.interpolate(bilinear, antialias=True)`` in float32, rounded back to uint8.

Decoders: ``"pyav"`` (default, always available); ``"torchcodec"`` and ``"decord"`` when
installed. Each one opens a file, counts the frames of the requested window, asks a
``pick(n) -> indices`` callback which frames it wants, and returns exactly those.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DECODERS = ("pyav", "torchcodec", "decord")
DEFAULT_SCALE = (0.4, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)

Pick = Callable[[int], np.ndarray]


class DecodeError(RuntimeError):
    """A file that cannot be opened or decoded, or holds no frame in the requested window."""


# --------------------------------------------------------------------------- sampling


def sample_indices(num_available: int, num_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Sparse sampling (module docstring): ``int64[num_frames]`` indices into ``[0, num_available)``.

    ``rng=None`` gives the evaluation centres; a generator gives one random frame per segment.
    """
    if isinstance(num_available, bool) or not isinstance(num_available, (int, np.integer)) or num_available < 1:
        raise ValueError(f"sample_indices: num_available must be an int >= 1, got {num_available!r}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"sample_indices: num_frames must be an int >= 1, got {num_frames!r}")
    offset = np.full(num_frames, 0.5) if rng is None else rng.random(num_frames)
    pos = (np.arange(num_frames) + offset) * (num_available / num_frames)
    # float error can put pos a hair above n - 1 + 1; the clamp keeps the index in range.
    return np.minimum(np.floor(pos).astype(np.int64), num_available - 1)


# --------------------------------------------------------------------------- transforms


def _check_clip(fn: str, video: object) -> torch.Tensor:
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"{fn}: video must be a torch.Tensor, got {type(video).__name__}")
    if video.dtype != torch.uint8 or video.dim() != 4 or video.shape[-1] != 3:
        raise ValueError(f"{fn}: video must be uint8 [T, H, W, 3], got {video.dtype} {list(video.shape)}")
    if min(video.shape[:3]) < 1:
        raise ValueError(f"{fn}: video must not be empty, got shape {list(video.shape)}")
    return video


def _check_size(fn: str, size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{fn}: size must be an int >= 1, got {size!r}")
    return size


def random_resized_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> tuple[int, int, int, int]:
    """``(top, left, crop_h, crop_w)`` of a random box covering ``scale`` of the area at aspect ``ratio``.

    Up to 10 draws of (area, log-aspect); a box that does not fit is redrawn. If none fits,
    the largest centred box with the aspect clamped into ``ratio`` is used.
    """
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"random_resized_crop_box: scale must satisfy 0 < min <= max <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"random_resized_crop_box: ratio must satisfy 0 < min <= max, got {ratio}")
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= width and 0 < ch <= height:
            top = int(rng.integers(0, height - ch + 1))
            left = int(rng.integers(0, width - cw + 1))
            return top, left, ch, cw
    aspect = min(max(width / height, ratio[0]), ratio[1])
    if width / height > aspect:
        ch, cw = height, round(height * aspect)
    else:
        cw, ch = width, round(width / aspect)
    return (height - ch) // 2, (width - cw) // 2, ch, cw


def crop_resize(video: torch.Tensor, box: tuple[int, int, int, int], size: int, flip: bool = False) -> torch.Tensor:
    """``uint8 [T, H, W, 3]`` -> the ``box = (top, left, h, w)`` of every frame resized to ``uint8 [T, size, size, 3]``.

    Bilinear with antialiasing (a downscale averages, it does not alias); ``flip`` mirrors left-right.
    """
    video = _check_clip("crop_resize", video)
    size = _check_size("crop_resize", size)
    top, left, ch, cw = box
    H, W = video.shape[1:3]
    if not (0 <= top and 0 <= left and ch >= 1 and cw >= 1 and top + ch <= H and left + cw <= W):
        raise ValueError(f"crop_resize: box {box} does not fit a {H}x{W} frame")
    crop = video[:, top : top + ch, left : left + cw]
    if (ch, cw) != (size, size):
        x = crop.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        crop = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    if flip:
        crop = crop.flip(2)
    return crop.contiguous()


def train_transform(
    video: torch.Tensor,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    flip: bool = True,
) -> torch.Tensor:
    """Random resized crop (one box per clip) + optional random horizontal flip: ``uint8 [T, size, size, 3]``."""
    video = _check_clip("train_transform", video)
    box = random_resized_crop_box(video.shape[1], video.shape[2], rng, scale, ratio)
    mirror = bool(flip) and bool(rng.random() < 0.5)
    return crop_resize(video, box, size, flip=mirror)


def eval_transform(video: torch.Tensor, size: int) -> torch.Tensor:
    """The centred ``min(H, W)`` square resized to ``uint8 [T, size, size, 3]``."""
    video = _check_clip("eval_transform", video)
    H, W = video.shape[1:3]
    side = min(H, W)
    return crop_resize(video, ((H - side) // 2, (W - side) // 2, side, side), size)


def to_model_input(
    video: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A loader batch ``uint8 [B, T, H, W, 3]`` -> the models' ``[B, 3, T, H, W]``: ``(x / 255 - mean) / std``.

    Moves the uint8 batch first (4x less traffic than float32), then converts on ``device``.
    """
    if not isinstance(video, torch.Tensor) or video.dtype != torch.uint8 or video.dim() != 5 or video.shape[-1] != 3:
        got = f"{video.dtype} {list(video.shape)}" if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"to_model_input: video must be uint8 [B, T, H, W, 3], got {got}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"to_model_input: mean and std must hold 3 values (std > 0), got {mean}, {std}")
    if device is not None:
        video = video.to(device, non_blocking=True)
    x = video.permute(0, 4, 1, 2, 3).to(dtype)
    m = torch.tensor([255.0 * v for v in mean], dtype=dtype, device=x.device).view(1, 3, 1, 1, 1)
    s = torch.tensor([255.0 * v for v in std], dtype=dtype, device=x.device).view(1, 3, 1, 1, 1)
    return (x - m) / s


# --------------------------------------------------------------------------- decoders


@dataclass(frozen=True)
class ClipInfo:
    """What a decoder learnt about the window it read."""

    num_frames: int  # decodable frames in the window (what ``pick`` was finally called with)
    claimed_frames: int  # what the container's metadata promised (0 = it did not say)
    height: int
    width: int


def _window_frames(fps: float, start: float | None, end: float | None, total: int) -> tuple[int, int]:
    """``[first, stop)`` frame indices of the window ``[start, end)`` seconds in a ``total``-frame stream.

    Frame i (shown at ``i / fps``) belongs to the window when ``start - 1/(2 fps) <= i / fps <
    end - 1/(2 fps)``: the frame nearest to each bound counts, as in the PyAV reader's time test.
    """
    first = 0 if start is None else max(0, math.ceil(start * fps - 0.5 - 1e-6))
    stop = total if end is None else min(total, math.ceil(end * fps - 0.5 - 1e-6))
    return first, stop


class PyAVReader:
    """Decodes with PyAV (FFmpeg), in order from a seek to the window start, stopping after the
    last wanted frame; only the wanted frames are converted to RGB.

    The frame count comes from the container's metadata. When the stream holds fewer frames
    than it claims (a cut file, a variable frame rate) or claims none, the first pass has
    counted the real frames, so the reader picks again from that count and decodes once more.

    ``threads`` is FFmpeg's decoding thread count; 1 (default) suits DataLoader workers, which
    already decode in parallel (FFmpeg's thread start-up costs more than it saves on short clips).
    """

    name = "pyav"

    def __init__(self, threads: int = 1):
        import av  # noqa: F401  (fail at construction, not in a worker)

        self.threads = threads

    def _open(self, path: str):
        import av

        container = av.open(path)
        if not container.streams.video:
            container.close()
            raise DecodeError("no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = self.threads
        if self.threads > 1:
            stream.thread_type = "AUTO"
        return container, stream

    @staticmethod
    def _claimed(stream, start: float | None, end: float | None) -> int:
        """Frames the metadata promises in the window (0 = unknown)."""
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        claimed = int(stream.frames or 0)
        if claimed <= 0 and stream.duration and stream.time_base and fps > 0:
            claimed = round(float(stream.duration * stream.time_base) * fps)
        if claimed > 0 and (start is not None or end is not None):
            if fps <= 0:
                return 0
            first, stop = _window_frames(fps, start, end, claimed)
            claimed = max(0, stop - first)
        return claimed

    @staticmethod
    def _decode(container, stream, start, end, wanted: set[int], limit: int | None):
        """Decode the window in order, keep the RGB of the frames in ``wanted``, stop once ``limit`` frames are seen.

        Returns ({index: uint8 [H, W, 3]}, frames seen in the window).
        """
        tb = stream.time_base
        origin = stream.start_time or 0
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        half = 0.5 / fps if fps > 0 else 0.0
        if start is not None and start > 0 and tb is not None:
            container.seek(origin + int(start / tb), stream=stream, backward=True, any_frame=False)
        kept: dict[int, np.ndarray] = {}
        seen = 0
        for frame in container.decode(stream):
            t = float((frame.pts - origin) * tb) if frame.pts is not None and tb is not None else None
            if t is not None and start is not None and t < start - half:
                continue  # decoded from the keyframe before the window: not part of the clip
            if t is not None and end is not None and t >= end - half:
                break
            if seen in wanted:
                kept[seen] = frame.to_ndarray(format="rgb24")
            seen += 1
            if limit is not None and seen >= limit:
                break
        return kept, seen

    def read(self, path: str, start: float | None, end: float | None, pick: Pick) -> tuple[np.ndarray, ClipInfo]:
        container, stream = self._open(path)
        with container:
            claimed = self._claimed(stream, start, end)
            if claimed > 0:
                idx = pick(claimed)
                kept, n = self._decode(container, stream, start, end, set(idx.tolist()), claimed)
                if n == claimed:
                    return self._stack(kept, idx), ClipInfo(n, claimed, *kept[int(idx[0])].shape[:2])
            else:
                _, n = self._decode(container, stream, start, end, set(), None)
        if n == 0:
            window = "" if start is None and end is None else f" in the window [{start}, {end}) s"
            raise DecodeError(f"no decodable frames{window}")
        idx = pick(n)
        container, stream = self._open(path)
        with container:
            kept, _ = self._decode(container, stream, start, end, set(idx.tolist()), n)
        return self._stack(kept, idx), ClipInfo(n, claimed, *kept[int(idx[0])].shape[:2])

    @staticmethod
    def _stack(kept: dict[int, np.ndarray], idx: np.ndarray) -> np.ndarray:
        missing = sorted(set(idx.tolist()) - kept.keys())
        if missing:
            raise DecodeError(f"frames {missing} could not be decoded on the second pass")
        shapes = {a.shape for a in kept.values()}
        if len(shapes) > 1:
            raise DecodeError(f"frame size changes inside the clip: {sorted(shapes)}")
        return np.stack([kept[int(i)] for i in idx])


def _optional_decoder(module: str, name: str):
    """Import an optional decoder package, or say how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"decoder='{name}' needs the {name} package: pip install {name} (or use decoder='pyav', always available)"
        ) from exc


def _seekable_window(fps: float, start: float | None, end: float | None, total: int) -> tuple[int, int]:
    """Frame range [first, first + n) of the clip window for the seeking decoders; n >= 1."""
    first, stop = (0, total) if fps <= 0 else _window_frames(fps, start, end, total)
    if stop - first <= 0:
        raise DecodeError("no decodable frames" + ("" if start is None and end is None else f" in [{start}, {end}) s"))
    return first, stop - first


class TorchCodecReader:
    """Decodes with torchcodec (``pip install torchcodec``): exact seeks to the wanted frames."""

    name = "torchcodec"

    def __init__(self, threads: int = 1):
        self._cls = _optional_decoder("torchcodec.decoders", "torchcodec").VideoDecoder
        self.threads = threads

    def read(self, path: str, start: float | None, end: float | None, pick: Pick) -> tuple[np.ndarray, ClipInfo]:
        dec = self._cls(path, dimension_order="NHWC", num_ffmpeg_threads=self.threads)
        total = len(dec)
        fps = float(dec.metadata.average_fps or 0)
        first, n = _seekable_window(fps, start, end, total)
        idx = pick(n)
        frames = dec.get_frames_at([int(first + i) for i in idx]).data.numpy()
        return frames, ClipInfo(n, n, frames.shape[1], frames.shape[2])


class DecordReader:
    """Decodes with decord (``pip install decord``)."""

    name = "decord"

    def __init__(self, threads: int = 1):
        self._decord = _optional_decoder("decord", "decord")
        self.threads = threads

    def read(self, path: str, start: float | None, end: float | None, pick: Pick) -> tuple[np.ndarray, ClipInfo]:
        vr = self._decord.VideoReader(path, num_threads=self.threads)
        total = len(vr)
        fps = float(vr.get_avg_fps() or 0)
        first, n = _seekable_window(fps, start, end, total)
        idx = pick(n)
        frames = vr.get_batch([int(first + i) for i in idx]).asnumpy()
        return frames, ClipInfo(n, n, frames.shape[1], frames.shape[2])


def make_reader(decoder: str = "pyav", threads: int = 1):
    """The reader for ``decoder`` (one of :data:`DECODERS`); a clear ImportError if it is not installed."""
    if decoder == "pyav":
        return PyAVReader(threads)
    if decoder == "torchcodec":
        return TorchCodecReader(threads)
    if decoder == "decord":
        return DecordReader(threads)
    raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")


def read_clip(
    path: str,
    num_frames: int,
    *,
    start: float | None = None,
    end: float | None = None,
    rng: np.random.Generator | None = None,
    decoder: str = "pyav",
) -> np.ndarray:
    """``uint8 [num_frames, H, W, 3]``: a sparse sample of ``path`` (``rng=None``: evaluation centres)."""
    frames, _ = make_reader(decoder).read(str(path), start, end, lambda n: sample_indices(n, num_frames, rng))
    return frames


def write_video(path: str, frames: np.ndarray, fps: int = 8, codec: str | None = None, crf: int = 18) -> str:
    """Encode ``uint8 [T, H, W, 3]`` (H, W even) as a yuv420p video with PyAV; returns the codec used.

    ``codec=None``: libx264 when this FFmpeg build has it, else mpeg4.
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video: frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_video: yuv420p needs even H and W, got {frames.shape[1]}x{frames.shape[2]}")
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = int(frames.shape[2]), int(frames.shape[1])
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # one thread: the caller parallelises over files; ultrafast because the clips are tiny.
            stream.options = {"preset": "ultrafast", "crf": str(crf), "threads": "1"}
        else:
            stream.options = {"qscale": "2"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return codec
