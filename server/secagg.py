"""Secure aggregation with Flower's own SecAgg+: the server learns only the aggregate of each round.

Flower 1.41 runs SecAgg+ (`SecAggPlusWorkflow`) through the legacy ServerApp workflow API: a `LegacyContext`
holding a legacy strategy (flwr.server.strategy.FedAvg) that `DefaultWorkflow` drives round by round. The
workflow unmasks only the sum of the clients' masked, quantised, weighted parameters and hands the strategy
that aggregate (every legacy result carries it); a curious server keeps exactly that, one capture per round.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import FitIns, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from fedsim.captures import CaptureStore
from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError

AGGREGATE_CLIENT = 0
"""The "client" of an aggregate's capture record: no single client sent it (node ids are never 0)."""


def to_state(names: list[str], like: dict[str, torch.Tensor], parameters: Parameters) -> dict[str, torch.Tensor]:
    """Legacy Parameters back to a state dict, in the model's order and dtypes."""
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(names):
        raise FedsimError(f"secure aggregation returned {len(arrays)} tensors for a model of {len(names)}")
    return {
        n: torch.from_numpy(np.asarray(a)).to(like[n].dtype).reshape(like[n].shape)
        for n, a in zip(names, arrays, strict=True)
    }


class CapturingFedAvg(FedAvg):
    """Flower's legacy FedAvg, with the curious server's captures: the global model sent, the aggregate received."""

    def __init__(
        self,
        *,
        names: list[str],
        like: dict[str, torch.Tensor],
        store: CaptureStore | None,
        describe: dict,
        recipe: dict,
        tampered: dict[str, torch.Tensor] | None,
        on_round: Callable[[int, dict, int, float], None] | None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.names, self.like, self.store, self.describe = names, like, store, describe
        self.recipe, self.tampered, self.on_round = recipe, tampered or {}, on_round
        self.train_metrics: dict[int, dict] = {}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager) -> list[tuple]:
        state = to_state(self.names, self.like, parameters)
        if self.tampered:  # the cheating server re-imprints every global model it sends
            state.update({k: v.clone() for k, v in self.tampered.items()})
            parameters = ndarrays_to_parameters([state[n].numpy() for n in self.names])
        pairs = super().configure_fit(server_round, parameters, client_manager)
        config = {**self.recipe, "server-round": server_round}
        pairs = [(proxy, FitIns(fitins.parameters, {**fitins.config, **config})) for proxy, fitins in pairs]
        if self.store is not None and pairs:
            self.store.write_global(
                server_round,
                state,
                {**self.describe, "recipe": self._recipe(), "clients": [int(p.node_id) for p, _ in pairs]},
            )
        return pairs

    def _recipe(self) -> dict:
        return {k: v for k, v in self.recipe.items() if k in ("recipe", "lr", "batch-size", "local-epochs")}

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Parameters | None, dict]:
        captured = 0
        if results and self.store is not None:
            # Every result carries the same unmasked aggregate; what each client sent stays masked.
            aggregate = to_state(self.names, self.like, results[0][1].parameters)
            examples = [int(fitres.num_examples) for _, fitres in results]
            losses = [float(fitres.metrics.get("train-loss", float("nan"))) for _, fitres in results]
            meta = {
                **self.describe,
                "recipe": self._recipe(),
                "num_examples": sum(examples),
                "train_loss": float(np.average(losses, weights=examples)) if sum(examples) else None,
                "partition_id": None,
                "declared": {},
                "aggregate_of": [int(proxy.node_id) for proxy, _ in results],
            }
            self.store.write_update(server_round, AGGREGATE_CLIENT, aggregate, meta)
            captured = 1
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None and self.tampered:  # re-imprinted, as server/imprint.py does
            state = {**to_state(self.names, self.like, parameters), **self.tampered}
            parameters = ndarrays_to_parameters([state[n].numpy() for n in self.names])
        examples = sum(int(fitres.num_examples) for _, fitres in results) or 1
        loss = sum(float(fitres.metrics.get("train-loss", 0.0)) * fitres.num_examples for _, fitres in results)
        self.train_metrics[server_round] = {"train-loss": loss / examples}
        if self.on_round is not None:
            self.on_round(server_round, self.train_metrics[server_round], captured, 0.0)
        return parameters, metrics


def run_secure(
    grid,
    context: Context,
    config: FedsimConfig,
    state: dict[str, torch.Tensor],
    *,
    store: CaptureStore | None,
    describe: dict,
    recipe: dict,
    tampered: dict[str, torch.Tensor] | None,
    evaluate: Callable[[int, ArrayRecord], MetricRecord],
    on_round: Callable[[int, dict, int, float], None] | None,
    max_examples: int,
) -> Result:
    """Train `num-rounds` under SecAgg+; returns what Message-API strategies return, for the same bookkeeping."""
    names = list(state)
    evaluations: dict[int, MetricRecord] = {}

    def evaluate_fn(server_round: int, ndarrays: list, _config: dict) -> tuple[float, dict]:
        metrics = evaluate(server_round, ArrayRecord(to_state(names, state, ndarrays_to_parameters(ndarrays))))
        evaluations[server_round] = metrics
        return float(metrics.get("test-loss", 0.0)), dict(metrics)

    sampled = max(1, int(config.fraction_train * config.num_clients))
    strategy = CapturingFedAvg(
        names=names,
        like=state,
        store=store,
        describe=describe,
        recipe=recipe,
        tampered=tampered,
        on_round=on_round,
        fraction_fit=config.fraction_train,
        fraction_evaluate=0.0,
        min_fit_clients=sampled,
        min_evaluate_clients=0,
        min_available_clients=config.num_clients,
        evaluate_fn=evaluate_fn,
        initial_parameters=ndarrays_to_parameters([state[n].numpy() for n in names]),
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=config.num_rounds), strategy=strategy)
    fit = SecAggPlusWorkflow(
        num_shares=min(config.secagg_num_shares, sampled),
        reconstruction_threshold=config.secagg_threshold,
        # The weight is the client's example count: with max-weight at the largest one, it is not scaled
        # down before quantisation, which keeps the aggregate's digits.
        max_weight=float(max_examples),
        quantization_range=config.secagg_quantization_range,
    )
    log(INFO, "Secure aggregation: SecAgg+ with %s shares, threshold %s", fit.num_shares, config.secagg_threshold)
    DefaultWorkflow(fit_workflow=fit)(grid, legacy)
    final = legacy.state.array_records["parameters"] if "parameters" in legacy.state.array_records else None
    arrays = ArrayRecord(to_state(names, state, _legacy_parameters(final))) if final is not None else ArrayRecord(state)
    return Result(
        arrays=arrays,
        train_metrics_clientapp={r: MetricRecord(m) for r, m in strategy.train_metrics.items()},
        evaluate_metrics_serverapp=evaluations,
    )


def _legacy_parameters(record) -> Parameters:
    from flwr.compat.common import recorddict_compat as compat

    return compat.arrayrecord_to_parameters(record, keep_input=True)
