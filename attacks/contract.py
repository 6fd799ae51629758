"""What the curious server knows, as the attacks take it: targets, typed recipes, trajectories, from captures."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsim.captures import CaptureStore
from fedsim.errors import FedsimError
from fedsim.files import load_tensors
from fedsim.models import build_model

StateDict = dict[str, torch.Tensor]
MODES = ("fedsgd", "fedavg")
# A recipe's keys as the server sends them to the clients ("recipe" names the mode), then the attacks' own
# spellings of the mode and of the number of examples behind one update; later keys win.
KEYS = {
    "mode": "mode",
    "recipe": "mode",
    "lr": "lr",
    "local-epochs": "local_epochs",
    "batch-size": "batch_size",
    "num-examples": "num_examples",
    "proximal-mu": "proximal_mu",
}


@dataclass(frozen=True)
class Recipe:
    """The local training the server asked of a client, typed; None where the server does not know it.

    A target without a mode and with gradients is attacked as a plain gradient; a missing batch size means one
    batch of every example; `num_examples` is how many examples stand behind one update.
    """

    mode: str | None = None
    lr: float | None = None
    local_epochs: int = 1
    batch_size: int | None = None
    num_examples: int | None = None
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.mode is not None and self.mode not in MODES:
            raise FedsimError(f"the recipe's mode must be one of: {', '.join(MODES)}; got {self.mode!r}")
        if self.lr is not None:
            object.__setattr__(self, "lr", _number("lr", self.lr, minimum=0.0, strict=True))
        object.__setattr__(self, "proximal_mu", _number("proximal-mu", self.proximal_mu, minimum=0.0))
        _integer("local-epochs", self.local_epochs)
        for name, value in (("batch-size", self.batch_size), ("num-examples", self.num_examples)):
            if value is not None:
                _integer(name, value)

    @classmethod
    def from_dict(cls, recipe: Mapping[str, Any], **defaults: Any) -> Recipe:
        """A recipe from its dashed keys (a capture record's "recipe"); `defaults` (field names) fill the keys it
        lacks. Keys the attacks do not read are ignored: the server may send the clients more."""
        if not isinstance(recipe, Mapping):
            raise FedsimError(f"a recipe must be a mapping of its settings, got {type(recipe).__name__}")
        values = dict(defaults)
        values.update({name: recipe[key] for key, name in KEYS.items() if key in recipe})
        return cls(**values)

    @property
    def fedavg(self) -> bool:
        return self.mode == "fedavg"


def _number(name: str, value: Any, *, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FedsimError(f"the recipe's {name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise FedsimError(
            f"the recipe's {name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value}"
        )
    return value


def _integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FedsimError(f"the recipe's {name} must be an integer >= 1, got {value!r}")


@dataclass
class AttackTarget:
    """Everything the curious server knows about one captured update."""

    model: nn.Module
    gradients: list[torch.Tensor] | None
    batch_size: int
    input_shape: tuple[int, int, int]
    num_classes: int
    labels: torch.Tensor | None = None
    update: list[torch.Tensor] | None = None
    recipe: Recipe = field(default_factory=Recipe)
    # What a defense-aware attacker adds (target_from_capture fills these from the client's declared
    # defenses): the entries of the observed signal to match, 1, and those a defense erased, 0
    # (pruning); and whether to match the direction only, because the update was clipped to a norm
    # that says nothing about the data.
    mask: list[torch.Tensor] | None = None
    rescale: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, Recipe):  # the dashed form, e.g. {"mode": "fedavg", "lr": 0.1}
            self.recipe = Recipe.from_dict(self.recipe)


def declared_defenses(record: Mapping[str, Any]) -> list[str]:
    """The defenses a client declared in its reply (the capture record's "declared"), in the order applied."""
    return [d for d in str((record.get("declared") or {}).get("defenses", "")).split(",") if d]


def capture_states(store: CaptureStore, record: Mapping[str, Any]) -> tuple[StateDict, StateDict]:
    """(the global weights the client started from, the weights it sent back) of one update record."""
    return store.load(store.global_record(record["round"])), store.load(record)


def target_from_capture(
    global_state: StateDict, client_state: StateDict, record: Mapping[str, Any], aware: bool = True
) -> AttackTarget:
    """What the curious server knows about one update (its capture record and both weights), as an AttackTarget.

    The defense-aware attacker (`aware`, the default) uses what the client declared: under TL-DMI it
    matches only the layers the client trained; under pruning only the entries that were not zeroed;
    under clipping (without noise after it) only the direction of the update. Against noise and local
    DP it changes nothing: for Gaussian noise the squared distance already is the likelihood's. The
    unaware attacker takes every update as a plain gradient of every parameter.
    """
    model = build_model(record["model"], tuple(record["input_shape"]), record["num_classes"])
    server = record.get("server") or {}
    if server.get("mode") == "imprint":  # the cheating server's own architecture: its block in front of the model
        from fedsim.imprint import imprinted

        model = imprinted(model, tuple(record["input_shape"]), int(server["bins"]))
    model.load_state_dict(global_state)
    model.train()  # clients compute their gradients in training mode (BatchNorm uses batch statistics)
    declared, defenses = record.get("declared") or {}, declared_defenses(record)
    every = [n for n, _ in model.named_parameters()]
    trainable = set((declared.get("trainable") or record.get("trainable") or every) if aware else every)
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    update = [client_state[n].float() - global_state[n].float() for n in names]
    # A capture whose recipe names no mode is FedAvg, the clients' default.
    recipe = replace(Recipe.from_dict(record.get("recipe") or {}, mode="fedavg"), num_examples=record["num_examples"])
    if recipe.mode == "fedsgd" and recipe.lr is None:
        raise FedsimError("a FedSGD capture's recipe has no lr; its gradient cannot be recovered from the update")
    gradients = [-u / recipe.lr for u in update] if recipe.mode == "fedsgd" else None
    mask = [(u != 0).float() for u in update] if aware and "prune" in defenses else None
    rescale = aware and "clip" in defenses and not {"noise", "ldp"} & set(defenses)
    return AttackTarget(
        mask=mask,
        rescale=rescale,
        model=model,
        gradients=gradients,
        batch_size=int(record["num_examples"]),
        input_shape=tuple(record["input_shape"]),
        num_classes=int(record["num_classes"]),
        update=update,
        recipe=recipe,
    )


@dataclass
class RunTrajectory:
    """Everything the server captured in a run, by round and by client (partition id)."""

    rounds: list[int]
    globals: dict[int, StateDict]
    final: StateDict
    uploads: dict[int, dict[int, StateDict]]  # partition -> round -> weights sent back
    weights: dict[int, dict[int, float]]  # partition -> round -> FedAvg weight n_k / sum_j n_j
    recipes: dict[int, Recipe]  # round -> recipe sent to the clients
    shard_sizes: dict[int, int] = field(default_factory=dict)  # partition -> examples it declared

    def client_rounds(self, client: int) -> list[int]:
        """The rounds in which `client` sent an update."""
        return [r for r in self.rounds if r in self.uploads.get(client, {})]


def load_trajectory(store: CaptureStore, final_model: str | Path) -> RunTrajectory:
    """Every captured global model and client update of a run, by round and by client (partition id), and the
    final global model (the file `final_model`)."""
    final_model = Path(final_model)
    globals_ = {r["round"]: store.load(r) for r in store.records("global")}
    updates = [r for r in store.records("update") if r.get("partition_id") is not None]
    if not globals_ or not updates:
        raise FedsimError(f"{store.root} holds no captured global models or client updates; run with capture = true")
    if not final_model.is_file():
        raise FedsimError(f"{final_model.parent} has no {final_model.name}: the run did not finish")
    run = RunTrajectory(sorted(globals_), globals_, load_tensors(final_model), {}, {}, {})
    totals: dict[int, int] = {}
    for record in updates:
        totals[record["round"]] = totals.get(record["round"], 0) + int(record["num_examples"])
    for record in updates:
        k, r = int(record["partition_id"]), int(record["round"])
        run.uploads.setdefault(k, {})[r] = store.load(record)
        run.weights.setdefault(k, {})[r] = int(record["num_examples"]) / max(totals[r], 1)
        run.recipes[r] = Recipe.from_dict(record.get("recipe") or {}, mode="fedavg")
        run.shard_sizes[k] = max(run.shard_sizes.get(k, 0), int(record["num_examples"]))
    for r in run.rounds:
        if r not in run.recipes:
            run.recipes[r] = Recipe.from_dict(store.global_record(r).get("recipe") or {}, mode="fedavg")
    return run


def target_clients(run: RunTrajectory, clients: list[int] | None) -> list[int]:
    """The clients to attack: those asked for, each of which must have sent an update; by default every one."""
    known = sorted(run.uploads)
    if clients is None:
        return known
    for k in clients:
        if k not in run.uploads:
            raise FedsimError(f"client {k} sent no update in this run; clients with updates: {known}")
    return list(clients)
