"""The labels of learning-curve probes (benchmarks/learning_curve.py, REPORT.md's budget table): a variant's name,
then option overrides after a colon, profile overrides after an at sign and generator overrides after a hash:
`memae:shrink_threshold=0.001@width=0.5#normal_speed=1.25`."""
from __future__ import annotations

from typing import NamedTuple


class ProbeLabel(NamedTuple):
    name: str       # the variant of params.yaml it changes
    variant: str    # "option=value,..." of the variant
    profile: str    # ... of the dataset's profile
    source: str     # ... of the dataset's generator


def split_label(label: str) -> ProbeLabel:
    rest, _, source = label.partition("#")
    rest, _, profile = rest.partition("@")
    name, _, variant = rest.partition(":")
    return ProbeLabel(name, variant, profile, source)
