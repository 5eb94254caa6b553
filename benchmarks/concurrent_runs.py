"""Training throughput of runs side by side (profile.concurrent_runs, threads) against one run on every core:
the measurement behind the synthetic and collapse profiles' `threads: 1` and `concurrent_runs`.

    python benchmarks/concurrent_runs.py [--cases collapse-scenes8:mnad-pred synthetic:mnad-pred ...] [--json J]

Per (dataset, variant) at its profile's size and batch, three measurements of pipeline.train's step on random
clips: one process with torch's default threads (one per core), one process with one thread, and N processes with
one thread each, started together (spawned, as pipeline.run starts them). Machine throughput is samples/s summed
over the processes; the gain is that sum over the one-process default's.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, report  # noqa: E402  (first: it pins the CPU kernels of numpy and torch)

import torch  # noqa: E402

DEFAULT_CASES = ["collapse-scenes8:mnad-pred", "collapse-scenes8-64px:mnad-pred", "synthetic:mnad-pred",
                 "synthetic:memae"]


def one_process(case: str, threads: int, steps: int, start, results) -> None:
    """Measure in this process once every process of the measurement is ready."""
    from pipeline.config import load_params
    import train_speed

    dataset_name, variant_name = case.split(":")
    params = load_params()
    variant = params.variant(variant_name)
    profile = params.dataset(dataset_name).training_profile(variant)
    start.wait()
    row = train_speed.measure(variant, profile, f"threads={threads}" if threads else "baseline", steps,
                              torch.device("cpu"))
    results.put(row["samples_per_s"])


def side_by_side(case: str, processes: int, threads: int, steps: int) -> list[float]:
    """samples/s of each of `processes` processes training at once."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=one_process, args=(case, threads, steps, start, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    rates = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="dataset:variant")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for case in args.cases:
        default = side_by_side(case, 1, 0, args.steps)[0]
        alone = side_by_side(case, 1, 1, args.steps)[0]
        together = side_by_side(case, args.processes, 1, args.steps)
        rows.append({"case": case, "default_threads_samples_s": default, "one_thread_samples_s": alone,
                     f"{args.processes}x1_thread_samples_s": sum(together),
                     "per_process_samples_s": min(together), "gain": sum(together) / default})
        print(f"  {case}: {default:.1f} samples/s on all cores, {alone:.1f} on one, {sum(together):.1f} from "
              f"{args.processes} side by side ({sum(together) / default:.2f}x)", flush=True)
    report(rows, args.json, processes=args.processes, steps=args.steps, repo=str(REPO))


if __name__ == "__main__":
    main()
