"""Prepare one dataset's frames: `python -m pipeline.prepare --dataset D` (the `prepare@` stage).

Synthetic datasets are rendered (pipeline.synthetic); real ones are downloaded or verified in place, and extracted
(pipeline.datasets). Either way the result is data/frames/<dataset>/ in the common layout, after which every stage
is dataset-agnostic. The folder is built beside its final name and swapped in whole, so a killed stage leaves the
previous frames or none, never half of them. Its manifest.json holds a digest of every file: the frames' identity,
which the training fingerprint reads. data/raw/<dataset>/ keeps the archives (real) or the generator options that
produced the frames (synthetic).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from pipeline.config import load_params, resolved_options
from pipeline.datasets import prepare_real
from pipeline.errors import exit_cleanly
from pipeline.io import atomic_folder, write_json
from pipeline.paths import DATA_DIR
from pipeline.synthetic import render_dataset

MANIFEST = "manifest.json"


def prepare(dataset_name: str, params_path: Path | None = None, data_root: Path | None = None) -> dict:
    params = load_params(params_path)
    dataset = params.dataset(dataset_name)
    root = data_root or DATA_DIR
    raw_dir, out_dir = root / "raw" / dataset_name, root / "frames" / dataset_name
    started = time.perf_counter()
    with atomic_folder(out_dir) as staging:
        if dataset.is_synthetic:
            summary = render_dataset(dataset, staging)
        else:
            summary = prepare_real(dataset, raw_dir, staging)
        summary["manifest"] = seal(staging)
    if dataset.is_synthetic:   # what made the frames now in place
        profile = dataset.profile
        write_json(raw_dir / "generator.json", {"frame_size": profile.frame_size, "channels": profile.channels,
                                                "source": resolved_options(dataset.source)})
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def seal(folder: Path) -> dict:
    """Write folder/manifest.json: how many files the folder holds and a sha256 over every file's relative path and
    bytes, in sorted order. Returns the manifest."""
    digest, count = hashlib.sha256(), 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
        count += 1
    manifest = {"files": count, "sha256": digest.hexdigest()}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@exit_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
    args = parser.parse_args(argv)
    print(prepare(args.dataset, args.params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
