"""The runs of one variant on one dataset: `python -m pipeline.run --dataset D --variant V [--seed S ...]` (the
`run@`, `baseline@` and `collapse@` stages; every seed of study.seeds unless --seed or --collapse-seeds says which).

Each run (one seed) trains the variant (a no-op when runs/<dataset>/<variant>/seed<S>/checkpoint.pt is finished and
its training fingerprint matches: an evaluation-only change never retrains; an interrupted training resumes), then
evaluates it; the learning gate (pipeline.gate) goes into its metrics.json beside the AUCs. Training and evaluation
go into one MLflow run per seed, started afresh (pipeline.tracking), so its duration is that run's work. `copy-last`
has nothing to train and is only evaluated. The stage also writes metrics/<dataset>/<variant>.json, every
seed's metrics in one file: the one DVC declares as metrics and git keeps. The outputs never wait on MLflow: a store
that stays locked or is corrupt turns a run's logging off, and once every output is written the stage exits with one
message that says so (pipeline.tracking); its rerun then only re-evaluates.

The seeds of a variant share one stage: they always change together, and a stage costs seconds of start-up
(torch, MLflow) and of DVC's bookkeeping that the seeds then pay once. They run one after another in the stage's
process, or, with the profile's `concurrent_runs` above 1, that many side by side, each in a process of its own
with the profile's `threads`: a small network's step gains little from a second core, two runs gain nearly twice.
With params.yaml `launcher.kind: torchrun`, each seed's training is instead started through torchrun on the
launcher's processes (pipeline.launch), one seed at a time, and evaluated here once it is finished.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from models.build import build_model
from pipeline import checkpoint, evaluate, launch, tracking, train
from pipeline.config import load_params
from pipeline.device import compute_device
from pipeline.errors import UserError, exit_cleanly
from pipeline.gate import learning_gate
from pipeline.io import remove_temporaries, write_json
from pipeline.paths import frames_dir, run_dir, variant_metrics_path


def run(dataset_name: str, variant_name: str, seed: int, params_path: Path | None = None,
        data_root: Path | None = None, runs_root: Path | None = None, stop_after_epoch: int | None = None) -> dict:
    """One run: train and evaluate one seed; returns its metrics (empty when `stop_after_epoch` interrupted the
    training). An MLflow store that is locked or corrupt does not stop it: its outputs are written, then the
    StoreUnavailable is raised."""
    metrics, problem = _run(dataset_name, variant_name, seed, params_path, data_root, runs_root, stop_after_epoch)
    if problem is not None:
        raise problem
    return metrics


def _run(dataset_name: str, variant_name: str, seed: int, params_path: Path | None = None,
         data_root: Path | None = None, runs_root: Path | None = None, stop_after_epoch: int | None = None,
         track: bool = True) -> tuple[dict, tracking.StoreUnavailable | None]:
    """`run`, returning (metrics, the MLflow store's problem or None) instead of raising the problem: the stage
    reports it after writing the variant's metrics. With `track` False it logs nothing (the stage found the store
    unavailable already)."""
    params = load_params(params_path)
    dataset, variant = params.dataset(dataset_name), params.variant(variant_name)
    frames = frames_dir(dataset_name, data_root)
    out_dir = run_dir(dataset_name, variant_name, seed, runs_root)
    remove_temporaries(out_dir)   # this run is its folder's one writer; the folder persists across executions
    device = compute_device()
    # Every MLflow call below is a no-op once the store has failed (keep_going): the run's outputs never wait on it.
    mlflow_run = tracking.Run(dataset_name, variant_name, seed, keep_going=True) if track else tracking.offline()
    with mlflow_run:
        # DVC names the stage that runs this command in DVC_STAGE; by hand there is none
        mlflow_run.set_tags({**tracking.environment_tags(device.type), "dvc_stage": os.environ.get("DVC_STAGE", "-"),
                             "eval.nan_policy": params.evaluate.nan_policy,
                             "eval.test_time_update": params.evaluate.test_time_update})
        mlflow_run.log_params({"variant.alpha": variant.alpha, "variant.test_threshold": variant.test_threshold})
        if variant.trainable:
            if params.launcher.kind == "torchrun":
                # torchrun's rank 0 logs the training into this run; then its finished checkpoint is read back
                launch.train_with_torchrun(params.launcher, dataset_name, variant_name, seed, mlflow_run.run_id,
                                           params_path, data_root, runs_root, stop_after_epoch)
                training = train.train(dataset, variant, seed, frames, out_dir, device, stop_after_epoch=0)
            else:
                training = train.tracked_training(dataset, variant, seed, frames, out_dir, device, mlflow_run,
                                                  stop_after_epoch)
            if training.epochs < dataset.training_profile(variant).epochs:   # interrupted: nothing to evaluate yet
                mlflow_run.finish("KILLED")
                return {}, mlflow_run.problem
            model = checkpoint.load_trained_model(training.checkpoint, dataset, variant, seed, frames, device)
        else:
            model = build_model(variant, dataset.training_profile(variant)).to(device).eval()
        started = time.perf_counter()
        metrics = evaluate.evaluate(model, variant, seed, frames, out_dir, params.evaluate,
                                    dataset.profile.update_threshold, device)
        eval_seconds = time.perf_counter() - started
        if variant.trainable:
            options = params.gate
            metrics["gate"] = learning_gate([row["step"] for row in training.log],
                                            [row["loss"] for row in training.log], metrics["normal_psnr"],
                                            metrics["floor_psnr"], variant.task, options.plateau_window,
                                            options.plateau_tolerance, options.floor_margin_db)
            metrics["training"] = {"steps": training.log[-1]["step"], "epochs": training.epochs}
            mlflow_run.set_tags({"learnt": metrics["gate"]["learnt"]})
        write_json(out_dir / "metrics.json", metrics)
        headline = metrics[metrics["headline"]]
        mlflow_run.log_metrics({**tracking.flatten(metrics, "eval."), "eval_seconds": eval_seconds,
                                **{key: headline.get(key) for key in ("auc_micro", "auc_macro", "mean_psnr")}})
        mlflow_run.set_tags({"headline_scoring": metrics["headline"]})
        for name in ("scores.csv", "roc.csv", "metrics.json"):
            mlflow_run.log_artifact(out_dir / name)
        mlflow_run.finish()
    return metrics, mlflow_run.problem


def run_seeds(dataset_name: str, variant_name: str, seeds: list[int] | None = None, params_path: Path | None = None,
              data_root: Path | None = None, runs_root: Path | None = None,
              metrics_root: Path | None = None) -> dict[int, dict]:
    """Every run of a variant (study.seeds, or `seeds`); removes the folders of seeds the study no longer has and
    writes the variant's metrics file. Returns the metrics per seed. A locked or corrupt MLflow store stops no run:
    once every output is written, it is raised as one UserError that says so."""
    params = load_params(params_path)
    if seeds is None:
        seeds = list(params.study.seeds) if params.variant(variant_name).trainable else [0]
    variant_dir = run_dir(dataset_name, variant_name, 0, runs_root).parent
    for stale in variant_dir.glob("seed*"):   # the output folder persists across executions (its checkpoints do)
        if stale.name not in {f"seed{s}" for s in seeds}:
            shutil.rmtree(stale)
    problem = None
    try:   # the experiment and its parent run exist before the runs (side by side, they would race to make them)
        tracking.study_run(dataset_name)
    except tracking.StoreUnavailable as exc:   # found once, not again by every run
        problem = exc
    side_by_side = min(params.dataset(dataset_name).training_profile(params.variant(variant_name)).concurrent_runs,
                       len(seeds))
    if params.launcher.kind == "torchrun":   # each seed's training takes the launcher's processes: one at a time
        side_by_side = 1
    paths = (params_path, data_root, runs_root)
    if side_by_side > 1:
        outcomes = _side_by_side(side_by_side, dataset_name, variant_name, seeds, paths, problem is None)
    else:
        outcomes = {}
        for seed in seeds:   # after a failure of the store, the later seeds do not wait on it again
            outcomes[seed] = _run(dataset_name, variant_name, seed, *paths, track=problem is None)
            problem = problem or outcomes[seed][1]
    results = {seed: metrics for seed, (metrics, _) in outcomes.items()}
    problem = problem or next((p for _, p in outcomes.values() if p is not None), None)
    for seed in seeds:
        headline = results[seed][results[seed]["headline"]]
        print(f"{dataset_name} {variant_name} seed {seed}: {results[seed]['headline']} micro AUC "
              f"{headline['auc_micro']:.4f}" + (f", learnt: {results[seed]['gate']['learnt']}"
                                               if "gate" in results[seed] else ""))
    metrics_path = variant_metrics_path(dataset_name, variant_name, metrics_root)
    write_json(metrics_path, {f"seed{s}": m for s, m in results.items()})
    if problem is not None:
        raise UserError(f"{problem.what}: the outputs of {variant_name} on {dataset_name} are written "
                        f"({variant_dir}, {metrics_path}), its MLflow runs are not; {problem.fix}")
    return results


def _side_by_side(processes: int, dataset_name: str, variant_name: str, seeds: list[int], paths: tuple,
                  track: bool) -> dict[int, tuple[dict, tracking.StoreUnavailable | None]]:
    """`_run` of every seed, `processes` at a time, each in a fresh (spawned) process; the first failure cancels the
    runs not yet started and is raised here."""
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {seed: pool.submit(_run, dataset_name, variant_name, seed, *paths, track=track) for seed in seeds}
        return {seed: future.result() for seed, future in futures.items()}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@exit_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--seed", type=int, action="append", help="a seed to run (default: study.seeds)")
    parser.add_argument("--collapse-seeds", action="store_true",
                        help="run the collapse study's seeds (the first collapse.seeds of study.seeds)")
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
    args = parser.parse_args(argv)
    seeds = args.seed
    if args.collapse_seeds:
        seeds = list(load_params(args.params).collapse_seeds)
    run_seeds(args.dataset, args.variant, seeds, args.params)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
