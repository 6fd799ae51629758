"""Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019): match dummy gradients with L-BFGS.

The objective (`matching_loss`), then the loop (`_optimise`); the presets and option checks are in
attacks.dlg_setup, the closed-form start in attacks.feature_start, restarts on demand in attacks.restarts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attacks.base import Attack, AttackTarget, Progress, Trial, divergence_reasons, problem_generator
from attacks.dlg_setup import INITS, PRESETS, batch_info, check_options, resolve_options
from attacks.feature_start import closed_form_start
from attacks.lbfgs import BatchedLBFGS
from attacks.problems import Problems, stack_problems, stack_targets, value_and_grad
from attacks.recorder import Recorder
from attacks.restarts import restarts_on_demand

__all__ = ["DLG", "INITS", "PRESETS"]


class DLG(Attack):
    """Deep Leakage from Gradients: dummy images and soft labels optimised jointly by L-BFGS.

    The paper's Algorithm 1: draw dummy images x' and label logits y' from N(0, 1); then repeat
    D = ||∂ℓ(F(x', W), softmax(y'))/∂W − ∇W||² and (x', y') ← L-BFGS step on D. `matching_loss`
    is D, `_optimise` the loop; K = targets × restarts problems run as one batch (attacks.problems).

    `optimizer` chooses how (x', y') move: "paper", the paper's code (L-BFGS lr 1, 20 inner iterations, no
    line search, one restart, no rescues), or "robust" (the default), the same L-BFGS with a line search, a
    memory reset on a stall, `rescues` 5 and a second restart on demand for a target whose first ends above
    `restart_above` (attacks.dlg_setup has the details). Info's `side_by_side` and `on_demand` record what ran,
    and `optimizer`, `tolerances` and `iterations` how.

    `init`: "noise" (the paper's, with optimizer "paper") is the N(0, 1) draw; "features" (the default) first
    fits the image to the last layer's input read off its gradient in closed form (one example, FedSGD; else
    noise), `feature_iterations` single-backward L-BFGS steps counted in `evaluations` (attacks.feature_start),
    and starts DLG's label logits one-hot at the label read off it (`label_gap`). Info's `init` and
    `label_init` record which ran. `rescues` (0 with the paper's optimiser) saves a restart that blows up
    (attacks.dlg_setup); info counts the rescues and the stall resets per restart.
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
        given = dict(restarts=restarts, extra_restarts=extra_restarts, rescues=rescues, init=init)  # noqa: C408
        o = resolve_options(self.name, optimizer, given, tolerances, feature_iterations)
        run = dict(tolerance=tolerance, snapshot_every=snapshot_every, cpu_threads=cpu_threads)  # noqa: C408
        super().__init__(restarts=o["restarts"], **run)
        o.update(converged_below=converged_below, iterations=iterations, lr=lr, max_iter=max_iter)
        o.update(history_size=history_size, restart_above=restart_above, image_param=image_param)
        check_options(self.name, o)
        self.extra_restarts, self.restart_above = o["extra_restarts"], restart_above
        self.iterations, self.lr, self.max_iter, self.history_size = iterations, lr, max_iter, history_size
        self.image_param, self.unroll, self.image_limit = image_param, unroll, image_limit
        self.rescues, self.optimizer, self.converged_below = o["rescues"], optimizer, converged_below
        self.line_search, self.init, self.feature_iterations = o["line_search"], o["init"], feature_iterations
        self.relative, self.label_gap = o["tolerances"] == "relative", label_gap

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
        """`restarts` side by side, then up to `extra_restarts` more on demand (attacks.restarts)."""

        def solve(group: Sequence[AttackTarget], offset: int, count: int) -> tuple[list[list[Trial]], list[dict]]:
            return self._solve_batch(group, seed=seed, device=device, progress=progress, offset=offset, restarts=count)

        return restarts_on_demand(solve, targets, self.restarts, self.extra_restarts, self.restart_above)

    def _solve_batch(
        self, targets: Sequence[AttackTarget], *, seed: int, device: torch.device, progress: Progress | None,
        offset: int, restarts: int,
    ) -> tuple[list[list[Trial]], list[dict]]:  # fmt: skip
        """One batch: restarts `offset` .. `offset + restarts` of every target, side by side."""
        problems = stack_targets(targets, restarts, device, unroll=self.unroll)
        first, r, n = targets[0], restarts, problems.examples
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
        rs = range(offset, offset + r)
        draws = torch.stack(
            [self._initial(problem_generator(seed, i), numel, n * classes, i) for _ in targets for i in rs]
        )
        z0, fit, label_init, init_note = closed_form_start(self, targets, problems, draws.to(device), numel, shape, r)
        opt = BatchedLBFGS(
            z0, lambda z_: fn(problems.params, problems.consts, z_, labels, problems.observed), lr=self.lr,
            max_iter=self.max_iter, history_size=self.history_size, line_search=self.line_search,
            reset_stalled=self.rescues > 0 or self.line_search is not None,
            scale=problems.scale if self.relative else None,
        )  # fmt: skip
        if fit is not None:  # the feature fit's evaluations count towards the attack's
            opt.evaluations += fit[0].to(opt.evaluations.device)
        trials = self._optimise(opt, problems, shape, numel, [f[0] for f in fixed for _ in range(r)], progress)
        info = batch_info(self, problems, fixed, trials, opt, fit, label_init, init_note, r)
        return [trials[j * r : (j + 1) * r] for j in range(len(targets))], info

    def _optimise(
        self, opt: BatchedLBFGS, problems: Problems, shape: tuple, numel: int, labels: list, progress: Progress | None
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
