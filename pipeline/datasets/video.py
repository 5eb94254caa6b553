"""Decoding the videos (.avi/.mp4 files or image sequences) into the harness's PNG frames, in parallel processes."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.errors import UserError

if TYPE_CHECKING:
    from pipeline.config import Dataset

SPLITS = ("train", "test")


def frame_file_name(index: int) -> str:
    return f"{index:06d}.png"


@dataclass(frozen=True)
class VideoSource:
    """One video to extract: a video file to decode, or an image sequence in frame order."""

    split: str                          # one of SPLITS
    name: str                           # output folder name
    shown_as: str                       # where it came from, for messages: "<archive>: <path inside>"
    video_file: Path | None = None
    image_files: tuple[Path, ...] = ()


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
    # A video cut short keeps its header: it opens, and decoding just stops early. The header's frame count tells;
    # it can be off by a frame or so in a long video, a cut loses far more.
    announced, decoded = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            decoded += 1
            yield frame
    finally:
        capture.release()
    if decoded < announced - announced // 100:
        raise UserError(f"{shown}: OpenCV decoded {decoded} of the {announced} frames its header announces "
                        f"(truncated or corrupt video); delete the archive from data/raw/ and rerun to download it "
                        f"again")


def _jpeg_cut_short(path: Path) -> bool:
    """Whether a JPEG lacks its end marker (FF D9) in its last bytes: libjpeg decodes a JPEG cut short without an
    error, greying what is missing, so OpenCV alone would let it through."""
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(0, size - 64))   # room for padding some encoders write after the marker
        return b"\xff\xd9" not in handle.read()


def _read_images(paths: Sequence[Path], shown: str) -> Iterator[np.ndarray]:
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_ANYCOLOR)  # grey stays grey, colour comes back BGR
        if image is None or (path.suffix.lower() in (".jpg", ".jpeg") and _jpeg_cut_short(path)):
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


def extract_videos(videos: Sequence[VideoSource], out_root: Path, dataset: Dataset) -> dict[tuple[str, str], int]:
    """Extract every video, in `dataset.source.extract_workers` processes (1 = in this process); frame counts by
    video."""
    size, channels = dataset.profile.frame_size, dataset.profile.channels
    counts = {}
    with tqdm(total=len(videos), unit="video", desc=f"extract {dataset.name}") as bar:
        if dataset.source.extract_workers == 1:
            for video in videos:
                counts[(video.split, video.name)] = extract_video(video, out_root, size, channels)
                bar.update()
            return counts
        # spawn, not fork: the parent may hold threads (tqdm, torch) whose locks a forked child would inherit
        with ProcessPoolExecutor(max_workers=min(dataset.source.extract_workers, len(videos)),
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
