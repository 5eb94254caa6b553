"""MLflow conventions (DESIGN.md): one experiment per dataset, one run per (variant, seed) named `<variant>/seed<S>`.

Training and evaluation of the same (dataset, variant, seed) write into the same run, found by its tags, so a
re-run updates the run instead of adding a duplicate. DVC outputs never depend on anything read back from here.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

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

    def __init__(self, dataset: str, variant: str, seed: int, fresh: bool = False):
        self.client = _client()
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
