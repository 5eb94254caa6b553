"""Edited copies of the repository's params.yaml, for tests that change an option."""
from pathlib import Path

import yaml

from pipeline.config import DEFAULT_PARAMS


def params_file(folder: Path, edit=None) -> Path:
    """A copy of params.yaml in `folder`, edited by `edit(raw)`."""
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    if edit:
        edit(raw)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
