"""Feature replacement (claim C4): replace the decoder's input at test time and see what the output keeps.

For each variant of analysis.replacement_variants (reconstruction and prediction, with and without skips) and
seed, over a seeded sample of analysis.replacement_windows test windows (0 = all; AUCs are the sample's, normalised
per video within it): the decoder input's query part, memory read, or both are replaced by zeros, ones or seeded
standard-normal noise (models.mnad.Replacement). Per replacement: the AUC of the normality score from PSNR alone and combined with
the feature distance (the distance comes from the queries, before the decoder, so the replacement leaves it
unchanged), the mean PSNR of the output against its target, and the mean PSNR between the normal output and the
replaced one: high means the decoder barely used what was replaced (skip connections carry the frame), low means it
relied on it.

Writes analysis/tables/replacement/<dataset>/replacement.csv and analysis/figures/replacement/<dataset>/
{psnr_to_normal.png, examples_<variant>.png}.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis import plotting
from analysis.common import existing_runs, output_dirs, seeded_subset
from analysis.inference import LoadedRun, loaded_run
from models.mnad import Replacement
from pipeline.config import Params
from pipeline.io import write_csv
from pipeline.metrics import auc, normality_score
from pipeline.scoring import psnr

TOPIC = "replacement"
FILLS = Replacement.FILLS
NORMAL = ("none", "none")     # (part, fill) of the unmodified forward pass


def replacements(has_memory: bool) -> list[tuple[str, str]]:
    """Every (part, fill); without a memory the decoder input is the query alone, so only "both" applies."""
    parts = Replacement.PARTS if has_memory else ("both",)
    return [(part, fill) for part in parts for fill in FILLS]


@torch.no_grad()
def replaced_outputs(loaded: LoadedRun, batch_size: int, examples: np.ndarray,
                     windows: np.ndarray | None = None, scale_to_norm: bool = False) -> tuple[dict, dict, np.ndarray]:
    """One pass over the test `windows` (default: all): per (part, fill) the per-window PSNR to the target and to
    the normal output, the example windows' images, and the feature distance of every window (None without a
    memory). Each batch is encoded once and decoded under every replacement."""
    settings = replacements(loaded.variant.has_memory)
    # One generator per replacement, seeded from the run's seed: the random fill is reproducible and does not
    # depend on which other replacements ran.
    generators = {s: torch.Generator().manual_seed(loaded.run.seed * 1000 + k) for k, s in enumerate(settings)}
    series = {s: {"to_target": [], "to_normal": []} for s in [NORMAL, *settings]}
    images: dict = {}
    distance = []
    model = loaded.model
    for indices, inputs, target in loaded.clips(loaded.windows("test"), windows, batch_size):
        encoded = model.encode(inputs)
        normal = model.decode(encoded)
        series[NORMAL]["to_target"].append(psnr(normal, target))
        series[NORMAL]["to_normal"].append(np.full(len(indices), np.nan))
        if encoded.distance is not None:
            distance.append(encoded.distance.double().cpu().numpy())
        outputs = {NORMAL: normal}
        for setting in settings:
            part, fill = setting
            output = model.decode(encoded, Replacement(part, fill, generators[setting], scale_to_norm))
            series[setting]["to_target"].append(psnr(output, target))
            series[setting]["to_normal"].append(psnr(output, normal))
            outputs[setting] = output
        for k, window in enumerate(indices):
            if window in examples:
                images[int(window)] = {"input": inputs[k, -target.shape[1]:].cpu(), "target": target[k].cpu(),
                                       **{s: o[k].cpu() for s, o in outputs.items()}}
    joined = {s: {key: np.concatenate(parts) for key, parts in values.items()} for s, values in series.items()}
    return joined, images, (np.concatenate(distance) if distance else None)


def replacement(dataset: str, params: Params, runs_root: Path | None = None, data_root: Path | None = None,
                out_root: Path | None = None) -> pd.DataFrame:
    figures, tables = output_dirs(TOPIC, dataset, out_root)
    options = params.analysis
    nan_policy = params.evaluate.nan_policy
    runs = existing_runs(params, dataset, runs_root, options.replacement_variants, needs=("checkpoint.pt",))
    rows, drawn = [], set()
    for run in runs:
        loaded = loaded_run(run, params, data_root)
        windows = loaded.windows("test").windows
        sample = seeded_subset(len(windows), options.replacement_windows, run.seed)
        examples = sample[np.unique(np.linspace(0, len(sample) - 1, options.replacement_examples).round().astype(int))]
        series, images, distance = replaced_outputs(loaded, params.evaluate.batch_size, examples, sample,
                                                    options.replacement_scale_to_norm)
        videos, labels = windows["video"].to_numpy()[sample], windows["label"].to_numpy()[sample]
        for (part, fill), values in series.items():
            psnr_score, _ = normality_score(values["to_target"], videos, loaded.variant.alpha, None, nan_policy)
            row = {"dataset": dataset, "variant": run.variant, "seed": run.seed, "skips": loaded.variant.skips,
                   "task": loaded.variant.task, "part": part, "fill": fill,
                   "auc_psnr": auc(labels, psnr_score), "auc_score": np.nan,
                   "psnr_to_target": float(np.mean(values["to_target"])),
                   "psnr_to_normal": float(np.mean(values["to_normal"])) if part != "none" else np.nan}
            if distance is not None:  # with a memory, the score MNAD uses: PSNR combined with the feature distance
                combined, _ = normality_score(values["to_target"], videos, loaded.variant.alpha, distance, nan_policy)
                row["auc_score"] = auc(labels, combined)
            rows.append(row)
        if run.variant not in drawn:
            drawn.add(run.variant)
            examples_figure(images, windows, run, figures / f"examples_{run.variant}.png")

    table = pd.DataFrame(rows, columns=["dataset", "variant", "seed", "skips", "task", "part", "fill", "auc_psnr",
                                        "auc_score", "psnr_to_target", "psnr_to_normal"])
    write_csv(tables / "replacement.csv", table)
    if table.empty:
        plotting.placeholder(figures / "psnr_to_normal.png",
                             f"not run here: none of {', '.join(options.replacement_variants)} trained on {dataset}")
    else:
        psnr_figure(table, params, figures / "psnr_to_normal.png", dataset)
    return table


def setting_name(part: str, fill: str) -> str:
    return "normal" if part == "none" else f"{part}={fill}"


def psnr_figure(table: pd.DataFrame, params: Params, path: Path, dataset: str) -> Path:
    """Grouped bars: per replacement, each variant's mean PSNR between normal and replaced output (± std over
    seeds), beside the line that counts as "barely changed"."""
    replaced = table[table["part"] != "none"].copy()
    replaced["setting"] = [setting_name(p, f) for p, f in zip(replaced["part"], replaced["fill"])]
    settings = list(dict.fromkeys(replaced["setting"]))
    variants = list(dict.fromkeys(replaced["variant"]))
    colors = plotting.variant_colors(list(params.variants))
    fig, axes = plotting.figure(1, 1, panel=(max(6.0, 0.7 * len(settings)), 3.0))
    ax = axes[0, 0]
    width = 0.8 / len(variants)
    for k, variant in enumerate(variants):
        stats = replaced[replaced["variant"] == variant].groupby("setting")["psnr_to_normal"].agg(["mean", "std"])
        stats = stats.reindex(settings)
        skips = bool(table[table["variant"] == variant]["skips"].iloc[0])
        ax.bar(np.arange(len(settings)) + (k - (len(variants) - 1) / 2) * width, stats["mean"], width,
               yerr=stats["std"].fillna(0), color=colors[variant], capsize=2,
               label=f"{variant} ({'skips' if skips else 'no skips'})")
    ax.axhline(params.analysis.replacement_unchanged_psnr, color="grey", linestyle="--", linewidth=1,
               label=f"barely changed ({params.analysis.replacement_unchanged_psnr:g} dB)")
    ax.set_xticks(np.arange(len(settings)))
    ax.set_xticklabels(settings, rotation=30, ha="right")
    ax.set_ylabel("PSNR normal vs replaced output (dB)")
    ax.set_title(f"{dataset}: how much the output changes when the decoder input is replaced")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return plotting.save(fig, path)


def examples_figure(images: dict, windows: pd.DataFrame, run, path: Path) -> Path:
    """Rows: example windows; columns: last input frame, target, normal output, then every replacement."""
    settings = [s for s in next(iter(images.values())) if s not in ("input", "target")]
    columns = ["input", "target", *settings]
    fig, axes = plotting.figure(len(images), len(columns), panel=(1.1, 1.25))
    for row, (window, pictures) in enumerate(sorted(images.items())):
        where = windows.iloc[window]
        for col, key in enumerate(columns):
            title = key if isinstance(key, str) else setting_name(*key)
            show = plotting.to_image(pictures[key])
            plotting.show_image(axes[row, col], show, title if row == 0 else "")
        axes[row, 0].set_ylabel(f"{where['video']}/{int(where['frame'])}\n{'abnormal' if where['label'] else 'normal'}")
    fig.suptitle(f"{run.dataset} {run.variant} seed {run.seed}: outputs with the decoder input replaced")
    return plotting.save(fig, path)

