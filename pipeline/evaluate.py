"""Evaluation of one (dataset, variant, seed)'s trained model under the papers' protocol.

Per test frame: PSNR, feature distance (memory variants), MemAE's clip error, and the normality score, both without
and with test-time memory update for MNAD-memory variants. `evaluate` writes runs/<dataset>/<variant>/seed<S>/
{scores.csv, roc.csv, metrics.json} and returns the metrics; the run stage (pipeline.run) logs them to MLflow.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models.clips import split_clip
from pipeline.config import Evaluate, Variant
from pipeline.data import ClipDataset, clip_dataset
from pipeline.io import write_csv, write_json
from pipeline.metrics import headline_scoring, normality_score, regularity_score, roc_points, summarise
from pipeline.scoring import frame_errors


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


def evaluate(model, variant: Variant, seed: int, frames: Path, out_dir: Path, options: Evaluate,
             device: torch.device) -> dict:
    """Score every test frame with `model` (in eval mode on `device`); write scores.csv, roc.csv and
    metrics.json into out_dir and return the metrics."""
    torch.manual_seed(seed)
    test_set = clip_dataset(frames, "test", variant)
    scores = test_set.windows[["video", "frame", "label", "anomaly_type"]].copy()

    metrics: dict = {"frames": len(scores), "videos": int(scores["video"].nunique())}
    with_update = variant.memory == "mnad" and options.test_time_update != "without"
    without_update = options.test_time_update != "with" or variant.memory != "mnad"
    if with_update:
        trained_memory = {key: value.clone() for key, value in model.memory.state_dict().items()}
        updated = score_with_update(model, test_set, variant, device, options.batch_size)
        model.memory.load_state_dict(trained_memory)   # the caller's model keeps the memory it was trained with
        if without_update:
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

    metrics["headline"] = headline_scoring(metrics)
    score_column = "score_update" if metrics["headline"] == "with_update" else "score"
    roc = roc_points(scores["label"].to_numpy(), scores[score_column].to_numpy())
    write_csv(out_dir / "scores.csv", scores)
    write_csv(out_dir / "roc.csv", roc)
    write_json(out_dir / "metrics.json", metrics)
    return metrics
