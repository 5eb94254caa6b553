"""The command line shared by the per-run stages (train, evaluate): one (dataset, variant, seed)."""
from __future__ import annotations

import argparse
from pathlib import Path


def run_arguments(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--params", type=Path, default=None, help="params.yaml (default: the repository's)")
    return parser.parse_args(argv)
