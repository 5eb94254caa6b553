"""Finding a dataset's folders, videos and per-video label files in the unpacked archives, shared by every planner.

A planner returns a Plan: what to decode and what the ground truth says, found before any decoding starts. Paths in
messages are shown as '<archive name>: <path inside the archive>' (shown_as).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from pipeline.config import Dataset
from pipeline.datasets.labels import Labels, PerFrameLabels
from pipeline.datasets.video import SPLITS, VideoSource
from pipeline.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
VIDEO_SUFFIXES = (".avi", ".mp4")
SEARCH_DEPTH = 5    # how deep below the unpacked archives the dataset's folders may sit


@dataclass(frozen=True)
class Plan:
    videos: list[VideoSource]
    labels: Labels


def shown_as(path: Path, unpacked: Path) -> str:
    """'<archive name>: <path inside the archive>' for a file below unpacked/<archive name>/."""
    parts = path.relative_to(unpacked).parts
    return f"{parts[0]}: {'/'.join(parts[1:])}" if len(parts) > 1 else parts[0]


def _is_hidden(path: Path) -> bool:
    # .DS_Store, ._AppleDouble files and __MACOSX folders come with archives made on a Mac
    return path.name.startswith((".", "__MACOSX"))


def _find_dirs(unpacked: Path, matches: Callable[[Path], bool]) -> list[Path]:
    """Folders below unpacked (breadth first, at most SEARCH_DEPTH deep) for which matches() is true."""
    found, level = [], [unpacked]
    for _ in range(SEARCH_DEPTH):
        next_level = []
        for folder in level:
            for child in sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p)):
                if matches(child):
                    found.append(child)
                else:
                    next_level.append(child)
        level = next_level
    return found


def find_one_dir(unpacked: Path, matches: Callable[[Path], bool], expected: str, dataset: Dataset,
                 preferred_names: Sequence[str] = ()) -> Path:
    found = _find_dirs(unpacked, matches)
    if len(found) > 1:
        preferred = [d for d in found if d.name in preferred_names]
        found = preferred if len(preferred) == 1 else found
    if len(found) != 1:
        archives = sorted(p.name for p in unpacked.iterdir())
        listed = ", ".join(shown_as(d, unpacked) for d in found)
        what = f"{len(found)} folders ({listed})" if found else "no folder"
        raise UserError(f"datasets.{dataset.name} ({dataset.kind}, format {dataset.source.format}): expected {expected} "
                        f"in the archives {archives}, found {what}; check the archives listed under "
                        f"datasets.{dataset.name}.source.archives.{dataset.source.format} in params.yaml (see docs/datasets.md)")
    return found[0]


def _video_dirs(folder: Path) -> list[Path]:
    """Frame-sequence folders: every visible subfolder except UCSD's *_gt mask folders."""
    return sorted(d for d in folder.iterdir() if d.is_dir() and not _is_hidden(d) and not d.name.endswith("_gt"))


def _video_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not _is_hidden(p) and p.suffix.lower() in VIDEO_SUFFIXES)


def _frame_files(folder: Path, unpacked: Path) -> tuple[Path, ...]:
    """The images of a frame folder in numeric order (001.tif < 010.tif < 100.tif; 0- or 1-based alike)."""
    numbered = {}
    for path in folder.iterdir():
        if not path.is_file() or _is_hidden(path) or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        match = re.search(r"(\d+)$", path.stem)
        if match is None:
            raise UserError(f"{shown_as(path, unpacked)}: a frame file without a frame number in its name; "
                            f"remove it from the archive's frame folder")
        number = int(match.group(1))
        if number in numbered:
            raise UserError(f"{shown_as(path, unpacked)} and {numbered[number].name}: two frames numbered {number}")
        numbered[number] = path
    if not numbered:
        raise UserError(f"{shown_as(folder, unpacked)}: a video folder without frame images "
                        f"({', '.join(IMAGE_SUFFIXES)}); the archive is incomplete: delete it and rerun")
    return tuple(numbered[n] for n in sorted(numbered))


def image_videos(split: str, folder: Path, unpacked: Path, rename: Callable[[str], str] = str) -> list[VideoSource]:
    """One image-sequence video per frame folder in folder."""
    return [VideoSource(split, rename(d.name), shown_as(d, unpacked), image_files=_frame_files(d, unpacked))
            for d in _video_dirs(folder)]


def file_videos(split: str, folder: Path, unpacked: Path) -> list[VideoSource]:
    """One video per .avi/.mp4 file in folder, named after the file."""
    return [VideoSource(split, p.stem, shown_as(p, unpacked), video_file=p) for p in _video_files(folder)]


def check_videos(videos: list[VideoSource], dataset: Dataset, where: Mapping[str, str]) -> list[VideoSource]:
    for split in SPLITS:
        names = [v.name for v in videos if v.split == split]
        if not names:
            raise UserError(f"datasets.{dataset.name}: no {split} videos in {where[split]}; the archive is "
                            f"incomplete or not the one listed in params.yaml")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UserError(f"datasets.{dataset.name}: {split} video {duplicates[0]!r} appears twice in "
                            f"{where[split]}")
    return videos


def per_video_labels(videos: Iterable[VideoSource], label_dir: Path, unpacked: Path,
                     label_file: Callable[[VideoSource], Path], read: Callable[[Path, str], np.ndarray],
                     missing: str) -> PerFrameLabels:
    """PerFrameLabels from one label file per test video: label_file(video) names it, read(path, shown) reads it.

    `missing` completes the message when a video's file is absent (which archive is incomplete or not the right one).
    """
    labels = {}
    for video in (v for v in videos if v.split == "test"):
        path = label_file(video)
        shown = shown_as(path, unpacked)
        if not path.is_file():
            raise UserError(f"test video {video.name}: its ground truth {shown} is missing; {missing}")
        labels[video.name] = (read(path, shown), shown)
    return PerFrameLabels(labels, shown_as(label_dir, unpacked))
