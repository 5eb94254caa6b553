"""Turn the archives of UCSD Ped2, CUHK Avenue and ShanghaiTech into the harness's frame layout.

    prepare_real(dataset, raw_dir, out_dir) -> summary dict

1. fetch every archive of dataset.sources[dataset.format] into raw_dir (pipeline.download: sha256, resume, mirrors).
2. Unpack them into a temporary folder beside out_dir, refusing any member that would land outside it.
3. Plan: find the videos of each split and read the ground truth, as the dataset's own files state it.
4. Decode/convert every video (in parallel processes), resize once to the profile's frame_size with INTER_AREA, write
   out_dir/{train,test}/<video>/<000000>.png (0-based, consecutive) in the profile's channels (1 grey, 3 BGR).
5. Check every test video's decoded frame count against its labels, write out_dir/labels.csv
   (split,video,frame,label,anomaly_type), and only then rename the finished folder onto out_dir.

Nothing is ever left half-built under out_dir: all of it happens in the temporary sibling, which is removed on failure.

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

import gzip
import multiprocessing
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from pipeline import io
from pipeline.config import Dataset
from pipeline.download import fetch
from pipeline.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

SPLITS = ("train", "test")
LABEL_COLUMNS = ["split", "video", "frame", "label", "anomaly_type"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
VIDEO_SUFFIXES = (".avi", ".mp4")
SEARCH_DEPTH = 5    # how deep below the unpacked archives the dataset's folders may sit


def frame_file_name(index: int) -> str:
    return f"{index:06d}.png"


# ----------------------------------------------------------------------------------------------------------------
# The entry point


def prepare_real(dataset: Dataset, raw_dir: Path, out_dir: Path) -> dict:
    """Download, verify and extract a real dataset into out_dir; return counts for the stage's summary."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    key = f"datasets.{dataset.name}"
    if dataset.kind not in PLANNERS:
        raise UserError(f"params.yaml: {key}.kind: {dataset.kind!r} is not a real dataset; "
                        f"valid: {sorted(PLANNERS)}")
    if dataset.format not in PLANNERS[dataset.kind]:
        raise UserError(f"params.yaml: {key}.format: unknown format {dataset.format!r}; valid: raw, preextracted")
    if dataset.extract_workers < 1:
        raise UserError(f"params.yaml: {key}.extract_workers: must be at least 1 (1 = no extra processes), "
                        f"got {dataset.extract_workers}")
    archives = dataset.sources.get(dataset.format, ())
    if not archives:
        raise UserError(f"params.yaml: {key}.sources.{dataset.format}: no archives listed")

    archive_paths = [fetch(archive, raw_dir, params_key=f"{key}.sources.{dataset.format}[{i}]")
                     for i, archive in enumerate(archives)]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.building-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run (DVC never runs one stage twice at once)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        unpacked = work / "unpacked"
        for path in archive_paths:
            unpack(path, unpacked / path.name)
        plan = PLANNERS[dataset.kind][dataset.format](unpacked, dataset)

        built = work / "frames"
        counts = _extract_videos(plan.videos, built, dataset)
        test_counts = {name: n for (split, name), n in counts.items() if split == "test"}
        test_labels = plan.labels.resolve(test_counts)
        table = _label_table(counts, test_labels)
        io.write_csv(built / "labels.csv", table)

        _move_into_place(built, out_dir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    per_split = {split: [n for (s, _), n in counts.items() if s == split] for split in SPLITS}
    return {
        "dataset": dataset.name,
        "kind": dataset.kind,
        "format": dataset.format,
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


def _move_into_place(built: Path, out_dir: Path, work: Path) -> None:
    """Swap the finished folder onto out_dir; an older out_dir goes into the work folder, which is then deleted."""
    if out_dir.exists() or out_dir.is_symlink():
        os.replace(out_dir, work / "previous")
    os.replace(built, out_dir)


def _label_table(counts: Mapping[tuple[str, str], int], test_labels: Mapping[str, np.ndarray]) -> pd.DataFrame:
    import pandas as pd  # here, not at the top: worker processes never need it, and it is slow to import

    parts = []
    for split in SPLITS:
        for video in sorted(name for s, name in counts if s == split):
            n = counts[(split, video)]
            labels = test_labels[video] if split == "test" else np.zeros(n, dtype=np.int64)
            parts.append(pd.DataFrame({"split": split, "video": video, "frame": np.arange(n),
                                       "label": labels.astype(np.int64), "anomaly_type": ""}))
    return pd.concat(parts, ignore_index=True)[LABEL_COLUMNS]


# ----------------------------------------------------------------------------------------------------------------
# Unpacking, refusing anything that would land outside the target folder


def unpack(archive: Path, dest: Path) -> None:
    """Unpack a tar (any compression) or zip into dest; a bare .npy/.mat/.m label file is linked in as it is."""
    dest.mkdir(parents=True, exist_ok=True)
    lower = archive.name.lower()
    if lower.endswith((".npy", ".mat", ".m")):
        _link_or_copy(archive, dest / archive.name)
    elif lower.endswith(".zip") or zipfile.is_zipfile(archive):
        _unpack_zip(archive, dest)
    elif ".tar" in lower or lower.endswith((".tgz", ".tbz2", ".txz")) or tarfile.is_tarfile(archive):
        _unpack_tar(archive, dest)
    else:
        raise UserError(f"{archive}: not a tar or zip archive, nor a .npy/.mat label file; "
                        f"check the archive names listed in params.yaml")


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _member_problem(dest: Path, name: str) -> str | None:
    """Why an archive member's path is unsafe to create under dest (None: it is safe)."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        return "has an absolute path"
    target = os.path.normpath(os.path.join(dest, posix))
    if os.path.commonpath([dest, target]) != str(dest):
        return "would be written outside the target folder"
    return None


def _link_problem(dest: Path, link_dir: str, link_target: str) -> str | None:
    """Why a link whose target is `link_target`, resolved from folder `link_dir` (inside dest), is unsafe."""
    posix = link_target.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        return f"is a link to the absolute path {link_target!r}"
    target = os.path.normpath(os.path.join(dest, link_dir, posix))
    if os.path.commonpath([dest, target]) != str(dest):
        return f"is a link to {link_target!r}, outside the target folder"
    return None


def _refuse(archive: Path, member: str, problem: str) -> UserError:
    return UserError(f"{archive}: member {member!r} {problem}; refusing to unpack this archive. It is not the "
                     f"dataset's official archive: delete it and put the genuine file in its place "
                     f"(see docs/datasets.md)")


def _unpack_tar(archive: Path, dest: Path) -> None:
    dest = dest.resolve()

    def checked_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
        for member in tar:  # streams: one pass over a compressed archive
            problem = _member_problem(dest, member.name)
            if problem is None and member.issym():
                problem = _link_problem(dest, os.path.dirname(member.name.replace("\\", "/")), member.linkname)
            elif problem is None and member.islnk():
                problem = _link_problem(dest, "", member.linkname)  # hard links name a path from the archive root
            elif problem is None and not (member.isfile() or member.isdir()):
                problem = "is a device, pipe or other special file"
            if problem:
                raise _refuse(archive, member.name, problem)
            yield member

    try:
        with tarfile.open(archive) as tar:
            # The "data" filter repeats these checks inside tarfile and drops unsafe permission bits.
            tar.extractall(dest, members=checked_members(tar), filter="data")
    except tarfile.FilterError as exc:
        raise _refuse(archive, exc.tarinfo.name, str(exc)) from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        # OSError from writing (disk full, permissions) is not the archive's fault and propagates as it is
        raise UserError(f"{archive}: damaged or not a tar archive ({exc}); delete it and rerun to download it "
                        f"again") from None


def _unpack_zip(archive: Path, dest: Path) -> None:
    dest = dest.resolve()
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            for info in members:
                problem = _member_problem(dest, info.filename)
                is_link = stat.S_ISLNK(info.external_attr >> 16)
                if problem is None and is_link:
                    link_target = zf.read(info).decode("utf-8", "replace")
                    problem = _link_problem(dest, os.path.dirname(info.filename.replace("\\", "/")), link_target)
                if problem:
                    raise _refuse(archive, info.filename, problem)
            zf.extractall(dest, members)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise UserError(f"{archive}: damaged or not a zip archive ({exc}); delete it and rerun to download it "
                        f"again") from None


# ----------------------------------------------------------------------------------------------------------------
# Plans: what to decode and what the ground truth says, found before any decoding starts


@dataclass(frozen=True)
class VideoSource:
    """One video to extract: a video file to decode, or an image sequence in frame order."""

    split: str
    name: str                           # output folder name
    shown_as: str                       # where it came from, for messages: "<archive>: <path inside>"
    video_file: Path | None = None
    image_files: tuple[Path, ...] = ()


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


def _count_mismatch(video: str, frames: int, labels: int, label_file: str) -> UserError:
    return UserError(f"test video {video}: {frames} decoded frames but {labels} labels in {label_file}; the video "
                     f"and its labels do not belong together (a truncated video or a different release): check "
                     f"that the archives are the ones listed in params.yaml (delete them from data/raw/ and rerun)")


@dataclass(frozen=True)
class Plan:
    videos: list[VideoSource]
    labels: PerFrameLabels | RangeLabels | ConcatenatedLabels


def _shown_as(path: Path, unpacked: Path) -> str:
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


def _find_one_dir(unpacked: Path, matches: Callable[[Path], bool], expected: str, dataset: Dataset,
                  preferred_names: Sequence[str] = ()) -> Path:
    found = _find_dirs(unpacked, matches)
    if len(found) > 1:
        preferred = [d for d in found if d.name in preferred_names]
        found = preferred if len(preferred) == 1 else found
    if len(found) != 1:
        archives = sorted(p.name for p in unpacked.iterdir())
        listed = ", ".join(_shown_as(d, unpacked) for d in found)
        what = f"{len(found)} folders ({listed})" if found else "no folder"
        raise UserError(f"datasets.{dataset.name} ({dataset.kind}, format {dataset.format}): expected {expected} "
                        f"in the archives {archives}, found {what}; check the archives listed under "
                        f"datasets.{dataset.name}.sources.{dataset.format} in params.yaml (see docs/datasets.md)")
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
            raise UserError(f"{_shown_as(path, unpacked)}: a frame file without a frame number in its name; "
                            f"remove it from the archive's frame folder")
        number = int(match.group(1))
        if number in numbered:
            raise UserError(f"{_shown_as(path, unpacked)} and {numbered[number].name}: two frames numbered {number}")
        numbered[number] = path
    if not numbered:
        raise UserError(f"{_shown_as(folder, unpacked)}: a video folder without frame images "
                        f"({', '.join(IMAGE_SUFFIXES)}); the archive is incomplete: delete it and rerun")
    return tuple(numbered[n] for n in sorted(numbered))


def _image_videos(split: str, folder: Path, unpacked: Path, rename: Callable[[str], str] = str) -> list[VideoSource]:
    return [VideoSource(split, rename(d.name), _shown_as(d, unpacked), image_files=_frame_files(d, unpacked))
            for d in _video_dirs(folder)]


def _file_videos(split: str, folder: Path, unpacked: Path) -> list[VideoSource]:
    return [VideoSource(split, p.stem, _shown_as(p, unpacked), video_file=p) for p in _video_files(folder)]


def _check_videos(videos: list[VideoSource], dataset: Dataset, where: Mapping[str, str]) -> list[VideoSource]:
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


# --- UCSD Ped2, raw ---------------------------------------------------------------------------------------------

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
    root = _find_one_dir(unpacked, lambda d: d.name == "UCSDped2" and (d / "Train").is_dir() and (d / "Test").is_dir(),
                         "the folder UCSD_Anomaly_Dataset.v1p2/UCSDped2/ with Train/ and Test/", dataset)
    videos = (_image_videos("train", root / "Train", unpacked) + _image_videos("test", root / "Test", unpacked))
    _check_videos(videos, dataset, {"train": _shown_as(root / "Train", unpacked),
                                    "test": _shown_as(root / "Test", unpacked)})
    gt_file = root / "Test" / "UCSDped2.m"
    if not gt_file.is_file():
        raise UserError(f"{_shown_as(root / 'Test', unpacked)}: UCSDped2.m (the frame ground truth) is missing; "
                        f"the archive is incomplete or not UCSD_Anomaly_Dataset.tar.gz")
    shown = _shown_as(gt_file, unpacked)
    per_video = parse_ucsd_ground_truth(gt_file.read_text(errors="replace"), shown)
    test_names = [v.name for v in videos if v.split == "test"]
    if len(per_video) != len(test_names):
        raise UserError(f"{shown}: ground truth for {len(per_video)} test videos, but the archive has "
                        f"{len(test_names)} test video folders ({', '.join(test_names)}); the archive is not "
                        f"UCSD's v1p2 release")
    return Plan(videos, RangeLabels(dict(zip(test_names, per_video)), shown))


# --- CUHK Avenue, raw -------------------------------------------------------------------------------------------


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
    root = _find_one_dir(unpacked, lambda d: (d / "training_videos").is_dir() and (d / "testing_videos").is_dir(),
                         "the folder 'Avenue Dataset/' with training_videos/ and testing_videos/", dataset)
    videos = (_file_videos("train", root / "training_videos", unpacked)
              + _file_videos("test", root / "testing_videos", unpacked))
    _check_videos(videos, dataset, {"train": _shown_as(root / "training_videos", unpacked),
                                    "test": _shown_as(root / "testing_videos", unpacked)})
    mask_dir = _find_one_dir(unpacked, lambda d: d.name == "testing_label_mask",
                             "the folder ground_truth_demo/testing_label_mask/ (from ground_truth_demo.zip, the "
                             "second Avenue archive)", dataset)
    labels = {}
    for video in (v for v in videos if v.split == "test"):
        if not video.name.isdigit():
            raise UserError(f"{video.shown_as}: Avenue test videos are named 01.avi ... 21.avi; cannot match it "
                            f"to a <n>_label.mat")
        label_file = mask_dir / f"{int(video.name)}_label.mat"
        shown = _shown_as(label_file, unpacked)
        if not label_file.is_file():
            raise UserError(f"test video {video.name}: its ground truth {shown} is missing; the label archive "
                            f"is incomplete or not ground_truth_demo.zip")
        labels[video.name] = (read_avenue_mask_labels(label_file, shown), shown)
    return Plan(videos, PerFrameLabels(labels, _shown_as(mask_dir, unpacked)))


# --- ShanghaiTech, raw ------------------------------------------------------------------------------------------


def _load_label_npy(path: Path, shown: str) -> np.ndarray:
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


def plan_shanghaitech_raw(unpacked: Path, dataset: Dataset) -> Plan:
    root = _find_one_dir(unpacked,
                         lambda d: (d / "training" / "videos").is_dir() and (d / "testing" / "frames").is_dir(),
                         "the folder shanghaitech/ with training/videos/ and testing/frames/", dataset)
    videos = (_file_videos("train", root / "training" / "videos", unpacked)
              + _image_videos("test", root / "testing" / "frames", unpacked))
    _check_videos(videos, dataset, {"train": _shown_as(root / "training" / "videos", unpacked),
                                    "test": _shown_as(root / "testing" / "frames", unpacked)})
    mask_dir = root / "testing" / "test_frame_mask"
    labels = {}
    for video in (v for v in videos if v.split == "test"):
        label_file = mask_dir / f"{video.name}.npy"
        shown = _shown_as(label_file, unpacked)
        if not label_file.is_file():
            raise UserError(f"test video {video.name}: its ground truth {shown} is missing; the archive is "
                            f"incomplete or not shanghaitech.tar.gz")
        labels[video.name] = (_load_label_npy(label_file, shown), shown)
    return Plan(videos, PerFrameLabels(labels, _shown_as(mask_dir, unpacked)))


# --- every dataset, preextracted --------------------------------------------------------------------------------

PREEXTRACTED_NAMES = {  # folder names, label .npy names, label .mat names
    "ped2": (("ped2",), ("frame_labels_ped2.npy",), ("ped2.mat",)),
    "avenue": (("avenue",), ("frame_labels_avenue.npy",), ("avenue.mat",)),
    "shanghaitech": (("shanghaitech", "shanghai"), ("frame_labels_shanghai.npy", "frame_labels_shanghaitech.npy"),
                     ("shanghaitech.mat", "shanghai.mat")),
}


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
                shown = _shown_as(path, unpacked)
                return ConcatenatedLabels(_load_label_npy(path, shown), shown)
    for wanted in mat_names:
        for path in candidates:
            if path.name == wanted:
                shown = _shown_as(path, unpacked)
                per_video = read_range_mat(path, shown)
                if len(per_video) != len(test_names):
                    raise UserError(f"{shown}: ground truth for {len(per_video)} test videos, but the frames "
                                    f"archive has {len(test_names)} test video folders; they do not belong together")
                return RangeLabels(dict(zip(test_names, per_video)), shown)
    raise UserError(f"datasets.{dataset.name} (format preextracted): no ground truth among the archives; expected "
                    f"one of {list(npy_names + mat_names)}: add it as another archive (a bare .npy/.mat is fine) "
                    f"under datasets.{dataset.name}.sources.preextracted in params.yaml (see docs/datasets.md)")


def _ped2_raw_name(split: str) -> Callable[[str], str]:
    """MNAD's ped2 frame folders are 01, 02, ...; name them Train001 / Test001 as UCSD's archive does."""
    prefix = "Train" if split == "train" else "Test"
    return lambda name: f"{prefix}{int(name):03d}" if name.isdigit() else name


def plan_preextracted(unpacked: Path, dataset: Dataset) -> Plan:
    folder_names = PREEXTRACTED_NAMES[dataset.kind][0]
    root = _find_one_dir(unpacked,
                         lambda d: (d / "training" / "frames").is_dir() and (d / "testing" / "frames").is_dir(),
                         f"the folder {folder_names[0]}/ with training/frames/ and testing/frames/", dataset,
                         preferred_names=folder_names)
    videos = []
    for split, folder in (("train", "training"), ("test", "testing")):
        rename = _ped2_raw_name(split) if dataset.kind == "ped2" else str
        videos += _image_videos(split, root / folder / "frames", unpacked, rename)
    _check_videos(videos, dataset, {"train": _shown_as(root / "training" / "frames", unpacked),
                                    "test": _shown_as(root / "testing" / "frames", unpacked)})
    test_names = sorted(v.name for v in videos if v.split == "test")
    return Plan(videos, _preextracted_labels(unpacked, dataset, test_names))


PLANNERS: dict[str, dict[str, Callable[[Path, Dataset], Plan]]] = {
    "ped2": {"raw": plan_ped2_raw, "preextracted": plan_preextracted},
    "avenue": {"raw": plan_avenue_raw, "preextracted": plan_preextracted},
    "shanghaitech": {"raw": plan_shanghaitech_raw, "preextracted": plan_preextracted},
}


# ----------------------------------------------------------------------------------------------------------------
# Decoding and writing frames (runs in worker processes)


def to_frame(image: np.ndarray, frame_size: int, channels: int) -> np.ndarray:
    """Colour conversion first (grey <-> BGR, alpha dropped), then the one resize, INTER_AREA."""
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if channels == 1 and image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif channels == 3 and image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return cv2.resize(image, (frame_size, frame_size), interpolation=cv2.INTER_AREA)


def _decoded_frames(path: Path, shown: str) -> Iterator[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise UserError(f"{shown}: OpenCV cannot open this video (truncated or corrupt); delete the archive from "
                        f"data/raw/ and rerun to download it again, and check that cv2 has FFMPEG "
                        f"(python -c 'import cv2; print(cv2.getBuildInformation())')")
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield frame
    finally:
        capture.release()


def _read_images(paths: Sequence[Path], shown: str) -> Iterator[np.ndarray]:
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_ANYCOLOR)  # grey stays grey, colour comes back BGR
        if image is None:
            raise UserError(f"{shown}/{path.name}: OpenCV cannot read this image (truncated or corrupt); delete "
                            f"the archive from data/raw/ and rerun to download it again")
        yield image


def extract_video(source: VideoSource, out_root: Path, frame_size: int, channels: int) -> int:
    """Write one video's frames to out_root/<split>/<name>/000000.png ...; return the number of frames."""
    out = out_root / source.split / source.name
    out.mkdir(parents=True, exist_ok=False)
    if source.video_file is not None:
        frames = _decoded_frames(source.video_file, source.shown_as)
    else:
        frames = _read_images(source.image_files, source.shown_as)
    count = 0
    for count, image in enumerate(frames, 1):
        target = out / frame_file_name(count - 1)
        if not cv2.imwrite(str(target), to_frame(image, frame_size, channels)):
            raise UserError(f"{target}: could not write the frame; is the disk full? (see docs/datasets.md for sizes)")
    if count == 0:
        raise UserError(f"{source.shown_as}: OpenCV decoded 0 frames (truncated or corrupt video); delete the "
                        f"archive from data/raw/ and rerun to download it again")
    return count


def _limit_worker_threads() -> None:
    cv2.setNumThreads(1)  # the processes already use every core; OpenCV's own threads would only contend


def _extract_videos(videos: Sequence[VideoSource], out_root: Path, dataset: Dataset) -> dict[tuple[str, str], int]:
    """Extract every video, in `dataset.extract_workers` processes (1 = in this process); frame counts by video."""
    size, channels = dataset.profile.frame_size, dataset.profile.channels
    counts = {}
    with tqdm(total=len(videos), unit="video", desc=f"extract {dataset.name}") as bar:
        if dataset.extract_workers == 1:
            for video in videos:
                counts[(video.split, video.name)] = extract_video(video, out_root, size, channels)
                bar.update()
            return counts
        # spawn, not fork: the parent may hold threads (tqdm, torch) whose locks a forked child would inherit
        with ProcessPoolExecutor(max_workers=min(dataset.extract_workers, len(videos)),
                                 mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_limit_worker_threads) as pool:
            futures = {pool.submit(extract_video, video, out_root, size, channels): video for video in videos}
            try:
                for future in as_completed(futures):
                    video = futures[future]
                    counts[(video.split, video.name)] = future.result()
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return counts
