"""The labels of learning-curve probes (benchmarks/learning_curve.py, REPORT.md's budget table): a variant's name,
then option overrides after a colon, profile overrides after an at sign and generator overrides after a hash:
`memae:shrink_threshold=0.001@width=0.5#normal_speed=1.25`."""
from __future__ import annotations

from typing import NamedTuple

from pipeline.config import Dataset, Params, Profile, Variant

# What a learning-curve row trained with besides its epochs, recorded with the row: a label means what params.yaml
# makes of it, so a row whose recorded settings its label no longer gives was measured under other params.
SETTING_COLUMNS = ("frame_size", "width", "batch_size", "lr", "max_train_clips")


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


def labelled_variant(params: Params, label: str, dataset: Dataset) -> tuple[Variant, dict, dict]:
    """`name[:option=value,...][@profile_option=value,...][#source_option=value,...]` -> (the variant with those
    options and the label as its name, the profile options to change, the generator options to change)."""
    parts = split_label(label)
    variant = params.variant(parts.name)
    changed = _assignments(variant, parts.variant)
    profile_changes = _assignments(dataset.profile, parts.profile)
    source_changes = _assignments(dataset.source, parts.source)
    renamed = (variant.model_copy(update={**changed, "name": label}) if changed or profile_changes or source_changes
               else variant)
    return renamed, profile_changes, source_changes


def curve_profile(dataset: Dataset, variant: Variant, profile_options: dict, epochs: int) -> Profile:
    """What `variant` trains with at one length of the curve: its family's own settings (params.yaml `families`)
    with the label's profile options and `epochs` over them (the family's epochs would otherwise win)."""
    return dataset.training_profile(variant).model_copy(update={**profile_options, "epochs": epochs})


def label_settings(params: Params, dataset_name: str, label: str) -> dict:
    """The SETTING_COLUMNS a curve row of `label` on `dataset_name` trains with under `params`."""
    dataset = params.dataset(dataset_name)
    variant, profile_options, _ = labelled_variant(params, label, dataset)
    return profile_settings(curve_profile(dataset, variant, profile_options, dataset.profile.epochs))


def profile_settings(profile: Profile) -> dict:
    """The SETTING_COLUMNS of a training profile, as a curve row records them."""
    return {key: getattr(profile, key) for key in SETTING_COLUMNS}


def _assignments(model, text: str) -> dict:
    """"a=1,b=true" -> {"a": 1, "b": True}, each value cast to the type the option has in `model`."""
    changed = {}
    for assignment in filter(None, text.split(",")):
        key, value = assignment.split("=")
        current = getattr(model, key)
        changed[key] = value.lower() == "true" if isinstance(current, bool) else type(current)(value)
    return changed
