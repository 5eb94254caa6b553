"""The device a stage computes on, and the settings that keep its numbers repeatable there.

Every stage that runs a model (the runs, the model analyses) calls `compute_device()`: CUDA when present, else the
CPU. CPU kernels used here are deterministic as they are; on CUDA, cuDNN is pinned to deterministic algorithms and
TF32 is off, so that a CUDA run repeats itself (it still differs from a CPU run in the last bits).
"""
from __future__ import annotations

import torch


def compute_device() -> torch.device:
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    return torch.device("cpu")
