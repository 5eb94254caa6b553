"""Evaluate one (dataset, variant, seed): `python -m pipeline.evaluate --dataset D --variant V --seed S`.

Per test frame: PSNR, feature distance (memory variants), MemAE's clip error, and the normality score, both without
and with test-time memory update for MNAD-memory variants. Writes runs/<dataset>/<variant>/seed<S>/{scores.csv,
metrics.json, roc.csv} and logs metrics, the ROC figure and the scores into the run's MLflow run (the same run as
training). `copy-last` needs no checkpoint: it is evaluated directly.
"""
from __future__ import annotations

if __name__ == "__main__":  # first: run in the preloaded interpreter, or start MLflow's worker (pipeline.launch)
    from pipeline import launch

    launch.prelude(mlflow_worker=True)

from pathlib import Path

import numpy as np
import pandas as pd
import sklearn.metrics  # noqa: F401 - the AUCs need it; imported now, while the MLflow worker imports on the other core
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models.build import build_model, split_clip
from pipeline import checkpoint as ckpt
from pipeline.cli import run_arguments
from pipeline.config import Variant, load_params
from pipeline.data import ClipDataset, clip_dataset
from pipeline.errors import exit_cleanly, exit_now
from pipeline.io import write_csv, write_json
from pipeline.metrics import normality_score, psnr_from_mse, regularity_score, roc_points, summarise
from pipeline.paths import frames_dir, run_dir
from pipeline.tracking import environment_tags, flatten, open_run


def frame_errors(output: torch.Tensor, target: torch.Tensor, family: str) -> dict[str, np.ndarray]:
    """Per-sample error series from outputs in [-1, 1]: PSNR on [0, 1] images, and MemAE's clip error."""
    dims = tuple(range(1, output.dim()))
    mse01 = (((output + 1) / 2 - (target + 1) / 2) ** 2).mean(dim=dims)
    series = {"psnr": psnr_from_mse(mse01.double().cpu().numpy())}
    if family == "memae":  # mean over (t, h, w) of the per-position L2 error over channels (Gong et al.)
        series["error"] = ((output - target) ** 2).sum(dim=1).sqrt().mean(dim=(1, 2, 3)).double().cpu().numpy()
    return series


@torch.no_grad()
def score_batched(model, dataset: ClipDataset | Subset, variant: Variant, batch_size: int,
                  device) -> dict[str, np.ndarray]:
    """One pass with the memory frozen: batched, in any order."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in tqdm(loader, desc="evaluate", leave=False, mininterval=2.0):
        inputs, target = split_clip(batch["clip"], variant)
        inputs, target = inputs.to(device), target.to(device)
        result = model(inputs)
        series = frame_errors(result.output, target, variant.family)
        if getattr(result, "distance", None) is not None:
            series["distance"] = result.distance.double().cpu().numpy()
        for key, value in series.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(value) for key, value in parts.items()}


@torch.no_grad()
def score_with_update(model, dataset: ClipDataset, variant: Variant, device, max_chunk: int) -> dict[str, np.ndarray]:
    """MNAD's test loop: frame by frame in video order, each frame is scored with the memory as it stands and then,
    if its point score is under the threshold, written into it. The memory persists across all test videos.

    Frames are run in batches ("chunks") on the guess that none of them updates the memory: every frame up to and
    including the first one that does update saw exactly the memory the frame-by-frame loop would have shown it, so
    those results are kept, the update is applied, and the rest of the chunk is run again. The chunk doubles
    after a chunk without an update and shrinks to twice the accepted run after one with an update, so rare
    updates cost nearly nothing and frequent ones fall back to one frame at a time.
    """
    parts: dict[str, list[np.ndarray]] = {"psnr": [], "distance": [], "memory_updated": []}
    start, chunk, loaded = 0, max_chunk, []   # `loaded`: the clips of windows start, start + 1, ... already read
    progress = tqdm(total=len(dataset), desc="evaluate (test-time update)", leave=False, mininterval=2.0)
    while start < len(dataset):
        end = min(len(dataset), start + chunk)
        loaded += [dataset[index]["clip"] for index in range(start + len(loaded), end)]
        inputs, target = split_clip(torch.stack(loaded[:end - start]), variant)
        inputs, target = inputs.to(device), target.to(device)
        result = model(inputs)
        updated = model.test_time_update(result, target, variant.test_threshold, first_only=True).cpu()
        hit = bool(updated.any())
        kept = int(updated.nonzero()[0, 0]) + 1 if hit else end - start
        parts["psnr"].append(frame_errors(result.output[:kept], target[:kept], variant.family)["psnr"])
        parts["distance"].append(result.distance[:kept].double().cpu().numpy())
        parts["memory_updated"].append(updated[:kept].numpy().astype(np.int8))
        chunk = min(max_chunk, 2 * kept if hit else 2 * chunk)
        start, loaded = start + kept, loaded[kept:]
        progress.update(kept)
    progress.close()
    return {key: np.concatenate(value) for key, value in parts.items()}


def score_frozen_after(model, dataset: ClipDataset, variant: Variant, batch_size: int, device,
                       updated: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The frozen-memory series, given the test-time-update pass's series and the model back at its trained
    memory: every frame up to and including the first one that updated the memory was scored with the trained
    memory, so those results are the frozen ones; only the frames after it are run again (none, when no frame
    updated the memory, the usual case on the synthetic sets)."""
    first_update = np.flatnonzero(updated["memory_updated"])
    reused = int(first_update[0]) + 1 if len(first_update) else len(dataset)
    series = {key: updated[key][:reused] for key in ("psnr", "distance")}
    if reused < len(dataset):
        rest = score_batched(model, Subset(dataset, range(reused, len(dataset))), variant, batch_size, device)
        series = {key: np.concatenate([series[key], rest[key]]) for key in series}
    return series


def add_scores(frame: pd.DataFrame, series: dict[str, np.ndarray], variant: Variant, nan_policy: str,
               suffix: str = "") -> int:
    """Add the series and the normality score columns to `frame`; returns the degenerate video count."""
    videos = frame["video"].to_numpy()
    for key, value in series.items():
        frame[key if key == "memory_updated" else key + suffix] = value
    if variant.family == "memae":
        score, degenerate = regularity_score(series["error"], videos, nan_policy)
    else:
        score, degenerate = normality_score(series["psnr"], videos, variant.alpha, series.get("distance"), nan_policy)
    frame["score" + suffix] = score
    return degenerate


def evaluate(dataset_name: str, variant_name: str, seed: int, params_path: Path | None = None,
             data_root: Path | None = None, runs_root: Path | None = None) -> dict:
    params = load_params(params_path)
    dataset, variant = params.dataset(dataset_name), params.variant(variant_name)
    options = params.evaluate
    out_dir = run_dir(dataset_name, variant_name, seed, runs_root)
    device = ckpt.pick_device()
    torch.manual_seed(seed)

    if variant.trainable:
        model, _, _ = ckpt.load_model(out_dir / "checkpoint.pt", device)
    else:
        model = build_model(variant, dataset.profile).to(device).eval()
    test_set = clip_dataset(frames_dir(dataset_name, data_root), "test", variant)
    scores = test_set.windows[["video", "frame", "label", "anomaly_type"]].copy()

    metrics: dict = {"frames": len(scores), "videos": int(scores["video"].nunique())}
    with_update = variant.memory == "mnad" and options.test_time_update != "without"
    without_update = options.test_time_update != "with" or variant.memory != "mnad"
    if with_update:
        trained_memory = {key: value.clone() for key, value in model.memory.state_dict().items()}
        updated = score_with_update(model, test_set, variant, device, options.batch_size)
        if without_update:
            model.memory.load_state_dict(trained_memory)
            frozen = score_frozen_after(model, test_set, variant, options.batch_size, device, updated)
    elif without_update:
        frozen = score_batched(model, test_set, variant, options.batch_size, device)
    if without_update:
        degenerate = add_scores(scores, frozen, variant, options.nan_policy)
        metrics["without_update"] = summarise(scores, "score", degenerate)
        metrics["without_update"]["mean_psnr"] = float(np.mean(frozen["psnr"]))
    if with_update:
        degenerate = add_scores(scores, updated, variant, options.nan_policy, suffix="_update")
        metrics["with_update"] = summarise(scores, "score_update", degenerate)
        metrics["with_update"]["mean_psnr"] = float(np.mean(updated["psnr"]))
        # How many frames were under the threshold and wrote into the memory: 0 means "with" equals "without".
        metrics["with_update"]["updated_frames"] = int(updated["memory_updated"].sum())

    headline = "with_update" if "with_update" in metrics else "without_update"
    score_column = "score_update" if headline == "with_update" else "score"
    roc = roc_points(scores["label"].to_numpy(), scores[score_column].to_numpy())
    write_csv(out_dir / "scores.csv", scores)
    write_csv(out_dir / "roc.csv", roc)
    write_json(out_dir / "metrics.json", metrics)

    with open_run(dataset_name, variant_name, seed) as run:
        run.set_tags({**environment_tags(device.type), "eval_stage": f"evaluate@{dataset_name}-{variant_name}-{seed}",
                      "eval.nan_policy": options.nan_policy, "eval.test_time_update": options.test_time_update})
        if not variant.trainable:
            run.log_params(flatten(ckpt.run_config(dataset, variant, seed)))
        run.log_metrics(flatten(metrics, "eval."))
        run.log_artifact(out_dir / "scores.csv")
        run.log_artifact(out_dir / "metrics.json")
        run.log_artifact(roc_figure(roc, f"{dataset_name} {variant_name} seed {seed}", out_dir / "roc.png"))
        run.finish()
    return metrics


def roc_figure(roc: pd.DataFrame, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_path

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(roc["fpr"], roc["tpr"])
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


@exit_cleanly
def main(argv: list[str] | None = None) -> int:
    args = run_arguments(__doc__.splitlines()[0], argv)
    metrics = evaluate(args.dataset, args.variant, args.seed, args.params)
    print({k: v for k, v in flatten(metrics).items() if "auc_micro" in k})
    return 0


if __name__ == "__main__":
    exit_now(main())
