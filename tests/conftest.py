"""Shared fixtures: the offline data, one finished simulation for the whole session, the CLI in and out of process,
and guards that no process outlives a test or the session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDSIM_SHARED_DATA", REPO.parent / "shared" / "data"))
LOSSLESS_CIFAR = SHARED_DATA / "cifar10" / "cifar10_train_first200_kaggle_png.npz"

for key, value in {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # One torch thread per process: `make test` runs two workers on two cores, and a second thread in each (and in
    # each CLI or Ray process they start) only makes the threads wait for one another.
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(key, value)


# `--set` arguments that give a CLI run's client actors two CPUs each: on a 2-core machine Flower's pool is one
# actor, and the clients of a round take turns in it (see `ray_head`).
ONE_ACTOR = ("--set", "client-num-cpus=2")

# A test that asks for one of these starts Ray or Flower (or reads a run that did): it is slow, whatever it is marked.
STARTS_RAY_OR_FLOWER = {"finished_run", "no_strays", "fleet", "ray_head"}


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if STARTS_RAY_OR_FLOWER & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    # Longest first: the workers of `make test` start the end-to-end tests at once and fill the gaps with the
    # quick ones, instead of ending on one long test while the other worker idles (a stable sort: the order
    # within each kind is the files' own, but for the longest tests, which lead in the order of LONGEST).
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, _rank(item)))


# The longest tests of the suite, longest first (`make test` with PYTEST_ADDOPTS=--durations=40 measures them).
LONGEST = (
    "test_defenses_demo_page_shows_the_tradeoff",
    "test_deployment_on_localhost_captures_every_client_every_round",
    "test_a_bare_flwr_run_trains_on_flowers_managed_superlink",
    "test_the_demo_runs_on_a_teachers_own_photos_and_renders_in_a_real_browser",
    "test_tls_and_supernode_auth_admit_only_registered_nodes",
    "test_fedsim_run_and_attack_on_a_two_node_ray_cluster_whose_python_lacks_fedsim",
    "test_the_malicious_demo_shows_secure_aggregation_failing_against_a_cheating_server",
    "test_a_run_that_lists_attacks_ends_with_reconstructions_and_a_report",
    "test_membership_demo_page_shows_the_loss_gap_and_roc_curves",
    "test_simulation_with_every_defense_records_what_clients_declared",
    "test_a_run_without_a_test_split_reports_no_accuracy",
    "test_dlg_recovers_a_16px_image_and_its_label",
)


def _rank(item: pytest.Item) -> int:
    name = getattr(item, "originalname", item.name)
    return LONGEST.index(name) if name in LONGEST else len(LONGEST)


def lossless_cifar(first: int | None = None) -> tuple:
    """The first `first` (None: all 200) lossless CIFAR-10 training images in [0, 1] (NCHW, float) and their labels
    (long); skips the test where the offline copy is missing."""
    import numpy as np
    import torch

    if not LOSSLESS_CIFAR.exists():
        pytest.skip(f"offline CIFAR-10 images not found at {LOSSLESS_CIFAR} (set FEDSIM_SHARED_DATA)")
    data = np.load(LOSSLESS_CIFAR, allow_pickle=False)
    return torch.tensor(data["x"][:first]).permute(0, 3, 1, 2).float() / 255, torch.tensor(data["y"][:first]).long()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"the offline datasets are not at {SHARED_DATA} (set FEDSIM_SHARED_DATA)")
    return SHARED_DATA


FLOWER_AND_RAY = (
    "ray.scripts.scripts start",  # a `ray start --block` (fedsim's shared head, the test clusters)
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
# One tag per process: this file is imported twice (as pytest's `conftest` and as `tests.conftest` by the test
# modules), and a second tag would hide every process started after the second import from the first's check.
if not os.environ.get("FEDSIM_TEST_SESSION", "").startswith(f"{os.getpid()}-"):
    os.environ["FEDSIM_TEST_SESSION"] = f"{os.getpid()}-{time.time_ns()}"
SESSION_TAG = f"FEDSIM_TEST_SESSION={os.environ['FEDSIM_TEST_SESSION']}"


def _tagged(pid: str) -> bool:
    try:
        return SESSION_TAG.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone, or not ours to read
        return False


def stray_processes() -> list[str]:
    """Ray and Flower processes this test session started that are still alive."""
    out = subprocess.run(["pgrep", "-a", "-f", "|".join(FLOWER_AND_RAY)], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line and _tagged(line.split()[0])]


def wait_for_no_strays(before: set[str] | frozenset = frozenset(), timeout: float = 20) -> list[str]:
    """The processes beyond `before` still alive after up to `timeout` seconds (Ray stops its own in a moment)."""
    deadline = time.time() + timeout
    left = [p for p in stray_processes() if p not in before]
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = [p for p in stray_processes() if p not in before]
    return left


@pytest.fixture
def no_strays():
    """Fail the test if it leaves Ray or Flower processes behind."""
    before = set(stray_processes())
    yield
    left = wait_for_no_strays(before)
    assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="session", autouse=True)
def no_strays_at_the_end():
    """Fail the session if any Ray or Flower process it started outlives it (session fixtures included)."""
    yield
    left = wait_for_no_strays()
    assert not left, f"processes left behind at the end of the session: {left}"


@pytest.fixture(scope="session")
def ray_head():
    """One Ray head per test process for the simulations run in it, as `fedsim demo` keeps one for all its runs
    (`fedsim.app.ray_cluster.shared_head`): each simulation joins it instead of starting a private Ray, which
    costs about 9 CPU-seconds. The private Ray of a plain `fedsim run` stays tested by the CLI's own processes.
    The head offers one CPU (`make test` runs two test processes on two cores), so Flower's pool is one client
    actor and the clients of a round take turns in it: each actor is a process that imports torch and Flower
    (about 7 CPU-seconds), and a second one only doubles that."""
    from fedsim.app.ray_cluster import shared_head

    with shared_head(cpus=1) as address:
        yield address


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, ray_head) -> tuple:
    """(config, run folder) of one real FedSGD simulation, run once per session: 3 clients, 2 rounds, with the
    truth saved. Tests read it; one that writes into a run copies it (shutil.copytree) into its tmp_path first."""
    from fedsim.app.simulation import simulate
    from fedsim.config import FedsimConfig

    out = tmp_path_factory.mktemp("runs")
    config = FedsimConfig.from_mapping(
        {
            "dataset": "sample-cifar10",
            "model": "lenet-dlg",
            "num-clients": 3,
            "num-rounds": 2,
            "recipe": "fedsgd",
            "batch-size": 2,
            "lr": 0.1,
            "save-truth": True,
            "out-dir": str(out),
            "run-name": "e2e",
        }
    )
    before = set(stray_processes())
    run_dir = simulate(config, out / "e2e")
    left = wait_for_no_strays(before)
    assert not left, f"the shared simulation left processes behind: {left}"
    return config, run_dir


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the fedsim CLI as a user would, in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "fedsim", *args], capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout
    )


class _Entry:
    """`fedsim.app.cli.main` as click's test runner calls a command, so the in-process CLI takes the path a user's
    does: user mistakes become `error: ...` and exit status 2 in `main`, not in the runner."""

    name = "fedsim"

    def main(self, args, prog_name: str, **_: object) -> None:
        from fedsim.app.cli import main

        argv, sys.argv = sys.argv, [prog_name, *args]
        try:
            main()
        finally:
            sys.argv = argv


def invoke_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the fedsim CLI in this process (no interpreter start-up); the result reads like `run_cli`'s."""
    from click.testing import CliRunner  # typer.testing's runner takes a Typer app, which would bypass `main`

    ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    result = CliRunner().invoke(_Entry(), list(args), prog_name="fedsim")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code == 2 and not ray_before and "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
        pytest.fail(f"`fedsim {' '.join(args)}` was refused only after Ray had started: {result.stderr}")
    return subprocess.CompletedProcess(["fedsim", *args], result.exit_code, result.stdout, result.stderr)
