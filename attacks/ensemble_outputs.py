"""What an ensemble of frozen models says about a batch: every member's logits, its penultimate features (the
input of its last linear layer), and the members' mean logit of a target class."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedsim.errors import FedsimError


def ensemble_logits(models: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Logits of every model [M, B, K]."""
    return torch.stack([model(x) for model in models])


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's classifier: its last nn.Linear layer, whose input is the penultimate-layer feature vector."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise FedsimError(f"{type(model).__name__} has no linear classifier layer: DAFL's activation loss needs one")
    return linears[-1]


def ensemble_features(models: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [M, B, K] and penultimate features [M, B, F] (the input of each model's last linear layer)."""
    logits, features = [], []
    for model in models:
        seen: list[torch.Tensor] = []
        hook = last_linear(model).register_forward_pre_hook(lambda _m, args, seen=seen: seen.append(args[0]))
        try:
            logits.append(model(x))
        finally:
            hook.remove()
        features.append(seen[-1].flatten(1))
    return torch.stack(logits), torch.stack(features)


@torch.no_grad()
def target_activation(models: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the ensemble of the target-class logit of each image."""
    rows = torch.arange(len(labels))
    logits = torch.cat([ensemble_logits(models, images[s : s + 256]) for s in range(0, len(images), 256)], dim=1)
    return logits[:, rows, labels].mean(dim=0)
