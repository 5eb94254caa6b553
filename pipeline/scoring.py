"""Per-sample error series of a model's output against its target: what evaluation scores and the analyses
measure, computed one way for both."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.metrics import psnr_from_mse


def frame_errors(output: torch.Tensor, target: torch.Tensor, family: str) -> dict[str, np.ndarray]:
    """Per-sample error series from outputs in [-1, 1]: PSNR on [0, 1] images, and MemAE's clip error."""
    dims = tuple(range(1, output.dim()))
    mse01 = (((output + 1) / 2 - (target + 1) / 2) ** 2).mean(dim=dims)
    series = {"psnr": psnr_from_mse(mse01.double().cpu().numpy())}
    if family == "memae":  # mean over (t, h, w) of the per-position L2 error over channels (Gong et al.)
        series["error"] = ((output - target) ** 2).sum(dim=1).sqrt().mean(dim=(1, 2, 3)).double().cpu().numpy()
    return series


def psnr(output: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Per-sample PSNR of images in [-1, 1], measured on [0, 1] exactly as the evaluation does."""
    return frame_errors(output, target, family="mnad")["psnr"]
