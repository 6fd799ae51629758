"""Ensemble inversion: losses by hand (fedsim's and DAFL's), farthest model sampling, the activation filters, toy
inversions with both generators, the ensemble-size curve, scoring."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from attacks.dcgan import ConditionalGenerator, Generator
from attacks.ensemble_inversion import (
    InversionConfig,
    dafl_losses,
    filter_top_activations,
    generate,
    generate_unconditional,
    inversion_losses,
    train_generator,
)
from attacks.ensemble_inversion_fl import ensemble_size_curve
from attacks.ensemble_outputs import ensemble_features
from attacks.inversion_eval import attack_accuracy, nearest_private_distance
from attacks.model_sampling import farthest_model_sampling, output_distances, weight_distances
from fedsim.app.cli_model_attacks import invert
from fedsim.errors import FedsimError


@pytest.fixture(autouse=True)
def one_thread():
    """The generators' many tiny steps: on a shared CPU, intra-op threads make them 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


class LinearHalves(nn.Module):
    """Halves with a linear classifier on the two half-means (its penultimate features), as DAFL's loss needs."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[scale, -scale], [-scale, scale]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.stack([x[:, 0, :, :4].mean((1, 2)), x[:, 0, :, 4:].mean((1, 2))], dim=1))


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
    with pytest.raises(FedsimError, match="generator"):
        invert(tmp_path, generator="gan")
    with pytest.raises(FedsimError, match="not a fedsim run"):
        invert(tmp_path)


def test_the_auxiliary_prior_adds_a_discriminator_term():
    seen: list[dict] = []
    cfg = InversionConfig(steps=3, batch_size=4, latent_dim=8, width=4, seed=0)
    aux = torch.rand(10, 1, 8, 8)
    generator = train_generator([Halves(5.0)], (1, 8, 8), 2, cfg, aux=aux, progress=lambda s, t, p: seen.append(p))
    assert len(seen) == 3 and set(seen[-1]) == {"one-hot", "activation", "prior"}
    assert generator(torch.randn(2, 8), torch.tensor([0, 1])).shape == (2, 1, 8, 8)


# ----------------------------------------------------------------------------------------------
# The paper's generator: DAFL's losses, the low-activation filter on the ensemble's labels, ensemble sizes
# ----------------------------------------------------------------------------------------------


def test_dafl_losses_match_hand_computed_values():
    # two models, two images, two classes; the ensemble's mean logits say class 0 for image 0, class 1 for image 1
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 3.0]]])
    features = torch.tensor([[[1.0, -3.0], [0.0, 2.0]], [[-1.0, 1.0], [4.0, 0.0]]])
    parts = dafl_losses(logits, features)
    ce = [
        math.log(1 + math.exp(-2)),
        math.log(1 + math.exp(-1)),
        math.log(1 + math.exp(-1)),
        math.log(1 + math.exp(-3)),
    ]
    assert float(parts["one-hot"]) == pytest.approx(sum(ce) / 4, rel=1e-6)  # against the ensemble's argmax
    assert float(parts["activation"]) == pytest.approx(-12 / 8)  # minus the mean absolute feature
    p0 = (1 / (1 + math.exp(-2)) + 1 / (1 + math.exp(1)) + 1 / (1 + math.exp(-1)) + 1 / (1 + math.exp(3))) / 4
    expected = p0 * math.log10(p0) + (1 - p0) * math.log10(1 - p0)
    assert float(parts["entropy"]) == pytest.approx(expected, rel=1e-6)
    balanced = dafl_losses(torch.tensor([[[5.0, 0.0], [0.0, 5.0]]]), torch.ones(1, 2, 1))["entropy"]
    collapsed = dafl_losses(torch.tensor([[[5.0, 0.0], [5.0, 0.0]]]), torch.ones(1, 2, 1))["entropy"]
    assert float(balanced) < float(collapsed)  # the term rewards a batch that covers the classes


def test_ensemble_features_are_the_last_linear_layers_input():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)) for _ in range(2)]
    x = torch.randn(5, 1, 2, 2)
    logits, features = ensemble_features(nets, x)
    assert logits.shape == (2, 5, 2) and features.shape == (2, 5, 3)
    torch.testing.assert_close(features[1], nets[1][2](nets[1][1](x.flatten(1))))
    torch.testing.assert_close(logits[0], nets[0](x))
    assert not nets[0][3]._forward_pre_hooks  # the hook is removed again
    with pytest.raises(FedsimError, match="linear"):
        ensemble_features([Halves(1.0)], torch.rand(2, 1, 8, 8))


def test_the_low_activation_filter_keeps_what_the_ensemble_is_surest_of():
    models = [Halves(5.0), Halves(8.0)]
    generator = Generator((1, 8, 8), latent_dim=8, width=4)
    generator.eval()
    images, labels, activations = generate_unconditional(generator, models, samples=40, keep=0.25, seed=2)
    z = torch.randn(40, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        everything = generator(z)
        mean = torch.stack([m(everything) for m in models]).mean(0)
    all_act, all_labels = mean.max(dim=1)
    kept_labels = torch.stack([m(images) for m in models]).mean(0).argmax(1)
    assert torch.equal(kept_labels, labels)  # labelled by the ensemble itself
    for c in all_labels.unique():
        mine = all_act[all_labels == c]
        kept = activations[labels == c]
        assert len(kept) == math.ceil(0.25 * len(mine))
        assert kept.min() >= mine.sort(descending=True).values[len(kept) - 1] - 1e-6  # the top ones, none lower


def test_the_unconditional_generator_inverts_a_toy_ensemble_with_balanced_classes():
    models = [LinearHalves(5.0), LinearHalves(8.0)]
    cfg = InversionConfig(steps=60, batch_size=16, lr=5e-3, latent_dim=8, width=4, seed=3, generator="unconditional")
    seen: list[dict] = []
    generator = train_generator(models, (1, 8, 8), 2, cfg, progress=lambda s, t, p: seen.append(p))
    assert isinstance(generator, Generator) and set(seen[-1]) == {"one-hot", "activation", "entropy"}
    images, labels, activations = generate_unconditional(generator, models, samples=64, keep=0.5, seed=1)
    assert set(labels.tolist()) == {0, 1}  # the entropy term keeps both classes
    assert float(activations.min()) > 0.5  # the ensemble is sure of what it kept
    again = generate_unconditional(train_generator(models, (1, 8, 8), 2, cfg), models, 64, 0.5, seed=1)
    torch.testing.assert_close(images, again[0])  # same seed, same images
    with pytest.raises(FedsimError, match="generator"):
        train_generator(models, (1, 8, 8), 2, InversionConfig(steps=1, generator="gan"))


def test_the_size_curve_takes_nested_ensembles_in_fms_order():
    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 2))

    states = [net(s).state_dict() for s in range(4)]

    def load(state: dict) -> nn.Module:
        model = net(0)
        model.load_state_dict(state)
        return model

    private = (torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 0, 1, 0, 1]))
    cfg = InversionConfig(steps=3, batch_size=8, latent_dim=8, width=4, generator="unconditional")
    result, images = ensemble_size_curve(
        states, load, Halves(5.0), cfg, input_shape=(1, 8, 8), num_classes=2, sizes=[1, 3],
        private=private, per_class=4, keep=0.5, aux=None,
    )  # fmt: skip
    assert result["order"] == farthest_model_sampling(weight_distances(states), 3)
    assert [result["sizes"][n]["models"] for n in (1, 3)] == [1, 3] and set(images) == {"size-1", "size-3"}
    assert 0 <= result["sizes"][3]["accuracy"] <= 1 and result["sizes"][3]["generator"] == "unconditional"
    with pytest.raises(FedsimError, match="sizes"):
        ensemble_size_curve(
            states, load, Halves(5.0), cfg, input_shape=(1, 8, 8), num_classes=2, sizes=[5],
            private=private, per_class=4, keep=0.5, aux=None,
        )  # fmt: skip


@pytest.mark.slow
def test_ensemble_sizes_on_independent_mnist_models(tmp_path):
    from fedsim.app.model_attacks import run_ensemble_sizes
    from fedsim.config import FedsimConfig

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (data / "mnist").is_dir():
        pytest.skip("the shared MNIST test set is not here")
    config = FedsimConfig.from_mapping(
        {"data-dir": str(data), "dataset": "mnist", "model": "mlp", "num-clients": 2, "examples-per-client": 100,
         "local-epochs": 10, "lr": 0.1, "seed": 1}
    )  # fmt: skip
    result = run_ensemble_sizes(config, sizes=(1, 2), steps=5, batch_size=16, per_class=2, evaluator_epochs=1,
                                out_dir=tmp_path)  # fmt: skip
    assert len(result["member-test-accuracy"]) == 2 and min(result["member-test-accuracy"]) > 0.5
    assert set(result["priors"]["data-free"]["sizes"]) == {1, 2}
    assert (tmp_path / "results.json").is_file() and (tmp_path / "data-free-size-2.png").is_file()
    with pytest.raises(FedsimError, match="sizes"):
        run_ensemble_sizes(config, sizes=(3,))
    with pytest.raises(FedsimError, match="clients' own"):
        run_ensemble_sizes(config, sizes=(1,), aux_datasets=("mnist",))
