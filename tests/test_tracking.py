"""MLflow conventions: experiments the UI opens on their runs, a study run per dataset with the runs nested under it,
one run per (variant, seed) and workspace that each execution starts afresh, the run's status when its stage fails, and
a tracking server that does not answer."""
import math
import platform

import pytest

from local_processes import free_port
from pipeline import tracking
from pipeline.config import REPO_ROOT
from pipeline.tracking import Run, study_run


def runs_of(dataset, variant, seed):
    client = tracking.client()
    experiment = client.get_experiment_by_name(dataset)
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.variant = '{variant}' and tags.seed = '{seed}'")


def test_a_run_logs_params_metrics_history_and_artifacts(tmp_path):
    artifact = tmp_path / "scores.csv"
    artifact.write_text("frame,score\n0,0.5\n")
    with Run("tracking-test", "mnad-pred", 3) as run:
        run.set_tags({"device": "cpu"})
        run.log_params({"lr": 0.001, "variant.skips": True})
        run.log_history([(epoch, {"loss": 1.0 / epoch, "skipped": None, "undefined": math.nan}) for epoch in (1, 2)])
        run.log_artifact(artifact)
        run.finish()

    [logged] = runs_of("tracking-test", "mnad-pred", 3)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "mnad-pred/seed3"
    assert logged.data.tags["device"] == "cpu"
    assert logged.data.params == {"lr": "0.001", "variant.skips": "True"}
    assert logged.data.metrics == {"loss": 0.5}  # the last step's value; None and NaN are left out
    history = tracking.client().get_metric_history(logged.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5)]
    assert [f.path for f in tracking.client().list_artifacts(logged.info.run_id)] == ["scores.csv"]


def test_runs_nest_under_one_study_run_and_a_rerun_replaces_the_run():
    first = Run("tracking-nest", "ae-pred", 0)
    first.log_metrics({"loss": 2.0}, step=1)
    first.finish()
    second = Run("tracking-nest", "ae-pred", 0)
    second.finish()
    other = Run("tracking-nest", "ae-recon", 0)
    other.finish()

    [kept] = runs_of("tracking-nest", "ae-pred", 0)
    assert kept.info.run_id == second.run_id and "loss" not in kept.data.metrics  # the earlier execution is gone
    parent = study_run("tracking-nest")
    assert parent.run_id == study_run("tracking-nest").run_id   # found again, not created twice
    client = tracking.client()
    for run_id in (second.run_id, other.run_id):
        assert client.get_run(run_id).data.tags[tracking.PARENT_TAG] == parent.run_id
    study = client.get_run(parent.run_id)
    assert study.info.run_name == "study" and study.info.status == "RUNNING"
    experiment = client.get_experiment_by_name("tracking-nest")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_run_of_a_stage_that_raises_is_failed_and_one_interrupted_is_killed():
    with pytest.raises(ValueError, match="bad batch"):
        with Run("tracking-status", "mnad-pred", 0):
            raise ValueError("bad batch")
    assert [r.info.status for r in runs_of("tracking-status", "mnad-pred", 0)] == ["FAILED"]
    with pytest.raises(KeyboardInterrupt):
        with Run("tracking-status", "mnad-pred", 0):
            raise KeyboardInterrupt
    assert [r.info.status for r in runs_of("tracking-status", "mnad-pred", 0)] == ["KILLED"]


def test_an_existing_experiment_is_tagged_for_the_runs_view():
    client = tracking.client()
    experiment_id = client.create_experiment("tracking-untagged")
    assert tracking.experiment_id(client, "tracking-untagged") == experiment_id
    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_params_of_a_nested_config_are_flattened_with_their_strings():
    assert tracking.flatten_params({"seed": 1, "variant": {"task": "predict", "skips": True}}) == \
        {"seed": "1", "variant.task": "predict", "variant.skips": "True"}
    assert tracking.flatten({"frames": 3, "headline": "with_update", "with_update": {"auc_micro": 0.9}}) == \
        {"frames": 3.0, "with_update.auc_micro": 0.9}


def test_a_run_of_the_same_folder_on_another_host_is_left_alone():
    """Hosts that log to one tracking server can hold checkouts at the same path: each is a workspace of its own."""
    client = tracking.client()
    experiment = tracking.experiment_id(client, "tracking-hosts")
    tags = {"variant": "ae-pred", "seed": "0", tracking.ROLE_TAG: "run", tracking.WORKSPACE_TAG: REPO_ROOT.as_posix()}
    elsewhere = client.create_run(experiment, tags={**tags, tracking.HOST_TAG: "another-host"}).info.run_id
    client.set_terminated(elsewhere)
    here = Run("tracking-hosts", "ae-pred", 0)
    here.finish()
    assert client.get_run(here.run_id).data.tags[tracking.HOST_TAG] == platform.node()
    assert sorted(run.info.run_id for run in runs_of("tracking-hosts", "ae-pred", 0)) == \
        sorted([elsewhere, here.run_id])   # both active: this workspace's rerun replaces only its own
    again = Run("tracking-hosts", "ae-pred", 0)
    again.finish()
    assert sorted(run.info.run_id for run in runs_of("tracking-hosts", "ae-pred", 0)) == sorted([elsewhere,
                                                                                                 again.run_id])


def test_a_run_records_the_gpus_its_worker_was_given(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "cuda_visible_devices" not in tracking.environment_tags("cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert tracking.environment_tags("cuda")["cuda_visible_devices"] == "1"


def test_a_tracking_server_that_does_not_answer_is_one_message_after_mlflows_retries(monkeypatch):
    port = free_port()   # a port on 127.0.0.1 that nothing listens on
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")   # MLflow's own retries, with backoff (default 7)
    with pytest.raises(tracking.StoreUnavailable) as raised:
        tracking.study_run("tracking-unreachable")
    assert str(raised.value).startswith(f"MLflow tracking server {uri} did not answer (API request to {uri}/api/")
    assert str(raised.value).endswith("start the server or fix MLFLOW_TRACKING_URI, and rerun the stage (dvc repro)")
    run = Run("tracking-unreachable", "ae-pred", 0, keep_going=True)   # a stage's run: logs nothing, keeps the problem
    run.log_metrics({"loss": 1.0}, step=1)
    run.finish()
    assert run.run_id is None and isinstance(run.problem, tracking.StoreUnavailable)
