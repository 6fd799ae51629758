"""Image priors of Inverting Gradients and GradInversion: total variation, the BatchNorm-statistics prior, the
closed-form features of the first fully connected layer, and the fit of the images to those features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from attacks.lbfgs import BatchedLBFGS
from attacks.problems import value_and_grad
from fedsim.errors import FedsimError


def total_variation(x: torch.Tensor, norm: str = "anisotropic") -> torch.Tensor:
    """The paper code's anisotropic TV: mean |horizontal neighbour difference| + mean |vertical| ([B, C, H, W]).
    "isotropic": the mean over pixels of sqrt(dx² + dy²) (forward differences, the last row and column
    left out); "squared": mean dx² + mean dy² (the quadratic smoothness prior)."""
    if norm == "isotropic":
        if x.shape[-1] < 2 or x.shape[-2] < 2:
            return x.new_zeros(())
        dx = x[..., :-1, 1:] - x[..., :-1, :-1]
        dy = x[..., 1:, :-1] - x[..., :-1, :-1]
        return torch.sqrt(dx**2 + dy**2 + 1e-8).mean()
    dx = x[..., :, 1:] - x[..., :, :-1] if x.shape[-1] > 1 else x.new_zeros(1)
    dy = x[..., 1:, :] - x[..., :-1, :] if x.shape[-2] > 1 else x.new_zeros(1)
    if norm == "squared":
        return (dx**2).mean() + (dy**2).mean()
    return dx.abs().mean() + dy.abs().mean()


def padded_total_variation(z: torch.Tensor) -> torch.Tensor:
    """breaching's TV: mean over every pixel of |z[i, j+1] − z[i, j]| + |z[i+1, j] − z[i, j]| with the image
    padded by zeros (its conv2d with padding 1), so the last row and column are pulled to 0: to the data
    mean when z is in normalised units ([B, C, H, W])."""
    dx = F.pad(z, (0, 1))[..., :, 1:] - z
    dy = F.pad(z, (0, 0, 0, 1))[..., 1:, :] - z
    return (dx.abs() + dy.abs()).mean()


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers, in forward order of definition."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def running_statistics(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(running mean, running variance) of every BatchNorm layer of the model the server sent."""
    layers = batchnorm_layers(model)
    if not layers or any(m.running_mean is None or m.running_var is None for m in layers):
        raise FedsimError("ig: bn_weight > 0 needs a model with BatchNorm layers that keep running statistics")
    return [(m.running_mean.detach().float(), m.running_var.detach().float()) for m in layers]


def layer_inputs(model: nn.Module, state: dict, x: torch.Tensor, modules: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The inputs of `modules` (of `model`) in one functional forward pass of x, in the order of `modules`."""
    seen: dict[int, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen[id(module)] = inputs[0]

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        functional_call(model, state, (x,))
    finally:
        for handle in handles:
            handle.remove()
    return [seen[id(m)] for m in modules]


def batchnorm_gap(
    inputs: Sequence[torch.Tensor], running: Sequence[Sequence[torch.Tensor]], first: float = 10.0
) -> torch.Tensor:
    """Σ_l ||μ_l(x) - μ_l||₂ + ||σ²_l(x) - σ²_l||₂ over the BatchNorm layers' inputs, the first layer `first` times."""
    total = inputs[0].new_zeros(())
    for layer, (h, (run_mean, run_var)) in enumerate(zip(inputs, running, strict=True)):
        h = h.transpose(0, 1).flatten(1)  # [C, N*H*W]
        mean, var = h.mean(1), h.var(1, unbiased=False)
        term = torch.linalg.vector_norm(var - run_var) + torch.linalg.vector_norm(mean - run_mean)
        total = total + (first if layer == 0 else 1.0) * term
    return total


def batchnorm_prior(
    model: nn.Module, state: dict, x: torch.Tensor, running: Sequence[Sequence[torch.Tensor]], first: float = 10.0
) -> torch.Tensor:
    """GradInversion's BatchNorm-statistics prior (Yin et al., CVPR 2021, after DeepInversion): over every
    BatchNorm layer, ||μ_l(x) - μ_l||₂ + ||σ²_l(x) - σ²_l||₂ between the batch statistics of the layer's input
    for the dummy batch x and the running statistics (μ_l, σ²_l) the server sent; the first layer's term
    counts `first` times (DeepInversion's and breaching's multiplier 10)."""
    return batchnorm_gap(layer_inputs(model, state, x, batchnorm_layers(model)), running, first)


def feature_layer(model: nn.Module) -> tuple[nn.Linear, int, int]:
    """The model's first trainable nn.Linear with a bias, and the positions of its weight and bias among the
    trainable parameters (the order of the observed gradient)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            weight, bias = f"{prefix}.weight", f"{prefix}.bias"
            if weight in names and bias in names:
                return module, names.index(weight), names.index(bias)
    raise FedsimError("ig: feature_weight > 0 needs a model with a trainable fully connected layer with bias")


def feature_gap(found: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The relative squared gap ||h(x) − h||² / ||h||² of a layer input to the closed-form features."""
    return ((found.flatten(1) - features) ** 2).sum() / (features**2).sum().clamp(min=1e-30)


def fit_features(
    problems,
    x0: torch.Tensor,
    features: torch.Tensor,
    fc: nn.Module,
    *,
    tv_weight: float,
    iterations: int,
    coarse: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dummy images fitted to the closed-form features of the first fully connected layer (the relative
    squared gap + α·TV in pixels), `iterations` L-BFGS steps with a backtracking line search, one backward
    pass per evaluation instead of a double one, then boxed to [0, 1]. `coarse` > 1: first `iterations` steps
    on images `coarse` times smaller, bilinearly upsampled (fewer unknowns than features), then the full
    resolution from there. Returns the images and the relative gap per problem (a fit that went non-finite
    keeps its start)."""
    shape = x0.shape[1:]
    if coarse > 1:
        grow = _upsampled(shape[-2:])
        small = F.avg_pool2d(x0.flatten(0, -4), coarse).unflatten(0, x0.shape[:-3])
        x0 = grow(_fit(problems, small, features, fc, tv_weight, iterations, grow)[0]).detach()
    return _fit(problems, x0, features, fc, tv_weight, iterations, lambda x: x)


def _upsampled(size: Sequence[int]):
    """Images [..., C, h, w] bilinearly resized to [..., C, *size]."""

    def grow(x: torch.Tensor) -> torch.Tensor:
        out = F.interpolate(x.flatten(0, -4), size=tuple(size), mode="bilinear", align_corners=False)
        return out.unflatten(0, x.shape[:-3])

    return grow


def _fit(problems, x0: torch.Tensor, features, fc, tv_weight: float, iterations: int, to_images):
    """`iterations` L-BFGS steps of the feature gap + α·TV over the variables x0 (images = to_images(x0))."""
    shape = x0.shape[1:]

    def fit_loss(p: dict, c: dict, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x = to_images(v.view(shape))
        found = layer_inputs(problems.model, {**p, **c}, x, [fc])[0]
        return feature_gap(found, h) + tv_weight * total_variation(x)

    fn = value_and_grad(fit_loss, problems.k, (0, 0, 0, 0), argnum=2)
    fit = BatchedLBFGS(
        x0.flatten(1).clone(),
        lambda v: fn(problems.params, problems.consts, v, features),
        reset_stalled=True,
        line_search="armijo",
    )
    for _ in range(iterations):
        fit.step()
    loss, _ = fit.evaluate(torch.ones_like(fit.frozen))
    ok = torch.isfinite(loss) & torch.isfinite(fit.z).all(1)
    fitted = torch.where(ok[:, None], fit.z, x0.flatten(1)).view_as(x0).clamp(0, 1)
    return fitted.detach(), loss.detach().cpu()
