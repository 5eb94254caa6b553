"""What every analysis shares: where outputs go, which runs of the study exist, and how their files are read."""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.config import REPO_ROOT, Params, load_params
from pipeline.errors import exit_cleanly
from pipeline.paths import RUNS_DIR, run_dir

ANALYSIS_DIR = REPO_ROOT / "analysis"
BASELINE = "copy-last"
# The score column of each scoring in scores.csv, and the metrics.json block that summarises it.
SCORE_COLUMNS = {"without_update": "score", "with_update": "score_update"}
# The normal frames an anomaly type's frames are ranked against in the per-type AUCs: all of them, or the clean ones
# whose scoring window holds no abnormal frame (analysis.anomaly_types).
NORMAL_SETS = ("all", "clean")


@dataclass(frozen=True)
class Run:
    """One (dataset, variant, seed) folder under runs/."""

    dataset: str
    variant: str
    seed: int
    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def metrics(self) -> dict:
        return json.loads((self.path / "metrics.json").read_text())

    def scores(self) -> pd.DataFrame:
        """scores.csv with video names kept as strings and empty anomaly types kept empty (real datasets)."""
        frame = pd.read_csv(self.path / "scores.csv", dtype={"video": str, "anomaly_type": str})
        frame["anomaly_type"] = frame["anomaly_type"].fillna("")
        return frame

    def roc(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "roc.csv")


def study_variants(params: Params, dataset: str | None = None) -> list[str]:
    """The study's variants (of one dataset, or of any) in params order, then the copy-last floor (evaluated for
    every dataset)."""
    variants = list(params.study.variants_for(dataset) if dataset else params.study.all_variants)
    if BASELINE in params.variants and BASELINE not in variants:
        variants.append(BASELINE)
    return variants


def variant_seeds(params: Params, variant: str) -> tuple[int, ...]:
    """copy-last has nothing to train and is evaluated at seed 0 only."""
    return params.study.seeds if params.variant(variant).trainable else (0,)


def existing_runs(params: Params, dataset: str, runs_root: Path | None = None,
                  variants: Iterable[str] | None = None, needs: Sequence[str] = ("metrics.json",)) -> list[Run]:
    """The runs of the study on `dataset` whose files `needs` exist, in study order (variant, then seed).

    Only the study's variants and seeds count: a folder left from an earlier study is not a result of this one.
    """
    in_study = study_variants(params, dataset)
    chosen = in_study if variants is None else [v for v in variants if v in in_study]
    runs = []
    for variant in chosen:
        for seed in variant_seeds(params, variant):
            path = run_dir(dataset, variant, seed, runs_root or RUNS_DIR)
            if all((path / name).exists() for name in needs):
                runs.append(Run(dataset, variant, seed, path))
    return runs


def runs_by_variant(runs: Iterable[Run]) -> dict[str, list[Run]]:
    grouped: dict[str, list[Run]] = {}
    for run in runs:
        grouped.setdefault(run.variant, []).append(run)
    return grouped


def output_dirs(topic: str, dataset: str, out_root: Path | None = None) -> tuple[Path, Path]:
    """Fresh analysis/figures/<topic>/<dataset>/ and analysis/tables/<topic>/<dataset>/ (old contents removed, so
    a figure of a variant that no longer runs cannot linger)."""
    root = out_root or ANALYSIS_DIR
    dirs = (root / "figures" / topic / dataset, root / "tables" / topic / dataset)
    for folder in dirs:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    return dirs


def mean_std(values, digits: int = 3, scale: float = 1.0) -> str:
    """'mean ± std' over seeds (sample std; the mean alone for one seed); '—' for none; NaN seeds are counted."""
    values = pd.Series(values, dtype=float) * scale
    if values.empty:
        return "—"
    if values.isna().any():
        return f"NaN ({int(values.isna().sum())}/{len(values)} seeds)"
    mean = f"{values.mean():.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ± {values.std(ddof=1):.{digits}f}"


def seeded_subset(count: int, cap: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `cap` of `count` items, drawn reproducibly (all of them when cap <= 0)."""
    if cap <= 0 or cap >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=cap, replace=False))


def stage_main(description: str, analyses: Mapping[str, Callable[[str, Params], object]]
               ) -> Callable[[list[str] | None], int]:
    """The command line of an analysis stage: `python -m analysis.<stage> [--dataset D ...] [--params P]` runs each
    of `analyses` (topic -> function) on the datasets (default: all of the study's), then logs each topic's
    figures into the dataset's MLflow study run (pipeline.tracking.study_run) under figures/<topic>."""

    @exit_cleanly
    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(description=description)
        parser.add_argument("--dataset", action="append", help="dataset to analyse (default: all of the study's)")
        parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
        args = parser.parse_args(argv)
        params = load_params(args.params)
        datasets = args.dataset or params.study.all_datasets
        for dataset in datasets:
            params.dataset(dataset)  # a clear error for an unknown name, before any work
        for dataset in datasets:
            for topic, analyse in analyses.items():
                started = time.perf_counter()
                analyse(dataset, params)
                print(f"{topic} on {dataset}: {time.perf_counter() - started:.1f} s")
            study = tracking.study_run(dataset)
            for topic in analyses:
                study.log_artifacts(ANALYSIS_DIR / "figures" / topic / dataset, f"figures/{topic}")
        return 0

    return main
