"""Trap weights (When the Curious Abandon Honesty): a cheating server that changes parameters only, and the attack."""

from __future__ import annotations

import copy

import pytest
import torch

from attacks import get_attack
from attacks.base import AttackTarget
from attacks.contract import target_from_capture
from clients.training import train_fedsgd
from fedsim.config import FedsimConfig
from fedsim.datasets import load_dataset, to_float
from fedsim.errors import FedsimError
from fedsim.federation import Federation
from fedsim.files import load_tensors
from fedsim.models import build_model
from fedsim.trap import set_traps


@pytest.fixture(scope="module")
def cifar():
    return load_dataset("sample-cifar10", "data", False, 0)


def trapped_mlp(data, batch: int) -> torch.nn.Module:
    model = build_model("mlp", data.input_shape, data.num_classes, seed=0)
    set_traps(model, data.input_shape, to_float(data.test_x), batch, seed=0)
    return model


def fedsgd_target(model, x, y, lr: float = 0.1) -> AttackTarget:
    """What the server captures: the client's weights after its real FedSGD step, minus the global ones."""
    client = copy.deepcopy(model)
    train_fedsgd(client, x, y, lr)
    names = [n for n, _ in model.named_parameters()]
    update = [client.state_dict()[n] - model.state_dict()[n] for n in names]
    return AttackTarget(
        model=model,
        gradients=[-u / lr for u in update],
        batch_size=len(x),
        input_shape=tuple(x.shape[1:]),
        num_classes=10,
        update=update,
        recipe={"mode": "fedsgd", "lr": lr, "num-examples": len(x)},
    )


def exact(reconstruction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per true image: some reconstruction equals it after quantising both to 8 bits."""
    rec, true = (reconstruction.flatten(1) * 255).round(), (truth.flatten(1) * 255).round()
    return (rec[:, None, :] == true[None, :, :]).all(-1).any(0)


@pytest.mark.parametrize("batch", [4, 8])
def test_trap_weights_recover_a_small_fedsgd_batch_exactly(cifar, batch):
    x, y = to_float(cifar.train_x[:batch]), torch.as_tensor(cifar.train_y[:batch]).long()
    result = get_attack("trap").reconstruct(fedsgd_target(trapped_mlp(cifar, batch), x, y))
    assert exact(result.images, x).all()
    assert result.info["exact"] == batch


def test_the_architecture_is_unchanged_and_only_the_first_layer_is_tampered(cifar):
    honest = build_model("mlp", cifar.input_shape, cifar.num_classes, seed=0)
    trapped = trapped_mlp(cifar, 8)
    a, b = honest.state_dict(), trapped.state_dict()
    assert [(k, v.shape) for k, v in a.items()] == [(k, v.shape) for k, v in b.items()]
    assert [k for k in a if not torch.equal(a[k], b[k])] == ["fc.0.weight", "fc.0.bias"]
    # what the traps change: each row of the first layer is active for few images instead of about half
    x = to_float(cifar.train_x[:8])
    assert (trapped.fc[0](x.flatten(1)) > 0).float().mean() < (honest.fc[0](x.flatten(1)) > 0).float().mean()


def test_a_model_without_a_first_fully_connected_layer_is_refused_before_training(cifar):
    config = FedsimConfig.from_mapping({"dataset": "sample-cifar10", "model": "convnet", "server-mode": "trap"})
    with pytest.raises(FedsimError, match="first layer is fully connected") as caught:
        Federation.from_config(config).build_model()
    assert "\n" not in str(caught.value)
    x = to_float(cifar.train_x[:4])
    convnet = build_model("convnet", cifar.input_shape, cifar.num_classes, seed=0)
    with pytest.raises(FedsimError, match="first layer is fully connected"):
        get_attack("trap").reconstruct(fedsgd_target(convnet, x, torch.zeros(4, dtype=torch.long)))


@pytest.mark.slow
def test_a_trap_server_run_is_robbed_from_its_captures(tmp_path, ray_head, no_strays):
    """A real simulation: the capture records say how the server tampered, and the captures give the images."""
    from fedsim.app.simulation import simulate
    from fedsim.captures import CaptureStore

    config = FedsimConfig.from_mapping(
        {
            "dataset": "sample-cifar10",
            "model": "mlp",
            "num-clients": 2,
            "num-rounds": 1,
            "recipe": "fedsgd",
            "batch-size": 4,
            "server-mode": "trap",
            "save-truth": True,
            "out-dir": str(tmp_path),
            "run-name": "trap",
        }
    )
    simulate(config, tmp_path / "trap")
    store = CaptureStore(tmp_path / "trap" / "captures")
    records = store.records("update")
    assert len(records) == 2
    for record in records:
        assert record["server"]["mode"] == "trap" and record["server"]["tampered"] == ["fc.0.weight", "fc.0.bias"]
        target = target_from_capture(store.load(store.global_record(1)), store.load(record), record)
        truth = load_tensors(tmp_path / "trap" / "truth" / "round-0001" / f"client-{record['client']}.safetensors")
        result = get_attack("trap").reconstruct(target)
        assert exact(result.images, truth["images"].float()).sum() >= 3
