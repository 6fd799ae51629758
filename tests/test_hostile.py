"""Hostile input: a capture store, a client's reply or a run config from someone else can neither escape the run
folder, nor inject into the manifest, nor crash or hang fedsim; every bad value is refused in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedsim.captures import CaptureStore
from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError
from fedsim.files import save_tensors
from tests.conftest import REPO, invoke_cli, run_cli
from tests.test_attack_runner import make_run
from tests.test_deploy import compose


def snapshot(root: Path, inside: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root` (size, modification time), except those under `inside`."""
    seen = {}
    for path in sorted(root.rglob("*")):
        if inside is not None and path.is_relative_to(inside):
            continue
        stat = path.lstat()
        seen[str(path.relative_to(root))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return seen


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit status 2, `error: ...` on one line naming `words`, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    text = " ".join(result.stderr.split())  # rich wraps long lines
    for word in words:
        assert word in text, (word, result.stderr)


def rewrite_manifest(store: CaptureStore, change) -> None:
    """Apply `change(records)` to the manifest's records and write them back, one JSON line each."""
    records = [json.loads(line) for line in store.manifest.read_text().splitlines()]
    change(records)
    store.manifest.write_text("".join(json.dumps(r) + "\n" for r in records))


def finished_run(run_dir: Path) -> CaptureStore:
    """Captures, config.toml and a final model: what `fedsim attack` and `fedsim invert` read."""
    store = make_run(run_dir, clients=2)
    config = FedsimConfig.from_mapping({"dataset": "sample-cifar10", "model": "mlp", "image-size": 12})
    (run_dir / "config.toml").write_text(config.to_toml())
    save_tensors(run_dir / "model.safetensors", store.load(store.global_record(1)))
    return store


# --- 1. every path read from a manifest stays inside the store ----------------------------------------------


@pytest.fixture(scope="module")
def outside_capture(tmp_path_factory) -> Path:
    """A valid safetensors file that lies outside every run folder: what a hostile manifest points at."""
    path = tmp_path_factory.mktemp("outside") / "secret.safetensors"
    save_tensors(path, {"w": torch.zeros(3)})
    return path


@pytest.mark.parametrize("command, how", [("attack", "absolute"), ("attack", "symlink"), ("invert", "climbing")])
def test_a_manifest_path_outside_the_store_is_refused(tmp_path, outside_capture, command, how):
    run_dir = tmp_path / "run"
    store = finished_run(run_dir)
    if how == "symlink":  # a relative path inside the store that leads out of it
        (store.root / "round-0001" / "link.safetensors").symlink_to(outside_capture)
        target = "round-0001/link.safetensors"
    else:
        target = str(outside_capture) if how == "absolute" else os.path.relpath(outside_capture, store.root)

    def point_outside(records):
        records[0]["file"] = target  # the global model of round 1: every attack on round 1 reads it

    rewrite_manifest(store, point_outside)
    before = snapshot(tmp_path, run_dir)
    args = ["--executor", "local", "-a", "idlg"] if command == "attack" else ["--steps", "1", "--size", "1"]
    one_line_error(
        invoke_cli(command, str(run_dir), *args), "leads outside the capture store", "manifest.jsonl, line 1"
    )
    assert snapshot(tmp_path, run_dir) == before
    assert not (run_dir / "attacks").exists()


def test_the_reader_confines_every_record_it_loads(tmp_path, outside_capture):
    store = make_run(tmp_path / "run", clients=1)
    record = {**store.records("update")[0], "file": str(outside_capture)}
    with pytest.raises(FedsimError, match="leads outside the capture store"):
        store.load(record)
    with pytest.raises(FedsimError, match="leads outside the capture store"):
        store.load({**record, "file": "round-0001/../../../outside/secret.safetensors"})


def test_a_manifest_that_is_a_device_or_a_link_out_is_refused_not_read(tmp_path, outside_capture):
    store = CaptureStore(tmp_path / "captures")
    store.root.mkdir()
    store.manifest.symlink_to("/dev/zero")  # reading it would never end
    with pytest.raises(FedsimError, match="leads outside the capture store"):
        store.records()
    store.manifest.unlink()
    os.mkfifo(store.manifest)  # reading a FIFO blocks until someone writes
    with pytest.raises(FedsimError, match="not a regular file"):
        store.records()


# --- 2. every field of a manifest record follows the schema ---------------------------------------------------

BAD_RECORDS = {
    "not-an-object": ("[1, 2, 3]", "line 2, is not a JSON object"),
    "round-as-text": ({"round": "1"}, "field round: '1' is not an integer"),
    "negative-round": ({"round": -1}, "field round: -1 is outside"),
    "climbing-client": ({"client": "../../x"}, "field client: '../../x' is not a name"),
    "script-in-client": ({"client": "<script>alert(1)</script>"}, "field client"),
    "negative-partition": ({"partition_id": -3}, "field partition_id: -3 is outside"),
    "boolean-partition": ({"partition_id": True}, "field partition_id: True is not an integer"),
    "nan-examples": ('{"kind": "update", "round": 1, "client": 1, "num_examples": NaN}', "num_examples: nan"),
    "inf-loss": ('{"kind": "update", "round": 1, "client": 1, "train_loss": 1e999}', "train_loss: inf"),
    "unknown-kind": ({"kind": "exploit"}, "field kind: 'exploit' is not one of: global, update, failure"),
    "huge-input": ({"input_shape": [3, 100000, 100000]}, "field input_shape[1]"),
    "unknown-model": ({"model": "os.system"}, "field model: 'os.system' is not one of"),
    "bad-recipe": ({"recipe": {"recipe": "fedsgd", "lr": -1}}, "field recipe.lr: -1 is outside"),
    "unknown-defense": ({"declared": {"defenses": "clip,backdoor"}}, "field declared.defenses"),
    "nan-in-an-unknown-field": ('{"kind": "update", "round": 1, "client": 1, "extra": [NaN]}', "extra[0]: nan"),
    "missing-file": ({"file": None}, "field file"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_a_record_that_breaks_the_schema_is_refused_naming_file_line_and_field(tmp_path, case):
    store = make_run(tmp_path / "run", clients=1)
    bad, message = BAD_RECORDS[case]
    lines = store.manifest.read_text().splitlines()
    if isinstance(bad, dict):
        lines[1] = json.dumps({**json.loads(lines[1]), **bad})
    else:
        lines[1] = bad
    store.manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(FedsimError) as caught:
        store.records()
    text = str(caught.value)
    assert str(store.manifest) in text and "line 2" in text and message in text, text
    assert "\n" not in text


def test_the_attack_cli_refuses_a_bad_record_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    store = finished_run(run_dir)
    rewrite_manifest(store, lambda records: records[1].update(round="1; rm -rf /"))
    before = snapshot(tmp_path, run_dir)
    one_line_error(invoke_cli("attack", str(run_dir), "--executor", "local"), "line 2", "field round")
    assert snapshot(tmp_path, run_dir) == before


def test_a_cut_last_line_is_skipped_with_a_warning_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    store = finished_run(run_dir)
    with open(store.manifest, "a") as f:
        f.write('{"kind": "update", "round": 1, "cli')  # what SIGKILL in the middle of an append leaves
    # In its own process: the warning goes through logging to the real stderr, as a user sees it.
    result = run_cli("attack", str(run_dir), "--executor", "local", "-a", "analytic", "--rounds", "9")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "cut off" in line]
    assert len(warnings) == 1 and "manifest.jsonl, line 4" in warnings[0], result.stderr


# --- 3. what a client sends is checked before it reaches the manifest -----------------------------------------


def reply(node: int, declared: dict, metrics: dict | None = None) -> Message:
    """A client's training reply as the curious server receives it."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": torch.ones(2)}),
            "metrics": MetricRecord(metrics or {"num-examples": 4, "train-loss": 0.5}),
            "fedsim": ConfigRecord(declared),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="instruction",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


BAD_REPLIES = {
    "partition-out-of-range": ({"partition-id": 7}, None, "partition-id: 7 is outside 0..2"),
    "partition-as-markup": ({"partition-id": "<script>alert(1)</script>"}, None, "partition-id"),
    "negative-partition": ({"partition-id": -1}, None, "partition-id: -1 is outside"),
    "nan-loss": ({"partition-id": 1}, {"num-examples": 4, "train-loss": float("nan")}, "train-loss: nan"),
    "negative-examples": ({"partition-id": 1}, {"num-examples": -4, "train-loss": 0.5}, "num-examples: -4"),
    "unknown-defense": ({"partition-id": 1, "defenses": "clip,evil"}, None, "declared.defenses"),
    "infinite-clip": ({"partition-id": 1, "defenses": "clip", "clip-norm": float("inf")}, None, "clip-norm: inf"),
    "markup-key": ({"partition-id": 1, "<img src=x onerror=alert(1)>": 1}, None, "is not a name"),
    "bytes-value": ({"partition-id": 1, "blob": b"\x00\x01"}, None, "declared.blob"),
}


@pytest.mark.parametrize("case", BAD_REPLIES)
def test_a_bad_reply_is_recorded_as_a_failure_and_its_fields_never_reach_the_manifest(tmp_path, case):
    from flwr.serverapp.strategy import FedAvg

    from server.curious import CuriousStrategy

    declared, metrics, reason = BAD_REPLIES[case]
    store = CaptureStore(tmp_path / "captures")
    strategy = CuriousStrategy(FedAvg(), store, {"model": "mlp"}, num_partitions=3)
    good = reply(11, {"partition-id": 0, "defenses": "clip", "clip-norm": 1.0})
    strategy._capture(1, good)
    strategy._capture(1, reply(12, declared, metrics))
    assert [r["kind"] for r in store.records()] == ["update", "failure"]
    failure = store.records("failure")[0]
    assert failure["client"] == 12 and reason in failure["reason"], failure
    assert not (store.root / "round-0001" / "client-12.safetensors").exists()
    assert not set('<>&"') & set(failure["reason"]), "what the client sent is quoted without markup characters"


@pytest.mark.parametrize("case", ["nan", "pickled-object", "wrong-shape", "complex"])
def test_a_bad_reply_array_is_recorded_as_a_failure_and_never_written(tmp_path, monkeypatch, case):
    from flwr.serverapp.strategy import FedAvg

    from server.curious import CuriousStrategy, plain
    from tests.test_captures import bad_arrays

    monkeypatch.chdir(tmp_path)
    array, message = bad_arrays()[case]
    store = CaptureStore(tmp_path / "captures")
    strategy = CuriousStrategy(FedAvg(), store, {"model": "mlp"}, num_partitions=3)
    bad = reply(12, {"partition-id": 1})
    bad.content["arrays"] = ArrayRecord({"w": array})
    assert strategy._capture_round(1, [reply(11, {"partition-id": 0}), bad]) == 1
    assert [r["kind"] for r in store.records()] == ["failure", "update"]
    failure = store.records("failure")[0]
    assert failure["client"] == 12 and failure["reason"].startswith("reply refused: arrays.w: "), failure
    assert plain(message) in failure["reason"], failure
    assert not (store.root / "round-0001" / "client-12.safetensors").exists()
    assert not (tmp_path / "PWNED").exists()
    assert torch.equal(store.load(store.records("update")[0])["w"], torch.ones(2))


# --- 4. a run name is one folder inside out-dir ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped", "a/b", "..", ".hidden", "x\ny"])
def test_a_run_name_that_leaves_out_dir_is_refused_by_the_run_config(name):
    with pytest.raises(FedsimError, match="run-name"):
        FedsimConfig.from_run_config({"run-name": name})


def test_fedsim_run_with_a_climbing_name_writes_nothing_outside_out_dir(tmp_path):
    out_dir = tmp_path / "deep" / "runs"
    out_dir.mkdir(parents=True)
    before = snapshot(tmp_path)
    result = invoke_cli("run", "--out-dir", str(out_dir), "--name", "../../escaped", "--rounds", "1")
    one_line_error(result, "run-name")
    assert snapshot(tmp_path) == before and not (tmp_path / "escaped").exists()


def test_a_run_folder_that_is_a_link_out_of_out_dir_is_refused(tmp_path):
    from server.server_app import run_dir_for

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mine").symlink_to(tmp_path / "elsewhere")
    config = FedsimConfig.from_mapping({"out-dir": str(tmp_path / "runs"), "run-name": "mine"})
    with pytest.raises(FedsimError, match="outside out-dir"):
        run_dir_for(config)


# --- 5. the SuperLink is published on loopback unless an interface is named -----------------------------------


@pytest.mark.parametrize(
    "files, env_file", [(["docker-compose.yml"], None), (["docker-compose.server.yml"], "deploy/server.env.example")]
)
def test_the_superlink_port_is_published_on_loopback_unless_an_interface_is_named(files, env_file):
    def published(env: dict | None = None) -> list[str]:
        result = compose(files, env_file, "config", "--format", "json", env=env)
        assert result.returncode == 0, result.stderr
        services = json.loads(result.stdout)["services"]
        return [port.get("host_ip", "0.0.0.0") for s in services.values() for port in s.get("ports", [])]

    assert published() == ["127.0.0.1"]
    assert published({"FEDSIM_SUPERLINK_BIND": "10.1.2.3"}) == ["10.1.2.3"]
    for file in files:
        assert "0.0.0.0}" not in (REPO / file).read_text()
    assert "FEDSIM_SUPERLINK_BIND" in (REPO / "docs" / "deployment-security.md").read_text()


# --- 6. bad data or out-dir: one line before Ray starts -------------------------------------------------------


def image_folder(root: Path, classes: list[str], damage: str = "") -> Path:
    """Real JPEG photos, one sub-folder per class; `damage` cuts or garbles the first one."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
    first = root / classes[0] / "0.jpg"
    if damage == "truncated":
        first.write_bytes(first.read_bytes()[:200])
    elif damage == "garbled":
        first.write_bytes(b"\xff\xd8\xff\xe0" + bytes(500))
    return root


def damaged_mnist(root: Path) -> Path:
    import gzip

    root.mkdir()
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(2000))[:40])  # a cut download
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(100)))
    return root


BAD_INPUTS = {
    "truncated-jpeg": (lambda d: ["imagefolder", image_folder(d, ["cat", "dog"], "truncated")], "cat/0.jpg"),
    "garbled-jpeg": (lambda d: ["imagefolder", image_folder(d, ["cat", "dog"], "garbled")], "cat/0.jpg"),
    "one-class": (lambda d: ["imagefolder", image_folder(d, ["cat"])], "at least 2"),
    "damaged-mnist": (lambda d: ["mnist", damaged_mnist(d)], "cannot be read"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_data_is_refused_in_one_line_before_ray_starts(tmp_path, case):
    make, words = BAD_INPUTS[case]
    dataset, data_dir = make(tmp_path / "data")
    out_dir = tmp_path / "runs"
    result = invoke_cli(
        "run", "--dataset", dataset, "--data-dir", str(data_dir), "--out-dir", str(out_dir), "--model", "mlp"
    )
    one_line_error(result, words)
    assert not out_dir.exists(), "nothing is written for a run refused before it starts"


def test_an_out_dir_that_is_a_file_is_refused_in_one_line_before_ray_starts(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    before = snapshot(tmp_path)
    result = invoke_cli("run", "--out-dir", str(tmp_path / "runs"), "--model", "mlp", "--set", "batch-size=4")
    one_line_error(result, "cannot write the run folder", "writable --out-dir")
    assert snapshot(tmp_path) == before


# --- 7. a stopped run stops what it started ------------------------------------------------------------------


SHARED_HEAD = """
import sys, time
import ray
from fedsim.app.ray_cluster import shared_head
with shared_head() as address:
    ray.init(address=address, log_to_driver=False, logging_level="error")
    ray.get(ray.remote(lambda: 1).remote())  # a worker of the head's raylet is up too
    ray.shutdown()
    print(address, flush=True)
    time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_the_shared_ray_head_stops_with_its_command_however_the_command_ends(how, no_strays):
    """`fedsim demo` and `fedsim run` with attacks keep one Ray head for all their jobs: it must not outlive them.

    SIGTERM leaves the block, which stops the head by its pid; SIGKILL leaves no chance to: the head was started
    with PR_SET_PDEATHSIG, so the kernel sends it SIGTERM, and `ray start --block` stops its GCS and raylet.
    """
    process = subprocess.Popen([sys.executable, "-c", SHARED_HEAD], cwd=REPO, stdout=subprocess.PIPE, text=True)
    address = process.stdout.readline().strip()
    assert address.startswith("127.0.0.1:"), process.communicate(timeout=60)
    process.send_signal(how)
    process.wait(timeout=120)
    # no_strays: no `ray start`, gcs_server or raylet of that head is left (checked after the test)


@pytest.mark.slow
def test_sigterm_stops_the_run_and_every_ray_process_it_started(tmp_path, no_strays):
    out_dir = tmp_path / "runs"
    command = [sys.executable, "-m", "fedsim", "run", "--out-dir", str(out_dir), "--name", "stopped", "--model", "mlp"]
    command += ["--clients", "2", "--rounds", "50", "--set", "examples-per-client=32", "--set", "local-epochs=1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest = out_dir / "stopped" / "captures" / "manifest.jsonl"
    deadline = time.monotonic() + 300
    while not (manifest.exists() and "update" in manifest.read_text()) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.5)
    assert manifest.exists(), "the run captured nothing in 300 s"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    one_line_error(result, "stopped by SIGTERM", "captures written so far are kept")
    # no_strays: no raylet, gcs_server or Ray worker of this run is left (checked after the test)
