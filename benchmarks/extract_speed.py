"""Frame extraction speed: pipeline.datasets.video.extract_videos in one process and in a process pool.

    python benchmarks/extract_speed.py [--videos 4] [--frames 200] [--repeats 2] [--json PATH]

Writes `--videos` small .avi files (360x240 moving shapes on a noisy textured background; MJPG, else XVID: whichever
this OpenCV writes and reads back) into a temporary folder, then extracts them as a real dataset's prepare stage
does (ped2's profile: 256x256 BGR PNGs). Rows, each the best of `--repeats`:

- decode: a cv2.VideoCapture read loop alone, in this process;
- decode+resize: plus pipeline.datasets.video.to_frame (colour conversion and the resize), nothing written;
- extract: the whole extract_videos (decode, resize, PNG write) with source.extract_workers 1 (in this process)
  and 2 (its spawn process pool); `speedup` is over 1 worker (target: at least 1.7 on 2 cores);
- pool start-up: a 2-process spawn pool as extract_videos starts it, running nothing but a trivial call.

`cpu_per_wall` is the CPU seconds of this process and its children per wall second: the cores a row kept busy.
"""
from __future__ import annotations

import argparse
import itertools
import multiprocessing
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (first: pins the CPU kernels of numpy and torch, as every stage does)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
# Only what the prepare stage's processes import: spawned workers re-run this module's top level, so importing
# torch here (benchmarks.common does) would charge the pool a start-up the real stage never pays.
from pipeline.config import load_params  # noqa: E402
from pipeline.datasets.video import VideoSource, extract_videos, frame_file_name, to_frame  # noqa: E402

WIDTH, HEIGHT = 360, 240


def write_video(path: Path, codec: str, frames: int, seed: int) -> None:
    """Three bouncing discs over a blurred-noise background, with fresh sensor noise on every frame."""
    rng = np.random.default_rng(seed)
    background = cv2.GaussianBlur(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8), (0, 0), 4)
    noise = [rng.integers(0, 12, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(8)]
    position = rng.uniform((20, 20), (WIDTH - 20, HEIGHT - 20), size=(3, 2))
    velocity = rng.uniform(-6, 6, size=(3, 2))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), 25.0, (WIDTH, HEIGHT))
    for t in range(frames):
        image = cv2.add(background, noise[t % len(noise)])
        for x, y in position:
            cv2.circle(image, (int(x), int(y)), 15, (255, 255, 255), -1, cv2.LINE_AA)
        writer.write(image)
        position += velocity
        bounced = (position < 20) | (position > (WIDTH - 20, HEIGHT - 20))
        velocity[bounced] *= -1
    writer.release()


def decoded(path: Path):
    capture = cv2.VideoCapture(str(path))
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        yield frame
    capture.release()


def decode_and_resize(paths: list[Path], size: int, channels: int) -> int:
    count = 0
    for path in paths:
        for image in decoded(path):
            to_frame(image, size, channels)
            count += 1
    return count


def write_videos(folder: Path, count: int, frames: int) -> tuple[list[Path], str]:
    """The videos, in the first codec whose file this OpenCV reads back with every frame."""
    for codec in ("MJPG", "XVID"):
        paths = [folder / f"{codec.lower()}-{i:02d}.avi" for i in range(count)]
        for seed, path in enumerate(paths):
            write_video(path, codec, frames, seed)
        if all(sum(1 for _ in decoded(path)) == frames for path in paths):
            return paths, codec
    raise SystemExit("this OpenCV cannot write and read back MJPG or XVID .avi files (no FFMPEG?)")


def timed(work, repeats: int) -> tuple[float, float, object]:
    """(best wall seconds, CPU seconds per wall second of that run, its result) over `repeats` calls of work()."""
    best = None
    for _ in range(repeats):
        cpu = _cpu_seconds()
        started = time.perf_counter()
        result = work()
        wall = time.perf_counter() - started
        if best is None or wall < best[0]:
            best = (wall, (_cpu_seconds() - cpu) / wall, result)
    return best


def _cpu_seconds() -> float:
    """User + system CPU of this process and of its children that have exited (the pool's, once it shut down)."""
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage,
                                                      (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def start_pool(workers: int) -> None:
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=cv2.setNumThreads, initargs=(1,)) as pool:
        list(pool.map(frame_file_name, range(workers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames", type=int, default=200, help="frames per video")
    parser.add_argument("--repeats", type=int, default=2, help="each row is the best of this many runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here as JSON")
    args = parser.parse_args()
    from benchmarks.common import report   # here, not at the top: see the imports above

    base = load_params().dataset("ped2")
    size, channels = base.profile.frame_size, base.profile.channels
    rows = []

    def row(step: str, workers: int, frames: int, result: tuple, speedup: float | None = None) -> None:
        seconds, cpu_per_wall, _ = result
        rows.append({"step": step, "workers": workers, "frames": frames, "seconds": seconds,
                     "frames_s": frames / seconds if frames else None, "cpu_per_wall": cpu_per_wall,
                     "speedup": speedup})

    with tempfile.TemporaryDirectory(prefix="extract_speed-") as work:
        work = Path(work)
        started = time.perf_counter()
        paths, codec = write_videos(work, args.videos, args.frames)
        print(f"wrote {args.videos} x {args.frames} frames {WIDTH}x{HEIGHT} {codec} in "
              f"{time.perf_counter() - started:.1f} s; extracting to {size}x{size}x{channels} PNGs")
        total = args.videos * args.frames
        videos = [VideoSource("train", path.stem, f"benchmark: {path.name}", video_file=path) for path in paths]
        row("decode", 1, total, timed(lambda: sum(1 for p in paths for _ in decoded(p)), args.repeats))
        row("decode+resize", 1, total, timed(lambda: decode_and_resize(paths, size, channels), args.repeats))
        runs = itertools.count()   # extract_videos wants a fresh output folder per run
        rates = {}
        for workers in (1, 2):
            dataset = base.model_copy(update={"name": "benchmark", "source": base.source.model_copy(
                update={"extract_workers": workers})})
            result = timed(lambda: extract_videos(videos, work / f"out-{next(runs)}", dataset), args.repeats)
            if sum(result[2].values()) != total:
                raise SystemExit(f"extract_videos wrote {sum(result[2].values())} frames, expected {total}")
            rates[workers] = total / result[0]
            row("extract", workers, total, result, rates[workers] / rates[1])
        row("pool start-up", 2, 0, timed(lambda: start_pool(2), args.repeats))
        png_kb = np.mean([p.stat().st_size for p in (work / "out-0" / "train").rglob("*.png")]) / 1024
    report(rows, args.json, codec=codec, video_size=f"{WIDTH}x{HEIGHT}", frame_size=size, channels=channels,
           videos=args.videos, frames_per_video=args.frames, png_kb=round(float(png_kb), 1),
           cv2_threads=cv2.getNumThreads(), cpu_count=multiprocessing.cpu_count())


if __name__ == "__main__":
    main()
