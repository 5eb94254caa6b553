"""Train one (dataset, variant, seed): `python -m pipeline.train --dataset D --variant V --seed S`.

Writes runs/<dataset>/<variant>/seed<S>/{checkpoint.pt, train_log.csv}; the checkpoint is rewritten atomically after
every epoch, and a re-run after an interruption resumes from it (when its config fingerprint still matches), ending
with the same weights as an uninterrupted run. Every epoch's losses, learning rate and memory statistics go to the
run's MLflow run.
"""
from __future__ import annotations

if __name__ == "__main__":  # first: run in the preloaded interpreter, or start MLflow's worker (pipeline.launch)
    from pipeline import launch

    launch.prelude(mlflow_worker=True)

import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.build import build_model, compute_loss, split_clip
from models.noise import salt_and_pepper
from pipeline import checkpoint as ckpt
from pipeline.cli import run_arguments
from pipeline.config import load_params
from pipeline.data import clip_dataset
from pipeline.errors import UserError, exit_cleanly, exit_now
from pipeline.io import write_csv
from pipeline.metrics import usage_stats
from pipeline.paths import frames_dir, run_dir
from pipeline.tracking import environment_tags, flatten, open_run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # CPU kernels used here are deterministic; on CUDA, pin cuDNN to deterministic algorithms. (Not
    # torch.use_deterministic_algorithms: it costs 2.4 s of imports per stage and adds nothing on the CPU.)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A fresh generator per (seed, epoch), so a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def epoch_order(num_clips: int, max_clips: int, seed: int, epoch: int) -> list[int]:
    order = torch.randperm(num_clips, generator=epoch_generator(seed, epoch))
    return order[:max_clips].tolist() if max_clips else order.tolist()


def train(dataset_name: str, variant_name: str, seed: int, params_path: Path | None = None,
          data_root: Path | None = None, runs_root: Path | None = None, stop_after_epoch: int | None = None) -> Path:
    """Train and return the checkpoint path. `stop_after_epoch` simulates an interruption (tests)."""
    params = load_params(params_path)
    dataset, variant = params.dataset(dataset_name), params.variant(variant_name)
    profile = dataset.profile
    out_dir = run_dir(dataset_name, variant_name, seed, runs_root)
    checkpoint_path, log_path = out_dir / "checkpoint.pt", out_dir / "train_log.csv"
    frames = frames_dir(dataset_name, data_root)
    device = ckpt.pick_device()

    config = ckpt.run_config(dataset, variant, seed)
    fingerprint = ckpt.fingerprint(config, frames / "labels.csv")
    seed_everything(seed)
    train_set = clip_dataset(frames, "train", variant)
    per_epoch = min(len(train_set), profile.max_train_clips or len(train_set))
    if per_epoch < profile.batch_size:  # drop_last would leave an epoch without a single step
        key = f"profiles.{dataset.profile_name}"
        raise UserError(f"{frames}: {per_epoch} training clips per epoch ({len(train_set)} in the set, "
                        f"{key}.max_train_clips {profile.max_train_clips}), fewer than one batch of "
                        f"{profile.batch_size}; lower {key}.batch_size")
    model = build_model(variant, profile).to(device)
    # foreach: one fused update over all parameters, 15% faster per step on a 2-core CPU than the per-tensor loop
    optimizer = torch.optim.Adam(model.parameters(), lr=variant.lr or profile.lr, foreach=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=profile.epochs)

    # Resume when a checkpoint of this exact config exists; otherwise start over (and drop the stale MLflow run).
    start_epoch, log_rows = 0, []
    if checkpoint_path.exists():
        state = ckpt.load_checkpoint(checkpoint_path, device)
        if state.get("fingerprint") == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, log_rows = state["epoch"], state["log"]
    with open_run(dataset_name, variant_name, seed, fresh=start_epoch == 0) as run:
        run.set_tags({**environment_tags(device.type), "dvc_stage": f"train@{dataset_name}-{variant_name}-{seed}",
                      "fingerprint": fingerprint})
        run.log_params(flatten(config))
        run.log_params({"train_clips": len(train_set), "parameters": sum(p.numel() for p in model.parameters())})

        for epoch in range(start_epoch, profile.epochs):
            started = time.perf_counter()
            row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0],
                   **train_epoch(model, optimizer, train_set, variant, profile, seed, epoch, device,
                                 f"{dataset_name} {variant_name} s{seed} epoch {epoch + 1}/{profile.epochs}")}
            row["seconds"] = time.perf_counter() - started
            scheduler.step()
            log_rows.append(row)
            ckpt.save_checkpoint(checkpoint_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1, "config": config, "fingerprint": fingerprint, "log": log_rows})
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and epoch + 1 < profile.epochs:
                run.finish("KILLED")
                return checkpoint_path

        write_csv(log_path, pd.DataFrame(log_rows))
        run.log_artifact(log_path)
        run.finish()
    return checkpoint_path


def train_epoch(model, optimizer, train_set, variant, profile, seed: int, epoch: int, device,
                description: str) -> dict[str, float]:
    """One epoch over the epoch's seeded draw of clips. Returns the mean of each loss term and, with a memory, the
    usage statistics of the nearest-item assignments."""
    loader = DataLoader(torch.utils.data.Subset(train_set, epoch_order(len(train_set), profile.max_train_clips,
                                                                       seed, epoch)),
                        batch_size=profile.batch_size, shuffle=False, drop_last=True,
                        num_workers=profile.num_workers, pin_memory=device.type == "cuda")
    noise_generator = epoch_generator(seed, epoch)
    model.train()
    sums: dict[str, float] = {}
    usage = None
    batches = 0
    for batch in tqdm(loader, desc=description, leave=False, mininterval=2.0):
        inputs, target = split_clip(batch["clip"], variant)
        if variant.noise == "salt_pepper":  # denoising: noisy input, clean target
            inputs = salt_and_pepper(inputs, variant.noise_amount, noise_generator, variant.noise_rc2020_scaling)
        inputs, target = inputs.to(device, non_blocking=True), target.to(device, non_blocking=True)
        result = model(inputs, update_memory=True)
        loss, terms = compute_loss(result, target, variant)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in {"loss": loss, **terms}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach())
        if result.nearest is not None:
            counts = torch.bincount(result.nearest.flatten(), minlength=variant.memory_items).cpu()
            usage = counts if usage is None else usage + counts
        batches += 1
    means = {k: v / batches for k, v in sums.items()}
    if usage is not None:
        means.update({f"memory_{k}": v for k, v in usage_stats(usage.numpy()).items()})
    return means


@exit_cleanly
def main(argv: list[str] | None = None) -> int:
    args = run_arguments(__doc__.splitlines()[0], argv)
    path = train(args.dataset, args.variant, args.seed, args.params)
    print(f"checkpoint: {path}")
    return 0


if __name__ == "__main__":
    exit_now(main())
