"""Shared fixtures: the offline data beside the repository, and a guard that no process outlives a test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDSIM_SHARED_DATA", REPO.parent / "shared" / "data"))

for key, value in {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"the offline datasets are not at {SHARED_DATA} (set FEDSIM_SHARED_DATA)")
    return SHARED_DATA


FLOWER_AND_RAY = (
    "raylet",
    "gcs_server",
    "flower-superlink",
    "flower-supernode",
    "flower-superexec",
    "flwr-simulation",
    "flwr-serverapp",
    "flwr-clientapp",
)


# Every process this test session starts inherits this tag, even after its parent exits, so the stray check
# sees this session's processes only, not a Ray or Flower that something else runs on the same machine.
SESSION_TAG = f"FEDSIM_TEST_SESSION={os.getpid()}-{time.time_ns()}"
os.environ["FEDSIM_TEST_SESSION"] = SESSION_TAG.split("=", 1)[1]


def _tagged(pid: str) -> bool:
    try:
        return SESSION_TAG.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


def stray_processes() -> list[str]:
    """Ray and Flower processes this test session started that are still alive."""
    out = subprocess.run(["pgrep", "-a", "-f", "|".join(FLOWER_AND_RAY)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line and _tagged(line.split()[0])]


@pytest.fixture
def no_strays():
    """Fail the test if it leaves Ray or Flower processes behind."""
    before = set(stray_processes())
    yield
    deadline = time.time() + 20
    left = [p for p in stray_processes() if p not in before]
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = [p for p in stray_processes() if p not in before]
    assert not left, f"processes left behind: {left}"


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the fedsim CLI as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "fedsim", *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout
    )
