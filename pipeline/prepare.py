"""Prepare one dataset's frames: `python -m pipeline.prepare --dataset D`.

Synthetic datasets are rendered; real ones are downloaded (or verified in place) and extracted. Either way the
result is data/frames/<dataset>/ in the common layout, after which every stage is dataset-agnostic. data/raw/<dataset>/
keeps the archives (real) or the generator options that produced the frames (synthetic).
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before the imports: run in the preloaded interpreter (pipeline.launch)
    from pipeline import launch

    launch.prelude()

import argparse
import time
from pathlib import Path

from pipeline.config import load_params, resolved_options
from pipeline.errors import exit_cleanly, exit_now
from pipeline.io import write_json
from pipeline.paths import DATA_DIR


def prepare(dataset_name: str, params_path: Path | None = None, data_root: Path | None = None) -> dict:
    params = load_params(params_path)
    dataset = params.dataset(dataset_name)
    root = data_root or DATA_DIR
    raw_dir, out_dir = root / "raw" / dataset_name, root / "frames" / dataset_name
    started = time.perf_counter()
    if dataset.is_synthetic:
        from pipeline.synthetic import write_dataset

        write_json(raw_dir / "generator.json", {"seed": dataset.seed, "profile": resolved_options(dataset.profile),
                                                "generator": resolved_options(dataset.generator)})
        summary = write_dataset(dataset, out_dir)
    else:
        from pipeline.extract import prepare_real

        summary = prepare_real(dataset, raw_dir, out_dir)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


@exit_cleanly
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
    args = parser.parse_args(argv)
    print(prepare(args.dataset, args.params))
    return 0


if __name__ == "__main__":
    exit_now(main())
