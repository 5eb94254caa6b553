"""The two-variant comparisons behind the claims' verdicts (C1, C2, C3, C6, C7, C8, C10), each a difference of
frame-level micro AUCs with a 95% two-level bootstrap interval over seeds and test videos (analysis.bootstrap).

A comparison is oriented so that the claim predicts a positive difference: interval above 0 -> holds, below 0 ->
does not hold, straddling 0 -> inconclusive. Where the claim states a size (C8's "about +4 points") or a level (C7:
reconstruction at chance on temporal anomalies), the interval is checked against a stated band instead. "verdict"
comparisons decide a claim; "context" ones are printed beside it (the copy-last floor, RC2020's refinements).

Before any interval: a comparison whose runs do not exist is "not run here"; one that rests on a run that has not
learnt (the learning gate in its metrics.json) is "undertrained" and names the runs; one about the test-time update
in which no frame of any seed updated the memory is "not exercised". A learnt variant whose AUC does not beat
copy-last's is named in the note.

Writes analysis/tables/comparisons/<dataset>/comparisons.csv and analysis/figures/comparisons/<dataset>/
differences.png.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plotting
from analysis.bootstrap import (NOT_EXERCISED, NOT_RUN, UNDERTRAINED, SeedScores, Term, band_verdict,
                                interval_verdict, paired_bootstrap)
from analysis.common import BASELINE, SCORE_COLUMNS, existing_runs, output_dirs, study_variants
from pipeline.config import Params
from pipeline.io import write_csv
from pipeline.metrics import headline_scoring

TOPIC = "comparisons"
VERDICT_COLORS = {"holds": "#1a9850", "does not hold": plotting.ALERT, "inconclusive": "#7f7f7f",
                  UNDERTRAINED: "#b8860b", NOT_EXERCISED: "#6a5acd"}


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
    minus: tuple[Side, ...]             # empty: the plus side against chance (an AUC of 0.5)
    role: str = "verdict"               # verdict | context
    anomaly_type: str | None = None     # only the normal frames and the abnormal frames of this type
    band: tuple[float, float] | None = None   # the claim states a size: the interval must lie inside this band

    @property
    def label(self) -> str:
        def joined(sides: tuple[Side, ...]) -> str:
            names = " + ".join(side.name for side in sides)
            return names if len(sides) == 1 else f"({names})"

        text = f"{joined(self.plus)} − {joined(self.minus) if self.minus else 'chance'}"
        return f"{text} [{self.anomaly_type}]" if self.anomaly_type else text

    @property
    def sides(self) -> tuple[Side, ...]:
        return self.plus + self.minus


def claim_comparisons(params: Params) -> list[Comparison]:
    """The comparisons of every claim, in claim order, over the variants this study defines."""
    with_update, without = "with_update", "without_update"
    skip_variants = [v for v in params.study.all_variants if params.variant(v).family == "mnad"
                     and params.variant(v).task == "reconstruct" and params.variant(v).skips]
    pred, recon = Side("mnad-pred"), Side("mnad-recon")
    options = params.analysis
    chance = (-options.chance_margin, options.chance_margin)
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
        # "only prediction": reconstruction stays within a stated band of chance on temporal anomalies
        Comparison("C7", (recon,), (), anomaly_type="temporal", band=chance),
        Comparison("C7", (Side("ae-pred"),), (Side("ae-recon"),), role="context", anomaly_type="temporal"),
        Comparison("C7", (pred,), (Side(BASELINE),), role="context", anomaly_type="temporal"),
    ]
    for skip in skip_variants:
        comparisons += [Comparison("C8", (Side(skip),), (recon,), band=tuple(options.c8_gain_band)),
                        Comparison("C8", (pred,), (Side(skip),))]
    comparisons += [Comparison("C10", (pred,), (Side("memae"),)), Comparison("C10", (Side("memae"),), (recon,))]
    return comparisons


class ScoreSource:
    """Per-seed scores of the study's runs on one dataset, read once per variant."""

    def __init__(self, params: Params, dataset: str, runs_root: Path | None):
        self.params, self.dataset, self.runs_root = params, dataset, runs_root
        self._cache: dict[str, list] = {}

    def gate_failures(self, variant: str) -> list[str]:
        """The runs of `variant` whose learning gate failed ("memae s0"); copy-last has no gate."""
        return [f"{variant} s{metrics_seed}" for metrics_seed, metrics in self.seeded_metrics(variant)
                if "gate" in metrics and not metrics["gate"]["learnt"]]

    def seeded_metrics(self, variant: str) -> list[tuple[int, dict]]:
        runs = existing_runs(self.params, self.dataset, self.runs_root, [variant], needs=("metrics.json",))
        return [(run.seed, run.metrics()) for run in runs]

    def updated_frames(self, variant: str) -> int:
        return sum(m.get("with_update", {}).get("updated_frames", 0) for _, m in self.seeded_metrics(variant))

    def mean_auc(self, variant: str, anomaly_type: str | None) -> float:
        key = f"auc_{anomaly_type}" if anomaly_type else "auc_micro"
        values = [m[headline_scoring(m)].get(key) for _, m in self.seeded_metrics(variant)]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else np.nan

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


COLUMNS = ["dataset", "claim", "comparison", "role", "anomaly_type", "band_low", "band_high", "seeds", "estimate",
           "low", "high", "samples", "verdict", "note"]


def screen(comparison: Comparison, source: ScoreSource) -> tuple[str | None, str]:
    """(a verdict that stands before any interval, or None; a note): undertrained runs, an update never exercised,
    learnt variants that do not beat copy-last."""
    variants = list(dict.fromkeys(side.variant for side in comparison.sides))
    failed = [run for variant in variants for run in source.gate_failures(variant)]
    if failed:
        return UNDERTRAINED, "not learnt: " + ", ".join(failed)
    if any(side.scoring == "with_update" for side in comparison.sides):
        idle = [v for v in variants if source.updated_frames(v) == 0]
        if idle:
            return NOT_EXERCISED, "no frame updated the memory: " + ", ".join(idle)
    floor = source.mean_auc(BASELINE, comparison.anomaly_type)
    below = [v for v in variants if v != BASELINE and source.mean_auc(v, comparison.anomaly_type) <= floor]
    return None, ("does not beat copy-last: " + ", ".join(below)) if below else ""


def compare(dataset: str, params: Params, runs_root: Path | None = None, out_root: Path | None = None) -> pd.DataFrame:
    figures, tables = output_dirs(TOPIC, dataset, out_root)
    source = ScoreSource(params, dataset, runs_root)
    rows = []
    for comparison in claim_comparisons(params):
        band = comparison.band or (np.nan, np.nan)
        row = {"dataset": dataset, "claim": comparison.claim, "comparison": comparison.label,
               "role": comparison.role, "anomaly_type": comparison.anomaly_type or "", "band_low": band[0],
               "band_high": band[1], "seeds": "", "estimate": np.nan, "low": np.nan, "high": np.nan, "samples": 0,
               "verdict": NOT_RUN, "note": ""}
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
            rows.append(row)
            continue
        result = paired_bootstrap(terms, params.analysis.bootstrap_samples, params.analysis.bootstrap_seed)
        offset = 0.0 if comparison.minus else -0.5        # against chance: the AUC minus 0.5
        estimate, low, high = result.estimate + offset, result.low + offset, result.high + offset
        verdict = band_verdict(low, high, comparison.band) if comparison.band else interval_verdict(low, high)
        screened, note = screen(comparison, source)
        if not result.samples:
            note = "AUC undefined (NaN scores or one class)"
        row.update(seeds=" / ".join(counts), estimate=estimate, low=low, high=high, samples=result.samples,
                   verdict=screened or verdict, note=note)
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

