"""The benchmarks' own arithmetic: the flop count they divide by is the hand-computed one."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import torch
import torch.nn as nn

from benchmarks.train_speed import step_flops
from models.output import ModelOutput


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.second = nn.Conv2d(4, 1, 1, bias=False)

    def forward(self, x, update_memory=False):
        return ModelOutput(self.second(self.first(x)))


def test_step_flops_counts_forward_and_backward_convolutions_by_hand():
    model = TwoConvs()
    inputs, target = torch.randn(2, 2, 8, 8), torch.randn(2, 1, 8, 8)
    variant = SimpleNamespace(family="mnad", compactness_weight=0, separateness_weight=0, uniform_weight=0)
    optimizer = torch.optim.Adam(model.parameters())
    pixels = 2 * 8 * 8                              # batch x output positions
    first = 2 * (2 * 3 * 3) * 4 * pixels            # 2 flops per multiply-add, 18 per output channel and pixel
    second = 2 * 4 * 1 * pixels
    # backward: the first layer's input needs no gradient, so only its weight gradient (one forward's worth);
    # the second layer needs both its input's and its weight's gradient
    assert step_flops(model, optimizer, inputs, target, variant) == 2 * first + 3 * second == 39936


def test_an_appended_probe_replaces_its_own_row_in_place_and_keeps_the_others():
    import pandas as pd

    from benchmarks.learning_curve import appended

    key = {"dataset": "synthetic", "seed": 0}
    earlier = pd.DataFrame([{**key, "variant": "memae", "epochs": 4, "auc_micro": 0.73},
                            {**key, "variant": "memae:input_frames=8", "epochs": 4, "auc_micro": 0.50},
                            {**key, "variant": "memae", "epochs": 8, "auc_micro": 0.74}])
    new = pd.DataFrame([{**key, "variant": "memae:width=2", "epochs": 4, "auc_micro": 0.60},
                        {**key, "variant": "memae:input_frames=8", "epochs": 4, "auc_micro": 0.80}])
    table = appended(earlier, new)
    assert table[["variant", "epochs", "auc_micro"]].values.tolist() == [
        ["memae", 4, 0.73], ["memae:input_frames=8", 4, 0.80], ["memae", 8, 0.74], ["memae:width=2", 4, 0.60]]


def test_a_table_of_probes_only_draws_no_learning_curve(tmp_path):
    import pandas as pd

    from benchmarks.learning_curve import figure

    probes = pd.DataFrame([{"dataset": "synthetic", "variant": "memae:input_frames=8", "probe": True, "epochs": 4,
                            "steps": 248, "final_loss": 0.08, "learnt": True, "auc_micro": 0.75}])
    assert figure(probes, tmp_path / "learning_curve.png") is None
    assert list(tmp_path.iterdir()) == []


def test_a_probe_label_sets_variant_profile_and_generator_options_and_renders_its_own_frames(tmp_path):
    import json

    from analysis.probes import labelled_variant
    from benchmarks.learning_curve import rendered
    from pipeline.config import load_params

    params = load_params(None)
    label = "memae:shrink_threshold=0.001@width=0.5#normal_speed=1.25,transform_existing=false"
    variant, profile_changes, source_changes = labelled_variant(params, label, params.dataset("synthetic"))
    assert (variant.name, variant.shrink_threshold, variant.family) == (label, 0.001, "memae")
    assert profile_changes == {"width": 0.5}
    assert source_changes == {"normal_speed": 1.25, "transform_existing": False}
    plain, _, none = labelled_variant(params, "memae", params.dataset("synthetic"))
    assert plain == params.variant("memae") and none == {}

    frames = rendered(None, "tiny", {"normal_speed": 3.0}, None, tmp_path)
    generator = json.loads((frames.parent.parent / "raw" / "tiny" / "generator.json").read_text())
    assert generator["source"]["normal_speed"] == 3.0 and any(frames.rglob("*.png"))
    larger = rendered(None, "tiny", {"normal_speed": 3.0}, 48, tmp_path)  # a probe's frame_size renders its own
    assert larger != frames and cv2.imread(str(next(larger.rglob("*.png"))), cv2.IMREAD_UNCHANGED).shape[:2] == (48, 48)
    default = rendered(None, "tiny", {}, None, tmp_path)
    assert default != frames
    assert json.loads((default.parent.parent / "raw" / "tiny" / "generator.json").read_text())["source"][
        "normal_speed"] == load_params(None).dataset("tiny").source.normal_speed != 3.0


def test_stage_times_refuses_a_saved_log_that_holds_no_times():
    saved = ("Running stage 'run@synthetic-memae':\nstage work: 61.18 s\n"
             "Running stage 'report':\nstage work: 2.10 s\n")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "stage_times.py"
    done = subprocess.run([sys.executable, str(script)], input=saved, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "the stages report 63 s of work" in done.stderr
    assert "Pipe `python -m dvc repro 2>&1` into this script as it runs" in done.stderr
    assert "stage kind" not in done.stdout   # no table of zeros


def test_a_curve_length_overrides_the_family_epochs_and_keeps_its_other_settings():
    from analysis.probes import curve_profile
    from pipeline.config import FamilySettings, load_params

    params = load_params(None)
    base = params.dataset("synthetic")
    own = {"memae": FamilySettings(epochs=32, batch_size=4, lr=0.003)}
    dataset = base.model_copy(update={"profile": base.profile.model_copy(update={"families": own})})
    profile = curve_profile(dataset, params.variant("memae"), {"width": 0.5}, 8)
    # the training step reads this profile through training_profile again: the family must not win back
    resolved = dataset.model_copy(update={"profile": profile}).training_profile(params.variant("memae"))
    assert (resolved.epochs, resolved.batch_size, resolved.lr, resolved.width) == (8, 4, 0.003, 0.5)
    mnad = curve_profile(dataset, params.variant("mnad-pred"), {}, 6)
    assert (mnad.epochs, mnad.batch_size, mnad.lr) == (6, base.profile.batch_size, base.profile.lr)
