"""Salt-and-pepper corruption of the input for denoising training (the RC2020 skip-connection study, C8).

Only the input is corrupted; the caller keeps the clean frame as the target.
"""
from __future__ import annotations

import torch


def salt_and_pepper(x: torch.Tensor, amount: float, generator: torch.Generator | None = None,
                    rc2020_scaling: bool = False, share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Set a random fraction `amount` of the pixels of `x` [..., C, H, W] (in [-1, 1]) to -1 or +1, half each.

    A pixel is one spatial location with all its channels, so a colour pixel turns black or white, not one channel.
    Each pixel is hit independently with probability `amount`.

    rc2020_scaling=True reproduces the RC2020 slip: the noise is applied to the image in [0, 1], which is then
    rescaled as if it were 0..255 (x01 / 255 * 2 - 1), so every input lands in about [-1, -0.992] while the
    target keeps [-1, 1]. Off by default.

    share=(r, N): `x` is rank r's share of a global batch of N * len(x) rows dealt out round-robin (distributed
    training); the noise drawn for the global batch is drawn, and this share's rows r, r + N, ... are applied, so
    N ranks corrupt their inputs exactly as one process corrupts the global batch.
    """
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"salt-and-pepper amount must be a fraction in [0, 1], got {amount}")
    if x.dim() < 3:
        raise ValueError(f"salt_and_pepper expects [..., C, H, W], got shape {tuple(x.shape)}")
    rank, ranks = share
    pixel_shape = (x.shape[0] * ranks, *x.shape[1:-3], 1, *x.shape[-2:])
    # Draw where the generator lives, then move: a CPU generator then seeds CPU and CUDA runs alike.
    device = generator.device if generator is not None else x.device
    hit = torch.rand(pixel_shape, generator=generator, device=device)[rank::ranks].to(x.device) < amount
    salt = torch.rand(pixel_shape, generator=generator, device=device)[rank::ranks].to(x.device) < 0.5
    if rc2020_scaling:
        x01 = torch.where(hit, salt.to(x.dtype), (x + 1) / 2)
        return x01 / 255 * 2 - 1
    return torch.where(hit, salt.to(x.dtype) * 2 - 1, x)
