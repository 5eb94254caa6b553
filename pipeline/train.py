"""Training of one (dataset, variant, seed): the loop, resumable from its checkpoint.

`train` writes runs/<dataset>/<variant>/seed<S>/{checkpoint.pt, train_log.csv}. The checkpoint is rewritten
atomically after every epoch; a later call with the same training fingerprint resumes from it and ends with the
same weights as an uninterrupted run, and a finished one makes the call a no-op. Every `profile.log_steps` steps
the loop logs one row: the mean of each loss term over those steps, the learning rate and the memory's usage. The
checkpoint keeps these rows; train_log.csv holds them plus the seconds each interval took (timings stay out of the
checkpoint, so its bytes repeat). Loss terms are summed on the device and read once per row, not once per step.

Under torchrun (`torchrun --nproc_per_node=N -m pipeline.train --dataset D --variant V --seed S`, or several hosts
with c10d rendezvous) the ranks train the run one process would train with the same global batch
(pipeline.distributed); only rank 0 writes the checkpoint, the log and the MLflow run, and after every epoch the
ranks check that they hold bit-identical weights, memory and optimiser state.

A loss that is not finite (NaN or inf) stops training with a UserError naming the epoch, the step and the terms
that were not finite. It is seen where each row reads the sums anyway, so finding it adds no per-step wait for the
device, and always before the epoch's checkpoint is written: the checkpoint of the last finished epoch stays as it
was, and the weights are checked once more before every save.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch._dynamo  # noqa: F401 - every optimizer imports it when first built; here it counts as start-up
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from models.build import build_model
from models.clips import split_clip
from models.losses import compute_loss
from models.noise import salt_and_pepper
from pipeline import checkpoint as ckpt
from pipeline import distributed, tracking
from pipeline.config import Dataset, Variant, load_params
from pipeline.data import clip_dataset, loader_batches
from pipeline.device import use_threads
from pipeline.distributed import World
from pipeline.errors import UserError, exit_cleanly
from pipeline.paths import frames_dir, run_dir
from pipeline.io import write_csv
from pipeline.metrics import UsageAccumulator, usage_stats


@dataclass(frozen=True)
class Training:
    """What `train` did: the checkpoint, every logged row (step, epoch, losses, lr, memory statistics, seconds
    where known), how many epochs this call trained (0: the checkpoint was already finished) and the config."""

    checkpoint: Path
    log: list[dict]
    trained_epochs: int
    config: dict
    fingerprint: str
    train_clips: int
    parameters: int
    epochs: int          # epochs the checkpoint now holds (fewer than the profile's after an interruption)


class NonFiniteLoss(Exception):
    """Raised by train_epoch; `train` turns it into the UserError, adding what the checkpoint kept."""

    def __init__(self, epoch: int, step: int, terms: list[str], values: dict[str, float]):
        super().__init__(f"non-finite {' and '.join(terms)} at epoch {epoch}, step {step}")
        self.epoch, self.step, self.terms, self.values = epoch, step, terms, values


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A fresh generator per (seed, epoch), so a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_order(pool: list[int], max_clips: int, seed: int, epoch: int) -> list[int]:
    """The epoch's seeded draw from the training windows `pool`."""
    order = torch.randperm(len(pool), generator=epoch_generator(seed, epoch))
    chosen = order[:max_clips] if max_clips else order
    return [pool[i] for i in chosen.tolist()]


def held_out(count: int, monitored: int, seed: int) -> tuple[list[int], list[int]]:
    """(the training pool, the monitored windows): a seeded draw of `monitored` windows that training never sees."""
    monitor = sorted(np.random.default_rng(seed).choice(count, size=monitored, replace=False).tolist())
    taken = set(monitor)
    return [i for i in range(count) if i not in taken], monitor


class UsageMonitor:
    """How the memory's queries choose items on a fixed batch of held-out training windows, measured between steps
    with the model in eval mode and without gradients (so training is unchanged): the usage statistics of
    pipeline.metrics.UsageAccumulator, prefixed "usage_"."""

    def __init__(self, train_set, indices: list[int], variant: Variant, device: torch.device):
        clips = torch.stack([train_set[i]["clip"] for i in indices])
        self.inputs = split_clip(clips, variant)[0].to(device)
        self.items = variant.memory_items

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        model.eval()
        encoded = model.encode(self.inputs)
        model.train()
        nearest = encoded.nearest.flatten(1).cpu().numpy()
        queries = encoded.queries.flatten(2).transpose(1, 2).cpu().numpy()
        usage = UsageAccumulator(self.items, nearest.shape[1], queries.shape[2])
        usage.add(nearest, queries)
        return {f"usage_{key}": value for key, value in usage.stats().items()}


def train(dataset: Dataset, variant: Variant, seed: int, frames: Path, out_dir: Path, device: torch.device,
          on_log: Callable[[dict], None] | None = None, stop_after_epoch: int | None = None,
          world: World = World()) -> Training:
    """Train (or resume, or find finished) the run's model. `on_log` receives every logged row in order, the ones
    an earlier call trained first; `stop_after_epoch` stops before that epoch (an interruption, in tests; 0 reads
    the checkpoint and trains nothing). `world`: this process's
    rank among the processes training the run together (distributed training; one process by default)."""
    profile = dataset.training_profile(variant)
    checkpoint_path, log_path = out_dir / "checkpoint.pt", out_dir / "train_log.csv"
    config = ckpt.training_config(dataset, variant, seed, frames)
    fingerprint = ckpt.fingerprint(config)
    use_threads(profile.threads)   # before anything computes: the count is part of the fingerprint
    seed_everything(seed)
    train_set = clip_dataset(frames, "train", variant, frame_size=dataset.profile.frame_size)
    key = f"datasets.{dataset.name}.profile"
    if profile.monitor_windows >= len(train_set):
        raise UserError(f"{frames}: {key}.monitor_windows {profile.monitor_windows} holds out every one of the "
                        f"{len(train_set)} training windows; lower it")
    pool, monitored = held_out(len(train_set), profile.monitor_windows, seed)
    per_epoch = min(len(pool), profile.max_train_clips or len(pool))
    if profile.batch_size % world.size:
        raise UserError(f"{key}.batch_size {profile.batch_size} is the global batch, dealt out evenly to the "
                        f"{world.size} processes training together; make it a multiple of {world.size}, or change "
                        f"the number of processes (params.yaml launcher)")
    if per_epoch < profile.batch_size:  # drop_last would leave an epoch without a single step
        raise UserError(f"{frames}: {per_epoch} training clips per epoch ({len(pool)} in the set, "
                        f"{key}.max_train_clips {profile.max_train_clips}), fewer than one batch of "
                        f"{profile.batch_size}; lower {key}.batch_size")
    model = build_model(variant, profile).to(device)
    # a checkpoint torch cannot read is refused here (UserError), never silently trained over
    state = ckpt.load_checkpoint(checkpoint_path) if checkpoint_path.exists() else {}
    resume = state.get("fingerprint") == fingerprint
    if resume:
        _restore(checkpoint_path, lambda: model.load_state_dict(state["model"]))
    model = distributed.parallel(model, world, device)   # after loading: its BatchNorm layers may be replaced
    # foreach: one fused update over all parameters, 15% faster per step on a 2-core CPU than the per-tensor loop
    optimizer = torch.optim.Adam(model.parameters(), lr=profile.lr, foreach=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=profile.epochs)

    start_epoch, log, trained = 0, [], 0
    if resume:
        _restore(checkpoint_path, lambda: (optimizer.load_state_dict(state["optimizer"]),
                                           scheduler.load_state_dict(state["scheduler"])))
        start_epoch, log = int(state["epoch"]), [dict(row) for row in state["log"]]
        if start_epoch < profile.epochs:
            started = (state.get("device"), state.get("world_size", 1))
            if started != (device.type, world.size):
                print(f"note: resuming on {_processes(device.type, world.size)} a training started on "
                      f"{_processes(*started)}: its numbers will differ from an uninterrupted run on either")
    seconds = _earlier_seconds(log_path, len(log))
    rows = [{**row, "seconds": seconds.get(row["step"])} for row in log]
    for row in rows:
        if on_log:
            on_log(row)

    def logged(row: dict, seconds: float) -> None:
        log.append(row)
        rows.append({**row, "seconds": seconds})
        if on_log:
            on_log(rows[-1])

    monitor = (UsageMonitor(train_set, monitored, variant, device)
               if monitored and variant.has_memory and world.writes else None)
    steps_per_epoch = per_epoch // profile.batch_size
    for epoch in range(start_epoch, profile.epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        try:
            train_epoch(model, optimizer, scheduler.get_last_lr()[0], train_set, pool, variant, profile, seed, epoch,
                        device, epoch * steps_per_epoch, logged, monitor,
                        f"{dataset.name} {variant.name} s{seed} epoch {epoch + 1}/{profile.epochs}", world)
            if not finite_weights(model):   # a finite last loss, then a non-finite update: never saved either
                raise NonFiniteLoss(epoch + 1, (epoch + 1) * steps_per_epoch, ["weights"], {})
        except NonFiniteLoss as bad:
            raise UserError(_non_finite_message(bad, dataset, variant, seed, checkpoint_path, start_epoch + trained,
                                                profile.lr)) from None
        scheduler.step()
        state = {"model": distributed.unwrapped(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "config": config,
                 "fingerprint": fingerprint, "log": log, "device": device.type, "world_size": world.size}
        if world.size > 1:
            distributed.same_on_every_rank(state, world, epoch + 1)
        if world.writes:
            ckpt.save_checkpoint(checkpoint_path, state)
            write_csv(log_path, pd.DataFrame(rows))
        trained += 1
    if world.writes and not log_path.exists():   # a finished checkpoint from a run whose log went missing
        write_csv(log_path, pd.DataFrame(rows))
    return Training(checkpoint_path, rows, trained, config, fingerprint, len(train_set),
                    sum(p.numel() for p in model.parameters()), start_epoch + trained)


def _restore(checkpoint_path: Path, load: Callable[[], Any]) -> None:
    """Load part of a checkpoint's training state; a state that does not fit is one UserError."""
    try:
        load()
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        raise UserError(f"checkpoint {checkpoint_path} is truncated or corrupt (its training state cannot be "
                        f"restored: {type(exc).__name__}: {exc}); delete it and rerun its run stage "
                        f"(`dvc repro`) to train it again") from None


def _processes(device: str | None, ranks: int) -> str:
    return str(device) if ranks == 1 else f"{ranks} {device} processes"


def finite_weights(model) -> bool:
    """Whether every floating-point weight and buffer (the memory items too) is finite: one read from the device."""
    flags = [torch.isfinite(t).all() for t in distributed.unwrapped(model).state_dict().values()
             if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _non_finite_message(bad: NonFiniteLoss, dataset: Dataset, variant: Variant, seed: int, checkpoint_path: Path,
                        finished: int, lr: float) -> str:
    family = dataset.profile.families.get(variant.family)
    lr_key = (f"datasets.{dataset.name}.profile.families.{variant.family}.lr" if family and family.lr is not None
              else f"datasets.{dataset.name}.profile.lr")
    values = f" ({', '.join(f'{k} = {v:.4g}' for k, v in bad.values.items())})" if bad.values else ""
    kept = (f"{checkpoint_path} keeps epoch {finished}, the last finished one, as it was" if finished else
            "no epoch finished, so no checkpoint of this training was written")
    return (f"training {dataset.name} {variant.name} seed {seed}: {bad}{values}; training stopped and {kept}. "
            f"Lower the learning rate ({lr_key}, now {lr:g}) or a loss weight of variants.{variant.name}, then rerun")


def _first_non_finite(interval: list[dict[str, torch.Tensor]], first_step: int,
                      means: dict[str, float]) -> tuple[int, list[str], dict[str, float]]:
    """(step, the non-finite terms, every term's value) of the first step of a logging interval whose loss was not
    finite. Only called once a row's sums showed one, so reading each step's values back costs nothing normally."""
    for offset, values in enumerate(interval):
        read = {name: float(value) for name, value in values.items()}
        bad = [name for name, value in read.items() if not math.isfinite(value)]
        if bad:
            return first_step + offset, bad, read
    # each step finite, their sum not (an overflow): the interval's last step, and its means
    return first_step + len(interval) - 1, [name for name, v in means.items() if not math.isfinite(v)], means


def _over_ranks(interval: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Each step's loss terms as means over the global batch (unchanged in a single process)."""
    return [dict(zip(values, distributed.mean_over_ranks(torch.stack(list(values.values())))))
            for values in interval]


def _earlier_seconds(log_path: Path, rows: int) -> dict[int, float]:
    """Seconds of each of the first `rows` logged steps, from the log an earlier call wrote (empty if none)."""
    if not rows or not log_path.exists():
        return {}
    earlier = pd.read_csv(log_path)
    if "seconds" not in earlier.columns or "step" not in earlier.columns:
        return {}
    return {int(step): float(s) for step, s in zip(earlier["step"][:rows], earlier["seconds"][:rows])}


def training_step(model, optimizer, inputs: torch.Tensor, target: torch.Tensor, variant, precision: str = "fp32"):
    """One optimiser step on a batch: (loss, loss terms, model result), left on the device (nothing is read back
    to the host, so the step does not wait for the device). `precision` "bf16" runs the forward pass and the
    losses under bf16 autocast (the weights, gradients and optimiser stay fp32)."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        result = model(inputs, update_memory=True)
        loss, terms = compute_loss(result, target, variant)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, terms, result


def train_epoch(model, optimizer, lr: float, train_set, pool: list[int], variant, profile, seed: int, epoch: int,
                device, first_step: int, logged: Callable[[dict, float], None], monitor: UsageMonitor | None,
                description: str, world: World = World()) -> None:
    """One epoch over the epoch's seeded draw of clips from `pool`. Every `profile.log_steps` steps (and at the
    epoch's end) `logged` receives a row: the step, the epoch, the learning rate, the mean of each loss term over
    those steps and, with a memory, the usage statistics of their nearest-item assignments and the monitor's
    (usage_*); and the seconds they took. With several ranks (`world`), each takes its share of every global batch
    and a row holds the means over the global batch."""
    drawn = torch.utils.data.Subset(train_set, epoch_order(pool, profile.max_train_clips, seed, epoch))
    # rank r of N takes rows r, r + N, ... of the draw: at every step the ranks together hold the global batch
    sampler = (DistributedSampler(drawn, world.size, world.rank, shuffle=False, drop_last=True)
               if world.size > 1 else None)
    loader = DataLoader(drawn, batch_size=profile.batch_size // world.size, sampler=sampler, shuffle=False,
                        drop_last=True, num_workers=profile.num_workers, pin_memory=device.type == "cuda")
    noise_generator = epoch_generator(seed, epoch)
    model.train()
    sums: dict[str, torch.Tensor] = {}
    usage, steps, started = None, 0, time.perf_counter()
    interval: list[dict[str, torch.Tensor]] = []   # this row's per-step values, read only if the row is not finite
    for index, batch in enumerate(tqdm(loader_batches(loader), total=len(loader), desc=description, leave=False,
                                       mininterval=2.0, disable=not world.writes)):
        inputs, target = split_clip(batch["clip"], variant)
        if variant.noise == "salt_pepper":  # denoising: noisy input, clean target
            inputs = salt_and_pepper(inputs, variant.noise_amount, noise_generator, variant.noise_rc2020_scaling,
                                     share=(world.rank, world.size))
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        loss, terms, result = training_step(model, optimizer, inputs, target, variant, profile.precision)
        values = {name: value.detach() for name, value in {"loss": loss, **terms}.items()}
        interval.append(values)
        for name, value in values.items():
            sums[name] = sums[name] + value if name in sums else value
        if result.nearest is not None:
            # scatter_add, not bincount: on CUDA bincount reads its input's maximum back to the host every step
            nearest = result.nearest.flatten()
            counts = torch.zeros(variant.memory_items, dtype=torch.long, device=nearest.device).scatter_add_(
                0, nearest, torch.ones_like(nearest))
            usage = counts if usage is None else usage + counts
        steps += 1
        if steps == profile.log_steps or index == len(loader) - 1:
            names = list(sums)
            totals = distributed.mean_over_ranks(torch.stack([sums[name] for name in names]))
            means = {name: total / steps for name, total in zip(names, totals.tolist())}   # the row's one read
            if not all(math.isfinite(value) for value in means.values()):
                raise NonFiniteLoss(epoch + 1, *_first_non_finite(_over_ranks(interval), first_step + index + 2 - steps,
                                                                  means))
            if usage is not None:
                usage = distributed.sum_over_ranks(usage)
            row = {"step": first_step + index + 1, "epoch": epoch + 1, "lr": lr, **means}
            if usage is not None:
                row.update({f"memory_{k}": v for k, v in usage_stats(usage.cpu().numpy()).items()})
            if monitor is not None:
                row.update(monitor(distributed.unwrapped(model)))
            logged(row, time.perf_counter() - started)
            sums, usage, steps, started, interval = {}, None, 0, time.perf_counter(), []


def tracked_training(dataset: Dataset, variant: Variant, seed: int, frames: Path, out_dir: Path,
                     device: torch.device, mlflow_run: tracking.Logged, stop_after_epoch: int | None = None,
                     world: World = World()) -> Training:
    """`train`, logging to `mlflow_run` (rank 0's; the other ranks get an offline run): every row as it is logged,
    then the training's params, tags, seconds and train_log.csv."""
    started = time.perf_counter()
    training = train(dataset, variant, seed, frames, out_dir, device,
                     on_log=lambda row: mlflow_run.log_metrics({k: v for k, v in row.items() if k != "step"},
                                                               step=row["step"]),
                     stop_after_epoch=stop_after_epoch, world=world)
    mlflow_run.log_params({**tracking.flatten_params(training.config), "fingerprint": training.fingerprint,
                           "train_clips": training.train_clips, "parameters": training.parameters,
                           "world_size": world.size})
    mlflow_run.set_tags({"trained_epochs": training.trained_epochs})
    if not training.trained_epochs and world.writes:
        print("training: the finished checkpoint matches; nothing to train")
    mlflow_run.log_metrics({"train_seconds": time.perf_counter() - started})
    if world.writes:
        mlflow_run.log_artifact(out_dir / "train_log.csv")
    return training


# The MLflow run that rank 0 of a launched training logs into: pipeline.run starts it (training and evaluation
# are one run) and names it here; without it, rank 0 starts a run of its own.
RUN_ID_ENV = "MEMVAD_MLFLOW_RUN_ID"


@exit_cleanly
def main(argv: list[str] | None = None) -> int:
    """Train one run, in this process or as one rank of a torchrun launch (nothing is evaluated: `pipeline.run`,
    the run stages, evaluate)."""
    parser = argparse.ArgumentParser(description="Train one (dataset, variant, seed); under torchrun, one rank of it")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
    parser.add_argument("--data-root", type=Path, default=None, help="folder holding frames/ (default: data/)")
    parser.add_argument("--runs-root", type=Path, default=None, help="folder holding the runs (default: runs/)")
    parser.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)   # tests
    args = parser.parse_args(argv)
    params = load_params(args.params)
    dataset, variant = params.dataset(args.dataset), params.variant(args.variant)
    if not variant.trainable:
        raise UserError(f"variant {variant.name} has nothing to train; `python -m pipeline.run` evaluates it")
    world = distributed.launched_world()
    device = distributed.start(world)
    try:
        use_threads(dataset.training_profile(variant).threads)
        frames, out_dir = frames_dir(args.dataset, args.data_root), run_dir(args.dataset, args.variant, args.seed,
                                                                           args.runs_root)
        if not world.writes or os.environ.get(RUN_ID_ENV) == "":
            mlflow_run = tracking.offline()   # another rank logs; or pipeline.run found the store unavailable
        elif os.environ.get(RUN_ID_ENV):
            mlflow_run = tracking.Logged(tracking.client(), os.environ[RUN_ID_ENV], keep_going=True)
        else:
            mlflow_run = tracking.Run(args.dataset, args.variant, args.seed, keep_going=True)
        with mlflow_run:
            if world.writes:
                mlflow_run.set_tags({**tracking.environment_tags(device.type), "world_size": world.size})
            training = tracked_training(dataset, variant, args.seed, frames, out_dir, device, mlflow_run,
                                        args.stop_after_epoch, world)
            if world.writes and not os.environ.get(RUN_ID_ENV):
                finished = training.epochs >= dataset.training_profile(variant).epochs
                mlflow_run.finish("FINISHED" if finished else "KILLED")
        if mlflow_run.problem is not None:
            raise mlflow_run.problem
    except BaseException:
        distributed.stop(finished=False)
        raise
    distributed.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
