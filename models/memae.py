"""MemAE (Gong et al., ICCV 2019): a 3D-convolutional autoencoder whose decoder sees only the memory's answer.

Every (t, y, x) position of the encoded clip is a query. It addresses N learnt items by a softmax over items
(dot product as the released code, or cosine similarity as the paper), the weights are hard-shrunk so that only
a few items contribute, and the decoder reconstructs the clip from the weighted sum of those items. Unlike MNAD,
the items are an nn.Parameter learnt by backprop.

Clips are [B, C, T, H, W]. The encoder halves time three times and space four times, so T must be divisible by 8
and H, W by 16.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.channels import scaled
from models.output import ModelOutput

PAPER_CHANNELS = (96, 128, 256, 256)
ADDRESSINGS = ("dot", "cosine")


def conv3d_block(in_channels: int, out_channels: int, stride: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1),
                         nn.BatchNorm3d(out_channels), nn.LeakyReLU(0.2, inplace=True))


def deconv3d_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """2x upsampling in time and space."""
    return nn.Sequential(nn.ConvTranspose3d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1),
                         nn.BatchNorm3d(out_channels), nn.LeakyReLU(0.2, inplace=True))


def hard_shrink(weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero the weights under `threshold` (a ReLU-based form that keeps a gradient), then make rows sum to 1.
    A row shrunk to all zeros stays zero."""
    shrunk = F.relu(weights - threshold) * weights / (torch.abs(weights - threshold) + 1e-12)
    return F.normalize(shrunk, p=1, dim=1)


def addressing_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Mean over queries of -sum_i w_i log w_i: low when each query uses few items."""
    return -(weights * torch.log(weights + 1e-12)).sum(dim=1).mean()


class MemAEMemory(nn.Module):
    def __init__(self, num_items: int, dim: int, shrink_threshold: float = 0.0025, addressing: str = "dot"):
        super().__init__()
        if addressing not in ADDRESSINGS:
            raise ValueError(f"addressing {addressing!r} unknown; valid: {list(ADDRESSINGS)}")
        if num_items < 1:
            raise ValueError(f"memory_items must be at least 1, got {num_items}")
        bound = 1 / math.sqrt(dim)
        self.items = nn.Parameter(torch.empty(num_items, dim).uniform_(-bound, bound))
        self.shrink_threshold = shrink_threshold
        self.addressing = addressing

    def forward(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """queries [N, C] -> (read [N, C], addressing weights after shrinkage [N, M], nearest item [N])."""
        if self.addressing == "cosine":
            logits = F.normalize(queries, dim=1) @ F.normalize(self.items, dim=1).t()
        else:
            logits = queries @ self.items.t()
        weights = logits.softmax(dim=1)
        if self.shrink_threshold > 0:  # as the released code: no shrinkage (and no renormalising) at 0
            weights = hard_shrink(weights, self.shrink_threshold)
        # nearest from the logits: a row the shrinkage zeroed still has a most-similar item
        return weights @ self.items, weights, logits.argmax(dim=1)


class MemAEEncoded(NamedTuple):
    """MemAE's state between encoder and decoder: the encoder features (the queries, [B, C, t, h, w]) and, with a
    memory, its read (same shape), each position's nearest item [B, t, h, w] and the addressing weights [N, M]."""

    queries: torch.Tensor
    read: torch.Tensor | None = None
    nearest: torch.Tensor | None = None
    weights: torch.Tensor | None = None


def released_init(module: nn.Module) -> None:
    """The released training script's initialisation: conv weights N(0, 0.02), BN scale N(1, 0.02), BN shift 0."""
    if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm3d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class MemAE(nn.Module):
    """`memory_items=0` gives the plain 3D autoencoder (the decoder reads the encoder features directly)."""

    def __init__(self, channels: int = 1, clip_length: int = 16, width: float = 1.0, memory_items: int = 2000,
                 shrink_threshold: float = 0.0025, addressing: str = "dot"):
        super().__init__()
        if clip_length < 8 or clip_length % 8:
            raise ValueError(f"MemAE clip length must be a positive multiple of 8 (three temporal stride-2 stages), "
                             f"got {clip_length}")
        self.clip_length = clip_length
        c1, c2, c3, c4 = (scaled(c, width) for c in PAPER_CHANNELS)
        self.encoder = nn.Sequential(conv3d_block(channels, c1, (1, 2, 2)), conv3d_block(c1, c2, (2, 2, 2)),
                                     conv3d_block(c2, c3, (2, 2, 2)), conv3d_block(c3, c4, (2, 2, 2)))
        self.memory = MemAEMemory(memory_items, c4, shrink_threshold, addressing) if memory_items else None
        # The last layer upsamples space only and has no activation: the output is an unbounded regression.
        self.decoder = nn.Sequential(deconv3d_block(c4, c3), deconv3d_block(c3, c2), deconv3d_block(c2, c1),
                                     nn.ConvTranspose3d(c1, channels, 3, stride=(1, 2, 2), padding=1,
                                                        output_padding=(0, 1, 1)))
        self.apply(released_init)

    def forward(self, x: torch.Tensor, update_memory: bool = False, replace=None) -> ModelOutput:
        """x: [B, C, T, H, W]. `update_memory` is accepted for a uniform call and ignored: these items learn by
        gradient."""
        if replace is not None:
            raise ValueError("feature replacement is defined for MNAD models only")
        encoded = self.encode(x)
        if encoded.read is None:
            return ModelOutput(self.decoder(encoded.queries), queries=encoded.queries)
        # zero_rows (logged, never weighted): the share of queries whose weights the shrinkage zeroed entirely;
        # such a query reads nothing and passes no gradient to the encoder or the items.
        zero_rows = (encoded.weights.detach().sum(dim=1) == 0).float().mean()
        return ModelOutput(self.decoder(encoded.read), queries=encoded.queries, read=encoded.read,
                           nearest=encoded.nearest, loss_terms={"entropy": addressing_entropy(encoded.weights),
                                                                "zero_rows": zero_rows})

    def encode(self, x: torch.Tensor) -> MemAEEncoded:
        """Everything before the decoder: the encoder and the memory read (analyses that need only the queries
        and their nearest items stop here)."""
        length, height, width = x.shape[-3:]
        if length != self.clip_length:
            raise ValueError(f"MemAE was built for clips of {self.clip_length} frames, got {length}")
        if height % 16 or width % 16:
            raise ValueError(f"MemAE needs frames whose sides are multiples of 16, got {height}x{width}")
        features = self.encoder(x)                                     # [B, C, t, h, w]
        if self.memory is None:
            return MemAEEncoded(features)
        batch, dim, t, h, w = features.shape
        rows = features.permute(0, 2, 3, 4, 1).reshape(-1, dim)
        read_rows, weights, nearest = self.memory(rows)
        read = read_rows.reshape(batch, t, h, w, dim).permute(0, 4, 1, 2, 3)
        return MemAEEncoded(features, read, nearest.reshape(batch, t, h, w), weights)
