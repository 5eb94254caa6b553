"""Where the pipeline's files live: frames under data/frames/<dataset>, runs under runs/<dataset>/<variant>/seed<S>
(DVC outputs), and each variant's metrics of every seed in metrics/<dataset>/<variant>.json (kept in git).
Free of torch, so that the stages which only read tables and frames (prepare, timelines, comparisons, report) do not
pay its two-second import."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import REPO_ROOT

DATA_DIR = REPO_ROOT / "data"
RUNS_DIR = REPO_ROOT / "runs"
METRICS_DIR = REPO_ROOT / "metrics"


def frames_dir(dataset: str, root: Path | None = None) -> Path:
    return (root or DATA_DIR) / "frames" / dataset


def run_dir(dataset: str, variant: str, seed: int, root: Path | None = None) -> Path:
    return (root or RUNS_DIR) / dataset / variant / f"seed{seed}"


def variant_metrics_path(dataset: str, variant: str, root: Path | None = None) -> Path:
    return (root or METRICS_DIR) / dataset / f"{variant}.json"
