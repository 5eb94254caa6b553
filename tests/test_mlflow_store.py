"""The MLflow store under trouble: a run a killed stage left RUNNING is closed when the stage reruns; a locked store
is waited for, then reported in one line after the stage's outputs are written; a corrupt store is named with its
fix; and two queued DVC experiments share one store."""
import json
import pickle
import re
import sqlite3
import threading
import time

import pandas as pd
import pytest
import sqlalchemy.exc
import torch
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
from mlflow.tracking import MlflowClient

from benchmarks.tiny_study import tiny_study_copy
from local_processes import dvc, start_queue_workers, stop_queue_workers, wait_for_the_queue
from pipeline import paths, tracking
from pipeline.config import REPO_ROOT
from pipeline.errors import UserError
from pipeline.run import main, run_seeds
from pipeline.paths import run_dir


@pytest.fixture
def stage(tiny_data, tmp_path, monkeypatch):
    """`python -m pipeline.run` in-process, its outputs under tmp_path: argv -> (exit status, stdout, stderr)."""
    monkeypatch.setattr(paths, "DATA_DIR", tiny_data)
    monkeypatch.setattr(paths, "RUNS_DIR", tmp_path / "runs")
    monkeypatch.setattr(paths, "METRICS_DIR", tmp_path / "metrics")

    def run_stage(capsys, *argv):
        status = main(["--dataset", "tiny", *argv])
        out, err = capsys.readouterr()
        return status, out, err
    return run_stage


def outputs_of(root, variant="ae-pred", seed=0):
    """The stage's outputs, each read the way its consumer reads it (so a partial file fails here)."""
    folder = run_dir("tiny", variant, seed, root / "runs")
    metrics = json.loads((folder / "metrics.json").read_text())
    assert len(pd.read_csv(folder / "scores.csv")) == metrics["frames"]
    assert pd.read_csv(folder / "train_log.csv")["epoch"].max() == 2
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert json.loads((root / "metrics" / "tiny" / f"{variant}.json").read_text()) == {f"seed{seed}": metrics}
    return metrics


def one_error_line(err):
    """The stage's stderr shows exactly one line, `error: ...`, and no traceback (a progress bar redraws its line
    with carriage returns and clears it: a line shows what follows its last one)."""
    lines = [line.split("\r")[-1].strip() for line in err.split("\n")]
    lines = [line for line in lines if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def runs_by_id(experiment="tiny"):
    client = tracking.client()
    found = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                               run_view_type=ViewType.ALL)
    return {run.info.run_id: run for run in found}


def test_a_run_left_running_by_a_killed_stage_is_closed_as_killed_when_the_stage_reruns(tiny_data, tmp_path):
    # A SIGKILLed stage leaves its run RUNNING: nothing in it runs again to close it.
    killed = tracking.Run("tiny", "ae-recon", 0)
    killed.log_metrics({"loss": 1.0}, step=1)
    client = tracking.client()
    experiment = tracking.experiment_id(client, "tiny")
    tags = {"variant": "ae-recon", "seed": "0", tracking.ROLE_TAG: "run"}
    # ...and one the code before this change deleted while RUNNING: the trash must not keep a RUNNING run either
    trashed = client.create_run(experiment, tags={**tags, tracking.WORKSPACE_TAG: REPO_ROOT.as_posix()}).info.run_id
    client.delete_run(trashed)
    # a queued experiment's run of the same variant and seed, alive in its own workspace: not this stage's to close
    elsewhere = client.create_run(experiment, tags={**tags, tracking.WORKSPACE_TAG: "/elsewhere"}).info.run_id

    run_seeds("tiny", "ae-recon", [0], data_root=tiny_data, runs_root=tmp_path, metrics_root=tmp_path)

    runs = runs_by_id()
    for run_id in (killed.run_id, trashed):
        assert (runs[run_id].info.status, runs[run_id].info.lifecycle_stage) == ("KILLED", "deleted"), run_id
    assert (runs[elsewhere].info.status, runs[elsewhere].info.lifecycle_stage) == ("RUNNING", "active")
    [current] = [run for run in runs.values() if run.data.tags.get("variant") == "ae-recon" and
                 run.data.tags.get(tracking.WORKSPACE_TAG) == REPO_ROOT.as_posix() and
                 run.info.lifecycle_stage == "active"]
    assert current.info.status == "FINISHED" and "auc_micro" in current.data.metrics
    client.set_terminated(elsewhere)


def test_a_locked_store_is_waited_for_then_reported_after_the_outputs_are_written(stage, tmp_path, capsys,
                                                                                  isolated_mlflow_store, monkeypatch):
    monkeypatch.setenv(tracking.RETRY_ENV, "2")
    tracking.study_run("tiny")   # the store exists before another connection locks it
    holder = sqlite3.connect(isolated_mlflow_store, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")   # another process writing, for longer than the retry budget
    try:
        started = time.perf_counter()
        status, out, err = stage(capsys, "--variant", "ae-pred", "--seed", "0")
        seconds = time.perf_counter() - started
    finally:
        holder.rollback()
    line = one_error_line(err)
    assert status == 2 and re.fullmatch(
        rf"error: MLflow store sqlite:///{re.escape(str(isolated_mlflow_store))} stayed locked for 2\.\d s \(another "
        rf"process held it; {tracking.RETRY_ENV} sets how long to wait\): the outputs of ae-pred on tiny are "
        rf"written \(.*runs/tiny/ae-pred, .*metrics/tiny/ae-pred.json\), its MLflow runs are not; rerun the stage "
        rf"\(dvc repro\) once the store is free, or put an MLflow server in front of the store for many writers "
        rf"\(README, Reliability\)", line), line
    assert seconds >= 2   # it waited its budget before giving up
    metrics = outputs_of(tmp_path)

    # The rerun the message asks for, while the lock is held a second time but let go within the budget: it waits
    # (retry with backoff), logs the run and only re-evaluates.
    monkeypatch.setenv(tracking.RETRY_ENV, "30")
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(1.5, holder.rollback).start()
    status, out, err = stage(capsys, "--variant", "ae-pred", "--seed", "0")
    holder.close()
    assert status == 0, err
    assert "nothing to train" in out and outputs_of(tmp_path) == metrics
    [logged] = [run for run in runs_by_id().values() if run.data.tags.get("variant") == "ae-pred" and
                run.info.lifecycle_stage == "active" and run.data.tags.get("seed") == "0"]
    assert logged.info.status == "FINISHED" and logged.data.metrics["auc_micro"] == \
        metrics[metrics["headline"]]["auc_micro"]


def test_a_store_that_locks_in_the_middle_of_a_run_stops_only_the_logging(stage, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(tracking.RETRY_ENV, "0.5")
    calls = []

    def locked(self, *args, **kwargs):   # what MLflow raises once sqlite's own 20 s busy timeout has run out
        calls.append(time.monotonic())
        raise MlflowException("(sqlite3.OperationalError) database is locked", error_code=TEMPORARILY_UNAVAILABLE)
    with monkeypatch.context() as patched:
        patched.setattr(MlflowClient, "log_batch", locked)   # the run exists; then every write to it is locked
        status, out, err = stage(capsys, "--variant", "ae-pred", "--seed", "1")
    line = one_error_line(err)
    assert status == 2 and re.search(r"stayed locked for 0\.\d s .*: the outputs of ae-pred on tiny are written",
                                      line), line
    assert 3 <= len(calls) <= 10 and calls[-1] - calls[0] <= 1.0   # retried with backoff within the budget, once
    metrics = outputs_of(tmp_path, seed=1)
    [left] = [run for run in runs_by_id().values() if run.data.tags.get("variant") == "ae-pred" and
              run.data.tags.get("seed") == "1" and run.info.lifecycle_stage == "active"]
    assert left.info.status == "RUNNING"   # the store could not be told otherwise

    # the rerun once the store is free closes that run as KILLED and records this execution
    status, out, err = stage(capsys, "--variant", "ae-pred", "--seed", "1")
    assert status == 0, err
    assert "nothing to train" in out and outputs_of(tmp_path, seed=1) == metrics
    runs = runs_by_id()
    assert (runs[left.info.run_id].info.status, runs[left.info.run_id].info.lifecycle_stage) == ("KILLED", "deleted")
    [current] = [run for run in runs.values() if run.data.tags.get("variant") == "ae-pred" and
                 run.data.tags.get("seed") == "1" and run.info.lifecycle_stage == "active"]
    assert current.info.status == "FINISHED" and current.data.metrics["auc_micro"] == \
        metrics[metrics["headline"]]["auc_micro"]


@pytest.mark.parametrize("damage", ["not sqlite", "truncated"])
def test_a_corrupt_store_is_named_with_its_fix_and_the_outputs_are_written(stage, tmp_path, capsys, monkeypatch,
                                                                            isolated_mlflow_store, damage):
    store = tmp_path / "mlflow.db"
    if damage == "not sqlite":
        store.write_text("these are not the bytes of an SQLite database\n" * 100)
    else:   # a real store cut short, as a full disk or a killed copy leaves it
        whole = isolated_mlflow_store.read_bytes()
        store.write_bytes(whole[:len(whole) // 3])
    before = store.read_bytes()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv(tracking.RETRY_ENV, "1")
    started = time.perf_counter()
    status, out, err = stage(capsys, "--variant", "ae-pred", "--seed", "0")
    line = one_error_line(err)
    assert status == 2 and line.startswith(f"error: MLflow store {store} is not a readable SQLite database ("), line
    assert f"move it aside (mv {store} {store}.corrupt; MLflow then starts a new, empty store there)" in line
    assert "the outputs of ae-pred on tiny are written" in line
    assert time.perf_counter() - started < 60   # not MLflow's own minutes of retries on opening it
    outputs_of(tmp_path)
    assert store.read_bytes() == before   # the store is the user's to move: left as it was


def test_a_transient_lock_is_retried_and_other_errors_are_not():
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
        return "logged"
    assert tracking.call(flaky) == "logged" and len(attempts) == 3

    def broken():
        attempts.append(1)
        raise MlflowException("Invalid value for metric 'loss'")
    attempts.clear()
    with pytest.raises(MlflowException, match="Invalid value"):
        tracking.call(broken)
    assert len(attempts) == 1   # a bug is not a lock: raised at once, as it is


def test_a_store_problem_crosses_from_a_run_process_to_its_stage():
    """Seeds side by side run in spawned processes; each returns its store problem to the stage, pickled."""
    problem = pickle.loads(pickle.dumps(tracking.StoreUnavailable("MLflow store x stayed locked", "rerun")))
    assert isinstance(problem, UserError) and (problem.what, problem.fix, str(problem)) == \
        ("MLflow store x stayed locked", "rerun", "MLflow store x stayed locked: rerun")


def test_the_retry_budget_must_be_seconds(monkeypatch):
    monkeypatch.setenv(tracking.RETRY_ENV, "soon")
    with pytest.raises(UserError, match=rf"environment variable {tracking.RETRY_ENV}='soon': expected seconds"):
        tracking.call(lambda: None)


def test_an_artifact_is_never_partial_under_its_name(tmp_path, monkeypatch):
    run = tracking.Run("store-artifacts", "ae-pred", 0)
    source = tmp_path / "scores.csv"
    source.write_text("frame,score\n0,0.5\n")
    run.log_artifact(source)
    folder = tracking._local_folder(tracking.client().get_run(run.run_id).info.artifact_uri)
    assert (folder / "scores.csv").read_text() == "frame,score\n0,0.5\n"

    def killed_mid_copy(src, dst):   # half the bytes, then the stage dies
        with open(dst, "w") as handle:
            handle.write("frame,sc")
        raise KeyboardInterrupt
    monkeypatch.setattr(tracking.shutil, "copyfile", killed_mid_copy)
    source.write_text("frame,score\n0,0.7\n1,0.8\n")
    with pytest.raises(KeyboardInterrupt):
        run.log_artifact(source)
    assert (folder / "scores.csv").read_text() == "frame,score\n0,0.5\n"   # the earlier artifact, whole
    assert [p.name for p in folder.iterdir()] == ["scores.csv"]   # and no temporary left over
    run.finish()


def test_two_queued_experiments_run_side_by_side_into_one_store(tmp_path):
    """`dvc exp run --queue` twice, `dvc queue start -j 2`: both finish and the repository's store records both runs
    of the same variant and seed (each experiment's, in its own temporary workspace), with no lock failure."""
    work = tmp_path / "repo"
    work.mkdir()
    env = tiny_study_copy(work)
    # the default store, as a user has it: the repository's mlflow.db, also from an experiment's temporary copy; it
    # does not exist yet, so the two experiments also race to create it
    env.pop("MLFLOW_TRACKING_URI")
    rates = {"lr-high": "0.002", "lr-low": "0.0005"}   # one variant and seed, two training options: light
    for name, lr in rates.items():
        dvc(work, env, "exp", "run", "--queue", "-n", name, "-S", f"datasets.tiny.profile.lr={lr}", "run@tiny-ae-pred")
    start_queue_workers(work, env, 2)
    try:
        states = wait_for_the_queue(work, env, list(rates), timeout=400)
        logs = {name: dvc(work, env, "queue", "logs", name) for name in rates}
    finally:
        stop_queue_workers(work, env)
    assert states == {"lr-high": "Success", "lr-low": "Success"}, "\n".join(logs.values())
    for name, log in logs.items():
        assert "Running stage 'run@tiny-ae-pred'" in log and "database is locked" not in log, log[-3000:]

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny").experiment_id
    runs = client.search_runs([experiment], filter_string="tags.variant = 'ae-pred'")
    assert sorted((r.data.tags["dvc_exp"], r.data.params["profile.lr"], r.info.status) for r in runs) == \
        [("lr-high", "0.002", "FINISHED"), ("lr-low", "0.0005", "FINISHED")]
    for run in runs:   # each with its metrics and artifacts, under the one study run of the dataset
        assert "auc_micro" in run.data.metrics and "scores.csv" in {f.path for f in client.list_artifacts(
            run.info.run_id)}
    [study] = client.search_runs([experiment], filter_string=f"tags.`{tracking.ROLE_TAG}` = '{tracking.STUDY_RUN}'")
    assert {run.data.tags[tracking.PARENT_TAG] for run in runs} == {study.info.run_id}
