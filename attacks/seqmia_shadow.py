"""SeqMIA's shadow replays of a federated run: the server puts a shadow client in a target client's place.

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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from attacks.contract import Recipe, RunTrajectory, StateDict
from attacks.seqmia import metric_sequences
from attacks.seqmia_sequences import LEVELS, level_states, loaded_models
from fedsim.errors import FedsimError

# Replays one round of local training with a captured recipe; the top layer passes the clients' own code.
TrainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, Recipe, np.random.Generator], None]


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
            out[level].append(metric_sequences(loaded_models(template, states), x, y))
        if progress is not None:
            progress(i + 1, num_shadows)
    return {level: (np.concatenate(seqs), np.tile(labels, num_shadows)) for level, seqs in out.items()}
