"""The consensus of restarts (Inverting Gradients' `combine` option): each target's restarts replaced by the
pixel-wise mean or median of their kept images, the group consensus of GradInversion (Yin et al., CVPR 2021)
without its registration step.

Restarts from different noise land in different nearby basins of the gradient distance, and on fedsim's ReLU
ConvNet their errors are partly independent: the mean of four `preset=features` restarts is above the
restart of least distance on every one of nine held-out photos (docs/attacks.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

COMBINES = ("best", "mean", "median")


def consensus(
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]],
    best: torch.Tensor,
    best_value: torch.Tensor,
    best_distance: torch.Tensor,
    restarts: int,
    how: str,
    mean: torch.Tensor,
    std: torch.Tensor,
) -> None:
    """Replace, in place, the K = targets × `restarts` kept images `best` (pixels, problem j·restarts + i is
    restart i of target j) by their target's consensus (`how`: "mean" or "median"), with its objective and
    distance from `fn(z) -> (gradient, (objective, distance))` (x = mean + std·z). Restarts whose objective
    is not finite (diverged) stay out of their target's consensus; a target without a finite one is left."""
    groups = best.view(-1, restarts, *best.shape[1:])
    finite = torch.isfinite(best_value).view(-1, restarts)
    for j in range(groups.shape[0]):
        members = groups[j][finite[j]]
        if len(members) == 0:
            continue
        combined = members.mean(0) if how == "mean" else members.quantile(0.5, dim=0)
        groups[j].copy_(combined.expand_as(groups[j]))
    _, (value, distance) = fn((best - mean) / std)
    ok = finite.any(1).repeat_interleave(restarts)
    best_value.copy_(torch.where(ok, value, best_value))
    best_distance.copy_(torch.where(ok, distance, best_distance))
