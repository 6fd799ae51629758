"""Restarts on demand: `side_by_side` restarts of every target in one batch, then up to `extra` more, one at
a time and only for the targets whose best restart so far ended stuck (relative loss above `above`).

Any attack whose batch solver reports each target's `relative_loss` (None when every restart was dropped)
and `converged` can use it; DLG and iDLG do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from attacks.base import Trial
from attacks.contract import AttackTarget

# solve(targets, offset, count): restarts offset .. offset + count of every target, side by side
BatchSolver = Callable[[Sequence[AttackTarget], int, int], tuple[list[list[Trial]], list[dict]]]

PER_RESTART = ("feature_evaluations", "feature_error", "rescued", "stall_resets")


def restarts_on_demand(
    solve: BatchSolver, targets: Sequence[AttackTarget], side_by_side: int, extra: int, above: float
) -> tuple[list[list[Trial]], list[dict]]:
    """Per-target trials and info; info's `side_by_side` and `on_demand` record what ran."""
    trials, info = solve(targets, 0, side_by_side)
    for entry in info:
        entry["side_by_side"], entry["on_demand"] = side_by_side, 0
    for round_ in range(extra):
        stuck = [j for j, e in enumerate(info) if e["relative_loss"] is None or e["relative_loss"] > above]
        if not stuck:
            break
        more, more_info = solve([targets[j] for j in stuck], side_by_side + round_, 1)
        for j, new_trials, new in zip(stuck, more, more_info, strict=True):
            trials[j] = trials[j] + new_trials
            info[j] = merge_info(info[j], new)
    return trials, info


def merge_info(old: dict, new: dict) -> dict:
    """One target's info after an on-demand restart: per-restart lists joined, the best loss decides."""
    out = dict(old)
    for key in PER_RESTART:
        if key in old and key in new:
            out[key] = old[key] + new[key]
    losses = [v for v in (old["relative_loss"], new["relative_loss"]) if v is not None]
    out["relative_loss"] = min(losses) if losses else None
    out["converged"] = old["converged"] or new["converged"]
    out["on_demand"] = old["on_demand"] + 1
    return out
