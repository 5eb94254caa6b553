"""Running a trained model of a run over chosen windows of a split: the shared loop of the model-based analyses.

`loaded_run` loads each run's model once per process, so the model analyses of one dataset (one stage) share it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from analysis.common import Run
from models.clips import split_clip
from pipeline.checkpoint import load_trained_model
from pipeline.config import Params
from pipeline.data import ClipDataset, clip_dataset
from pipeline.device import compute_device
from pipeline.paths import frames_dir

_LOADED: dict[tuple, "LoadedRun"] = {}


class LoadedRun:
    """A run's trained model in eval mode with its variant and profile (from params.yaml, checked against the
    checkpoint's fingerprint), and its frames folder."""

    def __init__(self, run: Run, params: Params, data_root: Path | None = None, device: torch.device | None = None):
        self.run = run
        self.device = device or compute_device()
        dataset = params.dataset(run.dataset)
        self.variant = params.variant(run.variant)
        self.profile = dataset.training_profile(self.variant)
        self.frames = frames_dir(run.dataset, data_root)
        self.model = load_trained_model(run.checkpoint, dataset, self.variant, run.seed, self.frames, self.device)

    def windows(self, split: str) -> ClipDataset:
        return clip_dataset(self.frames, split, self.variant)

    def clips(self, dataset: ClipDataset, indices: Sequence[int] | None = None,
              batch_size: int = 16) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """Yield (window indices, inputs, target) over `indices` (default: every window), in order, on the device."""
        chosen = Subset(dataset, list(indices)) if indices is not None else dataset
        for batch in DataLoader(chosen, batch_size=batch_size, shuffle=False):
            inputs, target = split_clip(batch["clip"], self.variant)
            yield batch["index"].numpy(), inputs.to(self.device), target.to(self.device)

    @torch.no_grad()
    def batches(self, dataset: ClipDataset, indices: Sequence[int] | None = None, batch_size: int = 16,
                **forward_options) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, object]]:
        """Yield (window indices, inputs, target, model output) over `indices` (default: every window), in order,
        with the memory frozen (no test-time update)."""
        for chosen, inputs, target in self.clips(dataset, indices, batch_size):
            yield chosen, inputs, target, self.model(inputs, **forward_options)

    @torch.no_grad()
    def encodings(self, dataset: ClipDataset, indices: Sequence[int] | None = None,
                  batch_size: int = 16) -> Iterator[tuple[np.ndarray, object]]:
        """Yield (window indices, the model's `encode` result: queries, nearest items, ...) over `indices`, with
        the memory frozen. The decoder is not run: about 60% of a forward pass saved for the analyses that need
        only what the memory saw."""
        for chosen, inputs, _ in self.clips(dataset, indices, batch_size):
            yield chosen, self.model.encode(inputs)

    def window_of(self, dataset: ClipDataset, video: str, frame: int) -> int | None:
        """Index of the window that scores `frame` of `video`, None when no window does (e.g. a prediction
        variant's first input frames)."""
        windows = dataset.windows
        hit = np.flatnonzero((windows["video"].to_numpy() == video) & (windows["frame"].to_numpy() == frame))
        return int(hit[0]) if len(hit) else None

    @torch.no_grad()
    def one_window(self, dataset: ClipDataset, index: int, **forward_options):
        """(inputs, target, output) of one window, batch dimension kept."""
        _, inputs, target, result = next(self.batches(dataset, [index], 1, **forward_options))
        return inputs, target, result


def loaded_run(run: Run, params: Params, data_root: Path | None = None) -> LoadedRun:
    """The run's LoadedRun, loaded on first use in this process. The key holds the checkpoint's identity and the
    run's options, so a changed checkpoint or params is loaded again. Analyses only read the model (the memory is
    never updated here), so sharing it is safe."""
    variant = params.variant(run.variant)
    stat = run.checkpoint.stat() if run.checkpoint.exists() else None
    key = (str(run.checkpoint), stat.st_mtime_ns if stat else None, str(data_root), variant.model_dump_json(),
           params.dataset(run.dataset).profile.model_dump_json())
    if key not in _LOADED:
        _LOADED[key] = LoadedRun(run, params, data_root)
    return _LOADED[key]
