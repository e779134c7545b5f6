"""Multi-view evaluation clips: ``clips`` temporal clips x ``crops`` spatial crops per video.

Temporal: the window of ``n`` decodable frames is cut into ``clips`` equal parts and clip ``c``
takes the centres of ``T`` equal segments of its part::

    idx[c, i] = floor(n * (c + (i + 1/2) / T) / clips)

(for ``clips = 1`` the evaluation sampling of :func:`invnext.data.video.sample_indices`).
Spatial: squares of side ``min(H, W)`` spread evenly along the long side, the first flush with
one edge and the last with the other (3 crops: left / centre / right of a landscape frame,
top / centre / bottom of a portrait one); 1 crop is the centred square. Each square is resized
to ``size``. So the 1x1 view of a clip is exactly ``VideoDataset(..., train=False)[i]``.

Views are ordered clip-major: view ``v = c * crops + k``. Logits are averaged over all views.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from invnext.data.dataset import BadSample, VideoDataset, VideoIndex
from invnext.data.video import crop_resize


@dataclass(frozen=True)
class ViewSpec:
    """``clips`` temporal clips x ``crops`` spatial crops (both >= 1)."""

    clips: int = 1
    crops: int = 1

    def __post_init__(self) -> None:
        for name in ("clips", "crops"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ViewSpec: {name} must be an int >= 1, got {v!r}")

    @property
    def count(self) -> int:
        return self.clips * self.crops

    def __str__(self) -> str:
        return f"{self.clips}x{self.crops}"


def parse_views(views: str | ViewSpec | tuple[int, int]) -> ViewSpec:
    """``"2x3"`` / ``(2, 3)`` / a ViewSpec -> ``ViewSpec(clips=2, crops=3)``."""
    if isinstance(views, ViewSpec):
        return views
    if isinstance(views, tuple) and len(views) == 2:
        return ViewSpec(*views)
    if isinstance(views, str):
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", views)
        if m:
            return ViewSpec(int(m.group(1)), int(m.group(2)))
    raise ValueError(f"views must be CLIPSxCROPS (e.g. '2x3'), a (clips, crops) pair or a ViewSpec, got {views!r}")


def clip_frame_indices(num_available: int, num_frames: int, clips: int) -> np.ndarray:
    """``int64 [clips, num_frames]`` frame indices into ``[0, num_available)`` (module docstring)."""
    for name, v in (("num_available", num_available), ("num_frames", num_frames), ("clips", clips)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"clip_frame_indices: {name} must be an int >= 1, got {v!r}")
    c = np.arange(clips, dtype=np.float64)[:, None]
    i = np.arange(num_frames, dtype=np.float64)[None, :]
    pos = (c + (i + 0.5) / num_frames) * (num_available / clips)
    return np.minimum(np.floor(pos).astype(np.int64), num_available - 1)


def crop_boxes(height: int, width: int, crops: int) -> list[tuple[int, int, int, int]]:
    """``crops`` boxes ``(top, left, side, side)``, side = min(H, W), spread along the long side."""
    for name, v in (("height", height), ("width", width), ("crops", crops)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"crop_boxes: {name} must be an int >= 1, got {v!r}")
    side = min(height, width)
    span = max(height, width) - side
    if crops == 1:
        offsets = [span // 2]
    else:
        offsets = [round(k * span / (crops - 1)) for k in range(crops)]
    if width >= height:
        return [(0, o, side, side) for o in offsets]
    return [(o, 0, side, side) for o in offsets]


class MultiViewDataset(VideoDataset):
    """``VideoDataset`` in evaluation mode returning every view of a clip.

    ``dataset[i]`` is ``{"video": uint8 [V, T, size, size, 3], "index": i, "labels": {name: int}}``
    (V = ``views.count``, clip-major) or a :class:`BadSample`; :func:`collate_videos` stacks
    it to ``[B, V, T, size, size, 3]``. Index parsing, label numbering and bad-file handling
    are the parent's.
    """

    def __init__(
        self,
        source: str | os.PathLike | VideoIndex,
        num_frames: int,
        size: int,
        views: ViewSpec,
        decoder: str = "pyav",
        labels=None,
    ):
        super().__init__(source, num_frames, size, train=False, decoder=decoder, labels=labels)
        self.views = parse_views(views)

    def __getitem__(self, index: int) -> dict[str, Any] | BadSample:
        if not 0 <= index < len(self):
            raise IndexError(f"MultiViewDataset: index {index} out of range [0, {len(self)})")
        entry = self.index.entries[index]
        if index in self._known_bad:
            return BadSample(index, entry.path, self._known_bad[index])
        if not os.path.isfile(entry.path):
            reason = "file not found" if not os.path.exists(entry.path) else "not a regular file"
            self._known_bad[index] = reason
            return BadSample(index, entry.path, reason)
        if self._reader is None:
            from invnext.data.video import make_reader

            self._reader = make_reader(self.decoder, self.decode_threads)
        T, views = self.num_frames, self.views
        try:
            frames, _ = self._reader.read(
                entry.path, entry.start, entry.end, lambda n: clip_frame_indices(n, T, views.clips).reshape(-1)
            )
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop an evaluation
            reason = str(exc).strip() or type(exc).__name__
            self._known_bad[index] = reason
            return BadSample(index, entry.path, reason)
        video = torch.from_numpy(np.ascontiguousarray(frames))  # [clips*T, H, W, 3]
        boxes = crop_boxes(video.shape[1], video.shape[2], views.crops)
        out = torch.stack(
            [crop_resize(video[c * T : (c + 1) * T], box, self.size) for c in range(views.clips) for box in boxes]
        )
        labels = {name: int(self._labels[index, j]) for j, name in enumerate(self.label_names)}
        return {"video": out, "index": index, "labels": labels}
