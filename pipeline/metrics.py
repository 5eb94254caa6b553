"""Evaluation arithmetic of the reference protocol (REFERENCE.md §1, §3), as plain numpy/pandas functions.

Scores are NORMALITY scores (higher = more normal), as MNAD: AUC = roc_auc_score(1 - label, score).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

ANOMALY_TYPES = ("spatial", "temporal", "spatio_temporal")


def psnr_from_mse(mse: np.ndarray) -> np.ndarray:
    """PSNR of images in [0, 1]: 10 log10(1 / mse). A perfect frame (mse 0) is capped at 100 dB, not infinity."""
    mse = np.asarray(mse, dtype=np.float64)
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def minmax_per_video(values: np.ndarray, videos: np.ndarray, nan_policy: str = "safe") -> tuple[np.ndarray, set]:
    """Min-max normalise each video's series to [0, 1]; returns (normalised, the degenerate videos).

    A video whose series is constant divides 0/0 in the reference code (MNAD issue #6): `reference` keeps that NaN;
    `safe` maps the series to 0.5, the middle of the normalised range, so the video's frames are neither more
    normal nor more abnormal than any other frame of the same video by that series. Either way the video is listed.
    """
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    degenerate = set()
    for video in pd.unique(videos):
        mask = videos == video
        series = values[mask]
        lo, hi = series.min(), series.max()
        if hi - lo > 0:
            out[mask] = (series - lo) / (hi - lo)
            continue
        degenerate.add(video)
        if nan_policy == "reference":
            with np.errstate(invalid="ignore", divide="ignore"):
                out[mask] = (series - lo) / (hi - lo)
        else:
            out[mask] = 0.5
    return out, degenerate


def normality_score(psnr: np.ndarray, videos: np.ndarray, alpha: float, distance: np.ndarray | None = None,
                    nan_policy: str = "safe") -> tuple[np.ndarray, int]:
    """S = alpha g(PSNR) + (1 - alpha)(1 - g(D)) per video (MNAD); with no memory distance, S = g(PSNR).

    Returns (score, the number of videos where the PSNR or the distance series, or both, is constant).
    """
    g_psnr, degenerate = minmax_per_video(psnr, videos, nan_policy)
    if distance is None:
        return g_psnr, len(degenerate)
    g_dist, degenerate_dist = minmax_per_video(distance, videos, nan_policy)
    return alpha * g_psnr + (1.0 - alpha) * (1.0 - g_dist), len(degenerate | degenerate_dist)


def regularity_score(error: np.ndarray, videos: np.ndarray, nan_policy: str = "safe") -> tuple[np.ndarray, int]:
    """MemAE's per-video regularity 1 - (e - min) / max(e - min), i.e. 1 - g(e); and the degenerate video count."""
    g_error, degenerate = minmax_per_video(error, videos, nan_policy)
    return 1.0 - g_error, len(degenerate)


def auc(labels: np.ndarray, score: np.ndarray) -> float:
    """Frame-level AUC of a normality score against 0/1 abnormal labels; NaN when undefined (one class, NaN score)."""
    from sklearn.metrics import roc_auc_score  # imported here: 1.5 s that the training stage does not need

    labels = np.asarray(labels)
    score = np.asarray(score, dtype=np.float64)
    if len(np.unique(labels)) < 2 or np.isnan(score).any():
        return math.nan
    return float(roc_auc_score(1 - labels, score))


def macro_auc(labels: np.ndarray, score: np.ndarray, videos: np.ndarray) -> float:
    """Mean of per-video AUCs; videos holding one class only are excluded (their AUC is undefined)."""
    per_video = [auc(labels[videos == v], score[videos == v]) for v in pd.unique(videos)
                 if len(np.unique(labels[videos == v])) == 2]
    return float(np.mean(per_video)) if per_video else math.nan


def auc_by_type(labels: np.ndarray, score: np.ndarray, types: np.ndarray) -> dict[str, float]:
    """AUC of each anomaly type's frames against all normal frames (synthetic data records the type)."""
    out = {}
    normal = labels == 0
    for kind in ANOMALY_TYPES:
        chosen = normal | ((labels == 1) & (types == kind))
        if (labels[chosen] == 1).any():
            out[kind] = auc(labels[chosen], score[chosen])
    return out


def roc_points(labels: np.ndarray, score: np.ndarray) -> pd.DataFrame:
    """ROC curve of abnormal-vs-normal with the abnormality score 1 - S (for plots)."""
    from sklearn.metrics import roc_curve

    if len(np.unique(labels)) < 2 or np.isnan(score).any():
        return pd.DataFrame({"fpr": [], "tpr": []})
    fpr, tpr, _ = roc_curve(labels, -np.asarray(score))
    return pd.DataFrame({"fpr": fpr, "tpr": tpr})


def headline_scoring(metrics: dict) -> str:
    """The scoring a variant is judged by: with test-time update where the variant has it (as MNAD evaluates),
    else without."""
    return "with_update" if "with_update" in metrics else "without_update"


def summarise(frame: pd.DataFrame, score_column: str, degenerate: int) -> dict[str, float]:
    """The metrics block of one scoring (with or without test-time update)."""
    labels = frame["label"].to_numpy()
    score = frame[score_column].to_numpy(dtype=np.float64)
    videos = frame["video"].to_numpy()
    block = {"auc_micro": auc(labels, score), "auc_macro": macro_auc(labels, score, videos),
             "nan_videos": int(degenerate)}
    types = frame["anomaly_type"].to_numpy()
    for kind, value in auc_by_type(labels, score, types).items():
        block[f"auc_{kind}"] = value
    return block


def usage_stats(counts: np.ndarray, collapse_share: float = 0.9) -> dict[str, float]:
    """How a memory's queries spread over its items, from per-item nearest-item counts.

    entropy is in nats (0 when every query picks one item, log M when usage is even); perplexity = exp(entropy) is
    the effective number of items used; collapsed flags a top item holding at least `collapse_share` of queries.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return {"entropy": math.nan, "perplexity": math.nan, "items_used": 0, "top_share": math.nan, "collapsed": 0}
    share = counts / total
    nonzero = share[share > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum()) + 0.0   # one item: -(1 log 1) is -0.0
    top = float(share.max())
    return {"entropy": entropy, "perplexity": float(np.exp(entropy)), "items_used": int((counts > 0).sum()),
            "top_share": top, "collapsed": int(top >= collapse_share)}


class UsageAccumulator:
    """How a memory's queries choose items, accumulated over batches of windows: per-item counts, and how much of
    that choice is set by the query's position in the map rather than by what the frame shows.

    `add(nearest, queries)` takes each window's nearest items [B, P] (P positions of its query map, flattened) and
    the queries [B, P, C]. `stats()` returns usage_stats plus
      position_nmi:  I(position; item) / H(item), the share of the item choice's entropy that position alone
                     explains: 1 when every position always picks its own fixed item, whatever the input; 0 when
                     position says nothing about the item. NaN when one item takes every query (H(item) = 0).
      position_variance_share: the share of the queries' total variance that lies between position means (the R^2
                     of position as the only factor): 1 when a query depends on its position only, 0 when position
                     does not matter.
    """

    def __init__(self, items: int, positions: int, dim: int):
        self.joint = np.zeros((positions, items), dtype=np.int64)   # position x item counts
        self.position_sums = np.zeros((positions, dim))
        self.square_sum = 0.0
        self.windows = 0

    def add(self, nearest: np.ndarray, queries: np.ndarray) -> None:
        windows, positions = nearest.shape
        np.add.at(self.joint, (np.broadcast_to(np.arange(positions), nearest.shape).ravel(), nearest.ravel()), 1)
        queries = np.asarray(queries, dtype=np.float64)
        self.position_sums += queries.sum(axis=0)
        self.square_sum += float((queries ** 2).sum())
        self.windows += windows

    @property
    def counts(self) -> np.ndarray:
        return self.joint.sum(axis=0)

    def stats(self, collapse_share: float = 0.9) -> dict[str, float]:
        return {**usage_stats(self.counts, collapse_share), "position_nmi": position_nmi(self.joint),
                "position_variance_share": self.position_variance_share()}

    def position_variance_share(self) -> float:
        total_count = self.windows * self.joint.shape[0]
        if total_count == 0:
            return math.nan
        grand_mean = self.position_sums.sum(axis=0) / total_count
        total = self.square_sum - total_count * float(grand_mean @ grand_mean)
        position_means = self.position_sums / self.windows
        between = self.windows * float(((position_means - grand_mean) ** 2).sum())
        return between / total if total > 1e-12 * max(self.square_sum, 1.0) else math.nan


def position_nmi(joint: np.ndarray) -> float:
    """I(position; item) / H(item) from a position x item count table (see UsageAccumulator)."""
    joint = np.asarray(joint, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return math.nan
    p = joint / total
    p_item, p_position = p.sum(axis=0), p.sum(axis=1)
    item_entropy = float(-(p_item[p_item > 0] * np.log(p_item[p_item > 0])).sum())
    if item_entropy <= 0:
        return math.nan
    nonzero = p > 0
    outer = np.outer(p_position, p_item)
    mutual = float((p[nonzero] * np.log(p[nonzero] / outer[nonzero])).sum())
    return max(0.0, mutual) / item_entropy
