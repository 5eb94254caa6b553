"""Peak resident memory of training against the dataset's size: frames are streamed from disk, so it stays flat.

    python benchmarks/memory_scaling.py [--params params.yaml] [--dataset synthetic] [--variant mnad-pred]
        [--factors 1 2 8] [--scale train_videos | frames_per_video] [--clips N] [--seed 0]
        [--json /tmp/bench/memory_scaling.json]

For each factor, the dataset's source option `--scale` (a synthetic dataset's train_videos by default, or
frames_per_video) is multiplied by it in a params file written to a temporary folder, and the frames are prepared
there (pipeline.prepare). Then a fresh Python process per factor (this script with --child), so that each peak is
its own, trains the variant for one epoch of `--clips` training windows (default: the profile's max_train_clips):
the same steps at every factor, only the set they are drawn from grows. The child reports its own peak RSS
(getrusage RUSAGE_SELF ru_maxrss), its RSS after the imports (the interpreter, torch and the pipeline, before any
frame is read) and the training seconds.

Columns: train_frames, train_mb_disk (the PNGs under frames/<dataset>/train), train_mb_f32 (the same frames as
float32 tensors: what a loader that held the training set in memory would add), rss_imports_mb, peak_rss_mb,
training_mb (peak - imports) and peak_ratio (peak / the first factor's peak). Flat peaks while train_mb_f32 grows
say the frames are streamed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")   # the pipeline's progress bars would interleave with the table

RESULT = "RESULT "   # the child's last stdout line: this prefix, then its measurements as JSON


def child(args) -> None:
    """Train one epoch of args.clips windows on the prepared frames; print the peak RSS and friends."""
    from benchmarks.common import peak_rss_mb
    from pipeline.config import load_params
    from pipeline.device import compute_device
    from pipeline.train import train
    imports_mb = peak_rss_mb()   # torch and the pipeline loaded, no frame read yet

    params = load_params(args.params)
    dataset, variant = params.dataset(args.dataset), params.variant(args.variant)
    profile = dataset.profile
    # One epoch of the same clips at every factor; a family's own epochs or clips would override these, so drop them.
    families = {name: own.model_copy(update={"epochs": None, "max_train_clips": None})
                for name, own in profile.families.items()}
    profile = profile.model_copy(update={"epochs": 1, "max_train_clips": args.clips, "families": families})
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="memory-scaling-run-") as out:
        training = train(dataset.model_copy(update={"profile": profile}), variant, args.seed, args.child, Path(out),
                         compute_device())
    print(RESULT + json.dumps({"rss_imports_mb": imports_mb, "peak_rss_mb": peak_rss_mb(),
                               "steps": training.log[-1]["step"], "train_windows": training.train_clips,
                               "train_seconds": time.perf_counter() - started}), flush=True)


def scaled_params(params_path: Path, dataset: str, option: str, factor: int, out: Path) -> tuple[Path, int]:
    """Write params.yaml with datasets.<dataset>.source.<option> multiplied by `factor`; return (its path, value)."""
    raw = yaml.safe_load(params_path.read_text())
    source = dict(raw["datasets"][dataset]["source"])   # a copy: YAML anchors may share it with other datasets
    source[option] = source[option] * factor
    raw["datasets"][dataset]["source"] = source
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out, source[option]


def measure(args, work: Path) -> list[dict]:
    from benchmarks.common import folder_mb
    from pipeline.config import load_params
    from pipeline.paths import frames_dir
    from pipeline.prepare import prepare

    rows = []
    for factor in args.factors:
        root = work / f"x{factor}"
        root.mkdir()
        params_path, value = scaled_params(args.params, args.dataset, args.scale, factor, root / "params.yaml")
        summary = prepare(args.dataset, params_path, root / "data")
        frames = frames_dir(args.dataset, root / "data")
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(frames), "--params",
                   str(params_path), "--dataset", args.dataset, "--variant", args.variant, "--clips",
                   str(args.clips), "--seed", str(args.seed)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if done.returncode:
            sys.exit(f"child for factor {factor} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1].removeprefix(RESULT))
        profile = load_params(params_path).dataset(args.dataset).profile
        frame_bytes = profile.channels * profile.frame_size ** 2 * 4   # float32 [C, H, W], as read_frame returns
        rows.append({"factor": factor, args.scale: value, "train_frames": summary["train_frames"],
                     "train_windows": result["train_windows"], "steps": result["steps"],
                     "train_mb_disk": folder_mb(frames / "train"),
                     "train_mb_f32": summary["train_frames"] * frame_bytes / 2 ** 20,
                     "rss_imports_mb": result["rss_imports_mb"], "peak_rss_mb": result["peak_rss_mb"],
                     "training_mb": result["peak_rss_mb"] - result["rss_imports_mb"],
                     "train_seconds": result["train_seconds"], "prepare_seconds": summary["seconds"]})
        rows[-1]["peak_ratio"] = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        print(f"factor {factor}: peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--variant", default="mnad-pred")
    parser.add_argument("--factors", nargs="+", type=int, default=[1, 2, 8])
    parser.add_argument("--scale", choices=["train_videos", "frames_per_video"], default="train_videos")
    parser.add_argument("--clips", type=int, default=None,
                        help="training windows of the one epoch (default: the profile's max_train_clips)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the table here as JSON")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)   # internal: frames to train on
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return 0
    from benchmarks.common import report
    from pipeline.config import load_params
    params = load_params(args.params)
    variant = params.variant(args.variant)
    if args.clips is None:
        args.clips = params.dataset(args.dataset).training_profile(variant).max_train_clips
    if not args.clips:
        parser.error("the profile trains on every clip (max_train_clips 0); give --clips so every factor does the "
                     "same steps")
    with tempfile.TemporaryDirectory(prefix="memory-scaling-") as work:
        rows = measure(args, Path(work))
    report(rows, args.json, benchmark="memory_scaling", dataset=args.dataset, variant=args.variant,
           scale=args.scale, clips=args.clips, peak_ratio_last_to_first=rows[-1]["peak_ratio"])
    print(f"peak RSS x{args.factors[-1]} / x{args.factors[0]}: {rows[-1]['peak_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
