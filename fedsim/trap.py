"""Trap weights (Boenisch et al., "When the Curious Abandon Honesty", EuroS&P 2023): a cheating server that changes
only the parameters of the model it sends, never its architecture, so that checking the architecture shows nothing.

The server rewrites the model's first fully connected layer (on the flattened input, with a bias, before a ReLU).
Each row gets a random half of the input's entries with negative weights -|N(0, sigma)| and the other half with
the same magnitudes, positive and scaled by `scale` < 1, and bias 0. On inputs in [0, 1] a row's pre-activation
is then slightly negative on average, so each row is active for only a few images of a batch; a row active for
one image alone has weight gradient g·x and bias gradient g, and their ratio is that image, exactly.

The paper picks the scale factor per dataset (0.95 for ImageNet, as breaching's `CuriousAbandonHonesty`). Here
the server picks it from public data (the test split, as the imprint server places its bins): by bisection, so
that each row is active for 1/n of the public images, n being the images behind one capture. That share makes
a row most likely to catch exactly one image of a batch of n (n·p·(1-p)^(n-1) is largest at p = 1/n).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedsim.errors import FedsimError

SIGMA = 0.5
"""The paper's (and breaching's) standard deviation of the weights' magnitudes."""


def first_linear(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[str, nn.Linear]:
    """The model's first trainable layer, when it is a fully connected layer with bias on the flattened input."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    name = params[0][0].rsplit(".", 1)[0] if params else ""
    layer = model.get_submodule(name) if name else None
    if (
        not isinstance(layer, nn.Linear)
        or layer.bias is None
        or layer.in_features != math.prod(input_shape)
        or params[1][1] is not layer.bias
    ):
        raise FedsimError(
            "server-mode = trap needs a model whose first layer is fully connected on the flattened input "
            "(e.g. model = mlp); use server-mode = imprint for this one"
        )
    return name, layer


def trap_weights(rows: int, inputs: int, seed: int, sigma: float = SIGMA) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, inputs] negative and positive parts of trap weights: per row a random half of the inputs gets
    -|N(0, sigma)|, the other half the same magnitudes; the weights are negative + scale * positive."""
    gen = torch.Generator().manual_seed(seed)
    half = inputs // 2
    negative, positive = torch.zeros(rows, inputs), torch.zeros(rows, inputs)
    for row in range(rows):
        order = torch.randperm(inputs, generator=gen)
        magnitude = (torch.randn(half, generator=gen) * sigma).abs()
        negative[row, order[:half]] = -magnitude
        positive[row, order[half : 2 * half]] = magnitude
    return negative, positive


def calibrate_scale(negative: torch.Tensor, positive: torch.Tensor, public_x: torch.Tensor, share: float) -> float:
    """The scale in [0, 1] at which each row is active for `share` of the public images (by bisection: the share
    of active rows grows with the scale, from none at 0 to about half at 1 for inputs in [0, 1])."""
    flat = public_x.flatten(1).double()
    neg, pos = flat @ negative.double().T, flat @ positive.double().T
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if float((neg + mid * pos > 0).double().mean()) < share else (low, mid)
    return (low + high) / 2


def set_traps(model: nn.Module, input_shape: tuple[int, ...], public_x: torch.Tensor, batch: int, seed: int) -> dict:
    """Write trap weights into the model's first fully connected layer, scaled so that each row is active for
    1/batch of the public images `public_x`; returns how it tampered, for the records."""
    name, layer = first_linear(model, input_shape)
    if len(public_x) < 2:
        raise FedsimError(
            "server-mode = trap scales its traps on public data, the test split, which this dataset lacks"
        )
    negative, positive = trap_weights(layer.out_features, layer.in_features, seed)
    scale = calibrate_scale(negative, positive, public_x, 1.0 / max(batch, 2))
    with torch.no_grad():
        layer.weight.copy_(negative + scale * positive)
        layer.bias.zero_()
    return {
        "mode": "trap",
        "rows": layer.out_features,
        "sigma": SIGMA,
        "scale": scale,
        "active-share": 1.0 / max(batch, 2),
        "public-examples": int(len(public_x)),
        "tampered": [f"{name}.weight", f"{name}.bias"],
    }


def trap_state(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The tampered tensors, by state-dict name, to write into every global model the server sends."""
    name, layer = first_linear(model, input_shape)
    return {f"{name}.{k}": v.detach().clone() for k, v in layer.state_dict().items()}
