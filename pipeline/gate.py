"""The learning gate: whether a run has learnt enough for a verdict to rest on it.

A run counts as learnt when both hold:
  plateaued     its training loss has stopped improving: of the fall of the mean loss from the first `window`
                share of its logged steps to the last, less than `tolerance` happened over that last share (the
                mean over the share just before minus the mean over the last). A run still learning at a steady
                rate puts about a quarter of its fall there (window 0.2); one whose loss never fell has plateaued
                and is judged by the floor alone;
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


def late_improvement(steps: np.ndarray, losses: np.ndarray, window: float) -> float:
    """The share of the loss's fall (mean over the first `window` of the steps to mean over the last) that came in
    the last `window`. 0 when the loss did not fall; NaN when a share holds no logged step."""
    steps, losses = np.asarray(steps, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if len(steps) == 0:
        return math.nan
    last = steps[-1]
    final = steps > last * (1 - window)
    before = (steps > last * (1 - 2 * window)) & ~final
    first = steps <= last * window
    if not final.any() or not before.any() or not first.any():
        return math.nan
    end = float(losses[final].mean())
    fall = float(losses[first].mean()) - end
    return (float(losses[before].mean()) - end) / fall if fall > 0 else 0.0


def learning_gate(steps: np.ndarray, losses: np.ndarray, normal_psnr: float, floor_psnr: float, task: str,
                  window: float, tolerance: float, margin_db: float) -> dict:
    """The gate's numbers and its outcome, as metrics.json records them."""
    improvement = late_improvement(steps, losses, window)
    plateaued = bool(not math.isnan(improvement) and improvement < tolerance)
    beats_floor = bool(normal_psnr > floor_psnr + margin_db)
    return {"plateaued": plateaued, "late_improvement": improvement, "normal_psnr": normal_psnr,
            "floor": floor_name(task), "floor_psnr": floor_psnr, "beats_floor": beats_floor,
            "learnt": plateaued and beats_floor}
