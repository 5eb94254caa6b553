"""The study-wide curve tables behind dvc.yaml's top-level plots: one file per curve kind that overlays every
variant of every dataset (the `variant_curves` template colours by variant and draws one panel per dataset), so
`dvc plots show` draws a few comparable plots instead of one per run.

Writes analysis/plots/roc.csv (each variant's ROC curve, first seed; the headline scoring) and
analysis/plots/train_loss.csv (every run's training loss per epoch).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis.common import ANALYSIS_DIR, existing_runs
from pipeline.config import Params
from pipeline.io import write_csv

CURVE_COLUMNS = ["dataset", "variant", "seed", "point"]


def write_plot_data(params: Params, runs_root: Path | None = None, out_root: Path | None = None) -> dict[str, int]:
    """Write both tables; returns how many curves each holds."""
    folder = (out_root or ANALYSIS_DIR) / "plots"
    roc, loss = [], []
    for dataset in params.study.all_datasets:
        first_seed = set()
        for run in existing_runs(params, dataset, runs_root, needs=("roc.csv",)):
            if run.variant not in first_seed:
                first_seed.add(run.variant)
                roc.append(_curve(run, run.roc()[["fpr", "tpr"]]))
            log = run.path / "train_log.csv"
            if log.exists():
                loss.append(_curve(run, pd.read_csv(log)[["epoch", "loss"]]))
    write_csv(folder / "roc.csv", _joined(roc, ["fpr", "tpr"]))
    write_csv(folder / "train_loss.csv", _joined(loss, ["epoch", "loss"]))
    return {"roc": len(roc), "train_loss": len(loss)}


def _curve(run, values: pd.DataFrame) -> pd.DataFrame:
    """One curve's points with the run they belong to; `point` orders them (ROC points share fpr values)."""
    return pd.DataFrame({"dataset": run.dataset, "variant": run.variant, "seed": run.seed,
                         "point": range(len(values)), **{c: values[c].to_numpy() for c in values.columns}})


def _joined(curves: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    return pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=CURVE_COLUMNS + columns)
