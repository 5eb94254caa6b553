"""MLflow tracking: the in-process Run and the worker process a stage run from the command line logs through."""
import pytest

from pipeline import tracking
from pipeline.tracking import BackgroundRun, Run, _client, open_run


def runs_of(dataset, variant, seed):
    client = _client()
    experiment = client.get_experiment_by_name(dataset)
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.variant = '{variant}' and tags.seed = '{seed}'")


def test_without_a_worker_open_run_is_in_process():
    run = open_run("tracking-test", "plain", 0)
    assert isinstance(run, Run)
    run.finish()


def test_a_worker_makes_every_call_in_order_and_the_run_reads_back(tmp_path):
    artifact = tmp_path / "scores.csv"
    artifact.write_text("frame,score\n0,0.5\n")
    tracking.start_worker()
    run = open_run("tracking-test", "mnad-pred", 3, fresh=True)
    assert isinstance(run, BackgroundRun)
    assert open_run("tracking-test", "other", 0).__class__ is Run  # one worker serves one run
    run.set_tags({"device": "cpu"})
    run.log_params({"lr": 0.001, "variant.skips": True})
    for epoch in (1, 2):
        run.log_metrics({"loss": 1.0 / epoch, "skipped": None}, step=epoch)
    run.log_artifact(artifact)
    run.finish()

    [logged] = runs_of("tracking-test", "mnad-pred", 3)
    assert logged.info.status == "FINISHED" and logged.info.run_name == "mnad-pred/seed3"
    assert logged.data.tags["device"] == "cpu"
    assert logged.data.params == {"lr": "0.001", "variant.skips": "True"}
    assert logged.data.metrics == {"loss": 0.5}  # the last step's value; None is left out
    history = _client().get_metric_history(logged.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    assert [f.path for f in _client().list_artifacts(logged.info.run_id)] == ["scores.csv"]
    with pytest.raises(RuntimeError, match="already finished"):
        run.log_metrics({"loss": 0.1})


def test_a_stage_that_dies_leaves_its_run_killed_and_one_that_raises_leaves_it_failed():
    tracking.start_worker()
    run = open_run("tracking-test", "ae-pred", 0, fresh=True)
    run.log_metrics({"loss": 1.0}, step=1)
    run._process.stdin.close()  # what the OS does to the pipe when the stage process is killed
    assert run._process.wait() == 0
    assert [r.info.status for r in runs_of("tracking-test", "ae-pred", 0)] == ["KILLED"]

    tracking.start_worker()
    with pytest.raises(ValueError, match="bad batch"):
        with open_run("tracking-test", "ae-pred", 0) as run:
            raise ValueError("bad batch")
    assert [r.info.status for r in runs_of("tracking-test", "ae-pred", 0)] == ["FAILED"]


def test_a_broken_store_is_one_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")  # a folder that cannot exist
    tracking.start_worker()
    run = open_run("tracking-test", "mnad-pred", 0)
    with pytest.raises(RuntimeError, match=r"MLflow logging failed \(tracking URI sqlite:///.*file/mlflow.db\)"):
        run.finish()


def test_ctrl_c_does_not_stop_the_worker_before_it_records_the_stage_failing():
    import signal
    import time

    tracking.start_worker()
    run = open_run("tracking-test", "memae", 0, fresh=True)
    deadline = time.monotonic() + 120
    while not runs_of("tracking-test", "memae", 0):  # the worker has opened the run, so its handlers are set
        assert time.monotonic() < deadline, "the worker never opened the run"
        time.sleep(0.2)
    run._process.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends to every process of the group
    with pytest.raises(KeyboardInterrupt):
        with run:
            raise KeyboardInterrupt
    assert [r.info.status for r in runs_of("tracking-test", "memae", 0)] == ["FAILED"]
