"""Tests of label inference from the last layer (attacks.labels) on real CIFAR-10 batches."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from attacks.base import model_gradients
from attacks.labels import counts_to_labels, infer_labels, round_counts
from fedsim.errors import FedsimError
from fedsim.models import build_model
from tests.conftest import lossless_cifar


@pytest.fixture(scope="module")
def cifar() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = lossless_cifar()
    return torch.nn.functional.avg_pool2d(x, 2), y  # 16x16 keeps it fast


def _count_accuracy(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    common = Counter(estimate.tolist()) & Counter(truth.tolist())
    return sum(common.values()) / len(truth)


@pytest.mark.parametrize("name", ["lenet-dlg", "lenet5", "convnet", "mlp", "resnet20"])
def test_batch_one_label_is_exact_with_bias_and_idlg_rules(cifar, name: str) -> None:
    x, y = cifar
    model = build_model(name, (3, 16, 16), 10, seed=1)
    for i in range(6):
        grads = model_gradients(model, x[i : i + 1], y[i : i + 1])
        for method in ("bias", "idlg"):
            estimate = infer_labels(model, grads, 1, 10, (3, 16, 16), method=method)
            assert estimate.labels.tolist() == [int(y[i])], (name, method, i)


@pytest.mark.parametrize(
    ("name", "batch", "minimum"), [("lenet-dlg", 8, 0.95), ("lenet5", 16, 0.95), ("mlp", 16, 0.95)]
)
def test_batch_label_counts_from_bias(cifar, name: str, batch: int, minimum: float) -> None:
    x, y = cifar
    model = build_model(name, (3, 16, 16), 10, seed=1)
    rng = np.random.default_rng(0)
    accuracies = []
    for _ in range(6):
        idx = torch.as_tensor(rng.choice(len(y), batch, replace=False))
        grads = model_gradients(model, x[idx], y[idx])
        estimate = infer_labels(model, grads, batch, 10, (3, 16, 16))
        assert estimate.method == "bias" and len(estimate.labels) == batch
        assert int(estimate.counts.sum()) == batch
        accuracies.append(_count_accuracy(estimate.labels, y[idx]))
    assert np.mean(accuracies) >= minimum, accuracies


def test_weight_rule_without_last_layer_bias(cifar) -> None:
    x, y = cifar
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(768, 64), nn.ReLU(), nn.Linear(64, 10, bias=False))
    grads = model_gradients(model, x[:1], y[:1])
    assert infer_labels(model, grads, 1, 10, (3, 16, 16)).labels.tolist() == [int(y[0])]
    with pytest.raises(FedsimError, match="bias"):
        infer_labels(model, grads, 1, 10, (3, 16, 16), method="bias")
    accuracies = []
    for start in range(0, 40, 4):
        grads = model_gradients(model, x[start : start + 4], y[start : start + 4])
        estimate = infer_labels(model, grads, 4, 10, (3, 16, 16))
        assert estimate.method == "weight"
        accuracies.append(_count_accuracy(estimate.labels, y[start : start + 4]))
    assert np.mean(accuracies) >= 0.8, accuracies


def test_round_counts_respects_total_and_present_classes() -> None:
    estimate = torch.tensor([2.6, 0.2, 0.4, 1.2, -0.3])
    counts = round_counts(estimate, estimate > 0.3, 5)
    assert counts.tolist() == [3, 0, 1, 1, 0]
    crowded = round_counts(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([True, True, True]), 2)
    assert crowded.tolist() == [1, 1, 0]
    assert counts_to_labels(torch.tensor([0, 2, 1])).tolist() == [1, 1, 2]


def test_bad_requests_are_user_errors(cifar) -> None:
    x, y = cifar
    model = build_model("lenet-dlg", (3, 16, 16), 10, seed=1)
    grads = model_gradients(model, x[:2], y[:2])
    with pytest.raises(FedsimError, match="one label"):
        infer_labels(model, grads, 2, 10, (3, 16, 16), method="idlg")
    with pytest.raises(FedsimError, match="unknown label method"):
        infer_labels(model, grads, 2, 10, (3, 16, 16), method="psychic")
    with pytest.raises(FedsimError, match="100 outputs"):
        infer_labels(model, grads, 2, 100, (3, 16, 16))
