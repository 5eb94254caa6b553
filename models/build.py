"""The one place a variant becomes a model.

`variant` and `profile` are read by attribute (duck-typed pipeline.config.Variant and Profile), so models/ stays
free of params parsing. A variant is a set of options over one network, never a copied class.
"""
from __future__ import annotations

import torch.nn as nn

from models.memae import MemAE
from models.mnad import MNAD, CopyLast


def image_channels(variant, profile) -> int:
    """Channels of one frame as the model sees it."""
    return 1 if variant.grayscale else profile.channels


def build_model(variant, profile) -> nn.Module:
    """The untrained network of `variant` at the profile's channels and width. MNAD memories and MemAE items are
    drawn from torch's global RNG, so seed it first."""
    channels = image_channels(variant, profile)
    if variant.family == "copy_last":
        return CopyLast(channels)
    if variant.family == "mnad":
        if variant.memory not in ("none", "mnad"):
            raise ValueError(f"variant {variant.name!r}: an mnad model takes memory 'mnad' or 'none', "
                             f"got {variant.memory!r}")
        in_channels = variant.input_frames * channels
        # Prediction outputs the next frame; reconstruction outputs what it was given.
        out_channels = channels if variant.task == "predict" else in_channels
        return MNAD(in_channels, out_channels, width=profile.width, skips=variant.skips, decoder=variant.decoder,
                    memory_items=variant.memory_items if variant.memory == "mnad" else 0,
                    update_norm=variant.update_norm)
    if variant.family == "memae":
        if variant.task != "reconstruct" or variant.memory not in ("none", "memae"):
            raise ValueError(f"variant {variant.name!r}: a memae model reconstructs (task 'reconstruct') with memory "
                             f"'memae' or 'none', got task {variant.task!r}, memory {variant.memory!r}")
        return MemAE(channels, clip_length=variant.input_frames, width=profile.width,
                     memory_items=variant.memory_items if variant.memory == "memae" else 0,
                     shrink_threshold=variant.shrink_threshold, addressing=variant.addressing)
    raise ValueError(f"variant {variant.name!r}: unknown family {variant.family!r}; valid: mnad, memae, copy_last")
