"""What the study computed, as the report reads it: the runs' metrics.json and the analysis tables and figures.

`Results` reads them once, restricted to the study in params.yaml (its datasets, variants and seeds), and says why a
dataset was not run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.common import existing_runs, study_variants, variant_seeds
from pipeline.config import ANOMALY_TYPES, REAL_KINDS, Params
from pipeline.metrics import headline_scoring

PAPER_DATASETS = ("ped2", "avenue", "shanghaitech")  # where the papers report numbers
TEXT_COLUMNS = {"note", "anomaly_type", "seeds", "comparison", "role", "verdict", "claim", "part", "fill", "split",
                "kind"}


def clean_auc_column(kind: str) -> str:
    """The learning-curve table's column of an anomaly type's AUC against clean normal frames
    (benchmarks/learning_curve.py)."""
    return f"clean_auc_{kind}"


CLEAN_AUC_COLUMNS = tuple(clean_auc_column(kind) for kind in ANOMALY_TYPES)


def read_learning_curve(path: Path) -> pd.DataFrame | None:
    """The learning-curve table (benchmarks/learning_curve.py), None when absent. Rows written before the per-type
    AUCs against clean normal frames were recorded read them as missing (rerun the script to fill them)."""
    if not path.exists():
        return None
    curve = pd.read_csv(path)
    return curve.reindex(columns=[*curve.columns, *(c for c in CLEAN_AUC_COLUMNS if c not in curve.columns)])


@dataclass
class Results:
    """The study's metrics and analysis tables, read once, restricted to the study's datasets/variants/seeds."""

    params: Params
    runs_root: Path | None
    analysis_root: Path
    report_dir: Path
    metrics: dict[str, dict[str, list[tuple[int, dict]]]] = field(default_factory=dict)

    def __post_init__(self):
        for dataset in self.params.study.all_datasets:
            by_variant: dict[str, list[tuple[int, dict]]] = {}
            for run in existing_runs(self.params, dataset, self.runs_root):
                by_variant.setdefault(run.variant, []).append((run.seed, run.metrics()))
            self.metrics[dataset] = by_variant

    @property
    def datasets(self) -> list[str]:
        """The study's datasets, then the papers' datasets it does not include (shown as not run here)."""
        study = self.params.study.all_datasets
        return list(study) + [d for d in PAPER_DATASETS if d not in study]

    def ran(self, dataset: str) -> bool:
        return bool(self.metrics.get(dataset))

    def why_not_run(self, dataset: str) -> str:
        if dataset not in self.params.study.all_datasets:
            how = "prepare its archives (docs/datasets.md) and add it to study.datasets" \
                if dataset in REAL_KINDS else "add it to study.datasets"
            return f"not run here: {dataset} is not in this study; to run it, {how}"
        return f"not run here: no evaluated run of {dataset} was found (run `dvc repro`)"

    def block_values(self, dataset: str, variant: str, scoring: str, key: str) -> list[float]:
        values = []
        for _, metrics in self.metrics.get(dataset, {}).get(variant, []):
            block = metrics.get(scoring)
            if block is not None and key in block:
                values.append(np.nan if block[key] is None else float(block[key]))
        return values

    def headline_values(self, dataset: str, variant: str, key: str = "auc_micro") -> list[float]:
        return [np.nan if (v := m[headline_scoring(m)].get(key)) is None else float(v)
                for _, m in self.metrics.get(dataset, {}).get(variant, [])]

    def unlearnt(self, dataset: str, variants) -> list[str]:
        """The runs of `variants` on `dataset` whose learning gate failed, as "variant sS"."""
        return [f"{variant} s{seed}" for variant in variants
                for seed, metrics in self.metrics.get(dataset, {}).get(variant, [])
                if "gate" in metrics and not metrics["gate"]["learnt"]]

    @cached_property
    def learning_curve(self) -> pd.DataFrame | None:
        """The learning-curve table the budget was chosen from (read_learning_curve); None when absent."""
        return read_learning_curve(self.analysis_root / "tables" / "budget" / "learning_curve.csv")

    @cached_property
    def collapse_table(self) -> pd.DataFrame | None:
        """The collapse study's table (analysis.collapse's final.csv): None when the `collapse_analysis` stage has
        not written it, empty when the study has no run (params.yaml `collapse.settings` lists none)."""
        path = self.analysis_root / "tables" / "collapse" / "final.csv"
        return pd.read_csv(path) if path.exists() else None

    def analysis_table(self, topic: str, dataset: str, name: str) -> pd.DataFrame | None:
        """An analysis table restricted to the study's variants and seeds; None when the analysis did not run."""
        path = self.analysis_root / "tables" / topic / dataset / name
        if not path.exists():
            return None
        frame = pd.read_csv(path)
        for column in TEXT_COLUMNS & set(frame.columns):  # an empty cell is no text, not NaN
            frame[column] = frame[column].astype(object).fillna("").astype(str)  # an all-empty column reads as float
        if "variant" in frame.columns:
            frame = frame[frame["variant"].isin(study_variants(self.params))]
            if "seed" in frame.columns:
                in_study = [seed in variant_seeds(self.params, v) for v, seed in zip(frame["variant"], frame["seed"])]
                frame = frame[in_study]
        return frame.reset_index(drop=True)

    def link(self, topic: str, dataset: str, filename: str, text: str) -> str:
        """A markdown link to a figure, relative to REPORT.md; empty when the figure was not made."""
        path = self.analysis_root / "figures" / topic / dataset / filename
        if not path.exists():
            return ""
        return f"[{text}]({Path(os.path.relpath(path, self.report_dir)).as_posix()})"
