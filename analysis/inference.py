"""Running a trained model of a run over chosen windows of a split: the shared loop of the model-based analyses."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from analysis.common import Run
from pipeline.checkpoint import load_model, pick_device
from pipeline.data import ClipDataset, clip_dataset
from pipeline.evaluate import frame_errors
from pipeline.paths import frames_dir


class LoadedRun:
    """A run's model in eval mode with the variant and profile it was trained with, and its frames folder."""

    def __init__(self, run: Run, data_root: Path | None = None, device: torch.device | None = None):
        self.run = run
        self.device = device or pick_device()
        self.model, self.variant, self.profile = load_model(run.checkpoint, self.device)
        self.frames = frames_dir(run.dataset, data_root)

    def windows(self, split: str) -> ClipDataset:
        return clip_dataset(self.frames, split, self.variant)

    def clips(self, dataset: ClipDataset, indices: Sequence[int] | None = None,
              batch_size: int = 16) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """Yield (window indices, inputs, target) over `indices` (default: every window), in order, on the device."""
        chosen = Subset(dataset, list(indices)) if indices is not None else dataset
        from models.build import split_clip

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


def psnr(output: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Per-sample PSNR of images in [-1, 1], measured on [0, 1] exactly as the evaluation does."""
    return frame_errors(output, target, family="mnad")["psnr"]
