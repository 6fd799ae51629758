"""DLG's and iDLG's setup: the optimiser presets and the option checks, and the result record of one batch.

`optimizer` chooses how (x', y') move. "paper" is the paper's code (mit-han-lab/dlg): L-BFGS lr 1 with
torch's default 20 inner iterations per step and no line search, 300 steps, one restart, no rescues. On
images nobody tuned it for it diverges on a third to a half of them (the step blows the images up within a
few iterations). "robust" (the default) is the same L-BFGS with a backtracking (Armijo) line search per
problem (attacks.lbfgs), memory cleared on a stall, `rescues` 5, one restart and `extra_restarts` 1 on demand
(attacks.restarts): a step can no longer raise the loss, so a restart does not blow up; a target whose
restart ends stuck (relative loss above `restart_above`, 1e-6) gets a second restart from its own draw, run
after the first, and the restart that matches the gradient better is kept. Measured on 20 CIFAR-10 photos,
one restart ends at 0.9-1.6e-7 on the hardest four (31-34 dB) and ~1e-9 elsewhere, so the second one costs
only where it is needed; an explicit `restarts` runs exactly that many, side by side, with no extra ones
unless asked. Both clamp the images to [0, 1] only at the end. `tolerances="relative"` (not a default:
measured mixed) takes L-BFGS's tolerances relative to ||∇W||² (attacks.lbfgs, `scale`).

`rescues` (0 with the paper's optimiser) makes a restart survive the two ways L-BFGS without a line search
fails: when a step blows the images up (or the loss becomes non-finite), the restart goes back to where that
step began, forgets its L-BFGS memory and halves its step size, up to `rescues` times before it is dropped;
when its memory stops giving a descent direction (it would stay stuck for good), the memory is cleared.
"""

from __future__ import annotations

from collections.abc import Sequence

from attacks.base import Trial
from attacks.lbfgs import BatchedLBFGS
from attacks.problems import Problems
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


def resolve_options(name: str, optimizer: str, given: dict, tolerances: str | None, feature_iterations: int) -> dict:
    """The options, checked: the preset's values for those `given` leaves None (restarts, extra_restarts,
    rescues, init), tolerances, feature_iterations and the preset's line_search."""
    if optimizer not in PRESETS:
        raise FedsimError(f"{name}: optimizer must be one of {', '.join(PRESETS)}, got {optimizer!r}")
    preset, o = PRESETS[optimizer], {**given, "tolerances": tolerances, "feature_iterations": feature_iterations}
    if o["extra_restarts"] is None:  # on demand only with the preset's restarts: an explicit count is what runs
        o["extra_restarts"] = preset["extra_restarts"] if o["restarts"] is None else 0
    for key in ("restarts", "rescues", "init"):
        o[key] = preset[key] if o[key] is None else o[key]
    if o["init"] not in INITS:
        raise FedsimError(f"{name}: init must be one of {', '.join(INITS)}, got {o['init']!r}")
    o["tolerances"] = "absolute" if o["tolerances"] is None else o["tolerances"]  # both: L-BFGS's own tolerances
    if o["tolerances"] not in ("absolute", "relative"):
        raise FedsimError(f"{name}: tolerances must be 'absolute' or 'relative', got {o['tolerances']!r}")
    if o["feature_iterations"] < 1:
        raise FedsimError(f"{name}: feature_iterations must be positive, got {o['feature_iterations']}")
    return {**o, "line_search": preset["line_search"]}


def check_options(name: str, o: dict) -> None:
    """Refuse the values of the remaining options (`o`: by name) that DLG cannot run with."""
    if not o["converged_below"] > 0:
        raise FedsimError(f"{name}: converged_below must be positive, got {o['converged_below']}")
    if o["iterations"] < 1 or o["lr"] <= 0 or o["max_iter"] < 1 or o["history_size"] < 1:
        raise FedsimError(f"{name}: iterations, lr, max_iter and history_size must be positive")
    if o["extra_restarts"] < 0 or not o["restart_above"] > 0:
        raise FedsimError(f"{name}: extra_restarts must be 0 or more and restart_above positive")
    if o["rescues"] < 0:
        raise FedsimError(f"{name}: rescues must be 0 or more, got {o['rescues']}")
    if o["image_param"] not in ("raw", "sigmoid"):
        raise FedsimError(f"{name}: image_param must be 'raw' or 'sigmoid', got {o['image_param']!r}")


def batch_info(
    attack, problems: Problems, fixed: Sequence, trials: Sequence[Trial], opt: BatchedLBFGS, fit, label_init: str,
    init_note: str, r: int,
) -> list[dict]:  # fmt: skip
    """Each target's info after one batch of `r` restarts: what ran, the feature fit (`fit`: evaluations and
    errors per problem, or None), the kept restart's relative loss and convergence, rescues and stall resets."""
    info = [
        {
            "objective": problems.objective,
            "label_method": f[1],
            "attack": attack.name,
            "optimizer": attack.optimizer,
            "init": "features" if fit is not None else "noise",
            "tolerances": "relative" if attack.relative else "absolute",
            **({"label_init": label_init} if attack.optimise_labels else {}),
            "iterations": attack.iterations,
        }
        for f in fixed
    ]
    for j, entry in enumerate(info):
        if fit is not None:  # per restart: single-backward evaluations of the feature fit, its relative error
            entry["feature_evaluations"] = [int(v) for v in fit[0][j * r : (j + 1) * r]]
            entry["feature_error"] = [float(v) for v in fit[1][j * r : (j + 1) * r]]
        elif init_note:
            entry["init_note"] = init_note
    for j, entry in enumerate(info):  # restarts of one target share its scale: the best one decides
        relative = [t.loss / float(problems.scale[j * r]) for t in trials[j * r : (j + 1) * r] if not t.dropped]
        entry["relative_loss"] = min(relative) if relative else None
        entry["converged"] = bool(relative) and min(relative) <= attack.converged_below
    if attack.rescues or attack.line_search:  # per restart: blow-ups rescued, and stalls whose memory was reset
        for j, entry in enumerate(info):
            entry["rescued"] = [int(v) for v in opt.rescued[j * r : (j + 1) * r]]
            entry["stall_resets"] = [int(v) for v in opt.resets[j * r : (j + 1) * r]]
    return info
