"""The collapse study's numbers on crafted inputs: the entropy trend and the NaN heuristic."""
import math

import numpy as np
import pandas as pd
import pytest

from analysis.collapse import constant_distance_videos, entropy_slope


def test_the_entropy_slope_is_fitted_against_log_steps_over_the_second_half():
    steps = np.arange(40, 2481, 40)                    # a row every 40 steps, as train_log.csv
    entropy = 2.0 - 0.5 * np.log10(steps)            # exactly -0.5 nats per decade
    entropy[: len(steps) // 3] = 9.0                   # the first half of training is left out
    slope, error = entropy_slope(steps, entropy)
    assert slope == pytest.approx(-0.5) and error == pytest.approx(0.0, abs=1e-9)
    noisy = entropy + np.random.default_rng(0).normal(0, 0.05, len(steps))
    assert entropy_slope(steps, noisy)[1] > 0
    assert all(math.isnan(v) for v in entropy_slope(np.array([5, 10]), np.array([1.0, 0.5])))


def test_constant_distance_videos_are_the_ones_min_max_divides_zero_by_zero():
    scores = pd.DataFrame({"video": ["a", "a", "b", "b", "c"], "distance": [0.3, 0.3, 0.1, 0.2, 0.4]})
    assert constant_distance_videos(scores) == 2   # a, and c with a single frame
