"""Training through torchrun, as params.yaml `launcher` asks (`kind: torchrun`): the run stage starts
`torchrun ... -m pipeline.train` for each seed and waits for it; rank 0 logs into the MLflow run the stage started.

One host: `torchrun --standalone --nproc_per_node=N` (a c10d rendezvous on a free local port). Several hosts: the
stage's torchrun joins the c10d rendezvous at `launcher.rdzv_endpoint` under an id named after the run, and prints
the command every other host must start; rank 0 may be on any host, so runs/ and data/ must be on a filesystem
every host shares.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.config import Launcher
from pipeline.errors import UserError
from pipeline.train import RUN_ID_ENV


def torchrun_command(launcher: Launcher, dataset: str, variant: str, seed: int, params_path: Path | None = None,
                     data_root: Path | None = None, runs_root: Path | None = None,
                     stop_after_epoch: int | None = None) -> list[str]:
    """The torchrun command line that trains one run with `launcher`'s processes."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={launcher.nproc}"]
    if launcher.nnodes == 1:
        command.append("--standalone")
    else:
        command += [f"--nnodes={launcher.nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={launcher.rdzv_endpoint}",
                    f"--rdzv_id=memvad-{dataset}-{variant}-s{seed}"]
    command += ["-m", "pipeline.train", "--dataset", dataset, "--variant", variant, "--seed", str(seed)]
    for flag, value in (("--params", params_path), ("--data-root", data_root), ("--runs-root", runs_root),
                        ("--stop-after-epoch", stop_after_epoch)):
        if value is not None:
            command += [flag, str(Path(value).absolute()) if isinstance(value, Path) else str(value)]
    return command


def train_with_torchrun(launcher: Launcher, dataset: str, variant: str, seed: int, mlflow_run_id: str | None,
                        params_path: Path | None = None, data_root: Path | None = None,
                        runs_root: Path | None = None, stop_after_epoch: int | None = None) -> None:
    """Train one run through torchrun, rank 0 logging into the MLflow run `mlflow_run_id` (None: the store is
    unavailable, log nothing); a failed training is one UserError (the ranks printed their own messages)."""
    command = torchrun_command(launcher, dataset, variant, seed, params_path, data_root, runs_root, stop_after_epoch)
    env = {**os.environ, RUN_ID_ENV: mlflow_run_id or ""}
    if launcher.nnodes > 1:
        other_hosts = f"{RUN_ID_ENV}={mlflow_run_id or ''} " + shlex.join(["python", *command[1:]])
        print(f"training {dataset} {variant} seed {seed} on {launcher.nnodes} hosts: start on each other host, in "
              f"a checkout of the same commit sharing runs/ and data/ with this one and with MLFLOW_TRACKING_URI "
              f"naming the same MLflow server:\n  {other_hosts}", flush=True)
    print(f"training {dataset} {variant} seed {seed}: {launcher.world_size} processes through torchrun", flush=True)
    finished = subprocess.run(command, env=env)
    if finished.returncode != 0:
        raise UserError(f"training {dataset} {variant} seed {seed} through torchrun failed (exit "
                        f"{finished.returncode}; its ranks' messages are above); fix what they name and rerun the "
                        f"stage, or set params.yaml launcher.kind to local")
