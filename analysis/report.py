"""REPORT.md, written from the runs' metrics.json and the analysis tables only (the `report` stage; never by hand).

Sections: a summary; the protocol (score, AUC, skipped frames, NaN policy, test-time update, the options where the
papers and their released code differ and which one this harness used); the results tables beside the papers'
numbers; one row per claim C1-C10 with its evidence, figure links and verdict; every paired-bootstrap comparison.

A result appears only if the file it comes from exists and belongs to the study in params.yaml; everything else is
"not run here", with the reason.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before the imports: run in the preloaded interpreter (pipeline.launch)
    from pipeline import launch

    launch.prelude()

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from analysis.bootstrap import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, NOT_RUN
from analysis.common import (ANALYSIS_DIR, BASELINE, SCORE_COLUMNS, existing_runs, headline_scoring, mean_std,
                             study_variants, variant_seeds)
from pipeline.config import REAL_KINDS, REPO_ROOT, Params, load_params
from pipeline.errors import exit_cleanly, exit_now
from pipeline.io import write_text

REPORT_PATH = REPO_ROOT / "REPORT.md"
PAPER_DATASETS = ("ped2", "avenue", "shanghaitech")      # where the papers report numbers
COMPLEX_DATASETS = ("synthetic-scenes", "shanghaitech")  # where RC2020 expects the memory to collapse (C5)
NOT_APPLICABLE = "n/a"
TEXT_COLUMNS = {"note", "anomaly_type", "seeds", "comparison", "role", "verdict", "claim", "part", "fill", "split",
                "kind"}

# Frame-level AUC (%) as reported: (variant, dataset) -> value.
PAPER_AUC = {
    **{("mnad-pred", d): v for d, v in zip(PAPER_DATASETS, (97.0, 88.5, 70.5))},     # MNAD, Park et al. 2020
    **{("mnad-recon", d): v for d, v in zip(PAPER_DATASETS, (90.2, 82.8, 69.8))},
    **{("memae", d): v for d, v in zip(PAPER_DATASETS, (94.1, 83.3, 71.2))},         # MemAE, Gong et al. 2019
}
# RC2020's Ped2 figures as reported to the authors (alpha tuned on the test set).
RC2020_AUC = {("mnad-recon", "ped2"): 88.36, ("mnad-pred", "ped2"): 96.34, ("ae-recon", "ped2"): 88.84,
              ("ae-pred", "ped2"): 95.54}


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    reported: str


CLAIMS = (
    Claim("C1", "Memory improves AUC over the same network without memory (MNAD)",
          "MNAD: yes (ablation). RC2020 Ped2: prediction 96.34 with vs 95.54 without memory, reconstruction 88.36 vs "
          "88.84; on ShanghaiTech the network without memory was better"),
    Claim("C2", "Prediction beats reconstruction",
          "MNAD: 97.0 / 88.5 / 70.5 vs 90.2 / 82.8 / 69.8 (Ped2 / Avenue / ShanghaiTech). RC2020 Ped2: 96.34 vs 88.36"),
    Claim("C3", "Test-time memory update helps",
          "MNAD: yes. RC2020: much for reconstruction, little for prediction"),
    Claim("C4", "With skip connections, replacing the intermediate features by zeros / ones / random barely changes "
                "the output",
          "RC2020: prediction outputs visually unchanged; reconstruction (no skips) suffered heavily"),
    Claim("C5", "Memory collapses onto one item on complex data",
          "RC2020: on ShanghaiTech every query mapped to one item; many NaNs in the memory-based score"),
    Claim("C6", "The uniform usage loss spreads usage across items and restores AUC",
          "RC2020: their fix for the collapse (uniform-usage loss, weight 1; compactness and separateness 0.001)"),
    Claim("C7", "Only prediction detects temporal anomalies",
          "RC2020 synthetic study: only the prediction model shows artefacts on temporal anomalies"),
    Claim("C8", "Denoising reconstruction with skips gains about 4% over plain reconstruction but stays below "
                "prediction",
          "RC2020: about +4% over plain reconstruction (salt-and-pepper 5 / 25 / 40%), still below prediction"),
    Claim("C9", "The separateness loss gives well-separated query clusters (t-SNE)",
          "MNAD: t-SNE shows queries clustered around well-separated items"),
    Claim("C10", "MemAE's reported numbers versus MNAD's under one evaluation protocol",
          "Reported: MNAD prediction 97.0 / 88.5 / 70.5, MemAE 94.1 / 83.3 / 71.2, MNAD reconstruction "
          "90.2 / 82.8 / 69.8: prediction > MemAE > reconstruction on Ped2 and Avenue (MemAE first on ShanghaiTech)"),
)


# ----------------------------------------------------------------------------------------------------------------
# Verdict rules (the bootstrap's interval rule lives in analysis.bootstrap)


def combine(verdicts: list[str]) -> str:
    """A claim made of several parts: holds if every computed part holds, does not hold if any part does not,
    inconclusive otherwise; not run here if no part was computed."""
    computed = [v for v in verdicts if v not in (NOT_RUN, NOT_APPLICABLE)]
    if not computed:
        return NOT_RUN
    if any(v == DOES_NOT_HOLD for v in computed):
        return DOES_NOT_HOLD
    return HOLDS if all(v == HOLDS for v in computed) else INCONCLUSIVE


def dominance(higher: pd.Series, lower: pd.Series) -> str:
    """For per-seed numbers without a frame-level bootstrap: holds when every seed of `higher` is above every seed
    of `lower`, does not hold when every one is below, inconclusive otherwise (or when either side is NaN)."""
    higher, lower = higher.dropna(), lower.dropna()
    if higher.empty or lower.empty:
        return INCONCLUSIVE
    if higher.min() > lower.max():
        return HOLDS
    if higher.max() < lower.min():
        return DOES_NOT_HOLD
    return INCONCLUSIVE


# ----------------------------------------------------------------------------------------------------------------
# Formatting


def percent(values) -> str:
    """AUCs as 'mean ± std' in percent over seeds."""
    return mean_std(values, digits=1, scale=100)


def points(value: float) -> str:
    """A difference of AUCs in points (x100), signed; a rounded zero is +0.0, never -0.0."""
    if value is None or math.isnan(value):
        return "NaN"
    return f"{round(100 * value, 1) + 0.0:+.1f}"


def seeds(count: int) -> str:
    return f"{count} seed" + ("" if count == 1 else "s")


def bold_verdict(verdict: str) -> str:
    return f"**{verdict}**" if verdict in (HOLDS, DOES_NOT_HOLD) else verdict


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", "<br>") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# What was computed in this run


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


# ----------------------------------------------------------------------------------------------------------------
# Claims


@dataclass
class Assessment:
    """The evidence lines and the verdict of one claim on one dataset."""

    lines: list[str]
    verdict: str


def comparison_lines(results: Results, dataset: str, claim: str) -> tuple[list[str], list[str]]:
    """(evidence lines, verdicts of the verdict-role comparisons) of one claim's paired-bootstrap comparisons."""
    comparisons = results.analysis_table("comparisons", dataset, "comparisons.csv")
    if comparisons is None:
        return ["comparisons not run here (the `comparisons` stage has not written its table)"], [NOT_RUN]
    rows = comparisons[comparisons["claim"] == claim]
    lines, verdicts = [], []
    for _, row in rows.iterrows():
        role = "" if row["role"] == "verdict" else " (context)"
        if row["verdict"] == NOT_RUN:
            lines.append(f"`{row['comparison']}`{role}: not run here ({row['note']})")
        else:
            lines.append(f"`{row['comparison']}`{role}: {points(row['estimate'])} pts, 95% CI "
                         f"[{points(row['low'])}, {points(row['high'])}] (seeds {row['seeds']}) → {row['verdict']}")
        if row["role"] == "verdict":
            verdicts.append(row["verdict"])
    return lines, verdicts or [NOT_RUN]


def bootstrap_claim(figures: tuple[tuple[str, str, str], ...] = ()) -> Callable[[Results, str, str], Assessment]:
    """A claim decided by its comparisons alone; `figures` = (topic, file, text) links to add."""

    def assess(results: Results, dataset: str, claim: str) -> Assessment:
        lines, verdicts = comparison_lines(results, dataset, claim)
        links = [results.link("comparisons", dataset, "differences.png", "differences")]
        links += [results.link(topic, dataset, name, text) for topic, name, text in figures]
        return Assessment(lines + _links(links), combine(verdicts))

    return assess


def _links(links: list[str]) -> list[str]:
    present = [link for link in links if link]
    return ["figures: " + ", ".join(present)] if present else []


def assess_replacement(results: Results, dataset: str, claim: str) -> Assessment:
    """C4: skip variants' outputs barely change (PSNR to the normal output at least the threshold under every
    replacement) while a variant without skips changes more."""
    threshold = results.params.analysis.replacement_unchanged_psnr
    frame = results.analysis_table("replacement", dataset, "replacement.csv")
    if frame is None or frame.empty:
        return Assessment(["replacement not run here (no table, or none of analysis.replacement_variants trained)"],
                          NOT_RUN)
    replaced = frame[frame["part"] != "none"]
    lines, extremes = [], []  # (skips, lowest, highest) seed-mean PSNR to the normal output, per variant
    for variant, rows in replaced.groupby("variant", sort=False):
        per_setting = rows.groupby(["part", "fill"])["psnr_to_normal"].mean()
        normal = frame[(frame["variant"] == variant) & (frame["part"] == "none")]["auc_psnr"]
        skips = bool(rows["skips"].iloc[0])
        extremes.append((skips, per_setting.min(), per_setting.max()))
        lines.append(f"{variant} ({'skips' if skips else 'no skips'}, {seeds(rows['seed'].nunique())}): PSNR to the "
                     f"normal output {per_setting.min():.1f}–{per_setting.max():.1f} dB over {len(per_setting)} "
                     f"replacements; AUC (PSNR) {percent(normal)} normal, "
                     f"{100 * rows['auc_psnr'].min():.1f}–{100 * rows['auc_psnr'].max():.1f} replaced")
    with_skips = [low for skips, low, _ in extremes if skips]
    without_skips = [high for skips, _, high in extremes if not skips]
    if not with_skips:
        verdict = NOT_RUN
        lines.append("no variant with skips in analysis.replacement_variants ran")
    else:
        skip_min, without_max = min(with_skips), max(without_skips, default=None)
        if skip_min < threshold:
            verdict = DOES_NOT_HOLD
        elif without_max is None or skip_min > without_max:
            verdict = HOLDS
        else:
            verdict = INCONCLUSIVE
        lines.append(f"rule: with skips every replacement ≥ {threshold:g} dB (lowest here {skip_min:.1f})"
                     + (f" and above every no-skip replacement (highest {without_max:.1f})"
                        if without_max is not None else ""))
    links = [results.link("replacement", dataset, "psnr_to_normal.png", "PSNR to normal output")]
    links += [results.link("replacement", dataset, f"examples_{v}.png", f"examples {v}")
              for v in replaced["variant"].unique()]
    return Assessment(lines + _links(links), verdict)


def collapse_variants(params: Params) -> list[str]:
    """MNAD-memory variants trained without the uniform-usage loss: the ones C5 is about."""
    return [v for v in params.study.all_variants
            if params.variant(v).memory == "mnad" and not params.variant(v).uniform_weight]


def assess_collapse(results: Results, dataset: str, claim: str) -> Assessment:
    """C5: on complex data most runs of the plain MNAD memory collapse (top item share >= collapse_share)."""
    usage = results.analysis_table("memory_usage", dataset, "usage.csv")
    if usage is None or usage.empty:
        return Assessment(["memory usage not run here"], NOT_RUN)
    test = usage[(usage["split"] == "test") & usage["variant"].isin(collapse_variants(results.params))]
    if test.empty:
        return Assessment(["no MNAD-memory variant without the uniform loss ran"], NOT_RUN)
    collapsed = test[test["collapsed"].astype(bool)]
    nan_videos = {scoring: sum(int(v) for variant in test["variant"].unique()
                               for v in results.block_values(dataset, variant, scoring, "nan_videos"))
                  for scoring in SCORE_COLUMNS}
    share = results.params.analysis.collapse_share
    lines = [f"{len(collapsed)} of {len(test)} runs collapsed (top item ≥ {share:.0%} of test queries)"
             + (": " + ", ".join(f"{r.variant} s{r.seed}" for r in collapsed.itertuples()) if len(collapsed) else ""),
             f"test-set entropy {test['entropy'].mean():.2f} on average (even use: {test['max_entropy'].iloc[0]:.2f}); "
             f"top share {test['top_share'].min():.0%}–{test['top_share'].max():.0%}",
             f"degenerate (constant-score) videos: {nan_videos['without_update']} without update, "
             f"{nan_videos['with_update']} with update, over those runs"]
    if dataset in COMPLEX_DATASETS:
        fraction = len(collapsed) / len(test)
        verdict = HOLDS if fraction > 0.5 else DOES_NOT_HOLD if fraction == 0 else INCONCLUSIVE
        lines.append("rule: holds when more than half of the runs collapse, does not hold when none does")
    else:
        verdict = NOT_APPLICABLE
        lines.append("simple data: shown for contrast, no verdict")
    links = [results.link("memory_usage", dataset, "usage.png", "usage histograms")]
    return Assessment(lines + _links(links), verdict)


def assess_uniform(results: Results, dataset: str, claim: str) -> Assessment:
    """C6: the uniform loss raises the perplexity of usage (every seed above every seed of mnad-pred) and its AUC
    is not worse than mnad-pred's (paired bootstrap)."""
    lines, verdicts = comparison_lines(results, dataset, claim)
    usage = results.analysis_table("memory_usage", dataset, "usage.csv")
    usage_verdict = NOT_RUN
    if usage is not None:
        test = usage[usage["split"] == "test"]
        uniform = test[test["variant"] == "mnad-pred-uniform"]["perplexity"]
        plain = test[test["variant"] == "mnad-pred"]["perplexity"]
        if len(uniform) and len(plain):
            usage_verdict = dominance(uniform, plain)
            lines.insert(0, f"usage perplexity (effective items) mnad-pred-uniform {mean_std(uniform, 2)} vs "
                            f"mnad-pred {mean_std(plain, 2)} (seeds {len(uniform)} / {len(plain)}) → {usage_verdict}")
    if usage_verdict == NOT_RUN:
        lines.insert(0, "usage of mnad-pred-uniform vs mnad-pred: not run here")
    links = [results.link("memory_usage", dataset, "pred_vs_uniform.png", "usage pred vs uniform"),
             results.link("comparisons", dataset, "differences.png", "differences")]
    return Assessment(lines + _links(links), combine([usage_verdict, *verdicts]))


def assess_separation(results: Results, dataset: str, claim: str) -> Assessment:
    """C9: the silhouette of queries by nearest item is higher with the separateness loss than without."""
    frame = results.analysis_table("tsne", dataset, "silhouette.csv")
    if frame is None or frame.empty:
        return Assessment(["t-SNE / silhouette not run here"], NOT_RUN)
    by_variant = {v: rows["silhouette"] for v, rows in frame.groupby("variant")}
    if "mnad-pred" not in by_variant or "mnad-pred-nosep" not in by_variant:
        return Assessment(["needs both mnad-pred and mnad-pred-nosep"], NOT_RUN)
    lines = [f"silhouette (cosine, by nearest item) {v}: {_plain_mean_std(by_variant[v])} "
             f"({seeds(len(by_variant[v]))})" for v in ("mnad-pred", "mnad-pred-nosep", "mnad-pred-uniform")
             if v in by_variant]
    verdict = dominance(by_variant["mnad-pred"], by_variant["mnad-pred-nosep"])
    lines.append("rule: every seed of mnad-pred above every seed of mnad-pred-nosep")
    return Assessment(lines + _links([results.link("tsne", dataset, "tsne.png", "t-SNE")]), verdict)


def _plain_mean_std(values: pd.Series) -> str:
    if values.isna().all():
        return "NaN (one item used)"
    return mean_std(values.dropna())


ASSESSORS: dict[str, Callable[[Results, str, str], Assessment]] = {
    "C1": bootstrap_claim((("timelines", "roc.png", "ROC"),)),
    "C2": bootstrap_claim((("timelines", "roc.png", "ROC"), ("timelines", "timelines.png", "timelines"))),
    "C3": bootstrap_claim(),
    "C4": assess_replacement,
    "C5": assess_collapse,
    "C6": assess_uniform,
    "C7": bootstrap_claim((("anomaly_types", "per_type_auc.png", "AUC per type"),
                           ("anomaly_types", "examples.png", "example events"))),
    "C8": bootstrap_claim(),
    "C9": assess_separation,
    "C10": bootstrap_claim((("timelines", "roc.png", "ROC"),)),
}


def claim_datasets(results: Results, claim: str) -> list[str]:
    """C7 needs per-frame anomaly types, which only the synthetic datasets record."""
    if claim == "C7":
        return [d for d in results.datasets if d in results.params.datasets and results.params.dataset(d).is_synthetic]
    return results.datasets


def assess_all(results: Results) -> dict[str, dict[str, Assessment]]:
    assessed = {}
    for claim in CLAIMS:
        assessed[claim.id] = {}
        for dataset in claim_datasets(results, claim.id):
            if not results.ran(dataset):
                assessed[claim.id][dataset] = Assessment([results.why_not_run(dataset)], NOT_RUN)
            else:
                assessed[claim.id][dataset] = ASSESSORS[claim.id](results, dataset, claim.id)
    return assessed


# ----------------------------------------------------------------------------------------------------------------
# Sections


def summary_section(results: Results, assessed: dict[str, dict[str, Assessment]]) -> str:
    params = results.params
    lines = ["## Summary", ""]
    for dataset in params.study.all_datasets:
        variants = study_variants(params, dataset)
        expected = sum(len(params.study.seeds) if params.variant(v).trainable else 1 for v in variants)
        found = sum(len(runs) for runs in results.metrics.get(dataset, {}).values())
        lines.append(f"- **{dataset}**: {found} of {expected} evaluated runs found "
                     f"({len(variants) - 1} variants × {len(params.study.seeds)} seeds + copy-last).")
    missing = [d for d in results.datasets if d not in params.study.all_datasets]
    if missing:
        lines.append(f"- Not run here: {', '.join(missing)} (not in study.datasets; see docs/datasets.md).")
    counts: dict[str, list[str]] = {}
    for claim, per_dataset in assessed.items():
        for dataset, assessment in per_dataset.items():
            if assessment.verdict != NOT_APPLICABLE:
                counts.setdefault(assessment.verdict, []).append(f"{claim} {dataset}")
    lines.append("- Verdicts over (claim, dataset) pairs: " + "; ".join(
        f"{verdict}: {len(counts[verdict])}" for verdict in (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, NOT_RUN)
        if verdict in counts) + ".")
    for verdict in (HOLDS, DOES_NOT_HOLD):
        if verdict in counts:
            lines.append(f"  - {verdict}: {', '.join(counts[verdict])}")
    return "\n".join(lines)


def protocol_section(results: Results) -> str:
    params = results.params
    analysis, evaluate = params.analysis, params.evaluate
    rows = []
    for name in study_variants(params):
        v = params.variant(name)
        end = v.window - 1 - v.scored_offset
        score = ("regularity 1 − g(error)" if v.family == "memae" else
                 f"{v.alpha:g}·g(PSNR) + {1 - v.alpha:g}·(1 − g(D))" if v.has_memory else "g(PSNR)")
        rows.append([name, v.task, v.memory, "yes" if v.skips else "no", score, f"{v.scored_offset} / {end}",
                     f"{v.test_threshold:g}" if v.memory == "mnad" else "—",
                     v.update_norm if v.memory == "mnad" else "—"])
    nan_text = ("`safe`: a video whose series is constant normalises to 0 (no evidence either way) and is counted in "
                "`nan_videos`" if evaluate.nan_policy == "safe" else
                "`reference`: a constant series gives 0/0 = NaN as in MNAD's code, and a micro AUC over NaN scores "
                "is reported as NaN")
    lines = [
        "## Protocol", "",
        "- **Score.** Per test frame: PSNR of the output against its target on [0, 1] images, 10·log10(1/mse); for "
        "MNAD-memory variants also the feature distance D (compactness of the frame's queries to their nearest items); "
        "for MemAE the clip error. Each series is min-max normalised per video (g), then combined into a normality "
        "score (higher = more normal) as in the table below.",
        "- **AUC.** Frame-level, `roc_auc_score(1 − label, score)`. *Micro*: every scored test frame of the dataset "
        "pooled (the papers' number). *Macro*: the mean of per-video AUCs over videos that hold both classes.",
        f"- **NaN policy** (`evaluate.nan_policy`): {nan_text}.",
        f"- **Test-time memory update** (`evaluate.test_time_update: {evaluate.test_time_update}`): frame by frame in "
        "video order, a frame whose point score is under the variant's threshold writes its queries into the memory, "
        "which persists across all test videos (as MNAD). Memory variants are reported with and without it; a "
        "variant's *headline* scoring, used for verdicts and figures, is with the update where the variant has an MNAD "
        "memory (as the papers evaluate), without otherwise.",
        "- **Seeds.** Learnt variants: " + ", ".join(str(s) for s in params.study.seeds) +
        f" (mean ± sample std over seeds); `{BASELINE}` is deterministic and evaluated once.",
        f"- **Verdicts.** A claim comparing variants rests on the difference of their micro AUCs with a 95% interval "
        f"from a paired bootstrap over test videos ({analysis.bootstrap_samples} resamples, seed "
        f"{analysis.bootstrap_seed}; one resample of the videos is shared by every variant and seed involved, each "
        "seed's AUC is computed on the resampled videos' frames and averaged over seeds): interval above 0 → holds, "
        "below 0 → does not hold, straddling 0 → inconclusive. Claims measured per seed without frames (usage "
        "perplexity, silhouette) hold when every seed of one variant beats every seed of the other. A claim of "
        "several parts holds when every part holds and does not hold when any part does not. Thresholds: collapse "
        f"when the top item takes ≥ {analysis.collapse_share:.0%} of the test queries; a replaced output is "
        f"\"barely changed\" at ≥ {analysis.replacement_unchanged_psnr:g} dB PSNR to the normal output.",
        "",
        table(["variant", "task", "memory", "skips", "normality score", "frames skipped per video (start / end)",
               "update threshold", "update_norm"], rows),
        "",
        "### Where the papers and their released code differ, and what this harness used",
        "",
        table(["difference", "paper", "released code", "this harness (option: value)"], known_differences(params)),
    ]
    return "\n".join(lines)


def _values(params: Params, option: str, which: Callable[[object], bool]) -> str:
    """The values an option takes over the study's variants that `which` selects."""
    def shown(value) -> str:  # as YAML writes it
        return str(value).lower() if isinstance(value, bool) else str(value)

    values = sorted({shown(getattr(params.variant(v), option)) for v in study_variants(params)
                     if which(params.variant(v))})
    return "/".join(values) if values else "(no such variant in the study)"


def known_differences(params: Params) -> list[list[str]]:
    def mnad_memory(v):
        return v.memory == "mnad"

    def memae(v):
        return v.family == "memae"

    profiles = sorted({params.dataset(d).profile_name for d in params.study.all_datasets if d in params.datasets})
    profile_text = "; ".join(f"{p}: lr {params.profiles[p].lr:g}, batch {params.profiles[p].batch_size}"
                             for p in profiles)
    recon = [v for v in study_variants(params) if params.variant(v).task == "reconstruct"
             and params.variant(v).family == "mnad" and params.variant(v).has_memory and not params.variant(v).skips]
    recon_weights = ", ".join(f"{v} {params.variant(v).compactness_weight:g}/{params.variant(v).separateness_weight:g}"
                              for v in recon) or "(none in the study)"
    return [
        ["MNAD memory-update normaliser", "max over the item's own queries (Eq. 5)", "max over all queries",
         f"`update_norm`: {_values(params, 'update_norm', mnad_memory)}"],
        ["MNAD reconstruction learning rate", "2e-5", "2e-4", f"profile lr ({profile_text}); `lr` per variant"],
        ["MNAD reconstruction loss terms", "compactness, separateness", "unpacked in swapped order (harmless at equal "
         "weights)", f"named terms, weights compactness/separateness: {recon_weights}"],
        ["Reconstruction decoder width", "MNAD decoder", "RC2020's narrower decoder",
         f"`decoder`: {_values(params, 'decoder', lambda v: v.family == 'mnad' and not v.skips)}"],
        ["Constant score series in min-max (MNAD issue #6)", "—", "0/0 = NaN", f"`evaluate.nan_policy`: "
         f"{params.evaluate.nan_policy}"],
        ["MemAE addressing", "cosine similarity", "dot product",
         f"`addressing`: {_values(params, 'addressing', memae)}"],
        ["MemAE batch size", "14", "10 (script)", f"profile batch size ({profile_text})"],
        ["RC2020 salt-and-pepper input scaling", "—", "noise on [0, 1] then rescaled as 0..255 (inputs near −1)",
         f"`noise_rc2020_scaling`: {_values(params, 'noise_rc2020_scaling', lambda v: v.noise != 'none')}"],
        ["RC2020 uniform-usage loss", "—", "runs at batch size 1 only", "target by position within the frame, any "
         "batch size (always)"],
        ["Alpha of the combined score", "0.6 prediction, 0.7 reconstruction", "RC2020 tuned alpha on the test set",
         "fixed per variant (`alpha`, table above); never tuned on test data"],
    ]


def results_section(results: Results) -> str:
    params = results.params
    variants = study_variants(params)
    lines = ["## Results", "", "Frame-level AUC in %, mean ± std over seeds. *Headline* = with test-time update for "
             "MNAD-memory variants, without otherwise. Papers' and RC2020's numbers are as reported (RC2020 tuned "
             "alpha on the test set).", "", "### Overview: headline micro AUC", ""]
    overview = []
    for variant in variants:
        overview.append([f"`{variant}`"] + [percent(results.headline_values(d, variant)) if results.ran(d)
                                             else "not run here" for d in results.datasets])
    lines += [table(["variant", *results.datasets], overview), ""]
    for dataset in results.datasets:
        lines += [f"### {dataset}", ""]
        if not results.ran(dataset):
            lines += [results.why_not_run(dataset) + ".", ""]
            if dataset in PAPER_DATASETS:
                reported = [f"`{v}` {PAPER_AUC[v, dataset]}" for v in variants if (v, dataset) in PAPER_AUC]
                reported += [f"`{v}` {RC2020_AUC[v, dataset]} (RC2020)" for v in variants if (v, dataset) in RC2020_AUC]
                lines += [f"Reported: {', '.join(reported)}.", ""]
            continue
        rows = []
        for variant in variants:
            if not results.metrics[dataset].get(variant):
                rows.append([f"`{variant}`", "0", *["not run here"] * 6, _reported(PAPER_AUC, variant, dataset),
                             _reported(RC2020_AUC, variant, dataset)])
                continue
            cells = [f"`{variant}`", str(len(results.metrics[dataset][variant]))]
            for key in ("auc_micro", "auc_macro"):
                for scoring in SCORE_COLUMNS:
                    cells.append(percent(results.block_values(dataset, variant, scoring, key)))
            nan_videos = [sum(int(x) for x in results.block_values(dataset, variant, s, "nan_videos"))
                          for s in SCORE_COLUMNS]
            has_update = bool(results.block_values(dataset, variant, "with_update", "auc_micro"))
            cells.append(f"{nan_videos[0]} / {nan_videos[1]}" if has_update else str(nan_videos[0]))
            psnr = results.headline_values(dataset, variant, "mean_psnr")
            cells.append(f"{np.mean(psnr):.1f}" if psnr else "—")
            cells += [_reported(PAPER_AUC, variant, dataset), _reported(RC2020_AUC, variant, dataset)]
            rows.append(cells)
        lines += [table(["variant", "seeds", "micro, no update", "micro, update", "macro, no update", "macro, update",
                         "NaN videos (no update / update)", "mean PSNR (dB)", "paper", "RC2020"], rows), ""]
        links = _links([results.link("timelines", dataset, "roc.png", "ROC curves"),
                        results.link("timelines", dataset, "timelines.png", "score timelines"),
                        results.link("anomaly_types", dataset, "per_type_auc.png", "AUC per anomaly type")])
        lines += [links[0], ""] if links else []
    return "\n".join(lines)


def _reported(numbers: dict, variant: str, dataset: str) -> str:
    return f"{numbers[variant, dataset]}" if (variant, dataset) in numbers else "—"


def claims_section(results: Results, assessed: dict[str, dict[str, Assessment]]) -> str:
    rows = []
    for claim in CLAIMS:
        evidence, verdicts, not_run = [], [], {}
        for dataset, assessment in assessed[claim.id].items():
            if not results.ran(dataset):
                reason = "not in this study" if dataset not in results.params.study.all_datasets else "no evaluated runs"
                not_run.setdefault(reason, []).append(dataset)
                continue
            evidence.append(f"*{dataset}*: " + "; ".join(assessment.lines))
            verdicts.append(f"{dataset}: {bold_verdict(assessment.verdict)}")
        for reason, datasets in not_run.items():
            evidence.append(f"not run here: {', '.join(datasets)} ({reason})")
            verdicts.append(f"{', '.join(datasets)}: {NOT_RUN}")
        rows.append([claim.id, claim.statement, claim.reported, "<br>".join(evidence), "<br>".join(verdicts)])
    return "\n".join(["## Claims", "", "One row per claim; the evidence and verdict per dataset. Differences are "
                      "in AUC points (×100) with their 95% paired-bootstrap interval.", "",
                      table(["claim", "statement", "papers / RC2020", "this harness", "verdict"], rows)])


def comparisons_section(results: Results) -> str:
    rows = []
    for dataset in results.params.study.all_datasets:
        frame = results.analysis_table("comparisons", dataset, "comparisons.csv")
        if frame is None:
            continue
        for _, row in frame.iterrows():
            computed = row["verdict"] != NOT_RUN
            rows.append([dataset, row["claim"], f"`{row['comparison']}`", row["role"], row["seeds"] if computed else "",
                         points(row["estimate"]) if computed else "",
                         f"[{points(row['low'])}, {points(row['high'])}]" if computed else "",
                         bold_verdict(row["verdict"]) + (f" ({row['note']})" if row["note"] else "")])
    if not rows:
        return "## Paired-bootstrap comparisons\n\nnot run here (no comparisons table)."
    return "\n".join(["## Paired-bootstrap comparisons", "", "Seeds: per term of the difference, in order.", "",
                      table(["dataset", "claim", "comparison", "role", "seeds", "difference (pts)", "95% CI",
                             "verdict"], rows)])


def write_report(params: Params, runs_root: Path | None = None, analysis_root: Path | None = None,
                 report_path: Path | None = None) -> str:
    report_path = report_path or REPORT_PATH
    results = Results(params, runs_root, analysis_root or ANALYSIS_DIR, report_path.parent)
    assessed = assess_all(results)
    text = "\n\n".join([
        "# memvad reproducibility report",
        "_Written by `python -m analysis.report` (the `report` stage of `dvc repro`) from runs/**/metrics.json and "
        "analysis/tables/; do not edit by hand. Every number below was computed by this study's runs; what did not "
        "run says \"not run here\"._",
        summary_section(results, assessed),
        protocol_section(results),
        results_section(results),
        claims_section(results, assessed),
        comparisons_section(results),
    ]) + "\n"
    write_text(report_path, text)
    return text


@exit_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write REPORT.md from the metrics files and analysis tables")
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
    args = parser.parse_args(argv)
    write_report(load_params(args.params))
    print(f"wrote {REPORT_PATH}")
    return 0


if __name__ == "__main__":
    exit_now(main())
