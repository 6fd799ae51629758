"""Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019): match dummy gradients with L-BFGS."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attacks.base import Attack, AttackTarget, Progress, Trial, divergence_reasons, problem_generator
from attacks.feature_start import closed_form_features, closed_form_labels, fit_features
from attacks.lbfgs import BatchedLBFGS
from attacks.problems import Problems, stack_problems, stack_targets, value_and_grad
from attacks.recorder import Recorder
from fedsim.errors import FedsimError

# The optimiser presets: the paper's L-BFGS as its code runs it, and the default that survives real photos.
PRESETS: dict[str, dict] = {
    "robust": {
        "line_search": "armijo",
        "rescues": 5,
        "restarts": 1,
        "extra_restarts": 1,
        "init": "features",
    },
    "paper": {
        "line_search": None,
        "rescues": 0,
        "restarts": 1,
        "extra_restarts": 0,
        "init": "noise",
    },
}
INITS = ("features", "noise")


class DLG(Attack):
    """Deep Leakage from Gradients: dummy images and soft labels optimised jointly by L-BFGS.

    The paper's Algorithm 1: draw dummy images x' and label logits y' from N(0, 1); then repeat
    D = ||∂ℓ(F(x', W), softmax(y'))/∂W − ∇W||² and (x', y') ← L-BFGS step on D. `matching_loss`
    is D, `_optimise` the loop; K = targets × restarts problems run as one batch (attacks.problems).

    `optimizer` chooses how (x', y') move. "paper" is the paper's code (mit-han-lab/dlg): L-BFGS lr 1
    with torch's default 20 inner iterations per step and no line search, 300 steps, one restart,
    no rescues. On images nobody tuned it for it diverges on a third to a half of them (the step
    blows the images up within a few iterations). "robust" (the default) is the same L-BFGS with a
    backtracking (Armijo) line search per problem (attacks.lbfgs), memory cleared on a stall,
    `rescues` 5, one restart and `extra_restarts` 1 on demand: a step can no longer raise the loss, so a
    restart does not blow up; a target whose restart ends stuck (relative loss above `restart_above`,
    1e-6) gets a second restart from its own draw, run after the first, and the restart that matches the
    gradient better is kept. Measured on 20 CIFAR-10 photos, one restart ends at 0.9-1.6e-7 on the
    hardest four (31-34 dB) and ~1e-9 elsewhere, so the second one costs only where it is needed; an
    explicit `restarts` runs exactly that many, side by side, with no extra ones unless asked. Info's
    `side_by_side` and `on_demand` record what ran. Both clamp the images to [0, 1] only at
    the end; result info records `optimizer`, `tolerances` and `iterations`. `tolerances="relative"`
    (not a default: measured mixed) takes L-BFGS's tolerances relative to ||∇W||² (attacks.lbfgs, `scale`).

    `init` chooses where the images start. "noise" (the paper's, with optimizer "paper") is the N(0, 1)
    draw. "features" (the default) reads the last layer's input features off its gradient in closed form
    (attacks.labels.last_layer_features: one example, FedSGD) and first fits the image, from grey plus a
    tenth of the draw, to them: `feature_iterations` L-BFGS steps, each evaluation a single backward pass
    instead of a double one, counted in `evaluations` (and apart in info's `feature_evaluations`); without
    a closed form it falls back to noise. Info's `init` records which ran.

    With "features", DLG's label logits start at the label read off the same gradient (attacks.labels,
    iDLG's inference): `label_gap` (20) at that class, 0 elsewhere, so the soft label starts one-hot
    instead of at softmax(N(0, 1)). Why: the gradient is zero when the soft label equals the model's
    prediction, and the untrained LeNet predicts one class with p ≈ 0.8 whatever the photo, so for the
    photos of that class the true gradient is small (∝ 1 − p_y, ~40 times below the others) and a noise
    start falls towards that trivial point; measured, all four such photos of 20 stayed at 24-28 dB while
    iDLG (labels fixed) reached 31-35 dB on them. Info's `label_init` records "closed-form" or "noise".

    `rescues` (0 with the paper's optimiser) makes a restart survive the two ways L-BFGS without a line
    search fails: when a step blows the images up (or the loss becomes non-finite), the restart goes
    back to where that step began, forgets its L-BFGS memory and halves its step size, up to `rescues`
    times before it is dropped; when its memory stops giving a descent direction (it would stay stuck
    for good), the memory is cleared. The result's info counts both per restart.

    A restart stuck at noise is not a success: info's `converged` is whether the kept restart's final
    distance is at most `converged_below` times ||∇W||² (its `relative_loss`).
    """

    name = "dlg"
    optimise_labels = True
    supports_rescues = True

    def __init__(
        self,
        *,
        iterations: int = 300,
        lr: float = 1.0,
        max_iter: int = 20,
        history_size: int = 100,
        image_param: str = "raw",
        unroll: bool = True,
        image_limit: float = 1e3,
        optimizer: str = "robust",
        init: str | None = None,
        feature_iterations: int = 5,
        label_gap: float = 20.0,
        tolerances: str | None = None,
        rescues: int | None = None,
        restarts: int | None = None,
        converged_below: float = 1e-4,
        extra_restarts: int | None = None,
        restart_above: float = 1e-6,
        tolerance: float = 1e-9,
        snapshot_every: int | None = None,
        cpu_threads: int | None = 1,
    ) -> None:
        if optimizer not in PRESETS:
            raise FedsimError(f"{self.name}: optimizer must be one of {', '.join(PRESETS)}, got {optimizer!r}")
        preset = PRESETS[optimizer]
        if extra_restarts is None:  # on demand only with the preset's restarts: an explicit count is what runs
            extra_restarts = preset["extra_restarts"] if restarts is None else 0
        restarts = preset["restarts"] if restarts is None else restarts
        rescues = preset["rescues"] if rescues is None else rescues
        init = preset["init"] if init is None else init
        if init not in INITS:
            raise FedsimError(f"{self.name}: init must be one of {', '.join(INITS)}, got {init!r}")
        tolerances = "absolute" if tolerances is None else tolerances  # both presets: L-BFGS's own tolerances
        if tolerances not in ("absolute", "relative"):
            raise FedsimError(f"{self.name}: tolerances must be 'absolute' or 'relative', got {tolerances!r}")
        if feature_iterations < 1:
            raise FedsimError(f"{self.name}: feature_iterations must be positive, got {feature_iterations}")
        super().__init__(restarts=restarts, tolerance=tolerance, snapshot_every=snapshot_every, cpu_threads=cpu_threads)
        if not converged_below > 0:
            raise FedsimError(f"{self.name}: converged_below must be positive, got {converged_below}")
        if iterations < 1 or lr <= 0 or max_iter < 1 or history_size < 1:
            raise FedsimError(f"{self.name}: iterations, lr, max_iter and history_size must be positive")
        if extra_restarts < 0 or not restart_above > 0:
            raise FedsimError(f"{self.name}: extra_restarts must be 0 or more and restart_above positive")
        self.extra_restarts, self.restart_above = extra_restarts, restart_above
        if rescues < 0:
            raise FedsimError(f"{self.name}: rescues must be 0 or more, got {rescues}")
        if image_param not in ("raw", "sigmoid"):
            raise FedsimError(f"{self.name}: image_param must be 'raw' or 'sigmoid', got {image_param!r}")
        self.iterations, self.lr, self.max_iter, self.history_size = iterations, lr, max_iter, history_size
        self.image_param, self.unroll, self.image_limit = image_param, unroll, image_limit
        self.rescues, self.optimizer, self.converged_below = rescues, optimizer, converged_below
        self.line_search, self.init, self.feature_iterations = preset["line_search"], init, feature_iterations
        self.relative, self.label_gap = tolerances == "relative", label_gap

    def _images(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(z) if self.image_param == "sigmoid" else z

    def _fixed_labels(self, target: AttackTarget, observed: list[torch.Tensor]) -> tuple[torch.Tensor | None, str]:
        """Labels held fixed during the optimisation (none for DLG, which optimises soft labels)."""
        return None, "dlg-optimised"

    def _initial(self, gen: torch.Generator, numel: int, label_numel: int, restart: int) -> torch.Tensor:
        """One restart's initial variables: images (and DLG's label logits) drawn from N(0, 1), as in the paper."""
        parts = [torch.randn(numel, generator=gen)]
        if self.optimise_labels:
            parts.append(torch.randn(label_numel, generator=gen))
        return torch.cat(parts)

    def _solve(
        self, targets: Sequence[AttackTarget], *, seed: int, device: torch.device, progress: Progress | None
    ) -> tuple[list[list[Trial]], list[dict]]:
        """`restarts` side by side, then up to `extra_restarts` more, one at a time and only for the targets
        whose best restart so far ended stuck (relative loss above `restart_above`): restarts on demand."""
        trials, info = self._solve_round(targets, seed=seed, device=device, progress=progress, offset=0)
        for entry in info:
            entry["side_by_side"], entry["on_demand"] = self.restarts, 0
        for extra in range(self.extra_restarts):
            stuck = [
                j for j, e in enumerate(info) if e["relative_loss"] is None or e["relative_loss"] > self.restart_above
            ]
            if not stuck:
                break
            more, more_info = self._solve_round(
                [targets[j] for j in stuck], seed=seed, device=device, progress=progress,
                offset=self.restarts + extra, count=1,
            )  # fmt: skip
            for j, new_trials, new in zip(stuck, more, more_info, strict=True):
                trials[j] = trials[j] + new_trials
                info[j] = _merge_info(info[j], new)
        return trials, info

    def _solve_round(
        self,
        targets: Sequence[AttackTarget],
        *,
        seed: int,
        device: torch.device,
        progress: Progress | None,
        offset: int,
        count: int | None = None,
    ) -> tuple[list[list[Trial]], list[dict]]:
        """One batch: restarts `offset`..`offset + count` (default `restarts`) of every target, side by side."""
        saved = self.restarts
        self.restarts = saved if count is None else count  # the helpers below read self.restarts
        try:
            return self._solve_batch(targets, seed=seed, device=device, progress=progress, offset=offset)
        finally:
            self.restarts = saved

    def _solve_batch(
        self, targets: Sequence[AttackTarget], *, seed: int, device: torch.device, progress: Progress | None,
        offset: int,
    ) -> tuple[list[list[Trial]], list[dict]]:  # fmt: skip
        problems = stack_targets(targets, self.restarts, device, unroll=self.unroll)
        first, r, n = targets[0], self.restarts, problems.examples
        shape, classes = (n, *first.input_shape), first.num_classes
        numel = n * shape[1] * shape[2] * shape[3]
        fixed = [self._fixed_labels(t, s) for t, s in zip(targets, problems.signals, strict=True)]
        labels = stack_problems([f[0] for f in fixed], r, device) if fixed[0][0] is not None else None

        def matching_loss(p: dict, c: dict, z: torch.Tensor, y: torch.Tensor | None, obs: list) -> torch.Tensor:
            """The objective D of one problem: the distance of the dummy data's gradient to the observed one."""
            x = self._images(z[:numel].view(shape))
            if y is None:  # DLG: the label is a free soft distribution, softmax of learnable logits
                y = torch.softmax(z[numel:].view(n, classes), dim=-1)
            return problems.distance(problems.signal(p, c, x, y), obs)

        fn = value_and_grad(matching_loss, problems.k, (0, 0, 0, None if labels is None else 0, 0), argnum=2)
        inits = [
            self._initial(problem_generator(seed, i), numel, n * classes, i)
            for _ in targets
            for i in range(offset, offset + r)
        ]
        z0 = torch.stack(inits).to(device)
        features, init_note = closed_form_features(targets, problems, r) if self.init == "features" else (None, "")
        fitted = None
        if features is not None:  # the dummy images first fitted to the features: single backward passes
            grey = 0.0 if self.image_param == "sigmoid" else 0.5
            fitted = fit_features(
                problems, z0, numel, shape, features, to_images=self._images, grey=grey,
                steps=self.feature_iterations, max_iter=self.max_iter, history_size=self.history_size,
            )  # fmt: skip
        if fitted is not None:
            z0, feature_evals, feature_error = fitted
        label_init = "noise"
        if fitted is not None and self.optimise_labels:  # the soft labels start at the closed-form label
            z0, label_init = closed_form_labels(targets, problems, z0, numel, r, self.label_gap), "closed-form"
        opt = BatchedLBFGS(
            z0,
            lambda z_: fn(problems.params, problems.consts, z_, labels, problems.observed),
            lr=self.lr,
            max_iter=self.max_iter,
            history_size=self.history_size,
            reset_stalled=self.rescues > 0 or self.line_search is not None,
            line_search=self.line_search,
            scale=problems.scale if self.relative else None,
        )
        if fitted is not None:  # the feature fit's evaluations count towards the attack's
            opt.evaluations += feature_evals.to(opt.evaluations.device)
        trials = self._optimise(opt, problems, shape, numel, [f[0] for f in fixed for _ in range(r)], progress)
        info = [
            {
                "objective": problems.objective,
                "label_method": f[1],
                "attack": self.name,
                "optimizer": self.optimizer,
                "init": "features" if fitted is not None else "noise",
                "tolerances": "relative" if self.relative else "absolute",
                **({"label_init": label_init} if self.optimise_labels else {}),
                "iterations": self.iterations,
            }
            for f in fixed
        ]
        for j, entry in enumerate(info):
            if fitted is not None:  # per restart: single-backward evaluations of the feature fit, its relative error
                entry["feature_evaluations"] = [int(v) for v in feature_evals[j * r : (j + 1) * r]]
                entry["feature_error"] = [float(v) for v in feature_error[j * r : (j + 1) * r]]
            elif init_note:
                entry["init_note"] = init_note
        for j, entry in enumerate(info):  # restarts of one target share its scale: the best one decides
            relative = [t.loss / float(problems.scale[j * r]) for t in trials[j * r : (j + 1) * r] if not t.dropped]
            entry["relative_loss"] = min(relative) if relative else None
            entry["converged"] = bool(relative) and min(relative) <= self.converged_below
        if self.rescues or self.line_search:  # per restart: blow-ups rescued, and stalls whose L-BFGS memory was reset
            for j, entry in enumerate(info):
                entry["rescued"] = [int(v) for v in opt.rescued[j * r : (j + 1) * r]]
                entry["stall_resets"] = [int(v) for v in opt.resets[j * r : (j + 1) * r]]
        return [trials[j * r : (j + 1) * r] for j in range(len(targets))], info

    def _optimise(
        self,
        opt: BatchedLBFGS,
        problems: Problems,
        shape: tuple,
        numel: int,
        labels: list[torch.Tensor | None],
        progress: Progress | None,
    ) -> list[Trial]:
        """The DLG loop: L-BFGS steps on D, with the trace, early stop, divergence guard and rescues."""
        k = problems.k
        recorder = Recorder(k, self.iterations, self.snapshot_interval(self.iterations))
        stopped = [self.iterations] * k

        def images() -> torch.Tensor:
            return self._images(opt.z[:, :numel].view(k, *shape)).detach()

        def record(it: int, rows: Sequence[int]) -> None:
            if recorder.due(it):
                x = images()
                for i in rows:
                    recorder.record(i, it, float(opt.loss[i]), int(opt.evaluations[i]), x[i])

        opt.evaluate(~opt.frozen)  # the initial loss, so that history starts where the optimisation does
        record(0, range(k))
        for it in range(1, self.iterations + 1):
            before = (opt.z.clone(), opt.loss.clone()) if self.rescues else None
            opt.step()  # the paper's step: L-BFGS on D
            live = self._guard(opt, recorder, images(), before, it)
            record(it, live)
            for i in live:
                if opt.loss[i] <= self.tolerance * problems.scale[i]:  # early stop: gradients matched
                    opt.frozen[i], stopped[i] = True, it
            if progress and live:
                progress(it, min(float(opt.loss[i]) for i in live))
            if bool(opt.frozen.all()):
                break
        # One last evaluation, so that every reported loss belongs to the returned images.
        _, final = opt.closure(opt.z)
        x = images()
        for i, trial in enumerate(recorder.trials):
            if not trial.dropped and not torch.isfinite(final[i]):
                recorder.drop(i, f"final loss is {final[i].item()}")
            if not trial.dropped:
                own = opt.z[i, numel:].view(shape[0], -1).argmax(-1).cpu() if self.optimise_labels else labels[i]
                recorder.finish(i, stopped[i], float(final[i]), int(opt.evaluations[i]), x[i], own)
        return recorder.trials

    def _guard(
        self, opt: BatchedLBFGS, recorder: Recorder, images: torch.Tensor, before: tuple | None, it: int
    ) -> list[int]:
        """The divergence guard after step `it`: a moving problem whose loss or images went bad is rescued
        (back to `before`, the state where the step began; see `rescues`) or dropped. Returns those still moving."""
        live = [i for i in range(opt.z.shape[0]) if not opt.frozen[i]]
        for i, reason in enumerate(divergence_reasons(opt.loss, images, self.image_limit)):
            if reason and i in live and before is not None and opt.rescued[i] < self.rescues:
                opt.back_off(i, before[0][i], before[1][i])  # rescue: back to where this step started
            elif reason and i in live:
                recorder.drop(i, f"{reason} at iteration {it}")
                opt.frozen[i] = True
        return [i for i in live if not recorder.trials[i].dropped]


def _merge_info(old: dict, new: dict) -> dict:
    """One target's info after an on-demand restart: per-restart lists joined, the best loss decides."""
    out = dict(old)
    for key in ("feature_evaluations", "feature_error", "rescued", "stall_resets"):
        if key in old and key in new:
            out[key] = old[key] + new[key]
    losses = [v for v in (old["relative_loss"], new["relative_loss"]) if v is not None]
    out["relative_loss"] = min(losses) if losses else None
    out["converged"] = old["converged"] or new["converged"]
    out["on_demand"] = old["on_demand"] + 1
    return out
