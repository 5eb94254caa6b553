"""Turn the archives of UCSD Ped2, CUHK Avenue and ShanghaiTech into the harness's frame layout.

    prepare_real(dataset, raw_dir, out_dir) -> summary dict

1. fetch every archive of source.archives[source.format] into raw_dir (pipeline.download: sha256, resume, mirrors).
2. Unpack them into a temporary folder beside out_dir, refusing any member that would land outside it.
3. Plan: find the videos of each split and read the ground truth, as the dataset's own files state it.
4. Decode/convert every video (in parallel processes), resize once to the profile's frame_size with INTER_AREA, write
   out_dir/{train,test}/<video>/<000000>.png (0-based, consecutive) in the profile's channels (1 grey, 3 BGR).
5. Check every test video's decoded frame count against its labels, and write out_dir/labels.csv
   (split,video,frame,label,anomaly_type).

out_dir is a staging folder that pipeline.prepare swaps into place only when all of this succeeded, so nothing is
ever left half-built under the frames' final name.
Step 2 lives in archives, step 3 in layout and one planner module per source layout (PLANNERS maps kind and format
to it), step 4 in video, the label types and labels.csv in labels.

Source layouts (format raw, as the dataset authors ship them):
  ped2          UCSD_Anomaly_Dataset.v1p2/UCSDped2/{Train/Train001/001.tif, Test/Test001/001.tif, Test/UCSDped2.m}
                UCSDped2.m holds one `TestVideoFile{end+1}.gt_frame = [61:180];` line per test video, in order
                (1-based inclusive ranges, possibly several: [1:5, 10:20]). Test001_gt/ mask folders are ignored.
  avenue        Avenue Dataset/{training_videos,testing_videos}/01.avi + ground_truth_demo.zip:
                ground_truth_demo/testing_label_mask/<n>_label.mat, volLabel = 1 x frames cell array of masks;
                a frame is abnormal iff its mask has a nonzero pixel.
  shanghaitech  shanghaitech/training/videos/01_001.avi, shanghaitech/testing/frames/01_0014/<n>.jpg,
                shanghaitech/testing/test_frame_mask/01_0014.npy (one 0/1 per frame).
Format preextracted (the frame folders the MNAD authors point to):
  <dataset>/{training,testing}/frames/<video>/<n>.jpg and the labels as frame_labels_<ped2|avenue|shanghai>.npy
  (all test videos concatenated in sorted order) or <ped2|avenue>.mat (variable gt: a 1 x videos cell array whose
  cell i is a 2 x K array of [start; end] abnormal ranges, 1-based inclusive). The .npy wins when both are present.
  Ped2's numbered folders (01, 02, ...) are named Train001/Test001 as in the raw archive, so both formats give the
  same tree.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

from pipeline import io
from pipeline.config import Dataset
from pipeline.datasets.archives import unpack
from pipeline.datasets.avenue import plan_avenue_raw
from pipeline.datasets.labels import label_table
from pipeline.datasets.layout import Plan
from pipeline.datasets.ped2 import plan_ped2_raw
from pipeline.datasets.preextracted import plan_preextracted
from pipeline.datasets.shanghaitech import plan_shanghaitech_raw
from pipeline.datasets.video import SPLITS, extract_videos
from pipeline.download import fetch
from pipeline.errors import UserError

PLANNERS: dict[str, dict[str, Callable[[Path, Dataset], Plan]]] = {  # kind -> format -> planner
    "ped2": {"raw": plan_ped2_raw, "preextracted": plan_preextracted},
    "avenue": {"raw": plan_avenue_raw, "preextracted": plan_preextracted},
    "shanghaitech": {"raw": plan_shanghaitech_raw, "preextracted": plan_preextracted},
}


def prepare_real(dataset: Dataset, raw_dir: Path, out_dir: Path) -> dict:
    """Download, verify and extract a real dataset into the empty folder out_dir (pipeline.prepare swaps it into
    place when everything succeeded); return counts for the stage's summary."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    key, source = f"datasets.{dataset.name}", dataset.source
    if dataset.kind not in PLANNERS:
        raise UserError(f"params.yaml: {key}.kind: {dataset.kind!r} is not a real dataset; "
                        f"valid: {sorted(PLANNERS)}")
    archive_paths = [fetch(archive, raw_dir, params_key=f"{key}.source.archives.{source.format}[{i}]")
                     for i, archive in enumerate(source.archives[source.format])]

    # Named after the staging folder, so that pipeline.io.atomic_folder removes what a killed run leaves here.
    with tempfile.TemporaryDirectory(prefix=f"{out_dir.name}.unpacked-", dir=out_dir.parent) as unpacked:
        unpacked = Path(unpacked)
        for path in archive_paths:
            unpack(path, unpacked / path.name)
        plan = PLANNERS[dataset.kind][source.format](unpacked, dataset)
        counts = extract_videos(plan.videos, out_dir, dataset)
    test_counts = {name: n for (split, name), n in counts.items() if split == "test"}
    test_labels = plan.labels.resolve(test_counts)
    io.write_csv(out_dir / "labels.csv", label_table(counts, test_labels))

    per_split = {split: [n for (s, _), n in counts.items() if s == split] for split in SPLITS}
    return {
        "dataset": dataset.name,
        "kind": dataset.kind,
        "format": source.format,
        "archives": [path.name for path in archive_paths],
        "frame_size": dataset.profile.frame_size,
        "channels": dataset.profile.channels,
        "train_videos": len(per_split["train"]),
        "train_frames": int(sum(per_split["train"])),
        "test_videos": len(per_split["test"]),
        "test_frames": int(sum(per_split["test"])),
        "abnormal_test_frames": int(sum(int(v.sum()) for v in test_labels.values())),
        "label_source": plan.labels.source,
    }
