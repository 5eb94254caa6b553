"""Memory usage (claims C5, C6): how often each memory item is the nearest item of a query.

For every memory variant and seed of a dataset: the per-item count of nearest-item assignments over seeded samples
of test and training windows (analysis.usage_test_windows, usage_train_windows; 0 = all) with the memory frozen,
as trained, and the usage statistics of pipeline.metrics.UsageAccumulator (entropy, perplexity, items used, top
item's share, collapse flag), with how much of the item choice is set by the query's position rather than by its
content (position_nmi, position_variance_share): with skip connections the queries can stop depending on the input,
and then every position keeps its own item whatever the frame shows.

Writes analysis/tables/memory_usage/<dataset>/{usage.csv, counts.csv} and
analysis/figures/memory_usage/<dataset>/{usage.png, pred_vs_uniform.png}.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import plotting
from analysis.common import existing_runs, output_dirs, runs_by_variant, seeded_subset
from analysis.inference import LoadedRun, loaded_run
from pipeline.config import Params
from pipeline.io import write_csv
from pipeline.metrics import UsageAccumulator

TOPIC = "memory_usage"
SPLITS = ("test", "train")
MOST_ITEMS_DRAWN = 40            # larger memories (MemAE: 2000 items) are drawn as their most used items only
UNIFORM_COMPARISON = ("mnad-pred", "mnad-pred-uniform")


def nearest_item_usage(loaded: LoadedRun, split: str, cap: int, batch_size: int) -> UsageAccumulator:
    """Which item each query of `split` (a seeded sample of `cap` windows) picks, by query position."""
    dataset = loaded.windows(split)
    indices = seeded_subset(len(dataset), cap, loaded.run.seed)
    usage = None
    for _, encoded in loaded.encodings(dataset, indices, batch_size):
        nearest = encoded.nearest.flatten(1).cpu().numpy()                      # [B, positions]
        queries = encoded.queries.flatten(2).transpose(1, 2).cpu().numpy()      # [B, positions, C]
        if usage is None:
            usage = UsageAccumulator(loaded.variant.memory_items, nearest.shape[1], queries.shape[2])
        usage.add(nearest, queries)
    return usage


def usage_row(usage: UsageAccumulator, collapse_share: float) -> dict:
    """The table's numbers for one histogram: the usage statistics, how much position sets them, and the
    even-use ceiling log M."""
    counts = usage.counts
    stats = usage.stats(collapse_share)
    stats["entropy"] += 0.0  # one item used: -(1 log 1) is -0.0, printed "-0.00"
    return {"queries": int(counts.sum()), "items": len(counts), **stats, "max_entropy": math.log(len(counts)),
            "top_item": int(np.argmax(counts))}


def memory_usage(dataset: str, params: Params, runs_root: Path | None = None, data_root: Path | None = None,
                 out_root: Path | None = None) -> pd.DataFrame:
    figures, tables = output_dirs(TOPIC, dataset, out_root)
    options = params.analysis
    memory_variants = [v for v in params.study.variants_for(dataset) if params.variant(v).has_memory]
    runs = existing_runs(params, dataset, runs_root, memory_variants, needs=("checkpoint.pt",))

    histograms: dict[tuple[str, int, str], np.ndarray] = {}
    usage_rows, count_rows = [], []
    for run in runs:
        loaded = loaded_run(run, params, data_root)
        for split in SPLITS:
            cap = options.usage_test_windows if split == "test" else options.usage_train_windows
            usage = nearest_item_usage(loaded, split, cap, params.evaluate.batch_size)
            counts = histograms[run.variant, run.seed, split] = usage.counts
            usage_rows.append({"dataset": dataset, "variant": run.variant, "seed": run.seed, "split": split,
                               **usage_row(usage, options.collapse_share)})
            # only the items some query chose: MemAE's 2000 items would otherwise fill the table with zeros
            total = max(int(counts.sum()), 1)
            count_rows += [{"dataset": dataset, "variant": run.variant, "seed": run.seed, "split": split, "item": i,
                            "count": int(counts[i]), "share": counts[i] / total} for i in np.flatnonzero(counts)]

    usage = pd.DataFrame(usage_rows, columns=["dataset", "variant", "seed", "split", "queries", "items", "entropy",
                                              "perplexity", "items_used", "top_share", "collapsed",
                                              "position_nmi", "position_variance_share", "max_entropy", "top_item"])
    write_csv(tables / "usage.csv", usage)
    write_csv(tables / "counts.csv", pd.DataFrame(count_rows, columns=["dataset", "variant", "seed", "split", "item",
                                                                       "count", "share"]))

    if usage.empty:
        message = f"not run here: no trained memory variant on {dataset}"
        plotting.placeholder(figures / "usage.png", message)
        plotting.placeholder(figures / "pred_vs_uniform.png", message)
        return usage
    grouped = runs_by_variant(runs)
    usage_figure(histograms, usage, list(grouped.values()), figures / "usage.png",
                 f"{dataset}: nearest-item share per memory item (test bars, train outline)")
    compared = [grouped.get(v, []) for v in UNIFORM_COMPARISON]
    if all(compared):
        usage_figure(histograms, usage, compared, figures / "pred_vs_uniform.png",
                     f"{dataset}: {UNIFORM_COMPARISON[0]} vs {UNIFORM_COMPARISON[1]} (test shares)", by_column=True)
    else:
        plotting.placeholder(figures / "pred_vs_uniform.png",
                             f"not run here: needs both {' and '.join(UNIFORM_COMPARISON)} on {dataset}")
    return usage


def usage_figure(histograms: dict, usage: pd.DataFrame, runs_grid: list[list], path: Path, title: str,
                 by_column: bool = False) -> Path:
    """One panel per run: rows are variants and columns seeds (or the transpose, for side-by-side variants)."""
    lines, across = len(runs_grid), max(len(runs) for runs in runs_grid)
    rows, cols = (across, lines) if by_column else (lines, across)
    fig, axes = plotting.figure(rows, cols, panel=(3.0, 2.2))
    for ax in axes.flat:
        ax.set_visible(False)
    for line, runs in enumerate(runs_grid):
        for position, run in enumerate(runs):
            ax = axes[position, line] if by_column else axes[line, position]
            ax.set_visible(True)
            usage_panel(ax, histograms, usage, run.variant, run.seed)
    fig.suptitle(title)
    return plotting.save(fig, path)


def usage_panel(ax, histograms: dict, usage: pd.DataFrame, variant: str, seed: int) -> None:
    """One run's test histogram (bars) with its training one (outline) and its numbers in the title."""
    stats = usage[(usage["variant"] == variant) & (usage["seed"] == seed) & (usage["split"] == "test")].iloc[0]
    usage_panel_bars(ax, histograms[variant, seed, "test"],
                     f"{variant} seed {seed}\nentropy {stats['entropy']:.2f} of {stats['max_entropy']:.2f}, "
                     f"{int(stats['items_used'])} used", bool(stats["collapsed"]),
                     outline=histograms[variant, seed, "train"])


def usage_panel_bars(ax, counts: np.ndarray, title: str, collapsed: bool, outline: np.ndarray | None = None) -> None:
    """Bars of each item's share of the queries (a common 0-1 scale, so a collapse is one full-height bar), the top
    bar annotated, `outline` (another split's counts) drawn as empty bars; a collapsed memory is drawn in red."""
    test = counts / max(counts.sum(), 1)
    if len(test) <= MOST_ITEMS_DRAWN:
        order = np.arange(len(test))
    else:
        order = np.argsort(-test, kind="stable")[:MOST_ITEMS_DRAWN]
    x = np.arange(len(order))
    ax.bar(x, test[order], width=0.8, color="#2c7fb8", label="test")
    if outline is not None and len(outline):
        ax.bar(x, (outline / max(outline.sum(), 1))[order], width=0.8, fill=False, edgecolor="black",
               linewidth=0.6, label="train")
    top = int(np.argmax(test[order]))
    side = "left" if top < len(x) / 3 else "right" if top > 2 * len(x) / 3 else "center"  # stay inside the panel
    ax.annotate(f"item {order[top]}: {test[order][top]:.0%}", (x[top], test[order][top]), xytext=(0, 2),
                textcoords="offset points", ha=side, va="bottom", fontsize=7, fontweight="bold")
    ax.set_ylim(0, 1.15)
    ax.set_xticks(x if len(x) <= 20 else x[::5])
    ax.set_xticklabels(order if len(x) <= 20 else order[::5])
    ax.set_xlabel("memory item" + (f" ({len(order)} most used of {len(test)})" if len(order) < len(test) else ""))
    ax.set_ylabel("share of queries")
    ax.set_title(title.replace("\n", "  COLLAPSED\n", 1) if collapsed and "\n" in title
                 else title + ("  COLLAPSED" if collapsed else ""), color=plotting.ALERT if collapsed else "black")
    if collapsed:
        ax.set_facecolor("#fdecea")
