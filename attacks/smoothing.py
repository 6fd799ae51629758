"""A smoothed copy of the attacker's model for IG's early matching (`smooth=softplus`): every ReLU becomes
Softplus(β) and every 2×2 max-pool a LogSumExp pool at the same β, so the dummy's simulated gradient is smooth
in the pixels; as β grows both tend to the exact layers (the captured gradients stay the real model's)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from fedsim.errors import FedsimError

SMOOTHINGS = ("none", "softplus")


class SoftMaxPool2d(nn.Module):
    """2×2, stride-2 LogSumExp pool: log(mean(exp(β·x)))/β over each window; the max as β → ∞, the mean as β → 0."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        windows = x[..., : 2 * h, : 2 * w].unflatten(-1, (w, 2)).unflatten(-3, (h, 2))
        return (torch.logsumexp(self.beta * windows, dim=(-3, -1)) - math.log(4)) / self.beta


def smoothed_copy(model: nn.Module, beta: float) -> nn.Module:
    """A deep copy of `model` with ReLU -> Softplus(β) and MaxPool2d(2) -> SoftMaxPool2d(β); weights shared by
    name, so it runs functionally on the same parameters. Refuses other max-pools."""
    smooth = copy.deepcopy(model)
    for parent in list(smooth.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Softplus(beta=beta))
            elif isinstance(child, nn.MaxPool2d):
                k, s = child.kernel_size, child.stride
                if k not in (2, (2, 2)) or s not in (2, (2, 2)) or child.padding not in (0, (0, 0)):
                    raise FedsimError("ig: smooth=softplus supports only 2x2, stride-2 max-pools")
                setattr(parent, name, SoftMaxPool2d(beta))
    return smooth


def set_beta(model: nn.Module, beta: float) -> None:
    """Set β of every smoothed layer of a smoothed_copy."""
    for m in model.modules():
        if isinstance(m, (nn.Softplus, SoftMaxPool2d)):
            m.beta = beta


def beta_at(it: int, iterations: int, beta: float, until: float) -> float | None:
    """β at iteration `it`: from `beta` up 100-fold (geometrically) over the first `until` of the iterations,
    then None (the exact model)."""
    end = int(until * iterations)
    return None if it >= end else beta * 100 ** (it / end)
