"""Central DP with Flower's own strategy wrappers, and the run's privacy account (privacy.json).

The strategies stack, from the outside in, as a real server's code would have them:

    CuriousStrategy -> PrivacyLedger -> Flower's DP wrapper -> FedAvg

The curious server is the operator: it sees each reply as it arrives, before the DP wrapper clips
(server-side clipping) or noises anything. So central DP protects the *released global model*, not
the updates: with server-side clipping the curious server keeps the raw update, with client-side
clipping (Flower's `fixedclipping_mod` / `adaptiveclipping_mod` on the clients) the clipped one; the
noise comes after the capture in both.

The epsilon of the whole run is Flower's `RdpAccountant` (flwr.supercore.privacy_accounting, backed by
Google's dp-accounting): one Gaussian release per round, at the noise multiplier, for the model;
for local DP, one per round a client took part, for that client.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedsim.config import FedsimConfig
from fedsim.privacy import local_dp_calibration
from server.wrapper import StrategyWrapper

ACCOUNTING = "RDP (Flower's RdpAccountant on Google's dp-accounting)"
CENTRAL_PROTECTS = (
    "the released global model, at the level of one client's update; the curious server captures each update "
    "before the noise ({seen})"
)
SEEN = {"server": "the raw update: the server clips after capturing", "client": "the update as the client clipped it"}


def accountant(config: FedsimConfig, delta: float, sampling: SamplingMethod) -> RdpAccountant:
    """A fresh RDP accountant over the run's clients (add-or-remove-one client)."""
    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=config.num_clients,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=sampling,
        )
    )


def epsilon_of(config: FedsimConfig, noise_multiplier: float, releases: int, delta: float, sampling) -> float:
    """ε at δ of `releases` Gaussian releases on the run's sample of clients, from Flower's accountant."""
    if releases == 0:
        return 0.0
    ledger = accountant(config, delta, sampling)
    event = GaussianPrivacyEvent(noise_multiplier, config.sampled_clients(), config.num_clients)
    ledger.compose(event, releases)
    return ledger.get_epsilon(delta)


def make_dp_strategy(config: FedsimConfig, inner: Strategy) -> Strategy:
    """Flower's DP wrapper that `central-dp` names around `inner`; the inner strategy itself when none."""
    if config.central_dp == "none":
        return inner
    z, sampled = config.noise_multiplier(), config.sampled_clients()
    if config.central_dp in ("server-fixed", "client-fixed"):
        wrapper = (
            DifferentialPrivacyServerSideFixedClipping
            if config.central_dp == "server-fixed"
            else DifferentialPrivacyClientSideFixedClipping
        )
        spent = accountant(config, config.dp_delta, SamplingMethod.NO_AMPLIFICATION)
        return wrapper(inner, z, config.dp_clip_norm, sampled, accountant=spent)
    wrapper = (
        DifferentialPrivacyServerSideAdaptiveClipping
        if config.central_dp == "adaptive-server"
        else DifferentialPrivacyClientSideAdaptiveClipping
    )
    return wrapper(
        inner,
        z,
        sampled,
        initial_clipping_norm=config.dp_clip_norm,
        target_clipped_quantile=config.dp_target_quantile,
        clip_norm_lr=config.dp_clip_lr,
        clipped_count_stddev=config.clipped_count_stddev(),
    )


class PrivacyLedger(StrategyWrapper):
    """Delegates everything to `strategy` (Flower's DP wrapper, or the bare strategy) and keeps the privacy books.

    It counts the models released (rounds whose aggregation returned arrays) and, per client, the rounds it
    replied in. Flower's fixed-clipping wrappers compose their own accountant; the adaptive ones have none,
    so for them the ledger composes one Gaussian release per released model at the run's noise multiplier
    (Andrew et al.'s split of it between the update and the clipped count keeps the total at that multiplier).
    """

    def __init__(self, strategy: Strategy, config: FedsimConfig) -> None:
        super().__init__(strategy)
        self.config = config
        self.releases = 0
        self.rounds_of: dict[str, int] = {}
        self.own = None
        if config.central_dp.startswith("adaptive"):
            self.own = accountant(config, config.dp_delta, SamplingMethod.NO_AMPLIFICATION)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            if not reply.has_error():
                client = _client_of(reply)
                self.rounds_of[client] = self.rounds_of.get(client, 0) + 1
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None:
            self.releases += 1
            if self.own is not None:
                event = GaussianPrivacyEvent(
                    self.config.noise_multiplier(), self.config.sampled_clients(), self.config.num_clients
                )
                self.own.compose(event)
        return arrays, metrics

    # --- the account ---------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """What privacy.json holds: the central account (the model) and the local one (per client)."""
        out: dict[str, Any] = {}
        if self.config.central_dp != "none":
            out["central"] = self.central()
        if "ldp" in self.config.defense_list():
            out["local"] = self.local()
        return out

    def central(self) -> dict[str, Any]:
        config, z = self.config, self.config.noise_multiplier()
        spent = self.own if self.own is not None else self.strategy.accountant
        epsilon = spent.get_privacy_spent().epsilon if spent.num_releases else 0.0
        clipping = config.central_dp.split("-")
        side = "server" if "server" in clipping else "client"
        return {
            "mechanism": f"central DP, Flower's {type(self.strategy).__name__}",
            "central-dp": config.central_dp,
            "noise-multiplier": z,
            "noise-from-target-epsilon": config.dp_target_epsilon if config.dp_target_epsilon > 0 else None,
            "clip-norm": config.dp_clip_norm,
            "final-clip-norm": float(self.strategy.clipping_norm),
            "sampled-clients": config.sampled_clients(),
            "population": config.num_clients,
            "releases": self.releases,
            "epsilon": epsilon,
            "delta": config.dp_delta,
            "accounting": ACCOUNTING,
            "sampling": "no amplification (the accountant Flower's wrappers accept)",
            "epsilon-poisson-sampling": epsilon_of(config, z, self.releases, config.dp_delta, SamplingMethod.POISSON),
            "protects": CENTRAL_PROTECTS.format(seen=SEEN[side]),
        }

    def local(self) -> dict[str, Any]:
        config = self.config
        calibration, std = local_dp_calibration(
            config.ldp_epsilon, config.ldp_delta, config.ldp_clip_norm, config.ldp_calibration
        )
        z = std / config.ldp_clip_norm
        partitions = config.defense_partitions()
        clients = {}
        for client, rounds in sorted(self.rounds_of.items()):
            defended = partitions is None or (client.isdigit() and int(client) in partitions)
            epsilon = epsilon_of(config, z, rounds, config.ldp_delta, SamplingMethod.NO_AMPLIFICATION)
            clients[client] = {"rounds": rounds, "epsilon": epsilon if defended else None}
        spent = [c["epsilon"] for c in clients.values() if c["epsilon"] is not None]
        every = epsilon_of(config, z, config.num_rounds, config.ldp_delta, SamplingMethod.NO_AMPLIFICATION)
        return {
            "mechanism": "local DP, Flower's LocalDpMod (Gaussian)",
            "calibration": calibration,
            "epsilon-per-round": config.ldp_epsilon,
            "delta": config.ldp_delta,
            "clip-norm": config.ldp_clip_norm,
            "sensitivity": config.ldp_clip_norm,
            "noise-std": std,
            "noise-multiplier": z,
            "epsilon": max(spent) if spent else 0.0,
            "epsilon-every-round": every,
            "epsilon-poisson-sampling": epsilon_of(
                config, z, config.num_rounds, config.ldp_delta, SamplingMethod.POISSON
            ),
            "accounting": ACCOUNTING,
            "sampling": "none against the server: it knows whom it sampled; per client over the rounds it took part",
            "clients": clients,
            "protects": "each update a defended client sends, against the curious server",
        }


def _client_of(reply: Message) -> str:
    """The replying client's partition id (what its reply declares), else its node id."""
    if "fedsim" in reply.content.config_records:
        pid = reply.content["fedsim"].get("partition-id")
        if isinstance(pid, int) and not isinstance(pid, bool):
            return str(pid)
    return f"node-{int(reply.metadata.src_node_id)}"
