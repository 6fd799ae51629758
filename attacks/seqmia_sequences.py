"""SeqMIA's two levels over a federated run: which models a level's metric sequence runs over (a client's
trajectory of global models and its own uploads, or the global models alone), and the sequences of query samples
over the captured trajectory."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from attacks.contract import RunTrajectory, StateDict
from attacks.seqmia import metric_sequences, model_metrics
from fedsim.errors import FedsimError

LEVELS = ("client", "global")


def loaded_models(template: nn.Module, states: list[StateDict]) -> Iterator[nn.Module]:
    """The template with each state loaded in turn (one model in memory)."""
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
        return metric_sequences(loaded_models(template, states), x, y)
    for state in states:
        if id(state) not in cache:
            template.load_state_dict(state)
            cache[id(state)] = model_metrics(template, x, y)
    return np.stack([cache[id(state)] for state in states], axis=1)
