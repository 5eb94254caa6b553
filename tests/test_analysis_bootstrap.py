"""The paired bootstrap over test videos behind every two-variant verdict."""
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from analysis.bootstrap import (DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, SeedScores, Term, band_verdict, difference,
                                interval_verdict, paired_bootstrap, resampled_auc)

VIDEOS = [f"{v:02d}" for v in range(10)]


def crafted_seed(separation: float, seed: int, frames_per_video: int = 60) -> SeedScores:
    """Ten videos, an abnormal event in each; normal frames score `separation` higher on average."""
    rng = np.random.default_rng(seed)
    videos = np.repeat(VIDEOS, frames_per_video)
    labels = np.tile((np.arange(frames_per_video) % 20 >= 14).astype(int), len(VIDEOS))
    scores = rng.normal(0, 1, len(labels)) + separation * (1 - labels)
    return SeedScores(labels, scores, videos)


def test_resampled_auc_equals_sklearn_on_the_concatenated_resample():
    seed = crafted_seed(0.8, 0)
    seed = SeedScores(seed.labels, np.round(seed.scores, 1), seed.videos)  # ties count one half, as sklearn
    counts = np.random.default_rng(1).multinomial(10, np.full(10, 0.1), size=6).astype(float)
    fast = resampled_auc(seed, VIDEOS, counts)
    for row, value in zip(counts, fast):
        chosen = np.concatenate([np.flatnonzero(seed.videos == v) for v, c in zip(VIDEOS, row) for _ in range(int(c))])
        assert value == pytest.approx(roc_auc_score(1 - seed.labels[chosen], seed.scores[chosen]), abs=1e-12)


def test_identical_variants_give_an_interval_around_zero_and_inconclusive():
    seeds = [crafted_seed(0.8, s) for s in range(3)]
    result = difference(seeds, seeds, samples=500, seed=0)
    assert result.estimate == 0 and result.low <= 0 <= result.high
    assert result.verdict == INCONCLUSIVE


def test_a_clearly_better_variant_gives_an_interval_above_zero():
    better = [crafted_seed(2.0, s) for s in range(3)]
    worse = [crafted_seed(0.3, 10 + s) for s in range(3)]
    result = difference(better, worse, samples=1000, seed=0)
    assert result.low > 0 and result.verdict == HOLDS
    assert difference(worse, better, samples=1000, seed=0).verdict == DOES_NOT_HOLD


def test_the_interval_is_reproducible_for_a_fixed_seed_and_moves_with_another():
    a = [crafted_seed(1.0, s) for s in range(3)]
    b = [crafted_seed(0.8, 20 + s) for s in range(3)]
    first, again = difference(a, b, 300, seed=7), difference(a, b, 300, seed=7)
    assert (first.low, first.high) == (again.low, again.high)
    other = difference(a, b, 300, seed=8)
    assert (other.low, other.high) != (first.low, first.high) and other.estimate == first.estimate


def test_the_estimate_is_the_difference_of_seed_averaged_micro_aucs():
    a = [crafted_seed(1.0, s) for s in range(3)]
    b = [crafted_seed(0.5, 30)]  # a deterministic floor with one seed, like copy-last
    expected = np.mean([roc_auc_score(1 - s.labels, s.scores) for s in a]) - roc_auc_score(1 - b[0].labels, b[0].scores)
    assert difference(a, b, 200, 0).estimate == pytest.approx(expected)


def test_a_difference_of_differences_is_a_sum_of_signed_terms():
    x, y = [crafted_seed(1.5, 1)], [crafted_seed(0.5, 2)]
    result = paired_bootstrap([Term(1, x), Term(-1, y), Term(-1, x), Term(1, y)], 200, 0)
    assert result.estimate == pytest.approx(0) and result.low == pytest.approx(0) and result.high == pytest.approx(0)


def test_nan_scores_make_the_result_undefined_and_inconclusive():
    seed = crafted_seed(1.0, 0)
    broken = SeedScores(seed.labels, np.where(seed.videos == "03", np.nan, seed.scores), seed.videos)
    result = difference([broken], [seed], 200, 0)
    assert np.isnan(result.low) and result.verdict == INCONCLUSIVE
    assert interval_verdict(float("nan"), 1.0) == INCONCLUSIVE


def test_two_thousand_resamples_over_ten_videos_and_three_seeds_take_seconds():
    a = [crafted_seed(1.0, s, frames_per_video=200) for s in range(3)]
    b = [crafted_seed(0.9, 40 + s, frames_per_video=200) for s in range(3)]
    started = time.perf_counter()
    result = difference(a, b, samples=2000, seed=0)
    assert time.perf_counter() - started < 5.0
    assert result.samples == 2000


def test_seed_variance_widens_the_interval():
    """Three seeds that disagree (AUC about 0.6, 0.75, 0.95) but each on the same videos: resampling the seeds must
    widen the interval of the difference to a steady floor; with identical seeds it must not."""
    disagreeing = [crafted_seed(separation, s) for s, separation in enumerate((0.35, 0.95, 2.4))]
    floor = [crafted_seed(0.0, 50)]
    videos_only = difference(disagreeing, floor, 1000, 0, resample_seeds=False)
    both = difference(disagreeing, floor, 1000, 0)
    assert both.estimate == videos_only.estimate
    assert (both.high - both.low) > 1.5 * (videos_only.high - videos_only.low)
    agreeing = [crafted_seed(0.95, 0)] * 3
    same_models = difference(agreeing, floor, 1000, 0), difference(agreeing, floor, 1000, 0, resample_seeds=False)
    assert same_models[0].high - same_models[0].low == pytest.approx(same_models[1].high - same_models[1].low)


def test_a_variant_against_itself_keeps_its_seeds_paired():
    """With against without test-time update: the same models on both sides; a shared seed draw gives exactly 0."""
    seeds = [crafted_seed(separation, s) for s, separation in enumerate((0.3, 1.0, 2.0))]
    result = difference(seeds, seeds, 500, 0)
    assert result.low == result.high == 0


def test_a_stated_size_is_checked_against_a_band():
    band = (0.01, 0.07)   # "about +4 points"
    assert band_verdict(0.02, 0.06, band) == HOLDS
    assert band_verdict(0.08, 0.12, band) == DOES_NOT_HOLD and band_verdict(-0.05, 0.0, band) == DOES_NOT_HOLD
    assert band_verdict(0.0, 0.05, band) == INCONCLUSIVE and band_verdict(float("nan"), 0.05, band) == INCONCLUSIVE
