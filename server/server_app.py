"""The fedsim ServerApp: an ordinary federated training run whose strategy is curious."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from torch import nn

from fedsim.capture_policy import CapturePolicy, parse_partitions
from fedsim.captures import CaptureStore
from fedsim.config import FedsimConfig, check_run_name
from fedsim.errors import FedsimError
from fedsim.federation import Federation, evaluate, tldmi_layers
from fedsim.files import append_line, atomic_write_json, atomic_write_text, save_tensors
from fedsim.privacy import central_dp_problem
from server.curious import CuriousStrategy
from server.dp import PrivacyLedger, make_dp_strategy
from server.imprint import TamperingStrategy, server_field, tamper_with
from server.nodes import BoundedGrid
from server.secagg import run_secure
from server.strategies import make_strategy

RoundHook = Callable[[dict], None]
UNTESTED = {"test-loss": None, "test-accuracy": None}  # what a round without a test split reports


def run_dir_for(config: FedsimConfig) -> Path:
    """runs/<run-id>/: the run name, or a time stamp with dataset, model and seed; always inside out-dir."""
    name = config.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{config.dataset}-{config.model}-s{config.seed}"
    out_dir = Path(config.out_dir)
    run_dir = out_dir / check_run_name(name)
    # A symbolic link named like the run could still lead elsewhere: what is written must stay in out-dir.
    if not run_dir.resolve().is_relative_to(out_dir.resolve()):
        raise FedsimError(f"run folder {run_dir} leads outside out-dir {out_dir}; choose another run-name")
    return run_dir


def trainable_names(config: FedsimConfig, model: nn.Module) -> list[str]:
    """The parameters the clients train, for the capture records' "trainable".

    Under TL-DMI on every client, the last `tldmi-layers` layers only. With `defense-clients` set,
    every parameter: the TL-DMI clients declare their own "trainable" list in their "declared".
    """
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if "tldmi" in config.defense_list() and config.defense_partitions() is None:
        last = set(tldmi_layers(model, config.tldmi_layers))
        names = [name for name in names if name.rpartition(".")[0] in last]
    return names


def policy_of(config: FedsimConfig) -> CapturePolicy:
    """The capture policy the run's capture-* keys name."""
    return CapturePolicy(
        config.capture_policy, config.capture_fraction, parse_partitions(config.capture_partitions), config.seed
    )


def server_strategy(
    config: FedsimConfig,
    store: CaptureStore | None,
    describe: dict,
    on_round: Callable[[int, dict, int, float], None] | None = None,
    curious: bool = True,
) -> tuple[Strategy, PrivacyLedger | None]:
    """The run's strategy, outside in: CuriousStrategy -> PrivacyLedger -> Flower's DP wrapper -> FedAvg.

    The DP wrapper sits inside the curious one, where a real server's own code is: the capture sees each
    reply as it arrives, before the wrapper clips (server-side) or adds noise. The ledger, present when the
    run has central or local DP, keeps the privacy account. `curious=False` leaves the curious wrapper out.
    """
    inner = make_dp_strategy(config, make_strategy(config))
    ledger = PrivacyLedger(inner, config) if config.central_dp != "none" or "ldp" in config.defense_list() else None
    inner = ledger or inner
    curious_strategy = CuriousStrategy(
        inner, store, describe, on_round=on_round, num_partitions=config.num_clients, policy=policy_of(config)
    )
    return (curious_strategy if curious else inner), ledger


def run_server(
    grid: Grid,
    config: FedsimConfig,
    run_dir: Path,
    on_round: RoundHook | None = None,
    curious: bool = True,
    flower_run_id: int | None = None,
    context: Context | None = None,
) -> dict:
    """Train for `num-rounds`, capturing every update; write the final model and per-round metrics.

    `curious=False` runs the bare inner strategy (no wrapper at all): the baseline of the overhead benchmark.
    """
    grid = BoundedGrid(grid, config.num_clients)
    grid.wait()  # before any data is read: too few SuperNodes is one clear error, not an endless wait
    fed = Federation.from_config(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", config.to_toml())
    # Flower's id of this run: what `flwr log`, `flwr list` and `flwr stop` take.
    atomic_write_json(run_dir / "run.json", {"run": run_dir.name, "flower-run-id": flower_run_id})
    atomic_write_json(run_dir / "shards.json", fed.summary())

    model = fed.build_model()
    tampering, tampered = tamper_with(fed, model)
    problem = check_dp(config, fed, model)
    if problem:
        raise FedsimError(problem)
    if "tldmi" in config.defense_list():
        # TL-DMI: the early layers are pre-trained on public data (or loaded) before round 1.
        pretrain = fed.pretrain_public(model)
        accuracy = pretrain.get("public-test-accuracy")
        if accuracy is not None and accuracy < 2 / max(fed.data.num_classes, 2):
            pretrain["warning"] = (
                f"the public pre-training reached only {accuracy:.1%} test accuracy (near chance): the frozen "
                "layers are barely trained; raise tldmi-pretrain-epochs"
            )
            logging.getLogger("fedsim").warning("TL-DMI: %s", pretrain["warning"])
        public = config.tldmi_public or f"{config.dataset} classes {config.public_classes}"
        atomic_write_json(run_dir / "tldmi-pretrain.json", {"public": public, **pretrain})
    test_x, test_y = fed.test_split()
    if len(test_x) == 0:
        logging.getLogger("fedsim").warning(
            "%s has no test split: the global model's accuracy is not measured", config.dataset
        )
    describe = {
        "run": run_dir.name,
        "model": config.model,
        "dataset": config.dataset,
        "input_shape": list(fed.data.input_shape),
        "num_classes": fed.data.num_classes,
        "trainable": trainable_names(config, model),
        "server": server_field(config, tampering),
    }
    store = CaptureStore(run_dir / "captures", config.capture_dtype) if config.capture else None
    rounds: dict[int, dict] = {}

    def record_train(server_round: int, train_metrics: dict, captured: int, seconds: float) -> None:
        rounds[server_round] = {
            "train-loss": train_metrics.get("train-loss"),
            "captures": captured,
            "capture-seconds": round(seconds, 4),
        }

    strategy, ledger = server_strategy(config, store, describe, record_train, curious)
    if tampering is not None:  # outside the curious wrapper: the captured global model is the tampered one
        strategy = TamperingStrategy(strategy, tampered)

    def global_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        metrics = evaluate(model, test_x, test_y)
        row = {"round": server_round, **rounds.get(server_round, {}), **metrics, "time": time.time()}
        append_line(run_dir / "training.jsonl", json.dumps(row))
        if on_round is not None:
            on_round(row)
        return MetricRecord({k: v for k, v in metrics.items() if v is not None})  # numbers only

    train_config = {
        "recipe": config.recipe,
        "lr": config.lr,
        "batch-size": config.batch_size,
        "local-epochs": config.local_epochs,
    }
    if config.save_truth:
        train_config["truth-dir"] = str((run_dir / "truth").resolve())
    if config.secure_aggregation:  # Flower's SecAgg+ through the legacy workflow API (server/secagg.py)
        result = run_secure(
            grid,
            context,
            config,
            model.state_dict(),
            store=store,
            describe=describe,
            recipe=train_config,
            tampered=tampered,
            evaluate=global_evaluate,
            on_round=record_train,
            # the most examples one reply can weigh: a FedSGD batch, or a whole shard under FedAvg
            max_examples=config.batch_size if config.recipe == "fedsgd" else max(len(s) for s in fed.shards),
        )
    else:
        if store is not None:  # a round's captures are written while the next round trains
            store.write_in_background()
        try:
            result = strategy.start(
                grid=grid,
                initial_arrays=ArrayRecord(model.state_dict()),
                num_rounds=config.num_rounds,
                train_config=ConfigRecord(train_config),
                evaluate_fn=global_evaluate,
            )
        finally:
            if store is not None:
                store.close()  # every capture on disk (or the first write that failed raised) before the summary

    model.load_state_dict(result.arrays.to_torch_state_dict())
    save_tensors(run_dir / "model.safetensors", model.state_dict(), {"model": config.model})
    summary = {"run": run_dir.name, "rounds": []}
    for server_round, evaluation in sorted(result.evaluate_metrics_serverapp.items()):
        train = dict(result.train_metrics_clientapp.get(server_round, {}))
        row = {"round": server_round, "train-loss": train.get("train-loss"), **UNTESTED, **dict(evaluation)}
        if server_round in rounds:
            row["captures"] = rounds[server_round]["captures"]
        summary["rounds"].append(row)
    if ledger is not None:
        atomic_write_json(run_dir / "privacy.json", ledger.report())
    atomic_write_json(run_dir / "training.json", summary)
    return summary


def check_dp(config: FedsimConfig, fed: Federation, model: nn.Module) -> str | None:
    """Why central DP cannot run on this federation's shards and model (before any training), or None."""
    sizes = [row["size"] for row in fed.summary()]
    dtypes = {name: str(t.dtype) for name, t in model.state_dict().items()}
    return central_dp_problem(config.central_dp, config.recipe, sizes, dtypes)


def make_server_app(
    config: FedsimConfig | None = None,
    run_dir: Path | None = None,
    on_round: RoundHook | None = None,
    curious: bool = True,
) -> ServerApp:
    """A ServerApp bound to `config`, or reading the Flower run config when None (`flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config or FedsimConfig.from_run_config(context.run_config)
        run_server(
            grid, cfg, run_dir or run_dir_for(cfg), on_round, curious, flower_run_id=context.run_id, context=context
        )

    return app


app = make_server_app()
