"""Test-frame ground truth: the three shapes the datasets state it in (per-frame arrays per video, abnormal ranges per
video, one array for all videos), the readers several datasets share (0/1 .npy, range .mat), and labels.csv's table.

Each label type's resolve(counts) turns it into one 0/1 array per test video, checked against the decoded frame counts.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from pipeline.datasets.video import SPLITS
from pipeline.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

LABEL_COLUMNS = ["split", "video", "frame", "label", "anomaly_type"]


class PerFrameLabels:
    """One label array per test video (Avenue volLabel, ShanghaiTech test_frame_mask)."""

    def __init__(self, labels: Mapping[str, tuple[np.ndarray, str]], source: str):
        self.labels = labels            # video -> (0/1 per frame, the file it came from)
        self.source = source

    def resolve(self, counts: Mapping[str, int]) -> dict[str, np.ndarray]:
        resolved = {}
        for video, n in counts.items():
            if video not in self.labels:
                raise UserError(f"test video {video}: no ground truth for it in {self.source}; the label archive "
                                f"does not match the video archive (check both are the ones in params.yaml)")
            labels, file = self.labels[video]
            if len(labels) != n:
                raise _count_mismatch(video, n, len(labels), file)
            resolved[video] = labels
        return resolved


class RangeLabels:
    """Abnormal frame ranges per test video, 1-based inclusive (UCSDped2.m, ped2.mat / avenue.mat)."""

    def __init__(self, ranges: Mapping[str, list[tuple[int, int]]], source: str):
        self.ranges = ranges
        self.source = source

    def resolve(self, counts: Mapping[str, int]) -> dict[str, np.ndarray]:
        resolved = {}
        for video, n in counts.items():
            labels = np.zeros(n, dtype=np.int64)
            for start, end in self.ranges[video]:
                if not 1 <= start <= end:
                    raise UserError(f"{self.source}: test video {video}: range [{start}:{end}] is not a 1-based "
                                    f"[start:end] range; fix or replace the ground-truth file")
                if end > n:
                    raise UserError(f"test video {video}: {n} decoded frames, but {self.source} marks frames "
                                    f"{start}..{end} abnormal (it needs at least {end} frames); the video and the "
                                    f"ground truth do not belong together: check both archives are the ones "
                                    f"listed in params.yaml")
                labels[start - 1:end] = 1
            resolved[video] = labels
        return resolved


class ConcatenatedLabels:
    """One array for all test videos, concatenated in sorted video order (MNAD's frame_labels_<dataset>.npy)."""

    def __init__(self, labels: np.ndarray, source: str):
        self.labels = labels
        self.source = source

    def resolve(self, counts: Mapping[str, int]) -> dict[str, np.ndarray]:
        total = sum(counts.values())
        if len(self.labels) != total:
            per_video = ", ".join(f"{v}: {counts[v]}" for v in sorted(counts))
            raise UserError(f"{self.source}: {len(self.labels)} labels, but the test videos have {total} decoded "
                            f"frames ({per_video}); the label file does not belong to these frames")
        resolved, offset = {}, 0
        for video in sorted(counts):
            resolved[video] = self.labels[offset:offset + counts[video]]
            offset += counts[video]
        return resolved


Labels = PerFrameLabels | RangeLabels | ConcatenatedLabels


def _count_mismatch(video: str, frames: int, labels: int, label_file: str) -> UserError:
    return UserError(f"test video {video}: {frames} decoded frames but {labels} labels in {label_file}; the video "
                     f"and its labels do not belong together (a truncated video or a different release): check "
                     f"that the archives are the ones listed in params.yaml (delete them from data/raw/ and rerun)")


def load_label_npy(path: Path, shown: str) -> np.ndarray:
    """A 0/1 label vector from a .npy, accepting (N,) and (1, N) shapes."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{shown}: cannot read it as a numpy array ({exc}); replace the file") from None
    if array.ndim == 0 or sum(d > 1 for d in array.shape) > 1:
        raise UserError(f"{shown}: labels of shape {array.shape}; expected one 0/1 per frame, (N,) or (1, N)")
    array = array.reshape(-1)
    if array.size and not np.isin(array, (0, 1)).all():
        raise UserError(f"{shown}: labels must be 0 (normal) or 1 (abnormal), found {sorted(set(array.tolist()))[:5]}")
    return array.astype(np.int64)


def read_range_mat(path: Path, shown: str) -> list[list[tuple[int, int]]]:
    """Per test video, abnormal [start, end] ranges (1-based inclusive) from a ped2.mat / avenue.mat.

    Expected: one variable (named gt, or the only one in the file) holding a 1 x videos (or videos x 1) cell array;
    cell i is a 2 x K numeric array whose columns are [start; end] of video i's K abnormal events (a 2-vector is
    one event; an empty cell means no event). scipy.io.loadmat returns such a cell array as an object array.
    """
    import scipy.io

    try:
        contents = scipy.io.loadmat(path)
    except (NotImplementedError, ValueError, OSError) as exc:
        raise UserError(f"{shown}: cannot read it as a MATLAB file ({exc}); save it in MATLAB format v7 or "
                        f"older (scipy.io cannot read v7.3)") from None
    variables = [name for name in contents if not name.startswith("__")]
    name = "gt" if "gt" in variables else (variables[0] if len(variables) == 1 else None)
    if name is None:
        raise UserError(f"{shown}: expected a variable gt (or a single variable), found {variables}")
    cells = contents[name]
    if cells.dtype != object or (cells.ndim == 2 and min(cells.shape) > 1):
        raise UserError(f"{shown}: variable {name} is a {cells.dtype} array of shape {cells.shape}; expected a "
                        f"1 x videos cell array of 2 x K [start; end] ranges (see docs/datasets.md)")
    per_video = []
    for index, cell in enumerate(cells.ravel()):
        cell = np.asarray(cell)
        if cell.size == 0:
            per_video.append([])
            continue
        if cell.ndim == 1 and cell.size == 2:
            cell = cell.reshape(2, 1)
        if cell.ndim != 2 or cell.shape[0] != 2 or not np.all(np.equal(np.mod(cell, 1), 0)):
            raise UserError(f"{shown}: cell {index + 1} of {name} is a {cell.dtype} array of shape {cell.shape}; "
                            f"expected whole frame numbers as 2 x K [start; end] columns")
        per_video.append([(int(start), int(end)) for start, end in cell.T])
    return per_video


def label_table(counts: Mapping[tuple[str, str], int], test_labels: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """labels.csv: one row per frame of every video, train frames all normal."""
    import pandas as pd  # here, not at the top: worker processes never need it, and it is slow to import

    parts = []
    for split in SPLITS:
        for video in sorted(name for s, name in counts if s == split):
            n = counts[(split, video)]
            labels = test_labels[video] if split == "test" else np.zeros(n, dtype=np.int64)
            parts.append(pd.DataFrame({"split": split, "video": video, "frame": np.arange(n),
                                       "label": labels.astype(np.int64), "anomaly_type": ""}))
    return pd.concat(parts, ignore_index=True)[LABEL_COLUMNS]
