"""The learning gate: whether a run has learnt enough for a verdict to rest on it.

A run counts as learnt when both hold:
  plateaued     its training loss has stopped improving: the mean loss over the last `window` share of its logged
                steps is less than `tolerance` (relative) below the mean over the share just before;
  beats floor   on the normal test frames, its mean PSNR is more than `margin_db` above the trivial output for its
                task: copy-last (the last input frame) for prediction, the training set's mean frame for
                reconstruction (a network that learnt nothing about the frames' content outputs about that).
A run that fails either is "undertrained", and decides no claim.
"""
from __future__ import annotations

import math

import numpy as np

COPY_LAST, MEAN_FRAME = "copy-last", "training mean frame"


def floor_name(task: str) -> str:
    return COPY_LAST if task == "predict" else MEAN_FRAME


def relative_improvement(steps: np.ndarray, losses: np.ndarray, window: float) -> float:
    """(mean loss over the steps in the share `window` before the last one - mean over the last `window`) / the
    former. NaN when either share holds no logged step."""
    steps, losses = np.asarray(steps, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if len(steps) == 0:
        return math.nan
    last = steps[-1]
    final = steps > last * (1 - window)
    before = (steps > last * (1 - 2 * window)) & ~final
    if not final.any() or not before.any():
        return math.nan
    earlier = float(losses[before].mean())
    return (earlier - float(losses[final].mean())) / earlier if earlier else math.nan


def learning_gate(steps: np.ndarray, losses: np.ndarray, normal_psnr: float, floor_psnr: float, task: str,
                  window: float, tolerance: float, margin_db: float) -> dict:
    """The gate's numbers and its outcome, as metrics.json records them."""
    improvement = relative_improvement(steps, losses, window)
    plateaued = bool(not math.isnan(improvement) and improvement < tolerance)
    beats_floor = bool(normal_psnr > floor_psnr + margin_db)
    return {"plateaued": plateaued, "relative_improvement": improvement, "normal_psnr": normal_psnr,
            "floor": floor_name(task), "floor_psnr": floor_psnr, "beats_floor": beats_floor,
            "learnt": plateaued and beats_floor}
