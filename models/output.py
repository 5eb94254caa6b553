"""The one result type every model's forward returns (instead of a tuple of eight tensors)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """What one forward pass produced.

    output:     the predicted or reconstructed frame(s), same layout as the target, in [-1, 1] for MNAD.
    queries:    MNAD: L2-normalised encoder features [B, C, h, w]; MemAE: encoder features [B, C, t, h, w].
    read:       what the memory returned for each query (same shape as queries), None without memory.
    nearest:    index of each query's nearest memory item, [B, h, w] (MNAD) or [B, t, h, w] (MemAE); None without
                memory.
    distance:   MNAD's per-frame feature distance [B] (compactness of each frame's queries), None otherwise.
    loss_terms: scalar losses the model computes itself from the memory as it was before any update
                ("compactness", "separateness", "uniform" for MNAD; "entropy" for MemAE).
    """

    output: torch.Tensor
    queries: torch.Tensor | None = None
    read: torch.Tensor | None = None
    nearest: torch.Tensor | None = None
    distance: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)
