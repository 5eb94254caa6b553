"""Salt-and-pepper input noise: the fraction of hit pixels, whole-pixel hits, range, seeding, and the RC2020 slip."""
from __future__ import annotations

import pytest
import torch

from models.noise import salt_and_pepper


def image(batch=4, channels=3, size=32):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8


@pytest.mark.parametrize("amount", [0.05, 0.25, 0.40])
def test_fraction_of_changed_pixels(amount):
    x = image()                                              # 4096 pixels, none at exactly +-1
    noisy = salt_and_pepper(x, amount, torch.Generator().manual_seed(1))
    changed = (noisy != x).any(dim=1)                        # [B, H, W]
    assert changed.float().mean().item() == pytest.approx(amount, abs=0.03)
    # a hit pixel is black or white in every channel together
    hit_values = noisy.permute(0, 2, 3, 1)[changed]          # [hits, C]
    assert ((hit_values == 1).all(dim=1) | (hit_values == -1).all(dim=1)).all()
    assert (hit_values[:, 0] == 1).float().mean().item() == pytest.approx(0.5, abs=0.06)
    assert torch.equal(noisy[~changed.unsqueeze(1).expand_as(x)], x[~changed.unsqueeze(1).expand_as(x)])
    assert noisy.min() >= -1 and noisy.max() <= 1


def test_seeded_and_non_destructive():
    x = image()
    original = x.clone()
    a = salt_and_pepper(x, 0.25, torch.Generator().manual_seed(7))
    b = salt_and_pepper(x, 0.25, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(x, original)    # the caller's clean frame stays the target
    assert torch.equal(salt_and_pepper(x, 0.0), x)


def test_rc2020_scaling_squeezes_inputs_near_minus_one():
    x = image()
    noisy = salt_and_pepper(x, 0.25, torch.Generator().manual_seed(1), rc2020_scaling=True)
    top = 2 / 255 - 1                                        # about -0.992
    assert noisy.min() >= -1 and noisy.max() <= top + 1e-6
    assert noisy.max().item() == pytest.approx(top)          # salt: 1 in [0, 1], then /255
    clean = salt_and_pepper(x, 0.0, rc2020_scaling=True)
    assert torch.allclose(clean, (x + 1) / 2 / 255 * 2 - 1)


def test_rejects_bad_amounts():
    with pytest.raises(ValueError, match="1.5"):
        salt_and_pepper(image(), 1.5)
