"""End to end: a real Flower simulation on Ray whose curious server captures every update, and changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedsim.captures import CaptureStore
from fedsim.config import FedsimConfig
from fedsim.federation import Federation
from fedsim.files import load_tensors
from tests.conftest import stray_processes, wait_for_no_strays

# One worker reads the session's finished run and the module's strategy runs (each simulated once).
pytestmark = pytest.mark.xdist_group("finished-run")


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """FedAvg computed independently of Flower: what the inner strategy must have produced."""
    total = sum(weights)
    return {k: sum(s[k].double() * (w / total) for s, w in zip(states, weights, strict=True)) for k in states[0]}


@pytest.mark.slow
def test_one_capture_per_client_per_round(finished_run, no_strays):
    config, run_dir = finished_run
    store = CaptureStore(run_dir / "captures")
    updates = store.records("update")
    assert len(updates) == config.num_clients * config.num_rounds
    for server_round in (1, 2):
        in_round = [r for r in updates if r["round"] == server_round]
        assert len({r["client"] for r in in_round}) == config.num_clients
        assert sorted(r["partition_id"] for r in in_round) == [0, 1, 2]
        assert store.global_record(server_round)["model"] == "lenet-dlg"
    record = updates[0]
    assert record["recipe"] == {"recipe": "fedsgd", "lr": 0.1, "batch-size": 2, "local-epochs": 2}
    assert record["num_examples"] == 2 and record["input_shape"] == [3, 32, 32] and record["num_classes"] == 10
    assert not store.records("failure")


@pytest.mark.slow
def test_fedsgd_update_is_exactly_the_gradient_of_the_recorded_batch(finished_run):
    config, run_dir = finished_run
    store = CaptureStore(run_dir / "captures")
    model = Federation.from_config(config).build_model()
    for record in store.records("update"):
        global_state = store.load(store.global_record(record["round"]))
        client_state = store.load(record)
        truth = load_tensors(
            run_dir / "truth" / f"round-{record['round']:04d}" / f"client-{record['client']}.safetensors"
        )
        model.load_state_dict(global_state)
        loss = torch.nn.functional.cross_entropy(model(truth["images"]), truth["labels"])
        names = [n for n, _ in model.named_parameters()]
        grads = torch.autograd.grad(loss, list(model.parameters()))
        for name, grad in zip(names, grads, strict=True):
            pseudo = (global_state[name] - client_state[name]) / config.lr
            torch.testing.assert_close(pseudo, grad, atol=2e-5, rtol=1e-3)


@pytest.mark.slow
def test_aggregate_equals_fedavg_of_the_captured_updates(finished_run):
    config, run_dir = finished_run
    store = CaptureStore(run_dir / "captures")
    for server_round, next_global in (
        (1, store.load(store.global_record(2))),
        (2, load_tensors(run_dir / "model.safetensors")),
    ):
        records = [r for r in store.records("update") if r["round"] == server_round]
        expected = weighted_average([store.load(r) for r in records], [r["num_examples"] for r in records])
        for name, tensor in expected.items():
            torch.testing.assert_close(next_global[name].double(), tensor, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_run_folder_has_config_metrics_and_shards(finished_run):
    config, run_dir = finished_run
    assert FedsimConfig.from_toml(run_dir / "config.toml") == config
    rounds = json.loads((run_dir / "training.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(0 <= r["test-accuracy"] <= 1 for r in rounds) and rounds[1]["train-loss"] > 0
    shards = json.loads((run_dir / "shards.json").read_text())
    assert sum(s["size"] for s in shards) == 200


def mlp_config(tmp_path, name: str, **keys) -> FedsimConfig:
    """A small run of the MLP on the shipped MNIST sample (one local epoch), written to tmp_path / name."""
    base = {"dataset": "sample-mnist", "model": "mlp", "local-epochs": 1, "out-dir": str(tmp_path), "run-name": name}
    return FedsimConfig.from_mapping({**base, **{k.replace("_", "-"): v for k, v in keys.items()}})


def captured_updates(run_dir) -> tuple[CaptureStore, list[dict], dict[str, torch.Tensor]]:
    """The capture store of a finished run, the client states of its last round, and its final model."""
    store = CaptureStore(run_dir / "captures")
    updates = store.records("update")
    last = [r for r in updates if r["round"] == max(u["round"] for u in updates)]
    return store, last, load_tensors(run_dir / "model.safetensors")


STRATEGIES = {"fedmedian": {}, "fedprox": {"proximal_mu": 0.5}, "krum": {}}


@pytest.fixture(scope="module")
def strategy_runs(tmp_path_factory, ray_head) -> dict[str, tuple[FedsimConfig, Path]]:
    """FedMedian, FedProx (mu 0.5) and Krum, one round each, one after another on the same three SuperNodes:
    one real Flower simulation (one Ray) whose ServerApp runs the three federations, each into its own folder."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from fedsim.app.simulation import backend_config, flower_offline, start_ray
    from server.server_app import run_server

    out = tmp_path_factory.mktemp("strategies")
    configs = {
        name: mlp_config(out, name, num_clients=3, num_rounds=1, strategy=name, examples_per_client=48, **keys)
        for name, keys in STRATEGIES.items()
    }
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for name, config in configs.items():
            run_server(grid, config, out / name)

    flower_offline()
    before = set(stray_processes())
    first = configs["fedmedian"]  # the clients' data and model: the same in the three configs
    start_ray(first)  # joins the session's head: Flower's backend uses the Ray it finds
    run_simulation(
        server_app=app, client_app=make_client_app(first), num_supernodes=3, backend_config=backend_config(first)
    )
    left = wait_for_no_strays(before)
    assert not left, f"processes left behind: {left}"
    for name in configs:
        assert (out / name / "training.json").exists(), f"the {name} federation did not finish"
    return {name: (config, out / name) for name, config in configs.items()}


@pytest.mark.slow
def test_the_curious_wrapper_keeps_any_strategy_exact_fedmedian(strategy_runs):
    config, run_dir = strategy_runs["fedmedian"]
    store, records, final = captured_updates(run_dir)
    states = [store.load(r) for r in records]
    for name in final:
        median = torch.stack([s[name].double() for s in states]).median(dim=0).values
        torch.testing.assert_close(final[name].double(), median, atol=1e-6, rtol=1e-6)


def krum_choice(states: list[dict[str, torch.Tensor]], num_malicious: int) -> int:
    """Krum (Blanchard et al. 2017), independently of Flower: the update closest to its n - f - 2 nearest."""
    flat = torch.stack([torch.cat([s[k].double().flatten() for k in sorted(s)]) for s in states])
    distances = torch.cdist(flat, flat) ** 2
    nearest = len(states) - num_malicious - 2
    n = len(states)
    scores = [float(distances[i][torch.arange(n) != i].sort().values[:nearest].sum()) for i in range(n)]
    return min(range(n), key=scores.__getitem__)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedprox", "krum"])
def test_the_curious_wrapper_keeps_fedprox_and_krum_exact(strategy, strategy_runs):
    """FedProx aggregates as FedAvg (its mu goes to the clients' recipe); Krum keeps exactly one client's model."""
    config, run_dir = strategy_runs[strategy]
    store, records, final = captured_updates(run_dir)
    states = [store.load(r) for r in records]
    if strategy == "fedprox":
        assert all(r["recipe"]["proximal-mu"] == 0.5 for r in records)
        expected = weighted_average(states, [r["num_examples"] for r in records])
    else:
        expected = {k: v.double() for k, v in states[krum_choice(states, config.num_malicious)].items()}
    for name in final:
        torch.testing.assert_close(final[name].double(), expected[name], atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_sigkill_keeps_every_capture_written_before(tmp_path, no_strays):
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedsim.app.cli",
            "run",
            "--rounds",
            "50",
            "--recipe",
            "fedsgd",
            "--out-dir",
            str(tmp_path),
            "--name",
            "killed",
        ],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = tmp_path / "killed" / "captures" / "manifest.jsonl"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and (not manifest.exists() or manifest.read_text().count("\n") < 9):
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI, Ray's GCS, raylet and the client actors
        proc.wait()
    store = CaptureStore(tmp_path / "killed" / "captures")
    records = [r for r in store.records() if "file" in r]
    assert len(records) >= 9
    for record in records:
        assert all(torch.isfinite(t.float()).all() for t in store.load(record).values())


def test_a_supernode_whose_partition_count_differs_from_the_run_is_refused():
    from flwr.app import Context, RecordDict

    from clients.client_app import partition_of

    config = FedsimConfig.from_mapping({"num-clients": 3})

    def context(node_config: dict) -> Context:
        return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})

    assert partition_of(context({"partition-id": 2, "num-partitions": 3}), config) == 2
    with pytest.raises(ValueError, match="num-partitions=2 but the run has num-clients = 3"):
        partition_of(context({"partition-id": 0, "num-partitions": 2}), config)
    with pytest.raises(ValueError, match="partition-id 3 is outside 0..2"):
        partition_of(context({"partition-id": 3, "num-partitions": 3}), config)


@pytest.mark.slow
def test_a_crashing_client_is_recorded_as_a_failure_and_the_round_goes_on(tmp_path, ray_head, no_strays):
    """A real ClientApp that raises for partition 1: its error reply is captured, the others are aggregated."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.simulation import run_simulation

    from clients.client_app import local_train
    from fedsim.app.simulation import backend_config, flower_offline, start_ray
    from server.server_app import make_server_app

    config = mlp_config(tmp_path, "crash", num_clients=3, num_rounds=2, examples_per_client=48)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if int(context.node_config["partition-id"]) == 1:
            raise RuntimeError("out of memory on this client's device")
        return local_train(msg, context, config)

    flower_offline()
    start_ray(config)  # joins the session's head
    run_dir = tmp_path / "crash"
    run_simulation(
        server_app=make_server_app(config, run_dir, None, True),
        client_app=app,
        num_supernodes=3,
        backend_config=backend_config(config),
    )
    store, last, final = captured_updates(run_dir)
    failures = store.records("failure")
    assert [f["round"] for f in failures] == [1, 2]
    assert all("out of memory" in f["reason"] for f in failures)
    assert [r["round"] for r in last] == [2, 2] and sorted(r["partition_id"] for r in last) == [0, 2]
    rounds = json.loads((run_dir / "training.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    expected = weighted_average([store.load(r) for r in last], [r["num_examples"] for r in last])
    for name in final:
        torch.testing.assert_close(final[name].double(), expected[name], atol=1e-6, rtol=1e-6)
