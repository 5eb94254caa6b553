"""Wall time of every stage of a `dvc repro`, grouped by stage kind, split into the stages' work and the rest.

    python -m dvc repro 2>&1 | python benchmarks/stage_times.py [--log repro.log] [--json times.json]

Reads DVC's output as it streams, stamps each line with the time it arrived, echoes it (and writes it to --log with
the stamps). A stage's wall time runs from its "Running stage" line to the next one (or the end): it includes the
process's start-up (interpreter and imports) and DVC's own work around the command (hashing, cache, rewriting
dvc.lock). Each stage prints "stage work: <s> s" (pipeline.errors.exit_cleanly): the time of its main() alone.
Wall minus work is the overhead: start-up plus DVC bookkeeping. At the end it prints one row per stage kind (run,
model_analyses, ...; a *_complex twin counts with its kind) and the whole run, and --json writes the same figures.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict

STAGE_LINE = re.compile(r"Running stage '([^'@]+)[^']*'")
WORK_LINE = re.compile(r"stage work: ([0-9.]+) s")


def stage_kind(name: str) -> str:
    """The name before '@', without the complex twin's suffix: run_complex -> run."""
    return name.removesuffix("_complex")


def summarise(stages: list[dict], end: float) -> dict[str, dict]:
    """Per stage kind: count, wall (mean, min, max, total), work and overhead totals, in the order kinds first ran."""
    walls: dict[str, list[float]] = defaultdict(list)
    works: dict[str, float] = defaultdict(float)
    for stage, following in zip(stages, stages[1:] + [{"start": end}]):
        walls[stage["kind"]].append(following["start"] - stage["start"])
        works[stage["kind"]] += stage["work"]
    return {kind: {"stages": len(times), "mean_s": sum(times) / len(times), "min_s": min(times),
                   "max_s": max(times), "wall_s": sum(times), "work_s": works[kind],
                   "overhead_s": sum(times) - works[kind]} for kind, times in walls.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", help="also write the stamped lines here")
    parser.add_argument("--json", help="write the per-kind figures here")
    args = parser.parse_args()
    log = open(args.log, "w", encoding="utf-8") if args.log else None
    began = time.time()
    stages: list[dict] = []
    for line in sys.stdin:
        now = time.time()
        sys.stdout.write(line)
        sys.stdout.flush()
        if log:
            log.write(f"{now - began:9.1f} {line}")
            log.flush()
        for match in STAGE_LINE.finditer(line):
            stages.append({"start": now, "kind": stage_kind(match.group(1)), "work": 0.0})
        work = WORK_LINE.search(line)
        if work and stages:
            stages[-1]["work"] += float(work.group(1))
    end = time.time()
    if log:
        log.close()
    kinds = summarise(stages, end)
    total = end - began
    work = sum(k["work_s"] for k in kinds.values())
    if work > total:   # the lines came faster than the stages ran: a saved log, not a live `dvc repro`
        print(f"\nstage_times.py: the stages report {work:.0f} s of work, but their output arrived within {total:.0f} "
              f"s: it was read from a saved log, which holds no times. Pipe `python -m dvc repro 2>&1` into this "
              f"script as it runs (--log keeps the stamped lines).", file=sys.stderr)
        return 1
    print(f"\n{'stage kind':<16}{'stages':>7}{'mean s':>9}{'min s':>8}{'max s':>8}{'wall s':>9}{'work s':>9}"
          f"{'other s':>9}")
    for kind, k in kinds.items():
        print(f"{kind:<16}{k['stages']:>7}{k['mean_s']:>9.1f}{k['min_s']:>8.1f}{k['max_s']:>8.1f}{k['wall_s']:>9.0f}"
              f"{k['work_s']:>9.0f}{k['overhead_s']:>9.0f}")
    print(f"{'all':<16}{len(stages):>7}{'':>9}{'':>8}{'':>8}{total:>9.0f}{work:>9.0f}{total - work:>9.0f}"
          f"  ({total / 60:.1f} min; start-up and DVC bookkeeping {(total - work) / max(total, 1e-9):.0%})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"kinds": kinds, "wall_s": total, "work_s": work, "overhead_s": total - work,
                       "overhead_share": (total - work) / max(total, 1e-9)}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
