"""Two-level paired bootstrap over seeds and test videos for differences of frame-level (micro) AUCs.

A verdict that one variant beats another rests on the interval of the difference of their AUCs, not on two means.
Each resample draws the test videos with replacement, the SAME draw for every variant involved, and the seeds with
replacement (one draw of seed positions shared by the terms that have as many seeds, so that a variant compared
with itself, e.g. with against without test-time update, keeps its models paired). Every drawn seed's micro AUC is
computed on the frames of the drawn videos (a video drawn twice counts twice), averaged over the drawn seeds, and
combined into the difference. The interval therefore carries both the test set's variance and the training's (seed)
variance. Videos, not frames, are the resampling unit because frames within a video are strongly correlated.

The AUC of a resample is exact and cheap: for one seed's scores, P[u, v] counts the (normal frame of video u,
abnormal frame of video v) pairs the score orders correctly (ties count one half). A resample that draws video u
c_u times then has AUC = c^T P c / ((c . normal) (c . abnormal)), the same value roc_auc_score gives on the
concatenated frames. P is computed once per seed; every resample is then a few matrix products.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, NOT_RUN = "holds", "does not hold", "inconclusive", "not run here"
# Verdicts that stand before any interval: a run it rests on has not learnt; the mechanism compared never fired.
UNDERTRAINED, NOT_EXERCISED = "undertrained", "not exercised"


@dataclass(frozen=True)
class SeedScores:
    """One seed's per-frame scores: 0/1 abnormal labels, NORMALITY score (higher = more normal), video of each frame."""

    labels: np.ndarray
    scores: np.ndarray
    videos: np.ndarray


@dataclass(frozen=True)
class Term:
    """sign * (mean over seeds of micro AUC): a difference A - B is Term(+1, A), Term(-1, B)."""

    sign: float
    seeds: Sequence[SeedScores]


@dataclass(frozen=True)
class BootstrapResult:
    estimate: float     # the combination of the AUCs on all test videos (no resampling)
    low: float          # percentile interval of the resampled combination
    high: float
    samples: int        # resamples that had both normal and abnormal frames for every seed (others are dropped)
    level: float

    @property
    def verdict(self) -> str:
        return interval_verdict(self.low, self.high)


def interval_verdict(low: float, high: float) -> str:
    """Above 0: holds; below 0: does not hold; straddling 0 or undefined: inconclusive."""
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if low > 0:
        return HOLDS
    if high < 0:
        return DOES_NOT_HOLD
    return INCONCLUSIVE


def pair_counts(seed: SeedScores, video_order: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P [K, K], normal frames per video [K], abnormal frames per video [K]) over the videos of `video_order`."""
    index = {video: k for k, video in enumerate(video_order)}
    video_idx = np.array([index[v] for v in seed.videos], dtype=np.int64)
    scores = np.asarray(seed.scores, dtype=np.float64)
    abnormal = np.asarray(seed.labels) == 1
    n_videos = len(video_order)
    normal_scores, normal_videos = scores[~abnormal], video_idx[~abnormal]
    pairs = np.zeros((n_videos, n_videos))
    for v in np.unique(video_idx[abnormal]):
        sorted_abnormal = np.sort(scores[abnormal & (video_idx == v)])
        below = np.searchsorted(sorted_abnormal, normal_scores, side="left")
        up_to = np.searchsorted(sorted_abnormal, normal_scores, side="right")
        credit = below + 0.5 * (up_to - below)   # abnormal frames of video v that each normal frame outranks
        pairs[:, v] = np.bincount(normal_videos, weights=credit, minlength=n_videos)
    normal_count = np.bincount(normal_videos, minlength=n_videos).astype(np.float64)
    abnormal_count = np.bincount(video_idx[abnormal], minlength=n_videos).astype(np.float64)
    return pairs, normal_count, abnormal_count


def resampled_auc(seed: SeedScores, video_order: Sequence[str], counts: np.ndarray) -> np.ndarray:
    """Micro AUC of one seed on each resample; counts [R, K] says how often each video is drawn. NaN where a
    resample lacks normal or abnormal frames, or where the seed has NaN scores."""
    if np.isnan(np.asarray(seed.scores, dtype=np.float64)).any():
        return np.full(len(counts), math.nan)
    pairs, normal_count, abnormal_count = pair_counts(seed, video_order)
    numerator = np.einsum("rk,kl,rl->r", counts, pairs, counts)
    denominator = (counts @ normal_count) * (counts @ abnormal_count)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1.0), math.nan)


def paired_bootstrap(terms: Sequence[Term], samples: int, seed: int, level: float = 0.95,
                     resample_seeds: bool = True) -> BootstrapResult:
    """Interval of sum_i sign_i * mean_seeds AUC_i over `samples` paired resamples of the test videos and, with
    `resample_seeds`, of each term's seeds."""
    videos = sorted({str(v) for term in terms for s in term.seeds for v in np.asarray(s.videos)})
    if not videos or any(len(term.seeds) == 0 for term in terms):
        raise ValueError("every term needs at least one seed with scored frames")
    rng = np.random.default_rng(seed)
    resamples = rng.multinomial(len(videos), np.full(len(videos), 1.0 / len(videos)), size=samples).astype(float)
    seed_draws = {n: (rng.integers(0, n, size=(samples, n)) if resample_seeds else np.tile(np.arange(n), (samples, 1)))
                  for n in sorted({len(term.seeds) for term in terms})}
    everything = np.ones((1, len(videos)))    # the full test set: each video once, each seed once

    def combine(counts: np.ndarray, draws: dict[int, np.ndarray]) -> np.ndarray:
        total = np.zeros(len(counts))
        for term in terms:
            per_seed = np.stack([resampled_auc(_as_str_videos(s), videos, counts) for s in term.seeds])  # [S, R]
            drawn = np.take_along_axis(per_seed, draws[len(term.seeds)].T, axis=0)                     # [S, R]
            total = total + term.sign * drawn.mean(axis=0)
        return total

    estimate = float(combine(everything, {n: np.arange(n)[None] for n in seed_draws})[0])
    resampled = combine(resamples, seed_draws)
    valid = resampled[~np.isnan(resampled)]
    if math.isnan(estimate) or len(valid) == 0:
        return BootstrapResult(estimate, math.nan, math.nan, int(len(valid)), level)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(valid, [tail, 100 - tail])
    return BootstrapResult(estimate, float(low), float(high), int(len(valid)), level)


def _as_str_videos(seed: SeedScores) -> SeedScores:
    """Video names compared as strings, whatever type a CSV reader gave them."""
    return SeedScores(seed.labels, seed.scores, np.asarray(seed.videos).astype(str))


def difference(a: Sequence[SeedScores], b: Sequence[SeedScores], samples: int, seed: int,
               level: float = 0.95, resample_seeds: bool = True) -> BootstrapResult:
    """AUC(a) - AUC(b), each averaged over its seeds, with its paired-bootstrap interval."""
    return paired_bootstrap([Term(1.0, a), Term(-1.0, b)], samples, seed, level, resample_seeds)


def band_verdict(low: float, high: float, band: tuple[float, float]) -> str:
    """A claim that states a size ("about +4 points"): holds when the whole interval lies inside `band`, does not
    hold when it lies wholly outside, inconclusive when it straddles an edge (or is undefined)."""
    if math.isnan(low) or math.isnan(high):
        return INCONCLUSIVE
    if band[0] <= low and high <= band[1]:
        return HOLDS
    if high < band[0] or low > band[1]:
        return DOES_NOT_HOLD
    return INCONCLUSIVE
