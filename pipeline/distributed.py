"""Training on many processes with PyTorch's distributed runtime: what `python -m pipeline.train` needs when torchrun
starts it (`torchrun --nproc_per_node=N -m pipeline.train ...`, or on several hosts with c10d rendezvous).

torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT) says whether a process is one rank of many;
without it, training is the single process it always was and nothing here runs a collective.

What makes N ranks train the run a single process would train with the same global batch (profile.batch_size):
- each rank takes batch_size / N of every global batch, through torch's DistributedSampler over the epoch's draw:
  rank r holds the global batch's rows r, r + N, ...;
- DistributedDataParallel averages the gradients of the ranks' mean losses: the gradient of the global mean;
- batch normalisation normalises over the global batch: torch's SyncBatchNorm on GPUs; on CPU, where torch's
  SyncBatchNorm has no kernels, `CPUSyncBatchNorm` computes the same statistics with differentiable all-reduces;
- MNAD's memory update is computed from the queries of all ranks, gathered in the global batch's row order
  (models/memory.py), so every rank holds the same memory.
Only rank 0 writes checkpoints, the training log and MLflow; every rank reads the same checkpoint to resume.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
import torch.nn as nn

from pipeline.errors import UserError

# torch 2.13 marks the differentiable all-reduce deprecated in favour of a private module's, whose eager autograd
# is not the same; the pinned version's works as documented.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run's files and logs (rank 0)."""
        return self.rank == 0


def launched_world() -> World:
    """The world torchrun's environment describes; a single process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def start(world: World) -> torch.device:
    """Join the process group (nccl on GPUs, gloo on CPU) and return this rank's device: its own GPU (LOCAL_RANK),
    else the CPU. A single process joins nothing."""
    from pipeline.device import compute_device

    device = compute_device()
    if device.type == "cuda":   # one GPU per process on a host (DDP needs the index)
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def stop(finished: bool = True) -> None:
    """Leave the process group; after a finished training, once every rank has finished (never after a failure:
    the other ranks may be inside a collective that will not complete, and torchrun stops them)."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def active_world_size() -> int:
    """The number of ranks this process trains with (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The sum of `values` over the ranks (unchanged in a single process); `values` itself is left as it was."""
    if active_world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the ranks: a rank's mean over its share of the batch becomes the global batch's
    mean, as every rank's share has the same size."""
    return sum_over_ranks(values) / active_world_size()


def state_digest(state: dict) -> bytes:
    """sha256 over the bytes of every tensor of a checkpoint's weights, memory and optimiser state, in key order."""
    digest = hashlib.sha256()

    def visit(value, name: str) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(name.encode())
            digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(value[key], f"{name}.{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                visit(item, f"{name}.{index}")
    visit({"model": state["model"], "optimizer": state["optimizer"]}, "")
    return digest.digest()


def ranks_differing(digests: list[bytes]) -> list[int]:
    """The ranks whose state digest differs from rank 0's."""
    return [rank for rank, digest in enumerate(digests) if digest != digests[0]]


def same_on_every_rank(state: dict, world: World, epoch: int) -> None:
    """Every rank must hold bit-identical weights, memory and optimiser state (the gradients are averaged and
    the memory update gathers every rank's queries, so they do); a rank that drifted would make rank 0's
    checkpoint describe a training that never happened. One all-gather of 32 bytes per rank per epoch."""
    mine = torch.frombuffer(bytearray(state_digest(state)), dtype=torch.uint8)
    everyone = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(everyone, mine)
    differing = ranks_differing([bytes(d.tolist()) for d in everyone])
    if differing:
        raise UserError(f"distributed training: after epoch {epoch}, ranks {differing} hold weights, memory or "
                        f"optimiser state that differ from rank 0's; a non-deterministic kernel or a rank-dependent "
                        f"input is the likely cause. Report it with the run's params; train with launcher.kind local "
                        f"meanwhile")
    if world.writes:
        print(f"epoch {epoch}: the {world.size} ranks hold bit-identical weights, memory and optimiser state "
              f"(sha256 {bytes(mine.tolist()).hex()[:16]})")


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation over the global batch of all ranks, for CPU (gloo) ranks: torch.nn.SyncBatchNorm's
    statistics (mean, biased variance to normalise, unbiased variance into the running estimate), from two
    differentiable all-reduces, so the gradient flows back to every rank's inputs as SyncBatchNorm's does. In
    eval mode, or outside a process group, it is an ordinary BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = active_world_size()
        if not self.training or size == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.numel() // x.shape[1] * size
        mean = dist_functional.all_reduce(x.sum(dims)) / count
        centred = x - mean.reshape(shape)
        variance = dist_functional.all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(variance.detach() * count / (count - 1), momentum)
        out = centred * torch.rsqrt(variance + self.eps).reshape(shape)
        if self.affine:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        return out


def _sync_batchnorm(module: nn.Module, cpu: bool) -> nn.Module:
    """`module` with every BatchNorm layer replaced by its global-batch twin, sharing its weights and statistics."""
    if not cpu:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        synced = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        synced.load_state_dict(module.state_dict())
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, _sync_batchnorm(child, cpu))
    return module


def parallel(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The model to train: itself in a single process; else with global-batch normalisation, wrapped in
    DistributedDataParallel. Its `.module` (or itself) is what checkpoints save."""
    if world.size == 1:
        return model
    model = _sync_batchnorm(model, cpu=device.type != "cuda")
    # Buffers need no broadcast before each forward (rank 0's are broadcast once, at the start): batch statistics are global and the memory update gathers every rank's queries,
    # so every rank computes the same buffers.
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               forward_sync_buffers=False)


def unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

