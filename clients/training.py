"""Local training recipes: FedSGD (one gradient of one batch) and FedAvg (local epochs of SGD)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def round_generator(seed: int, server_round: int, partition_id: int) -> np.random.Generator:
    """The seeded randomness of one client in one round: batches are reproducible from the seed."""
    return np.random.default_rng([seed, server_round, partition_id])


def train_mode(model: nn.Module) -> None:
    """model.train(), except that modules TL-DMI froze stay in eval mode (a frozen BatchNorm keeps its statistics)."""
    model.train()
    for module in model.modules():
        if getattr(module, "fedsim_frozen", False):
            module.eval()


def fedsgd_batch(num_examples: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Positions in the shard of the B examples whose gradient the client sends."""
    return np.sort(rng.choice(num_examples, size=batch_size, replace=False))


def train_fedsgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
    """One SGD step on the mean cross-entropy of (x, y): the update is -lr times its gradient."""
    train_mode(model)
    loss = nn.functional.cross_entropy(model(x), y)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(lr * g)
    return float(loss.item())


def train_fedavg(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    proximal_mu: float = 0.0,
) -> float:
    """E epochs of minibatch SGD over the shard (FedProx's proximal term when mu > 0); returns the mean loss."""
    train_mode(model)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = torch.optim.SGD(params, lr=lr)
    total, seen = 0.0, 0
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            loss = nn.functional.cross_entropy(model(xb), yb)
            if anchor is not None:
                loss = loss + proximal_mu / 2 * sum((p - a).pow(2).sum() for p, a in zip(params, anchor, strict=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
    return total / max(seen, 1)
