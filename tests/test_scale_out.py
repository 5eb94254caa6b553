"""A study spread over two workers that log to one MLflow tracking server on PostgreSQL, then collected into one
REPORT.md: the commands of README "Scaling up", for real, on 127.0.0.1 only (issue 16).

1. The servers. PostgreSQL from Debian's packages (`initdb` into a temporary folder; run as `nobody` when the test
   runs as root, since PostgreSQL refuses root), listening on 127.0.0.1 on a free port, and `mlflow server` on it,
   its artifacts proxied into a folder of their own (the shared artifact store). Both are stopped at the end, also
   when a test fails.
2. The workers' host. A tiny-study copy of the repository (benchmarks/tiny_study) with a git remote and a DVC remote
   (local folders standing in for a git server and a bucket), its datasets prepared once and pushed. Its training
   stages (`run@`, `baseline@`, `collapse@`) are dealt round-robin into two parts, each queued as a DVC experiment
   (`dvc exp run --queue --allow-missing -n part-00 <its stages>`). Two queue workers, each started with a GPU of its
   own (CUDA_VISIBLE_DEVICES=0 and 1: there is no GPU here, the variable only travels to the runs), run the two parts
   side by side and log to the server. `dvc exp push` then sends both experiments to the remotes, as a worker host
   does.
3. The collecting host: a fresh clone. `dvc exp pull` brings both experiments (their commits from git, their
   outputs from the DVC remote); each part's dvc.lock and metrics files are checked out and `dvc checkout` puts its
   outputs in place; `dvc commit` records every part's stages in one dvc.lock; `dvc repro --allow-missing` runs what
   is left: the analyses and the report. Nothing is trained or evaluated again, so the workers' runs are the only
   ones in the server.

The checks: the server holds one run per (dataset, variant, seed), none twice (not even in the trash), each with
every metric-history entry once and tags naming its experiment, host, workspace and GPU; the collected dvc.lock holds
exactly the entries the workers' DVC recorded; and REPORT.md, every metrics file, checkpoint and score table equal
the local run's (tests/conftest.py `tiny_repro`).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import platform
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pandas as pd
import pytest
import yaml
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from benchmarks.tiny_study import study_results, tiny_study_copy
from local_processes import command, dvc, free_port, start_queue_workers, stop_queue_workers, wait_for_the_queue
from pipeline import tracking

TRAINING_STAGES = re.compile(r"(run|run_complex|baseline|baseline_complex|collapse)@")


# --- 1. the servers ---------------------------------------------------------------------------------------------

def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs (Debian keeps them under /usr/lib/postgresql/<version>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def stop(process: subprocess.Popen, first: signal.Signals, timeout: float = 30) -> None:
    """`first` to the process (a server's own clean shutdown), then SIGKILL to its whole group if it lingers."""
    if process.poll() is None:
        process.send_signal(first)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)   # its children too (started in a session of its own)
    process.wait()


def wait_until(ready, process: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"{what} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not ready within {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


@contextlib.contextmanager
def postgres_server(logs: Path) -> Iterator[tuple[str, str]]:
    """A throwaway PostgreSQL server on 127.0.0.1 with a database `mlflow` owned by the password-protected user
    `mlflow`: yields (its URI without the password, the password)."""
    import psycopg2

    programs = postgres_bin()
    if programs is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's `postgresql`)")
    folder = Path(tempfile.mkdtemp(prefix="memvad-postgres-"))   # not under pytest's folder: `nobody` must enter it
    as_user = {}
    if os.geteuid() == 0:   # initdb and postgres refuse to run as root
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    password = secrets.token_hex(16)
    (folder / "password").write_text(password + "\n")
    if as_user:
        os.chown(folder / "password", as_user["user"], as_user["group"])
    log = logs / "postgres.log"
    process = None
    try:
        with open(log, "w") as handle:
            initdb = subprocess.run([programs / "initdb", "-D", folder / "data", "-U", "mlflow", "--pwfile",
                                     folder / "password", "--auth", "scram-sha-256", "--encoding", "UTF8",
                                     "--locale", "C", "--no-sync"], cwd=folder, stdout=handle,
                                    stderr=subprocess.STDOUT, timeout=300, **as_user)
            assert initdb.returncode == 0, log.read_text()[-3000:]
            port = free_port()
            # a test's database: durability off (fsync) for speed; TCP on 127.0.0.1 only, its socket in the folder
            process = subprocess.Popen([programs / "postgres", "-D", folder / "data", "-h", "127.0.0.1", "-p",
                                        str(port), "-k", folder, "-c", "fsync=off", "-c", "synchronous_commit=off",
                                        "-c", "full_page_writes=off"], cwd=folder, stdout=handle,
                                       stderr=subprocess.STDOUT, start_new_session=True, **as_user)

        def accepts() -> bool:
            try:
                psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", password=password, dbname="postgres",
                                 connect_timeout=2).close()
                return True
            except psycopg2.OperationalError:
                return False
        wait_until(accepts, process, log, "PostgreSQL", timeout=120)
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", password=password,
                                      dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow", password
    finally:
        if process is not None:
            stop(process, signal.SIGINT)   # PostgreSQL's fast shutdown
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend: str, password: str, artifacts: Path, logs: Path) -> Iterator[tuple[str, Callable]]:
    """`mlflow server` on 127.0.0.1 over `backend`, proxying artifacts into `artifacts`: yields its URL and a function
    that waits until it answers (it starts in the background meanwhile). The database's password travels in
    PGPASSWORD (libpq reads it), not on the command line."""
    port = free_port()
    env = {**os.environ, "PGPASSWORD": password, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}   # as README: no job runner (7 processes) for unused jobs
    env.pop("MLFLOW_TRACKING_URI", None)
    log = logs / "mlflow-server.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                                    "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port",
                                    str(port), "--workers", "1"], stdout=handle, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False
    try:
        yield url, lambda: wait_until(healthy, process, log, "mlflow server", timeout=300)
    finally:
        stop(process, signal.SIGTERM, timeout=10)   # (uvicorn waits on open keep-alive connections)


# --- 2. the workers' host, 3. the collecting host -------------------------------------------------------------


def start_workers(work: Path, env: dict, gpus: list[str], timeout: float = 300) -> None:
    """One queue worker per GPU, as README "Scaling up" starts them: `dvc queue start -j K` starts the workers
    missing up to K, with the environment of that command, so each is started alone with its CUDA_VISIBLE_DEVICES,
    once the one before it has registered (`dvc queue status` counts it); the next start would otherwise not see it
    and start one in its place."""
    for count, gpu in enumerate(gpus, start=1):
        start_queue_workers(work, {**env, "CUDA_VISIBLE_DEVICES": gpu}, count)
        deadline = time.monotonic() + timeout
        while True:
            status = dvc(work, env, "queue", "status")
            active, idle = map(int, re.search(r"Worker status: (\d+) active, (\d+) idle", status).groups())
            if active + idle >= count:
                break
            assert time.monotonic() < deadline, f"worker {count} did not register within {timeout:.0f} s:\n{status}"
            time.sleep(1)


class ScaledStudy(NamedTuple):
    server: str                   # the MLflow tracking server's URL
    artifacts: Path               # the server's artifact store
    work: Path                    # the workers' host's repository
    collector: Path               # the collecting host's clone
    parts: dict[str, list[str]]   # experiment name -> the stages it ran
    logs: dict[str, str]          # experiment name -> its `dvc queue logs`
    gpus: dict[str, str]          # experiment name -> CUDA_VISIBLE_DEVICES of the worker it was started for
    seconds: dict[str, float]     # wall time of each phase


@pytest.fixture(scope="module")
def scaled(tmp_path_factory) -> Iterator[ScaledStudy]:
    root = tmp_path_factory.mktemp("scale-out")
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        seconds[phase] = time.perf_counter() - clock
        clock = time.perf_counter()

    with contextlib.ExitStack() as servers:
        # 1. PostgreSQL and `mlflow server` on it (README "Scaling up": the server), which starts while 2. begins
        backend, password = servers.enter_context(postgres_server(root))
        artifacts = root / "mlflow-artifacts"
        server, server_ready = servers.enter_context(mlflow_server(backend, password, artifacts, root))

        # 2. the workers' host: the repository, its git and DVC remotes, the study dealt into two queued parts
        work = root / "workers-host"
        work.mkdir()
        env = {**tiny_study_copy(work), "MLFLOW_TRACKING_URI": server, "DVC_NO_ANALYTICS": "true"}
        branch = command(work, env, "git", "symbolic-ref", "--short", "HEAD").strip()
        command(root, env, "git", "init", "-q", "--bare", f"--initial-branch={branch}", "origin.git")
        command(work, env, "git", "remote", "add", "origin", str(root / "origin.git"))
        dvc(work, env, "remote", "add", "-d", "storage", str(root / "dvc-remote"))
        command(work, env, "git", "commit", "-qm", "DVC remote", ".dvc/config")
        listed = dvc(work, env, "stage", "list", "--name-only").split()
        dvc(work, env, "repro", *[name for name in listed if name.startswith("prepare")])   # the data, once
        command(work, env, "git", "commit", "-qm", "prepared", "dvc.lock")
        command(work, env, "git", "push", "-q", "origin", branch)
        dvc(work, env, "push")
        stages = [name for name in listed if TRAINING_STAGES.match(name)]
        parts = {f"part-{k:02d}": stages[k::2] for k in range(2)}   # round-robin, as `split -n r/2` deals them
        for name, targets in parts.items():   # --allow-missing: the frames come from the cache, not prepared again
            dvc(work, env, "exp", "run", "--queue", "--allow-missing", "-n", name, *targets)
        # one worker per GPU: each worker keeps the environment of the `dvc queue start` that started it
        gpus = {name: str(k) for k, name in enumerate(parts)}
        server_ready()
        lap("servers, repository, queue")
        try:
            start_workers(work, env, list(gpus.values()))
            states = wait_for_the_queue(work, env, list(parts), timeout=1500)
            logs = {name: dvc(work, env, "queue", "logs", name) for name in parts}
            assert set(states.values()) == {"Success"}, f"{states}\n" + "\n".join(l[-3000:] for l in logs.values())
        finally:
            stop_queue_workers(work, env)
        lap("workers")
        dvc(work, env, "exp", "push", "origin", *parts)   # git refs to origin, outputs to the DVC remote
        lap("push")

        # 3. the collecting host: a clone that gets everything through the remotes
        collector = root / "collecting-host"
        command(root, env, "git", "clone", "-q", str(root / "origin.git"), str(collector))
        dvc(collector, env, "exp", "pull", "origin", *parts)
        for name, targets in parts.items():
            dvc(collector, env, "exp", "branch", name, name)
            made = command(collector, env, "git", "diff", "--name-only", "HEAD", name, "--", "metrics").split()
            command(collector, env, "git", "checkout", name, "--", "dvc.lock", *made)
            dvc(collector, env, "checkout", "--with-deps", *targets)
        dvc(collector, env, "commit", "-f", *[stage for targets in parts.values() for stage in targets])
        lap("collect")
        dvc(collector, env, "repro", "--allow-missing", timeout=1500)
        lap("repro")
        print("scale-out phases (s):", ", ".join(f"{phase} {value:.0f}" for phase, value in seconds.items()))
        yield ScaledStudy(server, artifacts, work, collector, parts, logs, gpus, seconds)


# --- the checks --------------------------------------------------------------------------------------------------

def test_each_part_ran_its_stages_and_prepared_nothing_again(scaled):
    for name, targets in scaled.parts.items():
        ran = re.findall(r"Running stage '([^']+)'", scaled.logs[name])
        assert sorted(ran) == sorted(targets), name   # its training stages: the frames came from the DVC cache


def test_the_collected_report_equals_a_local_run(scaled, tiny_repro):
    collected = study_results(scaled.collector)
    assert sorted(collected) == sorted(tiny_repro.results)
    for name in tiny_repro.results:   # REPORT.md, every metrics file, checkpoint, score table
        assert collected[name] == tiny_repro.results[name], name


def test_the_collected_lock_holds_what_each_worker_recorded(scaled):
    """`dvc commit` on the collecting host wrote, for every stage of every part, the entry the worker's own DVC
    wrote (dependencies, params, outputs): nothing was recorded that a worker did not produce from these inputs."""
    lock = yaml.safe_load((scaled.collector / "dvc.lock").read_text())["stages"]
    env = {**os.environ, "DVC_NO_ANALYTICS": "true"}
    for name, targets in scaled.parts.items():
        assert dvc(scaled.collector, env, "params", "diff", name) == ""   # the README's check before collecting
        recorded = yaml.safe_load(command(scaled.collector, os.environ.copy(), "git", "show",
                                          f"{name}:dvc.lock"))["stages"]
        for stage in targets:
            assert lock[stage] == recorded[stage], (name, stage)
    status = dvc(scaled.collector, env, "status")
    # up to date, but for the archives of the datasets, which the collecting host never needs (--allow-missing)
    changed = re.findall(r"^(\S+):$", status, re.MULTILINE)
    assert all(stage.startswith("prepare") for stage in changed), status


def test_every_run_and_metric_is_recorded_once_in_the_server(scaled):
    client = MlflowClient(scaled.server)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=5000)
    trained = [run for run in runs if run.data.tags.get(tracking.ROLE_TAG) == "run"]
    outputs = sorted((folder.parent.parent.name, folder.parent.name, folder.name.removeprefix("seed"))
                     for folder in (scaled.collector / "runs").glob("*/*/seed*"))
    # one run per (dataset, variant, seed): none twice, none replaced (the trash is empty), none left unfinished
    assert sorted((r.data.tags["dataset"], r.data.tags["variant"], r.data.tags["seed"]) for r in trained) == outputs
    assert {(r.info.lifecycle_stage, r.info.status) for r in trained} == {("active", "FINISHED")}
    for dataset in {dataset for dataset, _, _ in outputs}:   # one study run per dataset holds them
        [study] = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == tracking.STUDY_RUN and
                   r.data.tags["dataset"] == dataset and r.info.lifecycle_stage == "active"]
        assert {r.data.tags[tracking.PARENT_TAG] for r in trained if r.data.tags["dataset"] == dataset} == \
            {study.info.run_id}

    for run in trained:
        folder = scaled.collector / "runs" / run.data.tags["dataset"] / run.data.tags["variant"] / \
            f"seed{run.data.tags['seed']}"
        for key in run.data.metrics:   # every metric's history holds each step once
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)), (run.info.run_name, run.data.tags["variant"], key, steps)
        if (folder / "train_log.csv").exists():   # one entry per logged training step, no more
            assert len(client.get_metric_history(run.info.run_id, "loss")) == len(pd.read_csv(
                folder / "train_log.csv"))
        metrics = json.loads((folder / "metrics.json").read_text())
        assert run.data.metrics["auc_micro"] == metrics[metrics["headline"]]["auc_micro"]
        assert "scores.csv" in {f.path for f in client.list_artifacts(run.info.run_id)}
    # the artifacts went through the server into its store
    assert len(list(scaled.artifacts.rglob("scores.csv"))) == len(trained)


def test_each_run_names_its_experiment_worker_and_host(scaled):
    client = MlflowClient(scaled.server)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`{tracking.ROLE_TAG}` = 'run'", max_results=5000)
    part_of = {stage: name for name, targets in scaled.parts.items() for stage in targets}
    for run in runs:
        tags = run.data.tags
        assert tags["dvc_exp"] == part_of[tags["dvc_stage"]], (run.info.run_name, tags["dvc_stage"])
        # each part ran on the worker started for it, with its GPU (one worker per GPU)
        assert tags["cuda_visible_devices"] == scaled.gpus[tags["dvc_exp"]], (run.info.run_name, tags["dvc_exp"])
        assert tags[tracking.HOST_TAG] == platform.node()
        assert Path(tags[tracking.WORKSPACE_TAG]).parent == (scaled.work / ".dvc" / "tmp" / "exps").resolve()
    assert {run.data.tags["dvc_exp"] for run in runs} == set(scaled.parts)
    # the two workers trained at the same time: each part's runs span a time the other's overlap
    spans = {name: (min(r.info.start_time for r in runs if r.data.tags["dvc_exp"] == name),
                    max(r.info.end_time for r in runs if r.data.tags["dvc_exp"] == name)) for name in scaled.parts}
    (first_start, first_end), (second_start, second_end) = spans.values()
    assert first_start < second_end and second_start < first_end, spans


def test_the_report_is_in_the_study_run_of_the_server(scaled, tmp_path):
    client = MlflowClient(scaled.server)
    experiment = client.get_experiment_by_name("tiny").experiment_id
    [study] = client.search_runs([experiment], filter_string=f"tags.`{tracking.ROLE_TAG}` = '{tracking.STUDY_RUN}'")
    assert study.info.status == "FINISHED"   # the collecting host's report stage finished it
    report = Path(client.download_artifacts(study.info.run_id, "REPORT.md", str(tmp_path)))
    assert report.read_text() == (scaled.collector / "REPORT.md").read_text()
