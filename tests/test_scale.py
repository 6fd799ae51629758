"""Capture policies, float16 captures and the per-round manifest index: keeping part of a large run."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from attacks import get_attack
from attacks.base import model_gradients
from attacks.contract import capture_states, target_from_capture
from fedsim.capture_policy import CapturePolicy, rank
from fedsim.captures import CaptureStore
from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError
from fedsim.models import build_model
from fedsim.scoring import score
from tests.conftest import lossless_cifar
from tests.test_hostile import reply

# --- which clients are captured ----------------------------------------------------------------------------


def test_a_sampled_policy_keeps_the_seeded_lowest_ranks_and_is_reproducible():
    policy = CapturePolicy("sample", fraction=0.1, seed=7)
    cohort = list(range(0, 1000, 3))  # 334 partitions replied
    chosen = policy.select(4, cohort)
    expected = set(sorted(cohort, key=lambda pid: rank(7, 4, pid))[: math.ceil(0.1 * len(cohort))])
    assert chosen == expected and len(chosen) == 34
    assert policy.select(4, reversed(cohort)) == chosen, "the order replies arrive in does not matter"
    assert policy.select(5, cohort) != chosen, "each round draws again"
    assert CapturePolicy("sample", fraction=0.1, seed=8).select(4, cohort) != chosen, "the run seed changes the draw"
    assert CapturePolicy("sample", fraction=1.0).select(1, cohort) == set(cohort)
    assert CapturePolicy("partitions", partitions=(0, 3, 7)).select(1, cohort) == {0, 3}
    assert CapturePolicy().select(1, cohort) == set(cohort)


def test_the_curious_wrapper_writes_only_the_sampled_updates_and_every_failure(tmp_path):
    from flwr.serverapp.strategy import FedAvg

    from server.curious import CuriousStrategy

    policy = CapturePolicy("sample", fraction=0.25, seed=3)
    store = CaptureStore(tmp_path / "captures")
    strategy = CuriousStrategy(FedAvg(), store, {"model": "mlp"}, num_partitions=20, policy=policy)
    replies = [reply(100 + pid, {"partition-id": pid}) for pid in range(20)]
    replies.append(reply(999, {"partition-id": 50}))  # out of range: a failure, never sampled
    assert strategy._capture_round(2, replies) == 5
    captured = {r["partition_id"] for r in store.records("update")}
    assert captured == policy.select(2, range(20))
    assert [r["client"] for r in store.records("failure")] == [999]


def test_capture_keys_are_validated_in_one_line():
    config = FedsimConfig.from_mapping(
        {"num-clients": 10, "capture-policy": "partitions", "capture-partitions": "0,3,7", "capture-dtype": "float16"}
    )
    assert config.capture_partitions == "0,3,7"
    for values, message in [
        ({"capture-policy": "some"}, "capture-policy = 'some' is not allowed"),
        ({"capture-fraction": 0.0}, r"capture-fraction = 0.0 must be in \(0, 1\]"),
        ({"capture-fraction": float("nan")}, "capture-fraction = nan must be a finite number"),
        ({"capture-partitions": "0,x"}, "capture-partitions = '0,x' must be comma-separated ids"),
        ({"capture-partitions": "0,12"}, r"capture-partitions: partition id 12 is outside 0..9"),
        ({"capture-policy": "partitions"}, "capture-policy = partitions needs capture-partitions"),
        ({"capture-dtype": "int8"}, "capture-dtype = 'int8' is not allowed"),
    ]:
        with pytest.raises(FedsimError, match=message):
            FedsimConfig.from_mapping({"num-clients": 10, **values})


# --- float16 captures ----------------------------------------------------------------------------------------


def fedsgd_capture(store: CaptureStore, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1) -> dict:
    """One FedSGD client update of an MLP on (x, y), written through `store` as the curious server writes it."""
    model = build_model("mlp", tuple(x.shape[1:]), 10, seed=0)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = dict(zip([n for n, _ in model.named_parameters()], model_gradients(model, x, y), strict=True))
    client_state = {k: v - lr * grads[k] if k in grads else v for k, v in global_state.items()}
    meta = {
        "model": "mlp",
        "input_shape": list(x.shape[1:]),
        "num_classes": 10,
        "recipe": {"recipe": "fedsgd", "lr": lr, "batch-size": len(y), "local-epochs": 1},
        "num_examples": len(y),
        "partition_id": 0,
    }
    store.write_global(1, global_state, meta)
    return store.write_update(1, 5, client_state, meta, base=global_state)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_an_analytic_attack_on_a_float16_capture_still_recovers_the_image(tmp_path, dtype):
    x, y = lossless_cifar(1)
    store = CaptureStore(tmp_path / "captures", dtype)
    record = fedsgd_capture(store, x, y)
    assert record.get("dtype", "float32") == dtype
    global_state, client_state = capture_states(store, store.records("update")[0])
    assert all(v.dtype == torch.float32 for v in client_state.values()), "attacks get float32 back"
    result = get_attack("analytic").reconstruct(target_from_capture(global_state, client_state, record))
    psnr = score(result.images, result.labels, x, y)["psnr"][0]
    assert psnr > (60 if dtype == "float32" else 35), psnr


def test_a_float16_update_takes_half_the_disk_and_stays_close(tmp_path):
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 4])
    sizes = {}
    for dtype in ("float32", "float16"):
        store = CaptureStore(tmp_path / dtype, dtype)
        record = fedsgd_capture(store, x, y)
        sizes[dtype] = store.path(record).stat().st_size
    assert sizes["float16"] < 0.55 * sizes["float32"]
    exact = capture_states(CaptureStore(tmp_path / "float32"), CaptureStore(tmp_path / "float32").records("update")[0])
    half = capture_states(CaptureStore(tmp_path / "float16"), CaptureStore(tmp_path / "float16").records("update")[0])
    for name, start in exact[0].items():
        update, update16 = exact[1][name] - start, half[1][name] - half[0][name]
        # stored relative to the global weights, the update keeps float16's relative precision (about 1e-3)
        assert (update16 - update).norm() <= 1e-3 * update.norm() + 1e-12, name


# --- the per-round index ---------------------------------------------------------------------------------------


def synthetic_store(root: Path, rounds: int, per_round: int) -> CaptureStore:
    """A store of `rounds` rounds of `per_round` update records (one tiny tensor file shared by all)."""
    store = CaptureStore(root)
    meta = {"model": "mlp", "input_shape": [1, 28, 28], "num_classes": 10, "num_examples": 10}
    for server_round in range(1, rounds + 1):
        store.write_global(server_round, {"w": torch.zeros(1)}, meta)
        for client in range(per_round):
            store._append({"kind": "update", "round": server_round, "client": client, "file": "x", **meta})
    return store


def test_the_index_reads_exactly_the_rounds_asked_for(tmp_path):
    store = synthetic_store(tmp_path / "captures", rounds=6, per_round=30)
    every = store.records()
    for wanted in ([3], [1, 6], [2, 99]):
        got = store.records(rounds=wanted)
        assert got == [r for r in every if r["round"] in wanted]
    assert len(store.records("update", rounds=[4])) == 30 and store.global_record(5)["round"] == 5


def test_a_store_without_an_index_or_with_a_stale_one_is_read_whole(tmp_path):
    store = synthetic_store(tmp_path / "captures", rounds=3, per_round=4)
    expected = [r for r in store.records() if r["round"] == 2]
    # another writer appended to the manifest: the index no longer ends where the manifest does
    with open(store.manifest, "a") as f:
        f.write('{"kind": "failure", "round": 2, "client": 77, "reason": "late"}\n')
    assert store.records(rounds=[2])[-1]["client"] == 77
    # an index pointing at the wrong bytes is not trusted either
    (store.root / "index" / "round-0002.idx").write_text("5 9\n")
    assert store.records(rounds=[2])[-1].get("client") == 77
    # a store from before the index (a single manifest only) reads as it always did
    for path in (store.root / "index").iterdir():
        path.unlink()
    (store.root / "index").rmdir()
    assert store.records(rounds=[2])[: len(expected)] == expected


def test_a_corrupt_record_reached_through_the_index_is_still_refused(tmp_path):
    store = synthetic_store(tmp_path / "captures", rounds=2, per_round=2)
    text = store.manifest.read_text().replace('"client": 1', '"client": -1', 1)
    store.manifest.write_text(text)
    with pytest.raises(FedsimError, match="field client: -1 is outside"):
        store.records(rounds=[1])


def test_a_round_written_together_reads_back_through_the_index_and_a_failed_batch_leaves_nothing(tmp_path):
    from fedsim.files import load_tensors

    store = CaptureStore(tmp_path / "captures")
    meta = {"model": "mlp", "input_shape": [1, 28, 28], "num_classes": 10, "num_examples": 1, "partition_id": 0}
    store.write_global(1, {"w": torch.zeros(3)}, meta)
    written = store.write_updates(1, [(c, {"w": torch.full((3,), float(c))}, meta) for c in range(5)])
    assert [r["client"] for r in store.records("update", rounds=[1])] == [0, 1, 2, 3, 4]
    assert len((store.root / "index" / "round-0001.idx").read_text().splitlines()) == 6
    assert all(load_tensors(store.path(r))["w"][0] == r["client"] for r in written)
    with pytest.raises(AttributeError):  # not a tensor: neither a file nor a record of the batch is written
        store.write_updates(2, [(0, {"w": torch.zeros(2)}, meta), (1, {"w": "not a tensor"}, meta)])
    assert store.records(rounds=[2]) == [] and not (store.root / "round-0002").exists()


def test_background_writes_land_in_order_and_a_failed_one_is_raised(tmp_path, monkeypatch):
    store = CaptureStore(tmp_path / "captures")
    meta = {"model": "mlp", "input_shape": [1, 28, 28], "num_classes": 10, "num_examples": 1, "partition_id": 0}
    store.write_in_background()
    for server_round in (1, 2):
        assert store.write_global(server_round, {"w": torch.zeros(3)}, meta) is None, "handed over, not written yet"
        store.write_updates(server_round, [(c, {"w": torch.full((3,), float(c))}, meta) for c in range(3)])
        store.write_failure(server_round, 9, "late")
    store.flush()
    kinds = [(r["round"], r["kind"]) for r in store.records()]
    assert kinds == [(r, k) for r in (1, 2) for k in ["global", "update", "update", "update", "failure"]]
    assert len(store.records("update", rounds=[2])) == 3
    monkeypatch.setattr("fedsim.captures.atomic_write_many", lambda files: (_ for _ in ()).throw(OSError("disk full")))
    store.write_updates(3, [(0, {"w": torch.zeros(3)}, meta)])
    with pytest.raises(OSError, match="disk full"):
        store.close()
    assert store.records(rounds=[3]) == [] and store.write_failure(3, 1, "now in the caller's thread")["round"] == 3


# --- a real two-node Ray cluster -------------------------------------------------------------------------------


def test_on_a_cluster_the_workers_get_fedsim_packages_not_the_driver_path(monkeypatch):
    from fedsim.app.ray_cluster import PACKAGES, cluster_address, runtime_env

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", str(repo))
    local = runtime_env(None, {"A": "1"})
    assert "py_modules" not in local and str(repo) in local["env_vars"]["PYTHONPATH"].split(os.pathsep)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address() == "10.0.0.1:6379"
    remote = runtime_env(cluster_address(), {"A": "1"})
    assert remote["py_modules"] == [str(repo / name) for name in PACKAGES], (
        "this checkout's code, as the driver runs it"
    )
    assert "PYTHONPATH" not in remote["env_vars"] and remote["env_vars"]["A"] == "1"
    assert "__pycache__" in remote["excludes"]


@pytest.mark.slow
def test_fedsim_run_and_attack_on_a_two_node_ray_cluster_whose_python_lacks_fedsim(shared_data, tmp_path, monkeypatch):
    """`ray start` nodes (a head, and a node with a custom resource) on a Python that cannot import fedsim.

    `fedsim run` and `fedsim attack` join them through RAY_ADDRESS and ship fedsim with runtime_env; the client
    actors and the attack tasks are shown on both nodes. The test stops exactly the `ray start` processes it
    started, by process id, and checks that no process of that cluster is left.
    """
    import json
    import subprocess

    from tests.conftest import run_cli
    from tests.ray_nodes import RayNodes, bare_env, bare_python

    python = bare_python(tmp_path / "bare")
    probe = subprocess.run([python, "-c", "import fedsim"], capture_output=True, cwd=tmp_path, env=bare_env())
    assert probe.returncode != 0, "the nodes' Python must not import fedsim"
    cluster = RayNodes(python, cpus=1)
    try:
        cluster.add_node(cpus=1, resources={"node2": 1})
        nodes = cluster.wait(2)
        assert [n["resources"].get("node2") for n in nodes].count(1.0) == 1
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        out = tmp_path / "runs"
        run = run_cli(
            "run", "--dataset", "mnist", "--data-dir", str(shared_data), "--model", "mlp", "--clients", "4",
            "--rounds", "2", "--out-dir", str(out), "--name", "c2", "--set", "recipe=fedsgd", "--set", "batch-size=1",
            "--set", "examples-per-client=8", "--set", "eval-examples=100", "--set", "client-num-cpus=1",
            timeout=900,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + cluster.logs()[-2000:]
        run_dir = out / "c2"
        assert (run_dir / "training.json").exists()
        placement = json.loads((run_dir / "ray-placement.json").read_text())
        node_ids = {n["node"] for n in nodes}
        assert {n["node"] for n in placement["nodes"]} == node_ids
        assert {a["node"] for a in placement["actors"]} == node_ids, "one client actor on each node"
        attack = run_cli("attack", str(run_dir), "-a", "idlg", "-o", "iterations=20", "--rounds", "1", timeout=900)
        assert attack.returncode == 0, attack.stdout[-2000:] + attack.stderr[-2000:]
        outcomes = [json.loads(p.read_text()) for p in (run_dir / "attacks").rglob("result.json")]
        assert len(outcomes) == 4 and all(o["status"] == "ok" for o in outcomes), [o.get("reason") for o in outcomes]
        assert {o["node"] for o in outcomes} == node_ids, "attack tasks on both nodes"
    finally:
        left = cluster.stop()
    assert not left, f"processes of the test's cluster left behind: {left}"
