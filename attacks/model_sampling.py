"""Farthest model sampling (FMS, Wang & Kurz 2022): a diverse subset of candidate models, picked greedily by their
pairwise distances, in weights or in softmax outputs on probe images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.contract import StateDict
from fedsim.errors import FedsimError

DISTANCES = ("weights", "outputs")


def weight_distances(states: Sequence[StateDict]) -> np.ndarray:
    """Pairwise L2 distances [M, M] between models' flattened floating-point parameters (float64)."""
    flat = torch.stack(
        [torch.cat([v.detach().double().flatten() for v in s.values() if v.is_floating_point()]) for s in states]
    )
    return torch.cdist(flat, flat).numpy()


@torch.no_grad()
def output_distances(models: Sequence[nn.Module], probe: torch.Tensor) -> np.ndarray:
    """Pairwise distances [M, M]: mean L2 distance between models' softmax outputs on the probe images."""
    probs = torch.stack([F.softmax(m(probe).double(), dim=1) for m in models])  # [M, N, K]
    diff = probs.unsqueeze(0) - probs.unsqueeze(1)
    return diff.norm(dim=3).mean(dim=2).numpy()


def farthest_model_sampling(distances: np.ndarray, k: int, first: int | None = None) -> list[int]:
    """Greedy farthest-point sampling: start at `first` (default: the last, most recent model), then repeatedly
    add the model whose distance to its nearest already-chosen model is largest (ties: the lowest index)."""
    d = np.asarray(distances, dtype=np.float64)
    m = len(d)
    if d.shape != (m, m):
        raise FedsimError(f"FMS needs a square distance matrix; got {d.shape}")
    if not 1 <= k <= m:
        raise FedsimError(f"FMS cannot pick {k} of {m} models; choose 1 <= k <= {m}")
    chosen = [m - 1 if first is None else first]
    nearest = d[chosen[0]].copy()
    while len(chosen) < k:
        nearest[chosen] = -np.inf
        nxt = int(np.argmax(nearest))
        chosen.append(nxt)
        nearest = np.minimum(nearest, d[nxt])
    return chosen


def fms_distances(
    kind: str, states: Sequence[StateDict], models: Sequence[nn.Module], probe: torch.Tensor
) -> np.ndarray:
    """FMS distances between candidate models: "weights" (L2 between parameters) or "outputs" (softmax outputs on
    the probe images)."""
    if kind == "weights":
        return weight_distances(states)
    if kind != "outputs":
        raise FedsimError(f"unknown FMS distance {kind!r}; choose weights or outputs")
    return output_distances(models, probe[:256])
