"""Run a fedsim config on Flower's Simulation Engine: clients as Ray actors, CPUs or GPUs."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError
from fedsim.federation import Federation
from fedsim.files import atomic_write_json

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


def check_writable(run_dir: Path) -> None:
    """Make the run folder and write a probe file into it: an out-dir that is a file or read-only fails here."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as exc:
        raise FedsimError(
            f"cannot write the run folder {run_dir} ({exc.strerror or exc}); choose a writable --out-dir"
        ) from None


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C so that every `finally` on the way out runs."""


@contextmanager
def private_ray(config: FedsimConfig, run_dir: Path) -> Iterator[None]:
    """Start this run's Ray, and stop it (head, workers, agents) on every exit Python can catch.

    Normal exit and exceptions go through `finally`; SIGINT is Python's KeyboardInterrupt; SIGTERM and
    SIGHUP are turned into one. The handlers are installed after `ray.init`, which installs its own
    (Ray's would abort the process): that is why fedsim starts Ray itself, as Flower's Ray backend would
    (Flower then uses the running instance). Only SIGKILL is left: docs/deployment-security.md says how to
    find and stop that session's processes.
    """
    caught = (signal.SIGTERM, signal.SIGHUP)
    before = {sig: signal.getsignal(sig) for sig in caught}  # Python's own, not the ones ray.init installs
    main = threading.current_thread() is threading.main_thread()
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        if not stopping.is_set():  # a second signal while Ray shuts down changes nothing
            stopping.set()
            raise Stopped(signal.Signals(signum).name)

    try:
        start_ray(config)
        if main:
            for sig in caught:
                signal.signal(sig, stop)
        yield
    except KeyboardInterrupt as exc:
        stopping.set()
        # From here on, Flower's threads report the replies that stopping Ray cuts off (tracebacks of dead
        # actors): noise after the one line that says what happened.
        for name in ("flwr", "ray"):
            logging.getLogger(name).disabled = True
        why = f"by {exc}" if isinstance(exc, Stopped) else "by Ctrl-C"
        # Flower's ServerApp thread (not a daemon) keeps waiting for replies that will never come: leave anyway.
        threading.Thread(target=_exit_soon, args=(2, 5.0), daemon=True).start()
        raise FedsimError(
            f"the run was stopped {why}; the captures written so far are kept in {run_dir / 'captures'}"
        ) from None
    finally:
        stopping.set()
        shutdown_ray()
        if main:
            for sig, handler in before.items():
                signal.signal(sig, handler)


def _exit_soon(code: int, seconds: float) -> None:
    time.sleep(seconds)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_ray(config: FedsimConfig) -> str | None:
    """ray.init with the arguments Flower's Ray backend uses (it skips its own init when Ray is running).

    With RAY_ADDRESS set, this joins that cluster and ships fedsim's packages to its workers
    (fedsim/app/ray_cluster.py); the address joined, or None for a private Ray.
    """
    from fedsim.app.ray_cluster import init

    return init(OFFLINE_FLOWER, include_dashboard=False, **backend_config(config)["init_args"])


def shutdown_ray() -> None:
    """Stop the Ray instance this process started, if one is still up (never another Ray on the machine)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


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
    check_writable(run_dir)
    flower_offline()
    from fedsim.app.ray_cluster import cluster_address, current_job, placement

    if cluster_address() is not None:  # the clients run on other machines: they read data-dir as the driver means it
        config = dataclasses.replace(config, data_dir=str(Path(config.data_dir).resolve()))
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from server.server_app import check_dp, make_server_app

    if problem := check_dp(config, fed, model):
        raise FedsimError(problem)

    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    with warnings.catch_warnings(), private_ray(config, run_dir):
        warnings.simplefilter("ignore")
        job = current_job()
        run_simulation(
            server_app=make_server_app(config, run_dir, on_round, curious),
            client_app=make_client_app(config),
            num_supernodes=config.num_clients,
            backend_config=backend_config(config),
            verbose_logging=verbose,
        )
    if cluster_address() is not None:  # which node each client actor ran on
        atomic_write_json(run_dir / "ray-placement.json", placement("ClientAppActor", job))
    if not (run_dir / "training.json").exists():
        raise FedsimError(
            f"the simulation stopped before finishing; see the log above. Captures written so far "
            f"are kept in {run_dir / 'captures'}"
        )
    return run_dir
