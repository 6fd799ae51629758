"""Run a fedsim config on Flower's Simulation Engine: clients as Ray actors, CPUs or GPUs."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError
from fedsim.federation import Federation

OFFLINE_FLOWER = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # Ray's future default, and it silences a warning
}


def flower_offline() -> None:
    """Keep Flower from reaching the network: no telemetry, no update check, no runtime installs."""
    for key, value in OFFLINE_FLOWER.items():
        os.environ.setdefault(key, value)


def backend_config(config: FedsimConfig) -> dict:
    """Flower's Ray backend settings: resources per client actor (a GPU fraction puts actors on GPUs)."""
    return {
        "client_resources": {"num_cpus": config.client_num_cpus, "num_gpus": config.client_num_gpus},
        "init_args": {"log_to_driver": False, "logging_level": "error"},
    }


def simulate(
    config: FedsimConfig,
    run_dir: Path,
    on_round: Callable[[dict], None] | None = None,
    verbose: bool = False,
    curious: bool = True,
) -> Path:
    """Run the federation `config` describes; captures, metrics and the final model land in `run_dir`."""
    # Refuse bad data, shards or batch sizes here, before Ray starts and workers fail one by one.
    fed = Federation.from_config(config)
    model = fed.build_model()
    if (run_dir / "captures" / "manifest.jsonl").exists():
        raise FedsimError(f"{run_dir} already holds a run; choose another --name or remove that folder")
    flower_offline()
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from server.server_app import check_dp, make_server_app

    if problem := check_dp(config, fed, model):
        raise FedsimError(problem)

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=make_server_app(config, run_dir, on_round, curious),
            client_app=make_client_app(config),
            num_supernodes=config.num_clients,
            backend_config=backend_config(config),
            verbose_logging=verbose,
        )
    if not (run_dir / "training.json").exists():
        raise FedsimError(
            f"the simulation stopped before finishing; see the log above. Captures written so far "
            f"are kept in {run_dir / 'captures'}"
        )
    return run_dir
