"""`dvc repro` in a temporary copy of the repository on the tiny profile, then the MLflow UI over its store."""
import json
import re
import subprocess
import sys
import time
import urllib.request

import mlflow
import pandas as pd
import pytest
import torch
import yaml

from analysis.collapse import FINAL_COLUMNS
from local_processes import free_port
from pipeline.config import REPO_ROOT, load_params


@pytest.fixture(scope="module")
def repro(tiny_repro):
    """The session's one tiny-profile `dvc repro` (tests/conftest.py), shared with the interruption tests."""
    return tiny_repro.work, tiny_repro.env


def test_complex_stages_are_the_same_stages_over_the_complex_datasets():
    """The default dvc.yaml expands the *_complex twins over study.complex_datasets x complex_variants."""
    listed = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    study = load_params().study
    for dataset in study.complex_datasets:
        assert f"prepare_complex@{dataset}" in listed and f"baseline_complex@{dataset}" in listed
        for variant in study.complex_variants:
            assert f"run_complex@{dataset}-{variant}" in listed   # one stage runs every seed of a variant
    runs = [name for name in listed if name.startswith("run")]
    assert len(runs) == len(study.datasets) * len(study.variants) + len(study.complex_datasets) * len(
        study.complex_variants)


def test_repro_writes_metrics_for_every_variant(repro):
    work, _ = repro
    study = load_params(work / "params.yaml").study
    for variant in (*study.variants, "copy-last"):
        metrics = json.loads((work / "runs" / "tiny" / variant / "seed0" / "metrics.json").read_text())
        assert 0.0 <= metrics["without_update"]["auc_micro"] <= 1.0, variant
        tracked = json.loads((work / "metrics" / "tiny" / f"{variant}.json").read_text())
        assert tracked == {"seed0": metrics}   # the file DVC declares as metrics and git keeps
    ignored = subprocess.run(["git", "check-ignore", "metrics/tiny/mnad-pred.json", "runs/tiny/mnad-pred/seed0/metrics.json",
                              "runs/tiny/mnad-pred/seed0/checkpoint.pt"], cwd=work, capture_output=True, text=True)
    assert ignored.stdout.split() == ["runs/tiny/mnad-pred/seed0/metrics.json",
                                      "runs/tiny/mnad-pred/seed0/checkpoint.pt"]   # runs/ is DVC's alone
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=work, capture_output=True, text=True)
    assert "changed" not in status.stdout, status.stdout  # everything up to date after one repro


def test_the_collapse_study_runs_its_settings_and_reports_them(repro):
    work, _ = repro
    final = pd.read_csv(work / "analysis" / "tables" / "collapse" / "final.csv")
    assert list(final["setting"]) == ["base", "pred-no-skips"] and (final["steps"] == 8).all()
    assert tuple(final.columns) == FINAL_COLUMNS   # the header an empty study writes names the same columns
    trajectory = pd.read_csv(work / "analysis" / "tables" / "collapse" / "trajectories.csv")
    assert len(trajectory) == 16 and trajectory["entropy"].notna().all()   # a usage row per logged step and run
    for figure in ("usage_over_training.png", "histograms.png", "nan_heuristic.png"):
        assert (work / "analysis" / "figures" / "collapse" / figure).stat().st_size > 1000
    report = (work / "REPORT.md").read_text()
    assert "## The collapse study" in report and "| base |" in report and "dvc exp run -S 'collapse.datasets" in report


def test_the_report_records_versions_and_where_each_run_trained(repro):
    work, env = repro
    report = (work / "REPORT.md").read_text()
    section = report.split("## Reproducibility: versions, devices, and what differs on a GPU", 1)[1]
    assert f"| torch | {torch.__version__} |" in section and f"| mlflow | {mlflow.__version__} |" in section
    trained = len(load_params(work / "params.yaml").study.variants) + 2   # the collapse study's 2 settings, 1 seed
    assert f"| cpu | 1 | torch's default | {trained} |" in section   # every run: CPU, one process, tiny's threads
    assert "**On a GPU** the numbers are expected to differ" in section
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for dataset in ("tiny", "tiny-collapse"):   # the report closes every study run, the collapse study's too
        [study_run] = client.search_runs([client.get_experiment_by_name(dataset).experiment_id],
                                         "tags.`memvad.role` = 'study'")
        assert study_run.info.status == "FINISHED", dataset


def test_mlflow_holds_a_finished_study_run_with_one_nested_run_per_variant(repro):
    work, env = repro
    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("tiny")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"   # the UI opens on its runs
    runs = client.search_runs([experiment.experiment_id])
    [study_run] = [run for run in runs if run.info.run_name == "study"]
    assert study_run.info.status == "FINISHED"
    artifacts = {f.path for f in client.list_artifacts(study_run.info.run_id)}
    assert "REPORT.md" in artifacts and "figures" in artifacts
    figures = {f.path for f in client.list_artifacts(study_run.info.run_id, "figures")}
    assert {"figures/memory_usage", "figures/comparisons", "figures/timelines"} <= figures
    nested = [run for run in runs if run.info.run_name != "study"]
    study = load_params(work / "params.yaml").study
    assert sorted(run.info.run_name for run in nested) == sorted([f"{v}/seed0" for v in study.variants]
                                                                  + ["copy-last/seed0"])
    for run in nested:
        assert run.data.tags["mlflow.parentRunId"] == study_run.info.run_id
        if run.info.run_name != "copy-last/seed0":
            assert "loss" in run.data.metrics, run.info.run_name
        assert {"eval.without_update.auc_micro", "auc_micro"} <= set(run.data.metrics), run.info.run_name
        # each run lasts its own stage's work, not the span of the whole study
        assert run.info.end_time - run.info.start_time < 0.5 * (study_run.info.end_time - study_run.info.start_time)


def test_dvc_plots_overlay_the_variants_of_a_dataset(repro):
    work, env = repro
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    plots = json.loads(shown)["data"]
    # four overlays, not one plot per run: ROC and loss per variant, and the collapse study's usage per setting
    assert set(plots) == {"roc", "train_loss", "usage_entropy", "usage_top_share"}
    for name in ("roc", "train_loss"):   # the template colours by variant and draws a panel per dataset
        [rendered] = plots[name]
        content = rendered["content"]
        assert content["spec"]["encoding"]["color"]["field"] == "variant" and content["facet"]["row"]["field"] == \
            "dataset"
    for name in ("usage_entropy", "usage_top_share"):
        [rendered] = plots[name]
        assert rendered["content"]["encoding"]["color"]["field"] == "setting"
        assert {row["setting"] for row in rendered["content"]["data"]["values"]} == {"base", "pred-no-skips"}
    roc = pd.read_csv(work / "analysis" / "plots" / "roc.csv")
    study = load_params(work / "params.yaml").study
    assert set(roc["variant"]) == set(study.variants) | {"copy-last"} and set(roc["dataset"]) == {"tiny"}




def test_mlflow_ui_serves_the_runs(repro):
    """The README's UI command, on 127.0.0.1, answers runs/search with the runs and their metrics."""
    work, env = repro
    port = free_port()
    server = subprocess.Popen(["mlflow", "ui", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}",
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=work,
                              env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},   # as README
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


def test_a_changed_option_makes_exactly_the_stages_that_read_it_stale(repro):
    """What `dvc repro` (or `dvc exp run -S`) would rerun after a change, from `dvc status`: an analysis option
    reaches its analysis stage and the report, and no run or model analysis."""
    work, env = repro
    params = work / "params.yaml"
    original = params.read_text()
    edited = yaml.safe_load(original)
    edited["analysis"]["timeline_videos"] = 1
    try:
        params.write_text(yaml.safe_dump(edited, sort_keys=False))
        status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=work, env=env,
                                capture_output=True, text=True, check=True).stdout
    finally:
        params.write_text(original)
    assert sorted(json.loads(status)) == ["report", "score_analyses@tiny"], status


def test_an_evaluation_only_change_reruns_evaluation_and_not_training(repro):
    work, env = repro
    checkpoint = work / "runs" / "tiny" / "mnad-recon" / "seed0" / "checkpoint.pt"
    before = checkpoint.read_bytes(), checkpoint.stat().st_mtime_ns
    metrics_before = json.loads((checkpoint.parent / "metrics.json").read_text())
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "results of the first repro"]):
        subprocess.run(command, cwd=work, check=True, env=env)
    # the experiment of the run stage alone: the analyses after it are the status test's concern
    result = subprocess.run([sys.executable, "-m", "dvc", "exp", "run", "-S", "variants.mnad-recon.alpha=0.3",
                             "run@tiny-mnad-recon"], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reran = re.findall(r"Running stage '([^']+)'", result.stdout)
    assert reran == ["run@tiny-mnad-recon"]
    assert "training: the finished checkpoint matches; nothing to train" in result.stdout + result.stderr
    assert (checkpoint.read_bytes(), checkpoint.stat().st_mtime_ns) == before
    metrics = json.loads((checkpoint.parent / "metrics.json").read_text())
    assert metrics["with_update"]["auc_micro"] != metrics_before["with_update"]["auc_micro"]
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout
    assert re.search(r'"alpha":\s*0\.3\b', shown), shown[:2000]   # the experiment records the option it ran with
