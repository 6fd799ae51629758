"""Deep Leakage from Gradients (Zhu, Liu, Han, NeurIPS 2019): match dummy gradients with L-BFGS."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from attacks.base import (
    Attack,
    AttackTarget,
    Progress,
    Run,
    attack_copy,
    divergence,
    functional_gradient,
    gradient_distance,
    informed,
    knowledge,
    matched_distance,
    model_state,
    observed_signal,
    problem_generator,
    stack_problems,
    value_and_grad,
)
from attacks.unroll import simulated_signal
from fedsim.errors import FedsimError

Closure = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class BatchedLBFGS:
    """torch.optim.LBFGS (no line search, same defaults and stopping rules) on K independent problems.

    Every problem keeps its own history, step size and stopping state, so solving K problems at
    once gives each the trajectory it would have alone; one closure call evaluates all of them
    (a vmap), which is what makes batching pay. `frozen` problems (converged, diverged) stop moving.

    Without a line search, torch's L-BFGS can get stuck for good: once its memory yields a direction
    that is not a descent direction, every later step computes the same direction and stops at once.
    With `reset_stalled`, such a problem's memory is cleared instead (`reset`), so its next step
    starts again from steepest descent; `resets` counts them. Off, the optimiser is torch's.
    """

    def __init__(
        self,
        z: torch.Tensor,
        closure: Closure,
        *,
        lr: float = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        reset_stalled: bool = False,
    ) -> None:
        k, d = z.shape
        self.z, self.closure, self.reset_stalled = z, closure, reset_stalled
        self.lr = z.new_full((k,), lr)  # per problem: a rescued problem continues with a smaller step
        self.max_iter, self.max_eval = max_iter, max_eval or max_iter * 5 // 4
        self.tol_grad, self.tol_change = tolerance_grad, tolerance_change
        self.m = history_size
        new = z.new_zeros
        self.dirs, self.stps, self.ro = new(k, self.m, d), new(k, self.m, d), new(k, self.m)
        self.count = torch.zeros(k, dtype=torch.long, device=z.device)
        self.head = torch.zeros(k, dtype=torch.long, device=z.device)
        self.h_diag, self.t, self.d = new(k).fill_(1.0), new(k), new(k, d)
        self.prev_g, self.prev_loss = new(k, d), new(k)
        self.n_iter = torch.zeros(k, dtype=torch.long, device=z.device)
        self.frozen = torch.zeros(k, dtype=torch.bool, device=z.device)
        self.evaluations = torch.zeros(k, dtype=torch.long, device=z.device)
        self.loss = new(k).fill_(float("inf"))  # loss at the last evaluated point
        self.resets = torch.zeros(k, dtype=torch.long, device=z.device)  # stalls whose memory was cleared
        self.rescued = torch.zeros(k, dtype=torch.long, device=z.device)  # steps taken back (`back_off`)

    def reset(self, rows: torch.Tensor) -> None:
        """Forget the L-BFGS memory of problems `rows` (a bool mask): their next step is steepest descent."""
        self.count[rows], self.head[rows], self.n_iter[rows] = 0, 0, 0
        self.h_diag[rows] = 1.0

    def back_off(self, i: int, z: torch.Tensor, loss: torch.Tensor) -> None:
        """Problem `i` returns to `z` (with its `loss`), forgets its memory and continues with half the step."""
        self.z[i], self.loss[i] = z, loss
        self.reset(torch.arange(self.z.shape[0], device=self.z.device) == i)
        self.lr[i] *= 0.5
        self.rescued[i] += 1

    def _evaluate(self, run: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            g, loss = self.closure(self.z)
        self.evaluations += run.long()
        self.loss = torch.where(run, loss.detach(), self.loss)
        return loss.detach(), g.detach()

    def _two_loop(self, g: torch.Tensor) -> torch.Tensor:
        """The L-BFGS two-loop recursion, per problem over its own (ring-buffered) history."""
        depth = int(self.count.max())
        ages = torch.arange(depth, device=g.device)
        order = (self.head[:, None] - 1 - ages) % self.m  # [K, depth], newest first
        rows = torch.arange(g.shape[0], device=g.device)[:, None]
        s, y = self.stps[rows, order], self.dirs[rows, order]
        ro = self.ro[rows, order] * (ages < self.count[:, None])  # unused slots contribute nothing
        q, al = -g, []
        for j in range(depth):
            a = torch.linalg.vecdot(s[:, j], q) * ro[:, j]
            q = q - a[:, None] * y[:, j]
            al.append(a)
        r = q * self.h_diag[:, None]
        for j in reversed(range(depth)):
            be = torch.linalg.vecdot(y[:, j], r) * ro[:, j]
            r = r + (al[j] - be)[:, None] * s[:, j]
        return r

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One optimiser step (up to max_iter inner iterations per problem); returns the losses at its start."""
        run = ~self.frozen
        loss, g = self._evaluate(run)
        orig = loss.clone()
        run = run & ~(g.abs().amax(1) <= self.tol_grad)
        evals, n_iter = 1, 0
        while bool(run.any()) and n_iter < self.max_iter:
            n_iter += 1
            self.n_iter += run.long()
            first = self.n_iter == 1
            y, s = g - self.prev_g, self.d * self.t[:, None]
            ys = (y * s).sum(1)
            push = run & ~first & (ys > 1e-10)
            if bool(push.any()):
                rows = push.nonzero().squeeze(1)
                at = self.head[rows]
                self.dirs[rows, at], self.stps[rows, at], self.ro[rows, at] = y[rows], s[rows], 1.0 / ys[rows]
                self.h_diag[rows] = ys[rows] / (y[rows] * y[rows]).sum(1)
                self.head[rows] = (at + 1) % self.m
                self.count[rows] = torch.clamp(self.count[rows] + 1, max=self.m)
            direction = torch.where(first[:, None], -g, self._two_loop(g) if bool((run & ~first).any()) else -g)
            self.d = torch.where(run[:, None], direction, self.d)
            self.prev_g = torch.where(run[:, None], g, self.prev_g)
            self.prev_loss = torch.where(run, loss, self.prev_loss)
            first_t = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * self.lr
            self.t = torch.where(run, torch.where(first, first_t, self.lr), self.t)
            stalled = run & ((g * self.d).sum(1) > -self.tol_change)  # not a descent direction
            stuck = stalled & ~first  # steepest descent itself is never "stuck", only converged
            if self.reset_stalled and bool(stuck.any()):
                self.reset(stuck)
                self.resets += stuck.long()
            run = run & ~stalled
            self.z += torch.where(run[:, None], self.t[:, None] * self.d, torch.zeros_like(self.d))
            opt_cond = torch.zeros_like(run)
            if n_iter != self.max_iter:
                new_loss, new_g = self._evaluate(run)
                loss = torch.where(run, new_loss, loss)
                g = torch.where(run[:, None], new_g, g)
                opt_cond = g.abs().amax(1) <= self.tol_grad
                evals += 1
            if n_iter == self.max_iter or evals >= self.max_eval:
                break
            small_step = (self.d * self.t[:, None]).abs().amax(1) <= self.tol_change
            run = run & ~(opt_cond | small_step | ((loss - self.prev_loss).abs() < self.tol_change))
        return orig


class DLG(Attack):
    """Deep Leakage from Gradients: dummy images and soft labels optimised jointly by L-BFGS.

    Defaults are the paper's code (mit-han-lab/dlg): L-BFGS lr 1 with torch's default 20 inner
    iterations per step, 300 steps, images and label logits initialised from N(0, 1), images
    unconstrained during the optimisation and clamped to [0, 1] at the end.

    `rescues` (0 = the paper's optimiser) makes a restart survive the two ways L-BFGS without a line
    search fails: when a step blows the images up (or the loss becomes non-finite), the restart goes
    back to where that step began, forgets its L-BFGS memory and halves its step size, up to `rescues`
    times before it is dropped; when its memory stops giving a descent direction (it would stay stuck
    for good), the memory is cleared. The result's info counts both per restart.
    """

    name = "dlg"
    optimise_labels = True

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
        rescues: int = 0,
        restarts: int = 1,
        tolerance: float = 1e-9,
        snapshot_every: int | None = None,
        cpu_threads: int | None = 1,
    ) -> None:
        super().__init__(restarts=restarts, tolerance=tolerance, snapshot_every=snapshot_every, cpu_threads=cpu_threads)
        if iterations < 1 or lr <= 0 or max_iter < 1 or history_size < 1:
            raise FedsimError(f"{self.name}: iterations, lr, max_iter and history_size must be positive")
        if rescues < 0:
            raise FedsimError(f"{self.name}: rescues must be 0 or more, got {rescues}")
        if image_param not in ("raw", "sigmoid"):
            raise FedsimError(f"{self.name}: image_param must be 'raw' or 'sigmoid', got {image_param!r}")
        self.iterations, self.lr, self.max_iter, self.history_size = iterations, lr, max_iter, history_size
        self.image_param, self.unroll, self.image_limit = image_param, unroll, image_limit
        self.rescues = rescues

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
    ) -> tuple[list[list[Run]], list[dict]]:
        first = targets[0]
        model = attack_copy(first.model, device)
        signals = [observed_signal(t, unroll=self.unroll) for t in targets]
        objective = signals[0][0]
        n = (first.recipe.num_examples or first.batch_size) if objective == "unrolled" else first.batch_size
        shape, classes, r = (n, *first.input_shape), first.num_classes, self.restarts
        fixed = [self._fixed_labels(t, s[1]) for t, s in zip(targets, signals, strict=True)]
        states = [model_state(attack_copy(t.model, device)) for t in targets]
        params = stack_problems([s[0] for s in states], r, device)
        consts = stack_problems([s[1] for s in states], r, device)
        aware = informed(targets)  # defense knowledge: masks and rescaling (attacks.base.matched_distance)
        known = [knowledge(t, s[1]) if aware else s[1] for t, s in zip(targets, signals, strict=True)]
        observed = stack_problems(known, r, device)
        labels = stack_problems([f[0] for f in fixed], r, device) if fixed[0][0] is not None else None
        numel = n * shape[1] * shape[2] * shape[3]
        k = len(targets) * r
        signal = simulated_signal(objective, functional_gradient(model, vmapped=k > 1), first)

        def matching_loss(p: dict, c: dict, z: torch.Tensor, y: torch.Tensor | None, obs: list) -> torch.Tensor:
            x = self._images(z[:numel].view(shape))
            if y is None:  # DLG: the label is a free soft distribution, softmax of learnable logits
                y = torch.softmax(z[numel:].view(n, classes), dim=-1)
            return matched_distance(signal(p, c, x, y), obs) if aware else gradient_distance(signal(p, c, x, y), obs)

        fn = value_and_grad(matching_loss, k, (0, 0, 0, None if labels is None else 0, 0), argnum=2)
        inits = [self._initial(problem_generator(seed, i), numel, n * classes, i) for _ in targets for i in range(r)]
        z = torch.stack(inits).to(device)
        opt = BatchedLBFGS(
            z,
            lambda z_: fn(params, consts, z_, labels, observed),
            lr=self.lr,
            max_iter=self.max_iter,
            history_size=self.history_size,
            reset_stalled=self.rescues > 0,
        )
        plain = observed[0] if aware else observed
        scale = torch.stack([sum((o[i] ** 2).sum() for o in plain) for i in range(k)])
        runs = self._optimise(opt, k, shape, numel, scale, progress)
        per_target = [runs[i * r : (i + 1) * r] for i in range(len(targets))]
        for j, target_runs in enumerate(per_target):
            for run in target_runs:
                if fixed[j][0] is not None and run.labels is None and run.images is not None:
                    run.labels = fixed[j][0]
        info = [{"objective": objective, "label_method": f[1], "attack": self.name} for f in fixed]
        if self.rescues:  # per restart: blow-ups rescued, and stalls whose L-BFGS memory was reset
            for j, entry in enumerate(info):
                entry["rescued"] = [int(v) for v in opt.rescued[j * r : (j + 1) * r]]
                entry["stall_resets"] = [int(v) for v in opt.resets[j * r : (j + 1) * r]]
        return per_target, info

    def _optimise(
        self, opt: BatchedLBFGS, k: int, shape: tuple, numel: int, scale: torch.Tensor, progress: Progress | None
    ) -> list[Run]:
        """The DLG loop: L-BFGS steps on ||∇W' - ∇W||², with snapshots, early stop and divergence guard."""
        runs = [Run(None, None, float("inf"), [], [], 0) for _ in range(k)]
        stopped = [self.iterations] * k
        every, hist_every = self.snapshot_interval(self.iterations), max(1, self.iterations // 100)

        def images() -> torch.Tensor:
            return self._images(opt.z[:, :numel].view(k, *shape)).detach()

        def record(it: int, rows: Sequence[int]) -> None:
            x = images()
            for i in rows:
                if it % hist_every == 0 or it % every == 0:
                    entry = {"iteration": it, "loss": float(opt.loss[i]), "evaluations": int(opt.evaluations[i])}
                    runs[i].history.append(entry)
                if it % every == 0:
                    runs[i].snapshots.append((it, x[i].clamp(0, 1).float().cpu()))

        opt._evaluate(~opt.frozen)  # the initial loss, so that history starts where the optimisation does
        record(0, range(k))
        for it in range(1, self.iterations + 1):
            before = (opt.z.clone(), opt.loss.clone()) if self.rescues else None
            opt.step()
            live = [i for i in range(k) if not opt.frozen[i]]
            for i, reason in enumerate(divergence(opt.loss, images(), self.image_limit)):
                if reason and i in live and before is not None and opt.rescued[i] < self.rescues:
                    opt.back_off(i, before[0][i], before[1][i])  # rescue: back to where this step started
                elif reason and i in live:
                    runs[i].dropped, opt.frozen[i] = f"{reason} at iteration {it}", True
            live = [i for i in live if not runs[i].dropped]
            record(it, live)
            for i in live:
                if opt.loss[i] <= self.tolerance * scale[i]:  # early stop: gradients matched
                    opt.frozen[i], stopped[i] = True, it
            if progress and live:
                progress(it, min(float(opt.loss[i]) for i in live))
            if bool(opt.frozen.all()):
                break
        # One last evaluation, so that every reported loss belongs to the returned images.
        _, final = opt.closure(opt.z)
        x = images()
        for i, run in enumerate(runs):
            if not run.dropped and not torch.isfinite(final[i]):
                run.dropped = f"final loss is {final[i].item()}"
            if run.dropped:
                continue
            run.loss, run.images, run.evaluations = float(final[i]), x[i].float().cpu(), int(opt.evaluations[i])
            if run.history and run.history[-1]["iteration"] == stopped[i]:
                run.history.pop()
            run.history.append({"iteration": stopped[i], "loss": run.loss, "evaluations": run.evaluations})
            if run.snapshots[-1][0] != stopped[i]:
                run.snapshots.append((stopped[i], x[i].clamp(0, 1).float().cpu()))
            if self.optimise_labels:
                run.labels = opt.z[i, numel:].view(shape[0], -1).argmax(-1).cpu()
        return runs
