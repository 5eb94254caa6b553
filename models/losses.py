"""A model's result becomes its training loss: the reconstruction or prediction error plus the variant's weighted
auxiliary terms. Every term the model computed is returned by name for logging."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.output import ModelOutput


def mnad_loss(result: ModelOutput, target: torch.Tensor, variant) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE(output, target) + lc * compactness + ls * separateness + lu * uniform. Terms the model did not compute
    (no memory) and terms of weight 0 add nothing; every computed term is returned for logging."""
    mse = F.mse_loss(result.output, target)
    terms = {"mse": mse, **result.loss_terms}
    weights = {"compactness": variant.compactness_weight, "separateness": variant.separateness_weight,
               "uniform": variant.uniform_weight}
    total = mse
    for name, weight in weights.items():
        if weight and name in terms:
            total = total + weight * terms[name]
    return total, terms


def memae_loss(result: ModelOutput, target: torch.Tensor, variant) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSE(output, target) + entropy_weight * addressing entropy."""
    mse = F.mse_loss(result.output, target)
    terms = {"mse": mse, **result.loss_terms}
    total = mse
    if variant.entropy_weight and "entropy" in terms:
        total = total + variant.entropy_weight * terms["entropy"]
    return total, terms


def compute_loss(result: ModelOutput, target: torch.Tensor, variant) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loop's one entry point: (total loss, named terms) for the variant's family."""
    return memae_loss(result, target, variant) if variant.family == "memae" else mnad_loss(result, target, variant)
