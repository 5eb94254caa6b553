"""Evaluation throughput: frames/s of scoring a dataset's test set without and with MNAD's test-time memory update.

    python benchmarks/eval_speed.py [--params params.yaml] [--dataset synthetic]
        [--variants mnad-pred mnad-recon memae] [--thresholds 0 q0.15 1.0] [--repeats 2] [--profile]
        [--json /tmp/bench/eval_speed.json]

Prepares the dataset's frames in a temporary folder (pipeline.prepare, as benchmarks/learning_curve.py does) and
builds each variant with seeded random weights at the dataset's profile: the cost of a pass does not depend on what
the weights learnt, only on how many frames update the memory. Per variant it times one pass over the whole test
set at evaluate.batch_size, frames read from disk as evaluation reads them:

    load         the DataLoader alone (PNG decoding and stacking): the floor under every path
    without      score_batched, memory frozen (every variant; memae has no test-time update)
    with         score_with_update(frozen=False), per threshold (MNAD-memory variants)
    with+frozen  score_with_update(frozen=True), which also scores the frozen memory in the same pass: what
                 evaluate() runs when it scores both (evaluate.test_time_update: both)

A threshold is a number (0: no frame updates, the point score is never negative; 1.0: every frame does, the point
score being a weighted mean squared error of [0, 1] images) or qX: the X quantile of the test windows' point
scores under the frozen memory, so that about that share updates (the study's calibrated thresholds update 10-20%
of the synthetic test frames). The update path shrinks its chunks after an update, so its cost follows
`updated_frames`, which each row reports. frames/s = test windows / seconds, the best of --repeats passes;
x_without = seconds / the variant's `without` seconds. --profile prints cProfile's top functions (by own time) of
a with-update pass at the last threshold of the first MNAD-memory variant.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pipeline  # noqa: E402,F401  (first: pins the CPU kernels of numpy and torch, as every stage does)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402
os.environ.setdefault("TQDM_DISABLE", "1")   # the pipeline's progress bars would interleave with the table

from benchmarks.common import matmul_gflops, report  # noqa: E402
from models.build import build_model  # noqa: E402
from models.clips import split_clip  # noqa: E402
from models.mnad import point_score  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from pipeline.data import clip_dataset  # noqa: E402
from pipeline.device import compute_device  # noqa: E402
from pipeline.evaluate import score_batched, score_with_update  # noqa: E402
from pipeline.paths import frames_dir  # noqa: E402
from pipeline.prepare import prepare  # noqa: E402


def best_of(repeats: int, run) -> tuple[float, object]:
    """(the fewest seconds of `repeats` calls of `run`, the last call's result)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return best, result


def load_only(test_set, variant, batch_size: int) -> None:
    for batch in DataLoader(test_set, batch_size=batch_size, shuffle=False):
        split_clip(batch["clip"], variant)


@torch.no_grad()
def point_scores(model, test_set, variant, batch_size: int, device) -> np.ndarray:
    """MNAD's point score of every test window under the frozen memory (what the update threshold is compared with)."""
    scores = []
    for batch in DataLoader(test_set, batch_size=batch_size, shuffle=False):
        inputs, target = split_clip(batch["clip"], variant)
        scores.append(point_score(model(inputs.to(device)).output, target.to(device)).double().cpu().numpy())
    return np.concatenate(scores)


def threshold_value(spec: str, scores) -> float:
    """A number, or qX: the X quantile of the point scores (`scores()` computes them)."""
    return float(np.nanquantile(scores(), float(spec[1:]))) if spec.startswith("q") else float(spec)


def measure(params, dataset_name: str, variant_name: str, frames: Path, thresholds: list[str], repeats: int,
            device, profile_update: bool) -> list[dict]:
    dataset, variant = params.dataset(dataset_name), params.variant(variant_name)
    batch_size = params.evaluate.batch_size
    torch.manual_seed(0)
    model = build_model(variant, dataset.training_profile(variant)).to(device).eval()
    test_set = clip_dataset(frames, "test", variant)
    windows = len(test_set)
    # Warm-up (first calls allocate, pick kernels) on a few batches, outside the clock.
    score_batched(model, Subset(test_set, range(min(windows, 2 * batch_size))), variant, batch_size, device)

    def row(path: str, seconds: float, spec: str = "-", value: float = float("nan"), updated: int = 0) -> dict:
        return {"variant": variant_name, "path": path, "threshold": spec, "threshold_value": value,
                "windows": windows, "updated_frames": updated, "seconds": seconds,
                "frames_per_s": windows / seconds, "x_without": seconds / without}

    load, _ = best_of(repeats, lambda: load_only(test_set, variant, batch_size))
    without, _ = best_of(repeats, lambda: score_batched(model, test_set, variant, batch_size, device))
    rows = [row("load", load), row("without", without)]
    if variant.memory != "mnad":
        return rows
    trained = {key: value.clone() for key, value in model.memory.state_dict().items()}
    # Computed once, and only if a qX threshold asks for them (a pass of its own).
    scores = functools.cache(lambda: point_scores(model, test_set, variant, batch_size, device))
    for spec in thresholds:
        value = threshold_value(spec, scores)
        at = variant.model_copy(update={"test_threshold": value})
        for path, frozen in (("with", False), ("with+frozen", True)):
            def update_pass():
                model.memory.load_state_dict(trained)   # every pass starts from the trained memory, as evaluate()'s
                return score_with_update(model, test_set, at, device, batch_size, frozen=frozen)
            seconds, series = best_of(repeats, update_pass)
            rows.append(row(path, seconds, spec, value, int(series["memory_updated"].sum())))
    if profile_update:
        model.memory.load_state_dict(trained)
        profiler = cProfile.Profile()
        profiler.runcall(score_with_update, model, test_set, at, device, batch_size, frozen=True)
        print(f"\ncProfile of {variant_name} with+frozen at threshold {thresholds[-1]} (top 15 by own time):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    model.memory.load_state_dict(trained)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--variants", nargs="+", default=["mnad-pred", "mnad-recon", "memae"])
    parser.add_argument("--thresholds", nargs="+", default=["0", "q0.15", "1.0"],
                        help="update thresholds: numbers, or qX (a quantile of the frozen point scores)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="passes per measurement; the fastest counts (the first also warms up new shapes)")
    parser.add_argument("--profile", action="store_true", help="cProfile one with-update pass")
    parser.add_argument("--json", type=Path, default=None, help="write the table here as JSON")
    args = parser.parse_args()
    params = load_params(args.params)
    device = compute_device()
    rows = []
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as work:
        started = time.perf_counter()
        prepare(args.dataset, args.params, Path(work) / "data")
        prepare_seconds = time.perf_counter() - started
        frames = frames_dir(args.dataset, Path(work) / "data")
        profiled = False
        for name in args.variants:
            wants_profile = args.profile and not profiled and params.variant(name).memory == "mnad"
            rows += measure(params, args.dataset, name, frames, args.thresholds, args.repeats, device, wants_profile)
            profiled = profiled or wants_profile
    profile = params.dataset(args.dataset).profile
    report(rows, args.json, benchmark="eval_speed", dataset=args.dataset, frame_size=profile.frame_size,
           channels=profile.channels, width=profile.width, batch_size=params.evaluate.batch_size,
           repeats=args.repeats, device=str(device), matmul_gflops=matmul_gflops(device),
           prepare_seconds=round(prepare_seconds, 1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
