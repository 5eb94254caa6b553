"""The run stage on the tiny profile: training resumes and repeats byte for byte, an evaluation-only change does not
retrain, evaluation's test-time update, and the MLflow run of each execution."""
import copy
import json
from importlib import metadata

import numpy as np
import pandas as pd
import pytest
import torch

from models.clips import split_clip
from models.mnad import point_score
from params_files import params_file
from pipeline import tracking
from pipeline.checkpoint import load_checkpoint, load_trained_model
from pipeline.config import load_params
from pipeline.data import clip_dataset
from pipeline.errors import UserError
from pipeline.evaluate import score_batched, score_with_update
from pipeline.paths import frames_dir, run_dir
from pipeline.run import run, run_seeds

CPU = torch.device("cpu")


def trained_model(variant_name, tiny_data, runs_root, params_path=None):
    params = load_params(params_path)
    dataset, variant = params.dataset("tiny"), params.variant(variant_name)
    frames = frames_dir("tiny", tiny_data)
    path = run_dir("tiny", variant_name, 0, runs_root) / "checkpoint.pt"
    return load_trained_model(path, dataset, variant, 0, frames, CPU), variant


def test_an_interrupted_training_resumes_to_the_same_checkpoint_bytes(tiny_data, tmp_path):
    run("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=tmp_path / "whole")
    run("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=tmp_path / "again")
    assert run("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=tmp_path / "cut", stop_after_epoch=1) == {}
    cut = run_dir("tiny", "mnad-pred", 0, tmp_path / "cut")
    assert load_checkpoint(cut / "checkpoint.pt")["epoch"] == 1 and not (cut / "metrics.json").exists()
    run("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=tmp_path / "cut")

    whole, again = (run_dir("tiny", "mnad-pred", 0, tmp_path / name) for name in ("whole", "again"))
    checkpoint = (whole / "checkpoint.pt").read_bytes()
    assert checkpoint == (again / "checkpoint.pt").read_bytes()   # no wall-clock inside: same params, same bytes
    assert checkpoint == (cut / "checkpoint.pt").read_bytes()     # memory items and optimiser state included
    assert (whole / "metrics.json").read_text() == (cut / "metrics.json").read_text()
    assert (whole / "scores.csv").read_text() == (cut / "scores.csv").read_text()
    log = pd.read_csv(cut / "train_log.csv")
    assert log["step"].tolist() == list(range(1, 9)) and log["epoch"].tolist() == [1] * 4 + [2] * 4  # a row a step
    assert log["seconds"].notna().all()  # the seconds of both executions kept
    # the memory's usage on the held-out monitor windows, at every logged step
    usage = log[[c for c in log.columns if c.startswith("usage_")]]
    assert set(usage.columns) >= {"usage_entropy", "usage_top_share", "usage_position_nmi"}
    assert usage.drop(columns="usage_position_nmi").notna().all().all()
    assert (usage["usage_position_nmi"].notna() | (usage["usage_items_used"] == 1)).all()   # NaN: one item only
    [mlflow_run] = tracking.client().search_runs(
        [tracking.client().get_experiment_by_name("tiny").experiment_id],
        filter_string="tags.variant = 'mnad-pred' and tags.seed = '0'")
    history = tracking.client().get_metric_history(mlflow_run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))   # the resumed execution's run shows every step


def test_an_evaluation_only_change_does_not_retrain(tiny_data, tmp_path):
    first = run("tiny", "mnad-recon", 0, data_root=tiny_data, runs_root=tmp_path)
    folder = run_dir("tiny", "mnad-recon", 0, tmp_path)
    before = (folder / "checkpoint.pt").stat().st_mtime_ns, (folder / "checkpoint.pt").read_bytes()

    def new_alpha(raw):
        raw["variants"]["mnad-recon"]["alpha"] = 0.2
        raw["evaluate"]["test_time_update"] = "without"
    second = run("tiny", "mnad-recon", 0, params_path=params_file(tmp_path, new_alpha), data_root=tiny_data,
                 runs_root=tmp_path)
    assert ((folder / "checkpoint.pt").stat().st_mtime_ns, (folder / "checkpoint.pt").read_bytes()) == before
    assert "with_update" in first and "with_update" not in second
    assert second["without_update"]["auc_micro"] != first["without_update"]["auc_micro"]
    [mlflow_run] = tracking.client().search_runs(
        [tracking.client().get_experiment_by_name("tiny").experiment_id],
        filter_string="tags.variant = 'mnad-recon' and tags.seed = '0'")
    assert mlflow_run.data.tags["trained_epochs"] == "0" and mlflow_run.data.params["variant.alpha"] == "0.2"

    def new_lr(raw):
        raw["datasets"]["tiny"]["profile"]["lr"] = 2.0e-3
    run("tiny", "mnad-recon", 0, params_path=params_file(tmp_path, new_lr), data_root=tiny_data, runs_root=tmp_path)
    assert (folder / "checkpoint.pt").read_bytes() != before[1]   # a training option retrains from scratch


def test_a_checkpoint_of_other_options_is_refused_for_evaluation(tiny_data, tmp_path):
    run("tiny", "ae-recon", 0, data_root=tiny_data, runs_root=tmp_path)

    def wider(raw):
        raw["datasets"]["tiny"]["profile"]["width"] = 0.25
    with pytest.raises(UserError, match=r"checkpoint .*checkpoint.pt does not match params.yaml"):
        trained_model("ae-recon", tiny_data, tmp_path, params_file(tmp_path, wider))


def test_same_seed_gives_identical_metrics_and_mlflow_holds_one_run(tiny_data, tmp_path):
    results = []
    for attempt in ("a", "b"):
        run("tiny", "mnad-recon", 1, data_root=tiny_data, runs_root=tmp_path / attempt)
        results.append((run_dir("tiny", "mnad-recon", 1, tmp_path / attempt) / "metrics.json").read_text())
    assert results[0] == results[1]
    metrics = json.loads(results[0])
    assert {"without_update", "with_update"} <= set(metrics) and metrics["headline"] == "with_update"
    assert 0.0 <= metrics["with_update"]["auc_micro"] <= 1.0
    scores = pd.read_csv(run_dir("tiny", "mnad-recon", 1, tmp_path / "a") / "scores.csv", keep_default_na=False)
    assert list(scores.columns) == ["video", "frame", "label", "anomaly_type", "psnr", "distance", "score",
                                    "psnr_update", "distance_update", "memory_updated", "floor_psnr", "score_update"]
    assert len(scores) == metrics["frames"]
    assert metrics["with_update"]["updated_frames"] == scores["memory_updated"].sum() > 0   # calibrated: it fires
    assert metrics["update_threshold"]["mode"] == "calibrated"
    normal = scores["label"] == 0
    assert metrics["normal_psnr"] == pytest.approx(scores["psnr_update"][normal].mean())
    assert metrics["floor_psnr"] == pytest.approx(scores["floor_psnr"][normal].mean())
    gate = metrics["gate"]
    assert gate["floor"] == "training mean frame" and gate["learnt"] == (gate["plateaued"] and gate["beats_floor"])

    client = tracking.client()
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.variant = 'mnad-recon' and tags.seed = '1'")
    assert len(runs) == 1  # the second execution replaced the first's run instead of duplicating it
    logged = runs[0]
    assert logged.info.run_name == "mnad-recon/seed1" and logged.info.status == "FINISHED"
    assert "loss" in logged.data.metrics and "eval.with_update.auc_micro" in logged.data.metrics
    assert logged.data.metrics["auc_micro"] == metrics["with_update"]["auc_micro"]   # the headline, sortable
    assert logged.data.params["variant.compactness_weight"] == "0.01" and logged.data.params["variant.task"] == \
        "reconstruct"
    assert logged.data.tags["dvc_stage"] == "-"   # not run by DVC here
    assert logged.data.tags["version.torch"] == metadata.version("torch")
    assert logged.data.tags["version.scikit-learn"] == metadata.version("scikit-learn")


def test_the_stage_runs_every_seed_writes_the_variant_metrics_and_drops_stale_seeds(tiny_data, tmp_path):
    stale = run_dir("tiny", "ae-pred", 7, tmp_path)
    stale.mkdir(parents=True)
    (stale / "metrics.json").write_text("{}")
    # what writers killed by SIGKILL (no cleanup) left in a kept seed's folder: DVC would cache it with the folder
    killed = run_dir("tiny", "ae-pred", 0, tmp_path)
    killed.mkdir(parents=True)
    for name in (".checkpoint.pt.k1ll3d.tmp", ".scores.csv.k1ll3d.tmp"):
        (killed / name).write_bytes(b"half a file")
    results = run_seeds("tiny", "ae-pred", [0, 1], data_root=tiny_data, runs_root=tmp_path,
                        metrics_root=tmp_path / "metrics")
    assert sorted(results) == [0, 1] and not stale.exists()
    assert sorted(p.name for p in killed.iterdir()) == ["checkpoint.pt", "metrics.json", "roc.csv", "scores.csv",
                                                       "train_log.csv"]
    tracked = json.loads((tmp_path / "metrics" / "tiny" / "ae-pred.json").read_text())
    assert tracked == {f"seed{s}": json.loads((run_dir("tiny", "ae-pred", s, tmp_path) / "metrics.json").read_text())
                       for s in (0, 1)}
    # a seed trained in the same process as another equals one trained alone
    run("tiny", "ae-pred", 1, data_root=tiny_data, runs_root=tmp_path / "alone")
    assert (run_dir("tiny", "ae-pred", 1, tmp_path) / "checkpoint.pt").read_bytes() == \
        (run_dir("tiny", "ae-pred", 1, tmp_path / "alone") / "checkpoint.pt").read_bytes()


def test_seeds_side_by_side_equal_seeds_in_turn_and_log_one_mlflow_run_each(tiny_data, tmp_path):
    def one_thread(folder, side_by_side):
        def edit(raw):
            raw["datasets"]["tiny"]["profile"].update(threads=1, concurrent_runs=side_by_side)
        (tmp_path / folder).mkdir()
        return params_file(tmp_path / folder, edit)
    in_turn, together = one_thread("turn", 1), one_thread("together", 2)
    first = run_seeds("tiny", "mnad-pred", [0, 1], in_turn, tiny_data, tmp_path / "turn", tmp_path / "turn")
    second = run_seeds("tiny", "mnad-pred", [0, 1], together, tiny_data, tmp_path / "together",
                       tmp_path / "together")
    assert first == second and first[0] != first[1]
    for seed in (0, 1):   # the process a run went to changes no byte it writes
        for name in ("checkpoint.pt", "metrics.json", "scores.csv"):
            assert (run_dir("tiny", "mnad-pred", seed, tmp_path / "turn") / name).read_bytes() == \
                (run_dir("tiny", "mnad-pred", seed, tmp_path / "together") / name).read_bytes()
    client = tracking.client()
    experiment = client.get_experiment_by_name("tiny").experiment_id
    for seed in (0, 1):
        runs = client.search_runs([experiment], filter_string=f"tags.variant = 'mnad-pred' and tags.seed = '{seed}'")
        assert [r.info.status for r in runs] == ["FINISHED"]   # the second execution replaced the first's
        assert runs[0].data.metrics["auc_micro"] == first[seed]["with_update"]["auc_micro"]
    parents = client.search_runs([experiment], filter_string=f"tags.`{tracking.ROLE_TAG}` = '{tracking.STUDY_RUN}'")
    assert len(parents) == 1


def test_runs_side_by_side_need_a_thread_count(tmp_path):
    def edit(raw):
        raw["datasets"]["tiny"]["profile"]["concurrent_runs"] = 2
    with pytest.raises(UserError, match=r"datasets.tiny.profile: .*concurrent_runs 2 needs threads set"):
        load_params(params_file(tmp_path, edit))


def test_copy_last_is_evaluated_without_a_checkpoint(tiny_data, tmp_path):
    metrics = run("tiny", "copy-last", 0, data_root=tiny_data, runs_root=tmp_path)
    assert "with_update" not in metrics and not (run_dir("tiny", "copy-last", 0, tmp_path) / "checkpoint.pt").exists()
    scores = pd.read_csv(run_dir("tiny", "copy-last", 0, tmp_path) / "scores.csv", keep_default_na=False)
    assert scores["frame"].min() == 4  # prediction never scores a video's first four frames
    assert "distance" not in scores.columns and metrics["without_update"]["auc_micro"] > 0.5


def test_chunked_test_time_update_equals_the_frame_by_frame_loop(tiny_data, tmp_path):
    run("tiny", "mnad-recon", 0, data_root=tiny_data, runs_root=tmp_path)
    model, variant = trained_model("mnad-recon", tiny_data, tmp_path)
    test_set = clip_dataset(frames_dir("tiny", tiny_data), "test", variant)
    # A threshold at the 30th percentile of the frozen point scores: some frames update the memory, most do not.
    inputs, target = split_clip(torch.stack([test_set[i]["clip"] for i in range(len(test_set))]), variant)
    with torch.no_grad():
        scores = point_score(model(inputs).output, target)
    variant = variant.model_copy(update={"test_threshold": float(np.quantile(scores.numpy(), 0.3))})

    runs = {}
    for chunk in (1, 16):  # a chunk of 1 is MNAD's loop itself: one frame, then its update, then the next frame
        copied = copy.deepcopy(model)
        runs[chunk] = (score_with_update(copied, test_set, variant, CPU, chunk), copied.memory.items)
    (exact, exact_items), (chunked, chunked_items) = runs[1], runs[16]
    assert 0 < exact["memory_updated"].sum() < len(test_set)
    np.testing.assert_array_equal(chunked["memory_updated"], exact["memory_updated"])
    np.testing.assert_allclose(chunked["psnr"], exact["psnr"], rtol=1e-5)
    np.testing.assert_allclose(chunked["distance"], exact["distance"], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(chunked_items, exact_items)
    # and without any update it is the batched frozen pass
    frozen = score_batched(model, test_set, variant, 16, CPU)
    never = variant.model_copy(update={"test_threshold": -1.0})
    chunked = score_with_update(copy.deepcopy(model), test_set, never, CPU, 16)
    assert chunked["memory_updated"].sum() == 0
    np.testing.assert_allclose(chunked["psnr"], frozen["psnr"], rtol=1e-6)


def test_the_update_pass_also_scores_every_frame_with_the_trained_memory(tiny_data, tmp_path):
    """The "without update" series comes from the same pass, through a copy of the model whose memory never
    changes: it must equal a separate frozen pass, however often the live memory updated."""
    run("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=tmp_path)
    model, variant = trained_model("mnad-pred", tiny_data, tmp_path)
    test_set = clip_dataset(frames_dir("tiny", tiny_data), "test", variant)
    items = model.memory.items.clone()
    frozen = score_batched(model, test_set, variant, 16, CPU)
    always = variant.model_copy(update={"test_threshold": 10.0})
    both = score_with_update(model, test_set, always, CPU, 16, frozen=True)
    assert both["memory_updated"].all() and not torch.equal(model.memory.items, items)
    np.testing.assert_allclose(both["frozen_psnr"], frozen["psnr"], rtol=1e-6)
    np.testing.assert_allclose(both["frozen_distance"], frozen["distance"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(both["distance"], frozen["distance"])


def test_evaluate_scores_without_update_against_the_trained_memory(tiny_data, tmp_path):
    """A threshold every frame passes: each frame writes into the memory, yet the "without update" columns must be
    those of the memory as trained (the update pass runs first and the memory is put back)."""
    def threshold(raw):
        raw["variants"]["mnad-pred"]["test_threshold"] = 10.0
        raw["datasets"]["tiny"]["profile"]["update_threshold"] = "paper"
    params_path = params_file(tmp_path, threshold)
    metrics = run("tiny", "mnad-pred", 0, params_path=params_path, data_root=tiny_data, runs_root=tmp_path)
    scores = pd.read_csv(run_dir("tiny", "mnad-pred", 0, tmp_path) / "scores.csv", keep_default_na=False)
    assert metrics["with_update"]["updated_frames"] == len(scores)
    model, variant = trained_model("mnad-pred", tiny_data, tmp_path, params_path)
    frozen = score_batched(model, clip_dataset(frames_dir("tiny", tiny_data), "test", variant), variant, 16, CPU)
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
        run("tiny", "ae-pred", 2, data_root=tiny_data, runs_root=tmp_path)
    client = tracking.client()
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.variant = 'ae-pred' and tags.seed = '2'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_fewer_clips_per_epoch_than_one_batch_is_a_clear_error(tiny_data, tmp_path):
    def too_few(raw):
        raw["datasets"]["tiny"]["profile"].update(max_train_clips=3, batch_size=4)
    with pytest.raises(UserError, match=r"3 training clips per epoch \(\d+ in the set, "
                                        r"datasets.tiny.profile.max_train_clips 3\), fewer than one batch of 4; "
                                        r"lower datasets.tiny.profile.batch_size"):
        run("tiny", "ae-pred", 0, params_path=params_file(tmp_path, too_few), data_root=tiny_data,
            runs_root=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()  # nothing written


def test_bf16_precision_trains_under_autocast_with_an_fp32_memory_and_its_own_fingerprint(tiny_data, tmp_path):
    def bf16(raw):
        raw["datasets"]["tiny"]["profile"]["precision"] = "bf16"
    run("tiny", "mnad-pred", 0, data_root=tiny_data, runs_root=tmp_path / "fp32")
    run("tiny", "mnad-pred", 0, params_path=params_file(tmp_path, bf16), data_root=tiny_data,
        runs_root=tmp_path / "bf16")
    fp32, half = (load_checkpoint(run_dir("tiny", "mnad-pred", 0, tmp_path / name) / "checkpoint.pt")
                  for name in ("fp32", "bf16"))
    assert half["fingerprint"] != fp32["fingerprint"] and half["config"]["profile"]["precision"] == "bf16"
    assert all(value.dtype in (torch.float32, torch.int64) for value in half["model"].values())
    assert half["model"]["memory.items"].dtype == torch.float32
    losses = [row["loss"] for row in half["log"]]
    assert np.isfinite(losses).all() and losses != [row["loss"] for row in fp32["log"]]
    assert losses[-1] < losses[0]
