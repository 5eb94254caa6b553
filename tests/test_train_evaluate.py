"""Training and evaluation stages on the tiny profile: resume, determinism, outputs, MLflow."""
import copy
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from models.build import split_clip
from models.mnad import point_score
from pipeline import checkpoint as ckpt
from pipeline.config import DEFAULT_PARAMS
from pipeline.data import clip_dataset
from pipeline.evaluate import evaluate, score_batched, score_frozen_after, score_with_update
from pipeline.paths import frames_dir
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


def test_chunked_test_time_update_equals_the_frame_by_frame_loop(tiny_data, tmp_path):
    path = train("tiny", "mnad-recon", 0, data_root=tiny_data, runs_root=tmp_path)
    model, variant, _ = ckpt.load_model(path)
    test_set = clip_dataset(frames_dir("tiny", tiny_data), "test", variant)
    # A threshold at the 30th percentile of the frozen point scores: some frames update the memory, most do not.
    inputs, target = split_clip(torch.stack([test_set[i]["clip"] for i in range(len(test_set))]), variant)
    with torch.no_grad():
        scores = point_score(model(inputs).output, target)
    variant = dataclasses.replace(variant, test_threshold=float(np.quantile(scores.numpy(), 0.3)))

    runs = {}
    for chunk in (1, 16):  # a chunk of 1 is MNAD's loop itself: one frame, then its update, then the next frame
        copied = copy.deepcopy(model)
        runs[chunk] = (score_with_update(copied, test_set, variant, torch.device("cpu"), chunk), copied.memory.items)
    (exact, exact_items), (chunked, chunked_items) = runs[1], runs[16]
    assert 0 < exact["memory_updated"].sum() < len(test_set)
    np.testing.assert_array_equal(chunked["memory_updated"], exact["memory_updated"])
    np.testing.assert_allclose(chunked["psnr"], exact["psnr"], rtol=1e-5)
    np.testing.assert_allclose(chunked["distance"], exact["distance"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(chunked_items, exact_items)
    # and without any update it is the batched frozen pass
    frozen = score_batched(model, test_set, variant, 16, torch.device("cpu"))
    never = dataclasses.replace(variant, test_threshold=-1.0)
    chunked = score_with_update(copy.deepcopy(model), test_set, never, torch.device("cpu"), 16)
    assert chunked["memory_updated"].sum() == 0
    np.testing.assert_allclose(chunked["psnr"], frozen["psnr"], rtol=1e-6)


def test_the_frozen_series_reuses_the_update_pass_up_to_its_first_update(tiny_data, tmp_path):
    path = train("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=tmp_path)
    model, variant, _ = ckpt.load_model(path)
    test_set = clip_dataset(frames_dir("tiny", tiny_data), "test", variant)
    frozen = score_batched(model, test_set, variant, 16, torch.device("cpu"))
    first_update = 7
    updated = {"psnr": frozen["psnr"] + 1.0, "distance": frozen["distance"] + 1.0,
               "memory_updated": np.zeros(len(test_set), dtype=np.int8)}
    # No frame updated the memory: everything is reused and nothing is run again.
    reused = score_frozen_after(None, test_set, variant, 16, torch.device("cpu"), updated)
    np.testing.assert_array_equal(reused["psnr"], updated["psnr"])
    np.testing.assert_array_equal(reused["distance"], updated["distance"])
    # Frame 7 updated it: frames 0-7 (7 included: it was scored before its own update) come from the update pass,
    # the rest from a frozen pass over frames 8 onwards.
    updated["memory_updated"][[first_update, first_update + 5]] = 1
    mixed = score_frozen_after(model, test_set, variant, 16, torch.device("cpu"), updated)
    np.testing.assert_array_equal(mixed["psnr"][:first_update + 1], updated["psnr"][:first_update + 1])
    np.testing.assert_allclose(mixed["psnr"][first_update + 1:], frozen["psnr"][first_update + 1:], rtol=1e-6)
    np.testing.assert_allclose(mixed["distance"][first_update + 1:], frozen["distance"][first_update + 1:],
                               rtol=1e-5, atol=1e-7)
    assert len(mixed["psnr"]) == len(mixed["distance"]) == len(test_set)


def test_evaluate_scores_without_update_against_the_trained_memory(tiny_data, tmp_path):
    """A threshold every frame passes: each frame writes into the memory, yet the "without update" columns must be
    those of the memory as trained (the update pass runs first and the memory is put back)."""
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["variants"]["mnad-pred"]["test_threshold"] = 10.0
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    train("tiny", "mnad-pred", 0, params_path=params_path, data_root=tiny_data, runs_root=tmp_path)
    metrics = evaluate("tiny", "mnad-pred", 0, params_path=params_path, data_root=tiny_data, runs_root=tmp_path)
    scores = pd.read_csv(tmp_path / "tiny" / "mnad-pred" / "seed0" / "scores.csv", keep_default_na=False)
    assert metrics["with_update"]["updated_frames"] == len(scores)
    model, variant, _ = ckpt.load_model(tmp_path / "tiny" / "mnad-pred" / "seed0" / "checkpoint.pt")
    frozen = score_batched(model, clip_dataset(frames_dir("tiny", tiny_data), "test", variant), variant, 16,
                           torch.device("cpu"))
    np.testing.assert_allclose(scores["psnr"], frozen["psnr"], rtol=1e-6)
    np.testing.assert_allclose(scores["distance"], frozen["distance"], rtol=1e-5, atol=1e-7)
    assert scores["psnr"].iloc[0] == scores["psnr_update"].iloc[0]  # the first frame saw the trained memory too
    assert not np.allclose(scores["distance"], scores["distance_update"])


def test_a_failing_training_marks_its_mlflow_run_failed(tiny_data, tmp_path, monkeypatch):
    import pipeline.train as training

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(training, "train_epoch", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        train("tiny", "ae-pred", 2, data_root=tiny_data, runs_root=tmp_path)
    client = _client()
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.variant = 'ae-pred' and tags.seed = '2'")
    assert [run.info.status for run in runs] == ["FAILED"]


def test_fewer_clips_per_epoch_than_one_batch_is_a_clear_error(tiny_data, tmp_path):
    import yaml

    from pipeline.config import DEFAULT_PARAMS
    from pipeline.errors import UserError

    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["profiles"]["tiny"].update(max_train_clips=3, batch_size=4)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(UserError, match=r"3 training clips per epoch \(\d+ in the set, profiles.tiny.max_train_clips 3\), "
                                        r"fewer than one batch of 4; lower profiles.tiny.batch_size"):
        train("tiny", "ae-pred", 0, params_path=params, data_root=tiny_data, runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # nothing written
