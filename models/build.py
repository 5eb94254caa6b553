"""The one place a variant becomes a model, a clip becomes (inputs, target), and a result becomes a loss.

`variant` and `profile` are read by attribute (duck-typed pipeline.config.Variant and Profile), so models/ stays
free of params parsing. A variant is a set of options over one network, never a copied class.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.memae import MemAE
from models.mnad import MNAD, CopyLast
from models.output import ModelOutput


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


def mnad_loss(result: ModelOutput, target: torch.Tensor, variant) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE(output, target) + lc * compactness + ls * separateness + lu * uniform. Terms the model did not compute
    (no memory) and terms of weight 0 add nothing; every computed term is returned for logging."""
    mse = F.mse_loss(result.output, target)
    terms = {"mse": mse, **result.loss_terms}
    weights = {"compactness": variant.compactness_weight, "separateness": variant.separateness_weight,
               "uniform": variant.uniform_weight}
    total = mse
    for name, weight in weights.items():
        if weight and name in terms:
            total = total + weight * terms[name]
    return total, terms


def memae_loss(result: ModelOutput, target: torch.Tensor, variant) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE(output, target) + entropy_weight * addressing entropy."""
    mse = F.mse_loss(result.output, target)
    terms = {"mse": mse, **result.loss_terms}
    total = mse
    if variant.entropy_weight and "entropy" in terms:
        total = total + variant.entropy_weight * terms["entropy"]
    return total, terms


def compute_loss(result: ModelOutput, target: torch.Tensor, variant) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loop's one entry point: (total loss, named terms) for the variant's family."""
    return memae_loss(result, target, variant) if variant.family == "memae" else mnad_loss(result, target, variant)
