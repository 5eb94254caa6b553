"""A clip from the loader, [B, L, C, H, W], becomes what a variant's model reads and what it is scored against."""
from __future__ import annotations

import torch


def split_clip(clip: torch.Tensor, variant) -> tuple[torch.Tensor, torch.Tensor]:
    """A clip [B, L, C, H, W] in [-1, 1], L = variant.window, -> (model inputs, target).

    mnad / copy_last predict:  inputs = the first input_frames frames stacked on channels [B, F*C, H, W],
                               target = the last frame [B, C, H, W].
    mnad reconstruct:          inputs = target = the frames stacked on channels ([B, C, H, W] for one frame).
    memae:                     inputs = target = the clip as [B, C, T, H, W].
    The target is never corrupted here; input noise is applied by the caller (models.noise).
    """
    if clip.dim() != 5 or clip.shape[1] != variant.window:
        raise ValueError(f"variant {variant.name!r} expects clips [B, {variant.window}, C, H, W], "
                         f"got shape {tuple(clip.shape)}")
    if variant.family == "memae":
        volume = clip.transpose(1, 2).contiguous()
        return volume, volume
    batch, _, _, height, width = clip.shape
    inputs = clip[:, :variant.input_frames].reshape(batch, -1, height, width)
    target = clip[:, variant.input_frames] if variant.task == "predict" else inputs
    return inputs, target
