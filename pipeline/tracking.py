"""MLflow conventions (DESIGN.md): one experiment per dataset, one run per (variant, seed) named `<variant>/seed<S>`.

Training and evaluation of the same (dataset, variant, seed) write into the same run, found by its tags, so a
re-run updates the run instead of adding a duplicate. DVC outputs never depend on anything read back from here.

Importing MLflow and opening its store costs about 4 s of CPU in every stage process (78 of them in the default
study). A stage run from the command line therefore calls `start_worker()` before its own heavy imports: a worker
process imports MLflow on the second core while the stage imports torch on the first, and then makes the stage's
MLflow calls, in order, from JSON lines on its stdin (`BackgroundRun`). A stage run in pipeline.launch's preloaded
interpreter finds MLflow already imported and needs no worker; it, and library calls (tests, notebooks), get a
plain in-process `Run` from `open_run`. This module itself imports nothing heavy.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Mapping

from pipeline.config import REPO_ROOT

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow 3 reports usage to a remote host by default; a reproducibility harness sends nothing anywhere.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the sqlite store at the repository root (absolute, so any cwd works)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(REPO_ROOT / 'mlflow.db').as_posix()}"


def _client():
    from mlflow.tracking import MlflowClient

    # alembic prints every schema migration at INFO when a new store is created; that is noise in a stage log
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri())


def _experiment_id(client, dataset: str) -> str:
    experiment = client.get_experiment_by_name(dataset)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    artifacts = None
    if tracking_uri().startswith("sqlite:///"):
        artifacts = (Path(tracking_uri()[len("sqlite:///"):]).parent / "mlartifacts" / dataset).as_uri()
    return client.create_experiment(dataset, artifact_location=artifacts)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags(device: str) -> dict[str, str]:
    import cv2
    import numpy
    import torch

    return {"git_commit": git_commit(), "torch_version": torch.__version__, "opencv_version": cv2.__version__,
            "numpy_version": numpy.__version__, "python_version": platform.python_version(), "device": device}


class Run:
    """The MLflow run of one (dataset, variant, seed). Thin wrapper over MlflowClient calls."""

    def __init__(self, dataset: str, variant: str, seed: int, fresh: bool = False, client=None):
        self.client = client or _client()
        experiment = _experiment_id(self.client, dataset)
        existing = self.client.search_runs(
            [experiment], filter_string=f"tags.variant = '{variant}' and tags.seed = '{seed}'",
            order_by=["attributes.start_time DESC"])
        if fresh:  # training from scratch: the old run's curves describe weights that no longer exist
            for run in existing:
                self.client.delete_run(run.info.run_id)
            existing = []
        if existing:
            self.run_id = existing[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment, run_name=f"{variant}/seed{seed}",
                                         tags={"dataset": dataset, "variant": variant, "seed": str(seed)})
            self.run_id = run.info.run_id

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params are immutable in MLflow; a resumed or re-evaluated run only adds keys it has not logged yet."""
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v is not None and not (isinstance(v, float) and math.isnan(v))]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:  # the stage failed: say so on its run, and let the stage's own error through
            self.finish("FAILED")


_worker: tuple[subprocess.Popen, IO[bytes]] | None = None


def start_worker() -> None:
    """Start the MLflow worker process of this stage process (see the module docstring). Call it first thing."""
    global _worker
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    output = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "pipeline.tracking"], stdin=subprocess.PIPE, stdout=output,
                               stderr=subprocess.STDOUT, env=environment)
    _worker = (process, output)


def open_run(dataset: str, variant: str, seed: int, fresh: bool = False) -> "Run | BackgroundRun":
    """The MLflow run of (dataset, variant, seed): through the started worker if there is one, else in-process."""
    global _worker
    if _worker is None:
        return Run(dataset, variant, seed, fresh)
    (process, output), _worker = _worker, None
    return BackgroundRun(process, output, dataset, variant, seed, fresh)


class BackgroundRun:
    """The calls of `Run`, sent as JSON lines to a worker process (`start_worker`) that makes them in order. Each
    call returns at once; `finish` closes the stream, waits for the worker and raises with the worker's error if a
    call failed. As a context manager, a stage that raises marks its run FAILED; a stage killed outright closes the
    stream without a status, and the worker marks the run KILLED."""

    def __init__(self, process: subprocess.Popen, output: IO[bytes], dataset: str, variant: str, seed: int,
                 fresh: bool = False):
        self._process, self._output = process, output
        self._open = True
        self._send("open", dataset, variant, seed, fresh)

    def _send(self, call: str, *args: Any) -> None:
        if not self._open:
            raise RuntimeError(f"the MLflow run is already finished; cannot {call}")
        try:
            self._process.stdin.write((json.dumps([call, *args]) + "\n").encode())
            self._process.stdin.flush()
        except BrokenPipeError:  # the worker died: its own message says why
            self._open = False
            self._fail()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._send("set_tags", {k: str(v) for k, v in tags.items()})

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._send("log_params", {k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self._send("log_metrics", {k: float(v) for k, v in metrics.items() if v is not None}, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._send("log_artifact", str(Path(path).resolve()), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self._send("finish", status)
        self._open = False
        self._process.stdin.close()
        if self._process.wait() != 0:
            self._fail()
        printed = self._printed()
        if printed:  # MLflow's warnings belong in the stage's log
            print(printed, file=sys.stderr)

    def _printed(self) -> str:
        self._output.seek(0)
        return self._output.read().decode(errors="replace").strip()

    def _fail(self) -> None:
        self._process.wait()
        lines = self._printed().splitlines()
        raise RuntimeError(f"MLflow logging failed (tracking URI {tracking_uri()}): "
                           f"{lines[-1] if lines else f'worker exit {self._process.returncode}'}")

    def __enter__(self) -> "BackgroundRun":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None and self._open:
            try:  # the stage failed: say so on its run, and let the stage's own error through
                self.finish("FAILED")
            except RuntimeError:
                pass


def serve(stream: IO[str]) -> None:
    """The worker: open MLflow's store at once (that is the slow part, done while the stage imports torch), then
    apply each JSON line of `stream` to one Run, in order."""
    client = _client()
    run, status = None, None
    try:
        for line in stream:
            call, *args = json.loads(line)
            if call == "open":
                run = Run(*args, client=client)
            elif call == "finish":
                status = args[0]
            else:
                getattr(run, call)(*args)
    except Exception:
        if run is not None:
            run.finish("FAILED")
        raise
    if run is not None:
        run.finish(status or "KILLED")  # no status: the stage process died before it finished


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"with_update": {"auc_micro": .9}} -> {"with_update.auc_micro": .9} (numbers only)."""
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group; the stage handles it and sends FAILED, which this worker must live
    # to record. Its own end comes with the end of its input, whichever way the stage ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        serve(sys.stdin)
    except Exception as error:  # noqa: BLE001 - one line that BackgroundRun quotes in its error
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        raise SystemExit(1)
    from pipeline.errors import exit_now

    exit_now(0)  # the stage waits for this process to end: skip MLflow's 0.6 s of teardown
