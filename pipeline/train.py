"""Training of one (dataset, variant, seed): the loop, resumable from its checkpoint.

`train` writes runs/<dataset>/<variant>/seed<S>/{checkpoint.pt, train_log.csv}. The checkpoint is rewritten
atomically after every epoch; a later call with the same training fingerprint resumes from it and ends with the
same weights as an uninterrupted run, and a finished one makes the call a no-op. Every `profile.log_steps` steps
the loop logs one row: the mean of each loss term over those steps, the learning rate and the memory's usage. The
checkpoint keeps these rows; train_log.csv holds them plus the seconds each interval took (timings stay out of the
checkpoint, so its bytes repeat). Loss terms are summed on the device and read once per row, not once per step.

A loss that is not finite (NaN or inf) stops training with a UserError naming the epoch, the step and the terms
that were not finite. It is seen where each row reads the sums anyway, so finding it adds no per-step wait for the
device, and always before the epoch's checkpoint is written: the checkpoint of the last finished epoch stays as it
was, and the weights are checked once more before every save.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch._dynamo  # noqa: F401 - every optimizer imports it when first built; here it counts as start-up
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.build import build_model
from models.clips import split_clip
from models.losses import compute_loss
from models.noise import salt_and_pepper
from pipeline import checkpoint as ckpt
from pipeline.config import Dataset, Variant
from pipeline.data import clip_dataset, loader_batches
from pipeline.device import use_threads
from pipeline.errors import UserError
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
          on_log: Callable[[dict], None] | None = None, stop_after_epoch: int | None = None) -> Training:
    """Train (or resume, or find finished) the run's model. `on_log` receives every logged row in order, the ones
    an earlier call trained first; `stop_after_epoch` simulates an interruption (tests)."""
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
    if per_epoch < profile.batch_size:  # drop_last would leave an epoch without a single step
        raise UserError(f"{frames}: {per_epoch} training clips per epoch ({len(pool)} in the set, "
                        f"{key}.max_train_clips {profile.max_train_clips}), fewer than one batch of "
                        f"{profile.batch_size}; lower {key}.batch_size")
    model = build_model(variant, profile).to(device)
    # foreach: one fused update over all parameters, 15% faster per step on a 2-core CPU than the per-tensor loop
    optimizer = torch.optim.Adam(model.parameters(), lr=profile.lr, foreach=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=profile.epochs)

    start_epoch, log, trained = 0, [], 0
    if checkpoint_path.exists():
        # a checkpoint torch cannot read is refused here (UserError), never silently trained over
        state = ckpt.load_checkpoint(checkpoint_path)
        if state.get("fingerprint") == fingerprint:
            try:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                start_epoch, log = int(state["epoch"]), [dict(row) for row in state["log"]]
            except (KeyError, RuntimeError, ValueError, TypeError) as exc:
                raise UserError(f"checkpoint {checkpoint_path} is truncated or corrupt (its training state cannot be "
                                f"restored: {type(exc).__name__}: {exc}); delete it and rerun its run stage "
                                f"(`dvc repro`) to train it again") from None
            if start_epoch < profile.epochs and state.get("device") != device.type:
                print(f"note: resuming on {device.type} a training started on {state.get('device')}: "
                      f"its numbers will differ from an uninterrupted run on either")
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

    monitor = UsageMonitor(train_set, monitored, variant, device) if monitored and variant.has_memory else None
    steps_per_epoch = per_epoch // profile.batch_size
    for epoch in range(start_epoch, profile.epochs):
        try:
            train_epoch(model, optimizer, scheduler.get_last_lr()[0], train_set, pool, variant, profile, seed, epoch,
                        device, epoch * steps_per_epoch, logged, monitor,
                        f"{dataset.name} {variant.name} s{seed} epoch {epoch + 1}/{profile.epochs}")
            if not finite_weights(model):   # a finite last loss, then a non-finite update: never saved either
                raise NonFiniteLoss(epoch + 1, (epoch + 1) * steps_per_epoch, ["weights"], {})
        except NonFiniteLoss as bad:
            raise UserError(_non_finite_message(bad, dataset, variant, seed, checkpoint_path, start_epoch + trained,
                                                profile.lr)) from None
        scheduler.step()
        ckpt.save_checkpoint(checkpoint_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "epoch": epoch + 1, "config": config, "fingerprint": fingerprint, "log": log, "device": device.type})
        write_csv(log_path, pd.DataFrame(rows))
        trained += 1
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < profile.epochs:
            break
    if not log_path.exists():   # a finished checkpoint from a run whose log went missing: rebuild it
        write_csv(log_path, pd.DataFrame(rows))
    return Training(checkpoint_path, rows, trained, config, fingerprint, len(train_set),
                    sum(p.numel() for p in model.parameters()), start_epoch + trained)


def finite_weights(model) -> bool:
    """Whether every floating-point weight and buffer (the memory items too) is finite: one read from the device."""
    flags = [torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]
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
                description: str) -> None:
    """One epoch over the epoch's seeded draw of clips from `pool`. Every `profile.log_steps` steps (and at the
    epoch's end) `logged` receives a row: the step, the epoch, the learning rate, the mean of each loss term over
    those steps and, with a memory, the usage statistics of their nearest-item assignments and the monitor's
    (usage_*); and the seconds they took."""
    loader = DataLoader(torch.utils.data.Subset(train_set, epoch_order(pool, profile.max_train_clips, seed, epoch)),
                        batch_size=profile.batch_size, shuffle=False, drop_last=True,
                        num_workers=profile.num_workers, pin_memory=device.type == "cuda")
    noise_generator = epoch_generator(seed, epoch)
    model.train()
    sums: dict[str, torch.Tensor] = {}
    usage, steps, started = None, 0, time.perf_counter()
    interval: list[dict[str, torch.Tensor]] = []   # this row's per-step values, read only if the row is not finite
    for index, batch in enumerate(tqdm(loader_batches(loader), total=len(loader), desc=description, leave=False,
                                       mininterval=2.0)):
        inputs, target = split_clip(batch["clip"], variant)
        if variant.noise == "salt_pepper":  # denoising: noisy input, clean target
            inputs = salt_and_pepper(inputs, variant.noise_amount, noise_generator, variant.noise_rc2020_scaling)
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
            means = {name: float(total) / steps for name, total in sums.items()}   # the row's one read per term
            if not all(math.isfinite(value) for value in means.values()):
                raise NonFiniteLoss(epoch + 1, *_first_non_finite(interval, first_step + index + 2 - steps, means))
            row = {"step": first_step + index + 1, "epoch": epoch + 1, "lr": lr, **means}
            if usage is not None:
                row.update({f"memory_{k}": v for k, v in usage_stats(usage.cpu().numpy()).items()})
            if monitor is not None:
                row.update(monitor(model))
            logged(row, time.perf_counter() - started)
            sums, usage, steps, started, interval = {}, None, 0, time.perf_counter(), []
