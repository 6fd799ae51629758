"""L-BFGS on K independent problems at once: torch.optim.LBFGS, with or without a line search, one closure for all."""

from __future__ import annotations

from collections.abc import Callable

import torch

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

    `line_search="armijo"` makes every inner iteration a backtracking line search per problem: the
    step t·d is halved (up to `backtracks` times) until the loss is finite and decreases by at least
    c1·t·<g, d> (Armijo's condition, c1 = 1e-4); a problem that finds no such step keeps its point and
    clears its memory. Each trial point is one closure call for all problems still searching, counted
    in `evaluations` for those only. Without it (None, torch's default) a step is taken as computed.

    `scale` [K] (None: torch's absolute tolerances) makes the run what it would be on each problem's loss
    divided by its scale: the gradient and loss-change tolerances, the curvature threshold and the first
    step's size are taken relative to it (the direction itself does not depend on the loss's units). Two
    problems that differ only in the size of their loss then take the same steps; with absolute
    tolerances one whose loss is 50 times smaller ends its inner iterations, and stalls, far sooner.
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
        line_search: str | None = None,
        backtracks: int = 10,
        scale: torch.Tensor | None = None,
    ) -> None:
        if line_search not in (None, "armijo"):
            raise ValueError(f"line_search must be None or 'armijo', got {line_search!r}")
        k, d = z.shape
        self.z, self.closure, self.reset_stalled = z, closure, reset_stalled
        self.line_search, self.backtracks = line_search, backtracks
        self.lr = z.new_full((k,), lr)  # per problem: a rescued problem continues with a smaller step
        self.max_iter, self.max_eval = max_iter, max_eval or max_iter * 5 // 4
        self.scale = z.new_ones(k) if scale is None else scale.to(z)
        self.tol_grad, self.tol_change = tolerance_grad * self.scale, tolerance_change * self.scale
        self.curvature = 1e-10 * self.scale
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

    def evaluate(self, run: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradient at the current point; counts an evaluation and keeps the loss for problems `run`."""
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

    def _armijo(
        self, loss: torch.Tensor, g: torch.Tensor, run: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Backtrack along d from t for problems `run` until Armijo's condition holds; move those that found a
        step. Returns the loss and gradient at the (new) points, the problems that moved, and closure calls."""
        slope = (g * self.d).sum(1)
        t, searching = self.t.clone(), run.clone()
        new_loss, new_g, moved, calls = loss.clone(), g.clone(), torch.zeros_like(run), 0
        for _ in range(self.backtracks + 1):
            with torch.enable_grad():
                g_try, l_try = self.closure(self.z + t[:, None] * self.d)
            l_try, g_try = l_try.detach(), g_try.detach()
            calls += 1
            self.evaluations += searching.long()
            ok = searching & torch.isfinite(l_try) & torch.isfinite(g_try).all(1) & (l_try <= loss + 1e-4 * t * slope)
            new_loss, new_g = torch.where(ok, l_try, new_loss), torch.where(ok[:, None], g_try, new_g)
            moved, searching = moved | ok, searching & ~ok
            if not bool(searching.any()):
                break
            t = torch.where(searching, t * 0.5, t)
        self.t = torch.where(moved, t, self.t)
        self.z = torch.where(moved[:, None], self.z + self.t[:, None] * self.d, self.z)
        self.loss = torch.where(moved, new_loss, self.loss)
        failed = run & ~moved  # no decrease along d: stay, and start again from steepest descent
        if bool(failed.any()):
            self.reset(failed)
            self.resets += failed.long()
        return new_loss, new_g, moved, calls

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One optimiser step (up to max_iter inner iterations per problem); returns the losses at its start."""
        run = ~self.frozen
        loss, g = self.evaluate(run)
        orig = loss.clone()
        run = run & ~(g.abs().amax(1) <= self.tol_grad)
        evals, n_iter = 1, 0
        while bool(run.any()) and n_iter < self.max_iter:
            n_iter += 1
            self.n_iter += run.long()
            first = self.n_iter == 1
            y, s = g - self.prev_g, self.d * self.t[:, None]
            ys = (y * s).sum(1)
            push = run & ~first & (ys > self.curvature)
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
            first_t = torch.clamp(self.scale / g.abs().sum(1), max=1.0) * self.lr
            self.t = torch.where(run, torch.where(first, first_t, self.lr), self.t)
            stalled = run & ((g * self.d).sum(1) > -self.tol_change)  # not a descent direction
            stuck = stalled & ~first  # steepest descent itself is never "stuck", only converged
            if self.reset_stalled and bool(stuck.any()):
                self.reset(stuck)
                self.resets += stuck.long()
            run = run & ~stalled
            opt_cond = torch.zeros_like(run)
            if self.line_search:
                loss, g, run, used = self._armijo(loss, g, run)
                opt_cond = g.abs().amax(1) <= self.tol_grad
                evals += used
            else:
                self.z += torch.where(run[:, None], self.t[:, None] * self.d, torch.zeros_like(self.d))
            if n_iter != self.max_iter and not self.line_search:
                new_loss, new_g = self.evaluate(run)
                loss = torch.where(run, new_loss, loss)
                g = torch.where(run[:, None], new_g, g)
                opt_cond = g.abs().amax(1) <= self.tol_grad
                evals += 1
            if n_iter == self.max_iter or evals >= self.max_eval:
                break
            small_step = (self.d * self.t[:, None]).abs().amax(1) <= self.tol_change / self.scale
            run = run & ~(opt_cond | small_step | ((loss - self.prev_loss).abs() < self.tol_change))
        return orig
