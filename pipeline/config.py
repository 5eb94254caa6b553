"""Typed, validated view of params.yaml. No other module parses YAML.

Every user mistake (unknown dataset or variant, missing key, wrong type, unknown option) raises ConfigError with
one message naming the key and what is valid; stage entry points turn it into a clean exit (see pipeline.cli).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"

SYNTHETIC_KINDS = ("synthetic",)
REAL_KINDS = ("ped2", "avenue", "shanghaitech")
ANOMALY_TYPES = ("spatial", "temporal", "spatio_temporal")


class ConfigError(UserError, ValueError):
    """A problem in params.yaml that the user fixes by editing it."""


@dataclass(frozen=True)
class Profile:
    frame_size: int
    channels: int
    width: float
    epochs: int
    batch_size: int
    lr: float
    max_train_clips: int
    num_workers: int

    def validate(self, key: str) -> None:
        _check(self.frame_size >= 8 and self.frame_size % 8 == 0, f"{key}.frame_size",
               f"must be a multiple of 8 and at least 8, got {self.frame_size}")
        _check(self.channels in (1, 3), f"{key}.channels", f"must be 1 (grey) or 3 (BGR colour), got {self.channels}")
        _check(self.width > 0, f"{key}.width", f"must be positive, got {self.width}")
        _check(self.epochs >= 1, f"{key}.epochs", f"must be at least 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"{key}.batch_size", f"must be at least 1, got {self.batch_size}")
        _check(self.lr > 0, f"{key}.lr", f"must be positive, got {self.lr}")
        _check(self.max_train_clips >= 0, f"{key}.max_train_clips", "must be 0 (all clips) or a positive count")
        _check(self.num_workers >= 0, f"{key}.num_workers", "must be 0 or more")


@dataclass(frozen=True)
class SyntheticGenerator:
    render_size: int
    train_videos: int
    test_videos: int
    frames_per_video: int
    objects: tuple[int, int]
    circle_radius: float
    square_equal_area: bool
    square_side: float
    normal_speed: float
    anomaly_speed: float
    event_length: tuple[int, int]
    event_gap: tuple[int, int]
    anomaly_types: tuple[str, ...]
    transform_existing: bool
    scenes: int
    noise_std: float

    def validate(self, key: str) -> None:
        for name in ("objects", "event_length", "event_gap"):
            lo, hi = getattr(self, name)
            _check(0 <= lo <= hi, f"{key}.{name}", f"must be [min, max] with 0 <= min <= max, got {[lo, hi]}")
        _check(self.objects[0] >= 1, f"{key}.objects", "needs at least one object per video")
        _check(self.event_length[0] >= 1, f"{key}.event_length", "events last at least one frame")
        for t in self.anomaly_types:
            _check(t in ANOMALY_TYPES, f"{key}.anomaly_types", f"unknown type {t!r}; valid: {list(ANOMALY_TYPES)}")
        _check(self.render_size >= 16, f"{key}.render_size", "must be at least 16")
        _check(self.frames_per_video >= 16, f"{key}.frames_per_video", "must be at least 16 (MemAE clip length)")
        _check(self.scenes >= 1, f"{key}.scenes", "must be at least 1")
        _check(self.circle_radius > 0 and self.square_side > 0, key, "shape sizes must be positive")

    @property
    def square_size(self) -> float:
        """Side of the square; by default the side whose area equals the circle's (r * sqrt(pi))."""
        import math

        return self.circle_radius * math.sqrt(math.pi) if self.square_equal_area else self.square_side


@dataclass(frozen=True)
class Archive:
    """One downloadable file of a real dataset."""

    name: str                   # file name under data/raw/<dataset>/
    urls: tuple[str, ...]       # tried in order (mirrors allowed)
    sha256: str
    local_path: str | None = None   # an archive the user already has; verified, never downloaded


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: str
    profile_name: str
    profile: Profile
    seed: int = 0
    generator: SyntheticGenerator | None = None
    format: str = "raw"                                  # raw | preextracted (real datasets)
    sources: Mapping[str, tuple[Archive, ...]] = field(default_factory=dict)
    extract_workers: int = 2

    @property
    def is_synthetic(self) -> bool:
        return self.kind in SYNTHETIC_KINDS


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    task: str
    input_frames: int
    memory: str
    skips: bool
    decoder: str
    grayscale: bool
    memory_items: int
    compactness_weight: float
    separateness_weight: float
    uniform_weight: float
    update_norm: str
    alpha: float
    test_threshold: float
    noise: str
    noise_amount: float
    noise_rc2020_scaling: bool
    entropy_weight: float
    shrink_threshold: float
    addressing: str
    lr: float | None

    CHOICES: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "family": ("mnad", "memae", "copy_last"),
        "task": ("predict", "reconstruct"),
        "memory": ("none", "mnad", "memae"),
        "decoder": ("paper", "rc2020"),
        "update_norm": ("official", "paper"),
        "noise": ("none", "salt_pepper"),
        "addressing": ("dot", "cosine"),
    }

    def validate(self, key: str) -> None:
        for option, valid in self.CHOICES.items():
            value = getattr(self, option)
            _check(value in valid, f"{key}.{option}", f"unknown value {value!r}; valid: {list(valid)}")
        _check(self.input_frames >= 1, f"{key}.input_frames", "must be at least 1")
        _check(0.0 <= self.noise_amount < 1.0, f"{key}.noise_amount", "must be a fraction in [0, 1)")
        _check(0.0 <= self.alpha <= 1.0, f"{key}.alpha", "must be in [0, 1]")
        if self.family == "memae":
            _check(self.memory in ("memae", "none"), f"{key}.memory", "a memae variant takes memory memae or none")
        if self.family == "mnad":
            _check(self.memory in ("mnad", "none"), f"{key}.memory", "an mnad variant takes memory mnad or none")
        if self.family == "copy_last":
            _check(self.task == "predict" and self.input_frames >= 1, f"{key}.task", "copy_last only predicts")

    @property
    def has_memory(self) -> bool:
        return self.memory != "none"

    @property
    def trainable(self) -> bool:
        return self.family != "copy_last"

    @property
    def window(self) -> int:
        """Frames one sample spans on disk: inputs plus the predicted target."""
        return self.input_frames + (1 if self.task == "predict" and self.family != "memae" else 0)

    @property
    def scored_offset(self) -> int:
        """Index within the window of the frame whose label the sample scores.

        Prediction scores its target (so the first `input_frames` frames of a video are never scored, as MNAD);
        MemAE scores the clip's centre frame (16-frame clips skip 8 frames at the start and 7 at the end);
        single-frame reconstruction scores the frame itself.
        """
        if self.family == "memae":
            return self.input_frames // 2
        return self.window - 1


@dataclass(frozen=True)
class Study:
    datasets: tuple[str, ...]
    variants: tuple[str, ...]
    collapse_datasets: tuple[str, ...]
    collapse_variants: tuple[str, ...]
    seeds: tuple[int, ...]

    @property
    def all_datasets(self) -> tuple[str, ...]:
        """Every dataset of the study: prepared, evaluated with copy-last, analysed."""
        return self.datasets + tuple(d for d in self.collapse_datasets if d not in self.datasets)

    def variants_for(self, dataset: str) -> tuple[str, ...]:
        """The trained variants of one dataset (all of them, or the collapse study's)."""
        if dataset in self.datasets:
            return self.variants
        return self.collapse_variants if dataset in self.collapse_datasets else ()

    @property
    def all_variants(self) -> tuple[str, ...]:
        return self.variants + tuple(v for v in self.collapse_variants if v not in self.variants)


@dataclass(frozen=True)
class Evaluate:
    batch_size: int
    nan_policy: str
    test_time_update: str


@dataclass(frozen=True)
class Analysis:
    tsne_queries: int
    tsne_perplexity: float
    collapse_share: float
    usage_test_windows: int
    usage_train_windows: int
    replacement_variants: tuple[str, ...]
    replacement_windows: int
    replacement_unchanged_psnr: float
    replacement_examples: int
    timeline_videos: int
    bootstrap_samples: int
    bootstrap_seed: int

    def validate(self, key: str) -> None:
        _check(self.tsne_queries >= 10, f"{key}.tsne_queries", f"must be at least 10, got {self.tsne_queries}")
        _check(self.tsne_perplexity > 0, f"{key}.tsne_perplexity", "must be positive")
        _check(0.0 < self.collapse_share <= 1.0, f"{key}.collapse_share", "must be a share in (0, 1]")
        for name in ("usage_test_windows", "usage_train_windows", "replacement_windows"):
            _check(getattr(self, name) >= 0, f"{key}.{name}", f"must be 0 (all windows) or more, got {getattr(self, name)}")
        _check(self.replacement_examples >= 1 and self.timeline_videos >= 1, key,
               "replacement_examples and timeline_videos must be at least 1")
        _check(self.bootstrap_samples >= 100, f"{key}.bootstrap_samples",
               f"must be at least 100 for a 95% interval, got {self.bootstrap_samples}")


@dataclass(frozen=True)
class Params:
    study: Study
    profiles: Mapping[str, Profile]
    datasets: Mapping[str, Dataset]
    variants: Mapping[str, Variant]
    evaluate: Evaluate
    analysis: Analysis
    raw: Mapping[str, Any] = field(repr=False, default_factory=dict)

    def dataset(self, name: str) -> Dataset:
        if name not in self.datasets:
            raise ConfigError(f"unknown dataset {name!r}; valid: {sorted(self.datasets)} (datasets in params.yaml)")
        return self.datasets[name]

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            raise ConfigError(f"unknown variant {name!r}; valid: {sorted(self.variants)} (variants in params.yaml)")
        return self.variants[name]


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"params.yaml: {key}: {message}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting YAML lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"params.yaml: {key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"params.yaml: {key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"params.yaml: {key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"params.yaml: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"params.yaml: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"params.yaml: {key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not in params.yaml


def _build(cls: type, data: Any, key: str, skip: tuple[str, ...] = (), extra: Mapping[str, Any] | None = None):
    """Build dataclass `cls` from mapping `data`: every field required, no unknown keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"params.yaml: {key}: expected a mapping of options, got {data!r}")
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in skip and f.name != "raw"]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"params.yaml: {key}: unknown option {unknown[0]!r}; valid options: {fields}")
    kwargs = dict(extra or {})
    for name in fields:
        if name in kwargs:
            continue
        if name not in data and name in defaults:
            kwargs[name] = defaults[name]
            continue
        if name not in data:
            raise ConfigError(f"params.yaml: {key}.{name}: missing (expected {_type_name(hints[name])})")
        kwargs[name] = _coerce(data[name], hints[name], f"{key}.{name}")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(key)
    return obj


def _section(raw: Mapping[str, Any], name: str) -> Any:
    if name not in raw:
        raise ConfigError(f"params.yaml: {name}: missing top-level section")
    return raw[name]


def _build_dataset(name: str, data: Any, profiles: Mapping[str, Profile]) -> Dataset:
    key = f"datasets.{name}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"params.yaml: {key}: expected a mapping of options, got {data!r}")
    valid_kinds = SYNTHETIC_KINDS + REAL_KINDS
    kind = data.get("kind")
    _check(kind in valid_kinds, f"{key}.kind", f"unknown kind {kind!r}; valid: {list(valid_kinds)}")
    profile_name = data.get("profile")
    _check(profile_name in profiles, f"{key}.profile",
           f"unknown profile {profile_name!r}; valid: {sorted(profiles)} (profiles in params.yaml)")
    allowed = {"kind", "profile", "seed"} | ({"generator"} if kind in SYNTHETIC_KINDS
                                             else {"format", "sources", "extract_workers"})
    unknown = sorted(set(data) - allowed)
    _check(not unknown, key, f"unknown option {unknown[0] if unknown else ''!r}; valid options: {sorted(allowed)}")
    seed = _coerce(data.get("seed", 0), int, f"{key}.seed")
    if kind in SYNTHETIC_KINDS:
        _check("generator" in data, f"{key}.generator", "missing (the moving-shapes generator options)")
        generator = _build(SyntheticGenerator, data["generator"], f"{key}.generator")
        return Dataset(name, kind, profile_name, profiles[profile_name], seed, generator=generator)
    fmt = _coerce(data.get("format", "raw"), str, f"{key}.format")
    sources_raw = data.get("sources")
    _check(isinstance(sources_raw, Mapping) and bool(sources_raw), f"{key}.sources",
           "missing: a mapping from format (raw, preextracted) to a list of archives")
    _check(fmt in sources_raw, f"{key}.format", f"no sources listed for format {fmt!r}; listed: {sorted(sources_raw)}")
    sources = {}
    for src_format, archives in sources_raw.items():
        _check(src_format in ("raw", "preextracted"), f"{key}.sources.{src_format}", "valid formats: raw, preextracted")
        _check(isinstance(archives, list) and bool(archives), f"{key}.sources.{src_format}", "expected a list of archives")
        sources[src_format] = tuple(_build(Archive, a, f"{key}.sources.{src_format}[{i}]")
                                    for i, a in enumerate(archives))
    workers = _coerce(data.get("extract_workers", 2), int, f"{key}.extract_workers")
    return Dataset(name, kind, profile_name, profiles[profile_name], seed, format=fmt, sources=sources,
                   extract_workers=workers)


def parse_params(raw: Mapping[str, Any]) -> Params:
    if not isinstance(raw, Mapping):
        raise ConfigError("params.yaml: expected a mapping of sections at the top level")
    profiles_raw = _section(raw, "profiles")
    _check(isinstance(profiles_raw, Mapping), "profiles", "expected a mapping of profile name to options")
    profiles = {name: _build(Profile, p, f"profiles.{name}") for name, p in profiles_raw.items()}

    datasets_raw = _section(raw, "datasets")
    _check(isinstance(datasets_raw, Mapping), "datasets", "expected a mapping of dataset name to options")
    datasets = {name: _build_dataset(name, d, profiles) for name, d in datasets_raw.items()}

    defaults = _section(raw, "variant_defaults")
    variants_raw = _section(raw, "variants")
    _check(isinstance(defaults, Mapping), "variant_defaults", "expected a mapping of options")
    _check(isinstance(variants_raw, Mapping), "variants", "expected a mapping of variant name to options")
    variant_fields = [f.name for f in dataclasses.fields(Variant) if f.name != "name"]
    unknown = sorted(set(defaults) - set(variant_fields))
    _check(not unknown, "variant_defaults", f"unknown option {unknown[0] if unknown else ''!r}; valid: {variant_fields}")
    variants = {}
    for name, overrides in variants_raw.items():
        overrides = overrides or {}
        _check(isinstance(overrides, Mapping), f"variants.{name}", "expected a mapping of options")
        bad = sorted(set(overrides) - set(variant_fields))
        _check(not bad, f"variants.{name}", f"unknown option {bad[0] if bad else ''!r}; valid options: {variant_fields}")
        variants[name] = _build(Variant, {**defaults, **overrides}, f"variants.{name}", skip=("name",),
                                extra={"name": name})

    study = _build(Study, _section(raw, "study"), "study")
    for key in ("datasets", "collapse_datasets"):
        for d in getattr(study, key):
            _check(d in datasets, f"study.{key}", f"unknown dataset {d!r}; valid: {sorted(datasets)}")
    both = sorted(set(study.datasets) & set(study.collapse_datasets))
    _check(not both, "study.collapse_datasets",
           f"{both[0] if both else ''!r} is also in study.datasets; list each dataset in one of the two")
    for key in ("variants", "collapse_variants"):
        for v in getattr(study, key):
            _check(v in variants, f"study.{key}", f"unknown variant {v!r}; valid: {sorted(variants)}")
            _check(variants[v].trainable, f"study.{key}",
                   f"{v!r} has nothing to train; it is evaluated by the evaluate_baseline stage for every dataset")
    _check(len(study.seeds) >= 1, "study.seeds", "list at least one seed")

    evaluate = _build(Evaluate, _section(raw, "evaluate"), "evaluate")
    _check(evaluate.nan_policy in ("safe", "reference"), "evaluate.nan_policy",
           f"unknown value {evaluate.nan_policy!r}; valid: ['safe', 'reference']")
    _check(evaluate.test_time_update in ("both", "with", "without"), "evaluate.test_time_update",
           f"unknown value {evaluate.test_time_update!r}; valid: ['both', 'with', 'without']")
    analysis = _build(Analysis, _section(raw, "analysis"), "analysis")
    for v in analysis.replacement_variants:
        _check(v in variants and variants[v].family == "mnad", "analysis.replacement_variants",
               f"{v!r} is not an MNAD-family variant (the study replaces MNAD's decoder input); valid: "
               f"{sorted(n for n, x in variants.items() if x.family == 'mnad')}")
    return Params(study, profiles, datasets, variants, evaluate, analysis, raw=raw)


def load_params(path: str | Path | None = None) -> Params:
    """Read and validate params.yaml (default: the repository's)."""
    path = Path(path) if path is not None else DEFAULT_PARAMS
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the repository root or pass --params") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw)


def resolved_options(obj: Any) -> dict[str, Any]:
    """Flat dict of a config dataclass, for MLflow params and checkpoint metadata."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = resolved_options(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out
