"""CUHK Avenue as CUHK ships it (format raw): its planner and the reader of its volLabel mask .mat files.

The layout is described in pipeline.datasets' docstring.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import Dataset
from pipeline.datasets.layout import Plan, check_videos, file_videos, find_one_dir, per_video_labels, shown_as
from pipeline.datasets.video import VideoSource
from pipeline.errors import UserError


def read_avenue_mask_labels(path: Path, shown: str) -> np.ndarray:
    """0/1 per frame from one <n>_label.mat: abnormal iff the frame's mask in volLabel has a nonzero pixel."""
    import scipy.io

    try:
        contents = scipy.io.loadmat(path, variable_names=["volLabel"])
    except (NotImplementedError, ValueError, OSError) as exc:
        raise UserError(f"{shown}: cannot read it as a MATLAB file ({exc}); the label archive is damaged: delete "
                        f"it and rerun") from None
    if "volLabel" not in contents:
        raise UserError(f"{shown}: no variable volLabel; not the CUHK Avenue ground truth")
    cells = contents["volLabel"]
    if cells.dtype != object:
        raise UserError(f"{shown}: volLabel is a {cells.dtype} array of shape {cells.shape}; expected a "
                        f"1 x frames cell array of masks (CUHK's ground_truth_demo.zip)")
    return np.array([int(np.any(np.asarray(mask) != 0)) for mask in cells.ravel()], dtype=np.int64)


def plan_avenue_raw(unpacked: Path, dataset: Dataset) -> Plan:
    root = find_one_dir(unpacked, lambda d: (d / "training_videos").is_dir() and (d / "testing_videos").is_dir(),
                        "the folder 'Avenue Dataset/' with training_videos/ and testing_videos/", dataset)
    videos = (file_videos("train", root / "training_videos", unpacked)
              + file_videos("test", root / "testing_videos", unpacked))
    check_videos(videos, dataset, {"train": shown_as(root / "training_videos", unpacked),
                                   "test": shown_as(root / "testing_videos", unpacked)})
    mask_dir = find_one_dir(unpacked, lambda d: d.name == "testing_label_mask",
                            "the folder ground_truth_demo/testing_label_mask/ (from ground_truth_demo.zip, the "
                            "second Avenue archive)", dataset)

    def label_file(video: VideoSource) -> Path:
        if not video.name.isdigit():
            raise UserError(f"{video.shown_as}: Avenue test videos are named 01.avi ... 21.avi; cannot match it "
                            f"to a <n>_label.mat")
        return mask_dir / f"{int(video.name)}_label.mat"

    return Plan(videos, per_video_labels(videos, mask_dir, unpacked, label_file, read_avenue_mask_labels,
                                         "the label archive is incomplete or not ground_truth_demo.zip"))
