"""Checkpoints, and the training fingerprint that says whether a checkpoint belongs to the current params.

A checkpoint holds tensors and plain values only (weights, optimiser and scheduler state, the epoch, the training
config, its fingerprint, the per-epoch losses): no wall-clock, so two runs with the same params write the same
bytes, and it loads with `torch.load(weights_only=True)`, which runs no code from the file.

The fingerprint hashes exactly what determines the trained weights: the seed, the variant's training options, the
profile's training options (not num_workers, log_steps, update_threshold, concurrent_runs), the frames (their
manifest, written by prepare) and the training code; not the device or the number of processes that trained it
(params.yaml launcher), which the checkpoint records beside it. Evaluation-only options (alpha, the update threshold, evaluate.*) are not in it, so changing them
never retrains.
"""
from __future__ import annotations

import errno
import hashlib
import json
import pickle
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import REPO_ROOT, Dataset, Variant
from pipeline.errors import UserError
from pipeline.io import atomic_path

# The code whose change can change trained weights: the networks and losses, the loop, the clip loader and the
# ranks' global-batch statistics.
TRAINING_CODE = ("models", "pipeline/train.py", "pipeline/data.py", "pipeline/distributed.py")
# Profile options that do not change the weights: loader processes, logging, how evaluation sets its threshold,
# how many runs go side by side.
PROFILE_NOT_TRAINING = ("num_workers", "log_steps", "update_threshold", "families", "concurrent_runs")
# How torch's weights-only unpickler words a refusal of a global (a class or function the file would need).
_NEEDS_CODE = re.compile(r"was not an allowed global|whose module \S+ is blocked|must be \S+ to load")
# The parts of a training config, as a refusal names them.
CONFIG_PARTS = {"dataset": "dataset", "variant": "variant options", "profile": "profile datasets.{dataset}.profile",
                "data": "frames", "code": "training code", "seed": "seed"}


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
        try:
            torch.save(_interned(state), handle)
        except RuntimeError as exc:
            # A failed write (a full disk) makes torch's writer fail again as it closes, and that RuntimeError
            # hides the OSError: raise the OSError, which atomic_path words for the user.
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise


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
    """A checkpoint's contents, on the CPU (the caller moves what it needs). A file torch cannot read (truncated by
    a full disk or a copy cut short, or not a checkpoint at all) is a UserError, never torch's traceback."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found; run its stage first (`dvc repro`)")
    fix = "delete it and rerun its run stage (`dvc repro`) to train it again"
    if path.is_file() and path.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is truncated or corrupt (the file is empty); {fix}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if _NEEDS_CODE.search(text):   # a sound pickle, but loading it would need code (a class) from elsewhere
            raise UserError(f"checkpoint {path} holds objects other than tensors and plain values, so it is not a "
                            f"checkpoint this harness wrote and is not loaded (it could run code); {fix}") from None
        inner = re.search(r"WeightsUnpickler error:\s*(.+)", text)   # torch wraps the unpickler's own words
        detail = f"UnpicklingError: {inner.group(1).strip()}" if inner else _first_line(exc)
        raise UserError(f"checkpoint {path} is truncated or corrupt ({detail}); {fix}") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
            zipfile.BadZipFile) as exc:
        raise UserError(f"checkpoint {path} is truncated or corrupt ({_first_line(exc)}); {fix}") from None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EISDIR):
            raise UserError(f"cannot read checkpoint {path}: {exc.strerror or exc}; make it a file this user can "
                            f"read") from None
        # torch reports some cut zip files as a failed seek (EINVAL)
        raise UserError(f"checkpoint {path} is truncated or corrupt ({_first_line(exc)}); {fix}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"checkpoint {path} is not a checkpoint of this harness (no model weights in it); {fix}")
    return state


def _first_line(exc: BaseException) -> str:
    """The exception's type and first sentence (torch's zip reader appends a paragraph of advice)."""
    text = str(exc).strip().splitlines()
    first = text[0].split(". ")[0] if text else ""
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def mismatch(stored: Any, expected: dict[str, Any], dataset: str) -> list[str]:
    """What differs between the training config a checkpoint holds and the current one, part by part, in words."""
    if not isinstance(stored, dict):
        return ["options: it holds no training config (written by another version of this harness)"]
    differences = []
    keys = [k for k in CONFIG_PARTS if k in stored or k in expected]
    for key in keys + sorted((set(stored) | set(expected)) - set(keys)):
        have, want = stored.get(key), expected.get(key)
        if have == want:
            continue
        name = CONFIG_PARTS.get(key, key).format(dataset=dataset)
        if key == "data":
            differences.append(f"{name} ({dataset}'s frames were prepared anew since: their manifest.json or "
                               f"labels.csv differ)")
        elif key == "code":
            differences.append(f"{name} ({', '.join(TRAINING_CODE)} changed since it was trained)")
        elif isinstance(have, dict) and isinstance(want, dict):
            keys = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
            shown = ", ".join(f"{k} {have.get(k)!r} -> {want.get(k)!r}" for k in keys[:4])
            differences.append(f"{name} (checkpoint -> now: {shown}{', ...' if len(keys) > 4 else ''})")
        else:
            differences.append(f"{name} ({have!r} in the checkpoint, {want!r} now)")
    return differences


def load_trained_model(path: Path, dataset: Dataset, variant: Variant, seed: int, frames_dir: Path,
                       device: torch.device):
    """The trained network of a finished checkpoint, built from the current params, in eval mode on `device`.
    A checkpoint whose fingerprint or epoch count does not match the current params is refused, with what differs:
    its weights belong to other options, data or code, or its training did not finish."""
    from models.build import build_model

    state = load_checkpoint(path)
    config = training_config(dataset, variant, seed, frames_dir)
    epochs = dataset.training_profile(variant).epochs
    if state.get("fingerprint") != fingerprint(config):
        differences = mismatch(state.get("config"), config, dataset.name) or [
            "fingerprint, though its config matches (written by another version of this harness)"]
        raise UserError(f"checkpoint {path} does not match params.yaml: it was trained with other "
                        f"{'; other '.join(differences)}; rerun its run stage (`dvc repro`) to train it again")
    if state.get("epoch") != epochs:
        raise UserError(f"checkpoint {path} does not match params.yaml: unfinished, it holds {state.get('epoch')} of "
                        f"the {epochs} epochs (its training was interrupted); rerun its run stage (`dvc repro`) to "
                        f"finish it")
    model = build_model(variant, dataset.training_profile(variant))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:   # the config matched, so the file's weights were damaged or edited
        raise UserError(f"checkpoint {path}: its weights do not fit the {variant.name} network "
                        f"({_first_line(exc)}); delete it and rerun its run stage (`dvc repro`)") from None
    return model.to(device).eval()
