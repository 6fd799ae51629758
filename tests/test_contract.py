"""The attack contract: the typed recipe's validation, targets and trajectories read from a real capture store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attacks import AttackTarget as ReexportedTarget
from attacks.base import AttackTarget as BaseTarget
from attacks.base import model_gradients, observed_signal
from attacks.contract import (
    AttackTarget,
    Recipe,
    capture_states,
    load_trajectory,
    target_clients,
    target_from_capture,
)
from clients.training import train_fedavg, train_fedsgd
from fedsim.captures import CaptureStore
from fedsim.datasets import load_dataset, to_float
from fedsim.errors import FedsimError
from fedsim.files import save_tensors
from fedsim.models import build_model

SENT = {"recipe": "fedavg", "lr": 0.1, "batch-size": 4, "local-epochs": 2, "proximal-mu": 0.5}


def test_recipe_reads_the_keys_the_server_sends():
    recipe = Recipe.from_dict({**SENT, "server-round": 3}, num_examples=8)  # keys the attacks do not read: ignored
    assert recipe == Recipe(mode="fedavg", lr=0.1, local_epochs=2, batch_size=4, num_examples=8, proximal_mu=0.5)
    assert recipe.fedavg and isinstance(Recipe.from_dict({"lr": 1}).lr, float)
    assert Recipe.from_dict({}) == Recipe() and Recipe().mode is None and Recipe().local_epochs == 1
    # the attacks' own dashed form names the mode "mode"
    assert Recipe.from_dict({"mode": "fedsgd", "num-examples": 3}) == Recipe(mode="fedsgd", num_examples=3)
    assert hash(recipe) == hash(Recipe.from_dict(SENT, num_examples=8))  # frozen: targets group by recipe


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lr", math.nan, "lr must be a finite number > 0"),
        ("lr", math.inf, "lr must be a finite number > 0"),
        ("lr", 0.0, "lr must be a finite number > 0"),
        ("lr", "0.1", "lr must be a number"),
        ("lr", True, "lr must be a number"),
        ("proximal-mu", -0.1, "proximal-mu must be a finite number >= 0"),
        ("proximal-mu", math.nan, "proximal-mu must be a finite number >= 0"),
        ("local-epochs", 0, "local-epochs must be an integer >= 1"),
        ("local-epochs", 1.5, "local-epochs must be an integer >= 1"),
        ("batch-size", "8", "batch-size must be an integer >= 1"),
        ("batch-size", False, "batch-size must be an integer >= 1"),
        ("num-examples", -2, "num-examples must be an integer >= 1"),
        ("recipe", "sgd", "mode must be one of: fedsgd, fedavg"),
    ],
)
def test_recipe_refuses_bad_values_naming_the_field(key, value, expected):
    with pytest.raises(FedsimError, match=expected) as err:
        Recipe.from_dict({**SENT, key: value})
    assert "\n" not in str(err.value)


def test_recipe_must_be_a_mapping():
    with pytest.raises(FedsimError, match="must be a mapping"):
        Recipe.from_dict(["lr", 0.1])  # type: ignore[arg-type]


def test_target_lives_in_the_contract_and_takes_the_dashed_form():
    assert BaseTarget is AttackTarget and ReexportedTarget is AttackTarget
    target = AttackTarget(torch.nn.Linear(1, 1), None, 2, (1, 1, 1), 2, recipe={"mode": "fedavg", "lr": 0.1})
    assert target.recipe == Recipe(mode="fedavg", lr=0.1)
    assert AttackTarget(torch.nn.Linear(1, 1), None, 2, (1, 1, 1), 2).recipe == Recipe()


def write_store(root, mode: str) -> tuple[CaptureStore, torch.Tensor, torch.Tensor, dict]:
    """A run's captures as the curious server writes them: one round, one client trained on real CIFAR images."""
    data = load_dataset("sample-cifar10", image_size=12)
    x, y = to_float(data.train_x[:4]), data.train_y[:4]
    model = build_model("mlp", data.input_shape, 10, seed=0)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    meta = {"model": "mlp", "input_shape": list(data.input_shape), "num_classes": 10}
    meta["trainable"] = [n for n, _ in model.named_parameters()]
    recipe = {"recipe": mode, "lr": 0.1, "batch-size": 4 if mode == "fedsgd" else 2, "local-epochs": 1}
    store = CaptureStore(root / "captures")
    store.write_global(1, global_state, {**meta, "recipe": recipe})
    if mode == "fedsgd":
        train_fedsgd(model, x, y, 0.1)
    else:
        train_fedavg(model, x, y, 0.1, 1, 2, np.random.default_rng(0))
    store.write_update(1, 7, model.state_dict(), {**meta, "recipe": recipe, "num_examples": 4, "partition_id": 0})
    return store, x, y, global_state


def test_a_fedsgd_target_from_a_capture_store_is_the_clients_gradient(tmp_path):
    store, x, y, global_state = write_store(tmp_path, "fedsgd")
    record = store.records("update")[0]
    g, c = capture_states(store, record)
    target = target_from_capture(g, c, record)
    # what attack_runner.load_target gave: the recipe with the mode and the examples behind the update
    given = {"lr": 0.1, "batch-size": 4, "local-epochs": 1, "mode": "fedsgd", "num-examples": 4}
    assert target.recipe == Recipe.from_dict(given) and target.batch_size == 4 and target.num_classes == 10
    assert target.input_shape == (3, 12, 12) and target.mask is None and not target.rescale
    for name, value in target.model.state_dict().items():
        torch.testing.assert_close(value, global_state[name])
    assert target.model.training and all(p.requires_grad for p in target.model.parameters())
    names = [n for n, _ in target.model.named_parameters()]
    for u, name in zip(target.update, names, strict=True):
        torch.testing.assert_close(u, c[name] - g[name])
    objective, signal = observed_signal(target, unroll=True)
    assert objective == "gradient"
    for got, want in zip(signal, model_gradients(target.model, x, y), strict=True):  # -Δ/lr is the gradient
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)


def test_a_fedavg_target_from_a_capture_store_unrolls_its_steps(tmp_path):
    store, *_ = write_store(tmp_path, "fedavg")
    record = store.records("update")[0]
    target = target_from_capture(*capture_states(store, record), record)
    assert target.gradients is None and target.recipe == Recipe("fedavg", 0.1, 1, 2, 4)
    objective, signal = observed_signal(target, unroll=True)
    assert objective == "unrolled"  # 4 examples in batches of 2: two local steps
    for s, u in zip(signal, target.update, strict=True):
        torch.testing.assert_close(s, -u / (0.1 * 2))
    without_mode = {**record, "recipe": {k: v for k, v in record["recipe"].items() if k != "recipe"}}
    assert target_from_capture(*capture_states(store, record), without_mode).recipe.mode == "fedavg"
    no_lr = {**record, "recipe": {"recipe": "fedsgd"}}
    with pytest.raises(FedsimError, match="has no lr"):
        target_from_capture(*capture_states(store, record), no_lr)
    with pytest.raises(FedsimError, match="local-epochs must be an integer"):
        target_from_capture(*capture_states(store, record), {**record, "recipe": {**SENT, "local-epochs": -1}})


def test_a_trajectory_from_a_capture_store(tmp_path):
    store, *_ = write_store(tmp_path, "fedavg")
    with pytest.raises(FedsimError, match="the run did not finish"):
        load_trajectory(store, tmp_path / "model.safetensors")
    final = {k: v + 1 for k, v in store.load(store.global_record(1)).items()}
    save_tensors(tmp_path / "model.safetensors", final)
    run = load_trajectory(store, tmp_path / "model.safetensors")
    assert run.rounds == [1] and run.client_rounds(0) == [1] and run.client_rounds(5) == []
    assert run.weights == {0: {1: 1.0}} and run.shard_sizes == {0: 4}
    assert run.recipes == {1: Recipe("fedavg", 0.1, 1, 2)}
    torch.testing.assert_close(run.uploads[0][1], store.load(store.records("update")[0]))
    torch.testing.assert_close(run.final, final)
    assert target_clients(run, None) == [0]
    with pytest.raises(FedsimError, match="client 3 sent no update"):
        target_clients(run, [3])
    with pytest.raises(FedsimError, match="holds no captured"):
        load_trajectory(CaptureStore(tmp_path / "empty"), tmp_path / "model.safetensors")
