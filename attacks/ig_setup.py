"""Inverting Gradients' setup: its presets and option checks, the starting images, the units the images are
optimised in, the priors' inputs read off the targets, and the result record."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn

from attacks.analytic import linear_input
from attacks.consensus import COMBINES
from attacks.labels import METHODS
from attacks.priors import batchnorm_layers, feature_layer, running_statistics
from attacks.problems import Problems, stack_problems
from attacks.smoothing import SMOOTHINGS
from fedsim.errors import FedsimError

INITS = ("randn", "centered", "rand", "features")
DEFAULTS = {
    "iterations": 1000,
    "lr": 0.1,
    "tv_weight": 1e-2,
    "init": "randn",
    "units": "pixels",
    "feature_weight": 0.0,
    "restarts": 2,
    "feature_decay": "none",
    "polish": 0,
    "distance": "cosine",
    "tv_norm": "anisotropic",
    "tv_decay": "none",
    "dtype": "float32",
    "combine": "best",
}
UNITS = ("pixels", "normalized")
DECAYS = ("none", "linear")  # a prior's weight during matching: constant, or linearly down to 0
DISTANCES = ("cosine", "paramwise")  # one cosine over all gradients, or the mean of each parameter's cosine
TV_NORMS = ("anisotropic", "isotropic", "squared")
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# breaching's `invertinggradients` exactly: normalised units of the model's own normalisation (x = m + s·z),
# z from N(0, 1), signed Adam lr 0.1 on z, its zero-padded TV at scale 0.2 on z, its step-lr milestones.
BREACHING = {"units": "normalized", "lr": 0.1, "tv_weight": 0.2, "init": "randn", "restarts": 1}

# Named settings; an option given explicitly wins over its preset's value. Result info records the preset.
PRESETS: dict[str, dict] = {
    # The defaults: the paper code's setting in fedsim's [0, 1] pixels.
    "paper": {},
    "breaching": BREACHING,
    # breaching's setting with 5x its TV weight (1.0 on z): on the trained ResNet-20, FedSGD batch 1, 200
    # iterations, above breaching's own result on each of 16 photos, side by side (docs/attacks.md).
    "resnet": {**BREACHING, "tv_weight": 1.0},
    # One example, FedSGD (the closed-form features exist): start from the image fitted to the features of the
    # first fully connected layer, keep them as a prior, longer schedule, the mean of 4 restarts (on the
    # untrained ConvNet above the best of the same 4 restarts on each of 9 held-out photos, docs/attacks.md).
    "features": {"init": "features", "feature_weight": 1.0, "iterations": 3000, "restarts": 4, "combine": "mean"},
}


# The constructor's arguments that are not IG's own options (the base class's, and `self`).
RUN_OPTIONS = ("self", "__class__", "preset", "tolerance", "snapshot_every", "cpu_threads")


def auto_preset(model: nn.Module, given: dict) -> str:
    """What `preset=auto` (the default) runs on `model`: `resnet` for a network with BatchNorm layers (on the
    trained ResNet-20 the paper code's pixel-unit setting stays at noise, about 8 dB, where `resnet` beats
    breaching), `paper` for one without (on the untrained ConvNet `paper` is ahead of breaching's setting at
    1,000 iterations); `paper` also wherever `units` or `tv_norm` was given, which only `paper` leaves free."""
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    free = given.get("units") is None and given.get("tv_norm") is None
    return "resnet" if batchnorm and free else "paper"


def resolve_options(preset: str, given: dict) -> dict:
    """Every option by name, checked: the preset's values over the defaults, the options given (not None) over
    both; the feature fit's TV weight is the matching's unless given."""
    if preset not in PRESETS and preset != "auto":
        raise FedsimError(f"ig: unknown preset {preset!r}; choose one of: auto, {', '.join(PRESETS)}")
    preset = "paper" if preset == "auto" else preset  # until the model is known (auto_preset)
    o = {**given, **DEFAULTS, **PRESETS[preset], **{k: v for k, v in given.items() if v is not None}}
    check_options(o)
    if o["feature_tv_weight"] is None:
        o["feature_tv_weight"] = o["tv_weight"]
    return o


def check_options(o: dict) -> None:
    """Refuse option values IG cannot run with (`o`: every option by name)."""
    weights = (o["tv_weight"], o["bn_weight"], o["feature_weight"])
    if o["iterations"] < 1 or not o["lr"] > 0 or not all(w >= 0 for w in weights):
        raise FedsimError("ig: iterations and lr must be positive, tv_weight, bn_weight and feature_weight >= 0")
    if o["feature_iterations"] < 1 or o["feature_coarse"] < 1 or o["polish"] < 0:
        raise FedsimError("ig: feature_iterations and feature_coarse must be positive, polish >= 0")
    if o["feature_tv_weight"] is not None and not o["feature_tv_weight"] >= 0:
        raise FedsimError("ig: feature_tv_weight must be >= 0")
    choices = {"init": INITS, "units": UNITS, "feature_decay": DECAYS, "tv_decay": DECAYS, "combine": COMBINES}
    choices |= {"distance": DISTANCES, "tv_norm": TV_NORMS, "dtype": tuple(DTYPES)}
    for key, allowed in choices.items():
        if o[key] not in allowed:
            raise FedsimError(f"ig: unknown {key} {o[key]!r}; choose one of: {', '.join(allowed)}")
    if o["units"] == "normalized" and o["tv_norm"] != "anisotropic":
        raise FedsimError("ig: tv_norm other than anisotropic needs units=pixels (breaching's TV is anisotropic)")
    if o["smooth"] not in SMOOTHINGS or not o["smooth_beta"] > 0 or not 0 < o["smooth_until"] < 1:
        raise FedsimError(f"ig: smooth must be one of {', '.join(SMOOTHINGS)}, smooth_beta > 0, 0 < smooth_until < 1")
    if o["keep"] not in ("best", "last"):
        raise FedsimError(f"ig: keep must be best or last, got {o['keep']!r}")
    if o["label_method"] not in METHODS:
        raise FedsimError(f"ig: unknown label_method {o['label_method']!r}; choose one of: {', '.join(METHODS)}")


def initial_images(init: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Dummy images to start from: N(0, 1) (the paper code's, there in normalised units); "centered":
    N(0.5, 0.25²), what breaching's N(0, 1) in CIFAR-normalised units is in [0, 1] pixels; U(0, 1);
    "features": grey plus a tenth of N(0, 1), the start of the feature fit."""
    if init == "rand":
        return torch.rand(shape, generator=generator)
    z = torch.randn(shape, generator=generator)
    if init == "features":
        return 0.5 + 0.1 * z
    return 0.5 + 0.25 * z if init == "centered" else z


def model_normalization(model: nn.Module, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel (mean, std) [1, C, 1, 1] the model normalises its [0, 1] inputs with (its `mean` and
    `std` buffers, as fedsim's ResNet-20); a model without them: CIFAR-10's (breaching's data constants)."""
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    if isinstance(mean, torch.Tensor) and isinstance(std, torch.Tensor) and mean.numel() == channels:
        return mean.detach().float().view(1, -1, 1, 1), std.detach().float().view(1, -1, 1, 1)
    if channels != 3:
        return torch.full((1, channels, 1, 1), 0.5), torch.full((1, channels, 1, 1), 0.25)
    return (
        torch.tensor((0.4914672374725342, 0.4822617471218109, 0.4467701315879822)).view(1, 3, 1, 1),
        torch.tensor((0.24703224003314972, 0.24348513782024384, 0.26158785820007324)).view(1, 3, 1, 1),
    )


def image_units(units: str, model: nn.Module, channels: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(mean, std, low, high), [1, C, 1, 1] each: images x = mean + std·z with z boxed to [low, high]; in
    "normalized" units the model's own normalisation (breaching's units), in "pixels" z is x itself."""
    if units == "normalized":
        mean, std = (t.to(device) for t in model_normalization(model, channels))
        return mean, std, -mean / std, (1 - mean) / std
    mean, std = torch.zeros(1, channels, 1, 1, device=device), torch.ones(1, channels, 1, 1, device=device)
    return mean, std, mean, std


def milestones(units: str, iterations: int) -> list[int]:
    """The iterations where the step size is cut by 10: breaching's in normalised units, else 3/8, 5/8, 7/8."""
    if units == "normalized":
        return [int(iterations // d) for d in (2.667, 1.6, 1.142)]
    return [iterations * m // 8 for m in (3, 5, 7)]


def prior_inputs(
    attack, targets: Sequence, problems: Problems, device: torch.device, dtype: torch.dtype = torch.float32
) -> SimpleNamespace:
    """What the priors need, per problem: the BatchNorm layers and their running statistics (bn_weight > 0),
    the first FC layer and its input in closed form from one example's gradient (feature_weight > 0 or
    init "features"); `modules`: the layers whose inputs the objective reads in one forward pass."""
    r = attack.restarts
    bn_layers = batchnorm_layers(problems.model) if attack.bn_weight else []
    running = stack_problems([running_statistics(t.model) for t in targets], r, device) if attack.bn_weight else None
    running = None if running is None else [[t.to(dtype) for t in pair] for pair in running]
    fc, feature_modules, features = None, [], None
    if attack.feature_weight or attack.init == "features":  # one example's input to the first FC layer, in
        if problems.objective != "gradient" or problems.examples != 1 or problems.aware:  # closed form
            raise FedsimError("ig: feature_weight > 0 and init=features need FedSGD gradients of one example (batch 1)")
        fc, iw, ib = feature_layer(problems.model)
        found = [linear_input(s[iw].double(), s[ib].double()).to(dtype)[None] for s in problems.signals]
        features = stack_problems(found, r, device)
        feature_modules = [fc] if attack.feature_weight else []
    return SimpleNamespace(
        bn_layers=bn_layers, running=running, fc=fc, features=features, modules=bn_layers + feature_modules
    )


def result_info(
    attack, problems: Problems, fixed: Sequence, members: torch.Tensor, kept: torch.Tensor, fit_gap, polished=None
) -> list[dict]:
    """Each target's result info: the objective, the options that ran, every restart's cosine distance
    (`members`, before any consensus; `kept`: the distance of what is returned, the consensus's with
    `combine`) and, with `polish`, whether each restart's polish was kept."""
    r = attack.restarts
    return [
        {
            "objective": problems.objective,
            "label_method": f[1],
            "attack": attack.name,
            "distance": attack.distance,
            "optimizer": "adam-signed" if attack.signed else "adam",
            "cosine_distance": [float(members[j * r + i]) for i in range(r)],  # each restart's kept iterate
            "combine": attack.combine,
            **({"consensus_cosine_distance": float(kept[j * r])} if attack.combine != "best" and r > 1 else {}),
            "preset": attack.preset,
            "iterations": attack.iterations,
            "lr": attack.lr,
            "tv_weight": attack.tv_weight,
            "tv": "zero-padded, normalised units" if attack.units == "normalized" else "interior, pixels",
            "tv_norm": attack.tv_norm,
            "tv_decay": attack.tv_decay,
            "dtype": attack.dtype,
            "units": attack.units,
            "restarts": r,
            "init": attack.init,
            "kept": attack.keep,
            "bn_weight": attack.bn_weight,
            "feature_weight": attack.feature_weight,
            "feature_decay": attack.feature_decay,
            **(
                {
                    "feature_iterations": attack.feature_iterations,
                    "feature_tv_weight": attack.feature_tv_weight,
                    "feature_coarse": attack.feature_coarse,
                    "feature_fit_objective": [float(fit_gap[j * r + i]) for i in range(r)],
                }
                if fit_gap is not None
                else {}
            ),
            "polish": attack.polish,
            "smooth": attack.smooth,
            **(
                {"smooth_beta": attack.smooth_beta, "smooth_until": attack.smooth_until}
                if attack.smooth != "none"
                else {}
            ),
            **({"polished": [bool(polished[j * r + i]) for i in range(r)]} if polished is not None else {}),
        }
        for j, f in enumerate(fixed)
    ]
