"""A real multi-node Ray cluster on one machine, started with `ray start --block` and stopped by process id.

Each node is a `ray start --block` process: on SIGTERM it stops the Ray processes it started (GCS, raylet,
agents), and the workers die with their raylet. Nothing here calls `ray stop`, which stops every Ray on the
machine. The nodes can run on a Python where fedsim is not importable (`bare_python`), as a worker machine of a
cluster would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from pathlib import Path

from fedsim.app.ray_cluster import free_port


def bare_python(folder: Path) -> str:
    """A Python with this environment's packages but not fedsim: its editable install's .pth is not read.

    The new venv's only .pth puts this environment's site-packages on sys.path as a plain folder, so the
    .pth files in it (the editable install of fedsim) are not processed.
    """
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    python = folder / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": os.environ.get("PATH", "")},
    ).stdout.strip()
    Path(site, "parent-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(python)


def bare_env() -> dict[str, str]:
    """This process's environment less PYTHONPATH (which would make fedsim importable).

    Ray's memory monitor is off: it kills workers when the whole machine is nearly full, and on a machine
    shared with other jobs that is their memory as much as this cluster's.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return {**env, "RAY_memory_monitor_refresh_ms": "0"}


PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="error")
print(json.dumps([{"node": n["NodeID"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]))
"""


class RayNodes:
    """A head and more nodes; `address` to join; `stop()` ends exactly the `ray start` processes started here."""

    def __init__(self, python: str = sys.executable, cpus: int = 1) -> None:
        self.python = python
        self.temp = tempfile.mkdtemp(prefix="fsr-")  # short: Ray's socket paths must fit in 107 characters
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self._start(["--head", f"--port={self.port}", f"--temp-dir={self.temp}", "--include-dashboard=false",
                     f"--ray-client-server-port={free_port()}"], cpus)  # fmt: skip

    def _start(self, args: list[str], cpus: int, resources: dict | None = None) -> None:
        log = open(Path(self.temp) / f"node-{len(self.procs)}.log", "w")  # noqa: SIM115 (kept open while it runs)
        cmd = [self.python, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats"]
        cmd += args + [
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--min-worker-port=0",  # another Ray on this machine hands out 10002 onwards too: the OS picks
            "--max-worker-port=0",
        ]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        self.procs.append(subprocess.Popen(cmd, env=bare_env(), cwd=self.temp, stdout=log, stderr=subprocess.STDOUT))

    def add_node(self, cpus: int = 1, resources: dict | None = None) -> None:
        self._start([f"--address={self.address}"], cpus, resources)

    def wait(self, nodes: int, timeout: float = 180) -> list[dict]:
        """The alive nodes once `nodes` of them have joined (asked from a short-lived driver on the same Python)."""
        deadline = time.time() + timeout
        while True:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a ray start exited ({proc.returncode}): {self.logs()[-3000:]}")
            out = subprocess.run(
                [self.python, "-c", PROBE, self.address],
                capture_output=True,
                text=True,
                env=bare_env(),
                cwd=self.temp,
                timeout=120,
            )
            alive = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout else []
            if len(alive) >= nodes:
                return alive
            if time.time() > deadline:
                raise RuntimeError(f"{len(alive)} of {nodes} Ray nodes up after {timeout} s: {out.stderr[-2000:]}")
            time.sleep(2)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(Path(self.temp).glob("node-*.log")))

    def pids(self) -> list[int]:
        """Every live process whose command line names this cluster's temp dir or port (its Ray processes)."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                try:
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                if self.temp in cmdline or f":{self.port}" in cmdline:
                    found.append(int(entry))
        return found

    def stop(self, timeout: float = 60) -> list[int]:
        """SIGTERM each `ray start` started here (worker nodes first), wait; the pids of this cluster still alive."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        deadline = time.time() + timeout
        while (left := self.pids()) and time.time() < deadline:
            time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True) if not left else None
        return left
