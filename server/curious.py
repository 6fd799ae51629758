"""CuriousStrategy: wraps any Flower strategy and captures every client update before aggregating.

Like Flower's DP wrappers (`DifferentialPrivacyServerSideFixedClipping`), it delegates every
decision to the inner strategy, so the model it trains is exactly what the inner strategy
computes. It only reads: the global weights it sends, and each reply it receives.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedsim.capture_policy import CapturePolicy
from fedsim.captures import MAX_EXAMPLES, MAX_TEXT, BadValue, CaptureStore, check_declared, check_int, check_number
from server.reply_arrays import record_arrays
from server.wrapper import StrategyWrapper

RECIPE_KEYS = ("recipe", "lr", "batch-size", "local-epochs", "proximal-mu")
UNSAFE = re.compile(r"[^A-Za-z0-9 .,:;()'_+-]")


def plain(text: str, limit: int = 300) -> str:
    """A refusal that quotes what a client sent, with every character that could be markup replaced by '?'."""
    return UNSAFE.sub("?", text[:limit])


class CuriousStrategy(StrategyWrapper):
    """An honest-but-curious wrapper: aggregation unchanged, every update written to a capture store.

    Parameters
    ----------
    strategy : the inner Flower strategy that decides sampling and aggregation.
    store : where captures go; None keeps nothing (the same wrapper, minus the curiosity).
    describe : metadata written with every capture (model name, input shape, dataset, ...).
    on_round : called after each round's aggregation with (round, aggregated train metrics, captures written,
        seconds spent writing captures).
    num_partitions : the partition ids a client may declare are 0..num_partitions-1 (None: any non-negative).
    policy : which of a round's updates are written (fedsim.capture_policy; default: all). A client that
        declares no partition id is selected by its node id. Failures and the global weights are always written.

    What a client sends is untrusted: a reply whose partition id, metrics or declared defenses break the
    capture schema is recorded as a failure, and none of its fields reach the manifest. So is a selected reply
    whose arrays are not plain numbers of the dtype and shape they declare, or hold NaN or infinity (they are
    decoded, and checked, only when the policy keeps the reply).
    """

    def __init__(
        self,
        strategy: Strategy,
        store: CaptureStore | None,
        describe: dict[str, Any] | None = None,
        on_round: Callable[[int, dict, int, float], None] | None = None,
        num_partitions: int | None = None,
        policy: CapturePolicy | None = None,
    ) -> None:
        super().__init__(strategy)
        self.store = store
        self.describe = describe or {}
        self.on_round = on_round
        self.num_partitions = num_partitions
        self.policy = policy or CapturePolicy()
        self._global: tuple[int, dict] | None = None  # the round's global state, the base of float16 updates
        self.recipes: dict[int, dict[str, Any]] = {}
        self.train_metrics: dict[int, dict[str, Any]] = {}
        self.capture_seconds: dict[int, float] = {}  # time spent writing captures, per round

    def summary(self) -> None:
        log(INFO, "\t├──> Curious server: captures to %s", self.store.root if self.store else "(off)")
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        start = time.perf_counter()
        # The recipe as the clients receive it (the inner strategy may add keys, e.g. FedProx's mu).
        sent = dict(messages[0].content["config"]) if messages else dict(config)
        self.recipes[server_round] = {k: sent[k] for k in RECIPE_KEYS if k in sent}
        if self.store is not None and messages:
            state = arrays.to_torch_state_dict()
            self._global = (server_round, state)
            self.store.write_global(
                server_round,
                state,
                {
                    **self.describe,
                    "recipe": self.recipes[server_round],
                    "clients": [m.metadata.dst_node_id for m in messages],
                },
            )
        self.capture_seconds[server_round] = time.perf_counter() - start
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        written, start = 0, time.perf_counter()
        if self.store is not None:
            written = self._capture_round(server_round, replies)
        self.capture_seconds[server_round] = self.capture_seconds.get(server_round, 0.0) + time.perf_counter() - start
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        self.train_metrics[server_round] = dict(metrics) if metrics is not None else {}
        if self.on_round is not None:
            self.on_round(server_round, self.train_metrics[server_round], written, self.capture_seconds[server_round])
        return arrays, metrics

    def _capture_round(self, server_round: int, replies: list[Message]) -> int:
        """Write the round's failures, and the updates the policy selects; the number of updates written."""
        accepted, failures = [], []
        for reply in replies:
            checked = self._checked(reply, failures)
            if checked is not None:
                accepted.append(checked)
        chosen = self.policy.select(server_round, [key for key, *_ in accepted])
        base = self._global[1] if self._global is not None and self._global[0] == server_round else None
        recipe = self.recipes.get(server_round, {})
        updates = []
        for key, node, arrays, reported in accepted:
            if key in chosen and (state := self._state(node, arrays, failures)) is not None:
                updates.append((node, state, {**self.describe, "recipe": recipe, **reported}))
        if failures:
            self.store.write_failures(server_round, failures)
        self.store.write_updates(server_round, updates, base=base)  # the round's files synced together
        return len(updates)

    def _capture(self, server_round: int, reply: Message) -> int:
        """Capture one reply (as if it were the round's only one)."""
        return self._capture_round(server_round, [reply])

    def _checked(self, reply: Message, failures: list[tuple[int, str]]) -> tuple[int, int, ArrayRecord, dict] | None:
        """(selection key, node, arrays, what it reported) of a usable reply; None after adding it to `failures`."""
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            failures.append((node, str(reply.error.reason)[:MAX_TEXT]))
            return None
        content = reply.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            failures.append((node, "reply without exactly one ArrayRecord and one MetricRecord"))
            return None
        try:
            reported = self._reported(content)
        except BadValue as exc:
            failures.append((node, f"reply refused: {plain(str(exc))}"))
            return None
        key = node if reported["partition_id"] is None else reported["partition_id"]
        return key, node, next(iter(content.array_records.values())), reported

    @staticmethod
    def _state(node: int, arrays: ArrayRecord, failures: list[tuple[int, str]]) -> dict[str, torch.Tensor] | None:
        """A selected reply's weights, decoded and checked in one pass over each array (server.reply_arrays
        `record_arrays`: real dtype, declared dtype and shape, finite values, never unpickled) and handed to the
        writer as tensors on the same memory; None after adding the reply to `failures`."""
        try:
            values = record_arrays(arrays)
        except BadValue as exc:
            failures.append((node, f"reply refused: {plain(str(exc))}"))
            return None
        return {name: torch.from_numpy(value) for name, value in values.items()}

    def _reported(self, content) -> dict[str, Any]:
        """What the client says about its update, checked against the capture schema (BadValue if it breaks it)."""
        metrics = dict(next(iter(content.metric_records.values())))
        declared = dict(content["fedsim"]) if "fedsim" in content.config_records else {}
        partition_id = declared.pop("partition-id", None)
        if partition_id is not None:
            top = self.num_partitions - 1 if self.num_partitions else 10**9
            check_int("partition-id", partition_id, 0, top)
        train_loss = metrics.get("train-loss")
        return {
            "num_examples": check_int("num-examples", metrics.get("num-examples", 0), 0, MAX_EXAMPLES),
            "train_loss": None if train_loss is None else check_number("train-loss", train_loss),
            "partition_id": partition_id,
            "declared": check_declared(declared),
        }
