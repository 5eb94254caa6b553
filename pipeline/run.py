"""One run of the study: `python -m pipeline.run --dataset D --variant V --seed S` (the `run@` and `baseline@`
stages).

Trains the variant (a no-op when runs/<dataset>/<variant>/seed<S>/checkpoint.pt is finished and its training
fingerprint matches: an evaluation-only change never retrains; an interrupted training resumes), then evaluates it.
Both go into one MLflow run, started afresh by this process (pipeline.tracking), so its duration is this stage's
work. `copy-last` has nothing to train and is only evaluated.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from models.build import build_model
from pipeline import checkpoint, evaluate, tracking, train
from pipeline.config import load_params
from pipeline.device import compute_device
from pipeline.errors import exit_cleanly
from pipeline.paths import frames_dir, run_dir


def run(dataset_name: str, variant_name: str, seed: int, params_path: Path | None = None,
        data_root: Path | None = None, runs_root: Path | None = None, stop_after_epoch: int | None = None) -> dict:
    """Train and evaluate; returns the metrics (empty when `stop_after_epoch` interrupted the training)."""
    params = load_params(params_path)
    dataset, variant = params.dataset(dataset_name), params.variant(variant_name)
    frames = frames_dir(dataset_name, data_root)
    out_dir = run_dir(dataset_name, variant_name, seed, runs_root)
    device = compute_device()
    with tracking.Run(dataset_name, variant_name, seed) as mlflow_run:
        mlflow_run.set_tags({**tracking.environment_tags(device.type), "dvc_stage": f"run@{dataset_name}-"
                             f"{variant_name}-{seed}", "eval.nan_policy": params.evaluate.nan_policy,
                             "eval.test_time_update": params.evaluate.test_time_update})
        mlflow_run.log_params({"variant.alpha": variant.alpha, "variant.test_threshold": variant.test_threshold})
        if variant.trainable:
            started = time.perf_counter()
            training = train.train(dataset, variant, seed, frames, out_dir, device,
                                   on_epoch=lambda row: mlflow_run.log_metrics(
                                       {k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"]),
                                   stop_after_epoch=stop_after_epoch)
            mlflow_run.log_params({**tracking.flatten_params(training.config), "fingerprint": training.fingerprint,
                                   "train_clips": training.train_clips, "parameters": training.parameters})
            mlflow_run.set_tags({"trained_epochs": training.trained_epochs})
            if not training.trained_epochs:
                print("training: the finished checkpoint matches; nothing to train")
            mlflow_run.log_metrics({"train_seconds": time.perf_counter() - started})
            mlflow_run.log_artifact(out_dir / "train_log.csv")
            if len(training.log) < dataset.profile.epochs:   # interrupted (tests): nothing to evaluate yet
                mlflow_run.finish("KILLED")
                return {}
            model = checkpoint.load_trained_model(training.checkpoint, dataset, variant, seed, frames, device)
        else:
            model = build_model(variant, dataset.profile).to(device).eval()
        started = time.perf_counter()
        metrics = evaluate.evaluate(model, variant, seed, frames, out_dir, params.evaluate, device)
        headline = metrics[metrics["headline"]]
        mlflow_run.log_metrics({**tracking.flatten(metrics, "eval."), "eval_seconds": time.perf_counter() - started,
                                **{key: headline.get(key) for key in ("auc_micro", "auc_macro", "mean_psnr")}})
        mlflow_run.set_tags({"headline_scoring": metrics["headline"]})
        for name in ("scores.csv", "roc.csv", "metrics.json"):
            mlflow_run.log_artifact(out_dir / name)
        mlflow_run.finish()
    return metrics


@exit_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
    args = parser.parse_args(argv)
    metrics = run(args.dataset, args.variant, args.seed, args.params)
    print({key: value for key, value in metrics.items() if key in ("frames", "videos", "headline")},
          {scoring: metrics[scoring].get("auc_micro") for scoring in ("without_update", "with_update")
           if scoring in metrics})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
