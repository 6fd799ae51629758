"""The fedsim ClientApp: trains on its private shard with the recipe the server's message asks for."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.defenses import CentralDpClipping, defense_mods
from clients.secagg import is_secure, secaggplus_when_asked, secure_train
from clients.training import fedsgd_batch, round_generator, train_fedavg, train_fedsgd
from fedsim.config import FedsimConfig
from fedsim.federation import device, federation_for, freeze_for_tldmi
from fedsim.files import save_tensors


def partition_of(context: Context, config: FedsimConfig) -> int:
    """This node's shard: `partition-id` from the node config (simulation and deployment alike)."""
    partition_id = int(context.node_config.get("partition-id", 0))
    if not 0 <= partition_id < config.num_clients:
        raise ValueError(
            f"partition-id {partition_id} is outside 0..{config.num_clients - 1} (num-clients = {config.num_clients})"
        )
    partitions = context.node_config.get("num-partitions")
    if partitions is not None and int(partitions) != config.num_clients:
        # The shards are cut for num-clients clients: another count would give this node someone else's data.
        raise ValueError(
            f"this SuperNode's node config says num-partitions={partitions} but the run has num-clients = "
            f"{config.num_clients}: start the SuperNodes with num-partitions={config.num_clients} "
            f"or run with --run-config 'num-clients={partitions}'"
        )
    return partition_id


def local_train(msg: Message, context: Context, config: FedsimConfig) -> Message:
    """Train on this client's shard with the recipe in the message's config, reply with the new weights."""
    if is_secure(msg):  # SecAgg+'s legacy-format round (clients/secagg.py)
        return secure_train(msg, context, config, train_on_shard)
    return Message(content=train_on_shard(msg.content["arrays"], msg.content["config"], context, config), reply_to=msg)


def train_on_shard(arrays: ArrayRecord, recipe: ConfigRecord, context: Context, config: FedsimConfig) -> RecordDict:
    """The reply's content: the weights after local training, the metrics and what the client declares."""
    fed = federation_for(config)
    partition_id = partition_of(context, config)
    server_round = int(recipe["server-round"])
    dev = device()

    model = fed.build_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    if config.defends(partition_id, "tldmi"):  # TL-DMI: train only the last k layers (clients/defenses.py)
        freeze_for_tldmi(model, config.tldmi_layers)
    model.to(dev)
    x, y, indices = fed.shard(partition_id)
    rng = round_generator(config.seed, server_round, partition_id)
    mode, lr, batch_size = str(recipe["recipe"]), float(recipe["lr"]), int(recipe["batch-size"])
    if mode == "fedsgd":
        chosen = fedsgd_batch(len(x), batch_size, rng)
        x, y, indices = x[chosen], y[chosen], indices[chosen]
        loss = train_fedsgd(model, x.to(dev), y.to(dev), lr)
    else:
        mu = float(recipe["proximal-mu"]) if "proximal-mu" in recipe else 0.0
        loss = train_fedavg(model, x.to(dev), y.to(dev), lr, int(recipe["local-epochs"]), batch_size, rng, mu)

    if "truth-dir" in recipe:  # simulation only, opt-in: what scoring compares reconstructions against
        path = Path(str(recipe["truth-dir"])) / f"round-{server_round:04d}" / f"client-{context.node_id}.safetensors"
        save_tensors(
            path,
            {"images": x.cpu(), "labels": y.cpu(), "indices": torch.from_numpy(indices)},
            {"partition-id": str(partition_id), "recipe": mode},
        )

    return RecordDict(
        {
            "arrays": ArrayRecord(model.cpu().state_dict()),
            "metrics": MetricRecord({"num-examples": len(x), "train-loss": loss}),
            "fedsim": ConfigRecord({"partition-id": partition_id, "recipe": mode}),
        }
    )


def make_client_app(config: FedsimConfig | None = None) -> ClientApp:
    """A ClientApp bound to `config`, or reading the Flower run config when None (`flwr run`).

    Every defense mod is installed; each acts only when the run's config turns it on for this client.
    """
    app = ClientApp()

    # SecAgg+ masks the reply last; central DP's clipping acts after the client's own defenses
    @app.train(mods=[secaggplus_when_asked, CentralDpClipping(config), *defense_mods(config)])
    def train(msg: Message, context: Context) -> Message:
        return local_train(msg, context, config or FedsimConfig.from_run_config(context.run_config))

    return app


app = make_client_app()
