"""Per-anomaly-type results on the synthetic datasets (claim C7): does only prediction catch temporal anomalies?

The per-type AUCs are computed against two sets of normal frames (the table's `normal` column):
- `all`: every normal frame, as each run's metrics.json records it;
- `clean`: the normal frames whose scoring window (the frames their sample spans: a prediction's inputs and target,
  MemAE's 16-frame clip) holds no abnormal frame. A window-level score spreads an event's error over the normal frames
  whose window overlaps it: with MemAE's clips, up to 8 frames either side of every event, so most normal frames of
  the synthetic set carry some of the fast events' error, and a type the model barely sees (MemAE on spatial) falls
  below chance against all normal frames. Against clean normal frames the AUC measures what the model sees in the
  type itself.

For every variant that ran and the copy-last floor; the bar chart shows the headline scoring (with test-time update
where the variant has it) against clean normal frames, mean over seeds with the standard deviation as error bars.
Example frames show a spatial, a temporal and a spatio-temporal event with the outputs and error maps of one
reconstruction and one prediction model.

Writes analysis/tables/anomaly_types/<dataset>/per_type_auc.csv and analysis/figures/anomaly_types/<dataset>/
{per_type_auc.png, examples.png}.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis import plotting
from analysis.common import BASELINE, SCORE_COLUMNS, existing_runs, output_dirs
from analysis.inference import LoadedRun, loaded_run
from pipeline.config import ANOMALY_TYPES, Params, Variant
from pipeline.data import read_labels
from pipeline.io import write_csv
from pipeline.metrics import auc_by_type, headline_scoring
from pipeline.paths import frames_dir
from pipeline.scoring import psnr

TOPIC = "anomaly_types"
# The example models: the first of each list that has a checkpoint.
RECONSTRUCTION_MODELS = ("mnad-recon", "ae-recon")
PREDICTION_MODELS = ("mnad-pred", "ae-pred")


TABLE_COLUMNS = ["dataset", "variant", "seed", "scoring", "headline", "normal", "anomaly_type", "auc"]


def abnormal_before(labels: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per test video of `labels` (read_labels): counts[j] = abnormal frames before frame j, so that the abnormal
    frames of any window of frames [a, b) are counts[b] - counts[a]."""
    test = labels[labels["split"] == "test"]
    counts = {}
    for video, frames in test.groupby("video", sort=False):
        abnormal = np.zeros(int(frames["frame"].max()) + 1, dtype=np.int64)
        abnormal[frames["frame"].to_numpy()] = frames["label"].to_numpy()
        counts[video] = np.concatenate([[0], np.cumsum(abnormal)])
    return counts


def clean_normal(scores: pd.DataFrame, counts: dict[str, np.ndarray], variant: Variant) -> np.ndarray:
    """For each scored frame (scores.csv rows: video, frame, label): whether it is normal and the scoring window of
    its sample, frames [frame - scored_offset, frame - scored_offset + window - 1] of its video, holds no abnormal
    frame (counts: abnormal_before of the dataset's labels)."""
    before, after = variant.scored_offset, variant.window - 1 - variant.scored_offset
    clean = np.zeros(len(scores), dtype=bool)
    frames, normal = scores["frame"].to_numpy(), scores["label"].to_numpy() == 0
    for video, rows in scores.groupby("video", sort=False).indices.items():
        if video not in counts:
            raise ValueError(f"scores hold video {video!r}, which the labels table has no test frames of")
        video_counts = counts[video]
        first = np.clip(frames[rows] - before, 0, len(video_counts) - 1)
        last = np.clip(frames[rows] + after + 1, 0, len(video_counts) - 1)
        clean[rows] = (video_counts[last] == video_counts[first]) & normal[rows]
    return clean


def aucs_by_normal_set(scores: pd.DataFrame, clean: np.ndarray, column: str) -> dict[str, dict[str, float]]:
    """{normal set: {anomaly type: AUC of the type's frames against that set's normal frames}} for one scoring
    (clean: clean_normal of the same scores)."""
    label, score, kind = (scores["label"].to_numpy(), scores[column].to_numpy(dtype=np.float64),
                          scores["anomaly_type"].to_numpy())
    kept = (label == 1) | clean
    return {"all": auc_by_type(label, score, kind), "clean": auc_by_type(label[kept], score[kept], kind[kept])}


def per_type_table(dataset: str, params: Params, runs_root: Path | None, data_root: Path | None) -> pd.DataFrame:
    """One row per (run, scoring, normal set, anomaly type); empty for a real dataset, which records no types."""
    runs = existing_runs(params, dataset, runs_root, needs=("metrics.json", "scores.csv"))
    if not runs or not params.dataset(dataset).is_synthetic:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    counts = abnormal_before(read_labels(frames_dir(dataset, data_root)))
    rows = []
    for run in runs:
        metrics, scores = run.metrics(), run.scores()
        headline = headline_scoring(metrics)
        clean = clean_normal(scores, counts, params.variant(run.variant))  # one mask for both scorings
        for scoring, column in SCORE_COLUMNS.items():
            if scoring not in metrics:
                continue
            for normal, aucs in aucs_by_normal_set(scores, clean, column).items():
                rows += [{"dataset": dataset, "variant": run.variant, "seed": run.seed, "scoring": scoring,
                          "headline": scoring == headline, "normal": normal, "anomaly_type": kind, "auc": value}
                         for kind, value in aucs.items()]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def anomaly_types(dataset: str, params: Params, runs_root: Path | None = None, data_root: Path | None = None,
                  out_root: Path | None = None) -> pd.DataFrame:
    figures, tables = output_dirs(TOPIC, dataset, out_root)
    table = per_type_table(dataset, params, runs_root, data_root)
    write_csv(tables / "per_type_auc.csv", table)
    if table.empty:
        message = f"not run here: {dataset} records no anomaly types (or no run of it exists)"
        plotting.placeholder(figures / "per_type_auc.png", message)
        plotting.placeholder(figures / "examples.png", message)
        return table
    per_type_figure(table, params, figures / "per_type_auc.png", dataset)
    examples_figure(dataset, params, runs_root, data_root, figures / "examples.png")
    return table


def per_type_figure(table: pd.DataFrame, params: Params, path: Path, dataset: str) -> Path:
    headline = table[table["headline"] & (table["normal"] == "clean")]
    variants = list(dict.fromkeys(headline["variant"]))
    kinds = [k for k in ANOMALY_TYPES if k in set(headline["anomaly_type"])]
    colors = plotting.variant_colors(list(params.variants))
    fig, axes = plotting.figure(1, 1, panel=(min(10.0, max(6.0, 0.3 * len(variants) * len(kinds))), 3.0))
    ax = axes[0, 0]
    width = 0.85 / len(variants)
    for k, variant in enumerate(variants):
        stats = (headline[headline["variant"] == variant].groupby("anomaly_type")["auc"]
                 .agg(["mean", "std", "count"]).reindex(kinds))
        ax.bar(np.arange(len(kinds)) + (k - (len(variants) - 1) / 2) * width, stats["mean"], width,
               yerr=stats["std"].fillna(0), capsize=2, color=colors[variant],
               label=f"{variant} (n={int(stats['count'].max())})", hatch="//" if variant == BASELINE else None)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(kinds)))
    ax.set_xticklabels(kinds)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("frame AUC (type vs clean normal frames)")
    ax.set_title(f"{dataset}: AUC per anomaly type against clean normal frames, mean ± std over seeds "
                 f"(dotted: chance)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return plotting.save(fig, path)


def event_frames(labels: pd.DataFrame, skip: int) -> dict[str, tuple[str, int]]:
    """For each anomaly type: (video, frame) in the middle of its first test event that starts at frame `skip`
    or later (so that a prediction model has the four frames before it)."""
    test = labels[(labels["split"] == "test") & (labels["label"] == 1)].sort_values(["video", "frame"])
    chosen = {}
    for kind in ANOMALY_TYPES:
        frames = test[(test["anomaly_type"] == kind) & (test["frame"] >= skip)]
        if frames.empty:
            continue
        video = frames["video"].iloc[0]
        numbers = frames[frames["video"] == video]["frame"].to_numpy()
        event = numbers[: np.argmax(np.diff(numbers, append=numbers[-1] + 2) > 1) + 1]  # first consecutive run
        chosen[kind] = (video, int(event[len(event) // 2]))
    return chosen


def first_loaded(dataset: str, params: Params, runs_root: Path | None, data_root: Path | None,
                 candidates: tuple[str, ...]) -> LoadedRun | None:
    runs = existing_runs(params, dataset, runs_root, candidates, needs=("checkpoint.pt",))
    for variant in candidates:  # the preferred model first, whatever its place in the study
        for run in runs:
            if run.variant == variant:
                return loaded_run(run, params, data_root)
    return None


def examples_figure(dataset: str, params: Params, runs_root: Path | None, data_root: Path | None,
                    path: Path) -> Path:
    """Rows: one event per anomaly type; columns: the frame, then output and squared-error map of a reconstruction
    and of a prediction model (error maps on one colour scale)."""
    models = [m for m in (first_loaded(dataset, params, runs_root, data_root, RECONSTRUCTION_MODELS),
                          first_loaded(dataset, params, runs_root, data_root, PREDICTION_MODELS)) if m is not None]
    labels = read_labels(frames_dir(dataset, data_root))
    events = event_frames(labels, skip=max([m.variant.window - 1 for m in models], default=0))
    if not models or not events:
        return plotting.placeholder(path, f"not run here: no reconstruction or prediction checkpoint, or no "
                                          f"event, on {dataset}")
    panels = {}
    for kind, (video, frame) in events.items():
        for loaded in models:
            dataset_windows = loaded.windows("test")
            window = loaded.window_of(dataset_windows, video, frame)
            if window is None:
                continue  # this model does not score that frame; its panels stay empty
            _, target, result = loaded.one_window(dataset_windows, window)
            error = (((result.output[0] + 1) / 2 - (target[0] + 1) / 2) ** 2).mean(dim=0)
            value = float(psnr(result.output, target)[0])
            panels[kind, loaded.run.variant] = (target[0], result.output[0], error, value)
    vmax = max([float(torch.quantile(p[2].flatten(), 0.999)) for p in panels.values()], default=0.0) or 1.0
    columns = 1 + 2 * len(models)
    fig, axes = plotting.figure(len(events), columns, panel=(1.6, 1.7))
    for row, (kind, (video, frame)) in enumerate(events.items()):
        for ax in axes[row]:
            ax.axis("off")
        shown = [panels[kind, m.run.variant] for m in models if (kind, m.run.variant) in panels]
        if shown:
            plotting.show_image(axes[row, 0], plotting.to_image(shown[0][0]), f"{kind}\n{video}/{frame}")
        for k, loaded in enumerate(models):
            if (kind, loaded.run.variant) not in panels:
                continue
            _, output, error, value = panels[kind, loaded.run.variant]
            plotting.show_image(axes[row, 1 + 2 * k], plotting.to_image(output),
                                f"{loaded.run.variant}\n{value:.1f} dB")
            plotting.show_image(axes[row, 2 + 2 * k], error.cpu().numpy(), "squared error", cmap="magma", vmax=vmax)
    fig.suptitle(f"{dataset}: one event of each type (seed {models[0].run.seed})")
    return plotting.save(fig, path)

