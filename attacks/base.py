"""The attacks' contract (targets, reconstructions, trials), gradient distances, restarts, batching."""

from __future__ import annotations

import inspect
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from attacks.contract import AttackTarget, Recipe
from fedsim.errors import FedsimError

Progress = Callable[[int, float], None]


@dataclass
class Reconstruction:
    """What an attack recovered from one target, with its optimisation trace."""

    images: torch.Tensor
    labels: torch.Tensor
    loss: float
    history: list[dict]
    snapshots: list[tuple[int, torch.Tensor]]
    info: dict


class AttackDiverged(FedsimError):
    """Every restart of an attack diverged (NaN/inf loss or exploding images); nothing usable remains."""

    def __init__(self, attack: str, reasons: Sequence[str], *, supports_rescues: bool = False) -> None:
        self.reasons = list(reasons)
        super().__init__(
            f"{attack}: all {len(self.reasons)} restart(s) diverged ({'; '.join(self.reasons)}); "
            "try more restarts (--option restarts=3), a smaller lr, another seed"
            + (" or rescues (--option rescues=5)" if supports_rescues else "")
        )


@dataclass
class Trial:
    """One restart of one target: an independent optimisation problem and its outcome."""

    images: torch.Tensor | None
    labels: torch.Tensor | None
    loss: float
    history: list[dict]
    snapshots: list[tuple[int, torch.Tensor]]
    evaluations: int
    dropped: str | None = None


# ----------------------------------------------------------------------------------------------
# Gradients of the victim model
# ----------------------------------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters whose gradients a client shares, in the order of `AttackTarget.gradients`."""
    return [p for p in model.parameters() if p.requires_grad]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy for hard labels [B] (int) or soft label distributions [B, K], as clients train."""
    if labels.is_floating_point():
        return -(labels * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits, labels)


def model_gradients(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, create_graph: bool = False
) -> list[torch.Tensor]:
    """Gradient of the client loss on (images, labels) w.r.t. the trainable parameters.

    With create_graph=True the result stays differentiable w.r.t. images/labels, for matching.
    """
    loss = cross_entropy(model(images), labels)
    grads = torch.autograd.grad(loss, trainable_parameters(model), create_graph=create_graph)
    return list(grads) if create_graph else [g.detach() for g in grads]


def gradient_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """Squared L2 distance between two gradient lists (the DLG objective)."""
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True))


def defense_aware_observed(target: AttackTarget, observed: Sequence[torch.Tensor]) -> tuple[list, list, torch.Tensor]:
    """(observed, mask, rescale flag) of one target, the form `matched_distance` takes (stackable per problem)."""
    observed = [o.detach() for o in observed]
    mask = target.mask if target.mask is not None else [torch.ones_like(o) for o in observed]
    if [m.shape for m in mask] != [o.shape for o in observed]:
        raise FedsimError("the attack target's mask does not match the shapes of its observed gradient")
    return (
        observed,
        [m.detach().to(o.dtype) for m, o in zip(mask, observed, strict=True)],
        torch.tensor(float(target.rescale)),
    )


def has_defense_knowledge(targets: Sequence[AttackTarget]) -> bool:
    """Whether any target carries defense knowledge (a mask or a rescale); if none does, the plain objective runs."""
    return any(t.mask is not None or t.rescale for t in targets)


def matched_distance(simulated: Sequence[torch.Tensor], observed: Sequence[Any]) -> torch.Tensor:
    """The gradient distance a defense-aware attacker minimises.

    Entries the defense erased (mask 0) are not matched; with the rescale flag the simulated signal
    is scaled to the observed norm first, so only its direction must match (a clipped update).
    """
    observed, mask, rescale = observed  # defense_aware_observed's form
    simulated = [s * m for s, m in zip(simulated, mask, strict=True)]
    norm_s = torch.sqrt(sum((s**2).sum() for s in simulated) + 1e-30)
    norm_o = torch.sqrt(sum((o**2).sum() for o in observed))
    factor = rescale * (norm_o / norm_s) + (1 - rescale)
    return gradient_distance([s * factor for s in simulated], observed)


def gradients_from_update(update: Sequence[torch.Tensor], lr: float, local_steps: int = 1) -> list[torch.Tensor]:
    """The pseudo-gradient -Δ/(lr·steps) of a FedAvg update: the client's mean gradient over its local steps.

    Exactly the gradient when the client took one SGD step; an approximation otherwise.
    """
    if lr <= 0 or local_steps < 1:
        raise FedsimError(f"pseudo-gradient needs lr > 0 and local_steps >= 1, got lr={lr}, steps={local_steps}")
    return [-d.detach() / (lr * local_steps) for d in update]


def local_steps(recipe: Recipe, num_examples: int) -> int:
    """Number of SGD steps a client takes under `recipe` (one pass per epoch, last batch kept)."""
    batch = recipe.batch_size or num_examples
    return recipe.local_epochs * math.ceil(num_examples / batch)


def observed_signal(target: AttackTarget, *, unroll: bool) -> tuple[str, list[torch.Tensor]]:
    """The objective an attack can use for `target` and the tensors to match.

    FedSGD captures give "gradient". FedAvg captures give "unrolled" (for attacks that simulate
    the local steps, matched on the same -Δ/(lr·steps) scale) or "pseudo-gradient".
    """
    fedavg = target.recipe.fedavg or target.gradients is None
    if not fedavg:
        if target.gradients is None:
            raise FedsimError("target has neither gradients nor an update to attack")
        return "gradient", [g.detach() for g in target.gradients]
    if target.update is None:
        raise FedsimError("a FedAvg target needs its update (client weights - global weights)")
    if target.recipe.lr is None:
        raise FedsimError("a FedAvg target needs the recipe's lr to turn its update into a pseudo-gradient")
    n = target.recipe.num_examples or target.batch_size
    steps = local_steps(target.recipe, n)
    pseudo = gradients_from_update(target.update, target.recipe.lr, steps)
    return ("unrolled" if unroll and steps > 1 else "pseudo-gradient"), pseudo


@contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` intra-op CPU threads (None: leave torch's setting), restoring the previous count.

    The attacks' tensors are small, so per-op overhead dominates; on a busy 2-core machine two
    OpenMP threads made DLG 10-40x slower than one (measured), so attacks default to one.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero while attacking: matched gradients get tiny, and denormal
    arithmetic made CPU evaluations 5-10x slower (measured). Restores torch's default (off)."""
    supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if supported:
            torch.set_flush_denormal(False)


GradientFn = Callable[[dict, dict, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]


def problem_generator(seed: int, restart: int) -> torch.Generator:
    """A CPU generator for one restart: inits are drawn on CPU, so they do not depend on the device."""
    return torch.Generator().manual_seed(seed * 1_000_003 + restart)


# ----------------------------------------------------------------------------------------------
# Attacks
# ----------------------------------------------------------------------------------------------


class Attack(ABC):
    """A gradient-inversion attack. Options are constructor keywords; `reconstruct` attacks one target."""

    name: ClassVar[str]
    batchable: ClassVar[bool] = True  # whether reconstruct_many can solve several targets in one vmap
    supports_rescues: ClassVar[bool] = False  # whether a `rescues` option can save diverging restarts

    def __init__(
        self,
        *,
        restarts: int = 1,
        tolerance: float = 1e-9,
        snapshot_every: int | None = None,
        cpu_threads: int | None = 1,
    ) -> None:
        if restarts < 1:
            raise FedsimError(f"{self.name}: restarts must be >= 1, got {restarts}")
        if tolerance < 0:
            raise FedsimError(f"{self.name}: tolerance must be >= 0, got {tolerance}")
        self.restarts = restarts
        self.tolerance = tolerance
        self.snapshot_every = snapshot_every
        self.cpu_threads = cpu_threads

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The attack's options and their defaults (constructor keywords, base class included)."""
        out: dict[str, Any] = {}
        for klass in cls.__mro__:  # follow __init__s that forward **options to their parent
            if "__init__" not in vars(klass):
                continue
            params = inspect.signature(klass.__init__).parameters.values()
            out.update({p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name not in out})
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return out

    def reconstruct(
        self,
        target: AttackTarget,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
    ) -> Reconstruction:
        """Reconstruct the examples behind one captured update. Same seed, same result."""
        return self._reconstruct_group([target], seed=seed, device=resolve_device(device), progress=progress)[0]

    def _reconstruct_group(
        self,
        targets: Sequence[AttackTarget],
        *,
        seed: int,
        device: torch.device,
        progress: Progress | None,
        raise_on_divergence: bool = True,
    ) -> list[Reconstruction | AttackDiverged]:
        start = time.perf_counter()
        with flush_denormals(), cpu_threads(self.cpu_threads if device.type == "cpu" else None):
            trials, info = self._solve(targets, seed=seed, device=device, progress=progress)
        seconds = time.perf_counter() - start
        results: list[Reconstruction | AttackDiverged] = []
        for per_target, target_info in zip(trials, info, strict=True):
            try:
                result = self._best_trial(per_target, target_info, seconds / len(targets))
                result.info["batched_targets"] = len(targets)
                results.append(result)
            except AttackDiverged as exc:
                if raise_on_divergence:
                    raise
                results.append(exc)
        return results

    @abstractmethod
    def _solve(
        self, targets: Sequence[AttackTarget], *, seed: int, device: torch.device, progress: Progress | None
    ) -> tuple[list[list[Trial]], list[dict]]:
        """Run every restart of every target; return per-target trials and per-target info."""

    def _best_trial(self, trials: list[Trial], info: dict, seconds: float) -> Reconstruction:
        """Keep the best restart by final loss; dropped (diverged) restarts are reported, never returned."""
        dropped = [f"restart {i}: {t.dropped}" for i, t in enumerate(trials) if t.dropped]
        alive = [(t.loss, i) for i, t in enumerate(trials) if not t.dropped]
        if not alive:
            raise AttackDiverged(self.name, dropped, supports_rescues=self.supports_rescues)
        _, best = min(alive)
        trial = trials[best]
        assert trial.images is not None and trial.labels is not None
        info = {
            **info,
            "restarts": len(trials),
            "chosen_restart": best,
            "restart_losses": [t.loss for t in trials],
            "dropped_restarts": dropped,
            "evaluations": trial.evaluations,
            "evaluations_all_restarts": sum(t.evaluations for t in trials),
            "restart_evaluations": [t.evaluations for t in trials],
            "seconds": seconds,
        }
        return Reconstruction(
            images=trial.images.detach().float().cpu().clamp(0, 1),
            labels=trial.labels.detach().long().cpu(),
            loss=trial.loss,
            history=trial.history,
            snapshots=trial.snapshots,
            info=info,
        )

    def snapshot_interval(self, iterations: int) -> int:
        """Iterations between snapshots: the option, or ~30 snapshots per run."""
        return self.snapshot_every or max(1, iterations // 30)


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device, refusing CUDA when none is available (instead of failing deep inside torch)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FedsimError(f"device {device} requested but CUDA is not available; use device='cpu'")
    return device


def divergence_reasons(loss: torch.Tensor, images: torch.Tensor, limit: float) -> list[str | None]:
    """Per problem: why it diverged (non-finite loss, non-finite or exploding images), or None."""
    reasons: list[str | None] = []
    flat = images.detach().flatten(1)
    for k in range(loss.shape[0]):
        if not torch.isfinite(loss[k]):
            reasons.append(f"loss became {loss[k].item()}")
        elif not torch.isfinite(flat[k]).all():
            reasons.append("images became non-finite")
        elif flat[k].abs().max() > limit:
            reasons.append(f"images blew up (max |x| = {flat[k].abs().max().item():.3g} > {limit:g})")
        else:
            reasons.append(None)
    return reasons


def batching_key(target: AttackTarget) -> tuple:
    """Targets with equal keys (architecture, batch size, recipe) can be solved together in one vmap."""
    shapes = tuple((n, tuple(p.shape), p.requires_grad) for n, p in target.model.named_parameters())
    recipe = target.recipe
    return (
        type(target.model),
        shapes,
        target.model.training,
        target.batch_size,
        tuple(target.input_shape),
        target.num_classes,
        target.labels is None,
        target.gradients is None,
        recipe,
    )


def reconstruct_many(
    attack: Attack,
    targets: Sequence[AttackTarget],
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    max_group: int = 64,
    progress: Progress | None = None,
    raise_on_divergence: bool = True,
) -> list[Reconstruction | AttackDiverged]:
    """Reconstruct several targets, solving compatible ones together on one device.

    Targets with the same architecture, batch size and recipe are stacked and optimised in one
    torch.func.vmap (every target x restart is an independent problem with its own optimiser
    state, so each result equals `attack.reconstruct(target, seed=seed)` up to float rounding).
    Attacks that cannot batch (analytic: closed form) run sequentially. With raise_on_divergence
    False, a target whose restarts all diverged yields its AttackDiverged instead of raising.
    """
    device = resolve_device(device)
    results: list[Reconstruction | AttackDiverged | None] = [None] * len(targets)
    groups: dict[tuple, list[int]] = {}
    for i, target in enumerate(targets):
        key = batching_key(target) if attack.batchable else (i,)
        groups.setdefault(key, []).append(i)
    for indices in groups.values():
        for start in range(0, len(indices), max_group):
            chunk = indices[start : start + max_group]
            out = attack._reconstruct_group(
                [targets[i] for i in chunk],
                seed=seed,
                device=device,
                progress=progress,
                raise_on_divergence=raise_on_divergence,
            )
            for i, result in zip(chunk, out, strict=True):
                results[i] = result
    return results  # type: ignore[return-value]
