"""Checkpoints, and the config fingerprint that decides whether a checkpoint can be resumed."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Dataset, Profile, Variant, resolved_options
from pipeline.io import atomic_path

def run_config(dataset: Dataset, variant: Variant, seed: int) -> dict[str, Any]:
    """Everything that determines a run's weights; stored in the checkpoint and logged as MLflow params."""
    return {"dataset": dataset.name, "seed": seed, "variant": resolved_options(variant),
            "profile": resolved_options(dataset.profile)}


def fingerprint(config: dict[str, Any], labels_csv: Path | None = None) -> str:
    """Hash of the run config (and the frames' label table): a checkpoint resumes only if this matches."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    if labels_csv is not None and labels_csv.exists():
        digest.update(labels_csv.read_bytes())
    return digest.hexdigest()[:16]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    from pipeline.errors import UserError

    if not Path(path).exists():
        raise UserError(f"checkpoint {path} not found; run its train stage first (`dvc repro`)")
    return torch.load(path, map_location=device, weights_only=False)


def variant_from_config(config: dict[str, Any]) -> tuple[Variant, Profile]:
    return Variant(**config["variant"]), Profile(**config["profile"])


def load_model(path: Path, device: str | torch.device = "cpu"):
    """The trained module of a checkpoint, in eval mode, with the Variant and Profile it was trained with."""
    from models.build import build_model

    state = load_checkpoint(path, device)
    variant, profile = variant_from_config(state["config"])
    model = build_model(variant, profile).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, variant, profile


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
