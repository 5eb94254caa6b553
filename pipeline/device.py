"""The device a stage computes on, and the settings that keep its numbers repeatable there.

Every stage that runs a model (the runs, the model analyses) calls `compute_device()`: CUDA when present, else the
CPU. CPU kernels used here are deterministic as they are; on CUDA, cuDNN is pinned to deterministic algorithms and
TF32 is off, so that a CUDA run repeats itself (it still differs from a CPU run in the last bits). `use_threads`
sets torch's CPU threads from a profile's `threads`.
"""
from __future__ import annotations

import torch

DEFAULT_THREADS = torch.get_num_threads()   # torch's own choice, one per core: what `threads: 0` means


def use_threads(threads: int) -> None:
    """torch's intra-op CPU threads: `threads`, or torch's default for 0."""
    torch.set_num_threads(threads or DEFAULT_THREADS)


def compute_device() -> torch.device:
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return torch.device("cuda")
    return torch.device("cpu")
