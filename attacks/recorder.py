"""The trace of every trial of an attack: losses about every 1 % of the run, image snapshots, the final state."""

from __future__ import annotations

import torch

from attacks.base import Trial


class Recorder:
    """Per problem, a `Trial` whose history and snapshots fill in as the optimisation goes."""

    def __init__(self, problems: int, iterations: int, snapshot_every: int) -> None:
        self.trials = [Trial(None, None, float("inf"), [], [], 0) for _ in range(problems)]
        self.snapshot_every, self.history_every = snapshot_every, max(1, iterations // 100)

    def due(self, iteration: int) -> bool:
        """Whether `iteration` goes into the history (every 1 % of the run, and at every snapshot)."""
        return iteration % self.history_every == 0 or iteration % self.snapshot_every == 0

    def record(
        self, i: int, iteration: int, loss: float, evaluations: int, images: torch.Tensor, *, last: bool = False
    ) -> None:
        """Problem `i` after `iteration`: its loss when due, its images at snapshot iterations (both when `last`)."""
        trial = self.trials[i]
        if self.due(iteration) or last:
            trial.history.append({"iteration": iteration, "loss": loss, "evaluations": evaluations})
        if iteration % self.snapshot_every == 0 or last:
            trial.snapshots.append((iteration, images.clamp(0, 1).float().cpu()))

    def drop(self, i: int, reason: str) -> None:
        """Problem `i` diverged: it is reported, never returned."""
        self.trials[i].dropped = reason

    def finish(
        self, i: int, iteration: int, loss: float, evaluations: int, images: torch.Tensor, labels: torch.Tensor | None
    ) -> None:
        """Problem `i`'s result: its final loss replaces a history entry of the same iteration; its last snapshot."""
        trial = self.trials[i]
        trial.loss, trial.images, trial.evaluations = loss, images.float().cpu(), evaluations
        if labels is not None:
            trial.labels = labels
        if trial.history and trial.history[-1]["iteration"] == iteration:
            trial.history.pop()
        trial.history.append({"iteration": iteration, "loss": loss, "evaluations": evaluations})
        if trial.snapshots[-1][0] != iteration:
            trial.snapshots.append((iteration, images.clamp(0, 1).float().cpu()))
