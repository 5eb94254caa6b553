"""Checkpoints, and the training fingerprint that says whether a checkpoint belongs to the current params.

A checkpoint holds tensors and plain values only (weights, optimiser and scheduler state, the epoch, the training
config, its fingerprint, the per-epoch losses): no wall-clock, so two runs with the same params write the same
bytes, and it loads with `torch.load(weights_only=True)`, which runs no code from the file.

The fingerprint hashes exactly what determines the trained weights: the seed, the variant's training options, the
profile's training options (not num_workers, log_steps, update_threshold, concurrent_runs), the frames (their
manifest, written by prepare) and the training code. Evaluation-only options (alpha, the update threshold, evaluate.*) are not in it, so changing them
never retrains.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.config import REPO_ROOT, Dataset, Variant
from pipeline.errors import UserError
from pipeline.io import atomic_path

# The code whose change can change trained weights: the networks and losses, the loop and the clip loader.
TRAINING_CODE = ("models", "pipeline/train.py", "pipeline/data.py")
# Profile options that do not change the weights: loader processes, logging, how evaluation sets its threshold,
# how many runs go side by side.
PROFILE_NOT_TRAINING = ("num_workers", "log_steps", "update_threshold", "families", "concurrent_runs")


def code_digest() -> str:
    """sha256 over the training code's files (sorted paths and bytes)."""
    digest = hashlib.sha256()
    for entry in TRAINING_CODE:
        path = REPO_ROOT / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(file.relative_to(REPO_ROOT).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def data_digest(frames_dir: Path) -> str:
    """sha256 of the frames as prepare sealed them (manifest.json holds the digest of every frame file) and of
    their labels."""
    digest = hashlib.sha256()
    for name in ("manifest.json", "labels.csv"):
        path = Path(frames_dir) / name
        if not path.exists():
            raise UserError(f"{path} not found: the frames were not prepared by this version; run "
                            f"`dvc repro prepare@{Path(frames_dir).name}`")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def training_config(dataset: Dataset, variant: Variant, seed: int, frames_dir: Path) -> dict[str, Any]:
    """Everything that determines a run's weights; stored in the checkpoint and logged as MLflow params."""
    profile = {k: v for k, v in dataset.training_profile(variant).model_dump().items()
               if k not in PROFILE_NOT_TRAINING}
    return {"dataset": dataset.name, "seed": seed, "variant": variant.training_options(), "profile": profile,
            "data": data_digest(frames_dir)[:16], "code": code_digest()[:16]}


def fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` atomically, as the same bytes whenever its values are the same."""
    # Through a file object: given a path, torch names the archive's root folder after the (temporary) file name.
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(_interned(state), handle)


def _interned(value: Any) -> Any:
    """`value` with every string interned. Pickle writes a repeated object once and refers back to it, so equal
    strings that are one object in one run (literals) and separate objects in another (read back from a resumed
    checkpoint) would otherwise give different bytes for equal contents."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        copied = type(value)((_interned(k), _interned(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):   # a module state_dict's per-module versions
            copied._metadata = _interned(value._metadata)
        return copied
    if isinstance(value, (list, tuple)):
        return type(value)(_interned(v) for v in value)
    return value


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, on the CPU (the caller moves what it needs)."""
    if not Path(path).exists():
        raise UserError(f"checkpoint {path} not found; run its stage first (`dvc repro`)")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_trained_model(path: Path, dataset: Dataset, variant: Variant, seed: int, frames_dir: Path,
                       device: torch.device):
    """The trained network of a finished checkpoint, built from the current params, in eval mode on `device`.
    A checkpoint whose fingerprint or epoch count does not match the current params is refused: its weights
    belong to other options, data or code."""
    from models.build import build_model

    state = load_checkpoint(path)
    expected = fingerprint(training_config(dataset, variant, seed, frames_dir))
    if state.get("fingerprint") != expected or state.get("epoch") != dataset.training_profile(variant).epochs:
        raise UserError(f"checkpoint {path} does not match params.yaml (trained with other options, frames or "
                        f"code, or unfinished); rerun its run stage with `dvc repro`")
    model = build_model(variant, dataset.training_profile(variant))
    model.load_state_dict(state["model"])
    return model.to(device).eval()
