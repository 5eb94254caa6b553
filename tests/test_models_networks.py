"""Every variant of params.yaml builds and runs at two sizes and two widths; gradients reach what they should;
feature replacement reaches the decoder; CopyLast copies; the paper-width architecture has the paper's channels."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from models.build import build_model
from models.clips import split_clip
from models.losses import compute_loss
from models.memae import MemAE
from models.mnad import MNAD, CopyLast, Replacement
from pipeline.config import load_params

PARAMS = load_params()
VARIANTS = sorted(PARAMS.variants)


def profile(width=0.125, channels=1):
    return PARAMS.dataset("tiny").profile.model_copy(update={"width": width, "channels": channels})


def clip_for(variant, size, channels=1, batch=2):
    return torch.rand(batch, variant.window, channels, size, size) * 2 - 1


@pytest.mark.parametrize("width", [0.125, 0.25])
@pytest.mark.parametrize("size", [32, 48])
@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_runs_at_two_sizes_and_widths(name, size, width):
    variant = PARAMS.variant(name)
    torch.manual_seed(0)
    model = build_model(variant, profile(width))
    inputs, target = split_clip(clip_for(variant, size), variant)
    result = model(inputs, update_memory=True)
    assert result.output.shape == target.shape
    loss, terms = compute_loss(result, target, variant)
    assert loss.dim() == 0 and torch.isfinite(loss) and "mse" in terms
    if variant.family == "mnad":
        dim = round(512 * width)
        assert result.queries.shape == (2, dim, size // 8, size // 8)
        assert torch.allclose(result.queries.norm(dim=1), torch.ones(1))
        if variant.has_memory:
            assert result.read.shape == result.queries.shape
            assert result.nearest.shape == (2, size // 8, size // 8) and result.nearest.dtype == torch.long
            assert result.distance.shape == (2,)
            assert set(terms) == {"mse", "compactness", "separateness", "uniform"}
        else:
            assert result.read is None and result.nearest is None and result.distance is None
    if variant.family == "memae":
        assert inputs.shape == (2, 1, 16, size, size)
        assert result.nearest.shape == (2, 2, size // 16, size // 16)
        assert set(terms) == {"mse", "entropy", "zero_rows"}


def test_colour_channels_and_stacking():
    variant = PARAMS.variant("mnad-pred")
    model = build_model(variant, profile(channels=3))
    clip = clip_for(variant, 32, channels=3)
    inputs, target = split_clip(clip, variant)
    assert inputs.shape == (2, 12, 32, 32) and torch.equal(inputs[:, 3:6], clip[:, 1])
    assert torch.equal(target, clip[:, 4])
    assert model(inputs).output.shape == (2, 3, 32, 32)
    recon = PARAMS.variant("mnad-recon")
    clip = clip_for(recon, 32, channels=3)
    inputs, target = split_clip(clip, recon)
    assert torch.equal(inputs, clip[:, 0]) and torch.equal(target, clip[:, 0])
    memae = PARAMS.variant("memae")
    clip = clip_for(memae, 32)
    inputs, target = split_clip(clip, memae)
    assert torch.equal(inputs[:, :, 5], clip[:, 5]) and torch.equal(target, inputs)
    with pytest.raises(ValueError, match="expects clips"):
        split_clip(clip[:, :4], memae)


def test_gradients_reach_encoder_and_decoder_never_the_mnad_memory():
    variant = PARAMS.variant("mnad-pred")
    torch.manual_seed(0)
    model = build_model(variant, profile())
    assert "memory.items" in model.state_dict()
    assert all("memory" not in name for name, _ in model.named_parameters())
    assert not model.memory.items.requires_grad
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, target = split_clip(clip_for(variant, 32), variant)

    items = model.memory.items.clone()
    loss, _ = compute_loss(model(inputs), target, variant)
    loss.backward()
    assert model.encoder.block1[0].weight.grad.abs().sum() > 0
    assert model.decoder.head[-2].weight.grad.abs().sum() > 0
    assert model.memory.items.grad is None
    optimizer.step()
    assert torch.equal(model.memory.items, items)            # the optimizer cannot touch it

    # the training update runs after the read, and backward through the old graph still works
    optimizer.zero_grad()
    loss, _ = compute_loss(model(inputs, update_memory=True), target, variant)
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.memory.items, items)
    assert model.memory.items.grad is None


def test_memae_memory_learns_by_gradient():
    torch.manual_seed(0)
    model = MemAE(1, clip_length=8, width=0.125, memory_items=10, shrink_threshold=0.0025)
    assert isinstance(model.memory.items, nn.Parameter)
    x = torch.rand(2, 1, 8, 32, 32) * 2 - 1
    result = model(x)
    (((result.output - x) ** 2).mean() + 0.01 * result.loss_terms["entropy"]).backward()
    assert model.memory.items.grad is not None and model.memory.items.grad.abs().sum() > 0
    assert model.encoder[0][0].weight.grad.abs().sum() > 0
    bound = 1 / (round(256 * 0.125) ** 0.5)
    assert model.memory.items.abs().max() <= bound


def test_memae_rejects_clip_lengths_and_sizes():
    with pytest.raises(ValueError, match="12"):
        MemAE(1, clip_length=12)
    model = MemAE(1, clip_length=8, width=0.125, memory_items=4)
    with pytest.raises(ValueError, match="40x40"):
        model(torch.zeros(1, 1, 8, 40, 40))
    with pytest.raises(ValueError, match="16"):
        model(torch.zeros(1, 1, 16, 32, 32))
    plain = MemAE(1, clip_length=8, width=0.125, memory_items=0)
    result = plain(torch.zeros(1, 1, 8, 32, 32))
    assert result.read is None and result.loss_terms == {}


def test_mnad_rejects_bad_sizes_and_options():
    with pytest.raises(ValueError, match="36x36"):
        MNAD(1, 1, width=0.125)(torch.zeros(1, 1, 36, 36))
    with pytest.raises(ValueError, match="rc2020"):
        MNAD(1, 1, skips=True, decoder="rc2020")
    with pytest.raises(ValueError, match="fancy"):
        MNAD(1, 1, decoder="fancy")


def conv_shapes(module):
    return [(m.in_channels, m.out_channels) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def test_paper_width_channels():
    pred = MNAD(12, 3, width=1.0, skips=True, memory_items=10)
    assert conv_shapes(pred.encoder) == [(12, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
                                         (256, 512), (512, 512)]
    assert pred.memory.items.shape == (10, 512)
    assert conv_shapes(pred.decoder) == [(1024, 512), (512, 512), (512, 256), (512, 256), (256, 256), (256, 128),
                                         (256, 128), (128, 128), (128, 64), (128, 64), (64, 64), (64, 3)]
    recon = MNAD(3, 3, width=1.0, skips=False, memory_items=10)
    assert conv_shapes(recon.decoder) == [(1024, 512), (512, 512), (512, 512), (512, 256), (256, 256), (256, 256),
                                          (256, 128), (128, 128), (128, 128), (128, 64), (64, 64), (64, 3)]
    narrow = MNAD(3, 3, width=1.0, skips=False, decoder="rc2020", memory_items=0)
    assert conv_shapes(narrow.decoder) == [(512, 512), (512, 512), (512, 256), (256, 256), (256, 256), (256, 128),
                                           (128, 128), (128, 128), (128, 64), (64, 64), (64, 64), (64, 3)]
    no_memory = MNAD(12, 3, width=1.0, skips=True, memory_items=0)
    assert conv_shapes(no_memory.decoder)[0] == (512, 512)
    memae = MemAE(1, 16, width=1.0, memory_items=2000)
    convs = [(m.in_channels, m.out_channels, m.stride) for m in memae.modules()
             if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert convs == [(1, 96, (1, 2, 2)), (96, 128, (2, 2, 2)), (128, 256, (2, 2, 2)), (256, 256, (2, 2, 2)),
                     (256, 256, (2, 2, 2)), (256, 128, (2, 2, 2)), (128, 96, (2, 2, 2)), (96, 1, (1, 2, 2))]
    assert memae.memory.items.shape == (2000, 256)


def decoder_inputs(model, x, replace):
    seen = []
    handle = model.decoder.register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    with torch.no_grad():
        result = model(x, replace=replace)
    handle.remove()
    return seen[0], result


@pytest.mark.parametrize("part", ["query", "read", "both"])
@pytest.mark.parametrize("fill", ["zeros", "ones", "random"])
def test_replacement_reaches_the_decoder_and_changes_the_output(part, fill):
    torch.manual_seed(0)
    model = MNAD(1, 1, width=0.125, skips=False, memory_items=4)  # train-mode BN: a fresh net in eval is near constant
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    clean_input, clean = decoder_inputs(model, x, None)
    dim = clean.queries.shape[1]
    assert torch.equal(clean_input, torch.cat([clean.queries, clean.read], dim=1))
    generator = torch.Generator().manual_seed(3) if fill == "random" else None
    seen, replaced = decoder_inputs(model, x, Replacement(part, fill, generator))
    start, stop = {"query": (0, dim), "read": (dim, 2 * dim), "both": (0, 2 * dim)}[part]
    kept = torch.cat([clean_input[:, :start], clean_input[:, stop:]], dim=1)
    assert torch.equal(torch.cat([seen[:, :start], seen[:, stop:]], dim=1), kept)
    region = seen[:, start:stop]
    if fill == "zeros":
        assert torch.equal(region, torch.zeros_like(region))
    elif fill == "ones":
        assert torch.equal(region, torch.ones_like(region))
    else:
        assert torch.equal(region, torch.randn(region.shape, generator=torch.Generator().manual_seed(3)))
    assert not torch.allclose(replaced.output, clean.output, atol=1e-4)


def test_replacement_without_memory():
    torch.manual_seed(0)
    model = MNAD(4, 1, width=0.125, skips=True, memory_items=0).eval()
    x = torch.rand(1, 4, 32, 32)
    seen, _ = decoder_inputs(model, x, Replacement("query", "ones"))
    assert torch.equal(seen, torch.ones_like(seen))
    with pytest.raises(ValueError, match="read"):
        model(x, replace=Replacement("read", "zeros"))
    with pytest.raises(ValueError, match="sideways"):
        Replacement("sideways", "zeros")


@pytest.mark.parametrize("memory_items", [0, 4])
def test_one_encoding_decoded_under_replacements_equals_full_forward_passes(memory_items):
    torch.manual_seed(0)
    model = MNAD(4, 1, width=0.125, skips=True, memory_items=memory_items).eval()
    x = torch.rand(2, 4, 32, 32) * 2 - 1
    with torch.no_grad():
        encoded = model.encode(x)
        assert torch.equal(model.decode(encoded), model(x).output)
        for fill in ("zeros", "random"):
            once = model.decode(encoded, Replacement("both", fill, torch.Generator().manual_seed(5)))
            full = model(x, replace=Replacement("both", fill, torch.Generator().manual_seed(5))).output
            assert torch.equal(once, full)
    assert encoded.query_channels == (model.encoder.out_channels if memory_items else None)


@pytest.mark.parametrize("memory_items", [0, 6])
def test_memae_encode_is_the_forward_pass_up_to_the_decoder(memory_items):
    torch.manual_seed(0)
    model = MemAE(1, clip_length=8, width=0.125, memory_items=memory_items).eval()
    x = torch.rand(3, 1, 8, 32, 32) * 2 - 1
    with torch.no_grad():
        encoded, result = model.encode(x), model(x)
    assert torch.equal(encoded.queries, result.queries)
    assert encoded.queries.shape == (3, model.encoder[-1][0].out_channels, 1, 2, 2)
    if memory_items:
        assert torch.equal(encoded.read, result.read) and torch.equal(encoded.nearest, result.nearest)
        assert encoded.nearest.shape == (3, 1, 2, 2) and int(encoded.nearest.max()) < memory_items
        assert torch.equal(model.decoder(encoded.read), result.output)
    else:
        assert encoded.read is None and encoded.nearest is None


def test_copy_last_returns_the_fourth_frame_exactly():
    variant = PARAMS.variant("copy-last")
    model = build_model(variant, profile(channels=3))
    assert isinstance(model, CopyLast) and sum(p.numel() for p in model.parameters()) == 0
    clip = clip_for(variant, 32, channels=3)
    inputs, target = split_clip(clip, variant)
    assert torch.equal(model(inputs).output, clip[:, 3])
    assert torch.equal(target, clip[:, 4])


def test_loss_weights():
    variant = PARAMS.variant("mnad-pred-uniform")
    torch.manual_seed(0)
    model = build_model(variant, profile())
    inputs, target = split_clip(clip_for(variant, 32), variant)
    result = model(inputs)
    total, terms = compute_loss(result, target, variant)
    expected = (terms["mse"] + 0.001 * terms["compactness"] + 0.001 * terms["separateness"]
                + 1.0 * terms["uniform"])
    assert torch.allclose(total, expected)
    assert torch.allclose(terms["mse"], ((result.output - target) ** 2).mean())
    memae = PARAMS.variant("memae")
    model = build_model(memae, profile())
    inputs, target = split_clip(clip_for(memae, 32), memae)
    result = model(inputs)
    total, terms = compute_loss(result, target, memae)
    assert torch.allclose(total, terms["mse"] + 0.0002 * terms["entropy"])


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_runs_on_device(device):
    from models.noise import salt_and_pepper

    for name in ("mnad-pred", "mnad-recon-skip-sp25", "ae-recon", "memae", "copy-last"):
        variant = PARAMS.variant(name)
        torch.manual_seed(0)
        model = build_model(variant, profile()).to(device)
        inputs, target = split_clip(clip_for(variant, 32).to(device), variant)
        inputs = salt_and_pepper(inputs, 0.1, torch.Generator().manual_seed(0))
        result = model(inputs, update_memory=True)
        assert result.output.device.type == device
        if variant.trainable:
            compute_loss(result, target, variant)[0].backward()
        if variant.memory == "mnad":
            model.eval()
            with torch.no_grad():
                result = model(inputs, replace=Replacement("read", "random", torch.Generator().manual_seed(0)))
            updated = model.test_time_update(result, target, threshold=1.0)
            assert updated.device.type == device and updated.all()


@pytest.mark.parametrize("base, options", [
    ("mnad-recon", {"decoder": "rc2020"}),
    ("ae-recon", {"decoder": "rc2020"}),
    ("mnad-pred", {"update_norm": "paper"}),
    ("memae", {"addressing": "cosine"}),
    ("memae", {"memory": "none"}),
    ("memae", {"input_frames": 8}),
])
def test_options_outside_params_yaml(base, options):
    variant = PARAMS.variant(base).model_copy(update=options)
    torch.manual_seed(0)
    model = build_model(variant, profile())
    inputs, target = split_clip(clip_for(variant, 32), variant)
    result = model(inputs, update_memory=True)
    assert result.output.shape == target.shape
    compute_loss(result, target, variant)[0].backward()


def test_memory_survives_a_state_dict_round_trip():
    variant = PARAMS.variant("mnad-recon")
    torch.manual_seed(0)
    model = build_model(variant, profile())
    inputs, _ = split_clip(clip_for(variant, 32), variant)
    model(inputs, update_memory=True)
    torch.manual_seed(1)
    restored = build_model(variant, profile())
    assert not torch.equal(restored.memory.items, model.memory.items)
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.memory.items, model.memory.items)


@pytest.mark.parametrize("fill", ["ones", "random"])
def test_a_fill_scaled_to_the_features_norm_keeps_each_positions_norm(fill):
    decoder_input = torch.randn(2, 12, 4, 4) * torch.linspace(0.1, 3.0, 12)[None, :, None, None]
    scaled = Replacement("query", fill, torch.Generator().manual_seed(1), scale_to_norm=True)(decoder_input, 5)
    torch.testing.assert_close(scaled[:, :5].norm(dim=1), decoder_input[:, :5].norm(dim=1))
    assert torch.equal(scaled[:, 5:], decoder_input[:, 5:])   # the read is untouched
    if fill == "ones":   # every channel equal, at the norm of what it replaced
        torch.testing.assert_close(scaled[:, :5], scaled[:, :1].expand(-1, 5, -1, -1))
    unscaled = Replacement("query", "ones")(decoder_input, 5)
    assert torch.all(unscaled[:, :5] == 1)
