"""The two-variant comparisons behind the claims' verdicts (C1, C2, C3, C6, C7, C8, C10), each a difference of
frame-level micro AUCs with a 95% paired-bootstrap interval over test videos (analysis.bootstrap).

A comparison is oriented so that the claim predicts a positive difference: interval above 0 -> holds, below 0 ->
does not hold, straddling 0 -> inconclusive. "verdict" comparisons decide a claim; "context" ones are printed
beside it (the copy-last floor, RC2020's refinements). A comparison whose runs do not exist is "not run here".

Writes analysis/tables/comparisons/<dataset>/comparisons.csv and analysis/figures/comparisons/<dataset>/
differences.png.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plotting
from analysis.bootstrap import NOT_RUN, SeedScores, Term, paired_bootstrap
from analysis.common import BASELINE, SCORE_COLUMNS, existing_runs, output_dirs, study_variants
from pipeline.config import Params
from pipeline.io import write_csv
from pipeline.metrics import headline_scoring

TOPIC = "comparisons"
VERDICT_COLORS = {"holds": "#1a9850", "does not hold": plotting.ALERT, "inconclusive": "#7f7f7f"}


@dataclass(frozen=True)
class Side:
    """One variant's scores under one scoring: "headline" (with test-time update where the variant has it, as the
    papers evaluate), "without_update" or "with_update"."""

    variant: str
    scoring: str = "headline"

    @property
    def name(self) -> str:
        return self.variant if self.scoring == "headline" else f"{self.variant} ({self.scoring.replace('_', ' ')})"


@dataclass(frozen=True)
class Comparison:
    claim: str
    plus: tuple[Side, ...]
    minus: tuple[Side, ...]
    role: str = "verdict"               # verdict | context
    anomaly_type: str | None = None     # only the normal frames and the abnormal frames of this type

    @property
    def label(self) -> str:
        def joined(sides: tuple[Side, ...]) -> str:
            names = " + ".join(side.name for side in sides)
            return names if len(sides) == 1 else f"({names})"

        text = f"{joined(self.plus)} − {joined(self.minus)}"
        return f"{text} [{self.anomaly_type}]" if self.anomaly_type else text


def claim_comparisons(params: Params) -> list[Comparison]:
    """The comparisons of every claim, in claim order, over the variants this study defines."""
    with_update, without = "with_update", "without_update"
    skip_variants = [v for v in params.study.all_variants if params.variant(v).family == "mnad"
                     and params.variant(v).task == "reconstruct" and params.variant(v).skips]
    pred, recon = Side("mnad-pred"), Side("mnad-recon")
    comparisons = [
        Comparison("C1", (pred,), (Side("ae-pred"),)),
        Comparison("C1", (recon,), (Side("ae-recon"),)),
        Comparison("C2", (pred,), (recon,)),
        Comparison("C2", (pred,), (Side(BASELINE),), role="context"),
        Comparison("C3", (Side("mnad-pred", with_update),), (Side("mnad-pred", without),)),
        Comparison("C3", (Side("mnad-recon", with_update),), (Side("mnad-recon", without),)),
        # RC2020: the update helps reconstruction more than prediction (a difference of differences).
        Comparison("C3", (Side("mnad-recon", with_update), Side("mnad-pred", without)),
                   (Side("mnad-recon", without), Side("mnad-pred", with_update)), role="context"),
        Comparison("C6", (Side("mnad-pred-uniform"),), (pred,)),
        Comparison("C7", (pred,), (recon,), anomaly_type="temporal"),
        Comparison("C7", (Side("ae-pred"),), (Side("ae-recon"),), role="context", anomaly_type="temporal"),
        Comparison("C7", (pred,), (Side(BASELINE),), role="context", anomaly_type="temporal"),
    ]
    for skip in skip_variants:
        comparisons += [Comparison("C8", (Side(skip),), (recon,)), Comparison("C8", (pred,), (Side(skip),))]
    comparisons += [Comparison("C10", (pred,), (Side("memae"),)), Comparison("C10", (Side("memae"),), (recon,))]
    return comparisons


class ScoreSource:
    """Per-seed scores of the study's runs on one dataset, read once per variant."""

    def __init__(self, params: Params, dataset: str, runs_root: Path | None):
        self.params, self.dataset, self.runs_root = params, dataset, runs_root
        self._cache: dict[str, list] = {}

    def runs(self, variant: str) -> list:
        if variant not in self._cache:
            runs = existing_runs(self.params, self.dataset, self.runs_root, [variant], needs=("metrics.json",
                                                                                               "scores.csv"))
            self._cache[variant] = [(run.metrics(), run.scores()) for run in runs]
        return self._cache[variant]

    def seeds(self, side: Side, anomaly_type: str | None) -> tuple[list[SeedScores], str]:
        """(one SeedScores per seed, "" or why there are none)."""
        runs = self.runs(side.variant)
        if not runs:
            in_study = side.variant in study_variants(self.params, self.dataset)
            return [], f"{side.variant} {'not run' if in_study else 'not in this study'}"
        seeds = []
        for metrics, scores in runs:
            scoring = headline_scoring(metrics) if side.scoring == "headline" else side.scoring
            column = SCORE_COLUMNS[scoring]
            if column not in scores.columns:
                return [], f"{side.variant} has no {scoring.replace('_', ' ')} scores"
            if anomaly_type is not None:
                scores = scores[(scores["label"] == 0) | (scores["anomaly_type"] == anomaly_type)]
                if not (scores["label"] == 1).any():
                    return [], f"no {anomaly_type} anomalies in {self.dataset}"
            seeds.append(SeedScores(scores["label"].to_numpy(), scores[column].to_numpy(dtype=np.float64),
                                    scores["video"].to_numpy()))
        return seeds, ""


COLUMNS = ["dataset", "claim", "comparison", "role", "anomaly_type", "seeds", "estimate", "low", "high", "samples",
           "verdict", "note"]


def compare(dataset: str, params: Params, runs_root: Path | None = None, out_root: Path | None = None) -> pd.DataFrame:
    figures, tables = output_dirs(TOPIC, dataset, out_root)
    source = ScoreSource(params, dataset, runs_root)
    rows = []
    for comparison in claim_comparisons(params):
        row = {"dataset": dataset, "claim": comparison.claim, "comparison": comparison.label,
               "role": comparison.role, "anomaly_type": comparison.anomaly_type or "", "seeds": "",
               "estimate": np.nan, "low": np.nan, "high": np.nan, "samples": 0, "verdict": NOT_RUN, "note": ""}
        terms, counts, missing = [], [], []
        for sign, sides in ((1.0, comparison.plus), (-1.0, comparison.minus)):
            for side in sides:
                seeds, why = source.seeds(side, comparison.anomaly_type)
                if why:
                    missing.append(why)
                terms.append(Term(sign, seeds))
                counts.append(str(len(seeds)))
        if missing:
            row["note"] = "; ".join(dict.fromkeys(missing))
        else:
            result = paired_bootstrap(terms, params.analysis.bootstrap_samples, params.analysis.bootstrap_seed)
            row.update(seeds=" / ".join(counts), estimate=result.estimate, low=result.low, high=result.high,
                       samples=result.samples, verdict=result.verdict,
                       note="" if result.samples else "AUC undefined (NaN scores or one class)")
        rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    write_csv(tables / "comparisons.csv", table)
    differences_figure(table, figures / "differences.png", dataset)
    return table


def differences_figure(table: pd.DataFrame, path: Path, dataset: str) -> Path:
    """Forest plot: each computed comparison's difference and 95% interval, coloured by verdict."""
    computed = table[table["verdict"] != NOT_RUN].reset_index(drop=True)
    if computed.empty:
        return plotting.placeholder(path, f"not run here: no comparison could be computed on {dataset}")
    fig, axes = plotting.figure(1, 1, panel=(9.0, 0.3 * len(computed) + 0.8))  # wide: the labels are long
    ax = axes[0, 0]
    y = np.arange(len(computed))[::-1]
    for position, (_, row) in zip(y, computed.iterrows()):
        color = VERDICT_COLORS.get(row["verdict"], "black")
        marker = "o" if row["role"] == "verdict" else "s"
        ax.errorbar(row["estimate"], position, xerr=[[row["estimate"] - row["low"]], [row["high"] - row["estimate"]]],
                    fmt=marker, color=color, capsize=2, markersize=4,
                    markerfacecolor=color if row["role"] == "verdict" else "white")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{c}: {label}" for c, label in zip(computed["claim"], computed["comparison"])])
    ax.set_xlabel("difference of micro AUC (95% paired bootstrap over videos)")
    ax.set_title(f"{dataset}: green holds, red does not hold, grey inconclusive; open marks are context")
    return plotting.save(fig, path)

