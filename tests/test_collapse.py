"""The collapse study's numbers on crafted inputs: the entropy trend and the NaN heuristic; a study without
settings."""
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis.collapse import FINAL_COLUMNS, collapse_study, constant_distance_videos, entropy_slope
from pipeline.config import DEFAULT_PARAMS, parse_params


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


def test_a_study_without_settings_writes_empty_tables_that_the_report_reads_as_not_run(tmp_path):
    from analysis.claims import NOT_RUN, assess_collapse_study
    from analysis.report import collapse_section
    from analysis.results import Results

    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["collapse"]["settings"], raw["collapse"]["datasets"] = {}, []   # the quick look without the collapse study
    params = parse_params(raw)
    final = collapse_study(params, tmp_path / "runs", tmp_path / "data", tmp_path)
    assert final.empty
    written = tmp_path / "tables" / "collapse" / "final.csv"
    assert written.read_text().strip() == ",".join(FINAL_COLUMNS)   # a header, so readers get an empty table
    for figure in ("usage_over_training.png", "histograms.png", "nan_heuristic.png"):
        assert (tmp_path / "figures" / "collapse" / figure).stat().st_size > 0
    results = Results(params, None, tmp_path, tmp_path)
    section = collapse_section(results)
    assert section.endswith("not run here: params.yaml `collapse.settings` lists no setting (the quick look leaves "
                            "the study out; the default study runs it).")
    assessment = assess_collapse_study(results)
    assert assessment.verdict == NOT_RUN and "the collapse study has no run" in assessment.lines[0]
