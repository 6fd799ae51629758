"""Scoring model inversion: an independent evaluation classifier, attack accuracy, distance to private images."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.models import build_model

Progress = Callable[[int, int, float], None]


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translations by up to `max_shift` pixels (zero padding): the evaluator's only augmentation."""
    if max_shift <= 0:
        return x
    h, w = x.shape[2:]
    padded = F.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + h, dx : dx + w]


def train_evaluator(
    architecture: str,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 32,
    max_shift: int = 2,
    seed: int = 0,
    progress: Progress | None = None,
) -> nn.Module:
    """Train the evaluation classifier (an architecture of the zoo, Adam, small random shifts) on real images."""
    model = build_model(architecture, tuple(x.shape[1:]), num_classes, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], max_shift, gen)), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        if progress is not None:
            progress(epoch + 1, epochs, total / len(x))
    model.eval()
    return model


def train_independent_evaluator(
    architecture: str,
    heldout: tuple[torch.Tensor, torch.Tensor],
    private: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    epochs: int = 0,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[nn.Module, dict]:
    """The evaluation classifier: another architecture trained on real images the attacker never uses.

    It learns from the held-out split when that has at least 20 images per class, else from the clients'
    private images (the protocol of GMI, Zhang et al. 2020, for faces); its accuracy is measured on the other.
    epochs=0 picks about 50,000 image presentations (30 to 200 epochs).
    """
    use_heldout = len(heldout[1]) >= 20 * num_classes
    train_on, test_on = (heldout, private) if use_heldout else (private, heldout)
    epochs = epochs or min(200, max(30, 50_000 // max(len(train_on[1]), 1)))
    model = train_evaluator(architecture, *train_on, num_classes, epochs=epochs, seed=seed, progress=progress)
    accuracy = float((predict(model, test_on[0]) == test_on[1]).float().mean())
    return model, {
        "architecture": architecture,
        "trained-on": "held-out test split" if use_heldout else "private images",
        "images": len(train_on[1]),
        "epochs": epochs,
        "accuracy": accuracy,
        "accuracy-on": "private images" if use_heldout else "held-out test split",
    }


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[s : s + batch_size]).argmax(1) for s in range(0, len(x), batch_size)])


def attack_accuracy(evaluator: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Share of generated images the evaluator assigns to their target class, overall and per class."""
    hits = predict(evaluator, images) == labels
    per_class = {int(c): float(hits[labels == c].float().mean()) for c in labels.unique(sorted=True)}
    return {"accuracy": float(hits.float().mean()), "per-class": per_class, "images": len(labels)}


def nearest_private_distance(
    images: torch.Tensor, labels: torch.Tensor, private_x: torch.Tensor, private_y: torch.Tensor
) -> np.ndarray:
    """Per generated image, the root-mean-square pixel distance (images in [0, 1]) to the nearest private image
    of its target class, float64; NaN where no private image of that class exists."""
    out = np.full(len(images), np.nan)
    flat = images.double().flatten(1)
    private = private_x.double().flatten(1)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        own = private[private_y == c]
        if len(own):
            d = torch.cdist(flat[idx], own).min(dim=1).values / np.sqrt(flat.shape[1])
            out[idx.numpy()] = d.numpy()
    return out
