"""Ensemble inversion: losses by hand, farthest model sampling, the activation filter, a toy inversion, scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from attacks.ensemble_inversion import (
    ConditionalGenerator,
    InversionConfig,
    farthest_model_sampling,
    filter_top_activations,
    generate,
    inversion_losses,
    output_distances,
    train_generator,
    weight_distances,
)
from attacks.inversion_eval import attack_accuracy, nearest_private_distance
from fedsim.app.cli_model_attacks import invert
from fedsim.errors import FedsimError


def test_losses_match_hand_computed_values():
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]])  # two models, one image, two classes
    parts = inversion_losses(logits, torch.tensor([0]))
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(1))) / 2
    assert float(parts["one-hot"]) == pytest.approx(expected, rel=1e-6)
    assert float(parts["activation"]) == pytest.approx(-1.5)  # minus the mean of the maximum logits 2 and 1


def test_fms_picks_the_farthest_model():
    positions = np.array([0.0, 1.0, 5.0, 10.0])
    distances = np.abs(positions[:, None] - positions[None, :])
    assert farthest_model_sampling(distances, 1) == [3]  # the most recent model first
    assert farthest_model_sampling(distances, 2) == [3, 0]  # then the farthest from it
    assert farthest_model_sampling(distances, 3) == [3, 0, 2]  # then the farthest from both (5 beats 1)
    assert farthest_model_sampling(distances, 2, first=1) == [1, 3]
    with pytest.raises(FedsimError):
        farthest_model_sampling(distances, 5)


def test_distances_between_models():
    states = [{"w": torch.zeros(2), "n": torch.tensor(3)}, {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(1)}]
    np.testing.assert_allclose(weight_distances(states), [[0, 5], [5, 0]])  # integer buffers are ignored
    same, other = nn.Linear(2, 2), nn.Linear(2, 2)
    d = output_distances([same, same, other], torch.randn(8, 2))
    assert d.shape == (3, 3) and d[0, 1] == 0 and d[0, 2] > 0


def test_filter_keeps_the_top_activations_of_each_class():
    activations = torch.tensor([0.1, 0.9, 0.5, 3.0, 2.0, 1.0, 0.7])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    kept = filter_top_activations(activations, labels, 0.5)
    assert kept.tolist() == [1, 2, 3, 4]  # ceil(0.5 * 3) = 2 of class 0, 2 of class 1, highest first
    assert filter_top_activations(activations, labels, 1.0).numel() == 7
    with pytest.raises(FedsimError):
        filter_top_activations(activations, labels, 0.0)


def test_nearest_private_distance_and_attack_accuracy():
    private_x = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    private_y = torch.tensor([0, 1])
    images = torch.stack([torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 0.25), torch.zeros(1, 2, 2)])
    labels = torch.tensor([0, 1, 2])
    d = nearest_private_distance(images, labels, private_x, private_y)
    np.testing.assert_allclose(d[:2], [0.5, 0.75])  # RMS pixel distance to the same class only
    assert np.isnan(d[2])  # no private image of class 2

    class Bright(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.flatten(1).mean(1, keepdim=True)
            return torch.cat([0.5 - m, m - 0.5, torch.full_like(m, -9)], dim=1)

    result = attack_accuracy(Bright(), images, labels)
    assert result["accuracy"] == pytest.approx(1 / 3) and result["per-class"] == {0: 1.0, 1: 0.0, 2: 0.0}


class Halves(nn.Module):
    """A frozen toy classifier on 1x8x8 images: class 0 = left half brighter, class 1 = right half brighter."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diff = (x[:, 0, :, :4].mean((1, 2)) - x[:, 0, :, 4:].mean((1, 2))) * self.scale
        return torch.stack([diff, -diff], dim=1)


def test_the_generator_inverts_a_toy_ensemble_and_is_seeded():
    models = [Halves(5.0), Halves(8.0)]
    cfg = InversionConfig(steps=60, batch_size=16, lr=5e-3, latent_dim=8, width=4, seed=3)
    generator = train_generator(models, (1, 8, 8), 2, cfg)
    images, labels, activations = generate(generator, models, [0, 1], per_class=8, keep=0.5, seed=1)
    assert images.shape == (8, 1, 8, 8) and labels.tolist() == [0] * 4 + [1] * 4
    left_brighter = images[:, 0, :, :4].mean((1, 2)) > images[:, 0, :, 4:].mean((1, 2))
    assert left_brighter.tolist() == [True] * 4 + [False] * 4
    again = generate(train_generator(models, (1, 8, 8), 2, cfg), models, [0, 1], per_class=8, keep=0.5, seed=1)
    torch.testing.assert_close(images, again[0])  # same seed, same images
    assert ConditionalGenerator((3, 112, 92), 4)(torch.randn(2, 100), torch.tensor([0, 3])).shape == (2, 3, 112, 92)


def test_cli_refuses_mistakes_with_a_clear_message(tmp_path):
    with pytest.raises(FedsimError, match="does not exist"):
        invert(tmp_path / "nope")
    with pytest.raises(FedsimError, match="keep"):
        invert(tmp_path, keep=1.5)
    with pytest.raises(FedsimError, match="not a fedsim run"):
        invert(tmp_path)


def test_the_auxiliary_prior_adds_a_discriminator_term():
    seen: list[dict] = []
    cfg = InversionConfig(steps=3, batch_size=4, latent_dim=8, width=4, seed=0)
    aux = torch.rand(10, 1, 8, 8)
    generator = train_generator([Halves(5.0)], (1, 8, 8), 2, cfg, aux=aux, progress=lambda s, t, p: seen.append(p))
    assert len(seen) == 3 and set(seen[-1]) == {"one-hot", "activation", "prior"}
    assert generator(torch.randn(2, 8), torch.tensor([0, 1])).shape == (2, 1, 8, 8)
