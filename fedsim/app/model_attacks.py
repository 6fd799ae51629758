"""Model-level attacks on a finished run: SeqMIA membership inference and ensemble inversion, end to end.

Both read only what the curious server kept (captures/, model.safetensors, config.toml) plus data of its own:
for membership, examples of the same distribution that no client holds; for inversion, nothing (data-free) or a
public dataset. Scoring alone reads the clients' shards, rebuilt from the config, as the ground truth of
membership and of which classes a client holds, and trains the evaluation classifier.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from attacks.membership_metrics import format_report, membership_report, roc_png
from attacks.seqmia import loss_baselines, train_attack_model
from attacks.seqmia_fl import LEVELS, BlackBox, RunTrajectory, real_sequences, shadow_dataset
from fedsim.captures import CaptureStore
from fedsim.config import FedsimConfig
from fedsim.datasets import to_float
from fedsim.errors import FedsimError
from fedsim.federation import Federation
from fedsim.files import atomic_write_bytes, atomic_write_json, load_tensors, save_tensors
from fedsim.models import build_model

Progress = Callable[[str, int, int], None]  # (task, done, total)
MODES = ("fl", "blackbox")


def _quiet(task: str, done: int, total: int) -> None:
    return None


# ----------------------------------------------------------------------------------------------
# Reading a run
# ----------------------------------------------------------------------------------------------


def load_run(run_dir: str | Path) -> tuple[FedsimConfig, RunTrajectory]:
    """The run's config and every captured model, by round and by client (partition id)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FedsimError(f"{run_dir} is not a fedsim run folder (no config.toml); give runs/<run-id>")
    config = FedsimConfig.from_toml(run_dir / "config.toml")
    store = CaptureStore(run_dir / "captures")
    globals_ = {r["round"]: store.load(r) for r in store.records("global")}
    updates = [r for r in store.records("update") if r.get("partition_id") is not None]
    if not globals_ or not updates:
        raise FedsimError(
            f"{run_dir / 'captures'} holds no captured global models or client updates; run with capture = true"
        )
    if not (run_dir / "model.safetensors").is_file():
        raise FedsimError(f"{run_dir} has no model.safetensors: the run did not finish")
    run = RunTrajectory(sorted(globals_), globals_, load_tensors(run_dir / "model.safetensors"), {}, {}, {})
    totals: dict[int, int] = {}
    for record in updates:
        totals[record["round"]] = totals.get(record["round"], 0) + int(record["num_examples"])
    for record in updates:
        k, r = int(record["partition_id"]), int(record["round"])
        run.uploads.setdefault(k, {})[r] = store.load(record)
        run.weights.setdefault(k, {})[r] = int(record["num_examples"]) / max(totals[r], 1)
        run.recipes[r] = dict(record.get("recipe") or {})
        run.shard_sizes[k] = max(run.shard_sizes.get(k, 0), int(record["num_examples"]))
    for r in run.rounds:
        run.recipes.setdefault(r, dict(store.global_record(r).get("recipe") or {}))
    return config, run


def recipe_trainer(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: dict, rng: np.random.Generator
) -> None:
    """Replay a captured recipe with the clients' own training code (clients/training.py)."""
    from clients.training import fedsgd_batch, train_fedavg, train_fedsgd

    lr, batch = float(recipe.get("lr", 0.1)), int(recipe.get("batch-size", 32))
    if recipe.get("recipe") == "fedsgd":
        chosen = torch.from_numpy(fedsgd_batch(len(x), min(batch, len(x)), rng))
        train_fedsgd(model, x[chosen], y[chosen], lr)
    else:
        mu = float(recipe.get("proximal-mu", 0.0))
        train_fedavg(model, x, y, lr, int(recipe.get("local-epochs", 1)), batch, rng, mu)


def _template(config: FedsimConfig, fed: Federation) -> torch.nn.Module:
    return build_model(config.model, fed.data.input_shape, fed.data.num_classes, seed=config.seed)


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


def _score_level(classifier, queries: np.ndarray) -> dict[str, np.ndarray]:
    return {"seqmia": classifier.score(queries), **loss_baselines(queries)}


def run_membership(
    run_dir: str | Path,
    *,
    modes: tuple[str, ...] = ("fl",),
    clients: list[int] | None = None,
    num_shadows: int = 4,
    epochs: int = 150,
    distill_epochs: int = 10,
    max_nonmembers: int = 2000,
    seed: int | None = None,
    progress: Progress = _quiet,
) -> dict:
    """SeqMIA against a run, with the two loss baselines, at client and global level; writes <run>/membership/.

    fl: sequences over the captured trajectory, attack model learnt from the server's shadow replays.
    blackbox: the paper's mode against the final models: distillation snapshots and a shadow federation.
    """
    for mode in modes:
        if mode not in MODES:
            raise FedsimError(f"unknown membership mode {mode!r}; choose from: {', '.join(MODES)}")
    run_dir = Path(run_dir)
    config, run = load_run(run_dir)
    seed = config.seed if seed is None else seed
    fed = Federation.from_config(config)
    template = _template(config, fed)
    clients = _clients(run, clients)
    split = membership_split(fed, seed, max_nonmembers)
    aux_x, aux_y = split["aux"]
    non_x, non_y = split["nonmembers"]
    notes: list[str] = []
    sizes = _shadow_sizes(run, clients, len(aux_y), notes)
    scores: dict[str, dict[str, list]] = {}  # "<mode>/<level>" -> attack -> [(scores, is_member)]

    def add(key: str, attack_scores: dict[str, np.ndarray], n_members: int) -> None:
        truth = np.r_[np.ones(n_members, bool), np.zeros(len(next(iter(attack_scores.values()))) - n_members, bool)]
        for name, s in attack_scores.items():
            scores.setdefault(key, {}).setdefault(name, []).append((s, truth))

    per_client: dict[str, dict] = {}
    if "fl" in modes:
        global_train: list[tuple[np.ndarray, np.ndarray]] = []
        non_cache: dict[int, np.ndarray] = {}
        for i, k in enumerate(clients):
            shadows = shadow_dataset(
                template,
                run,
                k,
                aux_x,
                aux_y,
                recipe_trainer,
                num_shadows=num_shadows,
                seed=seed + 101 * k,
                size=sizes[k],
                progress=lambda d, t, k=k: progress(f"shadow replays of client {k}", d, t),
            )
            global_train.append(shadows["global"])
            classifier = train_attack_model(
                *shadows["client"],
                epochs=epochs,
                seed=seed + k,
                progress=lambda d, t, _l, k=k: progress(f"attack model of client {k}", d, t),
            )
            mx, my, _ = fed.shard(k)
            queries = np.concatenate(
                [
                    real_sequences(template, run, "client", mx, my, seat=k),
                    real_sequences(template, run, "client", non_x, non_y, seat=k, cache=non_cache),
                ]
            )
            level_scores = _score_level(classifier, queries)
            add("fl/client", level_scores, len(my))
            per_client[str(k)] = _reports(level_scores, len(my))
            progress("clients", i + 1, len(clients))
        seqs = np.concatenate([s for s, _ in global_train])
        labels = np.concatenate([lab for _, lab in global_train])
        classifier = train_attack_model(
            seqs, labels, epochs=epochs, seed=seed, progress=lambda d, t, _l: progress("global attack model", d, t)
        )
        members = [fed.shard(k) for k in sorted(run.uploads)]
        mx, my = torch.cat([m[0] for m in members]), torch.cat([m[1] for m in members])
        queries = np.concatenate(
            [
                real_sequences(template, run, "global", mx, my),
                real_sequences(template, run, "global", non_x, non_y, cache=non_cache),
            ]
        )
        add("fl/global", _score_level(classifier, queries), len(my))
    if "blackbox" in modes:
        _blackbox(config, fed, run, clients, split, distill_epochs, epochs, seed, add, notes, progress)

    results = {
        "run": run_dir.name,
        "seed": seed,
        "clients": clients,
        "num-shadows": num_shadows,
        "notes": notes,
        "results": {},
        "per-client": per_client,
    }
    out = run_dir / "membership"
    tensors = {}
    for key, attacks in scores.items():
        pooled = {
            name: (np.concatenate([s for s, _ in parts]), np.concatenate([m for _, m in parts]))
            for name, parts in attacks.items()
        }
        results["results"][key] = {name: membership_report(s, m) for name, (s, m) in pooled.items()}
        atomic_write_bytes(out / f"roc-{key.replace('/', '-')}.png", roc_png(pooled, f"{run_dir.name}: {key}"))
        for name, (s, m) in pooled.items():
            tensors[f"{key}/{name}/scores"] = torch.from_numpy(s)
            tensors[f"{key}/{name}/is-member"] = torch.from_numpy(m.astype(np.uint8))
    save_tensors(out / "scores.safetensors", tensors)
    atomic_write_json(out / "results.json", results)
    return results


def _reports(level_scores: dict[str, np.ndarray], n_members: int) -> dict:
    n = len(next(iter(level_scores.values())))
    truth = np.r_[np.ones(n_members, bool), np.zeros(n - n_members, bool)]
    return {name: membership_report(s, truth) for name, s in level_scores.items()}


def _clients(run: RunTrajectory, clients: list[int] | None) -> list[int]:
    known = sorted(run.uploads)
    if clients is None:
        return known
    for k in clients:
        if k not in run.uploads:
            raise FedsimError(f"client {k} sent no update in this run; clients with updates: {known}")
    return list(clients)


def _shadow_sizes(run: RunTrajectory, clients: list[int], aux: int, notes: list[str]) -> dict[int, int]:
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


def _blackbox(config, fed, run, clients, split, distill_epochs, epochs, seed, add, notes, progress) -> None:
    """The paper's black-box mode (attacks/seqmia_fl.py's BlackBox) against the final global model and each
    client's last upload."""
    non_x, non_y = split["nonmembers"]
    box = BlackBox(
        lambda s: build_model(config.model, fed.data.input_shape, fed.data.num_classes, seed=s),
        run,
        *split["aux"],
        recipe_trainer,
        distill_epochs=distill_epochs,
        epochs=epochs,
        seed=seed,
        progress=progress,
    )
    notes.extend(box.notes)
    members = [fed.shard(k) for k in sorted(run.uploads)]
    mx, my = torch.cat([m[0] for m in members]), torch.cat([m[1] for m in members])
    queries = box.sequences(run.final, torch.cat([mx, non_x]), torch.cat([my, non_y]), "final global model")
    add("blackbox/global", _score_level(box.classifier("global"), queries), len(my))
    for k in clients:
        mx, my, _ = fed.shard(k)
        last = run.uploads[k][max(run.uploads[k])]
        queries = box.sequences(last, torch.cat([mx, non_x]), torch.cat([my, non_y]), f"client {k}'s last model")
        add("blackbox/client", _score_level(box.classifier("client"), queries), len(my))


# ----------------------------------------------------------------------------------------------
# Ensemble inversion
# ----------------------------------------------------------------------------------------------

ENSEMBLES = ("client", "round")
DISTANCES = ("weights", "outputs")
SELECTIONS = ("fms", "recent")


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
    """
    from attacks.ensemble_inversion import (
        InversionConfig,
        auxiliary_images,
        farthest_model_sampling,
        fms_distances,
        generate,
        train_generator,
    )
    from attacks.inversion_eval import attack_accuracy, nearest_private_distance, train_independent_evaluator
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
    private_all = _private(fed, sorted(run.uploads))
    judge, judge_info = train_independent_evaluator(
        evaluator,
        (to_float(fed.data.test_x), fed.data.test_y),
        private_all,
        num_classes,
        epochs=evaluator_epochs,
        seed=seed + 5,
        progress=lambda d, t, _l: progress("evaluation classifier", d, t),
    )
    cfg = InversionConfig(steps=steps, batch_size=batch_size, lambda_activation=lambda_activation, seed=seed)
    out, targets = run_dir / "inversion", {}
    for k in _clients(run, clients) if ensemble == "client" else [None]:
        if k is not None:
            rounds = run.seat_rounds(k)
            candidates, last, (px, py) = (
                [run.uploads[k][r] for r in rounds],
                run.uploads[k][rounds[-1]],
                _private(fed, [k]),
            )
        else:
            candidates = [u[run.rounds[-1]] for u in run.uploads.values() if run.rounds[-1] in u]
            last, (px, py) = run.final, private_all
        models = [_model(config, fed, state) for state in candidates]
        probe = aux if aux is not None else torch.rand(256, *shape, generator=torch.Generator().manual_seed(seed))
        distances = fms_distances(distance, candidates, models, probe)
        n = min(size, len(models))
        chosen = farthest_model_sampling(distances, n) if selection == "fms" else list(range(len(models)))[-n:][::-1]
        classes = sorted(int(c) for c in py.unique())
        name = f"client-{k}" if k is not None else "round"
        entry: dict = {"candidates": len(candidates), "chosen": chosen, "classes": classes}
        for variant, members in (("ensemble", [models[i] for i in chosen]), ("single", [_model(config, fed, last)])):
            generator = train_generator(
                members,
                shape,
                num_classes,
                cfg,
                aux,
                progress=lambda d, t, _p, v=variant, n=name: progress(f"{n}: {v} inversion", d, t),
            )
            images, labels, _ = generate(generator, members, classes, per_class, keep, seed)
            nearest = nearest_private_distance(images, labels, px, py)
            entry[variant] = {
                **attack_accuracy(judge, images, labels),
                "models": len(members),
                "nearest-private-rmse": float(np.nanmean(nearest)),
            }
            columns = min(16, max(1, round(per_class * keep)))
            atomic_write_bytes(out / f"{name}-{variant}.png", png_bytes(grid(images, columns=columns)))
        entry["gain"] = entry["ensemble"]["accuracy"] - entry["single"]["accuracy"]
        targets[name] = entry
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


def _private(fed: Federation, clients: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    shards = [fed.shard(k) for k in clients]
    return torch.cat([s[0] for s in shards]), torch.cat([s[1] for s in shards])


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
