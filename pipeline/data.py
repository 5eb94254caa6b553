"""Clip loader over the common frame layout (DESIGN.md):

    data/frames/<dataset>/{train,test}/<video>/<000000>.png   +   data/frames/<dataset>/labels.csv

One window = `window` consecutive frames of one video (never across a boundary). Frames are streamed from disk
per item, never held in memory as a dataset. `ClipDataset.windows` says which labelled frame each window scores,
which is what evaluation joins scores on.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pipeline.errors import UserError

LABEL_COLUMNS = ["split", "video", "frame", "label", "anomaly_type"]
SPLITS = ("train", "test")


def frame_path(frames_dir: Path, split: str, video: str, frame: int) -> Path:
    return Path(frames_dir) / split / video / f"{frame:06d}.png"


def read_labels(frames_dir: str | Path) -> pd.DataFrame:
    """labels.csv with its types fixed (video names stay strings: '01' must not become 1)."""
    path = Path(frames_dir) / "labels.csv"
    if not path.exists():
        raise UserError(f"{path} not found: the frames were not prepared; run `dvc repro prepare@{Path(frames_dir).name}`")
    labels = pd.read_csv(path, dtype={"split": str, "video": str, "frame": np.int64, "label": np.int64,
                                      "anomaly_type": str}, keep_default_na=False)
    if list(labels.columns) != LABEL_COLUMNS:
        raise UserError(f"{path}: columns {list(labels.columns)}, expected {LABEL_COLUMNS}; re-run prepare")
    return labels


def read_frame(path: Path, grayscale: bool = False) -> np.ndarray:
    """One frame as float32 [C, H, W] in [-1, 1] (BGR order for colour, as OpenCV and MNAD use)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UserError(f"cannot read frame {path}: missing or corrupt; re-run the prepare stage")
    if image.ndim == 2:
        image = image[:, :, None]
    elif grayscale:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
    return image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0


class ClipDataset(Dataset):
    """Windows of `window` consecutive frames; item i is {"clip": [window, C, H, W] float in [-1, 1], "index": i}.

    Windows in order share all but one frame, so the last few frames read are kept (a few windows' worth, not the
    dataset): evaluation then reads each frame once instead of `window` times.

    `scored_offset` is the position inside the window of the frame the window is scored against (the prediction
    target, the single reconstructed frame, or MemAE's clip centre). `windows` is a DataFrame with one row per
    window: video, start, frame (the scored frame), label, anomaly_type.
    """

    def __init__(self, frames_dir: str | Path, split: str, window: int, scored_offset: int,
                 grayscale: bool = False, videos: list[str] | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= scored_offset < window:
            raise ValueError(f"scored_offset {scored_offset} outside a window of {window} frames")
        self.frames_dir = Path(frames_dir)
        self.split, self.window, self.grayscale = split, window, grayscale
        labels = read_labels(self.frames_dir)
        labels = labels[labels["split"] == split]
        if videos is not None:
            labels = labels[labels["video"].isin(videos)]
        if labels.empty:
            raise UserError(f"{self.frames_dir / 'labels.csv'}: no {split} frames; re-run the prepare stage")
        rows = []
        for video, frames in labels.groupby("video", sort=True):
            frames = frames.sort_values("frame")
            count = len(frames)
            if not np.array_equal(frames["frame"].to_numpy(), np.arange(count)):
                raise UserError(f"{self.frames_dir}/{split}/{video}: frame numbers in labels.csv are not 0..{count - 1}; "
                                f"re-run the prepare stage")
            for probe in (0, count - 1):  # cheap check that the folder matches the table, without listing it
                if not frame_path(self.frames_dir, split, video, probe).exists():
                    raise UserError(f"{frame_path(self.frames_dir, split, video, probe)} missing but listed in "
                                    f"labels.csv; re-run the prepare stage")
            starts = np.arange(max(count - window + 1, 0))
            scored = frames.iloc[starts + scored_offset]
            rows.append(pd.DataFrame({"video": video, "start": starts, "frame": scored["frame"].to_numpy(),
                                      "label": scored["label"].to_numpy(),
                                      "anomaly_type": scored["anomaly_type"].to_numpy()}))
        self.windows = pd.concat(rows, ignore_index=True)
        # plain strings: building a pathlib.Path per frame costs as much as decoding a small PNG
        folders = {video: os.path.join(self.frames_dir, split, video) for video in self.windows["video"].unique()}
        self._folder = self.windows["video"].map(folders).to_numpy()
        self._start = self.windows["start"].to_numpy()
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        folder, start = self._folder[index], int(self._start[index])
        frames = [self._frame(os.path.join(folder, f"{start + t:06d}.png")) for t in range(self.window)]
        return {"clip": torch.from_numpy(np.stack(frames)), "index": index}

    def _frame(self, path: str) -> np.ndarray:
        frame = self._recent.get(path)
        if frame is None:
            frame = self._recent[path] = read_frame(Path(path), self.grayscale)
            if len(self._recent) > 2 * self.window:
                self._recent.popitem(last=False)
        return frame


def clip_dataset(frames_dir: str | Path, split: str, variant, videos: list[str] | None = None) -> ClipDataset:
    """The windows a variant needs (its window length, scored frame and colour mode come from the variant)."""
    return ClipDataset(frames_dir, split, variant.window, variant.scored_offset, variant.grayscale, videos)
