"""MLflow conventions (DESIGN.md), logged in-process by the stage that does the work.

- One experiment per dataset, tagged as model development so that the UI opens it on its runs table.
- In each experiment, a parent run named `study` holds REPORT.md and the analysis figures; every run is nested
  under it.
- One run per (dataset, variant, seed), named `<variant>/seed<S>`. Each execution of its `run@` stage starts the
  run afresh (the earlier one is deleted), so the run's duration is that stage's own work and its curves describe
  the checkpoint that exists. Epochs trained by an earlier execution (a resume, or a finished checkpoint that made
  training a no-op) are logged again from the checkpoint's log.
- Headline metrics (`auc_micro`, `auc_macro`, `mean_psnr`) are logged under one name for every variant, so the runs
  table sorts by them; the scorings with and without test-time update are under `eval.<scoring>.*`.

DVC outputs never depend on anything read back from here.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.config import REPO_ROOT

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow 3 reports usage to a remote host by default; a reproducibility harness sends nothing anywhere.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

# MLflow reads the settings above when it is imported.
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

STUDY_RUN = "study"
ROLE_TAG = "memvad.role"           # "study" on the parent runs, "run" on the (variant, seed) runs
# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it is model development.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
PARENT_TAG = "mlflow.parentRunId"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the sqlite store at the repository root (absolute, so any cwd works)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(REPO_ROOT / 'mlflow.db').as_posix()}"


def client():
    # alembic prints every schema migration at INFO when a new store is created; that is noise in a stage log
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(mlflow_client, dataset: str) -> str:
    """The dataset's experiment (created, or restored if deleted), tagged so the UI opens on its runs."""
    experiment = mlflow_client.get_experiment_by_name(dataset)
    if experiment is None:
        artifacts = None
        if tracking_uri().startswith("sqlite:///"):
            artifacts = (Path(tracking_uri()[len("sqlite:///"):]).parent / "mlartifacts" / dataset).as_uri()
        return mlflow_client.create_experiment(dataset, artifact_location=artifacts, tags=EXPERIMENT_KIND)
    if experiment.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(experiment.experiment_id)
    if experiment.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
        for key, value in EXPERIMENT_KIND.items():
            mlflow_client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


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


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested mapping."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """{"with_update": {"auc_micro": .9}} -> {"with_update.auc_micro": .9} (numbers only: MLflow metrics)."""
    return {key: float(value) for key, value in _leaves(metrics, prefix)
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def flatten_params(options: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"variant": {"task": "predict"}} -> {"variant.task": "predict"}: every option as an MLflow param."""
    return {key: str(value) for key, value in _leaves(options, prefix)}


class Logged:
    """Logging calls on one MLflow run (thin wrappers over MlflowClient)."""

    def __init__(self, mlflow_client, run_id: str):
        self.client, self.run_id = mlflow_client, run_id

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._log_batch(100, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._log_batch(100, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        self.log_history([(step, metrics)])

    def log_history(self, rows: Iterable[tuple[int, Mapping[str, float | None]]]) -> None:
        """Many steps of metrics at once: [(step, {name: value}), ...]; None and NaN values are left out."""
        now = int(time.time() * 1000)
        self._log_batch(1000, metrics=[Metric(k, float(v), now, step) for step, metrics in rows
                                       for k, v in metrics.items()
                                       if v is not None and not (isinstance(v, float) and math.isnan(v))])

    def _log_batch(self, size: int, **entities: list) -> None:
        """One kind of entity in calls of at most `size` (MLflow takes 100 params or tags, 1000 metrics a call)."""
        [(kind, items)] = entities.items()
        for start in range(0, len(items), size):
            self.client.log_batch(self.run_id, **{kind: items[start:start + size]})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def study_run(dataset: str, mlflow_client=None) -> Logged:
    """The parent run of a dataset's experiment (created on first use); it stays RUNNING until the report is
    written into it."""
    mlflow_client = mlflow_client or client()
    experiment = experiment_id(mlflow_client, dataset)
    found = mlflow_client.search_runs([experiment], filter_string=f"tags.`{ROLE_TAG}` = '{STUDY_RUN}'",
                                      order_by=["attributes.start_time ASC"])
    if found:
        return Logged(mlflow_client, found[0].info.run_id)
    created = mlflow_client.create_run(experiment, run_name=STUDY_RUN, tags={ROLE_TAG: STUDY_RUN, "dataset": dataset})
    return Logged(mlflow_client, created.info.run_id)


class Run(Logged):
    """The MLflow run of one (dataset, variant, seed), started afresh and nested under the dataset's study run.
    As a context manager, a stage that raises marks its run FAILED (KILLED for Ctrl-C)."""

    def __init__(self, dataset: str, variant: str, seed: int, mlflow_client=None):
        mlflow_client = mlflow_client or client()
        parent = study_run(dataset, mlflow_client)
        if mlflow_client.get_run(parent.run_id).info.status != "RUNNING":
            mlflow_client.update_run(parent.run_id, status="RUNNING")   # a new execution of the study
        experiment = experiment_id(mlflow_client, dataset)
        identity = {"dataset": dataset, "variant": variant, "seed": str(seed)}
        earlier = mlflow_client.search_runs(
            [experiment], filter_string=f"tags.variant = '{variant}' and tags.seed = '{seed}' and "
                                        f"tags.`{ROLE_TAG}` = 'run'")
        for run in earlier:   # its curves and scores describe an execution that this one replaces
            mlflow_client.delete_run(run.info.run_id)
        created = mlflow_client.create_run(experiment, run_name=f"{variant}/seed{seed}",
                                           tags={**identity, ROLE_TAG: "run", PARENT_TAG: parent.run_id})
        super().__init__(mlflow_client, created.info.run_id)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:  # say so on the run, and let the stage's own error through
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
