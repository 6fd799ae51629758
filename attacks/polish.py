"""A short L-BFGS polish of kept iterates: a few steps with a line search on the attack's own objective, kept
per problem only where it lowers the objective (Inverting Gradients' `polish` option)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from attacks.lbfgs import BatchedLBFGS


def polish(
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]],
    best: torch.Tensor,
    best_value: torch.Tensor,
    best_distance: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    box: tuple[torch.Tensor, torch.Tensor],
    steps: int,
) -> torch.Tensor:
    """`steps` L-BFGS steps (Armijo line search) from the K kept images `best` (pixels, x = mean + std·z), on
    `fn(z) -> (gradient, (objective, distance))`, z boxed to `box` at the end; `best`, `best_value` and
    `best_distance` are updated in place where the objective fell. Returns which of the K problems improved."""
    low, high = box

    def closure(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, (value, _) = fn(v.view_as(best))
        return torch.nan_to_num(g.flatten(1)), torch.nan_to_num(value, nan=float("inf"))

    lbfgs = BatchedLBFGS(((best - mean) / std).flatten(1), closure, reset_stalled=True, line_search="armijo")
    for _ in range(steps):
        lbfgs.step()
    z = torch.maximum(torch.minimum(lbfgs.z.view_as(best), high), low)
    _, (value, distance) = fn(z)
    improved = torch.isfinite(value) & (value < best_value)
    best[improved] = (mean + std * z)[improved]
    best_value.copy_(torch.where(improved, value, best_value))
    best_distance.copy_(torch.where(improved, distance, best_distance))
    return improved
