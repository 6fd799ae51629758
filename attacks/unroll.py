"""Differentiable simulation of a client's local SGD (Inverting Gradients style) for FedAvg captures."""

from __future__ import annotations

import math

import torch

from attacks.base import AttackTarget, GradientFn, local_steps


def simulated_signal(objective: str, gradient: GradientFn, target: AttackTarget) -> GradientFn:
    """s(params, consts, x, y): what the attack's dummy data would have produced, on the objective's scale.

    "gradient" and "pseudo-gradient": the gradient of one step on the whole dummy batch.
    "unrolled": the pseudo-gradient -Δ/(lr·steps) of the client's local recipe replayed on the
    dummy data with differentiable SGD steps (no momentum, no weight decay: the recipe names none).
    """
    if objective != "unrolled":
        return gradient
    recipe = target.recipe
    lr = recipe.lr
    epochs = recipe.local_epochs
    n = recipe.num_examples or target.batch_size
    batch = recipe.batch_size or n
    steps = local_steps(recipe, n)

    def unrolled(params: dict, consts: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # The dummy examples are free variables, so assigning them to mini-batches in a fixed
        # order loses nothing for one epoch; for several epochs we assume the client keeps the
        # order (the true shuffles are unknown to the server), as Geiping et al. (2020) do.
        current = dict(params)
        names = list(params)
        for _ in range(epochs):
            for b in range(math.ceil(n / batch)):
                g = gradient(current, consts, x[b * batch : (b + 1) * batch], y[b * batch : (b + 1) * batch])
                current = {name: current[name] - lr * gi for name, gi in zip(names, g, strict=True)}
        return tuple((params[name] - current[name]) / (lr * steps) for name in names)

    return unrolled
