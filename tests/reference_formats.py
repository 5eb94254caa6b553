"""Files in the formats the authors released, built here with seeded random weights, and networks that compute what
the authors' networks compute:

- MNAD's model.pth: the whole network pickled by `torch.save(model)`, its classes named as in cvlab-yonsei/MNAD
  (model.final_future_prediction_with_memory_spatial_sumonly_weight_ranking_top1.convAE for prediction,
  model.Reconstruction.convAE for reconstruction), and keys.pt, the memory items [10, 512]; optionally as PyTorch
  1.1 (the authors' version) wrote it: the legacy file format, every module carrying its `_backend`;
- MemAE's .pt: the state dict of donggong1/memae-anomaly-detection's AutoEncoderCov3DMem (models/memae_3dconv.py,
  models/memory_module.py);
- a file that runs a command when unpickled.

The networks are laid out as the reference code lays them out (same submodule names, order and shapes, as listed
in REFERENCE-checkpoints.txt). Their forward passes are the reference's test-time computation, written here from
reading that code (none of it is copied): MNAD's memory is read and not updated, as its test loop calls it
(`model.forward(imgs, m_items_test, False)`, the update being a separate step after scoring); MemAE has no update.
"""
from __future__ import annotations

import os
import pickle
import sys
import types
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.backends.thnn  # what a PyTorch 1.1 network's pickle names (_THNNBackend)
import torch.nn.functional as F

PREDICTION_MODULE = "model.final_future_prediction_with_memory_spatial_sumonly_weight_ranking_top1"
RECONSTRUCTION_MODULE = "model.Reconstruction"
MEMORY_MODULES = {PREDICTION_MODULE: "model.memory_final_spatial_sumonly_weight_ranking_top1",
                  RECONSTRUCTION_MODULE: "model.Memory"}
RELEASED_SHRINK_THRESHOLD = 0.0025   # MemAE's test_video_MemAE.sh and testing_options.py (--ShrinkThres)
MEMAE_ITEM_SPREAD = 0.25             # test items are uniform in +-this


# --- MNAD (cvlab-yonsei/MNAD, model/*.py) at test time ---

class _Encoder(nn.Module):
    """Basic blocks with 2x max-pooling between them; the fourth ends on its bare conv. moduleBatchNorm and
    moduleReLU are registered, and the authors' forward never applies them."""

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        conv1 = self.moduleConv1(x)
        conv2 = self.moduleConv2(self.modulePool1(conv1))
        conv3 = self.moduleConv3(self.modulePool2(conv2))
        return self.moduleConv4(self.modulePool3(conv3)), conv1, conv2, conv3


class _PredictionEncoder(_Encoder):
    def forward(self, x):
        return self.maps(x)                 # the features, then the skips from the full-size map down


class _ReconstructionEncoder(_Encoder):
    def forward(self, x):
        return self.maps(x)[0]


class _PredictionDecoder(nn.Module):
    """Each upsampled map follows its encoder map of the same size on the channels (skip first)."""

    def forward(self, x, skip1, skip2, skip3):
        x = self.moduleUpsample4(self.moduleConv(x))
        x = self.moduleUpsample3(self.moduleDeconv3(torch.cat((skip3, x), dim=1)))
        x = self.moduleUpsample2(self.moduleDeconv2(torch.cat((skip2, x), dim=1)))
        return self.moduleDeconv1(torch.cat((skip1, x), dim=1))


class _ReconstructionDecoder(nn.Module):
    def forward(self, x):
        x = self.moduleUpsample4(self.moduleConv(x))
        x = self.moduleUpsample3(self.moduleDeconv3(x))
        x = self.moduleUpsample2(self.moduleDeconv2(x))
        return self.moduleDeconv1(x)


class _Memory(nn.Module):
    """The test-time read, the same in both of MNAD's memory files: every position is a query, L2-normalised over
    channels; its weights are a softmax over the items of the dot products; the decoder gets the query followed by
    the weighted sum of the items."""

    def forward(self, features: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        batch, dims, height, width = features.shape
        queries = F.normalize(features, dim=1).permute(0, 2, 3, 1).reshape(-1, dims)   # rows in (b, y, x) order
        weights = torch.softmax(queries @ keys.t(), dim=1)
        combined = torch.cat((queries, weights @ keys), dim=1)
        return combined.reshape(batch, height, width, 2 * dims).permute(0, 3, 1, 2)


class _PredictionAE(nn.Module):
    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """x: 4 frames on the channels [B, 12, H, W]; keys: the memory items [M, 512]. The predicted frame."""
        features, skip1, skip2, skip3 = self.encoder(x)
        return self.decoder(self.memory(features, keys), skip1, skip2, skip3)


class _ReconstructionAE(nn.Module):
    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """x: one frame [B, 3, H, W]; keys: the memory items [M, 512]. The reconstructed frame."""
        return self.decoder(self.memory(self.encoder(x), keys))


_BEHAVIOUR = {PREDICTION_MODULE: {"convAE": _PredictionAE, "Encoder": _PredictionEncoder,
                                  "Decoder": _PredictionDecoder, "Memory": _Memory},
              RECONSTRUCTION_MODULE: {"convAE": _ReconstructionAE, "Encoder": _ReconstructionEncoder,
                                      "Decoder": _ReconstructionDecoder, "Memory": _Memory}}


def _basic(inputs: int, outputs: int, last_norm: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(inputs, outputs, 3, 1, 1), nn.BatchNorm2d(outputs), nn.ReLU(inplace=False),
              nn.Conv2d(outputs, outputs, 3, 1, 1)]
    if last_norm:
        layers += [nn.BatchNorm2d(outputs), nn.ReLU(inplace=False)]
    return nn.Sequential(*layers)


def _upsample(channels: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(channels, outputs, 3, 2, 1, 1), nn.BatchNorm2d(outputs),
                         nn.ReLU(inplace=False))


def _classes(module_name: str) -> dict[str, type]:
    """convAE, Encoder, Decoder and Memory registered under the reference's module names, so that pickle records
    those names; each subclasses the behaviour above."""
    found = {}
    sys.modules.setdefault("model", types.ModuleType("model"))
    for name, behaviour in _BEHAVIOUR[module_name].items():
        qualified = MEMORY_MODULES[module_name] if name == "Memory" else module_name
        module = sys.modules.setdefault(qualified, types.ModuleType(qualified))
        cls = type(name, (behaviour,), {"__module__": qualified, "__qualname__": name})
        setattr(module, name, cls)
        found[name] = cls
    return found


def mnad_network(predict: bool, channels: int = 3) -> nn.Module:
    """MNAD's convAE at full width: prediction reads 4 frames (12 channels), reconstruction one."""
    module_name = PREDICTION_MODULE if predict else RECONSTRUCTION_MODULE
    cls = _classes(module_name)
    encoder, decoder, network, memory = cls["Encoder"](), cls["Decoder"](), cls["convAE"](), cls["Memory"]()
    encoder.moduleConv1 = _basic(channels * (4 if predict else 1), 64)
    encoder.modulePool1 = nn.MaxPool2d(2, 2)
    encoder.moduleConv2 = _basic(64, 128)
    encoder.modulePool2 = nn.MaxPool2d(2, 2)
    encoder.moduleConv3 = _basic(128, 256)
    encoder.modulePool3 = nn.MaxPool2d(2, 2)
    encoder.moduleConv4 = _basic(256, 512, last_norm=False)
    encoder.moduleBatchNorm = nn.BatchNorm2d(512)
    encoder.moduleReLU = nn.ReLU(inplace=False)
    decoder.moduleConv = _basic(1024, 512)
    decoder.moduleUpsample4 = _upsample(512, 256 if predict else 512)
    decoder.moduleDeconv3 = _basic(512, 256)
    decoder.moduleUpsample3 = _upsample(256, 128 if predict else 256)
    decoder.moduleDeconv2 = _basic(256, 128)
    decoder.moduleUpsample2 = _upsample(128, 64 if predict else 128)
    decoder.moduleDeconv1 = nn.Sequential(nn.Conv2d(128, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=False),
                                          nn.Conv2d(64, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=False),
                                          nn.Conv2d(64, channels, 3, 1, 1), nn.Tanh())
    memory.memory_size, memory.feature_dim, memory.key_dim, memory.temp_update, memory.temp_gather = \
        10, 512, 512, 0.1, 0.1
    network.encoder, network.decoder, network.memory = encoder, decoder, memory
    inputs = torch.rand(4, encoder.moduleConv1[0].in_channels, 32, 32, generator=torch.Generator().manual_seed(17))
    return _calibrated(_randomised(network), inputs * 2 - 1, mnad_keys())


def mnad_keys() -> torch.Tensor:
    """keys.pt: 10 L2-normalised rows of uniform [0, 1) numbers, MNAD's initial memory."""
    return F.normalize(torch.rand(10, 512, generator=torch.Generator().manual_seed(3)), dim=1)


# --- MemAE (donggong1/memae-anomaly-detection, models/memae_3dconv.py, models/memory_module.py) ---

class _MemAEMemoryUnit(nn.Module):
    """Items [N, C] as `weight`. Weights: softmax over items of the dot products; with a threshold, the ReLU form of
    hard shrinkage, then each row rescaled to sum 1 (a row shrunk to zeros stays zeros)."""

    def __init__(self, items: int, dim: int, shrink_threshold: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(items, dim))
        self.shrink_threshold = shrink_threshold

    def forward(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = torch.softmax(rows @ self.weight.t(), dim=1)
        if self.shrink_threshold > 0:
            excess = weights - self.shrink_threshold
            weights = F.relu(excess) * weights / (excess.abs() + 1e-12)
            weights = weights / weights.abs().sum(dim=1, keepdim=True).clamp_min(1e-12)
        return weights @ self.weight, weights


class _MemAEMemory(nn.Module):
    """Every (t, y, x) position of [B, C, T, H, W] is a query; the answer goes back to the same layout."""

    def __init__(self, items: int, dim: int, shrink_threshold: float):
        super().__init__()
        self.memory = _MemAEMemoryUnit(items, dim, shrink_threshold)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, dim, length, height, width = features.shape
        rows = features.permute(0, 2, 3, 4, 1).reshape(-1, dim)
        read, weights = self.memory(rows)
        return read.reshape(batch, length, height, width, dim).permute(0, 4, 1, 2, 3), weights


class MemAEReference(nn.Module):
    """AutoEncoderCov3DMem: its forward returns {"output": the reconstruction, "att": the weights [N, items]}."""

    def __init__(self, channels: int = 1, items: int = 2000, shrink_threshold: float = RELEASED_SHRINK_THRESHOLD):
        super().__init__()

        def down(inputs, outputs, stride):
            return [nn.Conv3d(inputs, outputs, 3, stride, 1), nn.BatchNorm3d(outputs), nn.LeakyReLU(0.2, True)]

        def up(inputs, outputs):
            return [nn.ConvTranspose3d(inputs, outputs, 3, 2, 1, 1), nn.BatchNorm3d(outputs),
                    nn.LeakyReLU(0.2, True)]

        self.encoder = nn.Sequential(*down(channels, 96, (1, 2, 2)), *down(96, 128, 2), *down(128, 256, 2),
                                     *down(256, 256, 2))
        self.mem_rep = _MemAEMemory(items, 256, shrink_threshold)
        self.decoder = nn.Sequential(*up(256, 256), *up(256, 128), *up(128, 96),
                                     nn.ConvTranspose3d(96, channels, 3, (1, 2, 2), 1, (0, 1, 1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        read, weights = self.mem_rep(self.encoder(x))
        return {"output": self.decoder(read), "att": weights}


def memae_network(channels: int = 1, items: int = 2000,
                  shrink_threshold: float = RELEASED_SHRINK_THRESHOLD) -> MemAEReference:
    """MemAE as released, with seeded random weights; its state_dict() is the released .pt's content."""
    network = _randomised(MemAEReference(channels, items, shrink_threshold))
    with torch.no_grad():
        # Wider than the reference's init range (+-1/sqrt(C) = 0.0625), so that the softmax is peaked enough for
        # the released threshold to keep a few items per query (about 2 %) and zero the rest, as in a trained memory.
        draw = torch.rand(network.mem_rep.memory.weight.shape, generator=torch.Generator().manual_seed(5))
        network.mem_rep.memory.weight.copy_((2 * draw - 1) * MEMAE_ITEM_SPREAD)
    clips = torch.rand(4, channels, 16, 32, 32, generator=torch.Generator().manual_seed(19))
    return _calibrated(network, clips * 2 - 1)


# --- weights ---

def _randomised(network: nn.Module) -> nn.Module:
    """Every parameter and running statistic drawn from a seeded generator, so an import can be checked value by
    value. Convolutions are signed and scaled by their fan-in and the batch norms' scales are near 1, so that the
    activations keep their size through the depth (`_calibrated` then fits the running statistics to them)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, tensor in network.state_dict().items():
            if not tensor.is_floating_point():
                continue
            draw = torch.rand(tensor.shape, generator=generator)
            leaf = name.rsplit(".", 1)[-1]
            if tensor.dim() > 1:
                value = (2 * draw - 1) * (6 / (tensor.numel() // tensor.shape[0])) ** 0.5
            elif leaf == "running_var":
                value = 0.5 + draw
            elif leaf == "weight":
                value = 0.8 + 0.4 * draw
            else:                               # biases and running means
                value = 0.2 * (draw - 0.5)
            tensor.copy_(value)
    return network


def _calibrated(network: nn.Module, *inputs: torch.Tensor) -> nn.Module:
    """The batch norms' running statistics set to those of one seeded batch, as training leaves them: statistics
    drawn at random would not match the activations' scale (MNAD's queries are unit vectors over 512 channels), and
    the decoder's output would hardly depend on its input."""
    norms = [module for module in network.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.momentum = 1.0
    network.train()
    with torch.no_grad():
        network(*inputs)
    for norm in norms:
        norm.momentum = 0.1
    return network.eval()


# --- files ---

class _THNNBackend:
    """What PyTorch 1.1's nn.Module kept in `self._backend`: pickled as a call of
    torch.nn.backends.thnn._get_thnn_function_backend, which every whole network saved by that version names."""

    def __reduce__(self):
        return torch.nn.backends.thnn._get_thnn_function_backend, ()


def write_mnad(folder: Path, predict: bool = True, as_pytorch_1_1: bool = False,
               alter: Callable[[nn.Module], None] | None = None) -> tuple[Path, Path, nn.Module, torch.Tensor]:
    """model.pth (the pickled network) and keys.pt in `folder`, and the network and keys they hold.

    as_pytorch_1_1: written as the authors' PyTorch 1.1.0 wrote them: the legacy (pre-zip) format, and every module
    carrying `_backend`. alter: changes the network before it is saved (a tampered file). The reference classes are
    unregistered afterwards, so nothing this process could import them from remains."""
    folder.mkdir(parents=True, exist_ok=True)
    network, keys = mnad_network(predict), mnad_keys()
    if alter is not None:
        alter(network)
    if as_pytorch_1_1:
        for module in network.modules():
            module.__dict__["_backend"] = _THNNBackend()
    options = {"_use_new_zipfile_serialization": False} if as_pytorch_1_1 else {}
    try:
        with warnings.catch_warnings():
            # The legacy format saves each network class's source; these classes are made at run time and have none.
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
            torch.save(network, folder / "model.pth", **options)
            torch.save(keys, folder / "keys.pt", **options)
    finally:
        for module in network.modules():
            module.__dict__.pop("_backend", None)
        for name in [n for n in sys.modules if n == "model" or n.startswith("model.")]:
            del sys.modules[name]
    return folder / "model.pth", folder / "keys.pt", network, keys


class UnlistedMemory(nn.Module):
    """A module of a class that is neither torch.nn's nor the reference repositories': loading it would import its
    module and run that module's code."""


class RunsACommand:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_legacy(path: Path, main_pickle: bytes) -> Path:
    """A legacy-format torch file whose object is the given raw pickle (hand-made, to try what torch.save would
    never write)."""
    header = [torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION,
              {"protocol_version": torch.serialization.PROTOCOL_VERSION, "little_endian": True}]
    path.write_bytes(b"".join(pickle.dumps(value, protocol=2) for value in header) + main_pickle
                     + pickle.dumps([], protocol=2))
    return path


def write_malicious(path: Path, marker: Path) -> Path:
    """A torch file whose unpickling would create `marker`."""
    torch.save({"encoder.weight": torch.zeros(1), "payload": RunsACommand(f"touch {marker}")}, path)
    return path
