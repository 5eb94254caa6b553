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
    assert params.dataset("synthetic").generator.square_size == pytest.approx(17.72, abs=0.01)


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
    del raw["profiles"]["tiny"]["epochs"]
    with pytest.raises(ConfigError, match=r"^params.yaml: profiles.tiny.epochs: missing \(expected int\)$"):
        parse_params(raw)


def test_wrong_type_is_named(raw):
    raw["profiles"]["synthetic"]["batch_size"] = "eight"
    with pytest.raises(ConfigError, match=r"profiles.synthetic.batch_size: expected an integer, got 'eight'"):
        parse_params(raw)
    raw = copy.deepcopy(raw)
    raw["profiles"]["synthetic"]["batch_size"] = 8
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
    raw["profiles"]["tiny"]["frame_size"] = 30
    with pytest.raises(ConfigError, match="profiles.tiny.frame_size: must be a multiple of 8"):
        parse_params(raw)


def test_copy_last_cannot_be_trained(raw):
    raw["study"]["variants"] = ["copy-last"]
    with pytest.raises(ConfigError, match="'copy-last' has nothing to train"):
        parse_params(raw)


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_stage_exits_cleanly_on_a_config_error(tmp_path, capsys):
    from pipeline.train import main

    assert main(["--dataset", "nope", "--variant", "mnad-pred", "--seed", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown dataset 'nope'") and "Traceback" not in err


def test_params_yaml_reads_the_same_under_dvcs_yaml_parser():
    """DVC reads params.yaml with ruamel's libyaml parser (YAML 1.1), stricter than PyYAML here: an unquoted URL in
    a flow list, for one, is a syntax error there, and every stage would fail to read its params."""
    from dvc.utils.serialize import load_yaml

    assert load_yaml(DEFAULT_PARAMS) == yaml.safe_load(DEFAULT_PARAMS.read_text())
