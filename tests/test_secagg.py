"""Flower's SecAgg+ in a real simulation: the server keeps only the aggregate, and a cheating server still robs it."""

from __future__ import annotations

import copy

import pytest
import torch

from attacks import get_attack
from attacks.contract import target_from_capture
from clients.training import train_fedsgd
from fedsim.app.simulation import simulate
from fedsim.captures import CaptureStore
from fedsim.config import FedsimConfig
from fedsim.federation import Federation
from fedsim.files import load_tensors, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("secagg")]  # one secure run, one worker


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory, ray_head):
    out = tmp_path_factory.mktemp("runs")
    config = FedsimConfig.from_mapping(
        {
            "dataset": "sample-cifar10",
            "num-clients": 4,
            "num-rounds": 1,
            "recipe": "fedsgd",
            "batch-size": 4,
            "lr": 0.1,
            "server-mode": "imprint",
            "secure-aggregation": True,
            "save-truth": True,
            "out-dir": str(out),
            "run-name": "secagg",
        }
    )
    simulate(config, out / "secagg")
    return config, out / "secagg"


def test_the_server_captures_one_aggregate_and_no_single_update(secure_run, no_strays):
    config, run_dir = secure_run
    store = CaptureStore(run_dir / "captures")
    (record,) = store.records("update")
    assert record["client"] == 0 and len(record["aggregate_of"]) == config.num_clients
    assert record["num_examples"] == config.num_clients * config.batch_size
    assert record["server"]["mode"] == "imprint" and record["server"]["secure-aggregation"] is True
    files = sorted(p.name for p in (run_dir / "captures" / "round-0001").iterdir())
    assert files == ["client-0.safetensors", "global.safetensors"]


def client_updates(config, run_dir, global_state) -> list[dict[str, torch.Tensor]]:
    """Each client's update, recomputed with the clients' own training step from the batch it recorded."""
    model = Federation.from_config(config).build_model()
    updates = []
    for truth_file in sorted((run_dir / "truth" / "round-0001").iterdir()):
        truth = load_tensors(truth_file)
        client = copy.deepcopy(model)
        client.load_state_dict(global_state)
        train_fedsgd(client, truth["images"].float(), truth["labels"].long(), config.lr)
        updates.append({k: v - global_state[k] for k, v in client.state_dict().items()})
    return updates


def test_the_aggregate_is_the_mean_of_the_updates_the_clients_computed(secure_run):
    config, run_dir = secure_run
    store = CaptureStore(run_dir / "captures")
    global_state = store.load(store.global_record(1))
    aggregate = store.load(store.records("update")[0])
    updates = client_updates(config, run_dir, global_state)
    assert len(updates) == config.num_clients
    for name in global_state:
        mean = sum(u[name].double() for u in updates) / len(updates)
        captured = aggregate[name].double() - global_state[name].double()
        # SecAgg+ quantises each parameter to steps of 16 / 2^22 (its clipping range over its levels), per client
        assert torch.allclose(captured, mean, atol=4e-6, rtol=0), name
        for u in updates:  # and it is nobody's own update
            assert (captured - u[name].double()).abs().max() > 1e-4 or u[name].abs().max() < 1e-4


def test_the_imprint_robs_the_secure_aggregate(secure_run):
    config, run_dir = secure_run
    store = CaptureStore(run_dir / "captures")
    record = store.records("update")[0]
    target = target_from_capture(store.load(store.global_record(1)), store.load(record), record)
    assert target.batch_size == 16
    result = get_attack("imprint").reconstruct(target)
    truth = torch.cat([load_tensors(p)["images"] for p in sorted((run_dir / "truth" / "round-0001").iterdir())])
    rec, true = (result.images.flatten(1) * 255).round(), (truth.float().flatten(1) * 255).round()
    exact = (rec[:, None, :] == true[None, :, :]).all(-1).any(0)
    assert exact.sum() >= 8, exact


def test_the_tampered_model_is_evaluated_every_round(secure_run):
    _, run_dir = secure_run
    rows = read_jsonl(run_dir / "training.jsonl")
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["test-accuracy"] is not None for r in rows)
