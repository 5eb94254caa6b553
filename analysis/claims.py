"""The claims C1-C10 that REPORT.md checks, the papers' reported numbers, and the rule that gives each claim's verdict.

A claim's rule (`Claim.assess`) turns the study's results on one dataset into evidence lines and a verdict. Claims
that compare two variants' AUCs rest on their paired-bootstrap comparisons (listed in analysis.comparisons; the
interval rule lives in analysis.bootstrap); the others have an assessor here that states its rule as an evidence line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from analysis.bootstrap import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, NOT_EXERCISED, NOT_RUN, UNDERTRAINED
from analysis.common import SCORE_COLUMNS, mean_std
from analysis.formatting import figure_links, points, seeds
from analysis.results import PAPER_DATASETS, Results
from pipeline.config import Params

NOT_APPLICABLE = "n/a"
NO_COLLAPSE = "not applicable: no collapse"   # C6 restores what collapsed; nothing did
COMPLEX_DATASETS = ("synthetic-scenes", "shanghaitech")  # where RC2020 expects the memory to collapse (C5)

# Frame-level AUC (%) as reported: (variant, dataset) -> value.
PAPER_AUC = {
    **{("mnad-pred", d): v for d, v in zip(PAPER_DATASETS, (97.0, 88.5, 70.5))},     # MNAD, Park et al. 2020
    **{("mnad-recon", d): v for d, v in zip(PAPER_DATASETS, (90.2, 82.8, 69.8))},
    **{("memae", d): v for d, v in zip(PAPER_DATASETS, (94.1, 83.3, 71.2))},         # MemAE, Gong et al. 2019
}
# RC2020's Ped2 figures as reported to the authors (alpha tuned on the test set).
RC2020_AUC = {("mnad-recon", "ped2"): 88.36, ("mnad-pred", "ped2"): 96.34, ("ae-recon", "ped2"): 88.84,
              ("ae-pred", "ped2"): 95.54}


# ----------------------------------------------------------------------------------------------------------------
# Verdict rules (the bootstrap's interval rule lives in analysis.bootstrap)


@dataclass
class Assessment:
    """The evidence lines and the verdict of one claim on one dataset."""

    lines: list[str]
    verdict: str


Assessor = Callable[[Results, str, str], Assessment]  # (results, dataset, claim id) -> assessment


def combine(verdicts: list[str]) -> str:
    """A claim made of several parts (a conjunction): does not hold if any part does not (a part that does not
    hold rests on learnt runs only, so the rest cannot save the claim); otherwise undertrained if any part rests on
    a run that has not learnt; otherwise, over the parts whose mechanism was exercised, holds if every one holds,
    inconclusive otherwise; not exercised if no part was; not run here if no part was computed."""
    computed = [v for v in verdicts if v not in (NOT_RUN, NOT_APPLICABLE)]
    if not computed:
        return NOT_RUN
    if DOES_NOT_HOLD in computed:
        return DOES_NOT_HOLD
    if UNDERTRAINED in computed:
        return UNDERTRAINED
    decided = [v for v in computed if v != NOT_EXERCISED]
    if not decided:
        return NOT_EXERCISED
    return HOLDS if all(v == HOLDS for v in decided) else INCONCLUSIVE


def gate_check(results: Results, dataset: str, variants) -> Assessment | None:
    """An "undertrained" assessment naming the runs of `variants` that have not learnt, or None when all have."""
    failed = results.unlearnt(dataset, variants)
    if not failed:
        return None
    return Assessment([f"rests on runs that have not learnt (learning gate): {', '.join(failed)}"], UNDERTRAINED)


def position_coding(usage: pd.DataFrame, threshold: float) -> str:
    """One line: how much each variant's test-set item choice is set by query position (NMI) rather than content."""
    parts = []
    for variant, rows in usage.groupby("variant", sort=False):
        nmi = rows["position_nmi"]
        coded = int((nmi >= threshold).sum())
        parts.append(f"{variant} {_plain_mean_std(nmi, 'NaN (one item)', 2)} ({coded} of {len(rows)} position-coded)")
    return (f"item set by query position, NMI(position; item) / H(item) (position-coded at ≥ {threshold:g}): "
            + "; ".join(parts))


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
# Assessors: one claim on one dataset


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
            band = (f", rule: inside [{points(row['band_low'])}, {points(row['band_high'])}]"
                    if pd.notna(row.get("band_low")) else "")
            note = f"; {row['note']}" if row["note"] else ""
            lines.append(f"`{row['comparison']}`{role}: {points(row['estimate'])} pts, 95% CI "
                         f"[{points(row['low'])}, {points(row['high'])}]{band} (seeds {row['seeds']}) → "
                         f"{row['verdict']}{note}")
        if row["role"] == "verdict":
            verdicts.append(row["verdict"])
    return lines, verdicts or [NOT_RUN]


def bootstrap_claim(figures: tuple[tuple[str, str, str], ...] = ()) -> Assessor:
    """A claim decided by its comparisons alone; `figures` = (topic, file, text) links to add."""

    def assess(results: Results, dataset: str, claim: str) -> Assessment:
        lines, verdicts = comparison_lines(results, dataset, claim)
        links = [results.link("comparisons", dataset, "differences.png", "differences")]
        links += [results.link(topic, dataset, name, text) for topic, name, text in figures]
        return Assessment(lines + figure_links(links), combine(verdicts))

    return assess


def assess_replacement(results: Results, dataset: str, claim: str) -> Assessment:
    """C4, per fill and relative: with every fill (zeros, ones, random) of the whole decoder input, a variant with
    skips keeps its output closer to the normal one (PSNR to the normal output) and loses less AUC (PSNR score) than
    a variant without skips; every seed of the one beyond every seed of the other."""
    frame = results.analysis_table("replacement", dataset, "replacement.csv")
    if frame is None or frame.empty:
        return Assessment(["replacement not run here (no table, or none of analysis.replacement_variants trained)"],
                          NOT_RUN)
    undertrained = gate_check(results, dataset, frame["variant"].unique())
    if undertrained:
        return undertrained
    normal = frame[frame["part"] == "none"].set_index(["variant", "seed"])["auc_psnr"]
    whole = frame[frame["part"] == "both"].copy()
    whole["auc_drop"] = [normal[v, s] - auc for v, s, auc in zip(whole["variant"], whole["seed"], whole["auc_psnr"])]
    skipping = [v for v in whole["variant"].unique() if bool(whole[whole["variant"] == v]["skips"].iloc[0])]
    plain = [v for v in whole["variant"].unique() if v not in skipping]
    if not skipping or not plain:
        return Assessment([f"needs a variant with skips and one without among analysis.replacement_variants "
                           f"(ran: {', '.join(whole['variant'].unique())})"], NOT_RUN)
    lines, verdicts = [], []
    for fill in ("zeros", "ones", "random"):
        rows = whole[whole["fill"] == fill]
        parts = []
        for with_skips in skipping:
            for without in plain:
                a, b = (rows[rows["variant"] == v] for v in (with_skips, without))
                closer = dominance(a["psnr_to_normal"], b["psnr_to_normal"])
                smaller_drop = dominance(b["auc_drop"], a["auc_drop"])
                verdicts += [closer, smaller_drop]
                parts.append(f"{with_skips} vs {without}: PSNR to normal {mean_std(a['psnr_to_normal'], 1)} vs "
                             f"{mean_std(b['psnr_to_normal'], 1)} dB → {closer}; AUC drop "
                             f"{mean_std(a['auc_drop'], 1, 100)} vs {mean_std(b['auc_drop'], 1, 100)} pts → "
                             f"{smaller_drop}")
        lines.append(f"**{fill}**: " + "; ".join(parts))
    threshold = results.params.analysis.replacement_unchanged_psnr
    lowest = whole[whole["variant"].isin(skipping)].groupby("fill")["psnr_to_normal"].mean()
    lines.append("context: with skips the seed-mean PSNR to the normal output is "
                 + ", ".join(f"{fill} {value:.1f}" for fill, value in lowest.items())
                 + f" dB (\"barely changed\" at ≥ {threshold:g} dB)")
    lines.append("rule: for each fill of the whole decoder input, every seed of each variant with skips keeps a "
                 "higher PSNR to its normal output and a smaller AUC drop than every seed of each variant without")
    links = [results.link("replacement", dataset, "psnr_to_normal.png", "PSNR to normal output")]
    links += [results.link("replacement", dataset, f"examples_{v}.png", f"examples {v}")
              for v in whole["variant"].unique()]
    return Assessment(lines + figure_links(links), combine(verdicts))


def collapse_candidates(params: Params) -> list[str]:
    """The study's MNAD-memory variants trained without the uniform-usage loss: the ones claim C5 expects to
    collapse on complex data (the uniform-usage loss is RC2020's fix for that collapse, C6)."""
    return [v for v in params.study.all_variants
            if params.variant(v).memory == "mnad" and not params.variant(v).uniform_weight]


def assess_collapse(results: Results, dataset: str, claim: str) -> Assessment:
    """C5: on complex data most runs of the plain MNAD memory collapse (top item share >= collapse_share)."""
    usage = results.analysis_table("memory_usage", dataset, "usage.csv")
    if usage is None or usage.empty:
        return Assessment(["memory usage not run here"], NOT_RUN)
    test = usage[(usage["split"] == "test") & usage["variant"].isin(collapse_candidates(results.params))]
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
             position_coding(test, results.params.analysis.position_coded_nmi),
             f"degenerate (constant-score) videos: {nan_videos['without_update']} without update, "
             f"{nan_videos['with_update']} with update, over those runs"]
    links = figure_links([results.link("memory_usage", dataset, "usage.png", "usage histograms")])
    if dataset not in COMPLEX_DATASETS:
        return Assessment(lines + ["simple data: shown for contrast, no verdict"] + links, NOT_APPLICABLE)
    undertrained = gate_check(results, dataset, test["variant"].unique())
    if undertrained:
        return Assessment(undertrained.lines + lines + links, UNDERTRAINED)
    fraction = len(collapsed) / len(test)
    verdict = HOLDS if fraction > 0.5 else DOES_NOT_HOLD if fraction == 0 else INCONCLUSIVE
    lines.append("rule: holds when more than half of the runs collapse, does not hold when none does")
    return Assessment(lines + links, verdict)


def assess_uniform(results: Results, dataset: str, claim: str) -> Assessment:
    """C6: where mnad-pred collapsed, the uniform loss raises the perplexity of usage (every seed above every seed
    of mnad-pred) and its AUC is not worse than mnad-pred's (paired bootstrap). Where nothing collapsed there is
    nothing to restore: not applicable, with the numbers shown."""
    lines, verdicts = comparison_lines(results, dataset, claim)
    usage = results.analysis_table("memory_usage", dataset, "usage.csv")
    links = [results.link("memory_usage", dataset, "pred_vs_uniform.png", "usage pred vs uniform"),
             results.link("comparisons", dataset, "differences.png", "differences")]
    test = usage[usage["split"] == "test"] if usage is not None else pd.DataFrame()
    uniform = test[test["variant"] == "mnad-pred-uniform"] if len(test) else test
    plain = test[test["variant"] == "mnad-pred"] if len(test) else test
    if not len(uniform) or not len(plain):
        return Assessment(["usage of mnad-pred-uniform vs mnad-pred: not run here", *lines] + figure_links(links),
                          NOT_RUN)
    usage_verdict = dominance(uniform["perplexity"], plain["perplexity"])
    lines = [f"usage perplexity (effective items) mnad-pred-uniform {mean_std(uniform['perplexity'], 2)} vs "
             f"mnad-pred {mean_std(plain['perplexity'], 2)} (seeds {len(uniform)} / {len(plain)}) → "
             f"{usage_verdict}", position_coding(pd.concat([plain, uniform]),
                                                 results.params.analysis.position_coded_nmi), *lines]
    if not plain["collapsed"].astype(bool).any():
        lines.append(f"mnad-pred did not collapse here (top item {plain['top_share'].min():.0%}–"
                     f"{plain['top_share'].max():.0%} of test queries): there is no collapse to restore")
        return Assessment(lines + figure_links(links), NO_COLLAPSE)
    undertrained = gate_check(results, dataset, ("mnad-pred", "mnad-pred-uniform"))
    if undertrained:
        return Assessment(undertrained.lines + lines + figure_links(links), UNDERTRAINED)
    return Assessment(lines + figure_links(links), combine([usage_verdict, *verdicts]))


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
    usage = results.analysis_table("memory_usage", dataset, "usage.csv")
    if usage is not None and not usage.empty:
        test = usage[(usage["split"] == "test") & usage["variant"].isin(["mnad-pred", "mnad-pred-nosep"])]
        lines.append(position_coding(test, results.params.analysis.position_coded_nmi))
    links = figure_links([results.link("tsne", dataset, "tsne.png", "t-SNE")])
    undertrained = gate_check(results, dataset, ("mnad-pred", "mnad-pred-nosep"))
    if undertrained:
        return Assessment(undertrained.lines + lines + links, UNDERTRAINED)
    lines.append("rule: every seed of mnad-pred above every seed of mnad-pred-nosep")
    return Assessment(lines + links, dominance(by_variant["mnad-pred"], by_variant["mnad-pred-nosep"]))


def _plain_mean_std(values: pd.Series, undefined: str = "NaN (one item used)", digits: int = 3) -> str:
    if values.isna().all():
        return undefined
    return mean_std(values.dropna(), digits)


# ----------------------------------------------------------------------------------------------------------------
# The claims, each with its rule


@dataclass(frozen=True)
class Claim:
    """A claim, what the papers / RC2020 reported for it, and the rule that gives its verdict on one dataset."""

    id: str
    statement: str
    reported: str
    assess: Assessor


# bootstrap_claim: the claim's verdict-role comparisons decide (analysis.comparisons.claim_comparisons); its
# arguments are the figures to link. The other rules are the assessors above.
CLAIMS = (
    Claim("C1", "Memory improves AUC over the same network without memory (MNAD)",
          "MNAD: yes (ablation). RC2020 Ped2: prediction 96.34 with vs 95.54 without memory, reconstruction 88.36 vs "
          "88.84; on ShanghaiTech the network without memory was better",
          bootstrap_claim((("timelines", "roc.png", "ROC"),))),
    Claim("C2", "Prediction beats reconstruction",
          "MNAD: 97.0 / 88.5 / 70.5 vs 90.2 / 82.8 / 69.8 (Ped2 / Avenue / ShanghaiTech). RC2020 Ped2: 96.34 vs 88.36",
          bootstrap_claim((("timelines", "roc.png", "ROC"), ("timelines", "timelines.png", "timelines")))),
    Claim("C3", "Test-time memory update helps",
          "MNAD: yes. RC2020: much for reconstruction, little for prediction",
          bootstrap_claim()),
    Claim("C4", "With skip connections, replacing the intermediate features by zeros / ones / random barely changes "
                "the output",
          "RC2020: prediction outputs visually unchanged; reconstruction (no skips) suffered heavily",
          assess_replacement),
    Claim("C5", "Memory collapses onto one item on complex data",
          "RC2020: on ShanghaiTech every query mapped to one item; many NaNs in the memory-based score",
          assess_collapse),
    Claim("C6", "The uniform usage loss spreads usage across items and restores AUC",
          "RC2020: their fix for the collapse (uniform-usage loss, weight 1; compactness and separateness 0.001)",
          assess_uniform),
    Claim("C7", "Only prediction detects temporal anomalies",
          "RC2020 synthetic study: only the prediction model shows artefacts on temporal anomalies",
          bootstrap_claim((("anomaly_types", "per_type_auc.png", "AUC per type"),
                           ("anomaly_types", "examples.png", "example events")))),
    Claim("C8", "Denoising reconstruction with skips gains about 4% over plain reconstruction but stays below "
                "prediction",
          "RC2020: about +4% over plain reconstruction (salt-and-pepper 5 / 25 / 40%), still below prediction",
          bootstrap_claim()),
    Claim("C9", "The separateness loss gives well-separated query clusters (t-SNE)",
          "MNAD: t-SNE shows queries clustered around well-separated items",
          assess_separation),
    Claim("C10", "MemAE's reported numbers versus MNAD's under one evaluation protocol",
          "Reported: MNAD prediction 97.0 / 88.5 / 70.5, MemAE 94.1 / 83.3 / 71.2, MNAD reconstruction "
          "90.2 / 82.8 / 69.8: prediction > MemAE > reconstruction on Ped2 and Avenue (MemAE first on ShanghaiTech)",
          bootstrap_claim((("timelines", "roc.png", "ROC"),))),
)

ASSESSORS: dict[str, Assessor] = {claim.id: claim.assess for claim in CLAIMS}


def claim_datasets(results: Results, claim: str) -> list[str]:
    """C7 needs per-frame anomaly types, which only the synthetic datasets record."""
    if claim == "C7":
        return [d for d in results.datasets if d in results.params.datasets and results.params.dataset(d).is_synthetic]
    return results.datasets


COLLAPSE_STUDY = "collapse study"   # the C5 row's entry for the collapse study (analysis.collapse)


def collapse_not_run(params) -> str:
    """Why the collapse study's table is empty."""
    return ("params.yaml `collapse.settings` lists no setting (the quick look leaves the study out; the default study "
            "runs it)" if not params.collapse.settings else "no run of its settings exists")


def unlearnt_collapse_runs(final: pd.DataFrame) -> list[str]:
    """The runs of the collapse study's table (analysis.collapse's final.csv) that failed the learning gate, as
    "setting sS"."""
    return [f"{r.setting} s{r.seed}" for r in final.itertuples() if not r.learnt]


def assess_collapse_study(results: Results) -> Assessment:
    """C5 on the collapse study's base setting (mnad-pred with skips on 8 scenes, 10x the default's steps): holds
    when more than half of its seeds collapse, does not hold when no setting collapses in any seed; the settings
    that collapse and the hypothesis are in REPORT.md's collapse-study section."""
    final = results.collapse_table
    if final is None:
        return Assessment(["the collapse study did not run (no `collapse_analysis` table)"], NOT_RUN)
    if final.empty:
        return Assessment([f"the collapse study has no run: {collapse_not_run(results.params)}"], NOT_RUN)
    share = results.params.analysis.collapse_share
    base = final[final["setting"] == "base"]
    if base.empty:
        return Assessment(["the collapse study has no `base` setting run"], NOT_RUN)
    failed = unlearnt_collapse_runs(base)
    learnt = final[final["learnt"].astype(bool)]
    collapsed = learnt[learnt["top_share"] >= share]
    others_unlearnt = unlearnt_collapse_runs(final[final["setting"] != "base"])
    lines = [f"base setting: top item {base['top_share'].min():.0%}–{base['top_share'].max():.0%} of the test "
             f"queries after {int(base['steps'].max())} steps; collapsed in {int((base['top_share'] >= share).sum())}"
             f" of {len(base)} seeds",
             "settings that collapsed in a learnt run: " + (", ".join(sorted(set(collapsed["setting"]))) or "none")
             + (f" (not learnt, so deciding nothing: {', '.join(others_unlearnt)})" if others_unlearnt else ""),
             "rule: holds when more than half of the base setting's seeds collapse, does not hold when no setting "
             "collapses in any learnt seed (see the collapse-study section)"]
    if failed:
        return Assessment([f"rests on runs that have not learnt (learning gate): {', '.join(failed)}", *lines],
                          UNDERTRAINED)
    fraction = float((base["top_share"] >= share).mean())
    verdict = HOLDS if fraction > 0.5 else DOES_NOT_HOLD if collapsed.empty else INCONCLUSIVE
    return Assessment(lines, verdict)


def assess_all(results: Results) -> dict[str, dict[str, Assessment]]:
    assessed = {}
    for claim in CLAIMS:
        assessed[claim.id] = {}
        for dataset in claim_datasets(results, claim.id):
            if not results.ran(dataset):
                assessed[claim.id][dataset] = Assessment([results.why_not_run(dataset)], NOT_RUN)
            else:
                assessed[claim.id][dataset] = claim.assess(results, dataset, claim.id)
    assessed["C5"][COLLAPSE_STUDY] = assess_collapse_study(results)
    return assessed
