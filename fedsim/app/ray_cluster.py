"""Joining Ray: a private instance on this machine, or the cluster RAY_ADDRESS names, with fedsim's code shipped.

On this machine Ray's workers import fedsim from the driver's `sys.path`. On a cluster they may run on machines
where fedsim is not installed: the driver then ships its own copy of fedsim's packages with Ray's `runtime_env`
(`py_modules`), which Ray puts first on each worker's path, so every worker runs the driver's code.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

# What Ray's workers import: the core, the ClientApp, the ServerApp's strategies, the attacks.
PACKAGES = ("fedsim", "clients", "server", "attacks")
EXCLUDES = ["__pycache__", "*.pyc", ".pytest_cache"]


def cluster_address() -> str | None:
    """The Ray cluster to join (RAY_ADDRESS), or None for a private Ray on this machine."""
    return os.environ.get("RAY_ADDRESS") or None


def package_dirs() -> list[str]:
    """The folders of fedsim's packages as this process imports them (the copy the driver runs)."""
    dirs = []
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"package {name} is not importable here; run from a fedsim checkout or install")
        dirs.append(str(Path(next(iter(spec.submodule_search_locations))).resolve()))
    return dirs


def runtime_env(address: str | None, env_vars: dict[str, str]) -> dict[str, Any]:
    """Ray's runtime_env for fedsim's workers: the driver's path on this machine, its packages on a cluster."""
    if address is None:
        pythonpath = os.pathsep.join(sys.path)
        if os.environ.get("PYTHONPATH"):
            pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
        os.environ["PYTHONPATH"] = pythonpath  # the workers of a Ray this process starts inherit it too
        return {"env_vars": {**env_vars, "PYTHONPATH": pythonpath}}
    return {"py_modules": package_dirs(), "excludes": EXCLUDES, "env_vars": dict(env_vars)}


def init(env_vars: dict[str, str], **init_args: Any) -> str | None:
    """ray.init on this machine or on RAY_ADDRESS's cluster (no-op if Ray is up); the address joined, or None."""
    import ray

    address = cluster_address()
    if not ray.is_initialized():
        ray.init(address=address, runtime_env=runtime_env(address, env_vars), **init_args)
    return address


def current_node() -> str:
    """The Ray node id of the worker calling this."""
    import ray

    return ray.get_runtime_context().get_node_id()


def current_job() -> str:
    """The Ray job id of this driver (hex)."""
    import ray

    return ray.get_runtime_context().get_job_id()


def placement(class_name: str, job: str) -> dict[str, Any]:
    """The cluster's nodes and, for job `job`'s actors of `class_name`, the node each one ran on.

    Read from Ray's actor table, which keeps actors after they exit (Flower's backend shuts this driver's Ray
    down at the end of a simulation: this joins the cluster again for the look-up). Empty if Ray cannot say.
    """
    import ray

    joined = not ray.is_initialized()
    try:
        from ray._private import state

        if joined:
            ray.init(address=cluster_address(), log_to_driver=False, logging_level="error")
        nodes = [
            {"node": n["NodeID"], "address": n["NodeManagerAddress"], "resources": n["Resources"]}
            for n in ray.nodes()
            if n.get("Alive")
        ]
        actors = state.actors(job_id=ray.JobID.from_hex(job))
    except Exception:  # an introspection API this Ray lacks never fails the run
        return {}
    finally:
        if joined:
            ray.shutdown()
    return {
        "job": job,
        "nodes": nodes,
        "actors": sorted(
            (
                {"actor": a["ActorID"], "node": a["Address"]["NodeID"], "pid": a["Pid"]}
                for a in actors.values()
                if a["ActorClassName"].rsplit(".", 1)[-1] == class_name
            ),
            key=lambda a: a["actor"],
        ),
    }
