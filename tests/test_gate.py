"""The learning gate on crafted runs, the trivial outputs it compares with, and the calibrated update threshold."""
import math

import numpy as np
import pytest
import torch

from models.clips import split_clip
from models.mnad import point_score
from models.output import ModelOutput
from pipeline.config import load_params
from pipeline.data import clip_dataset
from pipeline.evaluate import Trivial, calibrated_threshold
from pipeline.gate import late_improvement, learning_gate
from pipeline.paths import frames_dir

GATE = {"window": 0.2, "tolerance": 0.1, "margin_db": 0.0}
STEPS = np.arange(1, 101)


def test_late_improvement_is_the_last_fifths_share_of_the_whole_fall():
    losses = np.where(STEPS > 80, 1.0, np.where(STEPS > 60, 2.0, np.where(STEPS > 20, 5.0, 9.0)))
    assert late_improvement(STEPS, losses, 0.2) == pytest.approx((2.0 - 1.0) / (9.0 - 1.0))
    assert late_improvement(STEPS, np.linspace(10, 2, 100), 0.2) == pytest.approx(0.25, abs=0.01)   # steady fall
    assert late_improvement(STEPS, np.full(100, 3.0), 0.2) == 0.0          # never fell: judged by the floor
    assert math.isnan(late_improvement(np.array([5]), np.array([1.0]), 0.2))   # one row: no fifth before


@pytest.mark.parametrize("losses, normal_psnr, plateaued, beats", [
    (1.0 + 1.0 / STEPS, 25.0, True, True),            # flat at the end, well above the floor
    (1.0 + 1.0 / STEPS, 19.0, True, False),           # flat, but no better than copying the last frame
    (np.exp(-STEPS / 60), 25.0, False, True),         # still falling: undertrained
    (np.exp(-STEPS / 60), 18.0, False, False),
])
def test_the_gate_on_crafted_runs(losses, normal_psnr, plateaued, beats):
    gate = learning_gate(STEPS, losses, normal_psnr, floor_psnr=20.0, task="predict", **GATE)
    assert (gate["plateaued"], gate["beats_floor"], gate["learnt"]) == (plateaued, beats, plateaued and beats)
    assert gate["floor"] == "copy-last"


def test_the_floor_margin_is_strict():
    flat = np.ones(100)
    assert not learning_gate(STEPS, flat, 20.5, 20.0, "reconstruct", 0.2, 0.1, margin_db=1.0)["beats_floor"]
    assert learning_gate(STEPS, flat, 21.5, 20.0, "reconstruct", 0.2, 0.1, margin_db=1.0)["learnt"]


def test_the_trivial_outputs_are_copy_last_and_the_training_mean_frame(tiny_data):
    params = load_params()
    frames = frames_dir("tiny", tiny_data)
    cpu = torch.device("cpu")
    pred, recon, memae = (params.variant(v) for v in ("mnad-pred", "mnad-recon", "memae"))
    clips = torch.stack([clip_dataset(frames, "test", pred)[i]["clip"] for i in range(3)])
    inputs, target = split_clip(clips, pred)
    assert torch.equal(Trivial(pred, frames, 10, 0, cpu)(inputs, target), clips[:, 3])   # the last input frame
    every = clip_dataset(frames, "train", recon)
    mean = torch.stack([every[i]["clip"][0] for i in range(len(every))]).mean(dim=0)
    trivial = Trivial(recon, frames, len(every), 0, cpu)
    torch.testing.assert_close(trivial.mean_frame, mean)
    inputs, target = split_clip(clips[:, :1], recon)
    torch.testing.assert_close(trivial(inputs, target), mean.expand_as(target))
    volume = torch.stack([clip_dataset(frames, "test", memae)[0]["clip"]])
    inputs, target = split_clip(volume, memae)
    output = Trivial(memae, frames, 20, 0, cpu)(inputs, target)
    assert output.shape == target.shape and torch.equal(output[0, :, 0], output[0, :, 15])   # one frame, every t


class Blank(torch.nn.Module):
    """A model whose output is a black frame, so each window's point score is set by the frame alone."""

    def forward(self, x):
        return ModelOutput(torch.full_like(x, -1.0))


def test_the_calibrated_threshold_is_the_quantile_of_the_sampled_training_point_scores(tiny_data):
    variant = load_params().variant("mnad-recon")
    frames = frames_dir("tiny", tiny_data)
    train_set = clip_dataset(frames, "train", variant)
    chosen = np.sort(np.random.default_rng(3).permutation(len(train_set))[:25])
    inputs, target = split_clip(torch.stack([train_set[int(i)]["clip"] for i in chosen]), variant)
    expected = np.quantile(point_score(torch.full_like(inputs, -1.0), target).double().numpy(), 0.3)
    found = calibrated_threshold(Blank(), variant, frames, 25, 0.3, seed=3, batch_size=7, device=torch.device("cpu"))
    assert found == pytest.approx(expected)
    assert calibrated_threshold(Blank(), variant, frames, 25, 0.9, 3, 7, torch.device("cpu")) > found


def test_the_usage_monitor_sees_a_collapsed_memory_as_one_item(tiny_data):
    """Constant queries (the encoder's last conv zeroed to its bias) all pick one item: top share 1, entropy 0."""
    from models.build import build_model
    from pipeline.train import UsageMonitor

    params = load_params()
    variant, profile = params.variant("mnad-pred"), params.dataset("tiny").profile
    torch.manual_seed(0)
    model = build_model(variant, profile)
    train_set = clip_dataset(frames_dir("tiny", tiny_data), "train", variant)
    monitor = UsageMonitor(train_set, [0, 3, 5], variant, torch.device("cpu"))
    spread = monitor(model)
    assert set(spread) == {f"usage_{k}" for k in ("entropy", "perplexity", "items_used", "top_share", "collapsed",
                                                  "position_nmi", "position_variance_share")}
    with torch.no_grad():
        last = model.encoder.block4[3]
        last.weight.zero_()
        last.bias.copy_(torch.linspace(-1, 1, last.bias.numel()))
    collapsed = monitor(model)
    assert collapsed["usage_top_share"] == 1.0 and collapsed["usage_entropy"] == 0.0
    assert collapsed["usage_items_used"] == 1 and collapsed["usage_collapsed"] == 1
    assert model.training   # the monitor puts the model back in training mode
