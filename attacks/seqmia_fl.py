"""SeqMIA against federated learning: the server's real trajectories, and shadow trajectories it replays itself.

The curious server holds every global model G_r and every upload U_{k,r}. For a target client k it replays
each round the client took part in on its own auxiliary data, with the captured recipe, and puts its shadow
client in k's place: the shadow global model is G'_r = G_r + D_r, with
    D_r = (1 - w_k) D_{r-1} + w_k (V_{r-1} - U_{k,r-1}),
the captured global with client k's contribution swapped for the shadow's V (FedAvg's weighted mean), assuming
the other clients' uploads move with the global model they start from (to first order). The attack model thus
learns what members' metrics do on the target client's own uploads and on the global models that follow, without
ever touching a client's data. Other strategies (median, Krum) are approximated by the same formula.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from attacks.contract import Recipe, RunTrajectory, StateDict
from attacks.membership_metrics import calibrated_scores, membership_report, spread
from attacks.seqmia import (
    SeqMIAClassifier,
    distill_snapshots,
    loss_baselines,
    metric_sequences,
    model_metrics,
    train_attack_model,
)
from fedsim.errors import FedsimError

# Replays one round of local training with a captured recipe; the top layer passes the clients' own code.
TrainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Recipe, np.random.Generator], None]
Progress = Callable[[str, int, int], None]  # (task, done, total)
LEVELS = ("client", "global")


@dataclass
class ShadowRun:
    """A target client replayed with the server's own data: shadow global models, shadow uploads, shadow final model."""

    globals: dict[int, StateDict]
    uploads: dict[int, StateDict]
    final: StateDict


def frozen_parameters(run: RunTrajectory, client: int) -> set[str]:
    """Parameters the client never changed in any round (e.g. layers a TL-DMI client keeps frozen)."""
    rounds = run.client_rounds(client)
    if not rounds:
        return set()
    names = [k for k, v in run.globals[rounds[0]].items() if v.is_floating_point()]
    return {
        name for name in names if all(torch.equal(run.uploads[client][r][name], run.globals[r][name]) for r in rounds)
    }


def _loaded(template: nn.Module, states: list[StateDict]) -> Iterator[nn.Module]:
    for state in states:
        template.load_state_dict(state)
        yield template


def level_states(
    level: str, rounds: list[int], globals_: dict[int, StateDict], uploads: dict[int, StateDict], final: StateDict
) -> list[StateDict]:
    """The trajectory a level's sequence runs over, oldest first.

    client: G_r and the client's upload U_r for each round it trained in (the last step is its last upload).
    global: every global model G_r, then the final global model.
    """
    if level == "client":
        return [s for r in rounds for s in (globals_[r], uploads[r])]
    if level == "global":
        return [globals_[r] for r in sorted(globals_)] + [final]
    raise FedsimError(f"unknown membership level {level!r}; choose one of: {', '.join(LEVELS)}")


def real_sequences(
    template: nn.Module,
    run: RunTrajectory,
    level: str,
    x: torch.Tensor,
    y: torch.Tensor,
    client: int | None = None,
    cache: dict[int, np.ndarray] | None = None,
) -> np.ndarray:
    """The metric sequences [N, T, 5] of query samples over the captured trajectory of `level`.

    `cache` (one per query set) keeps each captured model's metrics, so that models shared between clients'
    trajectories (the global models) are queried once.
    """
    if level == "client":
        if client is None or not run.client_rounds(client):
            raise FedsimError(f"client {client} sent no update in this run; nothing to attack")
        states = level_states(level, run.client_rounds(client), run.globals, run.uploads[client], run.final)
    else:
        states = level_states(level, run.rounds, run.globals, {}, run.final)
    if cache is None:
        return metric_sequences(_loaded(template, states), x, y)
    for state in states:
        if id(state) not in cache:
            template.load_state_dict(state)
            cache[id(state)] = model_metrics(template, x, y)
    return np.stack([cache[id(state)] for state in states], axis=1)


def replay_client(
    template: nn.Module,
    run: RunTrajectory,
    client: int,
    x: torch.Tensor,
    y: torch.Tensor,
    train_fn: TrainFn,
    seed: int,
    substitute: bool = True,
) -> ShadowRun:
    """Put a shadow client holding (x, y) in `client`'s place for the whole run (see the module docstring).

    The shadow trains only the parameters the real client changed, with the recipe captured for each round.
    With substitute=False every round starts from the captured global model itself (plain replay).
    """
    frozen = frozen_parameters(run, client)
    delta: StateDict = {}
    shadow_globals, shadow_uploads = {}, {}
    for r in run.rounds:
        start = _shifted(run.globals[r], delta)
        shadow_globals[r] = start
        if r not in run.uploads.get(client, {}):
            continue
        template.load_state_dict(start)
        marked = _freeze(template, frozen)
        train_fn(template, x, y, run.recipes[r], np.random.default_rng([seed, r, client]))
        _unfreeze(template, marked)
        upload = {k: start[k].clone() if k in frozen else v.detach().clone() for k, v in template.state_dict().items()}
        shadow_uploads[r] = upload
        if substitute:
            w = run.weights[client][r]
            real = run.uploads[client][r]
            delta = {
                k: (1 - w) * delta.get(k, 0.0) + w * (upload[k] - real[k])
                for k, v in upload.items()
                if v.is_floating_point()
            }
    return ShadowRun(shadow_globals, shadow_uploads, _shifted(run.final, delta))


def _freeze(model: nn.Module, frozen: set[str]) -> list[nn.Module]:
    """Stop training the frozen parameters; modules with only frozen parameters are marked `fedsim_frozen`, which
    the clients' training keeps in eval mode (a frozen BatchNorm keeps its statistics). Returns the marked ones."""
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    marked = []
    for prefix, module in model.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
        if own and all(n in frozen for n in own) and not getattr(module, "fedsim_frozen", False):
            module.fedsim_frozen = True
            marked.append(module)
    return marked


def _unfreeze(model: nn.Module, marked: list[nn.Module]) -> None:
    for p in model.parameters():
        p.requires_grad_(True)
    for module in marked:
        del module.fedsim_frozen


def _shifted(state: StateDict, delta: StateDict) -> StateDict:
    return {k: (v + delta[k].to(v.dtype)) if k in delta else v for k, v in state.items()}


def shadow_dataset(
    template: nn.Module,
    run: RunTrajectory,
    client: int,
    aux_x: torch.Tensor,
    aux_y: torch.Tensor,
    train_fn: TrainFn,
    *,
    num_shadows: int,
    seed: int,
    size: int | None = None,
    substitute: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Labelled sequences for both levels from `num_shadows` replays of `client`, each with a fresh seeded split
    of the auxiliary data into a member shard (`size` examples, by default as many as the client declared) and
    as many non-members.

    Returns {level: (sequences [N, T, 5], labels [N])} with label 1 for the shadow's members.
    """
    n = size or run.shard_sizes.get(client) or 0
    if n < 1:
        raise FedsimError(f"client {client} declared no examples; its shard size is unknown")
    if len(aux_x) < 2 * n:
        raise FedsimError(
            f"the server's auxiliary data holds {len(aux_x)} examples; shadow training for client {client} needs "
            f"at least {2 * n} (a member shard as large as the client's and as many non-members)"
        )
    out: dict[str, list] = {level: [] for level in LEVELS}
    labels = np.r_[np.ones(n), np.zeros(n)]
    rounds = run.client_rounds(client)
    for i in range(num_shadows):
        perm = torch.from_numpy(np.random.default_rng([seed, client, i, 3]).permutation(len(aux_x))[: 2 * n])
        x, y = aux_x[perm], aux_y[perm]
        shadow = replay_client(
            template, run, client, x[:n], y[:n], train_fn, seed=seed * 1000 + i, substitute=substitute
        )
        for level in LEVELS:
            states = level_states(level, rounds, shadow.globals, shadow.uploads, shadow.final)
            out[level].append(metric_sequences(_loaded(template, states), x, y))
        if progress is not None:
            progress(i + 1, num_shadows)
    return {level: (np.concatenate(seqs), np.tile(labels, num_shadows)) for level, seqs in out.items()}


def shadow_federation(
    template: nn.Module,
    init: StateDict,
    shards: list[tuple[torch.Tensor, torch.Tensor]],
    recipe: Recipe,
    rounds: int,
    train_fn: TrainFn,
    seed: int,
) -> tuple[StateDict, list[StateDict]]:
    """A shadow federation for the black-box mode: FedAvg over `shards` for `rounds` rounds from `init`.

    Returns the final global model and each shadow client's last upload.
    """
    current = {k: v.clone() for k, v in init.items()}
    sizes = torch.tensor([len(x) for x, _ in shards], dtype=torch.float64)
    uploads: list[StateDict] = []
    for r in range(1, rounds + 1):
        uploads = []
        for k, (x, y) in enumerate(shards):
            template.load_state_dict(current)
            train_fn(template, x, y, recipe, np.random.default_rng([seed, r, k, 5]))
            uploads.append({name: v.detach().clone() for name, v in template.state_dict().items()})
        weights = sizes / sizes.sum()
        current = {
            name: sum(float(w) * u[name].double() for w, u in zip(weights, uploads, strict=True)).to(v.dtype)
            if v.is_floating_point()
            else uploads[-1][name]
            for name, v in current.items()
        }
    return current, uploads


class BlackBox:
    """The paper's black-box mode against final models (the final global model, a client's last upload).

    The auxiliary data is split in two: one half distils every target into `distill_epochs` snapshots (the
    stand-in for its training trajectory); the other half feeds a shadow federation shaped like the run (as many
    clients, shards as large as the smallest client's when the data allows, the same recipe and number of
    rounds, from a fresh initialisation) and its non-members. Attack models learn on the shadow federation's
    final global model (global level) and its first client's last upload (client level).
    """

    def __init__(
        self,
        make_model: Callable[[int], nn.Module],
        run: RunTrajectory,
        aux_x: torch.Tensor,
        aux_y: torch.Tensor,
        train_fn: TrainFn,
        *,
        distill_epochs: int,
        epochs: int,
        seed: int,
        progress: Progress | None = None,
    ) -> None:
        self.make_model, self.distill_epochs, self.epochs, self.seed = make_model, distill_epochs, epochs, seed
        self.progress = progress or (lambda task, done, total: None)
        self.notes: list[str] = []
        half = len(aux_y) // 2
        self.distill_x = aux_x[:half]
        pool_x, pool_y = aux_x[half:], aux_y[half:]
        k = len(run.uploads)
        size = min(min(run.shard_sizes.values()), len(pool_y) // (2 * k))
        if size < 1:
            raise FedsimError(f"the auxiliary data ({len(aux_y)} examples) is too small for a shadow federation")
        if size < max(run.shard_sizes.values()):
            self.notes.append(f"black-box shadow clients hold {size} examples each (too little auxiliary data)")
        perm = torch.from_numpy(np.random.default_rng([seed, 23]).permutation(len(pool_y)))
        self.shards = [
            (pool_x[perm[i * size : (i + 1) * size]], pool_y[perm[i * size : (i + 1) * size]]) for i in range(k)
        ]
        out = perm[k * size : 2 * k * size]
        self.shadow_out = (pool_x[out], pool_y[out])
        self.template = make_model(seed)
        self.progress("shadow federation", 0, 1)
        self.shadow_final, self.shadow_uploads = shadow_federation(
            self.template,
            make_model(seed + 977).state_dict(),
            self.shards,
            run.recipes[run.rounds[-1]],
            len(run.rounds),
            train_fn,
            seed,
        )
        self.progress("shadow federation", 1, 1)
        self.classifiers: dict[str, SeqMIAClassifier] = {}

    def sequences(self, final_state: StateDict, x: torch.Tensor, y: torch.Tensor, tag: str) -> np.ndarray:
        """[N, distill_epochs + 1, 5]: metrics on the distillation snapshots of a final model, then on it."""
        target = self.make_model(self.seed)
        target.load_state_dict(final_state)
        snaps = distill_snapshots(
            target,
            self.make_model(self.seed + 31),
            self.distill_x,
            epochs=self.distill_epochs,
            seed=self.seed,
            progress=lambda d, t, _l: self.progress(f"distilling {tag}", d, t),
        )
        return metric_sequences(_loaded(self.template, [*snaps, final_state]), x, y)

    def classifier(self, level: str) -> SeqMIAClassifier:
        """The attack model for `level`, learnt once on the shadow federation."""
        if level not in self.classifiers:
            final, (mx, my) = (
                (self.shadow_final, (torch.cat([s[0] for s in self.shards]), torch.cat([s[1] for s in self.shards])))
                if level == "global"
                else (self.shadow_uploads[0], self.shards[0])
            )
            n = min(len(my), len(self.shadow_out[1]))
            x, y = torch.cat([mx[:n], self.shadow_out[0][:n]]), torch.cat([my[:n], self.shadow_out[1][:n]])
            seqs = self.sequences(final, x, y, f"shadow {level} model")
            self.classifiers[level] = train_attack_model(
                seqs,
                np.r_[np.ones(n), np.zeros(n)],
                epochs=self.epochs,
                seed=self.seed,
                progress=lambda d, t, _l: self.progress(f"black-box attack model ({level})", d, t),
            )
        return self.classifiers[level]


# ----------------------------------------------------------------------------------------------
# The attack on a run: both levels, SeqMIA and the loss baselines
# ----------------------------------------------------------------------------------------------

Data = tuple[torch.Tensor, torch.Tensor]
MODES = ("fl", "blackbox")


@dataclass
class MembershipScores:
    """Every attack's scores by setting ("<mode>/<level>"), each part with who is a member, and what was noted.

    `parts` holds the scores that are pooled into one ROC per setting: at the FL client level each client's
    scores calibrated against its own attack model's held-out shadow non-members (one scale for all clients);
    `raw_parts` the same settings' uncalibrated scores, each client's on its own attack model's scale.
    """

    parts: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = field(default_factory=dict)
    raw_parts: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = field(default_factory=dict)
    per_client: dict[str, dict] = field(default_factory=dict)  # client -> attack -> report, FL client level
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time by phase (shadow replays, attack models)

    def timed(self, phase: str, start: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def add(self, key: str, attack_scores: dict[str, np.ndarray], n_members: int, raw: bool = False) -> None:
        """Scores of queries whose first `n_members` are members (raw=True: the uncalibrated ones)."""
        parts = self.raw_parts if raw else self.parts
        for name, s in attack_scores.items():
            parts.setdefault(key, {}).setdefault(name, []).append((s, _truth(len(s), n_members)))

    def pooled(self, raw: bool = False) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """setting -> attack -> (scores, is_member), every part of a setting together."""
        return {
            key: {
                name: (np.concatenate([s for s, _ in parts]), np.concatenate([m for _, m in parts]))
                for name, parts in attacks.items()
            }
            for key, attacks in (self.raw_parts if raw else self.parts).items()
        }

    def per_client_spread(self) -> dict[str, dict]:
        """attack -> mean, spread, min and max over the clients of their own reports (FL client level)."""
        if not self.per_client:
            return {}
        names = next(iter(self.per_client.values()))
        return {name: spread([reports[name] for reports in self.per_client.values()]) for name in names}


def _truth(n: int, n_members: int) -> np.ndarray:
    return np.r_[np.ones(n_members, bool), np.zeros(n - n_members, bool)]


def level_scores(classifier: SeqMIAClassifier, queries: np.ndarray) -> dict[str, np.ndarray]:
    """SeqMIA's scores of query sequences, and the two loss baselines'."""
    return {"seqmia": classifier.score(queries), **loss_baselines(queries)}


def calibration_references(
    classifier: SeqMIAClassifier, sequences: np.ndarray, labels: np.ndarray, notes: list[str]
) -> dict[str, np.ndarray]:
    """Each attack's scores of shadow non-members it never learnt from: the reference its scores are calibrated
    against. SeqMIA: the non-members of the attack model's held-out validation share; the loss baselines learn
    nothing, so every shadow non-member. With fewer than 2 held-out non-members SeqMIA falls back to every shadow
    non-member (noted: its training non-members score lower than unseen ones, which skews the scale)."""
    held = classifier.held_out[labels[classifier.held_out] == 0]
    if len(held) < 2:
        held = np.flatnonzero(labels == 0)
        notes.append("too few held-out shadow non-members: SeqMIA's scores calibrated on its training non-members")
    return {"seqmia": classifier.score(sequences[held]), **loss_baselines(sequences[labels == 0])}


def shadow_sizes(run: RunTrajectory, clients: list[int], aux: int, notes: list[str]) -> dict[int, int]:
    """Shadow shard sizes: the client's own, or half the auxiliary data when that is smaller (noted)."""
    sizes = {}
    for k in clients:
        sizes[k] = min(run.shard_sizes[k], aux // 2)
        if sizes[k] < 8:
            raise FedsimError(
                f"the server's auxiliary data ({aux} examples no client holds) is too small for shadow training; "
                "use examples-per-client to leave part of the training split to the server"
            )
        if sizes[k] < run.shard_sizes[k]:
            notes.append(
                f"client {k}: shadow shards hold {sizes[k]} examples, not {run.shard_sizes[k]} like the client's, "
                f"because the server's auxiliary data holds only {aux}"
            )
    return sizes


def attack_run(
    run: RunTrajectory,
    template: nn.Module,
    make_model: Callable[[int], nn.Module],
    shards: dict[int, Data],
    aux: Data,
    nonmembers: Data,
    train_fn: TrainFn,
    *,
    modes: tuple[str, ...],
    clients: list[int],
    num_shadows: int,
    epochs: int,
    distill_epochs: int,
    seed: int,
    progress: Progress,
) -> MembershipScores:
    """SeqMIA and the loss baselines against `run`, at client and global level, for `modes`.

    fl: sequences over the captured trajectory, attack model learnt from the server's shadow replays.
    blackbox: the paper's mode against the final models: distillation snapshots and a shadow federation.
    `shards` holds every client's private data: only the queries' ground truth (members), never the attack's.
    `template` is a model of the run's architecture the attack loads weights into; `make_model(seed)` a fresh one.
    """
    aux_x, aux_y = aux
    non_x, non_y = nonmembers
    out = MembershipScores()
    sizes = shadow_sizes(run, clients, len(aux_y), out.notes)
    if "fl" in modes:
        global_train: list[tuple[np.ndarray, np.ndarray]] = []
        non_cache: dict[int, np.ndarray] = {}
        for i, k in enumerate(clients):
            start = time.perf_counter()
            shadows = shadow_dataset(
                template,
                run,
                k,
                aux_x,
                aux_y,
                train_fn,
                num_shadows=num_shadows,
                seed=seed + 101 * k,
                size=sizes[k],
                progress=lambda d, t, k=k: progress(f"shadow replays of client {k}", d, t),
            )
            global_train.append(shadows["global"])
            out.timed("shadow replays", start)
            start = time.perf_counter()
            classifier = train_attack_model(
                *shadows["client"],
                epochs=epochs,
                seed=seed + k,
                progress=lambda d, t, _l, k=k: progress(f"attack model of client {k}", d, t),
            )
            out.timed("client attack models", start)
            mx, my = shards[k]
            queries = np.concatenate(
                [
                    real_sequences(template, run, "client", mx, my, client=k),
                    real_sequences(template, run, "client", non_x, non_y, client=k, cache=non_cache),
                ]
            )
            scores = level_scores(classifier, queries)
            out.add("fl/client", scores, len(my), raw=True)
            references = calibration_references(classifier, *shadows["client"], out.notes)
            out.add("fl/client", {n: calibrated_scores(s, references[n]) for n, s in scores.items()}, len(my))
            truth = _truth(len(queries), len(my))
            out.per_client[str(k)] = {name: membership_report(s, truth) for name, s in scores.items()}
            progress("clients", i + 1, len(clients))
        seqs = np.concatenate([s for s, _ in global_train])
        labels = np.concatenate([lab for _, lab in global_train])
        classifier = train_attack_model(
            seqs, labels, epochs=epochs, seed=seed, progress=lambda d, t, _l: progress("global attack model", d, t)
        )
        mx, my = _members(shards, run)
        queries = np.concatenate(
            [
                real_sequences(template, run, "global", mx, my),
                real_sequences(template, run, "global", non_x, non_y, cache=non_cache),
            ]
        )
        out.add("fl/global", level_scores(classifier, queries), len(my))
    if "blackbox" in modes:
        _blackbox(
            make_model, run, clients, shards, aux, nonmembers, train_fn, distill_epochs, epochs, seed, out, progress
        )
    return out


def _members(shards: dict[int, Data], run: RunTrajectory) -> Data:
    """Every client's private data together, in partition order: the members of the global level."""
    members = [shards[k] for k in sorted(run.uploads)]
    return torch.cat([m[0] for m in members]), torch.cat([m[1] for m in members])


def _blackbox(make_model, run, clients, shards, aux, nonmembers, train_fn, distill_epochs, epochs, seed, out, progress):
    """The paper's black-box mode (BlackBox) against the final global model and each client's last upload."""
    non_x, non_y = nonmembers
    box = BlackBox(
        make_model,
        run,
        *aux,
        train_fn,
        distill_epochs=distill_epochs,
        epochs=epochs,
        seed=seed,
        progress=progress,
    )
    out.notes.extend(box.notes)
    mx, my = _members(shards, run)
    queries = box.sequences(run.final, torch.cat([mx, non_x]), torch.cat([my, non_y]), "final global model")
    out.add("blackbox/global", level_scores(box.classifier("global"), queries), len(my))
    for k in clients:
        mx, my = shards[k]
        last = run.uploads[k][max(run.uploads[k])]
        queries = box.sequences(last, torch.cat([mx, non_x]), torch.cat([my, non_y]), f"client {k}'s last model")
        out.add("blackbox/client", level_scores(box.classifier("client"), queries), len(my))
