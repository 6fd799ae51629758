"""A server that cheats: it puts Robbing the Fed's imprint block in every global model it sends (fedsim/imprint.py),
or trap weights in its first fully connected layer (fedsim/trap.py)."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedsim.config import FedsimConfig
from fedsim.datasets import to_float
from fedsim.errors import FedsimError
from fedsim.federation import Federation
from fedsim.imprint import ImprintedModel, imprint_state, tamper
from fedsim.trap import set_traps, trap_state
from server.wrapper import StrategyWrapper


def tamper_with(fed: Federation, model: torch.nn.Module) -> tuple[dict | None, dict[str, torch.Tensor] | None]:
    """How the server tampers with `model` (for the records) and the tensors it writes into every global model it
    sends; (None, None) for an honest-but-curious server."""
    if fed.config.server_mode == "imprint":
        tampering = tamper_imprint(fed, model)
        return tampering, imprint_state(model)
    if fed.config.server_mode == "trap":
        public_x = to_float(fed.data.test_x)
        tampering = set_traps(model, fed.data.input_shape, public_x, fed.config.captured_examples(), fed.config.seed)
        return tampering, trap_state(model, fed.data.input_shape)
    return None, None


def tamper_imprint(fed: Federation, model: ImprintedModel) -> dict:
    """Set the imprint rows from the server's public data (the test split, disjoint from the clients' shards)."""
    public_x = to_float(fed.data.test_x)
    if len(public_x) < 2:
        raise FedsimError(
            f"server-mode = imprint places its bins from public data, the test split of {fed.config.dataset}, "
            "which this dataset lacks"
        )
    return tamper(model, public_x, fed.config.imprint_statistic, fed.config.seed)


def server_field(config: FedsimConfig, tampering: dict | None) -> dict:
    """The capture records' "server": how this server behaved (honest-but-curious, or how it tampered)."""
    secure = {"secure-aggregation": config.secure_aggregation}
    return {**(tampering or {"mode": "curious", "tampered": []}), **secure}


class TamperingStrategy(StrategyWrapper):
    """Delegates everything to the inner strategy, but writes the tampered rows (imprint or trap) into the weights it
    sends and into the aggregate it keeps: one client step moves the imprint rows far from where the public data
    put the bins (a global model with moved rows would shift its inputs by far more than a brightness change), and
    moves trap rows off the traps.
    """

    def __init__(self, strategy: Strategy, tampered: dict[str, torch.Tensor]) -> None:
        super().__init__(strategy)
        self.tampered = tampered

    def summary(self) -> None:
        log(INFO, "\t├──> Cheating server: tampered %s in every global model", ", ".join(self.tampered))
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, self._reimprint(arrays), config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        return (self._reimprint(arrays) if arrays is not None else None), metrics

    def _reimprint(self, arrays: ArrayRecord) -> ArrayRecord:
        state = arrays.to_torch_state_dict()
        state.update({k: v.clone() for k, v in self.tampered.items()})
        return ArrayRecord(state)
