"""ShanghaiTech as its authors ship it (format raw): its planner (labels: test_frame_mask/<video>.npy).

The layout is described in pipeline.datasets' docstring.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.config import Dataset
from pipeline.datasets.labels import load_label_npy
from pipeline.datasets.layout import (Plan, check_videos, file_videos, find_one_dir, image_videos, per_video_labels,
                                      shown_as)


def plan_shanghaitech_raw(unpacked: Path, dataset: Dataset) -> Plan:
    root = find_one_dir(unpacked,
                        lambda d: (d / "training" / "videos").is_dir() and (d / "testing" / "frames").is_dir(),
                        "the folder shanghaitech/ with training/videos/ and testing/frames/", dataset)
    videos = (file_videos("train", root / "training" / "videos", unpacked)
              + image_videos("test", root / "testing" / "frames", unpacked))
    check_videos(videos, dataset, {"train": shown_as(root / "training" / "videos", unpacked),
                                   "test": shown_as(root / "testing" / "frames", unpacked)})
    mask_dir = root / "testing" / "test_frame_mask"
    return Plan(videos, per_video_labels(videos, mask_dir, unpacked, lambda video: mask_dir / f"{video.name}.npy",
                                         load_label_npy, "the archive is incomplete or not shanghaitech.tar.gz"))
