"""Score timelines and ROC curves (evidence for C1, C2, C10): what the scores look like, video by video.

Per dataset: for analysis.timeline_videos test videos (those with the most abnormal frames first, ties by name),
the headline normality score of every variant's first seed over time, with the ground-truth abnormal spans shaded;
and the ROC curves of all variants in one figure (each variant's first seed, from roc.csv; the legend gives the
micro AUC as mean ± std over seeds from metrics.json).

Writes analysis/tables/timelines/<dataset>/{videos.csv, auc.csv} and analysis/figures/timelines/<dataset>/
{timelines.png, roc.png}.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from analysis import plotting
from analysis.common import BASELINE, SCORE_COLUMNS, existing_runs, mean_std, output_dirs
from pipeline.config import Params
from pipeline.io import write_csv
from pipeline.metrics import headline_scoring

TOPIC = "timelines"


def auc_table(runs: list) -> pd.DataFrame:
    rows = []
    for run in runs:
        metrics = run.metrics()
        for scoring in SCORE_COLUMNS:
            if scoring in metrics:
                rows.append({"dataset": run.dataset, "variant": run.variant, "seed": run.seed, "scoring": scoring,
                             "headline": scoring == headline_scoring(metrics),
                             "auc_micro": metrics[scoring].get("auc_micro"),
                             "auc_macro": metrics[scoring].get("auc_macro")})
    return pd.DataFrame(rows, columns=["dataset", "variant", "seed", "scoring", "headline", "auc_micro", "auc_macro"])


def ground_truth(scores: list[pd.DataFrame]) -> pd.DataFrame:
    """(video, frame, label) over the union of the frames any variant scored (reconstruction scores them all)."""
    frames = pd.concat([s[["video", "frame", "label"]] for s in scores], ignore_index=True)
    return frames.drop_duplicates(["video", "frame"]).sort_values(["video", "frame"], ignore_index=True)


def choose_videos(truth: pd.DataFrame, count: int) -> pd.DataFrame:
    summary = truth.groupby("video").agg(frames=("frame", "size"), abnormal_frames=("label", "sum")).reset_index()
    summary = summary.sort_values(["abnormal_frames", "video"], ascending=[False, True], ignore_index=True)
    summary["shown"] = summary.index < count
    return summary


def timelines(dataset: str, params: Params, runs_root: Path | None = None,
              out_root: Path | None = None) -> pd.DataFrame:
    figures, tables = output_dirs(TOPIC, dataset, out_root)
    runs = existing_runs(params, dataset, runs_root, needs=("metrics.json", "scores.csv", "roc.csv"))
    aucs = auc_table(runs)
    write_csv(tables / "auc.csv", aucs)
    first_seed = {}
    for run in runs:
        first_seed.setdefault(run.variant, run)
    if not first_seed:
        write_csv(tables / "videos.csv", pd.DataFrame(columns=["video", "frames", "abnormal_frames", "shown"]))
        for name in ("timelines.png", "roc.png"):
            plotting.placeholder(figures / name, f"not run here: no evaluated run on {dataset}")
        return aucs
    scores = {variant: run.scores() for variant, run in first_seed.items()}
    headline = {variant: SCORE_COLUMNS[headline_scoring(run.metrics())] for variant, run in first_seed.items()}
    truth = ground_truth(list(scores.values()))
    videos = choose_videos(truth, params.analysis.timeline_videos)
    write_csv(tables / "videos.csv", videos)
    colors = plotting.variant_colors(list(params.variants))

    shown = videos[videos["shown"]]["video"].tolist()
    fig, axes = plotting.figure(len(shown), 1, panel=(9.0, 2.0))
    for ax, video in zip(axes[:, 0], shown):
        spans = truth[truth["video"] == video]
        plotting.shade_abnormal(ax, spans["frame"].to_numpy(), spans["label"].to_numpy())
        for variant, frame in scores.items():
            series = frame[frame["video"] == video]
            ax.plot(series["frame"], series[headline[variant]], color=colors[variant], linewidth=1,
                    label=f"{variant}{' (update)' if headline[variant] == 'score_update' else ''}")
        ax.set_ylabel("normality score")
        ax.set_title(f"{dataset} test video {video}")
        ax.set_ylim(-0.05, 1.05)
    axes[-1, 0].set_xlabel("frame")
    axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plotting.save(fig, figures / "timelines.png")

    fig, axes = plotting.figure(1, 1, panel=(4.8, 4.2))
    ax = axes[0, 0]
    for variant, run in first_seed.items():
        roc = run.roc()
        chosen = aucs[(aucs["variant"] == variant) & aucs["headline"]]["auc_micro"]
        ax.plot(roc["fpr"], roc["tpr"], color=colors[variant], linewidth=1.2,
                linestyle="--" if variant == BASELINE else "-",
                label=f"{variant}: {mean_std(chosen)} (n={len(chosen)})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"{dataset}: ROC (first seed); legend: micro AUC over seeds")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    plotting.save(fig, figures / "roc.png")
    return aucs

