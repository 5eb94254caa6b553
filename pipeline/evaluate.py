"""Evaluation of one (dataset, variant, seed)'s trained model under the papers' protocol.

Per test frame: PSNR, feature distance (memory variants), MemAE's clip error, and the normality score, both without
and with test-time memory update for MNAD-memory variants. `evaluate` writes runs/<dataset>/<variant>/seed<S>/
{scores.csv, roc.csv} and returns the metrics; the run stage (pipeline.run) adds the learning gate, writes
metrics.json and logs them to MLflow. Every frame's scores.csv row also holds `floor_psnr`, the PSNR of the trivial
output (class Trivial) that the learning gate compares the model with.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import sklearn.metrics  # noqa: F401 - pipeline.metrics imports it when first used; here it counts as start-up
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models.clips import split_clip
from models.mnad import point_score
from pipeline.config import Evaluate, Variant
from pipeline.data import ClipDataset, clip_dataset
from pipeline.io import write_csv
from pipeline.metrics import headline_scoring, normality_score, regularity_score, roc_points, summarise
from pipeline.scoring import frame_errors, psnr


@torch.no_grad()
def score_batched(model, dataset: ClipDataset | Subset, variant: Variant, batch_size: int, device,
                  trivial: Trivial | None = None) -> dict[str, np.ndarray]:
    """One pass with the memory frozen: batched, in any order. With `trivial`, also the PSNR of the trivial output
    ("floor_psnr")."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in tqdm(loader, desc="evaluate", leave=False, mininterval=2.0):
        inputs, target = split_clip(batch["clip"], variant)
        inputs, target = inputs.to(device), target.to(device)
        result = model(inputs)
        series = frame_errors(result.output, target, variant.family)
        if getattr(result, "distance", None) is not None:
            series["distance"] = result.distance.double().cpu().numpy()
        if trivial is not None:
            series["floor_psnr"] = psnr(trivial(inputs, target), target)
        for key, value in series.items():
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(value) for key, value in parts.items()}


@torch.no_grad()
def score_with_update(model, dataset: ClipDataset, variant: Variant, device, max_chunk: int,
                      trivial: Trivial | None = None, frozen: bool = False) -> dict[str, np.ndarray]:
    """MNAD's test loop: frame by frame in video order, each frame is scored with the memory as it stands and then,
    if its point score is under the threshold, written into it. The memory persists across all test videos.

    Windows are encoded in batches of `max_chunk`: the encoder's features and skip maps do not depend on the memory.
    Within a batch, the memory read and the decoder run on "chunks" on the guess that none of their frames updates
    the memory: every frame up to and including the first one that does update saw exactly the memory the
    frame-by-frame loop would have shown it, so those results are kept, the update is applied, and the rest of the
    chunk is read and decoded again. The chunk doubles after a chunk without an update and shrinks to twice the
    accepted run after one with an update, so rare updates cost nearly nothing and frequent ones fall back to one
    frame at a time.

    With `frozen`, the same pass also scores every frame with the memory as trained (a copy that is never updated)
    from the same encoder features: the "without update" series, as keys "frozen_psnr" and "frozen_distance".
    """
    parts: dict[str, list[np.ndarray]] = {"psnr": [], "distance": [], "memory_updated": []}
    if trivial is not None:
        parts["floor_psnr"] = []
    trained = copy.deepcopy(model) if frozen else None
    if frozen:
        parts["frozen_psnr"], parts["frozen_distance"] = [], []
    chunk = max_chunk
    for batch in tqdm(DataLoader(dataset, batch_size=max_chunk, shuffle=False), desc="evaluate (test-time update)",
                      leave=False, mininterval=2.0):
        inputs, target = split_clip(batch["clip"], variant)
        inputs, target = inputs.to(device), target.to(device)
        features, skips = model.encoder(inputs)
        if trivial is not None:
            parts["floor_psnr"].append(psnr(trivial(inputs, target), target))
        if trained is not None:
            result = trained.output_of(trained.read_memory(features, skips))
            parts["frozen_psnr"].append(frame_errors(result.output, target, variant.family)["psnr"])
            parts["frozen_distance"].append(result.distance.double().cpu().numpy())
        start = 0
        while start < len(inputs):
            part = slice(start, min(len(inputs), start + chunk))
            result = model.output_of(model.read_memory(features[part], tuple(s[part] for s in skips)))
            updated = model.test_time_update(result, target[part], variant.test_threshold, first_only=True).cpu()
            hit = bool(updated.any())
            kept = int(updated.nonzero()[0, 0]) + 1 if hit else len(updated)
            parts["psnr"].append(frame_errors(result.output[:kept], target[part][:kept], variant.family)["psnr"])
            parts["distance"].append(result.distance[:kept].double().cpu().numpy())
            parts["memory_updated"].append(updated[:kept].numpy().astype(np.int8))
            chunk = min(max_chunk, 2 * kept if hit else 2 * chunk)
            start += kept
    return {key: np.concatenate(value) for key, value in parts.items()}


def add_scores(frame: pd.DataFrame, series: dict[str, np.ndarray], variant: Variant, nan_policy: str,
               suffix: str = "") -> int:
    """Add the series and the normality score columns to `frame`; returns the degenerate video count."""
    videos = frame["video"].to_numpy()
    for key, value in series.items():
        frame[key if key in ("memory_updated", "floor_psnr") else key + suffix] = value
    if variant.family == "memae":
        score, degenerate = regularity_score(series["error"], videos, nan_policy)
    else:
        score, degenerate = normality_score(series["psnr"], videos, variant.alpha, series.get("distance"), nan_policy)
    frame["score" + suffix] = score
    return degenerate


class Trivial:
    """The output of a model that learnt nothing about the frames' content, the learning gate's floor: for
    prediction the last input frame (copy-last), for reconstruction the training set's mean frame."""

    def __init__(self, variant: Variant, frames: Path, count: int, seed: int, device: torch.device):
        self.predicts = variant.task == "predict" and variant.family != "memae"
        self.mean_frame = None
        if not self.predicts:
            single = ClipDataset(frames, "train", 1, 0, variant.grayscale)
            chosen = np.random.default_rng(seed).permutation(len(single))[:count]
            self.mean_frame = torch.stack([single[int(i)]["clip"][0] for i in chosen]).mean(dim=0).to(device)

    def __call__(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.predicts:
            return inputs[:, -target.shape[1]:]
        frame = self.mean_frame if target.dim() == 4 else self.mean_frame[:, None]   # MemAE: [C, T, H, W]
        return frame.expand_as(target)


@torch.no_grad()
def calibrated_threshold(model, variant: Variant, frames: Path, count: int, quantile: float, seed: int,
                         batch_size: int, device: torch.device) -> float:
    """The `quantile` of MNAD's point score over a seeded sample of `count` training windows, memory frozen: a
    threshold that frames like the training frames pass about that often."""
    train_set = clip_dataset(frames, "train", variant)
    chosen = np.sort(np.random.default_rng(seed).permutation(len(train_set))[:count])
    scores = []
    for batch in DataLoader(Subset(train_set, chosen.tolist()), batch_size=batch_size, shuffle=False):
        inputs, target = split_clip(batch["clip"], variant)
        inputs, target = inputs.to(device), target.to(device)
        scores.append(point_score(model(inputs).output, target).double().cpu().numpy())
    return float(np.quantile(np.concatenate(scores), quantile))


def evaluate(model, variant: Variant, seed: int, frames: Path, out_dir: Path, options: Evaluate,
             update_threshold: str, device: torch.device) -> dict:
    """Score every test frame with `model` (in eval mode on `device`); write scores.csv and roc.csv into out_dir
    and return the metrics (the run stage adds the learning gate and writes metrics.json).

    `update_threshold` is the dataset profile's choice for the test-time update: "paper" (the variant's
    test_threshold) or "calibrated" (evaluate.calibration_quantile of the training windows' point scores)."""
    torch.manual_seed(seed)
    test_set = clip_dataset(frames, "test", variant)
    scores = test_set.windows[["video", "frame", "label", "anomaly_type"]].copy()
    trivial = Trivial(variant, frames, options.calibration_windows, seed, device)

    metrics: dict = {"frames": len(scores), "videos": int(scores["video"].nunique())}
    with_update = variant.memory == "mnad" and options.test_time_update != "without"
    without_update = options.test_time_update != "with" or variant.memory != "mnad"
    if with_update:
        threshold = variant.test_threshold
        if update_threshold == "calibrated":
            threshold = calibrated_threshold(model, variant, frames, options.calibration_windows,
                                             options.calibration_quantile, seed, options.batch_size, device)
        metrics["update_threshold"] = {"mode": update_threshold, "value": threshold}
        trained_memory = {key: value.clone() for key, value in model.memory.state_dict().items()}
        updated = score_with_update(model, test_set, variant.model_copy(update={"test_threshold": threshold}),
                                    device, options.batch_size, trivial, frozen=without_update)
        model.memory.load_state_dict(trained_memory)   # the caller's model keeps the memory it was trained with
        if without_update:
            frozen = {"psnr": updated.pop("frozen_psnr"), "distance": updated.pop("frozen_distance")}
    elif without_update:
        frozen = score_batched(model, test_set, variant, options.batch_size, device, trivial)
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
    suffix = "_update" if metrics["headline"] == "with_update" else ""
    normal = scores["label"].to_numpy() == 0
    metrics["normal_psnr"] = float(scores["psnr" + suffix].to_numpy()[normal].mean())
    metrics["floor_psnr"] = float(scores["floor_psnr"].to_numpy()[normal].mean())
    roc = roc_points(scores["label"].to_numpy(), scores["score" + suffix].to_numpy())
    write_csv(out_dir / "scores.csv", scores)
    write_csv(out_dir / "roc.csv", roc)
    return metrics
