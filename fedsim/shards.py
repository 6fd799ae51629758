"""Disjoint, seeded client shards: IID or Dirichlet(alpha) label skew, with a per-client summary."""

from __future__ import annotations

import numpy as np
import torch

from fedsim.errors import FedsimError

MAX_DIRICHLET_TRIES = 1000


def partition(
    labels: torch.Tensor,
    num_clients: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    examples_per_client: int = 0,
) -> list[np.ndarray]:
    """Split example indices into `num_clients` disjoint shards; the same arguments give the same shards.

    Dirichlet: for each class, the share each client receives is drawn from Dir(alpha) (Hsu et al. 2019);
    draws are repeated until every client holds at least one example.
    """
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    n = len(y)
    if num_clients > n:
        raise FedsimError(
            f"num-clients = {num_clients} is more than the {n} training examples; use at most {n} clients"
        )
    if alpha <= 0:
        raise FedsimError(f"alpha = {alpha} must be > 0")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        shards = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "dirichlet":
        shards = _dirichlet(y, num_clients, alpha, rng)
    else:
        raise FedsimError(f"partition = {scheme!r} is not allowed; choose one of: iid, dirichlet")
    shards = [np.sort(s) for s in shards]
    if examples_per_client:
        # Keep a seeded random subset, so a small shard is still drawn from the whole shard's classes.
        shards = [np.sort(rng.permutation(s)[:examples_per_client]) for s in shards]
    return shards


def _dirichlet(y: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(y)
    for _ in range(MAX_DIRICHLET_TRIES):
        buckets: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, part in enumerate(np.split(members, cuts)):
                buckets[client].extend(part.tolist())
        if min(len(b) for b in buckets) > 0:
            return [np.array(b, dtype=np.int64) for b in buckets]
    raise FedsimError(
        f"Dirichlet alpha = {alpha} leaves some of the {num_clients} clients without any example "
        f"after {MAX_DIRICHLET_TRIES} draws; raise alpha or use fewer clients"
    )


def summary(shards: list[np.ndarray], labels: torch.Tensor, num_classes: int) -> list[dict]:
    """Per client: the shard size and its class histogram."""
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    return [
        {"client": k, "size": int(len(s)), "classes": np.bincount(y[s], minlength=num_classes).tolist()}
        for k, s in enumerate(shards)
    ]


def check_batch_size(shards: list[np.ndarray], batch_size: int) -> None:
    """Refuse a batch size that no client could fill."""
    smallest = min(len(s) for s in shards)
    if batch_size > smallest:
        raise FedsimError(
            f"batch-size = {batch_size} is larger than the smallest shard ({smallest} examples); "
            f"use batch-size <= {smallest}, fewer clients or a larger alpha"
        )
