"""Joining Ray: a private instance on this machine, or the cluster RAY_ADDRESS names, with fedsim's code shipped.

On this machine Ray's workers import fedsim from the driver's `sys.path`. On a cluster they may run on machines
where fedsim is not installed: the driver then ships its own copy of fedsim's packages with Ray's `runtime_env`
(`py_modules`), which Ray puts first on each worker's path, so every worker runs the driver's code.

A command that runs several Ray jobs (a demo's federations and its attacks, `fedsim run` with attacks) starts one
Ray head for all of them (`shared_head`) instead of one Ray per job: each private start costs about 9 CPU-seconds
and several seconds of wall time, and Flower's Ray backend stops the Ray it finds at the end of each simulation.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedsim.errors import FedsimError

# What Ray's workers import: the core, the ClientApp, the ServerApp's strategies, the attacks.
PACKAGES = ("fedsim", "clients", "server", "attacks")
EXCLUDES = ["__pycache__", "*.pyc", ".pytest_cache"]


_shared_head: str | None = None  # the address of the head `shared_head` keeps up for this process, if any


def cluster_address() -> str | None:
    """The Ray cluster to join (RAY_ADDRESS), or None for a private Ray on this machine."""
    return os.environ.get("RAY_ADDRESS") or None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_command(python: str, port: int, temp: str, cpus: int | None = None) -> list[str]:
    """`ray start --head --block` on this machine with its own port and temp dir (never another Ray's)."""
    cmd = [python, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--disable-usage-stats"]
    cmd += [f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false", "--node-ip-address=127.0.0.1"]
    cmd += [f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}"]
    cmd += [f"--dashboard-port={free_port()}"]  # its minimal dashboard runs all the same, on 8265 by default
    cmd += ["--min-worker-port=0", "--max-worker-port=0"]  # workers on ports the OS picks, not 10002 onwards
    return cmd + ([f"--num-cpus={cpus}"] if cpus is not None else [])


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started it dies, however it dies (Linux).

    Ray's own processes (GCS, raylet, agents) share the fate of the `ray start` that started them the same way,
    and the workers that of their raylet.
    """
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def shared_head(timeout: float = 120, cpus: int | None = None) -> Iterator[str | None]:
    """One Ray head on this machine for every Ray job of the block (simulations and attack tasks join it).

    The head is a `ray start --block` child with its own port and temp dir; leaving the block (normally, by an
    exception, Ctrl-C or SIGTERM) stops it by its process id, and it gets SIGTERM should this process die
    without leaving the block. With RAY_ADDRESS set, or inside another such block, nothing is started.
    """
    global _shared_head
    if cluster_address() is not None or _shared_head is not None:
        yield cluster_address() or _shared_head
        return
    temp = tempfile.mkdtemp(prefix="fsr-", dir="/tmp" if os.path.isdir("/tmp") else None)  # short socket paths
    port = free_port()
    log = open(Path(temp) / "head.log", "w+")  # noqa: SIM115 (open while the head runs)
    main = threading_is_main()
    before = signal.getsignal(signal.SIGTERM) if main else None
    head = subprocess.Popen(
        head_command(sys.executable, port, temp, cpus),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=temp,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    try:
        if main:
            signal.signal(signal.SIGTERM, _interrupt)
        _wait_until_up(head, Path(temp) / "head.log", timeout)
        _shared_head = f"127.0.0.1:{port}"
        yield _shared_head
    finally:
        _shared_head = None
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops its GCS, raylet and agents, then exits
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:  # its shutdown can stall: Ray's processes die with it all the same
            head.kill()
            head.wait()
        log.close()
        if main:
            signal.signal(signal.SIGTERM, before)
        shutil.rmtree(temp, ignore_errors=True)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _wait_until_up(head: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if head.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-600:].strip().replace("\n", " | ")
            raise FedsimError(
                f"the Ray head for this command did not start ({tail}); run it again, or start Ray "
                "yourself (`ray start --head`) and set RAY_ADDRESS to its address"
            )
        time.sleep(0.1)


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
        ray.init(address=address or _shared_head, runtime_env=runtime_env(address, env_vars), **init_args)
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
