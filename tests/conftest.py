"""Shared fixtures: a tiny prepared dataset, and an MLflow store per test session that never touches the repo's."""
import os

import pytest
import torch

# No test talks to any host but 127.0.0.1: MLflow's usage telemetry stays off in this process and its children.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"

# Two torch threads on a 2-core CI machine mostly wait on each other; one thread is faster and steadier here.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def isolated_mlflow_store(tmp_path_factory):
    """Every test logs to a throwaway sqlite store (the repository's mlflow.db is for real runs)."""
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    yield store
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """data root holding frames/tiny: the `tiny` synthetic dataset of params.yaml, rendered once per session."""
    from pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    prepare("tiny", data_root=root)
    return root
