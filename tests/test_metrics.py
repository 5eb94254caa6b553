"""Evaluation arithmetic against values computed by hand."""
import math

import numpy as np
import pandas as pd
import pytest

from pipeline.metrics import (auc, auc_by_type, macro_auc, minmax_per_video, normality_score, psnr_from_mse,
                              regularity_score, summarise, usage_stats)


def test_psnr_by_hand():
    assert psnr_from_mse(np.array([0.01, 0.1, 1.0])).tolist() == pytest.approx([20.0, 10.0, 0.0])
    assert psnr_from_mse(np.array([0.0]))[0] == pytest.approx(100.0)  # capped, not infinite


def test_minmax_per_video_and_degenerate_videos():
    values = np.array([1.0, 3.0, 2.0, 5.0, 5.0])
    videos = np.array(["a", "a", "a", "b", "b"])
    safe, degenerate = minmax_per_video(values, videos, "safe")
    assert safe.tolist() == [0.0, 1.0, 0.5, 0.0, 0.0] and degenerate == 1
    reference, degenerate = minmax_per_video(values, videos, "reference")
    assert reference[:3].tolist() == [0.0, 1.0, 0.5] and np.isnan(reference[3:]).all() and degenerate == 1


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
