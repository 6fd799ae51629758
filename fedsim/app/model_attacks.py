"""Model-level attacks on a finished run: SeqMIA membership inference and ensemble inversion, end to end.

Both read only what the curious server kept (captures/, model.safetensors, config.toml) plus data of its own:
for membership, examples of the same distribution that no client holds; for inversion, nothing (data-free) or a
public dataset. Scoring alone reads the clients' shards, rebuilt from the config, as the ground truth of
membership and of which classes a client holds, and trains the evaluation classifier. The procedures live in
attacks/seqmia_fl.py and attacks/ensemble_inversion.py; this module loads their inputs and writes their results.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from attacks.contract import Recipe, RunTrajectory, load_trajectory, target_clients
from attacks.membership_metrics import format_report, membership_report, roc_png
from attacks.seqmia_fl import LEVELS, MODES, attack_run
from fedsim.captures import CaptureStore
from fedsim.config import FedsimConfig
from fedsim.datasets import to_float
from fedsim.errors import FedsimError
from fedsim.federation import Federation
from fedsim.files import atomic_write_bytes, atomic_write_json, save_tensors
from fedsim.models import build_model

Progress = Callable[[str, int, int], None]  # (task, done, total)


def _quiet(task: str, done: int, total: int) -> None:
    return None


# ----------------------------------------------------------------------------------------------
# Reading a run
# ----------------------------------------------------------------------------------------------


def load_run(run_dir: str | Path) -> tuple[FedsimConfig, RunTrajectory]:
    """The run's config and its trajectory: every captured model, by round and by client (partition id)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FedsimError(f"{run_dir} is not a fedsim run folder (no config.toml); give runs/<run-id>")
    config = FedsimConfig.from_toml(run_dir / "config.toml")
    return config, load_trajectory(CaptureStore(run_dir / "captures"), run_dir / "model.safetensors")


def recipe_trainer(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, rng: np.random.Generator
) -> None:
    """Replay a captured recipe with the clients' own training code (clients/training.py): the attacks' replays
    train exactly as the clients do, and the attacks themselves never import the clients."""
    from clients.training import fedsgd_batch, train_fedavg, train_fedsgd

    lr, batch = recipe.lr if recipe.lr is not None else 0.1, recipe.batch_size or 32
    if recipe.mode == "fedsgd":
        chosen = torch.from_numpy(fedsgd_batch(len(x), min(batch, len(x)), rng))
        train_fedsgd(model, x[chosen], y[chosen], lr)
    else:
        train_fedavg(model, x, y, lr, recipe.local_epochs, batch, rng, recipe.proximal_mu)


def _template(config: FedsimConfig, fed: Federation) -> torch.nn.Module:
    return build_model(config.model, fed.data.input_shape, fed.data.num_classes, seed=config.seed)


def _shards(fed: Federation, clients: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The clients' private images and labels: scoring's ground truth, never the attacks' input."""
    return {k: fed.shard(k)[:2] for k in clients}


# ----------------------------------------------------------------------------------------------
# Membership inference
# ----------------------------------------------------------------------------------------------


def membership_split(fed: Federation, seed: int, max_nonmembers: int = 2000) -> dict:
    """The server's auxiliary data and the scoring side's non-member queries (members are the clients' shards).

    Training-split examples in no client's shard are split at random in two halves: the server's auxiliary data
    and the non-members, so both come from the members' own distribution. When fewer than 2000 are left, the
    test split joins: its first half goes to the auxiliary data, its second half to the non-members.
    """
    data = fed.data
    unused = np.setdiff1d(np.arange(len(data.train_y)), np.concatenate(fed.shards))
    unused = np.random.default_rng([seed, 17]).permutation(unused)
    half = len(unused) // 2
    aux_x, aux_y = to_float(data.train_x[unused[:half]]), data.train_y[unused[:half]]
    non_x, non_y = to_float(data.train_x[unused[half:]]), data.train_y[unused[half:]]
    if len(unused) < 2000:
        test_x, test_y, cut = to_float(data.test_x), data.test_y, len(data.test_y) // 2
        aux_x, aux_y = torch.cat([aux_x, test_x[:cut]]), torch.cat([aux_y, test_y[:cut]])
        non_x, non_y = torch.cat([non_x, test_x[cut:]]), torch.cat([non_y, test_y[cut:]])
    return {"aux": (aux_x, aux_y), "nonmembers": (non_x[:max_nonmembers], non_y[:max_nonmembers])}


CALIBRATION = (
    "fl/client pools every client's scores after mapping each onto one scale: 1 - its empirical p-value against "
    "that client's attack model's held-out shadow non-members (pooled-raw: the uncalibrated scores, each client's "
    "on its own attack model's scale; per-client-spread: mean and spread of the clients' own reports)"
)


def run_membership(
    run_dir: str | Path,
    *,
    modes: tuple[str, ...] = ("fl",),
    clients: list[int] | None = None,
    num_shadows: int = 8,
    epochs: int = 150,
    distill_epochs: int = 10,
    max_nonmembers: int = 2000,
    seed: int | None = None,
    progress: Progress = _quiet,
) -> dict:
    """SeqMIA against a run, with the two loss baselines, at client and global level; writes <run>/membership/.

    results.json: `results` (setting -> attack -> report; fl/client pooled after per-client calibration),
    `pooled-raw` (fl/client pooled uncalibrated), `per-client` and `per-client-spread` (see CALIBRATION).

    fl: sequences over the captured trajectory, attack model learnt from the server's shadow replays.
    blackbox: the paper's mode against the final models: distillation snapshots and a shadow federation.
    The procedure is attacks.seqmia_fl.attack_run.
    """
    for mode in modes:
        if mode not in MODES:
            raise FedsimError(f"unknown membership mode {mode!r}; choose from: {', '.join(MODES)}")
    run_dir = Path(run_dir)
    config, run = load_run(run_dir)
    seed = config.seed if seed is None else seed
    fed = Federation.from_config(config)
    clients = target_clients(run, clients)
    split = membership_split(fed, seed, max_nonmembers)
    scores = attack_run(
        run,
        _template(config, fed),
        lambda s: build_model(config.model, fed.data.input_shape, fed.data.num_classes, seed=s),
        _shards(fed, sorted(run.uploads)),
        split["aux"],
        split["nonmembers"],
        recipe_trainer,
        modes=modes,
        clients=clients,
        num_shadows=num_shadows,
        epochs=epochs,
        distill_epochs=distill_epochs,
        seed=seed,
        progress=progress,
    )
    results = {
        "run": run_dir.name,
        "seed": seed,
        "clients": clients,
        "num-shadows": num_shadows,
        "notes": scores.notes,
        "calibration": CALIBRATION,
        "results": {},
        "pooled-raw": {},
        "per-client": scores.per_client,
        "per-client-spread": {"fl/client": scores.per_client_spread()} if scores.per_client else {},
        "seconds": scores.seconds,
    }
    out = run_dir / "membership"
    tensors = {}
    for key, pooled in scores.pooled(raw=True).items():
        results["pooled-raw"][key] = {name: membership_report(s, m) for name, (s, m) in pooled.items()}
        for name, (s, _m) in pooled.items():
            tensors[f"{key}-raw/{name}/scores"] = torch.from_numpy(s)
    for key, pooled in scores.pooled().items():
        results["results"][key] = {name: membership_report(s, m) for name, (s, m) in pooled.items()}
        atomic_write_bytes(out / f"roc-{key.replace('/', '-')}.png", roc_png(pooled, f"{run_dir.name}: {key}"))
        for name, (s, m) in pooled.items():
            tensors[f"{key}/{name}/scores"] = torch.from_numpy(s)
            tensors[f"{key}/{name}/is-member"] = torch.from_numpy(m.astype(np.uint8))
    save_tensors(out / "scores.safetensors", tensors)
    atomic_write_json(out / "results.json", results)
    return results


# ----------------------------------------------------------------------------------------------
# Ensemble inversion
# ----------------------------------------------------------------------------------------------


def run_inversion(
    run_dir: str | Path,
    *,
    clients: list[int] | None = None,
    ensemble: str = "client",
    size: int = 5,
    distance: str = "weights",
    selection: str = "fms",
    steps: int = 1500,
    batch_size: int = 64,
    per_class: int = 32,
    keep: float = 0.5,
    lambda_activation: float = 0.1,
    aux_dataset: str = "",
    evaluator: str = "auto",
    evaluator_epochs: int = 0,
    seed: int | None = None,
    progress: Progress = _quiet,
) -> dict:
    """Ensemble inversion against single-model inversion of the last model; writes <run>/inversion/
    (results.json, and PNG grids of the kept images, one row per class).

    ensemble=client: for each client k, its uploads over the rounds (single model: its last upload).
    ensemble=round: every client's upload of the last round (single model: the final global model).
    selection=fms picks `size` candidates by farthest model sampling; selection=recent the `size` most recent.
    The procedure is attacks.ensemble_inversion.invert_run.
    """
    from attacks.ensemble_inversion import (
        DISTANCES,
        ENSEMBLES,
        SELECTIONS,
        InversionConfig,
        auxiliary_images,
        concatenated,
        invert_run,
    )
    from attacks.inversion_eval import train_independent_evaluator
    from fedsim.images import grid, png_bytes

    if ensemble not in ENSEMBLES:
        raise FedsimError(f"unknown ensemble {ensemble!r}; choose one of: {', '.join(ENSEMBLES)}")
    if selection not in SELECTIONS:
        raise FedsimError(f"unknown selection {selection!r}; choose one of: {', '.join(SELECTIONS)}")
    if distance not in DISTANCES:
        raise FedsimError(f"unknown FMS distance {distance!r}; choose one of: {', '.join(DISTANCES)}")
    if size < 1 or steps < 1 or per_class < 1 or batch_size < 1:
        raise FedsimError("size, steps, batch-size and per-class must be at least 1")
    run_dir = Path(run_dir)
    config, run = load_run(run_dir)
    if evaluator == "auto":
        evaluator = "lenet5" if config.model != "lenet5" else "convnet"
    if evaluator == config.model:
        raise FedsimError(f"the evaluator must be another architecture than the attacked model ({config.model!r})")
    seed = config.seed if seed is None else seed
    fed = Federation.from_config(config)
    shape, num_classes = fed.data.input_shape, fed.data.num_classes
    if aux_dataset.removeprefix("sample-") == config.dataset.removeprefix("sample-"):
        raise FedsimError(f"auxiliary dataset {aux_dataset!r} is the clients' own; choose a public, disjoint one")
    aux = auxiliary_images(aux_dataset, config.data_dir, shape) if aux_dataset else None
    clients = target_clients(run, clients) if ensemble == "client" else []
    private = _shards(fed, sorted(run.uploads))
    judge, judge_info = train_independent_evaluator(
        evaluator,
        (to_float(fed.data.test_x), fed.data.test_y),
        concatenated(list(private.values())),
        num_classes,
        epochs=evaluator_epochs,
        seed=seed + 5,
        progress=lambda d, t, _l: progress("evaluation classifier", d, t),
    )
    cfg = InversionConfig(steps=steps, batch_size=batch_size, lambda_activation=lambda_activation, seed=seed)
    targets, images = invert_run(
        run,
        lambda state: _model(config, fed, state),
        private,
        judge,
        cfg,
        input_shape=shape,
        num_classes=num_classes,
        ensemble=ensemble,
        clients=clients,
        size=size,
        distance=distance,
        selection=selection,
        per_class=per_class,
        keep=keep,
        aux=aux,
        seed=seed,
        progress=progress,
    )
    out, columns = run_dir / "inversion", min(16, max(1, round(per_class * keep)))
    for name, kept in images.items():
        atomic_write_bytes(out / f"{name}.png", png_bytes(grid(kept, columns=columns)))
    summary = {
        "run": run_dir.name,
        "seed": seed,
        "ensemble": ensemble,
        "size": size,
        "distance": distance,
        "selection": selection,
        "steps": steps,
        "keep": keep,
        "lambda-activation": lambda_activation,
        "aux": aux_dataset or None,
        "evaluator": judge_info,
        "targets": targets,
    }
    atomic_write_json(out / f"results-{ensemble}.json", summary)
    return summary


def _model(config: FedsimConfig, fed: Federation, state: dict) -> torch.nn.Module:
    model = _template(config, fed)
    model.load_state_dict(state)
    return model.eval()


def summary_lines(results: dict) -> list[str]:
    """The results as printable lines, one per attack and setting."""
    lines = []
    for key, attacks in results["results"].items():
        for name, report in attacks.items():
            lines.append(format_report(f"{key} {name}", report))
    return lines


__all__ = [
    "LEVELS",
    "MODES",
    "load_run",
    "membership_split",
    "recipe_trainer",
    "run_inversion",
    "run_membership",
    "summary_lines",
]
