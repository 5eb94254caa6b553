"""Clip loader over the common frame layout (DESIGN.md):

    data/frames/<dataset>/{train,test}/<video>/<000000>.png   +   data/frames/<dataset>/labels.csv

One window = `window` consecutive frames of one video (never across a boundary). Frames are streamed from disk
per item, never held in memory as a dataset. `ClipDataset.windows` says which labelled frame each window scores,
which is what evaluation joins scores on.

Frames that prepare did not leave as it should (a missing or empty folder, labels.csv out of step with the files,
a file that is not a PNG or is cut short, a frame of another size) are each one UserError naming the file and the
fix, `dvc repro prepare@<dataset>`. The checks cost nothing per frame beyond comparing a decoded frame's shape.
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


def prepare_again(frames_dir: str | Path) -> str:
    """The fix for frames that are not as prepare left them: the dataset's prepare stage."""
    return f"re-run `dvc repro prepare@{Path(frames_dir).name}` to build them again"


def read_labels(frames_dir: str | Path) -> pd.DataFrame:
    """labels.csv with its types fixed (video names stay strings: '01' must not become 1)."""
    frames_dir = Path(frames_dir)
    path = frames_dir / "labels.csv"
    if not path.exists():
        if not frames_dir.is_dir():
            why = f"the frames folder {frames_dir} does not exist"
        elif not any(frames_dir.iterdir()):
            why = f"the frames folder {frames_dir} is empty"
        else:
            why = f"the frames folder {frames_dir} has no labels table (its preparation did not finish)"
        raise UserError(f"{path} not found: {why}; run `dvc repro prepare@{frames_dir.name}`")
    try:
        labels = pd.read_csv(path, dtype={"split": str, "video": str, "frame": np.int64, "label": np.int64,
                                          "anomaly_type": str}, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not a labels table ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                        f"{prepare_again(frames_dir)}") from None
    if list(labels.columns) != LABEL_COLUMNS:
        raise UserError(f"{path}: columns {list(labels.columns)}, expected {LABEL_COLUMNS}; "
                        f"{prepare_again(frames_dir)}")
    return labels


def read_frame(path: Path, grayscale: bool = False) -> np.ndarray:
    """One frame as float32 [C, H, W] in [-1, 1] (BGR order for colour, as OpenCV and MNAD use)."""
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        frames_dir = Path(path).parent.parent.parent   # <frames>/<split>/<video>/<frame>.png
        what = ("is listed in labels.csv but missing" if not Path(path).exists() else
                "is not a readable PNG image (truncated, corrupt or another kind of file)")
        raise UserError(f"frame {path} {what}; {prepare_again(frames_dir)}")
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

    Every frame read must have the shape of the first one read, and with `frame_size` (the profile's) that size.
    """

    def __init__(self, frames_dir: str | Path, split: str, window: int, scored_offset: int,
                 grayscale: bool = False, videos: list[str] | None = None, frame_size: int | None = None):
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
        fix = prepare_again(self.frames_dir)
        if labels.empty:
            raise UserError(f"{self.frames_dir / 'labels.csv'}: no {split} frames; {fix}")
        rows = []
        for video, frames in labels.groupby("video", sort=True):
            frames = frames.sort_values("frame")
            count = len(frames)
            if not np.array_equal(frames["frame"].to_numpy(), np.arange(count)):
                raise UserError(f"{self.frames_dir}/{split}/{video}: frame numbers in labels.csv are not 0..{count - 1}; "
                                f"{fix}")
            # cheap checks that the folder matches the table, without listing it: its first and last frame are
            # there, the one after the last is not (a frame missing in between is named when it is read)
            for probe in (0, count - 1):
                if not frame_path(self.frames_dir, split, video, probe).exists():
                    raise UserError(f"{frame_path(self.frames_dir, split, video, probe)} missing but listed in "
                                    f"labels.csv; {fix}")
            if frame_path(self.frames_dir, split, video, count).exists():
                raise UserError(f"{frame_path(self.frames_dir, split, video, count)} exists but labels.csv lists "
                                f"{count} frames (0..{count - 1}) for {split} video {video}; {fix}")
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
        self.frame_size = frame_size
        self._shape: tuple[int, ...] | None = None      # of the first frame read: every other must have it
        self._first: str | None = None

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        folder, start = self._folder[index], int(self._start[index])
        frames = [self._frame(os.path.join(folder, f"{start + t:06d}.png")) for t in range(self.window)]
        return {"clip": torch.from_numpy(np.stack(frames)), "index": index}

    def _frame(self, path: str) -> np.ndarray:
        frame = self._recent.get(path)
        if frame is None:
            frame = read_frame(Path(path), self.grayscale)
            if frame.shape != self._shape:
                self._check_shape(path, frame.shape)
            self._recent[path] = frame
            if len(self._recent) > 2 * self.window:
                self._recent.popitem(last=False)
        return frame

    def _check_shape(self, path: str, shape: tuple[int, ...]) -> None:
        """The first frame read sets the shape (and must have the profile's size); any other frame must match."""
        fix = prepare_again(self.frames_dir)
        if self._shape is None:
            if self.frame_size is not None and shape[1:] != (self.frame_size, self.frame_size):
                raise UserError(f"frame {path} is {shape[1]}x{shape[2]} pixels, but the profile's frame_size is "
                                f"{self.frame_size}; the frames were prepared with another profile: {fix}")
            self._shape, self._first = shape, path
            return
        raise UserError(f"frame {path} has shape {'x'.join(map(str, shape))} (channels x height x width) but "
                        f"{self._first} has {'x'.join(map(str, self._shape))}; frames of one dataset share one size: "
                        f"{fix}")


def clip_dataset(frames_dir: str | Path, split: str, variant, videos: list[str] | None = None,
                 frame_size: int | None = None) -> ClipDataset:
    """The windows a variant needs (its window length, scored frame and colour mode come from the variant)."""
    return ClipDataset(frames_dir, split, variant.window, variant.scored_offset, variant.grayscale, videos,
                       frame_size)


def worker_error(exc: UserError) -> UserError:
    """A UserError raised in a DataLoader process comes back with that process's traceback inside its message
    (torch rebuilds it from text); the message alone, as the stage prints it."""
    text = str(exc)
    marker = "UserError: "
    if "Traceback (most recent call last)" in text and marker in text:
        return UserError(text.rsplit(marker, 1)[1].strip())
    return exc


def loader_batches(loader):
    """Iterate a DataLoader; a bad frame found in one of its processes is raised here as the one clean message."""
    iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except UserError as exc:
            raise worker_error(exc) from None
        yield batch
