"""The frame folders the MNAD authors point to (format preextracted): the planner for all three datasets.

The layout is described in pipeline.datasets' docstring.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from pipeline.config import Dataset
from pipeline.datasets.labels import ConcatenatedLabels, RangeLabels, load_label_npy, read_range_mat
from pipeline.datasets.layout import Plan, check_videos, find_one_dir, image_videos, shown_as
from pipeline.errors import UserError

PREEXTRACTED_NAMES = {  # folder names, label .npy names, label .mat names
    "ped2": (("ped2",), ("frame_labels_ped2.npy",), ("ped2.mat",)),
    "avenue": (("avenue",), ("frame_labels_avenue.npy",), ("avenue.mat",)),
    "shanghaitech": (("shanghaitech", "shanghai"), ("frame_labels_shanghai.npy", "frame_labels_shanghaitech.npy"),
                     ("shanghaitech.mat", "shanghai.mat")),
}


def _label_file_candidates(unpacked: Path) -> list[Path]:
    """Every visible file below unpacked, except inside frames/ folders (hundreds of thousands of images)."""
    found = []
    for folder, subfolders, files in os.walk(unpacked):
        subfolders[:] = sorted(d for d in subfolders if d != "frames" and not d.startswith((".", "__MACOSX")))
        found += [Path(folder) / f for f in sorted(files) if not f.startswith(".")]
    return found


def _preextracted_labels(unpacked: Path, dataset: Dataset, test_names: list[str]) -> RangeLabels | ConcatenatedLabels:
    _, npy_names, mat_names = PREEXTRACTED_NAMES[dataset.kind]
    candidates = _label_file_candidates(unpacked)
    for wanted in npy_names:
        for path in candidates:
            if path.name == wanted:
                shown = shown_as(path, unpacked)
                return ConcatenatedLabels(load_label_npy(path, shown), shown)
    for wanted in mat_names:
        for path in candidates:
            if path.name == wanted:
                shown = shown_as(path, unpacked)
                per_video = read_range_mat(path, shown)
                if len(per_video) != len(test_names):
                    raise UserError(f"{shown}: ground truth for {len(per_video)} test videos, but the frames "
                                    f"archive has {len(test_names)} test video folders; they do not belong together")
                return RangeLabels(dict(zip(test_names, per_video)), shown)
    raise UserError(f"datasets.{dataset.name} (format preextracted): no ground truth among the archives; expected "
                    f"one of {list(npy_names + mat_names)}: add it as another archive (a bare .npy/.mat is fine) "
                    f"under datasets.{dataset.name}.source.archives.preextracted in params.yaml (see docs/datasets.md)")


def _ped2_raw_name(split: str) -> Callable[[str], str]:
    """MNAD's ped2 frame folders are 01, 02, ...; name them Train001 / Test001 as UCSD's archive does."""
    prefix = "Train" if split == "train" else "Test"
    return lambda name: f"{prefix}{int(name):03d}" if name.isdigit() else name


def plan_preextracted(unpacked: Path, dataset: Dataset) -> Plan:
    folder_names = PREEXTRACTED_NAMES[dataset.kind][0]
    root = find_one_dir(unpacked,
                        lambda d: (d / "training" / "frames").is_dir() and (d / "testing" / "frames").is_dir(),
                        f"the folder {folder_names[0]}/ with training/frames/ and testing/frames/", dataset,
                        preferred_names=folder_names)
    videos = []
    for split, folder in (("train", "training"), ("test", "testing")):
        rename = _ped2_raw_name(split) if dataset.kind == "ped2" else str
        videos += image_videos(split, root / folder / "frames", unpacked, rename)
    check_videos(videos, dataset, {"train": shown_as(root / "training" / "frames", unpacked),
                                   "test": shown_as(root / "testing" / "frames", unpacked)})
    test_names = sorted(v.name for v in videos if v.split == "test")
    return Plan(videos, _preextracted_labels(unpacked, dataset, test_names))
