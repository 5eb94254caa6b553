"""Evaluation arithmetic against values computed by hand."""
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.metrics import (UsageAccumulator, auc, auc_by_type, macro_auc, minmax_per_video, normality_score,
                              position_nmi, psnr_from_mse, regularity_score, summarise, usage_stats)


def test_psnr_by_hand():
    assert psnr_from_mse(np.array([0.01, 0.1, 1.0])).tolist() == pytest.approx([20.0, 10.0, 0.0])
    assert psnr_from_mse(np.array([0.0]))[0] == pytest.approx(100.0)  # capped, not infinite


def test_minmax_per_video_and_degenerate_videos():
    values = np.array([1.0, 3.0, 2.0, 5.0, 5.0])
    videos = np.array(["a", "a", "a", "b", "b"])
    safe, degenerate = minmax_per_video(values, videos, "safe")
    assert safe.tolist() == [0.0, 1.0, 0.5, 0.5, 0.5] and degenerate == {"b"}  # the middle: no evidence either way
    reference, degenerate = minmax_per_video(values, videos, "reference")
    assert reference[:3].tolist() == [0.0, 1.0, 0.5] and np.isnan(reference[3:]).all() and degenerate == {"b"}


def test_degenerate_videos_are_the_union_of_the_psnr_and_distance_ones():
    videos = np.array(["a", "a", "b", "b", "c", "c"])
    psnr = np.array([20.0, 20.0, 21.0, 22.0, 25.0, 25.0])       # a and c constant
    distance = np.array([0.1, 0.2, 0.3, 0.3, 0.4, 0.4])         # b and c constant
    score, degenerate = normality_score(psnr, videos, alpha=0.6, distance=distance)
    assert degenerate == 3   # a, b, c: the union, not max(2, 2)
    assert score[4:].tolist() == pytest.approx([0.6 * 0.5 + 0.4 * 0.5] * 2)


def test_combined_score_by_hand():
    psnr = np.array([10.0, 20.0, 30.0])
    distance = np.array([0.3, 0.1, 0.2])
    videos = np.array(["v"] * 3)
    score, _ = normality_score(psnr, videos, alpha=0.6, distance=distance)
    # g(psnr) = [0, .5, 1]; g(d) = [1, 0, .5]; S = .6 g(psnr) + .4 (1 - g(d))
    assert score.tolist() == pytest.approx([0.0, 0.3 + 0.4, 0.6 + 0.2])
    only_psnr, _ = normality_score(psnr, videos, alpha=0.6)
    assert only_psnr.tolist() == pytest.approx([0.0, 0.5, 1.0])
    regularity, _ = regularity_score(np.array([2.0, 4.0, 3.0]), videos)
    assert regularity.tolist() == pytest.approx([1.0, 0.0, 0.5])


def test_micro_auc_counts_pairs():
    labels = np.array([0, 0, 1, 1])
    score = np.array([0.9, 0.2, 0.4, 0.1])  # normal frames should score high
    # normal-vs-abnormal pairs ordered correctly: (0.9>0.4, 0.9>0.1, 0.2>0.1) = 3 of 4
    assert auc(labels, score) == pytest.approx(0.75)
    assert math.isnan(auc(np.array([0, 0]), np.array([0.1, 0.2])))
    assert math.isnan(auc(labels, np.array([0.9, np.nan, 0.4, 0.1])))


def test_macro_auc_excludes_single_class_videos():
    labels = np.array([0, 1, 0, 1, 0, 0])
    score = np.array([0.9, 0.1, 0.1, 0.9, 0.5, 0.6])
    videos = np.array(["a", "a", "b", "b", "c", "c"])
    assert macro_auc(labels, score, videos) == pytest.approx(0.5)  # (1 + 0) / 2; c has one class


def test_auc_by_type_uses_each_types_frames_against_normal_frames():
    labels = np.array([0, 0, 1, 1])
    types = np.array(["", "", "spatial", "temporal"])
    score = np.array([0.8, 0.6, 0.7, 0.1])
    result = auc_by_type(labels, score, types)
    assert result == {"spatial": pytest.approx(0.5), "temporal": pytest.approx(1.0)}


def test_summarise_block():
    frame = pd.DataFrame({"video": ["a"] * 4, "label": [0, 0, 1, 1], "anomaly_type": ["", "", "temporal", "temporal"],
                          "score": [0.9, 0.2, 0.4, 0.1]})
    block = summarise(frame, "score", degenerate=0)
    assert block == {"auc_micro": pytest.approx(0.75), "auc_macro": pytest.approx(0.75), "nan_videos": 0,
                     "auc_temporal": pytest.approx(0.75)}


def test_usage_stats_collapse_and_even():
    collapsed = usage_stats(np.array([0, 40, 0, 0]))
    assert collapsed == {"entropy": 0.0, "perplexity": 1.0, "items_used": 1, "top_share": 1.0, "collapsed": 1}
    even = usage_stats(np.array([5, 5, 5, 5]))
    assert even["entropy"] == pytest.approx(math.log(4)) and even["perplexity"] == pytest.approx(4.0)
    assert even["items_used"] == 4 and even["collapsed"] == 0


def test_position_nmi_is_one_for_position_coded_usage_and_near_zero_for_content_coded():
    rng = np.random.default_rng(0)
    windows, positions, items, dim = 400, 16, 10, 4
    position_coded = np.tile(np.arange(positions) % items, (windows, 1))        # each position its own item
    content_coded = rng.integers(0, items, size=(windows, positions))            # the item follows the frame
    queries = rng.normal(size=(windows, positions, dim))
    for nearest, expected in ((position_coded, 1.0), (content_coded, 0.0)):
        accumulator = UsageAccumulator(items, positions, dim)
        for start in range(0, windows, 64):   # in batches, as the analyses feed it
            accumulator.add(nearest[start:start + 64], queries[start:start + 64])
        assert accumulator.stats()["position_nmi"] == pytest.approx(expected, abs=0.03)
    assert math.isnan(position_nmi(np.array([[5, 0], [7, 0]])))   # one item takes every query: undefined


def test_position_nmi_by_hand():
    # two positions, two items: position 0 picks item 0 three times and item 1 once; position 1 picks item 1 always
    joint = np.array([[3, 1], [0, 4]])
    p = joint / 8
    h_item = -(0.375 * math.log(0.375) + 0.625 * math.log(0.625))
    mutual = sum(p[i, j] * math.log(p[i, j] / (p[i].sum() * p[:, j].sum())) for i in range(2) for j in range(2)
                 if joint[i, j])
    assert position_nmi(joint) == pytest.approx(mutual / h_item)


def test_position_variance_share():
    rng = np.random.default_rng(1)
    windows, positions, dim = 300, 9, 3
    by_position = np.broadcast_to(rng.normal(size=(1, positions, dim)) * 5, (windows, positions, dim))
    noise = rng.normal(size=(windows, positions, dim))
    shares = {}
    for name, queries in (("position only", by_position), ("noise only", noise), ("half", by_position / 5 + noise)):
        accumulator = UsageAccumulator(2, positions, dim)
        accumulator.add(np.zeros((windows, positions), dtype=np.int64), queries)
        shares[name] = accumulator.stats()["position_variance_share"]
    assert shares["position only"] == pytest.approx(1.0)
    assert shares["noise only"] == pytest.approx(0.0, abs=0.02)
    # by hand: the between-position variance over the total
    half = by_position / 5 + noise
    flat = half.reshape(-1, dim)
    between = ((half.mean(axis=0) - flat.mean(axis=0)) ** 2).sum() * windows
    assert shares["half"] == pytest.approx(between / ((flat - flat.mean(axis=0)) ** 2).sum())
