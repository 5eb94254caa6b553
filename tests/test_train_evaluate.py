"""Training and evaluation stages on the tiny profile: resume, determinism, outputs, MLflow."""
import json

import pandas as pd
import pytest
import torch

from pipeline.evaluate import evaluate
from pipeline.train import train
from pipeline.tracking import _client


def weights(path):
    return torch.load(path, weights_only=False)["model"]


def test_interrupted_training_resumes_and_matches_an_uninterrupted_run(tiny_data, tmp_path):
    whole = train("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=tmp_path / "whole")
    cut = train("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=tmp_path / "cut", stop_after_epoch=1)
    state = torch.load(cut, weights_only=False)
    assert state["epoch"] == 1 and not (cut.parent / "train_log.csv").exists()
    resumed = train("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=tmp_path / "cut")
    assert torch.load(resumed, weights_only=False)["epoch"] == 2
    log = pd.read_csv(resumed.parent / "train_log.csv")
    assert log["epoch"].tolist() == [1, 2]
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # memory items included: same buffer after the same updates


def test_changed_config_does_not_resume(tiny_data, tmp_path, monkeypatch):
    path = train("tiny", "ae-recon", 0, data_root=tiny_data, runs_root=tmp_path, stop_after_epoch=1)
    state = torch.load(path, weights_only=False)
    state["fingerprint"] = "something-else"
    torch.save(state, path)
    train("tiny", "ae-recon", 0, data_root=tiny_data, runs_root=tmp_path)
    log = pd.read_csv(path.parent / "train_log.csv")
    assert log["epoch"].tolist() == [1, 2]  # started over: both epochs logged by this run


def test_same_seed_gives_identical_metrics_and_mlflow_holds_one_run(tiny_data, tmp_path):
    results = []
    for attempt in ("a", "b"):
        root = tmp_path / attempt
        train("tiny", "mnad-recon", 1, data_root=tiny_data, runs_root=root)
        evaluate("tiny", "mnad-recon", 1, data_root=tiny_data, runs_root=root)
        results.append((root / "tiny" / "mnad-recon" / "seed1" / "metrics.json").read_text())
    assert results[0] == results[1]
    metrics = json.loads(results[0])
    assert {"without_update", "with_update"} <= set(metrics)
    assert 0.0 <= metrics["with_update"]["auc_micro"] <= 1.0
    scores = pd.read_csv(tmp_path / "a" / "tiny" / "mnad-recon" / "seed1" / "scores.csv", keep_default_na=False)
    assert list(scores.columns) == ["video", "frame", "label", "anomaly_type", "psnr", "distance", "score",
                                    "psnr_update", "distance_update", "memory_updated", "score_update"]
    assert len(scores) == metrics["frames"]
    assert metrics["with_update"]["updated_frames"] == scores["memory_updated"].sum()

    client = _client()
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.variant = 'mnad-recon' and tags.seed = '1'")
    assert len(runs) == 1  # the second training deleted the first run's stale curves instead of duplicating
    run = runs[0]
    assert run.info.run_name == "mnad-recon/seed1"
    assert "loss" in run.data.metrics and "eval.with_update.auc_micro" in run.data.metrics
    assert run.data.params["variant.compactness_weight"] == "0.01"
    assert run.data.tags["dvc_stage"] == "train@tiny-mnad-recon-1" and "torch_version" in run.data.tags


def test_copy_last_is_evaluated_without_a_checkpoint(tiny_data, tmp_path):
    metrics = evaluate("tiny", "copy-last", 0, data_root=tiny_data, runs_root=tmp_path)
    assert "with_update" not in metrics
    scores = pd.read_csv(tmp_path / "tiny" / "copy-last" / "seed0" / "scores.csv", keep_default_na=False)
    assert scores["frame"].min() == 4  # prediction never scores a video's first four frames
    assert "distance" not in scores.columns and metrics["without_update"]["auc_micro"] > 0.5
