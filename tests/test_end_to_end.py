"""`dvc repro` in a temporary copy of the repository on the tiny profile, then the MLflow UI over its store."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from pipeline.config import REPO_ROOT, load_params


def repository_files():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [name for name in listed if (REPO_ROOT / name).is_file()]


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    work = tmp_path_factory.mktemp("repo")
    for name in repository_files():
        if name.startswith("runs/") or name == "REPORT.md":
            continue  # results of the default study: the copy must make its own
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, work / name)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["study"]["datasets"] = ["tiny"]
    params["study"]["collapse_datasets"] = []  # the *_collapse twins are the same definitions (see below)
    params["study"]["seeds"] = [0]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=work, check=True, env=env)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env, capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"dvc repro on the tiny profile: {time.perf_counter() - started:.0f} s")
    return work, env


def test_collapse_stages_are_the_same_stages_over_the_collapse_study():
    """The default dvc.yaml expands the *_collapse twins over study.collapse_datasets x collapse_variants."""
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    study = load_params().study
    for dataset in study.collapse_datasets:
        assert f"prepare_collapse@{dataset}" in listed and f"report" in listed
        for variant in study.collapse_variants:
            for seed in study.seeds:
                assert f"train_collapse@{dataset}-{variant}-{seed}" in listed
                assert f"evaluate_collapse@{dataset}-{variant}-{seed}" in listed
    trained = [name for name in listed if name.startswith("train")]
    expected = len(study.seeds) * (len(study.datasets) * len(study.variants)
                                   + len(study.collapse_datasets) * len(study.collapse_variants))
    assert len(trained) == expected


def test_repro_writes_metrics_for_every_variant(repro):
    work, _ = repro
    study = load_params(work / "params.yaml").study
    for variant in (*study.variants, "copy-last"):
        metrics = json.loads((work / "runs" / "tiny" / variant / "seed0" / "metrics.json").read_text())
        assert 0.0 <= metrics["without_update"]["auc_micro"] <= 1.0, variant
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=work, capture_output=True, text=True)
    assert "changed" not in status.stdout, status.stdout  # everything up to date after one repro


def test_mlflow_store_holds_one_run_per_variant_with_train_and_eval_metrics(repro):
    work, env = repro
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(run.info.run_name for run in runs)
    study = load_params(work / "params.yaml").study
    assert names == sorted([f"{v}/seed0" for v in study.variants] + ["copy-last/seed0"])
    for run in runs:
        if run.info.run_name != "copy-last/seed0":
            assert "loss" in run.data.metrics, run.info.run_name
        assert "eval.without_update.auc_micro" in run.data.metrics, run.info.run_name


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_ui_serves_the_runs(repro):
    """The README's UI command, on 127.0.0.1, answers runs/search with the runs and their metrics."""
    work, env = repro
    port = free_port()
    server = subprocess.Popen(["mlflow", "ui", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                               "--host", "127.0.0.1", "--port", str(port)], cwd=work, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name=tiny", timeout=5) as r:
                    experiment_id = json.load(r)["experiment"]["experiment_id"]
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(1)
        request = urllib.request.Request(f"{base}/runs/search", method="POST",
                                         data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            runs = json.load(response)["runs"]
        by_name = {run["info"]["run_name"]: run for run in runs}
        assert "mnad-pred/seed0" in by_name
        metric_keys = {m["key"] for m in by_name["mnad-pred/seed0"]["data"]["metrics"]}
        assert {"loss", "eval.with_update.auc_micro", "eval.without_update.auc_micro"} <= metric_keys
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_dvc_exp_run_with_a_changed_option(repro):
    """`dvc exp run -S key=value` reruns what depends on the key and records the experiment (runs last: it changes
    the copy's workspace)."""
    work, env = repro
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "results of the first repro"]):
        subprocess.run(command, cwd=work, check=True, env=env)
    result = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", "analysis.timeline_videos=1"],
                            cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Running stage 'timelines@tiny'" in result.stdout
    assert "Running stage 'train@" not in result.stdout  # nothing that does not read the key reruns
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert re.search(r'"timeline_videos":\s*1\b', shown), shown[:2000]

