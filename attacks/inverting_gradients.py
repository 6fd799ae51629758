"""Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020): cosine matching, TV prior, signed Adam."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from attacks.analytic import linear_input
from attacks.base import Attack, AttackTarget, Progress, Trial, problem_generator
from attacks.idlg import target_labels
from attacks.labels import METHODS
from attacks.lbfgs import BatchedLBFGS
from attacks.problems import stack_problems, stack_targets, value_and_grad
from attacks.recorder import Recorder
from fedsim.errors import FedsimError


def cosine_distance(simulated: Sequence[torch.Tensor], observed: Sequence[torch.Tensor]) -> torch.Tensor:
    """1 - <g', g>/(||g'|| ||g||) over all parameters at once (the paper's "sim" cost, one vector of every layer)."""
    dot = sum((s * o).sum() for s, o in zip(simulated, observed, strict=True))
    norm_s = sum((s**2).sum() for s in simulated)
    norm_o = sum((o**2).sum() for o in observed)
    return 1 - dot / torch.sqrt(norm_s * norm_o + 1e-30)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """The paper code's anisotropic TV: mean |horizontal neighbour difference| + mean |vertical| ([B, C, H, W])."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean() if x.shape[-1] > 1 else x.new_zeros(())
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() if x.shape[-2] > 1 else x.new_zeros(())
    return dx + dy


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


INITS = ("randn", "centered", "rand", "features")
DEFAULTS = {
    "iterations": 1000,
    "lr": 0.1,
    "tv_weight": 1e-2,
    "init": "randn",
    "units": "pixels",
    "feature_weight": 0.0,
    "restarts": 2,
}
UNITS = ("pixels", "normalized")

# Named settings; an option given explicitly wins over its preset's value. Result info records the preset.
PRESETS: dict[str, dict] = {
    # The defaults: the paper code's setting in fedsim's [0, 1] pixels.
    "paper": {},
    # breaching's `invertinggradients` exactly: normalised units of the model's own normalisation (x = m + s·z),
    # z from N(0, 1), signed Adam lr 0.1 on z, its zero-padded TV at scale 0.2 on z, its step-lr milestones.
    "breaching": {"units": "normalized", "lr": 0.1, "tv_weight": 0.2, "init": "randn", "restarts": 1},
    # One example, FedSGD (the closed-form features exist): start from the image fitted to the features of the
    # first fully connected layer, keep them as a prior, longer schedule.
    "features": {"init": "features", "feature_weight": 1.0, "iterations": 3000, "restarts": 1},
}


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


class InvertingGradients(Attack):
    """Inverting Gradients: images x' minimise 1 - cos(∇W ℓ(F(x'), y), ∇W) + α·TV(x') with the labels y
    inferred from the last layer (attacks.labels) or given, by Adam on the sign of the gradient.

    As the paper's code (JonasGeiping/invertinggradients): images from N(0, 1), Adam lr 0.1 on the signed
    gradient, the step size cut by 10 at 3/8, 5/8 and 7/8 of the iterations, the images boxed to the valid
    range [0, 1] after every step, restarts kept by their final gradient distance (the code's scoring).
    FedAvg captures are matched against the client's local recipe replayed differentiably (attacks.unroll),
    the paper's setting. The TV weight is for [0, 1] images with the mean-absolute TV above (the paper's
    1e-1 .. 1e-6 are for its normalised images and models). `tolerance` is unused: the schedule runs out.
    """

    name = "ig"

    def __init__(
        self,
        *,
        preset: str = "paper",
        iterations: int | None = None,
        lr: float | None = None,
        tv_weight: float | None = None,
        signed: bool = True,
        label_method: str = "auto",
        unroll: bool = True,
        init: str | None = None,
        units: str | None = None,
        keep: str = "best",
        bn_weight: float = 0.0,
        feature_weight: float | None = None,
        feature_iterations: int = 100,
        restarts: int | None = None,
        tolerance: float = 1e-9,
        snapshot_every: int | None = None,
        cpu_threads: int | None = 1,
    ) -> None:
        if preset not in PRESETS:
            raise FedsimError(f"ig: unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        given = {
            "iterations": iterations,
            "lr": lr,
            "tv_weight": tv_weight,
            "init": init,
            "units": units,
            "feature_weight": feature_weight,
            "restarts": restarts,
        }
        chosen = {**DEFAULTS, **PRESETS[preset], **{k: v for k, v in given.items() if v is not None}}
        iterations, lr, tv_weight, init = chosen["iterations"], chosen["lr"], chosen["tv_weight"], chosen["init"]
        units, feature_weight, restarts = chosen["units"], chosen["feature_weight"], chosen["restarts"]
        super().__init__(restarts=restarts, tolerance=tolerance, snapshot_every=snapshot_every, cpu_threads=cpu_threads)
        if iterations < 1 or not lr > 0 or not tv_weight >= 0 or not bn_weight >= 0 or not feature_weight >= 0:
            raise FedsimError("ig: iterations and lr must be positive, tv_weight, bn_weight and feature_weight >= 0")
        if feature_iterations < 1:
            raise FedsimError("ig: feature_iterations must be positive")
        if init not in INITS:
            raise FedsimError(f"ig: unknown init {init!r}; choose one of: {', '.join(INITS)}")
        if units not in UNITS:
            raise FedsimError(f"ig: unknown units {units!r}; choose one of: {', '.join(UNITS)}")
        if keep not in ("best", "last"):
            raise FedsimError(f"ig: keep must be best or last, got {keep!r}")
        if label_method not in METHODS:
            raise FedsimError(f"ig: unknown label_method {label_method!r}; choose one of: {', '.join(METHODS)}")
        self.preset, self.iterations, self.lr, self.tv_weight, self.signed = preset, iterations, lr, tv_weight, signed
        self.label_method, self.unroll, self.units = label_method, unroll, units
        self.init, self.keep, self.bn_weight, self.feature_weight = init, keep, bn_weight, feature_weight
        self.feature_iterations = feature_iterations

    @classmethod
    def options(cls) -> dict:
        """The options and their defaults (the "paper" preset's values where a preset may set them)."""
        return {k: DEFAULTS.get(k, v) if v is None else v for k, v in super().options().items()}

    def _solve(
        self, targets: Sequence[AttackTarget], *, seed: int, device: torch.device, progress: Progress | None
    ) -> tuple[list[list[Trial]], list[dict]]:
        problems = stack_targets(targets, self.restarts, device, unroll=self.unroll)
        r, k, n = self.restarts, problems.k, problems.examples
        shape = (n, *targets[0].input_shape)
        fixed = [
            target_labels(t, s, self.label_method, self.name) for t, s in zip(targets, problems.signals, strict=True)
        ]
        labels = stack_problems([f[0] for f in fixed], r, device)
        bn_layers = batchnorm_layers(problems.model) if self.bn_weight else []
        running = stack_problems([running_statistics(t.model) for t in targets], r, device) if self.bn_weight else None
        feature_modules, features = [], None
        if self.feature_weight or self.init == "features":  # one example's input to the first FC layer, in
            if problems.objective != "gradient" or n != 1 or problems.aware:  # closed form from its gradient
                raise FedsimError(
                    "ig: feature_weight > 0 and init=features need FedSGD gradients of one example (batch 1)"
                )
            fc, iw, ib = feature_layer(problems.model)
            found = [linear_input(s[iw].double(), s[ib].double()).float()[None] for s in problems.signals]
            features = stack_problems(found, r, device)
            feature_modules = [fc] if self.feature_weight else []
        priors = bn_layers + feature_modules
        channels = targets[0].input_shape[0]
        if self.units == "normalized":  # x = m + s·z, z optimised (breaching's units)
            mean, std = (t.to(device) for t in model_normalization(targets[0].model, channels))
            low, high = -mean / std, (1 - mean) / std
        else:
            mean, std = torch.zeros(1, channels, 1, 1, device=device), torch.ones(1, channels, 1, 1, device=device)
            low, high = mean, std

        def tv(z: torch.Tensor) -> torch.Tensor:
            return padded_total_variation(z) if self.units == "normalized" else total_variation(z)

        def objective(p: dict, c: dict, z: torch.Tensor, y: torch.Tensor, obs, run, feat) -> tuple[torch.Tensor, ...]:
            """The paper's objective of one problem: cosine distance of the gradients + α·TV (+ the BatchNorm
            prior, + the feature gap); aux: the distance."""
            x = mean + std * z
            simulated = problems.signal(p, c, x, y)
            if problems.aware:  # the defense-aware attacker compares only entries the defense left (mask)
                obs, mask, _ = obs  # a rescale changes no cosine
                simulated = [s * m for s, m in zip(simulated, mask, strict=True)]
            distance = cosine_distance(simulated, obs)
            value = distance + self.tv_weight * tv(z)
            if priors:  # one more forward pass of x serves both priors
                inputs = layer_inputs(problems.model, {**p, **c}, x, priors)
                if run is not None:
                    value = value + self.bn_weight * batchnorm_gap(inputs[: len(bn_layers)], run)
                if feature_modules:  # relative squared gap to the recovered features
                    gap = ((inputs[-1].flatten(1) - feat) ** 2).sum() / (feat**2).sum().clamp(min=1e-30)
                    value = value + self.feature_weight * gap
            return value, distance

        dims = (0, 0, 0, 0, 0, None if running is None else 0, None if features is None else 0)
        fn = value_and_grad(objective, k, dims, argnum=2, has_aux=True)
        draws = [initial_images(self.init, shape, problem_generator(seed, i)) for _ in targets for i in range(r)]
        x = torch.stack(draws).to(device)
        fit_gap = None
        if self.init == "features":  # fitted to the closed-form features first (single backward passes)
            x, fit_gap = self._fit_features(problems, x, features, fc)
        # The draw is z itself in normalised units (breaching's N(0, 1) there), else the pixels mapped to z.
        z = x if self.units == "normalized" and self.init == "randn" else (x - mean) / std
        x = z.to(device).requires_grad_()
        optimizer = torch.optim.Adam([x], lr=self.lr)
        if self.units == "normalized":  # breaching's step-lr milestones
            milestones = [int(self.iterations // d) for d in (2.667, 1.6, 1.142)]
        else:
            milestones = [self.iterations * m // 8 for m in (3, 5, 7)]
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        recorder = Recorder(k, self.iterations, self.snapshot_interval(self.iterations))

        def evaluate() -> tuple:
            return fn(problems.params, problems.consts, x.detach(), labels, problems.observed, running, features)

        # The kept iterate of each problem (breaching keeps the one of least objective; "last": the final one).
        best = (mean + std * x.detach()).clone()
        best_value = torch.full((k,), float("inf"), device=device)
        best_distance = torch.full((k,), float("inf"), device=device)
        for it in range(self.iterations + 1):
            grads, (loss, distance) = evaluate()  # the state after `it` steps
            last = it == self.iterations
            with torch.no_grad():
                better = torch.isfinite(loss) & (
                    (loss < best_value) if self.keep == "best" else torch.ones_like(loss, dtype=torch.bool)
                )
                best[better] = (mean + std * x.detach())[better]
                best_value = torch.where(better, loss, best_value)
                best_distance = torch.where(better, distance, best_distance)
            for i in range(k):
                recorder.record(i, it, float(distance[i]), it + 1, (mean + std * x[i].detach()).clamp(0, 1), last=last)
            if progress:
                progress(it, float(distance.min()))
            if last:
                break
            with torch.no_grad():  # a non-finite gradient would poison Adam's moments: that problem pauses
                x.grad = torch.nan_to_num(grads.sign() if self.signed else grads, nan=0.0, posinf=0.0, neginf=0.0)
            optimizer.step()
            schedule.step()
            with torch.no_grad():  # boxed: the images stay valid
                x.copy_(torch.maximum(torch.minimum(x, high), low))
        for i in range(k):
            if not torch.isfinite(best_value[i]):
                recorder.drop(i, f"objective became {loss[i].item()}")
            else:
                recorder.finish(
                    i, self.iterations, float(best_distance[i]), self.iterations + 1, best[i], labels[i].cpu()
                )
        info = [
            {
                "objective": problems.objective,
                "label_method": f[1],
                "attack": self.name,
                "distance": "cosine",
                "optimizer": "adam-signed" if self.signed else "adam",
                "cosine_distance": [float(best_distance[j * r + i]) for i in range(r)],
                "preset": self.preset,
                "iterations": self.iterations,
                "lr": self.lr,
                "tv_weight": self.tv_weight,
                "tv": "zero-padded, normalised units" if self.units == "normalized" else "interior, pixels",
                "units": self.units,
                "restarts": r,
                "init": self.init,
                "kept": self.keep,
                "bn_weight": self.bn_weight,
                "feature_weight": self.feature_weight,
                **(
                    {
                        "feature_iterations": self.feature_iterations,
                        "feature_fit_objective": [float(fit_gap[j * r + i]) for i in range(r)],
                    }
                    if fit_gap is not None
                    else {}
                ),
            }
            for j, f in enumerate(fixed)
        ]
        trials = recorder.trials
        return [trials[j * r : (j + 1) * r] for j in range(len(targets))], info

    def _fit_features(
        self, problems, x0: torch.Tensor, features: torch.Tensor, fc: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The dummy images fitted to the closed-form features of the first fully connected layer (the relative
        squared gap + α·TV in pixels), `feature_iterations` L-BFGS steps with a backtracking line search, one
        backward pass per evaluation instead of a double one, then boxed to [0, 1]. Returns the images and the
        relative gap per problem (a fit that went non-finite keeps its draw)."""
        shape = x0.shape[1:]

        def fit_loss(p: dict, c: dict, v: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
            x = v.view(shape)
            found = layer_inputs(problems.model, {**p, **c}, x, [fc])[0]
            gap = ((found.flatten(1) - h) ** 2).sum() / (h**2).sum().clamp(min=1e-30)
            return gap + self.tv_weight * total_variation(x)

        fn = value_and_grad(fit_loss, problems.k, (0, 0, 0, 0), argnum=2)
        fit = BatchedLBFGS(
            x0.flatten(1).clone(),
            lambda v: fn(problems.params, problems.consts, v, features),
            reset_stalled=True,
            line_search="armijo",
        )
        for _ in range(self.feature_iterations):
            fit.step()
        loss, _ = fit.evaluate(torch.ones_like(fit.frozen))
        ok = torch.isfinite(loss) & torch.isfinite(fit.z).all(1)
        fitted = torch.where(ok[:, None], fit.z, x0.flatten(1)).view_as(x0).clamp(0, 1)
        return fitted.detach(), loss.detach().cpu()
