"""The report stage on crafted metrics files and analysis tables: table rows, verdicts, and "not run here"."""
import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import comparisons
from analysis.report import write_report
from pipeline.config import DEFAULT_PARAMS, load_params
from pipeline.metrics import roc_points, summarise
from pipeline.paths import run_dir

VARIANTS = ["ae-pred", "mnad-recon", "mnad-pred", "mnad-pred-nosep", "mnad-pred-uniform"]
SEEDS = [0, 1]
# Normal frames score this much higher than abnormal ones (noise sd 1): mnad-pred clearly beats ae-pred and
# mnad-recon; the uniform variant is clearly worse than mnad-pred.
SEPARATION = {"ae-pred": 0.2, "mnad-recon": 0.6, "mnad-pred": 2.5, "mnad-pred-nosep": 2.0,
              "mnad-pred-uniform": 0.2, "copy-last": 0.4}
RAN = ["tiny", "synthetic-scenes"]


# The learning gate's verdict per run: everything learnt except ae-pred's seed 1 on synthetic-scenes.
NOT_LEARNT = {("synthetic-scenes", "ae-pred", 1)}
# Frames that updated the memory per memory run: none at all on synthetic-scenes (the update not exercised there).
UPDATED_FRAMES = {"tiny": 12, "synthetic-scenes": 0}


def crafted_run(runs_root, dataset, variant, seed, memory):
    """scores.csv / metrics.json / roc.csv as the run stage writes them, for 8 videos of 60 frames."""
    rng = np.random.default_rng(100 * seed + len(variant))
    videos = np.repeat([f"{v:02d}" for v in range(8)], 60)
    frame = np.tile(np.arange(60), 8)
    labels = ((frame % 20) >= 14).astype(int)
    types = np.where(labels == 1, np.array(["spatial", "temporal", "spatio_temporal"])[(frame // 20) % 3], "")
    score = rng.normal(0, 1, len(labels)) + SEPARATION[variant] * (1 - labels)
    scores = pd.DataFrame({"video": videos, "frame": frame, "label": labels, "anomaly_type": types,
                           "psnr": 30 + score, "score": score})
    metrics = {"frames": len(scores), "videos": 8,
               "without_update": {**summarise(scores, "score", 0), "mean_psnr": float(scores["psnr"].mean())}}
    if memory:  # the test-time update changes nothing here: C3 must come out inconclusive
        scores["distance"] = -score
        scores["psnr_update"], scores["distance_update"], scores["score_update"] = scores["psnr"], -score, score
        metrics["with_update"] = {**summarise(scores, "score_update", 1), "mean_psnr": float(scores["psnr"].mean()),
                                  "updated_frames": UPDATED_FRAMES[dataset]}
        metrics["update_threshold"] = {"mode": "calibrated", "value": 0.02}
    metrics["headline"] = "with_update" if memory else "without_update"
    if variant != "copy-last":
        learnt = (dataset, variant, seed) not in NOT_LEARNT
        metrics["gate"] = {"plateaued": learnt, "late_improvement": 0.01 if learnt else 0.3, "normal_psnr": 25.0,
                           "floor": "copy-last", "floor_psnr": 20.0, "beats_floor": True, "learnt": learnt}
        metrics["training"] = {"steps": 500, "epochs": 2}
    out = run_dir(dataset, variant, seed, runs_root)
    out.mkdir(parents=True)
    scores.to_csv(out / "scores.csv", index=False)
    roc_points(labels, score).to_csv(out / "roc.csv", index=False)
    (out / "metrics.json").write_text(json.dumps(metrics))


def write_table(root, topic, dataset, name, rows):
    path = root / "tables" / topic / dataset / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["study"] = {"datasets": [*RAN, "synthetic"], "variants": VARIANTS, "complex_datasets": [],
                    "complex_variants": [], "seeds": SEEDS}  # synthetic: no runs
    raw["analysis"]["bootstrap_samples"] = 300
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(root / "params.yaml")
    runs_root, analysis_root = root / "runs", root / "analysis"
    for dataset in RAN:
        for variant in VARIANTS:
            for seed in SEEDS:
                crafted_run(runs_root, dataset, variant, seed, params.variant(variant).has_memory)
        crafted_run(runs_root, dataset, "copy-last", 0, memory=False)
        comparisons.compare(dataset, params, runs_root, analysis_root)
    # synthetic-scenes: every plain MNAD memory collapsed; a stale row of a seed outside the study must be ignored
    write_table(analysis_root, "memory_usage", "synthetic-scenes", "usage.csv", [
        {"dataset": "synthetic-scenes", "variant": v, "seed": s, "split": "test", "queries": 100, "items": 10,
         "entropy": 0.0 if v != "mnad-pred-uniform" else 2.2, "perplexity": 1.0 if v != "mnad-pred-uniform" else 9.0,
         "items_used": 1, "top_share": 1.0, "collapsed": int(v != "mnad-pred-uniform"),
         "position_nmi": np.nan if v != "mnad-pred-uniform" else 0.95, "position_variance_share": 0.5,
         "max_entropy": np.log(10), "top_item": 3}
        for v in ("mnad-recon", "mnad-pred", "mnad-pred-nosep", "mnad-pred-uniform") for s in SEEDS]
        + [{"dataset": "synthetic-scenes", "variant": "mnad-pred", "seed": 7, "split": "test", "queries": 100,
            "items": 10, "entropy": 2.3, "perplexity": 10.0, "items_used": 10, "top_share": 0.1, "collapsed": 0,
            "position_nmi": 0.1, "position_variance_share": 0.1, "max_entropy": np.log(10), "top_item": 3}])
    # tiny: nothing collapsed; mnad-pred's items are set by query position, the others' by content
    write_table(analysis_root, "memory_usage", "tiny", "usage.csv", [
        {"dataset": "tiny", "variant": v, "seed": s, "split": "test", "queries": 100, "items": 10, "entropy": 1.5,
         "perplexity": 4.5 if v != "mnad-pred-uniform" else 8.0, "items_used": 8, "top_share": 0.3, "collapsed": 0,
         "position_nmi": 1.0 if v == "mnad-pred" else 0.2, "position_variance_share": 0.9 if v == "mnad-pred" else 0.1,
         "max_entropy": np.log(10), "top_item": 1}
        for v in ("mnad-recon", "mnad-pred", "mnad-pred-nosep", "mnad-pred-uniform") for s in SEEDS])
    write_table(analysis_root, "tsne", "tiny", "silhouette.csv", [
        {"dataset": "tiny", "variant": v, "seed": s, "queries": 100, "items_used": 10, "silhouette": value + 0.01 * s}
        for v, value in (("mnad-pred", 0.4), ("mnad-pred-nosep", 0.1)) for s in SEEDS])
    # C4: with skips the output stays near the normal one and loses no AUC, except that a fill of ones moves it as
    # far as without skips (so that fill's comparison is inconclusive); without skips every fill costs AUC
    def replaced(skips, part, fill):
        if part == "none":
            return {"auc_psnr": 0.9, "psnr_to_normal": np.nan}
        if skips:
            return {"auc_psnr": 0.9, "psnr_to_normal": 12.0 if fill == "ones" else 38.0}
        return {"auc_psnr": 0.6, "psnr_to_normal": 12.0}
    write_table(analysis_root, "replacement", "tiny", "replacement.csv", [
        {"dataset": "tiny", "variant": v, "seed": s, "skips": skips, "task": "predict", "part": part, "fill": fill,
         "auc_score": 0.9, "psnr_to_target": 25.0, **replaced(skips, part, fill)}
        for v, skips in (("mnad-pred", True), ("mnad-recon", False)) for s in SEEDS
        for part, fill in [("none", "none"), ("query", "zeros"), *(("both", f) for f in ("zeros", "ones", "random"))]])
    path = root / "REPORT.md"
    text = write_report(params, runs_root, analysis_root, path)
    return {"text": text, "path": path, "root": root}


def claim_cells(text, claim):
    row = next(line for line in text.splitlines() if line.startswith(f"| {claim} |"))
    cells = [cell.strip() for cell in row.strip("|").split(" | ")]
    return cells[3], cells[4]  # evidence, verdict


def test_the_report_is_written_to_its_path(report):
    assert report["path"].read_text() == report["text"]
    assert not list(report["root"].glob(".REPORT.md.*"))  # no temporary file left behind


def test_results_tables_carry_every_variant_and_the_copy_last_floor(report):
    text = report["text"]
    for dataset in RAN:
        section = text.split("## Results")[1].split(f"### {dataset}\n")[1].split("###")[0]
        for variant in [*VARIANTS, "copy-last"]:
            assert re.search(rf"^\| `{variant}` \| {1 if variant == 'copy-last' else 2} \| \d", section, re.M), variant
        pred_row = next(line for line in section.splitlines() if line.startswith("| `mnad-pred` |"))
        assert " ± " in pred_row and "0 / 2" in pred_row  # 2 seeds x 1 degenerate video with update
    assert "| `ae-recon` |" not in text  # not in this study


def test_datasets_that_did_not_run_are_marked_not_run(report):
    text = report["text"]
    assert "not run here: no evaluated run of synthetic was found" in text
    assert "not run here: ped2 is not in this study" in text
    assert "`mnad-pred` 97.0" in text and "`mnad-pred` 96.34 (RC2020)" in text  # reported numbers beside it
    _, verdict = claim_cells(text, "C1")
    assert "ped2, avenue, shanghaitech: not run here" in verdict and "synthetic: not run here" in verdict


def test_verdicts_follow_the_bootstrap_intervals(report):
    text = report["text"]
    evidence, verdict = claim_cells(text, "C1")
    assert "tiny: **holds**" in verdict
    assert "`mnad-recon − ae-recon`: not run here (ae-recon not in this study)" in evidence
    assert re.search(r"`mnad-pred − ae-pred`: \+\d+\.\d pts, 95% CI \[\+\d+\.\d, \+\d+\.\d\]", evidence)
    assert "tiny: **holds**" in claim_cells(text, "C2")[1]
    assert "tiny: inconclusive" in claim_cells(text, "C3")[1]  # the update fired but changed nothing
    assert "[differences](analysis/figures/comparisons/tiny/differences.png)" in evidence


def test_a_run_that_has_not_learnt_decides_nothing_and_is_named(report):
    evidence, verdict = claim_cells(report["text"], "C1")
    assert "synthetic-scenes: undertrained" in verdict   # mnad-pred beats ae-pred there too, but ae-pred s1 failed
    assert "→ undertrained; not learnt: ae-pred s1" in evidence
    assert "- **Learning gate, synthetic-scenes**: 9 of 10 trained runs learnt; not learnt: ae-pred s1." in \
        report["text"]
    runs = report["text"].split("## Runs: learning gate")[1].split("## Results")[0]
    assert re.search(r"\| `ae-pred` \| 1 \| 500 \| 30\.0% \(still falling\) \| 25\.00 vs 20\.00 \(copy-last\) \| "
                     r"\*\*no\*\* \|", runs)


def test_an_update_that_never_fired_is_not_exercised(report):
    evidence, verdict = claim_cells(report["text"], "C3")
    assert "synthetic-scenes: not exercised" in verdict
    assert "no frame updated the memory: mnad-pred" in evidence


def test_the_uniform_loss_claim_needs_a_collapse(report):
    evidence, verdict = claim_cells(report["text"], "C6")
    assert "tiny: not applicable: no collapse" in verdict and "mnad-pred did not collapse here" in evidence
    assert "synthetic-scenes: **does not hold**" in verdict   # it collapsed; the uniform variant is clearly worse
    assert "mnad-pred 1.00 ± 0.00 (2 of 2 position-coded)" in claim_cells(report["text"], "C9")[0]


def test_verdicts_from_the_analysis_tables(report):
    text = report["text"]
    evidence, verdict = claim_cells(text, "C5")
    assert "synthetic-scenes: **holds**" in verdict and "6 of 6 runs collapsed" in evidence  # seed 7 ignored
    assert "tiny: 0 of 6 runs collapsed" in evidence.replace("*", "") and "simple data: shown for contrast" in evidence
    assert "tiny: **holds**" in claim_cells(text, "C9")[1]
    assert "synthetic-scenes: not run here" in claim_cells(text, "C9")[1]
    evidence, verdict = claim_cells(text, "C4")
    assert "tiny: inconclusive" in verdict   # zeros and random hold; ones moves the skip output as far as without
    assert "**zeros**: mnad-pred vs mnad-recon: PSNR to normal 38.0 ± 0.0 vs 12.0 ± 0.0 dB → holds; AUC drop " \
           "0.0 ± 0.0 vs 30.0 ± 0.0 pts → holds" in evidence
    assert "**ones**: mnad-pred vs mnad-recon: PSNR to normal 12.0 ± 0.0 vs 12.0 ± 0.0 dB → inconclusive" in evidence
    # C7 is about anomaly types, recorded by synthetic data only: the real datasets are not listed
    assert "ped2" not in claim_cells(text, "C7")[1]


def test_the_protocol_names_the_options_used(report):
    text = report["text"]
    assert "`evaluate.nan_policy`: safe" in text and "`update_norm`: official" in text
    assert re.search(r"\| mnad-pred \| predict \| mnad \| yes \| 0\.6·g\(PSNR\) .* \| 4 / 0 \|", text)
    assert "300 resamples, seed 0" in text


def test_a_study_with_no_runs_claims_nothing(tmp_path):
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["study"]["datasets"] = ["tiny"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    text = write_report(load_params(tmp_path / "params.yaml"), tmp_path / "runs", tmp_path / "analysis",
                        tmp_path / "REPORT.md")
    claims = text.split("## Claims")[1].split("## Paired")[0]
    assert "holds" not in claims and "inconclusive" not in claims
    assert claims.count("not run here") >= 10
    assert "0 of 31 evaluated runs found" in text


def test_the_learning_curve_table_names_each_rows_dataset_seed_and_whether_it_is_a_probe(tmp_path):
    from analysis.report import learning_curve_table
    from analysis.results import read_learning_curve
    row = {"steps": 248, "train_seconds": 39.6, "late_improvement": 0.0562, "normal_psnr": 21.62, "floor_psnr": 15.8,
           "auc_micro": 0.8014, "auc_spatial": 0.2, "auc_temporal": 0.2, "auc_spatio_temporal": 0.2,
           "clean_auc_spatial": 0.56, "clean_auc_temporal": 0.914, "clean_auc_spatio_temporal": 0.9186}
    pd.DataFrame([{"dataset": "synthetic", "variant": "memae", "probe": False, "seed": 0, "epochs": 4,
                   "zero_rows": 0.25, "learnt": True, **row},
                  {"dataset": "synthetic-scenes", "variant": "mnad-pred@lr=0.001", "probe": True, "seed": 2,
                   "epochs": 4, "zero_rows": np.nan, "learnt": False, **row}]).to_csv(tmp_path / "curve.csv")
    lines = learning_curve_table(read_learning_curve(tmp_path / "curve.csv")).splitlines()
    assert lines[0].startswith("| dataset | variant | seed | epochs |")
    assert lines[2:] == [
        "| synthetic | `memae` | 0 | 4 | 248 | 40 | 5.6% | 21.6 / 15.8 | yes | 80.1 | 56.0 | 91.4 | 91.9 | 25% |",
        "| synthetic-scenes | `mnad-pred@lr=0.001` (probe) | 2 | 4 | 248 | 40 | 5.6% | 21.6 / 15.8 | no | 80.1 | 56.0 "
        "| 91.4 | 91.9 | — |"]
    # a table written before the clean per-type AUCs were recorded shows them as missing
    pd.read_csv(tmp_path / "curve.csv").drop(columns=[c for c in row if c.startswith("clean_")]).to_csv(
        tmp_path / "old.csv", index=False)
    assert learning_curve_table(read_learning_curve(tmp_path / "old.csv")).splitlines()[2].endswith("| yes | 80.1 | — | — | — | 25% |")


def test_the_per_type_table_checks_the_sets_design_bars_and_names_memaes_best_probe(tmp_path):
    from analysis.report import design_checks, per_type_lines
    from analysis.results import Results

    aucs = {"mnad-recon": {"spatial": (0.95, 0.97), "temporal": (0.55, 0.57)},
            "mnad-pred": {"spatial": (0.60, 0.62), "temporal": (0.92, 0.94)},
            "memae": {"spatial": (0.40, 0.46), "temporal": (0.85, 0.85)}}
    # against clean normal frames: MemAE's spatial AUC rises (its clips overlap the fast events), the others' stay
    clean = {**aucs, "memae": {"spatial": (0.55, 0.61), "temporal": (0.87, 0.87)}}
    rows = [{"dataset": "synthetic", "variant": v, "seed": seed, "scoring": "s", "headline": headline,
             "normal": normal, "anomaly_type": kind, "auc": pair[seed] if headline else 0.0}
            for normal, table in (("all", aucs), ("clean", clean))
            for v, kinds in table.items() for kind, pair in kinds.items() for seed in (0, 1)
            for headline in (True, False)]
    (tmp_path / "tables" / "anomaly_types" / "synthetic").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(tmp_path / "tables" / "anomaly_types" / "synthetic" / "per_type_auc.csv", index=False)
    (tmp_path / "tables" / "budget").mkdir(parents=True)
    # the best probe is chosen on clean normal frames too (memae:x=1 is the better one against all)
    pd.DataFrame([{"dataset": "synthetic", "variant": "memae", "probe": False, "clean_auc_spatial": 0.9},
                  {"dataset": "synthetic", "variant": "memae:x=1", "probe": True, "auc_spatial": 0.6,
                   "clean_auc_spatial": 0.5},
                  {"dataset": "synthetic", "variant": "memae#normal_speed=1.25", "probe": True, "auc_spatial": 0.5,
                   "clean_auc_spatial": 0.56},
                  {"dataset": "synthetic", "variant": "mnad-pred@lr=1", "probe": True, "clean_auc_spatial": 0.99},
                  {"dataset": "synthetic-scenes", "variant": "memae:y=2", "probe": True, "clean_auc_spatial": 0.98},
                  {"dataset": "synthetic", "variant": "memae:z=3", "probe": True, "auc_spatial": 0.9}]  # no clean
                 ).to_csv(tmp_path / "tables" / "budget" / "learning_curve.csv", index=False)
    results = Results(load_params(None), None, tmp_path, tmp_path)
    checks = design_checks(results, "synthetic")
    lines = "\n".join(per_type_lines(results, "synthetic", checks)).splitlines()
    assert lines[0].startswith("AUC per anomaly type (headline scoring), mean ± std over seeds, against all")
    assert lines[2:7] == [
        "| variant | spatial, all | temporal, all | spatial, clean | temporal, clean |", "|---|---|---|---|---|",
        "| `mnad-recon` | 96.0 ± 1.4 | 56.0 ± 1.4 | 96.0 ± 1.4 | 56.0 ± 1.4 |",
        "| `mnad-pred` | 61.0 ± 1.4 | 93.0 ± 1.4 | 61.0 ± 1.4 | 93.0 ± 1.4 |",
        "| `memae` | 43.0 ± 4.2 | 85.0 ± 0.0 | 58.0 ± 4.2 | 87.0 ± 0.0 |"]
    assert lines[8] == (
        "What the set is built to show: a reconstruction model ≥ 90 on spatial: best `mnad-recon` 96.0 → met; a "
        "prediction model ≥ 90 on temporal: best `mnad-pred` 93.0 → met; MemAE ≥ 75 on spatial: best `memae` 58.0 "
        "→ **not met**; of its 2 probes (one suspect each, under Training budget) the best on spatial is "
        "`memae#normal_speed=1.25` with 56.0.")
    from analysis.report import summary_section
    summary = summary_section(results, {}, {"synthetic": checks}).splitlines()
    assert ("- **What synthetic is built to show** (AUC per anomaly type against clean normal frames, mean over "
            "seeds): a reconstruction model ≥ 90 on spatial: best `mnad-recon` 96.0 → met; a prediction model ≥ 90 "
            "on temporal: best `mnad-pred` 93.0 → met; MemAE ≥ 75 on spatial: best `memae` 58.0 → **not met**.") \
        in summary


def test_usage_narrows_with_steps_only_when_every_seeds_entropy_slope_is_steeper_than_the_stated_rate():
    from analysis.bootstrap import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE
    from analysis.report import narrowing_verdict

    def verdict(slopes, errors):
        return narrowing_verdict(pd.Series(slopes), pd.Series(errors), 0.05)
    # usage fixed early: the fitted slope is rounding noise around 0, which is no narrowing
    assert verdict([-3.2e-16, -2.5e-15], [8.5e-16, 1.9e-15]) == DOES_NOT_HOLD
    assert verdict([-0.30, -0.20], [0.02, 0.05]) == HOLDS            # upper ends -0.26 and -0.10
    assert verdict([-0.30, -0.06], [0.02, 0.02]) == INCONCLUSIVE     # the second's interval straddles -0.05
    assert verdict([-0.30, -0.01], [0.02, 0.01]) == INCONCLUSIVE     # the seeds disagree
    assert verdict([-0.30, np.nan], [0.02, np.nan]) == INCONCLUSIVE


def _collapse_final(rows):
    columns = ["setting", "seed", "steps", "learnt", "top_share", "position_nmi", "entropy_slope",
               "entropy_slope_error"]
    return pd.DataFrame([dict(zip(columns, row)) for row in rows])


def test_a_hypothesis_part_or_collapse_verdict_resting_on_an_unlearnt_run_decides_nothing():
    from analysis.report import collapse_conclusions

    final = _collapse_final([("base", 0, 2688, True, 0.44, 1.0, -0.3, 0.01),
                             ("base", 1, 2688, True, 0.19, 1.0, -0.2, 0.01),
                             ("query-map-8x8", 0, 2688, True, 0.75, 1.0, 0.0, 0.0),
                             ("query-map-8x8", 1, 2688, False, 0.56, 0.6, 0.0, 0.0)])
    hypothesis = collapse_conclusions(final, 0.9, 0.05)[1]
    assert ("a larger query map narrows usage (top share 8x8 above 4x4) → undertrained (not learnt: query-map-8x8 s1;"
            " its numbers alone: holds)") in hypothesis
    assert "usage narrows with training steps" in hypothesis and "does not hold) → holds" in hypothesis
    assert hypothesis.endswith("Overall: **undertrained**.")
    flat = final.assign(entropy_slope=[-3e-16, -2e-15, 0.0, 0.0], entropy_slope_error=[1e-15, 2e-15, 0.0, 0.0])
    # a part that does not hold on learnt runs decides the conjunction, whatever waits on the unlearnt run
    assert collapse_conclusions(flat, 0.9, 0.05)[1].endswith("does not hold) → does not hold. Overall: **does not "
                                                              "hold**.")


def test_the_collapse_studys_c5_verdict_counts_collapses_of_learnt_runs_only(tmp_path):
    from analysis.claims import assess_collapse_study
    from analysis.results import Results

    (tmp_path / "tables" / "collapse").mkdir(parents=True)
    final = _collapse_final([("base", 0, 2688, True, 0.44, 1.0, 0.0, 0.0), ("base", 1, 2688, True, 0.19, 1.0, 0.0, 0.0),
                             ("one-scene", 0, 2688, False, 0.95, 1.0, 0.0, 0.0)])
    final.to_csv(tmp_path / "tables" / "collapse" / "final.csv", index=False)
    assessment = assess_collapse_study(Results(load_params(None), None, tmp_path, tmp_path))
    assert assessment.verdict == "does not hold"
    assert ("settings that collapsed in a learnt run: none (not learnt, so deciding nothing: one-scene s0)"
            in assessment.lines)
    final.loc[2, "learnt"] = True   # the same collapse in a learnt run: neither holds (base did not) nor does not
    final.to_csv(tmp_path / "tables" / "collapse" / "final.csv", index=False)
    assert assess_collapse_study(Results(load_params(None), None, tmp_path, tmp_path)).verdict == "inconclusive"


def test_a_claim_of_several_parts_fails_on_any_part_that_does_not_hold_before_it_waits_on_an_undertrained_one():
    from analysis.bootstrap import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, NOT_EXERCISED, NOT_RUN, UNDERTRAINED
    from analysis.claims import NOT_APPLICABLE, combine

    assert combine([HOLDS, UNDERTRAINED, DOES_NOT_HOLD]) == DOES_NOT_HOLD
    assert combine([HOLDS, UNDERTRAINED, INCONCLUSIVE]) == UNDERTRAINED
    assert combine([HOLDS, NOT_EXERCISED, HOLDS]) == HOLDS
    assert combine([HOLDS, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([NOT_EXERCISED, NOT_RUN]) == NOT_EXERCISED
    assert combine([NOT_RUN, NOT_APPLICABLE]) == NOT_RUN


def test_a_learning_curve_measured_under_other_code_reads_stale_against_the_studys_own_runs(tmp_path):
    from analysis.report import curve_reproduces_study
    from analysis.results import Results

    metrics = {"synthetic": {"mnad-pred": [(0, {"with_update": {"auc_micro": 0.852}})],
                             "memae": [(0, {"without_update": {"auc_micro": 0.739}})]}}

    def study_results():  # Results reads the curve once: a fresh one per state of the table
        results = Results(load_params(None), tmp_path / "runs", tmp_path, tmp_path)
        results.metrics = metrics
        return results

    assert curve_reproduces_study(study_results()) == ""  # no curve
    row = {"dataset": "synthetic", "probe": False, "seed": 0, "epochs": 4}  # the synthetic profile's 4 epochs
    rows = [{**row, "variant": "mnad-pred", "auc_micro": 0.852},
            {**row, "variant": "memae", "epochs": 24, "auc_micro": 0.70},       # MemAE's own (families.memae)
            {**row, "variant": "memae", "auc_micro": 0.60},                     # the profile's, not MemAE's: not compared
            {**row, "variant": "memae:x=1", "probe": True, "auc_micro": 0.5},   # not a study variant
            {**row, "variant": "mnad-pred", "seed": 1, "auc_micro": 0.5}]       # a seed the study did not run
    (tmp_path / "tables" / "budget").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(tmp_path / "tables" / "budget" / "learning_curve.csv", index=False)
    assert curve_reproduces_study(study_results()) == (
        "**Stale**: of the curve's 2 rows at the study's budget, 1 do not reproduce the micro AUC of the study's run "
        "of the same seed (synthetic `memae` seed 0: 70.0 against 73.9): the curve was measured under other code or "
        "params; rerun `python benchmarks/learning_curve.py`.")
    rows[1]["auc_micro"] = 0.739
    pd.DataFrame(rows).to_csv(tmp_path / "tables" / "budget" / "learning_curve.csv", index=False)
    assert curve_reproduces_study(study_results()).startswith("The curve's 2 rows at the study's budget reproduce the micro")


def test_a_curve_row_whose_label_now_trains_with_other_settings_reads_stale(tmp_path):
    from analysis.report import curve_reproduces_study
    from analysis.results import Results

    # memae trains at lr 6e-3 on synthetic (families.memae); a row that recorded 1e-3 under its plain label was
    # measured under other params, whatever its AUC; the same row labelled '@lr=0.001' is what it says
    settings = {"frame_size": 64, "width": 0.125, "batch_size": 8, "max_train_clips": 500}
    row = {"dataset": "synthetic", "probe": True, "seed": 0, "epochs": 4, "auc_micro": 0.7, **settings}
    (tmp_path / "tables" / "budget").mkdir(parents=True)

    def verdict(rows):
        pd.DataFrame(rows).to_csv(tmp_path / "tables" / "budget" / "learning_curve.csv", index=False)
        results = Results(load_params(None), tmp_path / "runs", tmp_path, tmp_path)
        results.metrics = {}
        return curve_reproduces_study(results)

    assert verdict([{**row, "variant": "memae", "lr": 0.001}]) == (
        "**Stale**: 1 rows were trained with settings their label no longer gives under params.yaml (synthetic "
        "`memae` at 4 epochs: lr 0.001 recorded, 0.006 now): the curve was measured under other code or params; "
        "rerun `python benchmarks/learning_curve.py`.")
    assert verdict([{**row, "variant": "memae@lr=0.001", "lr": 0.001},
                    {**row, "variant": "memae", "lr": 0.006}]) == ""
    removed = verdict([{**row, "variant": "memae-gone", "lr": 0.001}])
    assert removed.startswith("**Stale**: 1 rows were trained with settings their label no longer gives")
    assert "synthetic `memae-gone` at 4 epochs: the label no longer resolves (unknown variant 'memae-gone'" in removed
