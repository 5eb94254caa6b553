"""REPORT.md, written from the runs' metrics.json and the analysis tables only (the `report` stage; never by hand).
The stage also writes the curve tables of dvc.yaml's top-level plots (analysis.plot_data) and logs REPORT.md into
each dataset's MLflow study run, which it closes.

Sections: a summary; the protocol (score, AUC, skipped frames, NaN policy, test-time update, the options where the
papers and their released code differ and which one this harness used); the results tables beside the papers'
numbers; one row per claim C1-C10 with its evidence, figure links and verdict; every paired-bootstrap comparison.

A result appears only if the file it comes from exists and belongs to the study in params.yaml; everything else is
"not run here", with the reason.
"""
from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from analysis.bootstrap import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, NOT_EXERCISED, NOT_RUN, UNDERTRAINED
from analysis.claims import (CLAIMS, COLLAPSE_STUDY, NO_COLLAPSE, NOT_APPLICABLE, PAPER_AUC, RC2020_AUC, Assessment,
                             assess_all, collapse_not_run, combine, dominance,
                             unlearnt_collapse_runs)
from analysis.common import ANALYSIS_DIR, BASELINE, NORMAL_SETS, SCORE_COLUMNS, existing_runs, study_variants
from analysis.formatting import figure_links, percent, points
from analysis.plot_data import write_plot_data
from analysis.probes import SETTING_COLUMNS, label_settings, split_label
from analysis.results import CLEAN_AUC_COLUMNS, PAPER_DATASETS, Results, clean_auc_column
from pipeline import cpu_kernels, cpu_model, tracking
from pipeline.checkpoint import load_checkpoint
from pipeline.config import ANOMALY_TYPES, REPO_ROOT, ConfigError, Params, load_params
from pipeline.errors import exit_cleanly
from pipeline.io import write_text
from pipeline.metrics import headline_scoring
from pipeline.paths import run_dir

REPORT_PATH = REPO_ROOT / "REPORT.md"


# ----------------------------------------------------------------------------------------------------------------
# Formatting


def bold_verdict(verdict: str) -> str:
    return f"**{verdict}**" if verdict in (HOLDS, DOES_NOT_HOLD) else verdict


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", "<br>") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Sections


def summary_section(results: Results, assessed: dict[str, dict[str, Assessment]],
                    designs: dict[str, list[tuple[str, str]]]) -> str:
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
    for dataset in params.study.all_datasets:
        gated = [(variant, seed, m["gate"]) for variant, runs in results.metrics.get(dataset, {}).items()
                 for seed, m in runs if "gate" in m]
        failed = [f"{variant} s{seed}" for variant, seed, gate in gated if not gate["learnt"]]
        if gated:
            lines.append(f"- **Learning gate, {dataset}**: {len(gated) - len(failed)} of {len(gated)} trained runs "
                         f"learnt" + (f"; not learnt: {', '.join(failed)}" if failed else "") + ".")
    for dataset in params.study.all_datasets:
        checks = designs.get(dataset)
        if checks:
            lines.append(f"- **What {dataset} is built to show** (AUC per anomaly type against clean normal frames, "
                         f"mean over seeds): "
                         + "; ".join(check for check, _ in checks) + ".")
    counts: dict[str, list[str]] = {}
    for claim, per_dataset in assessed.items():
        for dataset, assessment in per_dataset.items():
            if assessment.verdict != NOT_APPLICABLE:
                counts.setdefault(assessment.verdict, []).append(f"{claim} {dataset}")
    order = (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, UNDERTRAINED, NOT_EXERCISED, NO_COLLAPSE, NOT_RUN)
    lines.append("- Verdicts over (claim, dataset) pairs: " + "; ".join(
        f"{verdict}: {len(counts[verdict])}" for verdict in order if verdict in counts) + ".")
    for verdict in order[:-1]:
        if verdict in counts and verdict != INCONCLUSIVE:
            lines.append(f"  - {verdict}: {', '.join(counts[verdict])}")
    return "\n".join(lines)


def protocol_section(results: Results) -> str:
    params = results.params
    analysis, evaluate, gate = params.analysis, params.evaluate, params.gate
    rows = []
    for name in study_variants(params):
        v = params.variant(name)
        end = v.window - 1 - v.scored_offset
        score = ("regularity 1 − g(error)" if v.family == "memae" else
                 f"{v.alpha:g}·g(PSNR) + {1 - v.alpha:g}·(1 − g(D))" if v.has_memory else "g(PSNR)")
        rows.append([name, v.task, v.memory, "yes" if v.skips else "no", score, f"{v.scored_offset} / {end}",
                     f"{v.test_threshold:g}" if v.memory == "mnad" else "—",
                     v.update_norm if v.memory == "mnad" else "—"])
    nan_text = ("`safe`: a video whose series is constant normalises to 0.5, the middle of the range (no evidence "
                "either way within that video); `nan_videos` counts the videos whose PSNR or feature-distance series "
                "(or both) is constant" if evaluate.nan_policy == "safe" else
                "`reference`: a constant series gives 0/0 = NaN as in MNAD's code, and a micro AUC over NaN scores "
                "is reported as NaN")
    lines = [
        "## Protocol", "",
        "- **Score.** Per test frame: PSNR of the output against its target on [0, 1] images, 10·log10(1/mse); for "
        "MNAD-memory variants also the feature distance D (compactness of the frame's queries to their nearest items); "
        "for MemAE the clip error. Each series is min-max normalised per video (g), then combined into a normality "
        "score (higher = more normal) as in the table below.",
        "- **AUC.** Frame-level, `roc_auc_score(1 − label, score)`. *Micro*: every scored test frame of the dataset "
        "pooled (the papers' number). *Macro*: the mean of per-video AUCs over videos that hold both classes. *Per "
        "anomaly type* (synthetic sets): the type's frames against all normal frames, and against the *clean* normal "
        "frames, whose scoring window (the frames the sample spans) holds no abnormal frame; the set's design bars "
        "use clean normal frames, the claims' verdicts all normal frames.",
        f"- **NaN policy** (`evaluate.nan_policy`): {nan_text}.",
        f"- **Test-time memory update** (`evaluate.test_time_update: {evaluate.test_time_update}`): frame by frame in "
        "video order, a frame whose point score is under the threshold writes its queries into the memory, which "
        "persists across all test videos (as MNAD). The threshold is per dataset (`profile.update_threshold`): "
        "`paper`, the variant's `test_threshold` (MNAD's 0.01 / 0.015); or `calibrated`, the "
        f"{evaluate.calibration_quantile:g} quantile of the point scores of {evaluate.calibration_windows} seeded "
        "training windows under the trained model, so that frames like the training frames pass it. Memory variants "
        "are reported with and without the update; a variant's *headline* scoring, used for verdicts and figures, is "
        "with the update where the variant has an MNAD memory (as the papers evaluate), without otherwise. A "
        "comparison of the update in which no frame updated the memory reads *not exercised*.",
        f"- **Learning gate** (`gate`): a run counts as learnt when its training loss has plateaued (of the fall of "
        f"its mean loss from the first {gate.plateau_window:.0%} of its logged steps to the last "
        f"{gate.plateau_window:.0%}, less than {gate.plateau_tolerance:.0%} came over that last share; a steady "
        f"learner puts about a quarter there) and, on the normal test frames, its "
        f"mean PSNR beats the trivial output for its task by more than {gate.floor_margin_db:g} dB: copy-last (the "
        "last input frame) for prediction, the training set's mean frame for reconstruction. A verdict that rests on "
        "a run that has not learnt reads *undertrained* and names the runs; such a run never decides a claim.",
        "- **Seeds.** Learnt variants: " + ", ".join(str(s) for s in params.study.seeds) +
        f" (mean ± sample std over seeds); `{BASELINE}` is deterministic and evaluated once.",
        f"- **Verdicts.** A claim comparing variants rests on the difference of their micro AUCs with a 95% interval "
        f"from a two-level bootstrap ({analysis.bootstrap_samples} resamples, seed {analysis.bootstrap_seed}): each "
        "resample draws the test videos with replacement (one draw shared by every variant involved) and each "
        "variant's seeds with replacement, computes each drawn seed's AUC on the drawn videos' frames and averages "
        "over the drawn seeds, so the interval carries both test-set and seed variance. Interval above 0 → holds, "
        "below 0 → does not hold, straddling 0 → inconclusive. A claim that states a size is checked against a band: "
        f"C8's \"about +4 points\" holds when the interval lies inside [{100 * analysis.c8_gain_band[0]:+.0f}, "
        f"{100 * analysis.c8_gain_band[1]:+.0f}] points, does not hold when it lies outside; C7's \"only\" needs "
        f"reconstruction's temporal AUC within 0.5 ± {analysis.chance_margin:g}. Claims measured per seed without "
        "frames (usage perplexity, silhouette, replacement) hold when every seed of one variant beats every seed of "
        "the other. A claim of several parts holds when every part holds and does not hold when any part does not; "
        "short of that, a part resting on a run that has not learnt makes it undertrained. "
        f"Thresholds: collapse when the top item takes ≥ {analysis.collapse_share:.0%} of the test queries; usage is "
        f"position-coded when position explains ≥ {analysis.position_coded_nmi:.0%} of the item choice "
        "(NMI(position; item) / H(item)).",
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

    recon = [v for v in study_variants(params) if params.variant(v).task == "reconstruct"
             and params.variant(v).family == "mnad" and params.variant(v).has_memory and not params.variant(v).skips]
    recon_weights = ", ".join(f"{v} {params.variant(v).compactness_weight:g}/{params.variant(v).separateness_weight:g}"
                              for v in recon) or "(none in the study)"
    return [
        ["MNAD memory-update normaliser", "max over the item's own queries (Eq. 5)", "max over all queries",
         f"`update_norm`: {_values(params, 'update_norm', mnad_memory)}"],
        ["MNAD reconstruction learning rate", "2e-5", "2e-4", "the dataset profile's lr for every MNAD variant "
         "(budget table below)"],
        ["MNAD reconstruction loss terms", "compactness, separateness", "unpacked in swapped order (harmless at equal "
         "weights)", f"named terms, weights compactness/separateness: {recon_weights}"],
        ["Reconstruction decoder width", "MNAD decoder", "RC2020's narrower decoder",
         f"`decoder`: {_values(params, 'decoder', lambda v: v.family == 'mnad' and not v.skips)}"],
        ["Constant score series in min-max (MNAD issue #6)", "—", "0/0 = NaN", f"`evaluate.nan_policy`: "
         f"{params.evaluate.nan_policy}"],
        ["MemAE addressing", "cosine similarity", "dot product",
         f"`addressing`: {_values(params, 'addressing', memae)}"],
        ["MemAE shrinkage threshold λ", "in [1/N, 3/N] (N items)", "0.0025 (5/N at N = 2000)",
         f"`shrink_threshold`: {_values(params, 'shrink_threshold', memae)}; at 0.0025 the shrinkage zeroes a "
         "query's every weight (it reads nothing and passes no gradient) for most queries: the `zero_rows` column "
         "of the learning-curve table"],
        ["MemAE batch size", "14", "10 (script)", "the dataset profile's, or its `families.memae` (budget table)"],
        ["RC2020 salt-and-pepper input scaling", "—", "noise on [0, 1] then rescaled as 0..255 (inputs near −1)",
         f"`noise_rc2020_scaling`: {_values(params, 'noise_rc2020_scaling', lambda v: v.noise != 'none')}"],
        ["RC2020 uniform-usage loss", "—", "runs at batch size 1 only", "target by position within the frame, any "
         "batch size (always)"],
        ["Alpha of the combined score", "0.6 prediction, 0.7 reconstruction", "RC2020 tuned alpha on the test set",
         "fixed per variant (`alpha`, table above); never tuned on test data"],
        *budget_differences(params),
    ]


# The papers' training settings per model family (MNAD: Park et al.; MemAE: Gong et al.), for the budget tables.
PAPER_SETTINGS = {"mnad": {"frame_size": 256, "width": 1.0, "epochs": 60, "batch_size": 4, "lr": 2e-4},
                  "memae": {"frame_size": 256, "width": 1.0, "epochs": 100, "batch_size": 14, "lr": 1e-4}}


def study_families(params: Params, dataset: str) -> list[str]:
    return list(dict.fromkeys(params.variant(v).family for v in params.study.variants_for(dataset)))


def budget_differences(params: Params) -> list[list[str]]:
    """One row per training setting of the study that differs from the papers', per dataset and model family."""
    rows = []
    for dataset in params.study.all_datasets:
        for family in study_families(params, dataset):
            profile = params.dataset(dataset).profile.for_family(family)
            paper = dict(PAPER_SETTINGS[family], epochs=10 if dataset == "shanghaitech" and family == "mnad"
                         else PAPER_SETTINGS[family]["epochs"])
            for setting, value in paper.items():
                ours = getattr(profile, setting)
                if ours != value:
                    rows.append([f"{'MNAD' if family == 'mnad' else 'MemAE'} {setting.replace('_', ' ')} on "
                                 f"{dataset}", f"{value:g}", "—", f"{ours:g}"])
    return rows


def budget_section(results: Results) -> str:
    """Per dataset and model family, what the runs trained with and for how long."""
    params = results.params
    rows = []
    for dataset in params.study.all_datasets:
        for family in study_families(params, dataset):
            profile = params.dataset(dataset).profile.for_family(family)
            steps = sorted({m["training"]["steps"] for variant, runs in results.metrics.get(dataset, {}).items()
                            for _, m in runs if params.variant(variant).family == family and "training" in m})
            rows.append([dataset, family, f"{profile.frame_size}", f"{profile.width:g}", str(profile.epochs),
                         str(profile.max_train_clips or "all"), str(profile.batch_size), f"{profile.lr:g}",
                         ", ".join(map(str, steps)) or "—"])
    curve = results.analysis_root / "figures" / "budget" / "learning_curve.png"
    link = Path(os.path.relpath(curve, results.report_dir)).as_posix()
    chosen = ([f"The budget was chosen from measured learning curves (`benchmarks/learning_curve.py`: AUC per "
               f"anomaly type and training loss against steps, one seed per length, each length its own cosine "
               f"schedule; probes test one setting at one length): [learning curves]({link}).", "",
               learning_curve_table(results.learning_curve), "",
               *filter(None, [curve_reproduces_study(results)]), ""]
              if curve.exists() else [])
    return "\n".join(["## Training budget", "", "What every run of a dataset and model family trained with "
                      "(params.yaml `datasets.<name>.profile`, with its `families` entry); the papers' settings "
                      "are in the differences table above.", "", *chosen,
                      table(["dataset", "family", "frame size", "width", "epochs", "clips per epoch", "batch", "lr",
                             "steps"], rows)])


def curve_reproduces_study(results: Results) -> str:
    """Whether the curve was measured under the study's code and params: each row's recorded settings are what its
    label trains with now (SETTING_COLUMNS), and the rows at the study's own budget (a plain study variant at its
    epochs, on a seed the study ran) give the micro AUC of the study's run of that seed. Empty when no row matches a
    run and every row's settings hold."""
    params, curve = results.params, results.learning_curve
    matched, differing, moved = 0, [], []
    for row in ([] if curve is None else curve.itertuples()):
        recorded = {key: getattr(row, key) for key in SETTING_COLUMNS if pd.notna(getattr(row, key, np.nan))}
        try:
            now = label_settings(params, row.dataset, row.variant) if recorded else {}
            changed = [f"{key} {recorded[key]:g} recorded, {now[key]:g} now" for key in recorded
                       if not np.isclose(recorded[key], now[key], rtol=1e-9, atol=0)]
        except (ConfigError, AttributeError, ValueError) as exc:   # a dataset, variant or option since removed
            changed = [f"the label no longer resolves ({exc})"]
        if changed:
            moved.append(f"{row.dataset} `{row.variant}` at {row.epochs} epochs: {', '.join(changed)}")
        runs = dict(results.metrics.get(row.dataset, {}).get(row.variant, []))
        if row.seed not in runs or row.epochs != params.dataset(row.dataset).training_profile(
                params.variant(row.variant)).epochs:
            continue
        matched += 1
        study = runs[row.seed][headline_scoring(runs[row.seed])]["auc_micro"]
        if not np.isclose(row.auc_micro, study, rtol=0, atol=1e-9):
            differing.append(f"{row.dataset} `{row.variant}` seed {row.seed}: {100 * row.auc_micro:.1f} against "
                             f"{100 * study:.1f}")
    stale = []
    if differing:
        stale.append(f"of the curve's {matched} rows at the study's budget, {len(differing)} do not reproduce the "
                     f"micro AUC of the study's run of the same seed ({'; '.join(differing)})")
    if moved:
        stale.append(f"{len(moved)} rows were trained with settings their label no longer gives under params.yaml "
                     f"({'; '.join(moved)})")
    if stale:
        return (f"**Stale**: {'; and '.join(stale)}: the curve was measured under other code or params; rerun "
                f"`python benchmarks/learning_curve.py`.")
    return (f"The curve's {matched} rows at the study's budget reproduce the micro AUC of the study's run of the same "
            f"seed exactly: the curve was measured under the study's code and params." if matched else "")


def learning_curve_table(curve: pd.DataFrame | None) -> str:
    """The measured learning curves (read_learning_curve), one row per (dataset, variant, seed, length): what the
    budget was chosen from. MemAE's zero-row share is the share of queries its hard shrinkage zeroed entirely at the
    end of training."""
    if curve is None:
        return ""
    rows = [[r.dataset, f"`{r.variant}`" + (" (probe)" if r.probe else ""), str(r.seed), str(r.epochs),
             str(r.steps), f"{r.train_seconds:.0f}", f"{100 * r.late_improvement:.1f}%",
             f"{r.normal_psnr:.1f} / {r.floor_psnr:.1f}", "yes" if r.learnt else "no",
             *("—" if pd.isna(getattr(r, column)) else f"{100 * getattr(r, column):.1f}"
               for column in ("auc_micro", *CLEAN_AUC_COLUMNS)),
             "—" if pd.isna(r.zero_rows) else f"{r.zero_rows:.0%}"] for r in curve.itertuples()]
    return table(["dataset", "variant", "seed", "epochs", "steps", "train s", "loss plateau", "PSNR / floor",
                  "learnt", "AUC micro", *(f"{k.replace('_', '-')}, clean" for k in ANOMALY_TYPES),
                  "MemAE zero rows"], rows)


# A stated GPU rate for the estimate of the papers' ShanghaiTech study (no GPU measured here): sustained fp32
# training throughput of an H100/H200-class GPU on MNAD at 256 px, in samples per second.
GPU_SAMPLES_PER_SECOND = 60.0


def collapse_section(results: Results) -> str:
    """The collapse study: under which setting the memory collapses, when, and whether the hypothesis holds."""
    params = results.params
    final = results.collapse_table
    lines = ["## The collapse study (C5: when and why the memory collapses)", ""]
    if final is None:
        return "\n".join(lines + ["not run here (the `collapse_analysis` stage has not written its table)."])
    if final.empty:
        return "\n".join(lines + [f"not run here: {collapse_not_run(params)}."])
    share = params.analysis.collapse_share
    rows = []
    for setting, runs in final.groupby("setting", sort=False):
        collapsed = int((runs["top_share"] >= share).sum())
        steps = runs["collapse_step"].dropna()
        factor = params.collapse.settings[setting].factor if setting in params.collapse.settings else ""
        rows.append([setting, factor or "(see params.yaml)", f"{len(runs)}", f"{runs['steps'].max()}",
                     f"{runs['top_share'].min():.0%}–{runs['top_share'].max():.0%}", f"{collapsed} of {len(runs)}",
                     f"{int(steps.min())}" if len(steps) else "never", f"{runs['entropy'].mean():.2f}",
                     f"{runs['entropy_slope'].mean():+.2f} ± {runs['entropy_slope_error'].mean():.2f}",
                     f"{runs['position_nmi'].mean():.2f}", f"{runs['position_variance_share'].mean():.2f}",
                     f"{int(runs['constant_distance_videos'].sum())} of {int(runs['videos'].sum())}",
                     percent(runs["auc_micro"]), f"{int(runs['learnt'].sum())} of {len(runs)}"])
    lines += [f"Settings of params.yaml `collapse`, each trained with the first {params.collapse.seeds} seeds; usage "
              "over training from held-out training windows, final usage on the test set. Collapsed: the top item "
              f"takes ≥ {share:.0%} of the queries. Entropy slope: usage entropy against log10(step) over the second "
              "half of training, per decade of steps (mean over seeds ± the mean standard error). NaN heuristic: "
              "test videos whose feature-distance series is constant (0/0 in MNAD's min-max).", "",
              table(["setting", "factor changed", "seeds", "steps", "final top share", "collapsed",
                     "first collapsed step", "entropy", "entropy slope", "position NMI", "position variance share",
                     "NaN-heuristic videos", "AUC", "learnt"], rows), ""]
    lines += collapse_conclusions(final, share, params.analysis.narrowing_slope)
    links = figure_links([results.link("collapse", "", name, text) for name, text in (
        ("usage_over_training.png", "usage over training"), ("histograms.png", "final usage histograms"),
        ("nan_heuristic.png", "NaN heuristic"))])
    lines += ["", *links, "", *shanghaitech_command(params)]
    return "\n".join(lines)


def collapse_conclusions(final: pd.DataFrame, share: float, narrowing: float) -> list[str]:
    """The hypothesis, part by part, each part decided over seeds (every seed of one setting beyond every seed of
    the other; the trend over steps: every seed's entropy slope, with its 95% interval, against -`narrowing`), and
    what collapsed."""
    def values(setting: str, column: str) -> pd.Series:
        return final[final["setting"] == setting][column]

    collapsed = sorted(set(final[final["top_share"] >= share]["setting"]))
    lines = [f"- **Collapsed** (top item ≥ {share:.0%} in some seed): {', '.join(collapsed) if collapsed else 'none'}."]
    parts = []   # (what the part tests, the settings it rests on, its verdict on their numbers)
    if {"base", "recon-no-skips", "pred-no-skips"} <= set(final["setting"]):
        for other in ("recon-no-skips", "pred-no-skips"):
            parts.append((f"with skips usage is narrower than {other} (top share)", ("base", other),
                          dominance(values("base", "top_share"), values(other, "top_share"))))
            parts.append((f"with skips the item is set by position more than in {other} (NMI)", ("base", other),
                          dominance(values("base", "position_nmi"), values(other, "position_nmi"))))
    if {"base", "query-map-8x8"} <= set(final["setting"]):
        parts.append(("a larger query map narrows usage (top share 8x8 above 4x4)", ("query-map-8x8", "base"),
                      dominance(values("query-map-8x8", "top_share"), values("base", "top_share"))))
    if "base" in set(final["setting"]):
        parts.append((f"usage narrows with training steps (the base setting's usage entropy falls faster than "
                      f"{narrowing:g} nats per decade of steps: the slope's 95% interval below -{narrowing:g} in every "
                      f"seed; above it in every seed: does not hold)", ("base",),
                      narrowing_verdict(values("base", "entropy_slope"), values("base", "entropy_slope_error"),
                                        narrowing)))
    decided = []
    for text, settings, verdict in parts:   # a part that rests on a run that has not learnt decides nothing
        unlearnt = unlearnt_collapse_runs(final[final["setting"].isin(settings)])
        decided.append((text, UNDERTRAINED if unlearnt else verdict,
                        f" (not learnt: {', '.join(unlearnt)}; its numbers alone: {verdict})" if unlearnt else ""))
    lines.append("- **Hypothesis** (with skips the decoder can ignore the memory read, the memory losses then favour "
                 "input-independent queries, and interior positions share one item; the effect grows with steps and "
                 "the query map's size, with skips and not without): " + "; ".join(
                     f"{text} → {verdict}{why}" for text, verdict, why in decided)
                 + f". Overall: **{combine([verdict for _, verdict, _ in decided])}**.")
    if not collapsed:
        base = final[final["setting"] == "base"]
        lines.append(f"- Nothing collapsed within the budget. The largest regime tried: {int(final['steps'].max())} "
                     f"steps, query maps up to 8x8; the base setting's entropy slope is "
                     f"{base['entropy_slope'].mean():+.3f} ± {base['entropy_slope_error'].mean():.3f} nats per decade "
                     "of steps (mean ± standard error).")
    return lines


def narrowing_verdict(slopes: pd.Series, errors: pd.Series, narrowing: float) -> str:
    """Holds when every seed's entropy slope is below -`narrowing` with its 95% interval; does not hold when every
    seed's is above it; inconclusive otherwise (or without a fitted slope). A slope of rounding noise around 0 (usage
    fixed early) does not hold."""
    slopes, errors = slopes.to_numpy(dtype=float), errors.to_numpy(dtype=float)
    if len(slopes) == 0 or np.isnan(slopes).any() or np.isnan(errors).any():
        return INCONCLUSIVE
    if (slopes + 1.96 * errors < -narrowing).all():
        return HOLDS
    if (slopes - 1.96 * errors > -narrowing).all():
        return DOES_NOT_HOLD
    return INCONCLUSIVE


def shanghaitech_command(params: Params) -> list[str]:
    """The command that runs the collapse study's settings on ShanghaiTech at the papers' settings, and its GPU
    hours at a stated rate. Settings on another dataset than base's vary the data itself (frame size, scenes),
    which a real dataset fixes: they are dropped."""
    dataset = params.dataset("shanghaitech")
    profile = dataset.profile
    settings = params.collapse.settings
    base_dataset = settings["base"].dataset if "base" in settings else None
    fixed = {name for name, setting in settings.items() if setting.dataset != base_dataset}
    kept = [name for name in params.collapse.settings if name not in fixed]
    steps_per_epoch = 274_515 // profile.batch_size          # every training frame, MNAD's epochs
    samples = profile.epochs * steps_per_epoch * profile.batch_size
    runs = len(kept) * params.collapse.seeds
    hours = samples / GPU_SAMPLES_PER_SECOND / 3600
    overrides = ["collapse.datasets=[shanghaitech]", *(f"collapse.settings.{name}.dataset=shanghaitech"
                                                       for name in kept),
                 *(f"~collapse.settings.{name}" for name in params.collapse.settings if name in fixed)]
    return ["The same study on ShanghaiTech at the papers' settings (256 px BGR, full width, batch "
            f"{profile.batch_size}, {profile.epochs} epochs: about {profile.epochs * steps_per_epoch:,} steps a run) "
            "on a GPU, after placing its archive (docs/datasets.md):", "",
            "```bash", "dvc exp run " + " ".join(f"-S '{o}'" for o in overrides), "```", "",
            f"At an assumed {GPU_SAMPLES_PER_SECOND:g} training samples per second on one H100/H200-class GPU (fp32; "
            f"no GPU was lent to measure it), one run takes about {hours:.0f} GPU hours and its {runs} runs "
            f"({len(kept)} settings x {params.collapse.seeds} seeds) about {hours * runs:.0f}."]


def runs_section(results: Results) -> str:
    """Every trained run's learning gate and test-time update."""
    lines = ["## Runs: learning gate and test-time update", "",
             "Plateau: the share of the training loss's fall that came in the last share of the logged steps. "
             "Floor: the trivial output's PSNR on the normal test frames. Updated frames: test frames whose point "
             "score passed the threshold and wrote into the memory (0: the update was not exercised).", ""]
    for dataset in results.params.study.all_datasets:
        rows = []
        for variant, runs in results.metrics.get(dataset, {}).items():
            for seed, m in runs:
                if "gate" not in m:
                    continue
                gate, update = m["gate"], m.get("update_threshold")
                rows.append([f"`{variant}`", str(seed), str(m.get("training", {}).get("steps", "—")),
                             f"{100 * gate['late_improvement']:.1f}% "
                             f"({'plateaued' if gate['plateaued'] else 'still falling'})",
                             f"{gate['normal_psnr']:.2f} vs {gate['floor_psnr']:.2f} ({gate['floor']})",
                             "**yes**" if gate["learnt"] else "**no**",
                             f"{update['value']:.4g} ({update['mode']})" if update else "—",
                             str(m["with_update"]["updated_frames"]) if "with_update" in m else "—"])
        if rows:
            lines += [f"### {dataset}", "", table(["variant", "seed", "steps", "loss plateau", "normal-frame PSNR vs "
                                                  "floor (dB)", "learnt", "update threshold", "updated frames"], rows),
                      ""]
    return "\n".join(lines)


def results_section(results: Results, designs: dict[str, list[tuple[str, str]]]) -> str:
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
        lines += per_type_lines(results, dataset, designs.get(dataset, []))
        links = figure_links([results.link("timelines", dataset, "roc.png", "ROC curves"),
                        results.link("timelines", dataset, "timelines.png", "score timelines"),
                        results.link("anomaly_types", dataset, "per_type_auc.png", "AUC per anomaly type")])
        lines += [links[0], ""] if links else []
    return "\n".join(lines)


# What a synthetic set is built to show, as mean AUC over seeds on one anomaly type: (the models, which variants
# are such a model, the type, the least mean AUC). The issue that sized the default study set these bars.
SET_DESIGN = (("a reconstruction model", lambda v: v.task == "reconstruct" and v.family == "mnad", "spatial", 0.90),
              ("a prediction model", lambda v: v.task == "predict" and v.family == "mnad", "temporal", 0.90),
              ("MemAE", lambda v: v.family == "memae", "spatial", 0.75))


def per_type_aucs(results: Results, dataset: str) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per set of normal frames (NORMAL_SETS: analysis.anomaly_types), variant and anomaly type, the seeds' AUCs
    under the headline scoring; empty when not analysed."""
    frame = results.analysis_table("anomaly_types", dataset, "per_type_auc.csv")
    if frame is None or frame.empty:
        return {}
    frame = frame[frame["headline"].astype(bool)]
    return {normal: {variant: {kind: rows["auc"].tolist() for kind, rows in group.groupby("anomaly_type", sort=False)}
                     for variant, group in frame[frame["normal"] == normal].groupby("variant", sort=False)}
            for normal in NORMAL_SETS}


def design_checks(results: Results, dataset: str) -> list[tuple[str, str]]:
    """Whether the set shows what it is built for (SET_DESIGN), per kind of model, against clean normal frames (what
    the model sees in the type itself): (the best variant against its bar, and for a bar not met that variant's
    best probe, or "")."""
    by_variant, checks = per_type_aucs(results, dataset).get("clean", {}), []
    for models, is_model, kind, bar in SET_DESIGN:
        means = {v: np.mean(aucs[kind]) for v, aucs in by_variant.items()
                 if kind in aucs and is_model(results.params.variant(v))}
        if means:
            best = max(means, key=means.get)
            met = means[best] >= bar
            checks.append((f"{models} ≥ {100 * bar:.0f} on {kind}: best `{best}` {100 * means[best]:.1f} → "
                           + ("met" if met else "**not met**"),
                           "" if met else best_probe(results, dataset, best, kind)))
    return checks


def per_type_lines(results: Results, dataset: str, checks: list[tuple[str, str]]) -> list[str]:
    """AUC per anomaly type (headline scoring, mean ± std over seeds) against all and against clean normal frames,
    and the set's design checks (design_checks)."""
    by_set = per_type_aucs(results, dataset)
    if not by_set.get("all"):
        return []
    types = list(dict.fromkeys(kind for aucs in by_set["all"].values() for kind in aucs))
    rows = [[f"`{variant}`", *(percent(by_set[normal].get(variant, {}).get(kind, []))
                               for normal in NORMAL_SETS for kind in types)] for variant in by_set["all"]]
    return ["AUC per anomaly type (headline scoring), mean ± std over seeds, against all normal frames and against "
            "clean ones (Protocol). A window-level score spreads an event's error over the normal frames whose window "
            "overlaps it (MemAE's 16-frame clip, a prediction's 4 inputs), so against all normal frames a type is "
            "ranked partly against other types' events.", "",
            table(["variant", *(f"{kind.replace('_', '-')}, {normal}" for normal in NORMAL_SETS for kind in types)],
                  rows), "",
            *([f"What the set is built to show: {'; '.join(check + probe for check, probe in checks)}.", ""]
              if checks else [])]


def best_probe(results: Results, dataset: str, variant: str, kind: str) -> str:
    """", of N probes of `variant` (the learning-curve table) the best on `kind`: ..."; empty without probes."""
    curve = results.learning_curve
    if curve is None:
        return ""
    column = clean_auc_column(kind)
    probes = curve[(curve["dataset"] == dataset) & curve["probe"].astype(bool)
                   & curve["variant"].map(lambda label: split_label(label).name == variant) & curve[column].notna()]
    if probes.empty:
        return ""
    best = probes.loc[probes[column].idxmax()]
    return (f"; of its {len(probes)} probes (one suspect each, under Training budget) the best on {kind} is "
            f"`{best['variant']}` with {100 * best[column]:.1f}")


def _reported(numbers: dict, variant: str, dataset: str) -> str:
    return f"{numbers[variant, dataset]}" if (variant, dataset) in numbers else "—"


def claims_section(results: Results, assessed: dict[str, dict[str, Assessment]]) -> str:
    rows = []
    for claim in CLAIMS:
        evidence, verdicts, not_run = [], [], {}
        for dataset, assessment in assessed[claim.id].items():
            if not results.ran(dataset) and dataset != COLLAPSE_STUDY:
                in_study = dataset in results.params.study.all_datasets
                reason = "no evaluated runs" if in_study else "not in this study"
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


def training_devices(results: Results) -> pd.DataFrame:
    """How many of the study's trained runs (the collapse study's too) trained where: device, processes (torchrun
    ranks), torch threads."""
    params = results.params
    paths = [run.path / "checkpoint.pt" for dataset in params.study.all_datasets
             for run in existing_runs(params, dataset, results.runs_root, needs=("checkpoint.pt",))]
    paths += [run_dir(setting.dataset, setting.variant, seed, results.runs_root) / "checkpoint.pt"
              for setting in params.collapse.settings.values()
              for seed in params.collapse_seeds]
    rows = []
    for path in paths:
        if path.exists():
            state = load_checkpoint(path)
            threads = state["config"]["profile"].get("threads", 0)
            rows.append({"device": state.get("device", "?"), "processes": state.get("world_size", 1),
                         "torch threads": "torch's default" if not threads else threads})
    if not rows:
        return pd.DataFrame(columns=["device", "processes", "torch threads", "runs"])
    table = pd.DataFrame(rows).astype(str)
    return table.groupby(list(table.columns)).size().reset_index(name="runs")


def reproducibility_section(results: Results) -> str:
    versions = [list(pair) for pair in tracking.package_versions().items()]
    devices = training_devices(results)
    return "\n".join([
        "## Reproducibility: versions, devices, and what differs on a GPU", "",
        f"Every stage of one `dvc repro` runs in the environment that wrote this report: Python "
        f"{platform.python_version()} on {platform.system()} {platform.machine()} ({cpu_model()}); CPU kernels: "
        f"{cpu_kernels()}.", "",
        table(["package", "version"], versions), "",
        "Where the runs trained (from their checkpoints):", "",
        table(list(devices.columns), devices.astype(str).values.tolist()) if len(devices) else "no trained run.", "",
        "- **On CPU** the same params, package versions and torch thread count (`profile.threads`, part of a run's "
        "fingerprint) give byte-identical checkpoints, scores.csv and metrics.json, also after a resume "
        "(tests/test_train_evaluate.py, tests/test_interruptions.py). The frames are byte-identical on any machine "
        "(prepare seals them with a digest per file). Across x86-64 CPUs this holds because the CPU kernels of "
        "torch and numpy are pinned to AVX2 (pipeline/__init__.py; `MEMVAD_CPU_KERNELS=native` lifts the pin): left "
        "to choose, they use AVX-512 where the CPU has it, which sums in another order, and the same run then "
        "differs from the third digit of its loss on. Pinned, a `dvc repro` from a fresh clone on an AVX-512 "
        "machine wrote every metrics.json, table, figure and verdict of the AVX2 machines' study byte for byte.",
        "- **On a GPU** the numbers are expected to differ from these: cuDNN's and cuBLAS's kernels sum in another "
        "order than the CPU's, so the weights differ in the last bits from the first step, and Adam enlarges such "
        "differences where a gradient is nearly zero (a convolution's bias before BatchNorm has none). By how much the "
        "AUCs move is not measured here (no GPU was lent); a difference of the same kind on CPU, one torch thread "
        "against two, moved seed 0 of synthetic mnad-pred from 0.852 to 0.864 micro AUC, inside the spread between "
        "seeds. A CUDA run repeats itself on the same GPU model, driver and "
        "versions (deterministic cuDNN algorithms, TF32 off: pipeline/device.py).",
        "- **Several processes** (params.yaml `launcher: torchrun`) train a run within float tolerance of one "
        "process with the same global batch (averaged gradients, BatchNorm over the global batch, MNAD's memory "
        "updated from every rank's queries: tests/test_distributed.py), for the same reason not bit for bit; a "
        "thread count other than the profile's, or `precision: bf16`, changes numbers the same way.",
        "- **Unchanged anywhere**: the evaluation protocol, the seeded bootstrap given the same scores, and every "
        "verdict rule.",
    ])


def write_report(params: Params, runs_root: Path | None = None, analysis_root: Path | None = None,
                 report_path: Path | None = None) -> str:
    report_path = report_path or REPORT_PATH
    results = Results(params, runs_root, analysis_root or ANALYSIS_DIR, report_path.parent)
    assessed = assess_all(results)
    designs = {dataset: design_checks(results, dataset) for dataset in params.study.all_datasets}
    text = "\n\n".join([
        "# memvad reproducibility report",
        "_Written by `python -m analysis.report` (the `report` stage of `dvc repro`) from runs/**/metrics.json and "
        "analysis/tables/; do not edit by hand. Every number below was computed by this study's runs; what did not "
        "run says \"not run here\"._",
        summary_section(results, assessed, designs),
        protocol_section(results),
        budget_section(results),
        runs_section(results),
        results_section(results, designs),
        claims_section(results, assessed),
        collapse_section(results),
        comparisons_section(results),
        reproducibility_section(results),
    ]) + "\n"
    write_text(report_path, text)
    return text


@exit_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="write REPORT.md from the metrics files and analysis tables")
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    write_report(params)
    print(f"wrote {REPORT_PATH}; curve tables for dvc plots: {write_plot_data(params)}")
    # the report closes each dataset's MLflow study run, the collapse study's datasets' (which hold its figures) too
    for dataset in [*params.study.all_datasets, *params.collapse.datasets]:
        study = tracking.study_run(dataset)
        study.log_artifact(REPORT_PATH)
        study.finish()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
