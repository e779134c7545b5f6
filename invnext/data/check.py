"""``invnext data check INDEX``: open every entry of an index and list the files a run would skip.

Each entry is decoded over its whole window (every frame of it, so a file cut short is
caught even when its first frames are fine) with the chosen decoder. A folder's video names
that are no file (a directory ``x.mp4``, a dangling symlink) count as bad. A clip with a single
decodable frame is good but gets a warning: every clip drawn from it repeats that frame. Exit
codes: 0 all entries good; 1 some bad (each listed with its reason); 2 the index itself is
invalid (unreadable, no ``path`` column, a malformed line, no entries).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np

from invnext.data.dataset import VideoIndex, read_index
from invnext.data.video import make_reader


@dataclass
class CheckReport:
    index: VideoIndex
    ok: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (path, note) on good files
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (path, warning) on good files a run would misuse
    frames: list[int] = field(default_factory=list)  # decodable frames per good entry


def check_index(index: VideoIndex, decoder: str = "pyav") -> CheckReport:
    """Decode every entry of ``index`` fully; collect the bad ones with their reasons."""
    reader = make_reader(decoder)
    report = CheckReport(index)
    report.bad.extend(index.skipped)
    for entry in index.entries:
        if not os.path.exists(entry.path):
            report.bad.append((entry.path, "file not found"))
            continue
        if not os.path.isfile(entry.path):
            report.bad.append((entry.path, "not a regular file"))
            continue
        try:
            # ask for the first and last frame: the reader must decode the whole window to reach it
            _, info = reader.read(entry.path, entry.start, entry.end, lambda n: np.array([0, n - 1], dtype=np.int64))
        except Exception as exc:  # noqa: BLE001 - report whatever stops this file, go on with the next
            text = str(exc).strip() or type(exc).__name__
            report.bad.append(
                (entry.path, text if type(exc).__name__ == "DecodeError" else f"{type(exc).__name__}: {text}")
            )
            continue
        report.ok += 1
        report.frames.append(info.num_frames)
        if info.num_frames == 1:
            report.warnings.append(
                (entry.path, "a single decodable frame: every clip drawn from it repeats that frame (no motion)")
            )
        if info.claimed_frames and info.claimed_frames != info.num_frames:
            report.notes.append(
                (entry.path, f"metadata claims {info.claimed_frames} frames, {info.num_frames} decodable")
            )
    return report


def run_data_check(index: str | os.PathLike, *, decoder: str = "pyav", out: TextIO | None = None) -> int:
    """Check ``index`` (a CSV / JSONL index or a folder) and print a report; returns the exit code (0, 1 or 2)."""
    out = sys.stdout if out is None else out
    try:
        parsed = read_index(index)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        print(f"invalid index {index}: {exc}", file=out)
        return 2
    labels = ", ".join(parsed.label_columns) or "none"
    total = len(parsed.entries) + len(parsed.skipped)
    print(f"checking {total} entries of {parsed.source} ({parsed.kind}; labels: {labels})", file=out)
    t0 = time.perf_counter()
    try:
        report = check_index(parsed, decoder)
    except ImportError as exc:
        print(f"cannot check: {exc}", file=out)
        return 2
    for path, reason in report.bad:
        print(f"  BAD   {path}: {reason}", file=out)
    for path, warning in report.warnings:
        print(f"  WARN  {path}: {warning}", file=out)
    for path, note in report.notes:
        print(f"  NOTE  {path}: {note}", file=out)
    frames = ""
    if report.frames:
        f = np.asarray(report.frames)
        frames = f"; frames per good clip: min {f.min()}, median {int(np.median(f))}, max {f.max()}"
    print(
        f"{total} entries: {report.ok} ok, {len(report.bad)} bad"
        f"{f', {len(report.warnings)} with warnings' if report.warnings else ''}{frames} "
        f"({time.perf_counter() - t0:.1f} s)",
        file=out,
    )
    return 1 if report.bad else 0
