"""Robbing the Fed: the imprint block a cheating server adds, and the closed-form attack on its updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attacks import get_attack
from attacks.base import AttackTarget
from clients.training import train_fedavg, train_fedsgd
from fedsim.config import FedsimConfig
from fedsim.datasets import load_dataset, to_float
from fedsim.errors import FedsimError
from fedsim.federation import evaluate
from fedsim.imprint import ImprintedModel, check_imprint, imprint_state, imprinted, tamper
from fedsim.models import build_model
from fedsim.scoring import pairwise_psnr


@pytest.fixture(scope="module")
def cifar():
    return load_dataset("sample-cifar10", "data", False, 0)


def tampered_model(data, bins: int, statistic: str = "brightness") -> ImprintedModel:
    model = imprinted(build_model("convnet", data.input_shape, data.num_classes, seed=0), data.input_shape, bins)
    tamper(model, to_float(data.test_x), statistic, seed=0)
    return model


def target_after(model, x, y, lr: float, recipe: dict) -> AttackTarget:
    """What the server captures: the client's weights after real local training, minus the global ones."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    client = ImprintedModel(
        build_model("convnet", tuple(x.shape[1:]), 10), tuple(x.shape[1:]), model.imprint.linear.out_features
    )
    client.load_state_dict(before)
    if recipe["mode"] == "fedsgd":
        train_fedsgd(client, x, y, lr)
    else:
        rng = np.random.default_rng(0)
        train_fedavg(client, x, y, lr, recipe["local-epochs"], recipe["batch-size"], rng)
    names = [n for n, _ in model.named_parameters()]
    after = client.state_dict()
    update = [after[n] - before[n] for n in names]
    gradients = [-u / lr for u in update] if recipe["mode"] == "fedsgd" else None
    return AttackTarget(
        model=model,
        gradients=gradients,
        batch_size=len(x),
        input_shape=tuple(x.shape[1:]),
        num_classes=10,
        update=update,
        recipe={**recipe, "lr": lr, "num-examples": len(x)},
    )


def exact(reconstruction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per true image: some reconstruction equals it after quantising both to 8 bits."""
    rec = (reconstruction.flatten(1) * 255).round()
    true = (truth.flatten(1) * 255).round()
    return (rec[:, None, :] == true[None, :, :]).all(-1).any(0)


@pytest.mark.parametrize("statistic", ["brightness", "random"])
def test_imprint_recovers_a_small_fedsgd_batch_exactly(cifar, statistic):
    model = tampered_model(cifar, bins=256, statistic=statistic)
    x, y = to_float(cifar.train_x[:8]), torch.as_tensor(cifar.train_y[:8]).long()
    result = get_attack("imprint").reconstruct(target_after(model, x, y, 0.1, {"mode": "fedsgd"}))
    hits = exact(result.images, x)
    best = pairwise_psnr(result.images, x).max(0).values
    with torch.no_grad():  # each true image's bin: the number of rows it activates
        bins = (model.imprint.linear(x.flatten(1)) > 0).sum(1)
    alone = torch.tensor([(bins == b).sum() == 1 for b in bins])
    assert alone.sum() >= 6 and hits[alone].all(), (bins, hits, best)  # every image alone in its bin comes out
    assert (best[hits] >= 100).all()
    assert result.info["exact"] >= int(hits.sum())  # the attack itself says which came out exactly


def test_imprint_recovers_most_of_a_batch_of_64(cifar):
    model = tampered_model(cifar, bins=256)
    x, y = to_float(cifar.train_x[:64]), torch.as_tensor(cifar.train_y[:64]).long()
    result = get_attack("imprint").reconstruct(target_after(model, x, y, 0.1, {"mode": "fedsgd"}))
    assert exact(result.images, x).sum() >= 32


def test_imprint_on_a_fedavg_update_recovers_some_images(cifar):
    model = tampered_model(cifar, bins=64)
    x, y = to_float(cifar.train_x[:8]), torch.as_tensor(cifar.train_y[:8]).long()
    recipe = {"mode": "fedavg", "local-epochs": 2, "batch-size": 4}
    result = get_attack("imprint").reconstruct(target_after(model, x, y, 0.1, recipe))
    best = pairwise_psnr(result.images, x).max(0).values
    assert result.info["objective"] == "pseudo-gradient"
    assert (best >= 30).sum() >= 1, best


def test_the_imprint_needs_its_block(cifar):
    model = build_model("convnet", cifar.input_shape, 10, seed=0)
    x, y = to_float(cifar.train_x[:2]), torch.as_tensor(cifar.train_y[:2]).long()
    params = list(model.parameters())
    target = AttackTarget(model, [torch.zeros_like(p) for p in params], 2, cifar.input_shape, 10, y, None, {})
    with pytest.raises(FedsimError, match="server-mode = imprint"):
        get_attack("imprint").reconstruct(target)
    del x


def test_the_tampered_model_still_trains(cifar):
    """The server re-imprints the block after every step, as it does every round; the rest learns as usual."""
    data = load_dataset("sample-mnist", "data", False, 0)
    model = tampered_model(data, bins=32)
    rows = imprint_state(model)
    x, y = to_float(data.train_x[:1000]), torch.as_tensor(data.train_y[:1000]).long()
    test_x, test_y = to_float(data.test_x), torch.as_tensor(data.test_y).long()
    before = evaluate(model, test_x, test_y)["test-accuracy"]
    rng = np.random.default_rng(0)
    for _ in range(3):
        train_fedavg(model, x, y, 0.05, 1, 32, rng)
        model.load_state_dict({**model.state_dict(), **rows})
    after = evaluate(model, test_x, test_y)["test-accuracy"]
    assert after > max(0.4, before + 0.25), (before, after)  # measured: 10% before, 50% after


def base(**keys) -> dict:
    return {"dataset": "sample-cifar10", "recipe": "fedsgd", **keys}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (base(**{"server-mode": "imprint", "imprint-bins": 16, "batch-size": 32}), "imprint-bins = 16 is fewer"),
        (
            base(
                **{
                    "server-mode": "imprint",
                    "imprint-bins": 32,
                    "batch-size": 8,
                    "num-clients": 8,
                    "secure-aggregation": True,
                }
            ),
            "fewer than the 64 images",
        ),
        (
            base(**{"secure-aggregation": True, "num-clients": 2, "secagg-threshold": 3, "secagg-num-shares": 3}),
            "needs at least 3 clients per round",
        ),
        (base(**{"secure-aggregation": True, "num-clients": 3, "secagg-threshold": 4}), "at most secagg-num-shares"),
        (base(**{"imprint-statistic": "colour"}), "imprint-statistic = 'colour' is not allowed"),
        (base(**{"server-mode": "evil"}), "server-mode = 'evil' is not allowed"),
    ],
)
def test_bad_settings_are_one_line_before_training(keys, message):
    with pytest.raises(FedsimError, match=message) as caught:
        FedsimConfig.from_mapping(keys)
    assert "\n" not in str(caught.value)


def test_an_input_the_block_cannot_wrap_is_refused():
    with pytest.raises(FedsimError, match="needs image inputs"):
        check_imprint((784,), 64)
    with pytest.raises(FedsimError, match="lower imprint-bins or image-size"):
        check_imprint((3, 512, 512), 256)
