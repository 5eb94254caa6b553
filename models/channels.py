"""Channel counts of the networks: the papers' counts times a width multiplier, so that the synthetic profiles can
train a narrow copy of the same architecture."""
from __future__ import annotations


def scaled(channels: int, width: float) -> int:
    """`channels` times `width`, rounded, never below one."""
    return max(1, round(channels * width))
