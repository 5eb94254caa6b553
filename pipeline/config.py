"""Typed, validated view of params.yaml (pydantic models). No other module parses params.yaml.

Every user mistake (unknown dataset or variant, missing key, wrong type, unknown option) raises ConfigError with
one message naming the key path, what is valid and how to fix it; stage entry points turn it into a clean exit
(pipeline.errors.exit_cleanly). Pydantic does the type checking; `_explain` words its first error this project's
way ("params.yaml: datasets.tiny.profile.epochs: missing (expected int)").

Layout of params.yaml: `study` (which runs `dvc repro` makes), `datasets` (per dataset: its `kind`, the `profile`
its frames and training use, and the `source` its frames are made from), `variant_defaults` and `variants` (a
variant is a few options over the defaults), `evaluate` and `analysis`.
"""
from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from pydantic import model_validator

from pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"

SYNTHETIC_KINDS = ("synthetic",)
REAL_KINDS = ("ped2", "avenue", "shanghaitech")
ANOMALY_TYPES = ("spatial", "temporal", "spatio_temporal")


class ConfigError(UserError, ValueError):
    """A problem in params.yaml that the user fixes by editing it."""


class Options(BaseModel):
    """A mapping of options: every field required unless it has a default, no unknown keys, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def rule(test, message: str) -> AfterValidator:
    """A check on one value; `message` is formatted with the value (as a list for a pair) when the check fails."""
    def check(value):
        if not test(value):
            raise ValueError(message.format(value=list(value) if isinstance(value, tuple) else value))
        return value
    return AfterValidator(check)


def at_least(minimum: int, why: str = "") -> AfterValidator:
    return rule(lambda v: v >= minimum, f"must be at least {minimum}{why}, got {{value}}")


Positive = Annotated[StrictFloat, rule(lambda v: v > 0, "must be positive, got {value}")]
Count = Annotated[StrictInt, at_least(1)]
CountOrAll = Annotated[StrictInt, rule(lambda v: v >= 0, "must be 0 (all) or a positive count, got {value}")]
Range = Annotated[tuple[StrictInt, StrictInt],
                  rule(lambda v: 0 <= v[0] <= v[1], "must be [min, max] with 0 <= min <= max, got {value}")]


# ----------------------------------------------------------------------------------------------------------------
# Datasets


class FamilySettings(Options):
    """A method's own training settings on one dataset, over the profile's (e.g. MemAE's paper lr and batch)."""

    width: Positive | None = None
    lr: Positive | None = None
    batch_size: Count | None = None
    epochs: Count | None = None
    max_train_clips: CountOrAll | None = None


class Profile(Options):
    """How one dataset's frames are stored (prepare) and how models are trained on them. `families` gives a model
    family (mnad, memae) its own width, lr, batch size, epochs or clips per epoch on this dataset."""

    frame_size: Annotated[StrictInt, rule(lambda v: v >= 8 and v % 8 == 0,
                                          "must be a multiple of 8 and at least 8, got {value}")]
    channels: Annotated[StrictInt, rule(lambda v: v in (1, 3), "must be 1 (grey) or 3 (BGR colour), got {value}")]
    width: Positive
    epochs: Count
    batch_size: Count
    lr: Positive
    max_train_clips: CountOrAll     # 0 = every clip of the training set each epoch
    num_workers: Annotated[StrictInt, rule(lambda v: v >= 0, "must be 0 or more, got {value}")]  # speed only
    log_steps: Count                # one train_log.csv row per this many steps: logging only
    # Training windows held out of training and encoded at every logged row, to follow the memory's usage over
    # training (usage_* columns of train_log.csv); 0 = none. Holding them out changes the trained weights.
    monitor_windows: Annotated[StrictInt, rule(lambda v: v >= 0, "must be 0 or more, got {value}")] = 0
    # The test-time update threshold: each variant's test_threshold (the papers' values), or a quantile of the
    # training frames' point scores under the trained model (evaluate.calibration_quantile): scoring only.
    update_threshold: Literal["paper", "calibrated"]
    # bf16: the forward pass and losses under bf16 autocast (CUDA tensor cores, CPUs with AMX or AVX-512 bf16);
    # faster, but the numbers differ from fp32's beyond float tolerance, so the papers' reproduction keeps fp32
    precision: Literal["fp32", "bf16"] = "fp32"
    # torch's CPU threads for each run (0 = torch's default, one per core); kept in the training fingerprint,
    # since a thread count can change the order of float sums. Small networks gain little from a second core.
    threads: Annotated[StrictInt, rule(lambda v: v >= 0, "must be 0 (one per core) or more, got {value}")] = 0
    # How many of a stage's seeds run side by side, each in its own process with `threads` threads: speed only
    # (a run's numbers do not depend on what runs beside it).
    concurrent_runs: Count = 1
    families: dict[Literal["mnad", "memae"], FamilySettings] = {}

    @model_validator(mode="after")
    def _threads_per_run(self):
        if self.concurrent_runs > 1 and self.threads == 0:
            raise ValueError(f"concurrent_runs {self.concurrent_runs} needs threads set (e.g. 1): runs side by "
                             f"side that each take every core slow each other down")
        return self

    def for_family(self, family: str) -> "Profile":
        """This profile with `family`'s own settings applied (the one every run of that family trains with)."""
        own = self.families.get(family)
        changed = {k: v for k, v in own.model_dump().items() if v is not None} if own else {}
        return self.model_copy(update={**changed, "families": {}})


class SyntheticSource(Options):
    """The moving-shapes generator (pipeline.synthetic)."""

    seed: StrictInt = 0
    render_size: Annotated[StrictInt, at_least(16)]
    train_videos: StrictInt
    test_videos: StrictInt
    frames_per_video: Annotated[StrictInt, at_least(16, " (MemAE clip length)")]
    objects: Annotated[Range, rule(lambda v: v[0] >= 1, "needs at least one object per video")]
    circle_radius: Positive
    square_equal_area: StrictBool
    square_side: Positive
    normal_speed: StrictFloat
    anomaly_speed: StrictFloat
    event_length: Annotated[Range, rule(lambda v: v[0] >= 1, "events last at least one frame")]
    event_gap: Range
    anomaly_types: tuple[Literal["spatial", "temporal", "spatio_temporal"], ...]
    transform_existing: StrictBool
    scenes: Count
    noise_std: StrictFloat

    @property
    def square_size(self) -> float:
        """Side of the square; by default the side whose area equals the circle's (r * sqrt(pi))."""
        return self.circle_radius * math.sqrt(math.pi) if self.square_equal_area else self.square_side


class Archive(Options):
    """One downloadable file of a real dataset."""

    name: StrictStr                     # file name under data/raw/<dataset>/
    urls: tuple[StrictStr, ...]         # tried in order (mirrors allowed)
    sha256: StrictStr
    local_path: StrictStr | None = None  # an archive the user already has; verified, never downloaded


class ArchiveSource(Options):
    """Where a real dataset's archives come from and how they are extracted (pipeline.datasets)."""

    format: Literal["raw", "preextracted"] = "raw"
    extract_workers: Annotated[StrictInt, at_least(1, " (1 = no extra processes)")] = 2   # speed only
    archives: dict[Literal["raw", "preextracted"],
                   Annotated[tuple[Archive, ...], rule(len, "expected a list of archives, got {value}")]]

    @model_validator(mode="after")
    def _format_listed(self):
        if self.format not in self.archives:
            raise ValueError(f"no archives listed for format {self.format!r}; listed: {sorted(self.archives)}")
        return self


class Dataset(Options):
    name: StrictStr
    kind: Literal["synthetic", "ped2", "avenue", "shanghaitech"]
    profile: Profile
    source: Union[SyntheticSource, ArchiveSource]

    @property
    def is_synthetic(self) -> bool:
        return self.kind in SYNTHETIC_KINDS

    def training_profile(self, variant: "Variant") -> Profile:
        """The settings `variant` trains with on this dataset: the profile with its family's own settings."""
        return self.profile.for_family(variant.family)


# ----------------------------------------------------------------------------------------------------------------
# Variants


# The options that determine a variant's trained weights; the others (alpha, test_threshold) only score.
TRAINING_OPTIONS = ("family", "task", "input_frames", "memory", "skips", "decoder", "grayscale", "memory_items",
                    "compactness_weight", "separateness_weight", "uniform_weight", "update_norm", "noise",
                    "noise_amount", "noise_rc2020_scaling", "entropy_weight", "shrink_threshold", "addressing")


class Variant(Options):
    name: StrictStr
    family: Literal["mnad", "memae", "copy_last"]
    task: Literal["predict", "reconstruct"]
    input_frames: Count
    memory: Literal["none", "mnad", "memae"]
    skips: StrictBool
    decoder: Literal["paper", "rc2020"]
    grayscale: StrictBool
    memory_items: StrictInt
    compactness_weight: StrictFloat
    separateness_weight: StrictFloat
    uniform_weight: StrictFloat
    update_norm: Literal["official", "paper"]
    alpha: Annotated[StrictFloat, rule(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")]
    test_threshold: StrictFloat
    noise: Literal["none", "salt_pepper"]
    noise_amount: Annotated[StrictFloat, rule(lambda v: 0.0 <= v < 1.0, "must be a fraction in [0, 1)")]
    noise_rc2020_scaling: StrictBool
    entropy_weight: StrictFloat
    shrink_threshold: StrictFloat
    addressing: Literal["dot", "cosine"]

    @model_validator(mode="after")
    def _family(self):
        if self.family == "memae" and self.memory not in ("memae", "none"):
            raise ValueError("memory: a memae variant takes memory memae or none")
        if self.family == "mnad" and self.memory not in ("mnad", "none"):
            raise ValueError("memory: an mnad variant takes memory mnad or none")
        if self.family == "copy_last" and self.task != "predict":
            raise ValueError("task: copy_last only predicts")
        return self

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

    def training_options(self) -> dict[str, Any]:
        """The options that determine the trained weights (alpha and the update threshold only score)."""
        return {name: getattr(self, name) for name in TRAINING_OPTIONS}


# ----------------------------------------------------------------------------------------------------------------
# Study, evaluation, analysis


class Study(Options):
    """Which runs `dvc repro` makes: every variant on every dataset with every seed, and on the complex datasets
    (the ones that probe memory collapse, claim C5) only the complex_variants."""

    datasets: tuple[StrictStr, ...]
    variants: tuple[StrictStr, ...]
    complex_datasets: tuple[StrictStr, ...]
    complex_variants: tuple[StrictStr, ...]
    seeds: tuple[StrictInt, ...]

    @property
    def all_datasets(self) -> tuple[str, ...]:
        """Every dataset of the study: prepared, evaluated with copy-last, analysed."""
        return self.datasets + tuple(d for d in self.complex_datasets if d not in self.datasets)

    def variants_for(self, dataset: str) -> tuple[str, ...]:
        """The trained variants of one dataset (all of them, or the complex datasets' subset)."""
        if dataset in self.datasets:
            return self.variants
        return self.complex_variants if dataset in self.complex_datasets else ()

    @property
    def all_variants(self) -> tuple[str, ...]:
        return self.variants + tuple(v for v in self.complex_variants if v not in self.variants)


class CollapseSetting(Options):
    dataset: StrictStr
    variant: StrictStr
    factor: StrictStr = ""   # what it changes from the base setting, for the report


class Collapse(Options):
    """The collapse study: settings (a dataset and a variant each), every one trained with the first `seeds` of
    study.seeds; `datasets` lists the datasets the settings use (DVC prepares them)."""

    seeds: Count
    datasets: tuple[StrictStr, ...]
    settings: dict[StrictStr, CollapseSetting]


class Evaluate(Options):
    batch_size: Count
    nan_policy: Literal["safe", "reference"]
    test_time_update: Literal["both", "with", "without"]
    # A calibrated update threshold is this quantile of the point scores of a seeded sample of training windows
    # (that many windows; the trivial output's mean frame averages as many training frames).
    calibration_quantile: Annotated[StrictFloat, rule(lambda v: 0.0 < v < 1.0, "must be in (0, 1), got {value}")]
    calibration_windows: Count


class Gate(Options):
    """The learning gate (pipeline.gate): a run decides claims only when its loss has plateaued and it beats the
    trivial output for its task on the normal test frames."""

    plateau_window: Annotated[StrictFloat, rule(lambda v: 0.0 < v <= 0.5, "must be in (0, 0.5], got {value}")]
    plateau_tolerance: Positive
    floor_margin_db: StrictFloat


class Analysis(Options):
    tsne_queries: Annotated[StrictInt, at_least(10)]
    tsne_perplexity: Positive
    collapse_share: Annotated[StrictFloat, rule(lambda v: 0.0 < v <= 1.0, "must be a share in (0, 1]")]
    position_coded_nmi: Annotated[StrictFloat, rule(lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")]
    narrowing_slope: Annotated[StrictFloat, rule(lambda v: v >= 0, "must be 0 or more (nats per decade), got {value}")]
    usage_test_windows: CountOrAll
    usage_train_windows: CountOrAll
    replacement_variants: tuple[StrictStr, ...]
    replacement_windows: CountOrAll
    replacement_unchanged_psnr: StrictFloat
    replacement_scale_to_norm: StrictBool   # ones and random fills rescaled to the replaced features' own norm
    replacement_examples: Count
    timeline_videos: Count
    bootstrap_samples: Annotated[StrictInt, rule(lambda v: v >= 100,
                                                 "must be at least 100 for a 95% interval, got {value}")]
    bootstrap_seed: StrictInt
    # Claims that state a size: C8's "about +4 points" is this band of the (denoising - plain reconstruction) AUC
    # difference; C7's "only prediction" holds when reconstruction's temporal AUC is within this of chance (0.5).
    c8_gain_band: Annotated[tuple[StrictFloat, StrictFloat],
                            rule(lambda v: v[0] < v[1], "must be [low, high] with low < high, got {value}")]
    chance_margin: Annotated[StrictFloat, rule(lambda v: 0 < v < 0.5, "must be in (0, 0.5), got {value}")]


class Launcher(Options):
    """How the run stages start a training: in the stage's own process (`local`), or through torchrun as `nproc`
    processes on each of `nnodes` hosts (pipeline.distributed). More than one host needs `rdzv_endpoint`, the
    host:port of torchrun's c10d rendezvous, and the same torchrun command started on every other host."""

    kind: Literal["local", "torchrun"] = "local"
    nproc: Count = 1
    nnodes: Count = 1
    rdzv_endpoint: StrictStr = ""

    @model_validator(mode="after")
    def _endpoint_for_hosts(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"rdzv_endpoint: nnodes {self.nnodes} needs the host:port of the c10d rendezvous "
                             f"(a host all of them reach, e.g. the first's address and port 29400)")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes if self.kind == "torchrun" else 1


class Params:
    """The whole of params.yaml, validated."""

    def __init__(self, study: Study, collapse: Collapse, datasets: Mapping[str, Dataset],
                 variants: Mapping[str, Variant], evaluate: Evaluate, gate: Gate, analysis: Analysis,
                 launcher: Launcher = Launcher()):
        self.study, self.collapse, self.datasets, self.variants = study, collapse, dict(datasets), dict(variants)
        self.evaluate, self.gate, self.analysis, self.launcher = evaluate, gate, analysis, launcher

    def dataset(self, name: str) -> Dataset:
        if name not in self.datasets:
            raise ConfigError(f"unknown dataset {name!r}; valid: {sorted(self.datasets)} (datasets in params.yaml)")
        return self.datasets[name]

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            raise ConfigError(f"unknown variant {name!r}; valid: {sorted(self.variants)} (variants in params.yaml)")
        return self.variants[name]

    @property
    def collapse_seeds(self) -> tuple[int, ...]:
        """The seeds every setting of the collapse study trains: the first collapse.seeds of study.seeds."""
        return self.study.seeds[:self.collapse.seeds]


# ----------------------------------------------------------------------------------------------------------------
# Loading, and errors worded for the user


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"params.yaml: {key}: {message}")


def _type_name(annotation: Any) -> str:
    """int, float, bool, str, list, a mapping of options... as a user reads params.yaml."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin is tuple:
        return "list"
    if origin is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return "mapping"
    if origin is Literal:
        return "one of " + str(list(typing.get_args(annotation)))
    return getattr(annotation, "__name__", str(annotation))


def _annotation(model: type[BaseModel], loc: tuple) -> Any:
    """The annotation at `loc` inside `model` (None where the path leaves the models)."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (Union, types.UnionType):
            return None
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
        elif typing.get_origin(current) is tuple:
            args = typing.get_args(current)
            current = args[0] if len(args) == 2 and args[1] is Ellipsis else args[part] if isinstance(part, int) \
                and part < len(args) else None
        else:
            return None
    return current


def _explain(error: ValidationError, model: type[BaseModel], key: str) -> ConfigError:
    """The first of pydantic's errors, worded as the key path and what to fix."""
    first = error.errors()[0]
    loc, kind, value = tuple(first["loc"]), first["type"], first.get("input")
    path = ".".join([key, *(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc)]).replace(".[", "[")
    parent = ".".join([key, *(str(p) for p in loc[:-1])]) if loc else key
    if kind == "missing" and loc and isinstance(loc[-1], int):   # a fixed-length list that is too short
        expected = len(typing.get_args(_annotation(model, loc[:-1])) or ())
        return ConfigError(f"params.yaml: {parent}: expected a list of {expected} values, got {value!r}")
    if kind == "too_long":
        return ConfigError(f"params.yaml: {path}: expected a list of {first['ctx'].get('max_length')} values, "
                           f"got {value!r}")
    if kind == "missing":
        return ConfigError(f"params.yaml: {path}: missing (expected {_type_name(_annotation(model, loc))})")
    if kind == "extra_forbidden":
        owner = _annotation(model, loc[:-1]) if len(loc) > 1 else model
        valid = list(owner.model_fields) if isinstance(owner, type) and issubclass(owner, BaseModel) else []
        valid = [name for name in valid if name != "name"]
        return ConfigError(f"params.yaml: {parent}: unknown option {loc[-1]!r}; valid options: {valid}")
    if kind == "literal_error":
        choices = list(typing.get_args(_annotation(model, loc)) or [])
        if not choices:
            choices = [c.strip(" '") for c in first["ctx"]["expected"].replace(" or ", ",").split(",")]
        return ConfigError(f"params.yaml: {path}: unknown value {value!r}; valid: {choices}")
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return ConfigError(f"params.yaml: {path}: expected a mapping of options, got {value!r}")
    if kind in ("tuple_type", "list_type"):
        return ConfigError(f"params.yaml: {path}: expected a list, got {value!r}")
    if kind in ("int_type", "int_from_float"):
        return ConfigError(f"params.yaml: {path}: expected an integer, got {value!r}")
    if kind == "bool_type":
        return ConfigError(f"params.yaml: {path}: expected true or false, got {value!r}")
    if kind == "float_type":
        return ConfigError(f"params.yaml: {path}: expected a number, got {value!r}")
    if kind == "string_type":
        return ConfigError(f"params.yaml: {path}: expected a string, got {value!r}")
    if kind == "value_error":
        message = str(first["ctx"]["error"])
        if ": " in message and message.split(": ", 1)[0].isidentifier():   # "memory: ..." names its own option
            option, message = message.split(": ", 1)
            return ConfigError(f"params.yaml: {'.'.join([key, *map(str, loc), option])}: {message}")
        return ConfigError(f"params.yaml: {path}: {message}")
    return ConfigError(f"params.yaml: {path}: {first['msg']} (got {value!r})")


def _validate(model: type[BaseModel], data: Any, key: str, **extra: Any) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"params.yaml: {key}: expected a mapping of options, got {data!r}")
    try:
        return model.model_validate({**data, **extra})
    except ValidationError as error:
        raise _explain(error, model, key) from None


def _section(raw: Mapping[str, Any], name: str) -> Any:
    if name not in raw:
        raise ConfigError(f"params.yaml: {name}: missing top-level section")
    return raw[name]


def _dataset(name: str, data: Any) -> Dataset:
    key = f"datasets.{name}"
    _check(isinstance(data, Mapping), key, f"expected a mapping of options, got {data!r}")
    valid_kinds = SYNTHETIC_KINDS + REAL_KINDS
    kind = data.get("kind")
    _check(kind in valid_kinds, f"{key}.kind", f"unknown kind {kind!r}; valid: {list(valid_kinds)}")
    unknown = sorted(set(data) - {"kind", "profile", "source"})
    _check(not unknown, key, f"unknown option {unknown[0] if unknown else ''!r}; "
                             f"valid options: ['kind', 'profile', 'source']")
    for part in ("profile", "source"):
        _check(part in data, f"{key}.{part}", "missing (a mapping of options)")
    profile = _validate(Profile, data["profile"], f"{key}.profile")
    source_model = SyntheticSource if kind in SYNTHETIC_KINDS else ArchiveSource
    source = _validate(source_model, data["source"], f"{key}.source")
    return Dataset(name=name, kind=kind, profile=profile, source=source)


def _variants(defaults: Any, variants_raw: Any) -> dict[str, Variant]:
    _check(isinstance(defaults, Mapping), "variant_defaults", "expected a mapping of options")
    _check(isinstance(variants_raw, Mapping), "variants", "expected a mapping of variant name to options")
    fields = [name for name in Variant.model_fields if name != "name"]
    unknown = sorted(set(defaults) - set(fields))
    _check(not unknown, "variant_defaults", f"unknown option {unknown[0] if unknown else ''!r}; valid: {fields}")
    variants = {}
    for name, overrides in variants_raw.items():
        overrides = overrides or {}
        _check(isinstance(overrides, Mapping), f"variants.{name}", "expected a mapping of options")
        bad = sorted(set(overrides) - set(fields))
        _check(not bad, f"variants.{name}", f"unknown option {bad[0] if bad else ''!r}; valid options: {fields}")
        try:
            variants[name] = Variant.model_validate({**defaults, **overrides, "name": name})
        except ValidationError as error:
            # A bad value is named where it is written: the variant's own line, or the default it inherits.
            option = error.errors()[0]["loc"][:1]
            where = f"variants.{name}" if not option or option[0] in overrides else "variant_defaults"
            raise _explain(error, Variant, where) from None
    return variants


def parse_params(raw: Mapping[str, Any]) -> Params:
    if not isinstance(raw, Mapping):
        raise ConfigError("params.yaml: expected a mapping of sections at the top level")
    datasets_raw = _section(raw, "datasets")
    _check(isinstance(datasets_raw, Mapping), "datasets", "expected a mapping of dataset name to options")
    datasets = {name: _dataset(name, data) for name, data in datasets_raw.items()}
    variants = _variants(_section(raw, "variant_defaults"), _section(raw, "variants"))

    study = _validate(Study, _section(raw, "study"), "study")
    for key in ("datasets", "complex_datasets"):
        for d in getattr(study, key):
            _check(d in datasets, f"study.{key}", f"unknown dataset {d!r}; valid: {sorted(datasets)}")
    both = sorted(set(study.datasets) & set(study.complex_datasets))
    _check(not both, "study.complex_datasets",
           f"{both[0] if both else ''!r} is also in study.datasets; list each dataset in one of the two")
    for key in ("variants", "complex_variants"):
        for v in getattr(study, key):
            _check(v in variants, f"study.{key}", f"unknown variant {v!r}; valid: {sorted(variants)}")
            _check(variants[v].trainable, f"study.{key}",
                   f"{v!r} has nothing to train; it is evaluated by the baseline stage for every dataset")
    _check(len(study.seeds) >= 1, "study.seeds", "list at least one seed")

    collapse = _validate(Collapse, _section(raw, "collapse"), "collapse")
    for d in collapse.datasets:
        _check(d in datasets, "collapse.datasets", f"unknown dataset {d!r}; valid: {sorted(datasets)}")
        _check(d not in study.all_datasets, "collapse.datasets", f"{d!r} is also a dataset of the study; give the "
                                                                 "collapse study datasets of its own")
    pairs = set()
    for name, setting in collapse.settings.items():
        key = f"collapse.settings.{name}"
        _check(setting.dataset in collapse.datasets, f"{key}.dataset",
               f"{setting.dataset!r} is not in collapse.datasets {list(collapse.datasets)}; add it there")
        _check(setting.variant in variants and variants[setting.variant].memory == "mnad", f"{key}.variant",
               f"{setting.variant!r} is not a variant with an MNAD memory; valid: "
               f"{sorted(n for n, v in variants.items() if v.memory == 'mnad')}")
        _check((setting.dataset, setting.variant) not in pairs, key,
               f"another setting already trains {setting.variant} on {setting.dataset}")
        pairs.add((setting.dataset, setting.variant))
    # without settings (the quick look leaves the study out) no seed of it is trained, whatever collapse.seeds says
    _check(not collapse.settings or collapse.seeds <= len(study.seeds), "collapse.seeds",
           f"{collapse.seeds} seeds asked, study.seeds lists {len(study.seeds)}; lower collapse.seeds to at most "
           f"{len(study.seeds)} (with one seed: `dvc exp run -S 'study.seeds=[0]' -S collapse.seeds=1`), leave the "
           f"collapse study out (`-S '~collapse.settings' -S '+collapse.settings={{}}' -S 'collapse.datasets=[]'`) or "
           f"list more seeds")
    evaluate = _validate(Evaluate, _section(raw, "evaluate"), "evaluate")
    gate = _validate(Gate, _section(raw, "gate"), "gate")
    analysis = _validate(Analysis, _section(raw, "analysis"), "analysis")
    for v in analysis.replacement_variants:
        _check(v in variants and variants[v].family == "mnad", "analysis.replacement_variants",
               f"{v!r} is not an MNAD-family variant (the study replaces MNAD's decoder input); valid: "
               f"{sorted(n for n, x in variants.items() if x.family == 'mnad')}")
    launcher = _validate(Launcher, raw.get("launcher", {}), "launcher")
    return Params(study, collapse, datasets, variants, evaluate, gate, analysis, launcher)


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


def resolved_options(options: BaseModel) -> dict[str, Any]:
    """The options as plain JSON types (lists, not tuples), for MLflow params and checkpoint metadata."""
    return options.model_dump(mode="json")
