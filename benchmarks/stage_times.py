"""Wall time of every stage of a `dvc repro`, grouped by stage kind.

    python -m dvc repro 2>&1 | python benchmarks/stage_times.py [--log repro.log]

Reads DVC's output as it streams, stamps each line with the time it arrived, echoes it (and writes it to --log
with the stamps), and at the end prints one row per stage kind (train, evaluate, memory_usage, ...): how many
stages ran, their mean / min / max seconds and their total, plus the whole run's wall time. A stage's time runs
from its "Running stage" line to the next one (or the end), so it includes DVC's own work around the command
(hashing, cache, rewriting dvc.lock). Used to measure the default study for the time target in params.yaml.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict

STAGE_LINE = re.compile(r"Running stage '([^'@]+)[^']*'")


def stage_kind(name: str) -> str:
    """The name before '@', without the collapse twin's suffix: memory_usage_collapse -> memory_usage."""
    return name.removesuffix("_collapse")


def summarise(starts: list[tuple[float, str]], end: float) -> list[tuple[str, int, float, float, float, float]]:
    """(kind, count, mean, min, max, total) per stage kind, in the order the kinds first ran."""
    durations: dict[str, list[float]] = defaultdict(list)
    for (start, kind), (following, _) in zip(starts, starts[1:] + [(end, "")]):
        durations[kind].append(following - start)
    return [(kind, len(times), sum(times) / len(times), min(times), max(times), sum(times))
            for kind, times in durations.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", help="also write the stamped lines here")
    args = parser.parse_args()
    log = open(args.log, "w", encoding="utf-8") if args.log else None
    began = time.time()
    starts: list[tuple[float, str]] = []
    for line in sys.stdin:
        now = time.time()
        sys.stdout.write(line)
        sys.stdout.flush()
        if log:
            log.write(f"{now - began:9.1f} {line}")
            log.flush()
        for match in STAGE_LINE.finditer(line):
            starts.append((now, stage_kind(match.group(1))))
    end = time.time()
    if log:
        log.close()
    print(f"\n{'stage kind':<16}{'stages':>7}{'mean s':>9}{'min s':>8}{'max s':>8}{'total s':>9}")
    for kind, count, mean, low, high, total in summarise(starts, end):
        print(f"{kind:<16}{count:>7}{mean:>9.1f}{low:>8.1f}{high:>8.1f}{total:>9.0f}")
    print(f"{'all':<16}{len(starts):>7}{'':>9}{'':>8}{'':>8}{end - began:>9.0f}  ({(end - began) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
