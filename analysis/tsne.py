"""Separateness of the query clusters (claim C9): t-SNE of test queries coloured by their nearest memory item.

For mnad-pred, mnad-pred-nosep and mnad-pred-uniform: a fixed, seeded subsample of analysis.tsne_queries query
vectors of the test set (seeded from the run's seed, so every variant gets the same positions at the same seed).
The separation number is computed on the features themselves, not on the picture: the silhouette score of the
queries grouped by nearest item, cosine metric (NaN when fewer than two items are used), for every seed. The t-SNE
embedding (sklearn, seeded, the memory items embedded together with the queries) is drawn for each variant's first
seed.

Writes analysis/tables/tsne/<dataset>/{silhouette.csv, embedding.csv} and analysis/figures/tsne/<dataset>/tsne.png.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.manifold import TSNE
from sklearn.metrics import silhouette_score

from analysis import plotting
from analysis.common import existing_runs, mean_std, output_dirs, runs_by_variant, seeded_subset
from analysis.inference import LoadedRun, loaded_run
from models.memory import flatten_queries
from pipeline.config import Params
from pipeline.io import write_csv

TOPIC = "tsne"
VARIANTS = ("mnad-pred", "mnad-pred-nosep", "mnad-pred-uniform")


def sample_queries(loaded: LoadedRun, count: int, batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(queries [n, C], nearest item [n], position in the query map [n]) for a seeded subsample of the test set's
    queries. Only the windows that hold a chosen query are run through the model."""
    dataset = loaded.windows("test")
    per_window = (loaded.profile.frame_size // 8) ** 2      # MNAD's query map is 1/8 of the frame per side
    chosen = seeded_subset(len(dataset) * per_window, count, loaded.run.seed)
    windows = np.unique(chosen // per_window)
    wanted = {int(w): chosen[chosen // per_window == w] % per_window for w in windows}
    queries, nearest, where = [], [], []
    for indices, encoded in loaded.encodings(dataset, windows, batch_size):
        rows = flatten_queries(encoded.queries).cpu().numpy().reshape(len(indices), per_window, -1)
        items = encoded.nearest.cpu().numpy().reshape(len(indices), per_window)
        for k, window in enumerate(indices):
            positions = wanted[int(window)]
            queries.append(rows[k, positions])
            nearest.append(items[k, positions])
            where.append(positions)
    return np.concatenate(queries), np.concatenate(nearest), np.concatenate(where)


def silhouette(queries: np.ndarray, nearest: np.ndarray) -> float:
    """Silhouette of the queries grouped by nearest item (cosine); NaN when it is undefined (one item used)."""
    groups = len(np.unique(nearest))
    if groups < 2 or groups >= len(nearest):
        return math.nan
    return float(silhouette_score(queries, nearest, metric="cosine"))


def embed(queries: np.ndarray, items: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """2-D t-SNE of queries and memory items together (items last). Perplexity is capped below the point count."""
    points = np.concatenate([queries, items]).astype(np.float64)
    perplexity = min(perplexity, (len(points) - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)


def tsne(dataset: str, params: Params, runs_root: Path | None = None, data_root: Path | None = None,
         out_root: Path | None = None) -> pd.DataFrame:
    figures, tables = output_dirs(TOPIC, dataset, out_root)
    options = params.analysis
    runs = existing_runs(params, dataset, runs_root, VARIANTS, needs=("checkpoint.pt",))
    scores, embeddings = [], []
    drawn = set()
    for run in runs:
        loaded = loaded_run(run, params, data_root)
        queries, nearest, positions = sample_queries(loaded, options.tsne_queries, params.evaluate.batch_size)
        scores.append({"dataset": dataset, "variant": run.variant, "seed": run.seed, "queries": len(queries),
                       "items_used": len(np.unique(nearest)), "silhouette": silhouette(queries, nearest)})
        if run.variant in drawn:
            continue  # the picture shows each variant's first seed; the silhouette covers every seed
        drawn.add(run.variant)
        items = loaded.model.memory.items.detach().cpu().numpy()
        points = embed(queries, items, options.tsne_perplexity, run.seed)
        embeddings.append(pd.DataFrame({
            "dataset": dataset, "variant": run.variant, "seed": run.seed,
            "kind": ["query"] * len(queries) + ["item"] * len(items),
            "item": np.concatenate([nearest, np.arange(len(items))]),
            "position": np.concatenate([positions, np.full(len(items), -1)]), "x": points[:, 0], "y": points[:, 1]}))

    silhouettes = pd.DataFrame(scores, columns=["dataset", "variant", "seed", "queries", "items_used", "silhouette"])
    columns = ["dataset", "variant", "seed", "kind", "item", "position", "x", "y"]
    embedding = pd.concat(embeddings, ignore_index=True) if embeddings else pd.DataFrame(columns=columns)
    write_csv(tables / "silhouette.csv", silhouettes)
    write_csv(tables / "embedding.csv", embedding.round({"x": 3, "y": 3}))
    if embedding.empty:
        plotting.placeholder(figures / "tsne.png", f"not run here: none of {', '.join(VARIANTS)} trained on {dataset}")
    else:
        tsne_figure(embedding, silhouettes, runs_by_variant(runs), figures / "tsne.png", dataset)
    return silhouettes


def tsne_figure(embedding: pd.DataFrame, silhouettes: pd.DataFrame, grouped: dict, path: Path, dataset: str) -> Path:
    """One column per variant; the top row colours each query by its nearest item (the memory items drawn as
    stars), the bottom row by its position in the query map: clusters that follow position, not item, mean the
    queries encode where they are rather than what they see."""
    variants = [v for v in VARIANTS if v in grouped]
    fig, axes = plotting.figure(2, len(variants), panel=(3.4, 3.4))
    for column, variant in enumerate(variants):
        points = embedding[embedding["variant"] == variant]
        queries, items = points[points["kind"] == "query"], points[points["kind"] == "item"]
        by_item, by_position = axes[0, column], axes[1, column]
        cmap = plotting.plt.get_cmap("tab10" if len(items) <= 10 else "tab20")
        by_item.scatter(queries["x"], queries["y"], c=[cmap(i % cmap.N) for i in queries["item"]], s=4, alpha=0.6,
                        linewidths=0)
        by_item.scatter(items["x"], items["y"], c=[cmap(i % cmap.N) for i in items["item"]], marker="*", s=160,
                        edgecolors="black", linewidths=0.8, label="memory items")
        for _, item in items.iterrows():
            by_item.annotate(str(int(item["item"])), (item["x"], item["y"]), xytext=(4, 4),
                             textcoords="offset points", fontsize=7)
        shown = by_position.scatter(queries["x"], queries["y"], c=queries["position"], cmap="viridis", s=4,
                                    alpha=0.6, linewidths=0)
        fig.colorbar(shown, ax=by_position, label="position in the query map", shrink=0.8)
        seed = int(points["seed"].iloc[0])
        values = silhouettes[silhouettes["variant"] == variant]["silhouette"]
        text = mean_std(values.dropna(), digits=2) if values.notna().any() else "NaN (one item used)"
        by_item.set_title(f"{variant} (seed {seed}), by nearest item\nsilhouette {text} over {len(values)} "
                          f"seed{'s' * (len(values) > 1)}")
        by_position.set_title(f"{variant}, by query position")
        by_item.legend(loc="lower right")
        for ax in (by_item, by_position):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{dataset}: t-SNE of test queries")
    return plotting.save(fig, path)
