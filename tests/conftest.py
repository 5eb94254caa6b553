"""Shared fixtures: a tiny prepared dataset, an MLflow store per test process that never touches the repo's, and
one tiny-study `dvc repro` for the whole test session."""
import json
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple


# No test talks to any host but 127.0.0.1: MLflow's and DVC's usage telemetry stay off in this process and its
# children.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ["DVC_NO_ANALYTICS"] = "true"   # also off in .dvc/config; this covers DVC run outside a repository

# One thread per process, in the tests and in every process they start (stages, DVC, torchrun ranks): the suite
# runs a process per core (pytest.ini), each of which may start more, and on a 2-core CI machine two OpenMP threads
# per process spin-wait on each other (a tiny model gains nothing from them): the suite took 1.8x its CPU time.
# Set before torch is imported, here and in the children (OpenBLAS reads it too).
os.environ["OMP_NUM_THREADS"] = "1"

import pipeline  # noqa: E402,F401  (first: pins the CPU kernels of numpy and torch, as every stage does)
import pytest  # noqa: E402
import torch  # noqa: E402
from filelock import FileLock  # noqa: E402

torch.set_num_threads(1)   # (torch may already be imported by a plugin)


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
    work: Path        # the copy of the repository (a committed git repo); only tests/test_end_to_end.py changes it
    env: dict         # the environment its stages ran in
    results: dict     # benchmarks.tiny_study.study_results right after the repro (later tests change the copy)
    finished: Path    # a copy of `work` as the repro left it (its DVC cache too; not its MLflow store)


# The suite runs on every core (pytest.ini: pytest-xdist, one test file per worker). These files hold most of its
# time, so they start first, longest first: the two whole studies (the scale-out's and the tiny repro with the
# tests that read it), then the interruptions, which wait for the tiny repro.
LONGEST_FIRST = ("test_scale_out.py", "test_end_to_end.py", "test_interruptions.py", "test_mlflow_store.py",
                 "test_distributed.py", "test_train_evaluate.py")


def pytest_collection_modifyitems(items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: each file keeps its order


@pytest.fixture(scope="session")
def tiny_repro(tmp_path_factory, worker_id):
    """`dvc repro` of the tiny study in a copy of the repository, once per test session, whichever worker asks
    first (the others wait for it and read its record): the end-to-end tests read it, the interruption tests
    compare an interrupted study with it, the scale-out test compares its collected study with it."""
    from benchmarks.tiny_study import repro, study_results, tiny_study_copy

    # the workers' common folder (each worker's basetemp is a folder of it), or this session's own
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    record = shared / "tiny-repro.json"
    with FileLock(shared / "tiny-repro.lock"):
        if record.exists():
            saved = json.loads(record.read_text())
            return TinyRepro(Path(saved["work"]), saved["env"], saved["results"], Path(saved["finished"]))
        work = shared / "tiny-repro"
        work.mkdir()
        env = tiny_study_copy(work)
        started = time.perf_counter()
        result = repro(work, env)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        print(f"dvc repro on the tiny profile: {time.perf_counter() - started:.0f} s")
        finished = shared / "tiny-repro-finished"
        shutil.copytree(work, finished, symlinks=True,
                        ignore=lambda folder, names: [n for n in names if Path(folder, n) in
                                                      {work / ".dvc" / "tmp", work / "mlflow.db", work / "mlartifacts"}])
        built = TinyRepro(work, env, study_results(work), finished)
        record.write_text(json.dumps({"work": str(work), "env": env, "results": built.results,
                                      "finished": str(finished)}))
        return built
