"""MNAD (Park, Noh, Ham, CVPR 2020): a U-Net-like 2D autoencoder with a prototype memory between encoder and decoder.

One class serves every MNAD-family variant:
  prediction      4 frames stacked on channels in, the 5th frame out, skip connections;
  reconstruction  1 frame in, the same frame out, no skips (or with skips: the RC2020 denoising study);
  no memory       the same network with the memory removed (the RC2020 baselines);
and CopyLast, the parameter-free floor every learnt predictor must beat.

Channel counts are the paper's (64/128/256/512) times a width multiplier, so the synthetic profile can run a
narrow copy of the same network. Frames must have a side divisible by 8 (three 2x poolings).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.channels import scaled
from models.memory import Memory
from models.output import ModelOutput

PAPER_CHANNELS = (64, 128, 256, 512)
DECODERS = ("paper", "rc2020")


def conv_block(in_channels: int, out_channels: int, final_activation: bool = True) -> nn.Sequential:
    """MNAD's Basic: two 3x3 conv + BN + ReLU. The encoder's last block (Basic_) ends on the bare conv."""
    layers = [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(),
              nn.Conv2d(out_channels, out_channels, 3, padding=1)]
    if final_activation:
        layers += [nn.BatchNorm2d(out_channels), nn.ReLU()]
    return nn.Sequential(*layers)


def upsample(in_channels: int, out_channels: int) -> nn.Sequential:
    """2x upsampling by a 3x3 transposed convolution."""
    return nn.Sequential(nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


def output_head(in_channels: int, out_channels: int, hidden: int) -> nn.Sequential:
    """MNAD's Gen: two conv + BN + ReLU, then a conv to the image channels and tanh (images live in [-1, 1])."""
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
                         nn.Conv2d(hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
                         nn.Conv2d(hidden, out_channels, 3, padding=1), nn.Tanh())


class Encoder(nn.Module):
    """Four conv blocks with 2x max-pooling between them; returns the query map and the three skip maps."""

    def __init__(self, in_channels: int, width: float = 1.0):
        super().__init__()
        c1, c2, c3, c4 = (scaled(c, width) for c in PAPER_CHANNELS)
        self.block1 = conv_block(in_channels, c1)
        self.block2 = conv_block(c1, c2)
        self.block3 = conv_block(c2, c3)
        self.block4 = conv_block(c3, c4, final_activation=False)
        self.pool = nn.MaxPool2d(2)
        self.out_channels = c4

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        skip1 = self.block1(x)                      # full size
        skip2 = self.block2(self.pool(skip1))       # 1/2
        skip3 = self.block3(self.pool(skip2))       # 1/4
        features = self.block4(self.pool(skip3))   # 1/8: one query per position
        return features, (skip1, skip2, skip3)


class Decoder(nn.Module):
    """Three stages of (conv block, 2x upsample), then the output head.

    With skips (the prediction decoder) each upsampled map is concatenated with the encoder map of the same size,
    the encoder map first as in MNAD. Without skips the paper's reconstruction decoder keeps the width through each
    upsample (512->512, 256->256, 128->128); RC2020's narrower one ("rc2020") halves it there instead, like the skip
    decoder minus the concatenations.
    """

    def __init__(self, in_channels: int, out_channels: int, width: float = 1.0, skips: bool = True,
                 narrow: bool = False):
        super().__init__()
        c1, c2, c3, c4 = (scaled(c, width) for c in PAPER_CHANNELS)
        stages = [(c4, c3), (c3, c2), (c2, c1)] if skips or narrow else [(c4, c4), (c3, c3), (c2, c2)]
        skip_channels = (c3, c2, c1) if skips else (0, 0, 0)
        self.skips = skips
        self.stages = nn.ModuleList()
        channels = in_channels
        for (block_channels, up_channels), extra in zip(stages, skip_channels):
            block = conv_block(channels, block_channels)
            self.stages.append(nn.Sequential(block, upsample(block_channels, up_channels)))
            channels = extra + up_channels
        self.head = output_head(channels, out_channels, c1)

    def forward(self, x: torch.Tensor, skips: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """x: the decoder input ([query, read] with memory); skips: the encoder's (skip1, skip2, skip3)."""
        if self.skips != (skips is not None):
            raise ValueError(f"this decoder was built with skips={self.skips} but was called "
                             f"{'with' if skips is not None else 'without'} skip maps")
        deepest_first = reversed(skips) if skips is not None else (None, None, None)
        for stage, skip in zip(self.stages, deepest_first):
            x = stage(x)
            if skip is not None:
                x = torch.cat([skip, x], dim=1)
        return self.head(x)


@dataclass(frozen=True)
class Replacement:
    """Replace part of the decoder input by a constant or noise (the RC2020 feature-replacement study, C4).

    part: "query" (the encoder's half), "read" (the memory's half) or "both". Without a memory the decoder input is
    the query alone, so "query" and "both" replace all of it and "read" is an error.
    fill: "zeros", "ones" or "random" (standard normal, drawn from `generator` when given).
    scale_to_norm: rescale a ones or random fill, position by position, to the L2 norm (over channels) of what it
    replaces: MNAD's queries are unit vectors, so an unscaled fill of ones is sqrt(C) times their size.
    """

    part: str = "both"
    fill: str = "zeros"
    generator: torch.Generator | None = None
    scale_to_norm: bool = False

    PARTS = ("query", "read", "both")
    FILLS = ("zeros", "ones", "random")

    def __post_init__(self):
        if self.part not in self.PARTS:
            raise ValueError(f"replacement part {self.part!r} unknown; valid: {list(self.PARTS)}")
        if self.fill not in self.FILLS:
            raise ValueError(f"replacement fill {self.fill!r} unknown; valid: {list(self.FILLS)}")

    def __call__(self, decoder_input: torch.Tensor, query_channels: int | None) -> torch.Tensor:
        """`query_channels`: how many leading channels of `decoder_input` are the query; None without a memory."""
        total = decoder_input.shape[1]
        if query_channels is None:
            if self.part == "read":
                raise ValueError("replacement part 'read' needs a memory; this model has none (use 'query' or 'both')")
            start, stop = 0, total
        else:
            start, stop = {"query": (0, query_channels), "read": (query_channels, total), "both": (0, total)}[self.part]
        region = decoder_input[:, start:stop]
        if self.fill == "zeros":
            fill = torch.zeros_like(region)
        elif self.fill == "ones":
            fill = torch.ones_like(region)
        else:  # drawn where the generator lives, then moved, so a CPU generator also seeds a CUDA run
            device = self.generator.device if self.generator is not None else region.device
            fill = torch.randn(region.shape, generator=self.generator, device=device,
                               dtype=region.dtype).to(region.device)
        if self.scale_to_norm and self.fill != "zeros":
            fill = fill * (region.norm(dim=1, keepdim=True) / fill.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return torch.cat([decoder_input[:, :start], fill, decoder_input[:, stop:]], dim=1)


def point_score(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MNAD's per-frame error that gates the test-time update: on [0, 1] images, e = squared error per pixel,
    w = 1 - exp(-e), s = sum(w e) / sum(w). Returns [B]. A perfect frame gives 0/0 = NaN, which never updates."""
    error = ((output + 1) / 2 - (target + 1) / 2) ** 2
    weight = 1 - torch.exp(-error)
    dims = tuple(range(1, error.dim()))
    return (weight * error).sum(dim=dims) / weight.sum(dim=dims)


def check_frame_size(x: torch.Tensor, multiple: int, model: str) -> None:
    height, width = x.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(f"{model} needs frames whose sides are multiples of {multiple}, got {height}x{width}")


class Encoded(NamedTuple):
    """MNAD's state between encoder and decoder. decoder_input is [query, read] with a memory (query_channels says
    where the query ends), the raw encoder features without one (query_channels None)."""

    decoder_input: torch.Tensor
    query_channels: int | None
    skips: tuple[torch.Tensor, ...]
    queries: torch.Tensor
    read: torch.Tensor | None = None
    nearest: torch.Tensor | None = None
    distance: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] | None = None


class MNAD(nn.Module):
    """Encoder -> (memory read) -> decoder. `memory_items=0` removes the memory: the decoder then reads the raw
    encoder features, as in the RC2020 baselines (result.queries still holds their L2-normalised copy, for analysis)."""

    def __init__(self, in_channels: int, out_channels: int, width: float = 1.0, skips: bool = True,
                 decoder: str = "paper", memory_items: int = 10, update_norm: str = "official"):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder {decoder!r} unknown; valid: {list(DECODERS)}")
        if decoder == "rc2020" and skips:
            raise ValueError("decoder 'rc2020' is RC2020's reconstruction decoder without skip connections; "
                             "use it with skips: false")
        self.encoder = Encoder(in_channels, width)
        dim = self.encoder.out_channels
        self.memory = Memory(memory_items, dim, update_norm) if memory_items else None
        self.decoder = Decoder(2 * dim if self.memory is not None else dim, out_channels, width, skips,
                               narrow=decoder == "rc2020")

    def forward(self, x: torch.Tensor, update_memory: bool = False,
                replace: Replacement | None = None) -> ModelOutput:
        """x: [B, frames*channels, H, W]. `update_memory` writes this batch's queries into the memory after the
        read and the losses (training); evaluation leaves it False and calls `test_time_update`."""
        encoded = self.encode(x)
        output = self.decode(encoded, replace)
        if update_memory and self.memory is not None:
            self.memory.update(encoded.queries.detach())
        return ModelOutput(output, encoded.queries, encoded.read, encoded.nearest, encoded.distance,
                           dict(encoded.loss_terms or {}))

    def encode(self, x: torch.Tensor) -> Encoded:
        """Everything before the decoder: the encoder and the memory read (the memory is not updated)."""
        check_frame_size(x, 8, "MNAD")
        return self.read_memory(*self.encoder(x))

    def read_memory(self, features: torch.Tensor, skips: tuple[torch.Tensor, ...]) -> Encoded:
        """The memory read of encoder features: the part of `encode` that depends on the memory (the test-time
        update reruns only this and the decoder after the memory changes)."""
        if self.memory is None:
            return Encoded(features, None, skips, F.normalize(features, dim=1))
        memory_read = self.memory(features)
        return Encoded(torch.cat([memory_read.queries, memory_read.read], dim=1), memory_read.queries.shape[1], skips,
                       memory_read.queries, memory_read.read, memory_read.nearest, memory_read.distance,
                       {"compactness": memory_read.compactness, "separateness": memory_read.separateness,
                        "uniform": memory_read.uniform})

    def decode(self, encoded: Encoded, replace: Replacement | None = None) -> torch.Tensor:
        """The decoder's output for an `encode` result, with part of its input replaced if asked: one encoding can
        be decoded under many replacements (the C4 analysis)."""
        decoder_input = encoded.decoder_input
        if replace is not None:
            decoder_input = replace(decoder_input, encoded.query_channels)
        return self.decoder(decoder_input, encoded.skips if self.decoder.skips else None)

    def output_of(self, encoded: Encoded) -> ModelOutput:
        """The forward pass's result for an encoding (the decoder run on it)."""
        return ModelOutput(self.decode(encoded), encoded.queries, encoded.read, encoded.nearest, encoded.distance,
                           dict(encoded.loss_terms or {}))

    @torch.no_grad()
    def test_time_update(self, result: ModelOutput, target: torch.Tensor, threshold: float,
                         first_only: bool = False) -> torch.Tensor:
        """Update the memory with the queries of the frames whose point score is under `threshold`; returns which
        frames did, BoolTensor [B]. All selected frames of a batch update together, in one step. With `first_only`,
        only the first selected frame of the batch updates: the frames of a batch up to it saw the memory a
        frame-by-frame loop (MNAD's test loop) would have shown them, and the ones after it did not."""
        if self.memory is None:
            raise ValueError("test_time_update needs a memory; this model has none")
        selected = point_score(result.output, target) < threshold
        if first_only and bool(selected.any()):
            first = int(selected.nonzero()[0, 0])
            selected = torch.zeros_like(selected)
            selected[first] = True
        if bool(selected.any()):
            self.memory.update(result.queries[selected])
        return selected


class CopyLast(nn.Module):
    """Predicts the next frame as a copy of the last input frame. No parameters, nothing to train."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor, update_memory: bool = False,
                replace: Replacement | None = None) -> ModelOutput:
        if replace is not None:
            raise ValueError("CopyLast has no decoder input to replace")
        return ModelOutput(x[:, -self.channels:])
