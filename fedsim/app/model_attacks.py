"""Model-level attacks on a finished run: SeqMIA membership inference and ensemble inversion, end to end.

Both read only what the curious server kept (captures/, model.safetensors, config.toml) plus data of its own:
for membership, examples of the same distribution that no client holds; for inversion, nothing (data-free) or a
public dataset. Scoring alone reads the clients' shards, rebuilt from the config, as the ground truth of
membership and of which classes a client holds, and trains the evaluation classifier. The procedures live in
attacks/seqmia_fl.py and attacks/ensemble_inversion_fl.py; this module loads their inputs and writes their results.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from attacks.contract import Recipe, RunTrajectory, load_trajectory, target_clients
from attacks.membership_metrics import format_report, membership_report, roc_png
from attacks.seqmia_fl import MODES, attack_run
from attacks.seqmia_sequences import LEVELS
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
    generator: str = "conditional",
) -> dict:
    """Ensemble inversion against single-model inversion of the last model; writes <run>/inversion/
    (results.json, and PNG grids of the kept images, one row per class).

    generator=conditional: fedsim's class-conditional G(z, c); unconditional: the paper's G(z) with DAFL's losses.

    ensemble=client: for each client k, its uploads over the rounds (single model: its last upload).
    ensemble=round: every client's upload of the last round (single model: the final global model).
    selection=fms picks `size` candidates by farthest model sampling; selection=recent the `size` most recent.
    The procedure is attacks.ensemble_inversion_fl.invert_run.
    """
    from attacks.ensemble_inversion import GENERATORS, InversionConfig
    from attacks.ensemble_inversion_fl import ENSEMBLES, SELECTIONS, auxiliary_images, concatenated, invert_run
    from attacks.inversion_eval import train_independent_evaluator
    from attacks.model_sampling import DISTANCES
    from fedsim.images import grid, png_bytes

    if generator not in GENERATORS:
        raise FedsimError(f"unknown generator {generator!r}; choose one of: {', '.join(GENERATORS)}")
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
    evaluator = _evaluator_for(config, evaluator)
    seed = config.seed if seed is None else seed
    fed = Federation.from_config(config)
    shape, num_classes = fed.data.input_shape, fed.data.num_classes
    _check_public(config, aux_dataset)
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
    cfg = InversionConfig(
        steps=steps, batch_size=batch_size, lambda_activation=lambda_activation, seed=seed, generator=generator
    )
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
        "generator": generator,
        "aux": aux_dataset or None,
        "evaluator": judge_info,
        "targets": targets,
    }
    atomic_write_json(out / f"results-{ensemble}.json", summary)
    return summary


def independent_members(fed: Federation, seed: int, progress: Progress = _quiet) -> list[dict]:
    """One model per shard of `fed`, each trained alone from its own initialisation (seed 1000 * seed + k) with
    the clients' own FedAvg code (clients/training.py) for local-epochs epochs: the paper's independently trained
    models, or as many one-client federations. Returns their state dicts, shard by shard."""
    from clients.training import train_fedavg

    cfg, states = fed.config, []
    for k in range(len(fed.shards)):
        model = build_model(cfg.model, fed.data.input_shape, fed.data.num_classes, seed=1000 * seed + k)
        x, y, _ = fed.shard(k)
        train_fedavg(model, x, y, cfg.lr, cfg.local_epochs, cfg.batch_size, np.random.default_rng([seed, 29, k]))
        states.append({name: v.detach().clone() for name, v in model.state_dict().items()})
        progress("members", k + 1, len(fed.shards))
    return states


def run_ensemble_sizes(
    config: FedsimConfig,
    *,
    sizes: tuple[int, ...] = (1, 2, 5, 10),
    generator: str = "unconditional",
    aux_datasets: tuple[str, ...] = ("",),
    aux_images: int = 0,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-2,
    width: int = 8,
    per_class: int = 16,
    keep: float = 0.5,
    lambda_activation: float = 0.1,
    lambda_entropy: float = 5.0,
    evaluator: str = "auto",
    evaluator_epochs: int = 0,
    out_dir: str | Path | None = None,
    progress: Progress = _quiet,
) -> dict:
    """The paper's setting: attack accuracy against ensemble size, on models trained independently.

    The pool is one model per client of `config` (`independent_members`: each on its own shard, from its own
    initialisation, never averaged); ensembles of each size in `sizes` are the first models of the farthest
    model sampling order, inverted data-free (aux "") and with each public auxiliary dataset of `aux_datasets`
    (its first `aux_images` training images; 0: all), scored by an independent evaluation classifier trained on
    the held-out test split. The procedure is attacks.ensemble_inversion_fl.ensemble_size_curve. Writes
    <out_dir>/results.json and one PNG grid of the kept images per prior and size when out_dir is given.
    """
    from attacks.ensemble_inversion import GENERATORS, InversionConfig
    from attacks.ensemble_inversion_fl import auxiliary_images, concatenated, ensemble_size_curve
    from attacks.inversion_eval import train_independent_evaluator
    from fedsim.images import grid, png_bytes

    if generator not in GENERATORS:
        raise FedsimError(f"unknown generator {generator!r}; choose one of: {', '.join(GENERATORS)}")
    if not sizes or any(n < 1 or n > config.num_clients for n in sizes):
        raise FedsimError(f"ensemble sizes {list(sizes)} must be between 1 and num-clients = {config.num_clients}")
    for name in aux_datasets:
        _check_public(config, name)
    evaluator = _evaluator_for(config, evaluator)
    fed = Federation.from_config(config)
    shape, num_classes, seed = fed.data.input_shape, fed.data.num_classes, config.seed
    priors = {name: auxiliary_images(name, config.data_dir, shape) if name else None for name in aux_datasets}
    priors = {k: v[:aux_images] if v is not None and aux_images else v for k, v in priors.items()}
    states = independent_members(fed, seed, progress)
    private = concatenated(list(_shards(fed, list(range(len(fed.shards)))).values()))
    test_x, test_y = fed.test_split()
    members_accuracy = [
        float((_model(config, fed, state)(test_x).argmax(1) == test_y).float().mean()) for state in states
    ]
    judge, judge_info = train_independent_evaluator(
        evaluator,
        (test_x, test_y),
        private,
        num_classes,
        epochs=evaluator_epochs,
        seed=seed + 5,
        progress=lambda d, t, _l: progress("evaluation classifier", d, t),
    )
    cfg = InversionConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        width=width,
        lambda_activation=lambda_activation,
        lambda_entropy=lambda_entropy,
        seed=seed,
        generator=generator,
    )
    summary: dict = {
        "seed": seed,
        "model": config.model,
        "members": len(states),
        "member-examples": [len(s) for s in fed.shards],
        "member-test-accuracy": members_accuracy,
        "generator": generator,
        "inversion": {**{k.replace("_", "-"): v for k, v in vars(cfg).items()}, "per-class": per_class, "keep": keep},
        "evaluator": judge_info,
        "priors": {},
    }
    for name, aux in priors.items():
        label = name or "data-free"
        curve, images = ensemble_size_curve(
            states,
            lambda state: _model(config, fed, state),
            judge,
            cfg,
            input_shape=shape,
            num_classes=num_classes,
            sizes=sizes,
            private=private,
            per_class=per_class,
            keep=keep,
            aux=aux,
            seed=seed,
            progress=lambda task, d, t, p=label: progress(f"{p}: {task}", d, t),
        )
        summary["priors"][label] = {"aux-images": 0 if aux is None else len(aux), **curve}
        if out_dir is not None:
            for key, kept in images.items():
                atomic_write_bytes(Path(out_dir) / f"{label}-{key}.png", png_bytes(grid(kept, columns=16)))
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "results.json", summary)
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
    "independent_members",
    "run_ensemble_sizes",
    "run_inversion",
    "run_membership",
    "summary_lines",
]


def _evaluator_for(config, evaluator: str) -> str:
    """The independent evaluator's architecture: `auto` picks one that is not the attacked model's."""
    if evaluator == "auto":
        evaluator = "lenet5" if config.model != "lenet5" else "convnet"
    if evaluator == config.model:
        raise FedsimError(f"the evaluator must be another architecture than the attacked model ({config.model!r})")
    return evaluator


def _check_public(config, aux_dataset: str | None) -> None:
    """An auxiliary (prior) dataset must not be the clients' own data."""
    if aux_dataset and aux_dataset.removeprefix("sample-") == config.dataset.removeprefix("sample-"):
        raise FedsimError(f"auxiliary dataset {aux_dataset!r} is the clients' own; choose a public, disjoint one")
