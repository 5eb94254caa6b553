"""The collapse study (claim C5): does MNAD's memory collapse onto one item, under which setting, when, and why?

`python -m analysis.collapse` (the `collapse_analysis` stage) reads every setting of params.yaml `collapse` (a
dataset and a variant each, one factor changed at a time from `base`) and its runs (the first collapse.seeds of
study.seeds):

- the usage over training: the usage_* columns that train_log.csv records at every logged step from the held-out
  monitor windows (entropy, top item's share, items used, NMI(position; item) / H(item), the share of query
  variance between positions);
- the final usage on the test set (each run's model, memory as trained): the per-item histogram, collapse flag
  (top item >= analysis.collapse_share), and the NaN heuristic RC2020 hit: the videos whose feature-distance series
  is constant (0/0 in MNAD's min-max);
- per run: the first logged step at which the monitor saw a collapse, and the slope of usage entropy against
  log10(step) over the second half of training (negative: usage narrowing as training goes on).

Writes analysis/tables/collapse/{trajectories.csv, final.csv, counts.csv} and analysis/figures/collapse/
{usage_over_training.png, histograms.png, nan_heuristic.png}.
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plotting
from analysis.common import ANALYSIS_DIR, Run
from analysis.inference import loaded_run
from analysis.memory_usage import nearest_item_usage, usage_panel_bars
from pipeline import tracking
from pipeline.config import Params, load_params
from pipeline.errors import exit_cleanly
from pipeline.io import write_csv
from pipeline.paths import RUNS_DIR, run_dir

TOPIC = "collapse"
USAGE = ("entropy", "top_share", "items_used", "position_nmi", "position_variance_share")
TEST_WINDOWS = 200   # a seeded sample of test windows for the final histogram
# final.csv's columns: the header of an empty study (no settings), so that readers see an empty table, not an
# unreadable file (the end-to-end test checks that a study with runs writes the same columns)
FINAL_COLUMNS = ("setting", "dataset", "variant", "seed", "steps", "learnt", "auc_micro", "entropy", "perplexity",
                 "items_used", "top_share", "collapsed", "position_nmi", "position_variance_share", "collapse_step",
                 "entropy_slope", "entropy_slope_error", "constant_distance_videos", "videos")


def entropy_slope(steps: np.ndarray, entropy: np.ndarray) -> tuple[float, float]:
    """(slope, its standard error) of usage entropy against log10(step), by least squares over the second half of
    the logged steps (NaN with fewer than three)."""
    steps, entropy = np.asarray(steps, dtype=np.float64), np.asarray(entropy, dtype=np.float64)
    keep = (steps >= steps.max() / 2) & np.isfinite(entropy) if len(steps) else np.zeros(0, bool)
    x, y = np.log10(steps[keep]), entropy[keep]
    if len(x) < 3 or np.ptp(x) == 0:
        return math.nan, math.nan
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    error = math.sqrt(float(residual @ residual) / (len(x) - 2) / float(((x - x.mean()) ** 2).sum()))
    return float(slope), error


def constant_distance_videos(scores: pd.DataFrame) -> int:
    """Videos whose feature-distance series is constant: MNAD's min-max divides 0 by 0 there."""
    return int(sum(np.ptp(g["distance"].to_numpy()) == 0 for _, g in scores.groupby("video")))


def collapse_study(params: Params, runs_root: Path | None = None, data_root: Path | None = None,
                   out_root: Path | None = None) -> pd.DataFrame:
    root = out_root or ANALYSIS_DIR
    figures, tables = root / "figures" / TOPIC, root / "tables" / TOPIC
    for folder in (figures, tables):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    share = params.analysis.collapse_share
    trajectories, finals, counts = [], [], []
    for name, setting in params.collapse.settings.items():
        for seed in params.collapse_seeds:
            path = run_dir(setting.dataset, setting.variant, seed, runs_root or RUNS_DIR)
            if not (path / "metrics.json").exists():
                continue
            run = Run(setting.dataset, setting.variant, seed, path)
            log = pd.read_csv(path / "train_log.csv")
            usage_log = log.dropna(subset=["usage_entropy"]) if "usage_entropy" in log else log.iloc[:0]
            for row in usage_log.itertuples():
                trajectories.append({"setting": name, "seed": seed, "step": row.step,
                                     **{key: getattr(row, f"usage_{key}") for key in USAGE}})
            collapsed_at = usage_log[usage_log["usage_top_share"] >= share]["step"] if len(usage_log) else []
            slope, slope_error = entropy_slope(usage_log["step"], usage_log["usage_entropy"]) if len(usage_log) \
                else (math.nan, math.nan)
            usage = nearest_item_usage(loaded_run(run, params, data_root), "test", TEST_WINDOWS,
                                       params.evaluate.batch_size)
            stats = usage.stats(share)
            metrics = run.metrics()
            finals.append({"setting": name, "dataset": setting.dataset, "variant": setting.variant, "seed": seed,
                           "steps": int(log["step"].iloc[-1]), "learnt": bool(metrics["gate"]["learnt"]),
                           "auc_micro": metrics[metrics["headline"]]["auc_micro"], **stats,
                           "collapse_step": int(collapsed_at.iloc[0]) if len(collapsed_at) else np.nan,
                           "entropy_slope": slope, "entropy_slope_error": slope_error,
                           "constant_distance_videos": constant_distance_videos(run.scores()),
                           "videos": metrics["videos"]})
            counts += [{"setting": name, "seed": seed, "item": i, "count": int(c)}
                       for i, c in enumerate(usage.counts)]
    trajectory = pd.DataFrame(trajectories, columns=["setting", "seed", "step", *USAGE])
    final = pd.DataFrame(finals) if finals else pd.DataFrame(columns=list(FINAL_COLUMNS))
    write_csv(tables / "trajectories.csv", trajectory)
    write_csv(tables / "final.csv", final)
    write_csv(tables / "counts.csv", pd.DataFrame(counts, columns=["setting", "seed", "item", "count"]))
    if final.empty:
        for figure in ("usage_over_training.png", "histograms.png", "nan_heuristic.png"):
            plotting.placeholder(figures / figure, "not run here: no run of the collapse study exists")
        return final
    trajectory_figure(trajectory, list(params.collapse.settings), share, figures / "usage_over_training.png")
    histogram_figure(pd.DataFrame(counts), final, share, figures / "histograms.png")
    nan_figure(final, figures / "nan_heuristic.png")
    return final


def trajectory_figure(trajectory: pd.DataFrame, settings: list[str], share: float, path: Path) -> Path:
    """Per setting: usage entropy (left) and the top item's share (right) against steps, one line per seed."""
    fig, axes = plotting.figure(2, len(settings), panel=(2.6, 2.2), sharex=True)
    for column, setting in enumerate(settings):
        rows = trajectory[trajectory["setting"] == setting]
        for seed, line in rows.groupby("seed"):
            axes[0, column].plot(line["step"], line["entropy"], linewidth=1, label=f"seed {seed}")
            axes[1, column].plot(line["step"], line["top_share"], linewidth=1)
        axes[0, column].set_title(setting)
        axes[1, column].axhline(share, color=plotting.ALERT, linestyle="--", linewidth=0.8)
        axes[1, column].set_ylim(0, 1.02)
        axes[1, column].set_xlabel("step")
    axes[0, 0].set_ylabel("usage entropy (nats)")
    axes[1, 0].set_ylabel("top item's share")
    axes[0, 0].legend()
    fig.suptitle("Memory usage over training on the held-out monitor windows (dashed: the collapse threshold)")
    return plotting.save(fig, path)


def histogram_figure(counts: pd.DataFrame, final: pd.DataFrame, share: float, path: Path) -> Path:
    """The final usage histograms on the test set: rows are settings, columns seeds; collapsed runs in red."""
    settings = list(dict.fromkeys(final["setting"]))
    seeds = sorted(final["seed"].unique())
    fig, axes = plotting.figure(len(settings), len(seeds), panel=(2.4, 1.8))
    for row, setting in enumerate(settings):
        for column, seed in enumerate(seeds):
            ax = axes[row, column]
            these = counts[(counts["setting"] == setting) & (counts["seed"] == seed)]
            if these.empty:
                ax.set_visible(False)
                continue
            stats = final[(final["setting"] == setting) & (final["seed"] == seed)].iloc[0]
            usage_panel_bars(ax, these["count"].to_numpy(), f"{setting} s{seed}", bool(stats["top_share"] >= share))
    fig.suptitle(f"Final memory usage on the test set (red: top item ≥ {share:.0%}, collapsed)")
    return plotting.save(fig, path)


def nan_figure(final: pd.DataFrame, path: Path) -> Path:
    """Per run: the test videos whose feature-distance series is constant (MNAD's min-max gives 0/0 there)."""
    fig, axes = plotting.figure(1, 1, panel=(max(5.0, 0.35 * len(final)), 2.6))
    ax = axes[0, 0]
    labels = [f"{r.setting} s{r.seed}" for r in final.itertuples()]
    ax.bar(np.arange(len(final)), final["constant_distance_videos"], color="#2c7fb8")
    ax.set_xticks(np.arange(len(final)))
    ax.set_xticklabels(labels, rotation=60, ha="right")
    ax.set_ylabel("videos with a constant distance")
    ax.set_ylim(0, max(1, int(final["videos"].max())))
    ax.set_title("The NaN heuristic: test videos whose feature-distance series is constant")
    return plotting.save(fig, path)


@exit_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    final = collapse_study(params)
    print(final[["setting", "seed", "steps", "top_share", "entropy", "collapse_step", "entropy_slope"]]
          .to_string(index=False) if not final.empty else "no run of the collapse study exists")
    for dataset in params.collapse.datasets:   # the figures, into each collapse dataset's MLflow study run
        tracking.study_run(dataset).log_artifacts(ANALYSIS_DIR / "figures" / TOPIC, f"figures/{TOPIC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
