"""Inverting Gradients (Geiping, Bauermeister, Dröge, Moeller, NeurIPS 2020): cosine matching, TV prior, signed Adam.

The objective, then the loop; presets, option checks and units are in attacks.ig_setup, the priors (TV,
BatchNorm statistics, closed-form features and the fit to them) in attacks.priors.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial

import torch

from attacks import ig_setup as setup
from attacks import priors
from attacks.base import Attack, AttackTarget, Progress, Trial, problem_generator
from attacks.consensus import consensus
from attacks.idlg import target_labels
from attacks.polish import polish
from attacks.problems import functional_gradient, stack_problems, stack_targets, value_and_grad, with_dtype
from attacks.recorder import Recorder
from attacks.smoothing import beta_at, set_beta, smoothed_copy
from attacks.unroll import simulated_signal


def cosine_distance(simulated: Sequence[torch.Tensor], observed: Sequence[torch.Tensor]) -> torch.Tensor:
    """1 - <g', g>/(||g'|| ||g||) over all parameters at once (the paper's "sim" cost, one vector of every layer)."""
    dot = sum((s * o).sum() for s, o in zip(simulated, observed, strict=True))
    norm_s = sum((s**2).sum() for s in simulated)
    norm_o = sum((o**2).sum() for o in observed)
    return 1 - dot / torch.sqrt(norm_s * norm_o + 1e-30)


def paramwise_cosine_distance(simulated: Sequence[torch.Tensor], observed: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean over parameter tensors of 1 - cos(g'_l, g_l) (breaching's `paramwise-cosine-similarity`): every
    tensor counts the same, whatever its norm (one cosine over all is led by the largest layers)."""
    pairs = list(zip(simulated, observed, strict=True))
    return sum(cosine_distance([s], [o]) for s, o in pairs) / len(pairs)


def decayed(weight: float, decay: str | None, it: int, iterations: int) -> float:
    """A prior's weight after `it` of `iterations` steps: constant, or "linear" from `weight` down to 0."""
    return weight * (1 - it / iterations) if decay == "linear" else weight


class InvertingGradients(Attack):
    """Inverting Gradients: images x' minimise 1 - cos(∇W ℓ(F(x'), y), ∇W) + α·TV(x') with the labels y
    inferred from the last layer (attacks.labels) or given, by Adam on the sign of the gradient.

    As the paper's code (JonasGeiping/invertinggradients): images from N(0, 1), Adam lr 0.1 on the signed
    gradient, the step size cut by 10 at 3/8, 5/8 and 7/8 of the iterations, the images boxed to the valid
    range [0, 1] after every step, restarts kept by their final gradient distance (the code's scoring).
    FedAvg captures are matched against the client's local recipe replayed differentiably (attacks.unroll),
    the paper's setting. The TV weight is for [0, 1] images with the mean-absolute TV above (the paper's
    1e-1 .. 1e-6 are for its normalised images and models). `tolerance` is unused: the schedule runs out.
    That is `preset=paper`; the default `preset=auto` runs it on a model without BatchNorm and `preset=resnet`
    (breaching's normalised units, TV weight 1.0) on one with BatchNorm (attacks.ig_setup.auto_preset).
    """

    name = "ig"

    def __init__(  # None: the preset's value (attacks.ig_setup)
        self, *, preset: str = "auto", iterations: int | None = None, lr: float | None = None,
        tv_weight: float | None = None, signed: bool = True, label_method: str = "auto", unroll: bool = True,
        init: str | None = None, units: str | None = None, keep: str = "best", bn_weight: float = 0.0,
        feature_weight: float | None = None, feature_iterations: int = 100, feature_tv_weight: float | None = None,
        feature_coarse: int = 1, feature_decay: str | None = None, polish: int | None = None,
        distance: str | None = None, tv_norm: str | None = None, tv_decay: str | None = None,
        dtype: str | None = None, smooth: str = "none", smooth_beta: float = 10.0, smooth_until: float = 0.5,
        combine: str | None = None, restarts: int | None = None, tolerance: float = 1e-9,
        snapshot_every: int | None = None, cpu_threads: int | None = 1,
    ) -> None:  # fmt: skip
        given = {k: v for k, v in locals().items() if k not in setup.RUN_OPTIONS}
        o = setup.resolve_options(preset, given)
        run = dict(tolerance=tolerance, snapshot_every=snapshot_every, cpu_threads=cpu_threads)  # noqa: C408
        super().__init__(restarts=o.pop("restarts"), **run)
        vars(self).update(o, preset=preset, given=given)  # every option an attribute of the same name

    def _reconstruct_group(self, targets: Sequence[AttackTarget], **kwargs) -> list:
        """With `preset=auto`, the attack as the preset for the targets' model sets it (on a copy)."""
        if self.preset != "auto":
            return super()._reconstruct_group(targets, **kwargs)
        chosen = setup.auto_preset(targets[0].model, self.given)
        resolved = copy.copy(self)
        vars(resolved).update(setup.resolve_options(chosen, self.given), preset=f"auto: {chosen}")
        return Attack._reconstruct_group(resolved, targets, **kwargs)

    @classmethod
    def options(cls) -> dict:
        """The options and their defaults (the "paper" preset's values where a preset may set them: what `auto`
        runs on a model without BatchNorm)."""
        return {k: setup.DEFAULTS.get(k, v) if v is None else v for k, v in super().options().items()}

    def _solve(
        self, targets: Sequence[AttackTarget], *, seed: int, device: torch.device, progress: Progress | None
    ) -> tuple[list[list[Trial]], list[dict]]:
        dtype = setup.DTYPES[self.dtype]
        problems = with_dtype(stack_targets(targets, self.restarts, device, unroll=self.unroll), dtype)
        r, k, n = self.restarts, problems.k, problems.examples
        fixed = [
            target_labels(t, s, self.label_method, self.name) for t, s in zip(targets, problems.signals, strict=True)
        ]
        labels = stack_problems([f[0] for f in fixed], r, device)
        prior = setup.prior_inputs(self, targets, problems, device, dtype)
        nb = len(prior.bn_layers)
        units = setup.image_units(self.units, targets[0].model, targets[0].input_shape[0], device)
        mean, std, low, high = (t.to(dtype) for t in units)
        norm = self.tv_norm
        tv = priors.padded_total_variation if self.units == "normalized" else lambda v: priors.total_variation(v, norm)
        gap = paramwise_cosine_distance if self.distance == "paramwise" else cosine_distance

        def objective(
            p: dict, c: dict, z: torch.Tensor, y: torch.Tensor, obs, run, feat, fw, tw, signal=problems.signal
        ) -> tuple[torch.Tensor, ...]:
            """The paper's objective of one problem: cosine distance of the gradients (or the parameter-wise
            one) + α·TV at weight `tw` (+ the BatchNorm prior, + the feature gap at weight `fw`); aux: the
            distance. `signal`: the simulated gradient, of the exact model or of its smoothed copy."""
            x = mean + std * z
            simulated = signal(p, c, x, y)
            if problems.aware:  # the defense-aware attacker compares only entries the defense left (mask)
                obs, mask, _ = obs  # a rescale changes no cosine
                simulated = [s * m for s, m in zip(simulated, mask, strict=True)]
            distance = gap(simulated, obs)
            value = distance + tw * tv(z)
            if prior.modules:  # one more forward pass of x serves both priors
                inputs = priors.layer_inputs(problems.model, {**p, **c}, x, prior.modules)
                if run is not None:
                    value = value + self.bn_weight * priors.batchnorm_gap(inputs[:nb], run)
                if len(prior.modules) > nb:  # relative squared gap to the recovered features
                    value = value + fw * priors.feature_gap(inputs[-1], feat)
            return value, distance

        running, features = prior.running, prior.features
        dims = (0, 0, 0, 0, 0, None if running is None else 0, None if features is None else 0, None, None)
        fn = value_and_grad(objective, k, dims, argnum=2, has_aux=True)
        if self.smooth != "none":  # the same objective on a smoothed copy of the model (attacks.smoothing)
            smooth_model = smoothed_copy(problems.model, self.smooth_beta)
            smooth_signal = simulated_signal(
                problems.objective, functional_gradient(smooth_model, vmapped=k > 1), targets[0]
            )
            smooth_fn = value_and_grad(partial(objective, signal=smooth_signal), k, dims, argnum=2, has_aux=True)
        shape = (n, *targets[0].input_shape)
        draws = [setup.initial_images(self.init, shape, problem_generator(seed, i)) for _ in targets for i in range(r)]
        x = torch.stack(draws).to(device, dtype)
        fit_gap = None
        if self.init == "features":  # fitted to the closed-form features first (single backward passes)
            fit = dict(tv_weight=self.feature_tv_weight, iterations=self.feature_iterations, coarse=self.feature_coarse)  # noqa: C408
            x, fit_gap = priors.fit_features(problems, x, features, prior.fc, **fit)
        # The draw is z itself in normalised units (breaching's N(0, 1) there), else the pixels mapped to z.
        z = x if self.units == "normalized" and self.init == "randn" else (x - mean) / std
        x = z.to(device).requires_grad_()
        optimizer = torch.optim.Adam([x], lr=self.lr)
        schedule = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, setup.milestones(self.units, self.iterations), gamma=0.1
        )
        recorder = Recorder(k, self.iterations, self.snapshot_interval(self.iterations))

        # The kept iterate of each problem (breaching keeps the one of least objective; "last": the final one).
        best = (mean + std * x.detach()).clone()
        best_value = torch.full((k,), float("inf"), device=device, dtype=dtype)
        best_distance = torch.full((k,), float("inf"), device=device, dtype=dtype)
        for it in range(self.iterations + 1):
            fw = decayed(self.feature_weight, self.feature_decay, it, self.iterations)
            tw = decayed(self.tv_weight, self.tv_decay, it, self.iterations)
            beta = beta_at(it, self.iterations, self.smooth_beta, self.smooth_until) if self.smooth != "none" else None
            if beta is not None:
                set_beta(smooth_model, beta)
            grads, (loss, distance) = (fn if beta is None else smooth_fn)(
                problems.params, problems.consts, x.detach(), labels, problems.observed, running, features, fw, tw
            )  # the state after `it` steps
            last = it == self.iterations
            with torch.no_grad():  # only iterates judged on the exact model are kept
                better = (
                    torch.isfinite(loss)
                    & (beta is None)
                    & ((loss < best_value) if self.keep == "best" else torch.ones_like(loss, dtype=torch.bool))
                )
                best[better] = (mean + std * x.detach())[better]
                best_value = torch.where(better, loss, best_value)
                best_distance = torch.where(better, distance, best_distance)
            for i in range(k):
                shown = (mean + std * x[i].detach()).clamp(0, 1).float()
                recorder.record(i, it, float(distance[i]), it + 1, shown, last=last)
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
        fw = decayed(self.feature_weight, self.feature_decay, self.iterations, self.iterations)
        tw = decayed(self.tv_weight, self.tv_decay, self.iterations, self.iterations)
        args = (problems.params, problems.consts, labels, problems.observed, running, features, fw, tw)
        final = lambda v: fn(*args[:2], v, *args[2:])  # noqa: E731  the objective at the schedule's end
        members = best_distance.clone()  # each restart's own, before any consensus
        if self.combine != "best" and r > 1:  # each target's restarts replaced by their consensus
            consensus(final, best, best_value, best_distance, r, self.combine, mean, std)
        polished = None
        if self.polish:  # L-BFGS on the same objective from the kept iterate; kept where it lowers the objective
            polished = polish(final, best, best_value, best_distance, mean, std, (low, high), self.polish)
        for i in range(k):
            if not torch.isfinite(best_value[i]):
                recorder.drop(i, f"objective became {loss[i].item()}")
            else:
                recorder.finish(
                    i, self.iterations, float(best_distance[i]), self.iterations + 1, best[i].float(), labels[i].cpu()
                )
        info = setup.result_info(self, problems, fixed, members, best_distance, fit_gap, polished)
        trials = recorder.trials
        return [trials[j * r : (j + 1) * r] for j in range(len(targets))], info
