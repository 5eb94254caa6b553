"""params.yaml validation: the real file loads, and each kind of mistake gives its one clear message."""
import copy

import pytest
import yaml

from pipeline.config import DEFAULT_PARAMS, ConfigError, load_params, parse_params


@pytest.fixture()
def raw():
    return yaml.safe_load(DEFAULT_PARAMS.read_text())


def test_repository_params_load_with_the_design_variants():
    params = load_params()
    design = {"ae-recon", "ae-pred", "mnad-recon", "mnad-pred", "mnad-pred-nosep", "mnad-pred-uniform",
              "mnad-recon-skip-sp05", "mnad-recon-skip-sp25", "mnad-recon-skip-sp40", "memae", "copy-last"}
    assert design <= set(params.variants)
    pred, recon = params.variant("mnad-pred"), params.variant("mnad-recon")
    assert (pred.compactness_weight, pred.alpha, pred.test_threshold, pred.window, pred.scored_offset) == (0.1, 0.6, 0.01, 5, 4)
    assert (recon.compactness_weight, recon.alpha, recon.test_threshold, recon.window, recon.scored_offset) == (0.01, 0.7, 0.015, 1, 0)
    memae = params.variant("memae")
    assert (memae.window, memae.scored_offset, memae.memory_items, memae.grayscale) == (16, 8, 2000, True)
    assert params.variant("mnad-recon-skip-sp25").noise_amount == 0.25
    assert params.variant("mnad-pred-uniform").uniform_weight == 1.0
    assert params.dataset("synthetic").source.square_size == pytest.approx(17.72, abs=0.01)


def test_unknown_dataset_and_variant_name_the_valid_choices():
    params = load_params()
    with pytest.raises(ConfigError, match=r"unknown dataset 'ped3'; valid: \[.*'synthetic'"):
        params.dataset("ped3")
    with pytest.raises(ConfigError, match=r"unknown variant 'mnad'; valid: \[.*'mnad-pred'"):
        params.variant("mnad")


def test_study_naming_an_unknown_variant(raw):
    raw["study"]["variants"] = ["mnad-pred", "mnad-perd"]
    with pytest.raises(ConfigError, match=r"study.variants: unknown variant 'mnad-perd'; valid: \["):
        parse_params(raw)


def test_missing_key_is_named(raw):
    del raw["datasets"]["tiny"]["profile"]["epochs"]
    with pytest.raises(ConfigError, match=r"^params.yaml: datasets.tiny.profile.epochs: missing \(expected int\)$"):
        parse_params(raw)


def test_wrong_type_is_named(raw):
    raw["datasets"]["synthetic"]["profile"]["batch_size"] = "eight"
    with pytest.raises(ConfigError, match=r"datasets.synthetic.profile.batch_size: expected an integer, got 'eight'"):
        parse_params(raw)
    raw = copy.deepcopy(raw)
    raw["datasets"]["synthetic"]["profile"]["batch_size"] = 8
    raw["variants"]["mnad-pred"] = {"skips": "yes"}
    with pytest.raises(ConfigError, match=r"variants.mnad-pred.skips: expected true or false, got 'yes'"):
        parse_params(raw)


def test_unknown_option_and_bad_choice(raw):
    raw["variants"]["mnad-pred"] = {"memroy": "mnad"}
    with pytest.raises(ConfigError, match=r"variants.mnad-pred: unknown option 'memroy'; valid options: \["):
        parse_params(raw)
    raw["variants"]["mnad-pred"] = {"update_norm": "eq5"}
    with pytest.raises(ConfigError, match=r"variants.mnad-pred.update_norm: unknown value 'eq5'; valid: \['official', 'paper'\]"):
        parse_params(raw)


def test_frame_size_must_suit_three_poolings(raw):
    raw["datasets"]["tiny"]["profile"]["frame_size"] = 30
    with pytest.raises(ConfigError, match="datasets.tiny.profile.frame_size: must be a multiple of 8"):
        parse_params(raw)


def test_copy_last_cannot_be_trained(raw):
    raw["study"]["variants"] = ["copy-last"]
    with pytest.raises(ConfigError, match="'copy-last' has nothing to train"):
        parse_params(raw)


def test_one_seed_needs_one_collapse_seed_and_the_error_gives_the_command(raw):
    raw["study"]["seeds"] = [0]
    with pytest.raises(ConfigError, match=r"collapse.seeds: 2 seeds asked, study.seeds lists 1; lower collapse.seeds "
                                          r"to at most 1 \(with one seed: `dvc exp run -S 'study.seeds=\[0\]' -S "
                                          r"collapse.seeds=1`\)"):
        parse_params(raw)
    raw["collapse"]["seeds"] = 1
    params = parse_params(raw)
    assert params.collapse_seeds == (0,) and params.study.seeds == (0,)


def test_one_seed_without_the_collapse_study_needs_no_collapse_seed_option(raw):
    raw["study"]["seeds"] = [0]
    raw["collapse"]["settings"], raw["collapse"]["datasets"] = {}, []   # the quick look leaves the study out
    params = parse_params(raw)
    assert params.collapse.seeds == 2 and params.collapse_seeds == (0,) and not params.collapse.settings


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_stage_exits_cleanly_on_a_config_error(tmp_path, capsys):
    from pipeline.run import main

    assert main(["--dataset", "nope", "--variant", "mnad-pred", "--seed", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown dataset 'nope'") and "Traceback" not in err


def test_params_yaml_reads_the_same_under_dvcs_yaml_parser():
    """DVC reads params.yaml with ruamel's libyaml parser (YAML 1.1), stricter than PyYAML here: an unquoted URL in
    a flow list, for one, is a syntax error there, and every stage would fail to read its params."""
    from dvc.utils.serialize import load_yaml

    assert load_yaml(DEFAULT_PARAMS) == yaml.safe_load(DEFAULT_PARAMS.read_text())


def test_pydantic_errors_are_worded_with_the_key_path_and_the_fix(raw):
    cases = [
        (("datasets", "tiny", "profile"), {"epoch": 2},
         r"^params.yaml: datasets.tiny.profile: unknown option 'epoch'; valid options: \['frame_size', 'channels'"),
        (("datasets", "tiny", "source"), {"objects": [1]},
         r"^params.yaml: datasets.tiny.source.objects: expected a list of 2 values, got \[1\]$"),
        (("datasets", "tiny", "source"), {"objects": [3, 1]},
         r"^params.yaml: datasets.tiny.source.objects: must be \[min, max\] with 0 <= min <= max, got \[3, 1\]$"),
        (("datasets", "tiny", "source"), {"anomaly_types": ["spatial", "sideways"]},
         r"^params.yaml: datasets.tiny.source.anomaly_types\[1\]: unknown value 'sideways'; valid: \['spatial', "),
        (("datasets", "ped2", "source"), {"format": "preextracted"},
         r"^params.yaml: datasets.ped2.source: no archives listed for format 'preextracted'; listed: \['raw'\]$"),
        (("evaluate",), {"nan_policy": "ignore"},
         r"^params.yaml: evaluate.nan_policy: unknown value 'ignore'; valid: \['safe', 'reference'\]$"),
        (("analysis",), {"bootstrap_samples": 10},
         r"^params.yaml: analysis.bootstrap_samples: must be at least 100 for a 95% interval, got 10$"),
    ]
    for path, change, message in cases:
        edited = copy.deepcopy(raw)
        section = edited
        for key in path:
            section = section[key]
        section.update(change)
        with pytest.raises(ConfigError, match=message):
            parse_params(edited)


def test_a_bad_default_is_named_where_it_is_written(raw):
    raw["variant_defaults"]["skips"] = "yes"
    with pytest.raises(ConfigError, match=r"^params.yaml: variant_defaults.skips: expected true or false, got 'yes'$"):
        parse_params(raw)
    raw["variant_defaults"]["skips"] = True
    raw["variants"]["memae"]["memory"] = "mnad"
    with pytest.raises(ConfigError, match=r"^params.yaml: variants.memae.memory: a memae variant takes memory memae"):
        parse_params(raw)


def test_the_training_options_leave_out_what_only_scores():
    variant = load_params().variant("mnad-pred")
    options = variant.training_options()
    assert "alpha" not in options and "test_threshold" not in options and "name" not in options
    assert options["compactness_weight"] == 0.1 and options["skips"] is True


def test_precision_is_fp32_by_default_and_names_its_choices(raw):
    assert all(load_params().dataset(name).profile.precision == "fp32" for name in ("synthetic", "ped2"))
    raw["datasets"]["ped2"]["profile"]["precision"] = "fp16"
    with pytest.raises(ConfigError, match=r"datasets.ped2.profile.precision: unknown value 'fp16'; "
                                          r"valid: \['fp32', 'bf16'\]"):
        parse_params(raw)


def test_params_yaml_shares_no_mapping_through_yaml_anchors():
    """`dvc exp run -S key=value` rewrites params.yaml: a key inside an aliased mapping would change every dataset
    that shares it (or, through a merge key, be lost), so every option is written where it applies."""
    events = list(yaml.parse(DEFAULT_PARAMS.read_text()))
    assert not [e for e in events if isinstance(e, yaml.AliasEvent)]
    assert not [e for e in events if getattr(e, "anchor", None)]


def test_the_readmes_quick_look_commands_rewrite_params_into_valid_ones(tmp_path):
    """Each `dvc exp run -S ...` quick look in README.md, applied as DVC applies -S (Hydra overrides, then its YAML
    rewrite): the file still parses and validates. A comment inside collapse.settings once broke the rewrite."""
    import shlex

    from dvc.utils.hydra import apply_overrides

    readme = (DEFAULT_PARAMS.parent / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("dvc exp run -S 'study.seeds=[0]'")]
    assert len(commands) == 2
    loaded = []
    for number, command in enumerate(commands):
        words = shlex.split(command)
        overrides = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
        path = tmp_path / f"params{number}.yaml"
        path.write_text(DEFAULT_PARAMS.read_text())
        apply_overrides(path, overrides)
        loaded.append(load_params(path))
    without, with_collapse = loaded
    assert without.study.seeds == (0,) and without.collapse.settings == {} and without.collapse.datasets == ()
    assert with_collapse.collapse_seeds == (0,)
    assert with_collapse.collapse.settings == load_params(None).collapse.settings
