"""UCSD Ped2 as UCSD ships it (format raw): its planner and the parser of its ground truth, Test/UCSDped2.m.

The layout is described in pipeline.datasets' docstring.
"""
from __future__ import annotations

import re
from pathlib import Path

from pipeline.config import Dataset
from pipeline.datasets.labels import RangeLabels
from pipeline.datasets.layout import Plan, check_videos, find_one_dir, image_videos, shown_as
from pipeline.errors import UserError

_UCSD_GT_LINE = re.compile(r"gt_frame\s*=\s*\[([^\]]*)\]")


def parse_ucsd_ground_truth(text: str, source: str) -> list[list[tuple[int, int]]]:
    """Abnormal ranges per test video, in file order, from UCSD's UCSDped2.m (1-based inclusive)."""
    per_video = []
    for line_number, line in enumerate(text.splitlines(), 1):
        code = line.split("%", 1)[0]  # MATLAB comment
        match = _UCSD_GT_LINE.search(code)
        if match is None:
            continue
        ranges = []
        for item in re.split(r"[,;\s]+", match.group(1).strip()):
            if not item:
                continue
            bounds = re.fullmatch(r"(\d+)(?::(\d+))?", item)
            if bounds is None:
                raise UserError(f"{source}, line {line_number}: cannot read {item!r} as a frame or a start:end "
                                f"range; the ground-truth file is not UCSD's")
            start = int(bounds.group(1))
            ranges.append((start, int(bounds.group(2) or start)))
        per_video.append(ranges)
    return per_video


def plan_ped2_raw(unpacked: Path, dataset: Dataset) -> Plan:
    root = find_one_dir(unpacked, lambda d: d.name == "UCSDped2" and (d / "Train").is_dir() and (d / "Test").is_dir(),
                        "the folder UCSD_Anomaly_Dataset.v1p2/UCSDped2/ with Train/ and Test/", dataset)
    videos = (image_videos("train", root / "Train", unpacked) + image_videos("test", root / "Test", unpacked))
    check_videos(videos, dataset, {"train": shown_as(root / "Train", unpacked),
                                   "test": shown_as(root / "Test", unpacked)})
    gt_file = root / "Test" / "UCSDped2.m"
    if not gt_file.is_file():
        raise UserError(f"{shown_as(root / 'Test', unpacked)}: UCSDped2.m (the frame ground truth) is missing; "
                        f"the archive is incomplete or not UCSD_Anomaly_Dataset.tar.gz")
    shown = shown_as(gt_file, unpacked)
    per_video = parse_ucsd_ground_truth(gt_file.read_text(errors="replace"), shown)
    test_names = [v.name for v in videos if v.split == "test"]
    if len(per_video) != len(test_names):
        raise UserError(f"{shown}: ground truth for {len(per_video)} test videos, but the archive has "
                        f"{len(test_names)} test video folders ({', '.join(test_names)}); the archive is not "
                        f"UCSD's v1p2 release")
    return Plan(videos, RangeLabels(dict(zip(test_names, per_video)), shown))
