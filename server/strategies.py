"""Flower's own strategies, by the names fedsim's config uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Krum, Strategy

from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError

STRATEGIES: dict[str, Callable[[FedsimConfig, dict[str, Any]], Strategy]] = {
    "fedavg": lambda config, sampling: FedAvg(**sampling),
    "fedprox": lambda config, sampling: FedProx(**sampling, proximal_mu=config.proximal_mu),
    "fedadam": lambda config, sampling: FedAdam(**sampling, eta=config.server_lr, eta_l=config.lr),
    "fedmedian": lambda config, sampling: FedMedian(**sampling),
    "krum": lambda config, sampling: Krum(**sampling, num_malicious_nodes=config.num_malicious),
}
"""Each strategy name (fedsim.config.STRATEGIES, in its order) and how it is built from a run's config."""


def make_strategy(config: FedsimConfig) -> Strategy:
    """The inner strategy a run asks for. Every client must connect; federated evaluation is off
    because the server measures the global model on the test split itself."""
    sampling = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": 0.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 0,
        "min_available_nodes": config.num_clients,
    }
    if config.strategy not in STRATEGIES:
        raise FedsimError(f"strategy = {config.strategy!r} is not allowed; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[config.strategy](config, sampling)
