"""Flower's own strategies, by the names fedsim's config uses."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Krum, Strategy

from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError


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
    if config.strategy == "fedavg":
        return FedAvg(**sampling)
    if config.strategy == "fedprox":
        return FedProx(**sampling, proximal_mu=config.proximal_mu)
    if config.strategy == "fedadam":
        return FedAdam(**sampling, eta=config.server_lr, eta_l=config.lr)
    if config.strategy == "fedmedian":
        return FedMedian(**sampling)
    if config.strategy == "krum":
        return Krum(**sampling, num_malicious_nodes=config.num_malicious)
    raise FedsimError(
        f"strategy = {config.strategy!r} is not allowed; choose one of: fedavg, fedprox, fedadam, fedmedian, krum"
    )
