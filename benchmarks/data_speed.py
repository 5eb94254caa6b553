"""Does the clip loader keep training fed? Loader samples/s against training samples/s, at two sizes.

    python benchmarks/data_speed.py [--sizes default paper] [--batches 100] [--steps 10] [--json PATH]

Sizes: `default` is the default study's (datasets.synthetic.profile: 64 px grey, its batch size and num_workers);
`paper` the papers' (ped2's profile: 256x256 BGR, batch 4, its num_workers). Both use mnad-pred's 5-frame windows.
Per size, frames are rendered by pipeline.synthetic into a temporary folder in the harness's layout, then:

- delivered: samples/s of a DataLoader built as pipeline.train.train_epoch builds it (ClipDataset, the epoch's
  seeded order as a Subset, batch size, num_workers, drop_last; a new loader per epoch), iterated without a model;
  `first_batch_s` is a loader's wait for its first batch (worker start-up), `steady_samples_s` the rate without
  those waits (the small folders here have short epochs, so start-up weighs more than on a real dataset);
- consumed: samples/s of mnad-pred training steps on random clips of the same shape (benchmarks/train_speed.py);
- ratio = delivered / consumed (target: at least 3).

At the paper size the same loader also reads a uint8 frame store (one [frames, H, W, C] .npy per video, opened
with mmap_mode="r") instead of PNGs, with num_workers 0 and the profile's, after checking that both stores yield
bit-identical clips.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (first: pins the CPU kernels of numpy and torch, as every stage does)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from benchmarks.common import folder_mb, matmul_gflops, peak_rss_mb, report  # noqa: E402
from benchmarks.train_speed import measure as training_speed  # noqa: E402
from pipeline.config import Dataset, load_params  # noqa: E402
from pipeline.data import ClipDataset, clip_dataset  # noqa: E402
from pipeline.device import compute_device  # noqa: E402
from pipeline.synthetic import render_dataset  # noqa: E402
from pipeline.train import epoch_order  # noqa: E402

VARIANT = "mnad-pred"


def size_datasets(params) -> dict[str, Dataset]:
    """The dataset each size renders and trains with (training split only: the loader never reads the test one)."""
    synthetic = params.dataset("synthetic")
    default = synthetic.model_copy(update={"source": synthetic.source.model_copy(update={"test_videos": 0})})
    # Paper size: textured, noisy scenes (camera-like PNGs, not flat black ones), shapes scaled to 256 px;
    # 2 videos x 60 frames keep rendering under a minute.
    scenes = params.dataset("synthetic-scenes").source.model_copy(update={
        "render_size": 256, "circle_radius": 32.0, "normal_speed": 16.0, "anomaly_speed": 36.0,
        "train_videos": 2, "test_videos": 0, "frames_per_video": 60})
    paper = Dataset(name="paper", kind="synthetic", profile=params.dataset("ped2").profile, source=scenes)
    return {"default": default, "paper": paper}


class FrameStore(torch.utils.data.Dataset):
    """ClipDataset's windows read from a uint8 store: one memory-mapped [frames, H, W, C] .npy per video."""

    def __init__(self, store: Path, clips: ClipDataset):
        self.store, self.window = store, clips.window
        self._video = clips.windows["video"].to_numpy()
        self._start = clips.windows["start"].to_numpy()
        self._arrays: dict[str, np.ndarray] = {}   # opened lazily, so each loader worker maps its own

    def __len__(self) -> int:
        return len(self._video)

    def __getitem__(self, index: int) -> dict:
        video, start = self._video[index], int(self._start[index])
        if video not in self._arrays:
            self._arrays[video] = np.load(self.store / f"{video}.npy", mmap_mode="r")
        frames = self._arrays[video][start:start + self.window]
        # the same arithmetic as pipeline.data.read_frame, so the clips match bit for bit
        clip = frames.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
        return {"clip": torch.from_numpy(clip), "index": index}


def write_store(frames: Path, store: Path) -> None:
    """Every training video's PNGs, read as cv2 reads them, into one uint8 [frames, H, W, C] .npy."""
    store.mkdir()
    for folder in sorted((frames / "train").iterdir()):
        images = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(folder.glob("*.png"))]
        array = np.stack(images)
        np.save(store / f"{folder.name}.npy", array if array.ndim == 4 else array[..., None])


def delivered(dataset, profile, workers: int, batches: int, device) -> tuple[float, float, float]:
    """Over `batches` batches from loaders built like train_epoch's (a new one per epoch): (samples/s, samples/s
    after each loader's first batch, mean seconds to a loader's first batch)."""
    pool = list(range(len(dataset)))
    done, epoch, waits, started = 0, 0, [], time.perf_counter()
    while done < batches:
        loader = DataLoader(Subset(dataset, epoch_order(pool, profile.max_train_clips, 0, epoch)),
                            batch_size=profile.batch_size, shuffle=False, drop_last=True,
                            num_workers=workers, pin_memory=device.type == "cuda")
        opened = time.perf_counter()
        for index, _ in enumerate(loader):
            if index == 0:   # worker start-up: paid once per epoch, so it weighs more here than on a real set
                waits.append(time.perf_counter() - opened)
            done += 1
            if done == batches:
                break
        epoch += 1
    seconds = time.perf_counter() - started
    steady = (done - len(waits)) * profile.batch_size / (seconds - sum(waits))
    return done * profile.batch_size / seconds, steady, sum(waits) / len(waits)


def measure(name: str, dataset: Dataset, variant, args, device, work: Path, context: dict) -> list[dict]:
    profile = dataset.profile
    frames = work / name
    started = time.perf_counter()
    render_dataset(dataset, frames)
    print(f"{name}: rendered {frames} in {time.perf_counter() - started:.1f} s")
    clips = clip_dataset(frames, "train", variant)
    stores = {"png": clips}
    context[f"{name}_png_mb"] = round(folder_mb(frames, "*.png"), 2)
    if name == "paper":
        write_store(frames, frames / "store")
        stores["npy"] = FrameStore(frames / "store", clips)
        context[f"{name}_npy_mb"] = round(folder_mb(frames, "*.npy"), 2)
        for index in (0, len(clips) // 2, len(clips) - 1):
            if not torch.equal(clips[index]["clip"], stores["npy"][index]["clip"]):
                raise SystemExit(f"{name}: the uint8 store's clip {index} differs from the PNGs'")
    train_rate = training_speed(variant, profile, "baseline", args.steps, device)["samples_per_s"]
    shape = f"{profile.frame_size}x{profile.frame_size}x{profile.channels}"
    rows = []
    for store, dataset_ in stores.items():
        # the PNG loader at the profile's setting is what training uses; the store comparison adds 0 workers too
        for workers in sorted({profile.num_workers} | ({0} if name == "paper" else set())):
            rate, steady, first = delivered(dataset_, profile, workers, args.batches, device)
            rows.append({"size": name, "frame": shape, "window": variant.window, "batch": profile.batch_size,
                         "store": store, "workers": workers, "samples_s": rate, "steady_samples_s": steady,
                         "first_batch_s": first, "train_samples_s": train_rate, "ratio": rate / train_rate})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=("default", "paper"), default=["default", "paper"])
    parser.add_argument("--batches", type=int, default=100, help="loader batches timed per row")
    parser.add_argument("--steps", type=int, default=10, help="most timed training steps per size (5 s cap)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here as JSON")
    args = parser.parse_args()
    params = load_params()
    variant = params.variant(VARIANT)
    device = compute_device()
    datasets = size_datasets(params)
    context = {"variant": VARIANT, "device": device.type, "batches": args.batches,
               "matmul_gflops": round(matmul_gflops(device), 1)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="data_speed-") as work:
        for name in args.sizes:
            rows += measure(name, datasets[name], variant, args, device, Path(work), context)
    context["peak_rss_mb"] = round(peak_rss_mb(), 1)
    report(rows, args.json, **context)


if __name__ == "__main__":
    main()
