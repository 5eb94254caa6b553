"""`kill -9` of a whole `dvc repro` at chosen points of its stages, then `dvc repro` again, on the tiny profile.

The interrupted study starts from a copy of the session's finished tiny study (tests/conftest.py `tiny_repro`) in
which one run (ae-recon), the analyses of the tiny dataset and REPORT.md are deleted, so that `dvc repro` must redo
them and what reads them (a third of the study: the stages killed here, not the ones that would only repeat them).
It is SIGKILLed, DVC, the stage and any process a stage spawned together, once the run has checkpointed its first
epoch (mid training), once its training is complete and its evaluation under way, once the score analyses have
begun writing, and once the report stage has written REPORT.md (before logging it to MLflow). After each kill no
file under an output's final name may be partial; then `dvc repro` resumes. The finished study must equal the
uninterrupted one, REPORT.md and the checkpoints included. While a `dvc repro` runs (in its model analyses), a
second one in the same workspace must refuse.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import pandas as pd
import pytest
import torch
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient
from PIL import Image

from benchmarks.tiny_study import study_results
from pipeline import tracking


def training_started(work: Path) -> bool:
    """A run has checkpointed its first epoch and has more to train (the tiny profile trains 2)."""
    return any(not (path.parent / "metrics.json").exists() for path in (work / "runs").glob("*/*/seed*/checkpoint.pt"))


def evaluation_started(work: Path) -> bool:
    """A run's training is complete (its log reached the last epoch) and its metrics are not written yet."""
    for log in (work / "runs").glob("*/*/seed*/train_log.csv"):
        if not (log.parent / "metrics.json").exists():
            try:   # the header and the last row, without parsing the rest (this is polled every 20 ms)
                header, *_, last = log.read_text().splitlines()
                if last.split(",")[header.split(",").index("epoch")] == "2":
                    return True
            except (OSError, ValueError):
                continue   # (not there any more, or no row yet)
    return False


def analysis_started(work: Path) -> bool:
    """The score analyses (timelines, comparisons) have written their first table or figure of the tiny dataset.
    (The lighter of the two analysis stages: its rerun costs the least.)"""
    return any(any((work / "analysis").glob(f"*/{topic}/tiny/*")) for topic in ("timelines", "comparisons"))


def report_written(work: Path) -> bool:
    return (work / "REPORT.md").exists()


KILL_POINTS: list[tuple[str, Callable[[Path], bool]]] = [
    ("training", training_started), ("evaluation", evaluation_started), ("analysis", analysis_started),
    ("report", report_written)]


class Kill(NamedTuple):
    point: str
    stage: str           # the stage DVC was running
    partial: list[str]   # files under a final name that did not read back whole


class Interrupted(NamedTuple):
    work: Path
    env: dict
    since: float                          # when the copy was made: files older than this are the copy's own
    kills: list[Kill]
    second: subprocess.CompletedProcess   # a second `dvc repro` started while the first ran
    first_alive_after_second: bool
    final: subprocess.CompletedProcess


def start_repro(work: Path, env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:   # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)   # its own group, to kill whole


def wait_for(process: subprocess.Popen, log: Path, reached: Callable[[], bool], what: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not reached():
        if process.poll() is not None:
            pytest.fail(f"dvc repro ended (exit {process.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"no {what} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def running_stage(log: Path) -> str:
    stages = re.findall(r"Running stage '([^']+)'", log.read_text())
    return stages[-1] if stages else "-"


def check_whole(path: Path) -> None:
    """Read `path` the way its consumer does; raises if it is partial."""
    if path.suffix == ".csv":
        pd.read_csv(path)
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif path.suffix == ".pt":
        torch.load(path, weights_only=True)
    elif path.suffix == ".png":
        with Image.open(path) as image:
            image.load()   # a truncated PNG raises here
    elif path.suffix == ".md":
        assert path.read_text().endswith("\n"), "ends mid-line"


def partial_files(work: Path, since: float) -> list[str]:
    """Files under a final name, written by the study, that do not read back whole: every output of the stages and
    the MLflow artifacts. Names starting with a dot are the temporaries the atomic writes rename from."""
    found = []
    for root in ("runs", "metrics", "analysis", "data/frames", "mlartifacts", "REPORT.md"):
        base = work / root
        for path in ([base] if base.is_file() else base.rglob("*") if base.exists() else []):
            relative = path.relative_to(work)
            if not path.is_file() or any(part.startswith(".") for part in relative.parts):
                continue
            if path.stat().st_mtime < since:
                continue   # the copy's own files (the default study's figures kept in git)
            try:
                check_whole(path)
            except Exception as exc:   # noqa: BLE001 - any failure to read it back is the finding
                found.append(f"{relative}: {type(exc).__name__}: {exc}")
    return found


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_repro):
    work = tmp_path_factory.mktemp("interrupted")
    logs = tmp_path_factory.mktemp("interrupted-logs")
    since = time.time() - 1
    shutil.copytree(tiny_repro.finished, work, symlinks=True, dirs_exist_ok=True)   # (its files keep their times)
    for redo in [work / "runs" / "tiny" / "ae-recon", *(work / "analysis").glob("*/*/tiny"), work / "REPORT.md"]:
        shutil.rmtree(redo) if redo.is_dir() else redo.unlink()
    # its own MLflow store, and stage logs as they happen, to name the stage killed
    env = {**tiny_repro.env, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    kills, second, alive = [], None, False
    for number, (point, reached) in enumerate(KILL_POINTS):
        log = logs / f"{number}-{point}.log"
        process = start_repro(work, env, log)
        # the workspace is DVC's: a second repro must refuse, and leave the first at work. Tried during the longest
        # stage, the model analyses (a run stage of the tiny profile can end before a second DVC has started)
        if point == "analysis":
            wait_for(process, log, lambda: "Running stage 'model_analyses@" in log.read_text(), "the model analyses")
            second = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env, capture_output=True,
                                    text=True, timeout=300)
            alive = process.poll() is None
        wait_for(process, log, lambda: reached(work), f"the {point} kill point")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        kills.append(Kill(point, running_stage(log), partial_files(work, since)))
    final = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env, capture_output=True, text=True,
                           timeout=1200)
    print("killed:", ", ".join(f"{kill.point} in {kill.stage}" for kill in kills))
    return Interrupted(work, env, since, kills, second, alive, final)


def test_a_second_repro_in_the_same_workspace_refuses_and_the_first_runs_on(interrupted):
    second = interrupted.second
    # DVC lets go of its repository lock while a stage's command runs and keeps a lock on that stage's dependencies
    # and outputs: the second stops at one or the other
    assert second.returncode != 0 and re.search(r"Unable to acquire lock|is busy, it is being blocked by:[\s\S]*"
                                                r"dvc/__main__.py repro", second.stderr), \
        second.stdout[-2000:] + second.stderr[-2000:]
    assert "Running stage" not in second.stdout   # it ran nothing
    # the first kept going to its kill point (its outputs whole, its study's results right: the tests below)
    assert interrupted.first_alive_after_second


def test_no_partial_file_sits_under_a_final_name_after_any_kill(interrupted):
    # each kill landed in the stage it aimed at
    where = [f"{kill.point} in {kill.stage}" for kill in interrupted.kills]
    assert re.fullmatch(r"training in run@tiny-ae-recon, evaluation in run@tiny-ae-recon, analysis in "
                        r"score_analyses@tiny, report in report", ", ".join(where)), where
    for kill in interrupted.kills:
        assert kill.partial == [], f"killed at {kill.point} in {kill.stage}: {kill.partial}"
    assert partial_files(interrupted.work, interrupted.since) == []   # and none after the final repro


def test_the_resumed_study_equals_an_uninterrupted_one(interrupted, tiny_repro):
    final = interrupted.final
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    resumed, whole = study_results(interrupted.work), tiny_repro.results
    assert sorted(resumed) == sorted(whole)
    # compared whole, nothing masked: REPORT.md holds no timings, run ids, paths or dates (the learning-curve
    # table's training seconds are the benchmark's, read from a table kept in git)
    for name in whole:
        assert resumed[name] == whole[name], name
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=interrupted.work, env=interrupted.env,
                            capture_output=True, text=True, timeout=300)
    assert status.returncode == 0 and "changed" not in status.stdout, status.stdout   # nothing left to rerun


def test_no_mlflow_run_is_left_running_and_the_killed_ones_are_closed(interrupted):
    client = MlflowClient(interrupted.env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], run_view_type=ViewType.ALL)
    running = [(run.info.run_name, run.data.tags.get("dataset")) for run in runs if run.info.status == "RUNNING"
               and run.data.tags.get(tracking.ROLE_TAG) != tracking.STUDY_RUN]
    assert running == []
    # the runs of the two stages killed mid-run were closed as KILLED by their stage's rerun, and replaced
    killed = [run for run in runs if run.info.status == "KILLED"]
    assert len(killed) >= 2 and all(run.info.lifecycle_stage == "deleted" for run in killed)
    # the parent runs stay RUNNING until the report logs into them: the tiny study's is finished by the report
    [study] = [run for run in runs if run.info.run_name == "study" and run.data.tags["dataset"] == "tiny" and
               run.info.lifecycle_stage == "active"]
    assert study.info.status == "FINISHED"
    for run in runs:   # every run of the final study holds its scores, whole
        if run.info.lifecycle_stage == "active" and run.data.tags.get(tracking.ROLE_TAG) == "run":
            assert "scores.csv" in {f.path for f in client.list_artifacts(run.info.run_id)}, run.info.run_name
