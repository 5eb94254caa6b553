"""Shared fixtures: a tiny prepared dataset, and an MLflow store per test session that never touches the repo's."""
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

# No test talks to any host but 127.0.0.1: MLflow's and DVC's usage telemetry stay off in this process and its
# children.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "true"   # also off in .dvc/config; this covers DVC run outside a repository

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


class TinyRepro(NamedTuple):
    work: object      # the copy of the repository (a committed git repo)
    env: dict         # the environment its stages ran in
    results: dict     # benchmarks.tiny_study.study_results right after the repro (later tests change the copy)
    finished: object  # a copy of `work` as the repro left it (its DVC cache too; not its MLflow store)


@pytest.fixture(scope="session")
def tiny_repro(tmp_path_factory):
    """`dvc repro` of the tiny study in a copy of the repository, once per session: the end-to-end tests read it,
    and the interruption tests compare an interrupted study with it."""
    from benchmarks.tiny_study import repro, study_results, tiny_study_copy

    work = tmp_path_factory.mktemp("repo")
    env = tiny_study_copy(work)
    started = time.perf_counter()
    result = repro(work, env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"dvc repro on the tiny profile: {time.perf_counter() - started:.0f} s")
    finished = tmp_path_factory.mktemp("repo-finished")
    shutil.copytree(work, finished, symlinks=True, dirs_exist_ok=True,
                    ignore=lambda folder, names: [n for n in names if Path(folder, n) in
                                                  {work / ".dvc" / "tmp", work / "mlflow.db", work / "mlartifacts"}])
    return TinyRepro(work, env, study_results(work), finished)
