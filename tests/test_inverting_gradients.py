"""Tests of Inverting Gradients on tiny real CIFAR-10 images and small ReLU networks (8x8 inputs: seconds each)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks import ATTACKS, AttackTarget, get_attack
from attacks.analytic import linear_input
from attacks.base import model_gradients, reconstruct_many
from attacks.ig_setup import auto_preset
from attacks.inverting_gradients import InvertingGradients, cosine_distance
from attacks.priors import batchnorm_prior, feature_layer, total_variation
from fedsim.errors import FedsimError
from fedsim.scoring import score
from tests.conftest import lossless_cifar


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    """The first lossless CIFAR-10 training images, average-pooled to 8x8, in [0, 1], and their labels."""
    x, y = lossless_cifar(4)
    return F.avg_pool2d(x, 4), y


def relu_net(seed: int = 0) -> nn.Module:
    """A small untrained ReLU ConvNet for 3x8x8 inputs (He initialisation, as fedsim's convnet)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return model


def psnr(result, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    return score(result.images, result.labels, x, y)["psnr"]


def test_cosine_distance_on_hand_made_gradients() -> None:
    g = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 2.0]])]
    assert float(cosine_distance(g, g)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_distance(g, [3 * t for t in g])) == pytest.approx(0.0, abs=1e-6)  # scale does not count
    assert float(cosine_distance(g, [-t for t in g])) == pytest.approx(2.0)
    # One cosine over all layers, not a sum of per-layer cosines: <g, o> = 1, |g| = √5, |o| = 1.
    o = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 0.0]])]
    assert float(cosine_distance(g, o)) == pytest.approx(1 - 1 / 5**0.5)


def test_total_variation_on_hand_made_images() -> None:
    flat = torch.full((1, 1, 3, 3), 0.5)
    assert float(total_variation(flat)) == 0.0
    stripes = torch.tensor([[[[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]]])  # |dx| = 1 everywhere, dy = 0
    assert float(total_variation(stripes)) == pytest.approx(1.0)
    step = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])  # dx = 0, |dy| = 1
    assert float(total_variation(step)) == pytest.approx(1.0)


def test_ig_recovers_a_tiny_image_on_a_relu_network(images) -> None:
    x, y = images[0][:1], images[1][:1]
    model = relu_net()
    target = AttackTarget(model, model_gradients(model, x, y), 1, (3, 8, 8), 10)
    result = get_attack("ig", iterations=120, restarts=1).reconstruct(target)
    noise = score(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)), y, x, y)["psnr"][0]
    assert psnr(result, x, y)[0] > noise + 8
    assert result.labels.tolist() == y.tolist() and result.info["label_method"] in ("idlg", "bias")
    assert result.info["distance"] == "cosine" and result.info["optimizer"] == "adam-signed"
    assert 0 <= result.images.min() and result.images.max() <= 1
    assert result.loss < 0.5 * result.history[0]["loss"] and result.history[-1]["iteration"] == 120


def test_ig_keeps_the_restart_with_the_best_gradient_match(images) -> None:
    x, y = images[0][1:2], images[1][1:2]
    model = relu_net(1)
    target = AttackTarget(model, model_gradients(model, x, y), 1, (3, 8, 8), 10)
    result = get_attack("ig", iterations=20, restarts=3).reconstruct(target, seed=2)
    losses = result.info["restart_losses"]
    assert result.info["chosen_restart"] == int(np.argmin(losses)) and result.loss == min(losses)
    assert result.info["cosine_distance"] == pytest.approx(losses, rel=1e-5)


def test_ig_on_an_unrolled_fedavg_capture(images) -> None:
    """The client takes two SGD steps (batch size 1) on two images; IG replays them differentiably."""
    x, y = images[0][2:4], images[1][2:4]
    model = relu_net(2)
    client = copy.deepcopy(model)
    optimizer = torch.optim.SGD(client.parameters(), lr=0.05)
    for i in range(2):
        optimizer.zero_grad()
        F.cross_entropy(client(x[i : i + 1]), y[i : i + 1]).backward()
        optimizer.step()
    update = [c.detach() - g.detach() for c, g in zip(client.parameters(), model.parameters(), strict=True)]
    recipe = {"mode": "fedavg", "lr": 0.05, "local-epochs": 1, "batch-size": 1, "num-examples": 2}
    target = AttackTarget(model, None, 2, (3, 8, 8), 10, update=update, recipe=recipe, labels=y)
    result = get_attack("ig", iterations=120, restarts=1).reconstruct(target)
    assert result.info["objective"] == "unrolled" and result.info["label_method"] == "given"
    assert result.images.shape == x.shape and result.loss < 0.5 * result.history[0]["loss"]
    noise = score(torch.rand(x.shape, generator=torch.Generator().manual_seed(0)), y, x, y)["psnr"]
    assert np.mean(psnr(result, x, y)) > np.mean(noise) + 5


def test_ig_is_registered_with_validated_options() -> None:
    assert ATTACKS["ig"] is InvertingGradients and not InvertingGradients.supports_rescues
    options = InvertingGradients.options()
    assert options["lr"] == 0.1 and options["signed"] is True and options["restarts"] == 2
    with pytest.raises(FedsimError, match="tv_weight"):
        get_attack("ig", tv_weight=-1.0)
    with pytest.raises(FedsimError, match="label_method"):
        get_attack("ig", label_method="guess")
    with pytest.raises(FedsimError, match="init"):
        get_attack("ig", init="zeros")
    with pytest.raises(FedsimError, match="keep"):
        get_attack("ig", keep="first")
    with pytest.raises(FedsimError, match="bn_weight"):
        get_attack("ig", bn_weight=-1.0)


def test_batchnorm_prior_on_known_statistics() -> None:
    """Zero when the dummy batch's statistics are the running ones; the norm of the gaps otherwise, the first
    layer counted 10 times."""
    bn = nn.BatchNorm2d(2)
    model = nn.Sequential(bn).train()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    state = dict(model.named_parameters())
    assert float(batchnorm_prior(model, state, x, [(mean, var)])) == pytest.approx(0.0, abs=1e-5)
    shifted = [(mean + torch.tensor([3.0, 4.0]), var)]  # ||Δμ|| = 5
    assert float(batchnorm_prior(model, state, x, shifted)) == pytest.approx(50.0, rel=1e-5)
    assert float(batchnorm_prior(model, state, x, shifted, first=1.0)) == pytest.approx(5.0, rel=1e-5)
    wider = [(mean, var + torch.tensor([0.0, 2.0]))]  # ||Δσ²|| = 2
    assert float(batchnorm_prior(model, state, x, wider, first=1.0)) == pytest.approx(2.0, rel=1e-5)


def test_ig_with_the_batchnorm_prior_on_a_batchnorm_network(images) -> None:
    """GradInversion's prior against the running statistics the server sent: runs batched, is recorded, and
    refuses a model without BatchNorm."""
    x, y = images[0][:2], images[1][:2]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
    ).train()
    with torch.no_grad():  # running statistics of "training data": the two images themselves
        model(x)
    targets = [
        AttackTarget(model, model_gradients(model, x[i : i + 1], y[i : i + 1]), 1, (3, 8, 8), 10) for i in (0, 1)
    ]
    attack = get_attack("ig", iterations=30, restarts=1, bn_weight=1e-2)
    results = reconstruct_many(attack, targets)
    assert [r.info["bn_weight"] for r in results] == [1e-2, 1e-2]
    assert all(torch.isfinite(r.images).all() and r.loss < r.history[0]["loss"] for r in results)
    with pytest.raises(FedsimError, match="BatchNorm"):
        get_attack("ig", iterations=2, restarts=1, bn_weight=1.0).reconstruct(
            AttackTarget(relu_net(), model_gradients(relu_net(), x[:1], y[:1]), 1, (3, 8, 8), 10)
        )


def test_ig_keeps_the_iterate_of_least_objective(images) -> None:
    """keep="best" returns the iterate of least objective; keep="last" the final one, which is never better."""
    x, y = images[0][3:4], images[1][3:4]
    model = relu_net(3)
    target = AttackTarget(model, model_gradients(model, x, y), 1, (3, 8, 8), 10)

    def objective(images: torch.Tensor) -> float:
        g = model_gradients(model, images, y)
        return float(cosine_distance(g, target.gradients) + 1e-2 * total_variation(images))

    best = get_attack("ig", iterations=40, restarts=1, keep="best").reconstruct(target)
    last = get_attack("ig", iterations=40, restarts=1, keep="last").reconstruct(target)
    assert best.info["kept"] == "best" and last.info["kept"] == "last"
    assert objective(best.images) <= objective(last.images) + 1e-6


def test_ig_feature_prior_uses_the_first_fc_layers_input_in_closed_form(images) -> None:
    """The first FC layer's input comes out of one example's gradient exactly; IG matches it (batch 1 only)."""
    x, y = images[0][:1], images[1][:1]
    model = relu_net(4)
    gradients = model_gradients(model, x, y)
    fc, iw, ib = feature_layer(model)
    assert fc is model[3] and (iw, ib) == (2, 3)
    features = model[:3](x)[0]  # conv, ReLU, flatten: what the first FC layer sees
    assert torch.allclose(linear_input(gradients[iw].double(), gradients[ib].double()).float(), features, atol=1e-4)
    target = AttackTarget(model, gradients, 1, (3, 8, 8), 10)
    result = get_attack("ig", iterations=30, restarts=1, feature_weight=1.0).reconstruct(target)
    assert result.info["feature_weight"] == 1.0 and torch.isfinite(result.images).all()
    pair = AttackTarget(model, model_gradients(model, images[0][:2], images[1][:2]), 2, (3, 8, 8), 10)
    with pytest.raises(FedsimError, match="batch 1"):
        get_attack("ig", iterations=2, restarts=1, feature_weight=1.0).reconstruct(pair)


def test_padded_total_variation_is_breachings_zero_padded_form() -> None:
    from attacks.priors import padded_total_variation

    assert float(padded_total_variation(torch.zeros(1, 1, 3, 3))) == 0.0
    # A constant 1: only the zero padding past the last column and row differs: 3 + 3 of the 9 pixels.
    assert float(padded_total_variation(torch.ones(1, 1, 3, 3))) == pytest.approx(6 / 9)


def test_ig_presets_set_options_and_explicit_options_win() -> None:
    breaching = get_attack("ig", preset="breaching")
    assert (breaching.units, breaching.lr, breaching.tv_weight, breaching.restarts) == ("normalized", 0.1, 0.2, 1)
    assert get_attack("ig", preset="breaching", lr=0.05).lr == 0.05
    resnet = get_attack("ig", preset="resnet")  # breaching's setting, TV weight 1.0 instead of 0.2
    assert (resnet.units, resnet.lr, resnet.init, resnet.restarts) == ("normalized", 0.1, "randn", 1)
    options = lambda attack: {k: v for k, v in vars(attack).items() if k not in ("preset", "given")}  # noqa: E731
    same = options(get_attack("ig", preset="breaching", tv_weight=1.0))
    assert resnet.tv_weight == 1.0 and options(resnet) == same  # only info's preset name tells them apart
    assert get_attack("ig", preset="resnet", tv_weight=0.5).tv_weight == 0.5 and breaching.tv_weight == 0.2
    features = get_attack("ig", preset="features")
    assert (features.init, features.iterations, features.restarts, features.combine) == ("features", 3000, 4, "mean")
    assert get_attack("ig", preset="features", combine="best").combine == "best" and get_attack("ig").combine == "best"
    assert get_attack("ig").init == "randn" and InvertingGradients.options()["iterations"] == 1000
    assert get_attack("ig").polish == 0 and get_attack("ig", preset="features", polish=3).polish == 3
    with pytest.raises(FedsimError, match="preset"):
        get_attack("ig", preset="nope")
    assert InvertingGradients.options()["preset"] == "auto" and options(get_attack("ig")) == options(
        get_attack("ig", preset="paper")
    )
    with pytest.raises(FedsimError, match="units"):
        get_attack("ig", units="nope")


def test_ig_feature_init_and_normalized_units_run_and_are_recorded(images) -> None:
    x, y = images[0][:1], images[1][:1]
    model = relu_net(5)
    target = AttackTarget(model, model_gradients(model, x, y), 1, (3, 8, 8), 10)
    fitted = get_attack("ig", iterations=1, restarts=1, init="features", feature_iterations=5).reconstruct(target)
    drawn = get_attack("ig", iterations=1, restarts=1, init="centered").reconstruct(target)
    assert fitted.info["init"] == "features" and fitted.info["feature_fit_objective"][0] < 0.5
    assert fitted.info["feature_iterations"] == 5 and "feature_iterations" not in drawn.info
    assert psnr(fitted, x, y)[0] > psnr(drawn, x, y)[0]  # the fit to the features alone is already closer
    normalized = get_attack("ig", preset="breaching", iterations=20).reconstruct(target)
    assert normalized.info["units"] == "normalized" and normalized.info["preset"] == "breaching"
    assert float(normalized.images.min()) >= 0 and float(normalized.images.max()) <= 1
    pair = AttackTarget(model, model_gradients(model, images[0][:2], images[1][:2]), 2, (3, 8, 8), 10)
    with pytest.raises(FedsimError, match="batch 1"):
        get_attack("ig", iterations=1, restarts=1, init="features").reconstruct(pair)


def test_ig_feature_fit_and_polish_options_are_validated_and_recorded(images) -> None:
    for bad in ({"feature_coarse": 0}, {"feature_tv_weight": -1.0}, {"feature_decay": "cosine"}, {"polish": -1}):
        with pytest.raises(FedsimError, match=next(iter(bad))):
            get_attack("ig", **bad)
    x, y = images[0][:1], images[1][:1]
    model = relu_net(5)
    target = AttackTarget(model, model_gradients(model, x, y), 1, (3, 8, 8), 10)
    run = dict(iterations=10, restarts=1, init="features", feature_weight=1.0, feature_iterations=5)  # noqa: C408
    plain = get_attack("ig", **run).reconstruct(target)
    assert plain.info["feature_tv_weight"] == plain.info["tv_weight"] and plain.info["feature_coarse"] == 1
    assert plain.info["feature_decay"] == "none" and plain.info["polish"] == 0 and "polished" not in plain.info
    levers = dict(feature_tv_weight=1e-3, feature_coarse=2, feature_decay="linear", polish=3)  # noqa: C408
    tuned = get_attack("ig", **run, **levers).reconstruct(target)
    assert {k: tuned.info[k] for k in levers} == levers and len(tuned.info["polished"]) == 1
    assert tuned.info["feature_fit_objective"][0] < 0.5 and tuned.info["cosine_distance"][0] < 0.1
    assert float(tuned.images.min()) >= 0 and float(tuned.images.max()) <= 1


def test_paramwise_distance_and_tv_norms_on_hand_made_values() -> None:
    from attacks.inverting_gradients import paramwise_cosine_distance

    g = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 2.0]])]
    o = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0, -5.0]])]  # the first tensor matches, the second opposes
    assert float(paramwise_cosine_distance(g, o)) == pytest.approx((0.0 + 2.0) / 2)
    assert float(paramwise_cosine_distance(g, [3 * t for t in g])) == pytest.approx(0.0, abs=1e-6)
    ramp = torch.tensor([[[[0.0, 1.0], [1.0, 2.0]]]])  # dx = dy = 1 at the one interior pixel
    assert float(total_variation(ramp, "isotropic")) == pytest.approx(2**0.5, rel=1e-6)
    assert float(total_variation(2 * ramp, "squared")) == pytest.approx(4.0 + 4.0)
    assert float(total_variation(ramp)) == pytest.approx(2.0)


def test_ig_matching_options_are_validated_and_recorded(images) -> None:
    for bad in ({"distance": "l1"}, {"tv_norm": "l3"}, {"tv_decay": "cosine"}, {"dtype": "float16"}):
        with pytest.raises(FedsimError, match=next(iter(bad))):
            get_attack("ig", **bad)
    with pytest.raises(FedsimError, match="tv_norm"):
        get_attack("ig", units="normalized", tv_norm="isotropic")
    x, y = images[0][:1], images[1][:1]
    model = relu_net(5)
    target = AttackTarget(model, model_gradients(model, x, y), 1, (3, 8, 8), 10)
    run = dict(iterations=10, restarts=1, init="features", feature_weight=1.0, feature_iterations=5, polish=2)  # noqa: C408
    plain = get_attack("ig", **run).reconstruct(target)
    assert (plain.info["distance"], plain.info["tv_norm"], plain.info["tv_decay"]) == ("cosine", "anisotropic", "none")
    assert plain.info["dtype"] == "float32"
    levers = dict(distance="paramwise", tv_norm="isotropic", tv_decay="linear", dtype="float64")  # noqa: C408
    tuned = get_attack("ig", **run, **levers).reconstruct(target)
    assert {k: tuned.info[k] for k in levers} == levers and tuned.images.dtype == torch.float32
    assert tuned.info["cosine_distance"][0] < 0.5 and 0 <= tuned.images.min() and tuned.images.max() <= 1
    # float64 follows float32's trajectory on this short run: the same images up to rounding.
    double = get_attack("ig", iterations=10, restarts=1, dtype="float64").reconstruct(target)
    single = get_attack("ig", iterations=10, restarts=1).reconstruct(target)
    assert torch.allclose(double.images, single.images, atol=1e-3)


def test_ig_smooth_option_smooths_early_and_matches_on_the_exact_model(images) -> None:
    from attacks.smoothing import SoftMaxPool2d, beta_at, set_beta, smoothed_copy
    from fedsim.models import build_model

    model = build_model("convnet", (3, 8, 8), 10, seed=0)
    smooth = smoothed_copy(model, 2.0)
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in smooth.modules())
    assert any(isinstance(m, SoftMaxPool2d) for m in smooth.modules())
    assert any(isinstance(m, nn.ReLU) for m in model.modules())  # the model itself is left as it was
    x = images[0][:1]
    assert (smooth(x) - model(x)).abs().max() > 1e-3  # small β: a different function
    set_beta(smooth, 1e5)
    assert torch.allclose(smooth(x), model(x), atol=1e-3)  # large β: the exact model
    assert beta_at(0, 100, 10.0, 0.5) == 10.0 and beta_at(49, 100, 10.0, 0.5) > 900
    assert beta_at(50, 100, 10.0, 0.5) is None and beta_at(100, 100, 10.0, 0.5) is None
    target = AttackTarget(model, model_gradients(model, x, images[1][:1]), 1, (3, 8, 8), 10)
    result = get_attack("ig", iterations=20, restarts=1, smooth="softplus", smooth_until=0.5).reconstruct(target)
    assert result.info["smooth"] == "softplus" and result.info["smooth_beta"] == 10.0
    assert result.info["cosine_distance"][0] == pytest.approx(result.loss, rel=1e-5)  # kept on the exact model
    assert get_attack("ig", iterations=2, restarts=1).reconstruct(target).info["smooth"] == "none"
    for bad in ({"smooth": "relu6"}, {"smooth": "softplus", "smooth_beta": 0.0}, {"smooth_until": 1.0}):
        with pytest.raises(FedsimError):
            get_attack("ig", **bad)


def test_the_default_preset_follows_the_model(images) -> None:
    """preset=auto: `resnet` for a network with BatchNorm (unless units or tv_norm are given), `paper` without;
    result info names the preset that ran."""
    x, y = images[0][:1], images[1][:1]
    plain = relu_net(0)
    torch.manual_seed(0)
    with_bn = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)
    )
    assert auto_preset(plain, {}) == "paper" and auto_preset(with_bn, {}) == "resnet"
    assert (
        auto_preset(with_bn, {"units": "pixels"}) == "paper" and auto_preset(with_bn, {"tv_norm": "squared"}) == "paper"
    )
    for model, preset, units in ((plain, "paper", "pixels"), (with_bn, "resnet", "normalized")):
        target = AttackTarget(model, model_gradients(model, x, y), 1, tuple(x.shape[1:]), 10)
        info = get_attack("ig", iterations=3).reconstruct(target).info
        assert info["preset"] == f"auto: {preset}" and info["units"] == units
        assert info["restarts"] == get_attack("ig", preset=preset).restarts
        given = get_attack("ig", iterations=3, tv_weight=0.5).reconstruct(target).info  # options given still win
        assert given["tv_weight"] == 0.5 and given["units"] == units


def test_consensus_of_restarts_on_hand_made_images() -> None:
    from attacks.consensus import consensus

    # Two targets x three restarts of 1x1x2 "images"; target 1's second restart diverged (objective inf).
    best = torch.tensor([[0.0, 0.3], [0.3, 0.6], [0.9, 0.0], [0.2, 0.2], [1.0, 1.0], [0.4, 0.8]]).view(6, 1, 1, 1, 2)
    value = torch.tensor([1.0, 2.0, 3.0, 1.0, float("inf"), 1.0])
    seen = []

    def fn(z):  # the objective of z: its sum, the distance: its mean (mean 0, std 1: z = pixels)
        seen.append(z.clone())
        return torch.zeros_like(z), (z.flatten(1).sum(1), z.flatten(1).mean(1))

    zero, one = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    means, distance = best.clone(), torch.zeros(6)
    consensus(fn, means, value.clone(), distance, 3, "mean", zero, one)
    assert torch.allclose(means[:3], torch.tensor([0.4, 0.3]).expand(3, 1, 1, 1, 2))
    assert torch.allclose(means[3:], torch.tensor([0.3, 0.5]).expand(3, 1, 1, 1, 2))  # the diverged one left out
    assert torch.allclose(distance, torch.tensor([0.35] * 3 + [0.4] * 3))
    medians, kept = best.clone(), value.clone()
    consensus(fn, medians, kept, torch.zeros(6), 3, "median", zero, one)
    assert torch.allclose(medians[0], torch.tensor([0.3, 0.3])) and torch.allclose(kept[:3], torch.tensor(0.6))


def test_ig_returns_the_consensus_of_its_restarts_with_its_own_distance(images) -> None:
    with pytest.raises(FedsimError, match="combine"):
        get_attack("ig", combine="vote")
    x, y = images[0][:1], images[1][:1]
    model = relu_net(6)
    target = AttackTarget(model, model_gradients(model, x, y), 1, (3, 8, 8), 10)
    best = get_attack("ig", iterations=60, restarts=3).reconstruct(target)
    mean = get_attack("ig", iterations=60, restarts=3, combine="mean").reconstruct(target)
    assert best.info["combine"] == "best" and "consensus_cosine_distance" not in best.info
    assert mean.info["combine"] == "mean" and mean.info["cosine_distance"] == best.info["cosine_distance"]
    own = float(cosine_distance(model_gradients(model, mean.images, mean.labels), target.gradients))
    assert mean.info["consensus_cosine_distance"] == pytest.approx(own, rel=1e-3, abs=1e-6)
    assert mean.loss == pytest.approx(own, rel=1e-3, abs=1e-6)
    assert not torch.allclose(mean.images, best.images) and 0 <= mean.images.min() and mean.images.max() <= 1
