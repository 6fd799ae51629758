"""The front door: a fresh clone's two commands, Flower's own `flwr run .`, and runs without a test split."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedsim.datasets import load_dataset
from fedsim.federation import evaluate
from fedsim.models import build_model
from tests.conftest import ONE_ACTOR, REPO, invoke_cli, run_cli

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(process: subprocess.Popen) -> None:
    """End `process` and everything in its process group (it was started in a session of its own)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


def stop_pid(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or "(Z)" in Path(f"/proc/{pid}/stat").read_text():
                return
            time.sleep(0.2)


# --- a fresh clone: `make demo` with nothing installed first ------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(
    os.environ.get("FEDSIM_TEST_CLONE") != "1",
    reason="installs a fresh virtual environment (minutes): set FEDSIM_TEST_CLONE=1",
)
def test_a_fresh_clone_runs_the_demo_with_one_command(tmp_path, no_strays):
    clone = tmp_path / "fedsim"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    assert not (clone / ".venv").exists()
    # The user's shell: no virtual environment active, none of this test session's Python on PATH.
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != BIN.resolve()]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "DISPLAY", "WAYLAND_DISPLAY")}
    env["PATH"] = os.pathsep.join(path)
    env["FEDSIM_SHARED_DATA"] = str(REPO.parent / "shared" / "data")
    started = time.monotonic()
    process = subprocess.Popen(
        ["make", "demo"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = process.communicate(timeout=3300)
    finally:
        stop_group(process)
    seconds = time.monotonic() - started
    assert process.returncode == 0, out[-4000:]
    assert (clone / ".venv" / ".installed").is_file()
    assert "demo page:" in out and list((clone / "runs" / "demos").rglob("*.html")), out[-4000:]
    print(f"fresh clone to demo page: {seconds:.0f} s")


def make_folder(tmp_path: Path) -> Path:
    """What the Makefile's environment rule reads: the Makefile and pyproject.toml."""
    folder = tmp_path / "fedsim"
    folder.mkdir()
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, folder / name)
    return folder


def test_make_says_what_to_install_when_python_has_no_venv(tmp_path):
    """A Python without the venv module / ensurepip (Debian without python3-venv) is one line, not a traceback."""
    fake = tmp_path / "python3"
    fake.write_text(
        f"#!/bin/sh\n"
        f'case "$*" in *ensurepip*) exec {sys.executable} -c "import nonexistent_ensurepip";; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    clone = make_folder(tmp_path)
    result = subprocess.run(["make", "demo", f"PYTHON={fake}"], cwd=clone, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "install python3-venv" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr and not (clone / ".venv").exists()


def test_make_refreshes_the_environment_only_when_pyproject_is_newer(tmp_path):
    clone = make_folder(tmp_path)
    (clone / ".venv").mkdir()
    stamp = clone / ".venv" / ".installed"
    stamp.touch()
    os.utime(clone / "pyproject.toml", (time.time() - 60, time.time() - 60))
    dry = subprocess.run(["make", "-n", "test"], cwd=clone, capture_output=True, text=True, timeout=60).stdout
    assert "pip install" not in dry and "pytest" in dry
    os.utime(stamp, (time.time() - 120, time.time() - 120))
    dry = subprocess.run(["make", "-n", "test"], cwd=clone, capture_output=True, text=True, timeout=60).stdout
    assert "-m venv .venv" in dry and "pip install torch==2.14.1 torchvision==0.29.1" in dry and "pytest" in dry


# --- Flower's conventions ----------------------------------------------------------------------------------


def test_fedsim_version_and_short_help():
    version = invoke_cli("--version")
    assert version.returncode == 0 and re.fullmatch(r"fedsim \S+\n", version.stdout), version.stdout
    short = invoke_cli("-h")
    assert short.returncode == 0 and "Usage" in short.stdout and "run" in short.stdout
    assert invoke_cli("run", "-h").stdout == invoke_cli("run", "--help").stdout


def test_declared_dependencies_match_the_imports_and_flowers_floors():
    import tomllib
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.version import Version

    def floor(requirement: Requirement) -> Version:
        return Version(next(s.version for s in requirement.specifier if s.operator in (">=", "==")))

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = {Requirement(r).name: Requirement(r) for r in pyproject}
    assert "tomli-w" in declared  # docker/flwr_cli.py writes Flower's config with it
    assert "tqdm" not in declared  # imported nowhere
    flower = [Requirement(r) for r in requires("flwr") or []]
    for name in ("typer", "rich", "ray"):
        # flwr[simulation] pins ray; a lower floor here would promise versions that cannot be installed.
        theirs = min((floor(r) for r in flower if r.name == name), default=None)
        assert theirs is not None and floor(declared[name]) == theirs, (name, str(declared[name]), theirs)


def flower_env(home: Path) -> dict:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FEDSIM_NODE_WAIT_SECONDS": "5",
    }


def local_superlink(home: Path) -> int | None:
    """The process id of the SuperLink that `flwr run` started for the Flower home `home`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"flower-superlink") for a in argv) and any(str(home).encode() in a for a in argv):
            return int(proc.name)
    return None


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_bare_flwr_run_trains_on_flowers_managed_superlink(tmp_path, no_strays):
    """`flwr run .` with no options (Flower's 2 simulated SuperNodes) trains; a mismatch is one clear error."""
    app, home = tmp_path / "app", tmp_path / "flwr-home"
    # The app as Flower packs it (the working tree as it is, uncommitted changes too), in a folder of its own:
    # `flwr run` starts its SuperLink there, and the run folder lands in its runs/.
    for package in ("fedsim", "clients", "server", "attacks"):
        shutil.copytree(REPO / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, app / name)
    env = flower_env(home)
    flwr = str(BIN / "flwr")
    superlink, run_id = None, None
    try:
        started = subprocess.run([flwr, "run", "."], cwd=app, env=env, capture_output=True, text=True, timeout=300)
        superlink = local_superlink(home)
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = re.search(r"Successfully started run (\d+)", started.stdout).group(1)
        assert superlink is not None, "flwr run started no SuperLink of its own"

        # Each `flwr list` is an interpreter importing Flower (seconds of CPU the run needs): asked every 2 s
        # once the run's summary is on disk, and every 20 s before, in case the run fails without one.
        status, deadline, asked = "", time.monotonic() + 1500, 0.0
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(0.5)
            summary = any((app / "runs").glob("*/training.json"))
            if time.monotonic() - asked < (2 if summary else 20):
                continue
            asked = time.monotonic()
            listing = subprocess.run(
                [flwr, "list", "--run-id", run_id, "--format", "json"], cwd=app, env=env, capture_output=True,
                text=True, timeout=60,
            )  # fmt: skip
            if listing.returncode == 0:
                status = json.loads(listing.stdout)["runs"][0]["status"]
        log = (home / "local-superlink" / "superlink.log").read_text()
        assert status == "finished:completed", log[-4000:]
        run_dir = next((app / "runs").iterdir())
        assert json.loads((run_dir / "run.json").read_text())["flower-run-id"] == int(run_id)
        rounds = json.loads((run_dir / "training.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [0, 1, 2, 3] and all(r["captures"] == 2 for r in rounds[1:])
        run_id = None

        # Three clients on two SuperNodes: a short bounded wait, then one error naming both settings.
        mismatch = subprocess.run(
            [flwr, "run", ".", "--stream", "--run-config", "num-clients=3"], cwd=app, env=env,
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        said = " ".join((mismatch.stdout + mismatch.stderr).split())
        assert "num-clients = 3" in said and "num-supernodes=3" in said, said[-4000:]
        assert len(list((app / "runs").iterdir())) == 1  # the failed run wrote nothing
    finally:
        if run_id is not None:
            subprocess.run([flwr, "stop", run_id], cwd=app, env=env, capture_output=True, timeout=60)
        if superlink is not None:
            stop_pid(superlink)


# --- no test split, no accuracy ----------------------------------------------------------------------------


def small_image_folder(folder: Path, per_class: int) -> Path:
    from PIL import Image

    for label in ("cats", "dogs"):
        (folder / label).mkdir(parents=True)
        for i in range(per_class):
            colour = (i * 50, 100, 200 if label == "cats" else 0)
            Image.new("RGB", (20, 20), colour).save(folder / label / f"{i}.png")
    return folder


def test_an_image_folder_with_few_images_has_no_test_split_and_says_so(tmp_path):
    data = load_dataset("imagefolder", str(small_image_folder(tmp_path, 4)), image_size=8)
    assert len(data.test_x) == 0 and len(data.train_x) == 8
    assert "no test split" in " ".join(data.notes)
    model = build_model("mlp", data.input_shape, data.num_classes)
    assert evaluate(model, data.test_x.float(), data.test_y) == {
        "test-loss": None,
        "test-accuracy": None,
        "test-examples": 0,
    }
    tested = evaluate(model, torch.rand(3, *data.input_shape), torch.tensor([0, 1, 0]))
    assert tested["test-examples"] == 3 and 0 <= tested["test-accuracy"] <= 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_run_without_a_test_split_reports_no_accuracy(tmp_path, no_strays):
    images = small_image_folder(tmp_path / "photos", 4)
    result = run_cli(
        "run", "--dataset", "imagefolder", "--data-dir", str(images), "--model", "mlp", "--rounds", "1",
        "--out-dir", str(tmp_path / "runs"), "--name", "untested",
        *ONE_ACTOR, "--set", "image-size=8", "--set", "batch-size=2", "--set", "local-epochs=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no test split" in result.stdout and "0.00%" not in result.stdout
    run_dir = tmp_path / "runs" / "untested"
    rounds = json.loads((run_dir / "training.json").read_text())["rounds"]
    streamed = [json.loads(line) for line in (run_dir / "training.jsonl").read_text().splitlines()]
    for row in rounds + streamed:
        assert row["test-accuracy"] is None and row["test-loss"] is None and row["test-examples"] == 0, row
    assert [r["round"] for r in rounds] == [0, 1] and rounds[1]["train-loss"] > 0
