"""Ensemble Inversion's procedures: over a federated run's trajectory (`invert_run`: a client's uploads, or a round's
uploads, against single-model inversion of the last model) and over any pool of models (`ensemble_size_curve`),
each inversion scored by an independent judge. The objective and the generator's training are in
attacks/ensemble_inversion.py, farthest model sampling in attacks/model_sampling.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.contract import RunTrajectory, StateDict
from attacks.dcgan import ConditionalGenerator
from attacks.ensemble_inversion import InversionConfig, Progress, generate, generate_unconditional, train_generator
from attacks.inversion_eval import attack_accuracy, nearest_private_distance
from attacks.model_sampling import farthest_model_sampling, fms_distances
from fedsim.errors import FedsimError

ENSEMBLES = ("client", "round")
SELECTIONS = ("fms", "recent")
RunProgress = Callable[[str, int, int], None]  # (task, done, total)


def auxiliary_images(name: str, data_dir: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """A public dataset as the generator's prior: its training images in [0, 1], resized and re-channelled."""
    from fedsim.datasets import LOADERS, load_dataset, to_float

    if name not in LOADERS:
        raise FedsimError(f"unknown auxiliary dataset {name!r}; choose one of: {', '.join(LOADERS)}")
    x = to_float(load_dataset(name, data_dir).train_x)
    if x.shape[1] != shape[0]:
        x = x.mean(dim=1, keepdim=True).expand(-1, shape[0], -1, -1).contiguous()
    if tuple(x.shape[2:]) != tuple(shape[1:]):
        x = F.interpolate(x, size=tuple(shape[1:]), mode="bilinear", antialias=True)
    return x


def pool_distances(
    distance: str,
    states: Sequence[StateDict],
    models: Sequence[nn.Module],
    aux: torch.Tensor | None,
    input_shape: tuple[int, int, int],
    seed: int,
) -> np.ndarray:
    """The pairwise FMS distances of a pool of models; output distances are measured on the auxiliary images, or
    without them on 256 seeded uniform-noise images."""
    probe = aux if aux is not None else torch.rand(256, *input_shape, generator=torch.Generator().manual_seed(seed))
    return fms_distances(distance, states, models, probe)


def invert_run(
    run: RunTrajectory,
    load_model: Callable[[StateDict], nn.Module],
    private: dict[int, tuple[torch.Tensor, torch.Tensor]],
    judge: nn.Module,
    config: InversionConfig,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    ensemble: str,
    clients: list[int],
    size: int,
    distance: str,
    selection: str,
    per_class: int,
    keep: float,
    aux: torch.Tensor | None,
    seed: int,
    progress: RunProgress,
) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """Ensemble inversion against single-model inversion of the last model, for each target of `ensemble`.

    ensemble=client: for each of `clients`, its uploads over the rounds (single model: its last upload).
    ensemble=round: every client's upload of the last round (single model: the final global model).
    selection=fms picks `size` candidates by farthest model sampling; selection=recent the `size` most recent.
    `load_model(state)` is the run's architecture with those weights. `private` holds each client's private data
    and `judge` an independent classifier: the scoring side, and which classes a target holds.
    Returns (target -> scores, "<target>-<variant>" -> the kept images, class by class).
    """
    invert = inversion(judge, config, input_shape, num_classes, per_class, keep, aux, seed)
    targets, images_of = {}, {}
    everyone = concatenated([private[k] for k in sorted(run.uploads)])
    for k in clients if ensemble == "client" else [None]:
        if k is not None:
            rounds = run.client_rounds(k)
            candidates, last, (px, py) = [run.uploads[k][r] for r in rounds], run.uploads[k][rounds[-1]], private[k]
        else:
            candidates = [u[run.rounds[-1]] for u in run.uploads.values() if run.rounds[-1] in u]
            last, (px, py) = run.final, everyone
        models = [load_model(state) for state in candidates]
        distances = pool_distances(distance, candidates, models, aux, input_shape, seed)
        n = min(size, len(models))
        chosen = farthest_model_sampling(distances, n) if selection == "fms" else list(range(len(models)))[-n:][::-1]
        classes = sorted(int(c) for c in py.unique())
        name = f"client-{k}" if k is not None else "round"
        entry: dict = {"candidates": len(candidates), "chosen": chosen, "classes": classes}
        for variant, members in (("ensemble", [models[i] for i in chosen]), ("single", [load_model(last)])):
            entry[variant], images_of[f"{name}-{variant}"] = invert(
                members,
                classes=classes,
                private=(px, py),
                progress=lambda d, t, _p, v=variant, n=name: progress(f"{n}: {v} inversion", d, t),
            )
        entry["gain"] = entry["ensemble"]["accuracy"] - entry["single"]["accuracy"]
        targets[name] = entry
    return targets, images_of


def inversion(
    judge: nn.Module,
    config: InversionConfig,
    input_shape: tuple[int, int, int],
    num_classes: int,
    per_class: int,
    keep: float,
    aux: torch.Tensor | None,
    seed: int,
) -> Callable[..., tuple[dict, torch.Tensor]]:
    """`invert_members` with the settings every inversion of one procedure shares; the call gives the members,
    `classes`, `private` and `progress`."""
    return partial(
        invert_members,
        judge=judge,
        config=config,
        input_shape=input_shape,
        num_classes=num_classes,
        per_class=per_class,
        keep=keep,
        aux=aux,
        seed=seed,
    )


def invert_members(
    members: Sequence[nn.Module],
    judge: nn.Module,
    config: InversionConfig,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    classes: Sequence[int],
    per_class: int,
    keep: float,
    aux: torch.Tensor | None,
    private: tuple[torch.Tensor, torch.Tensor],
    seed: int,
    progress: Progress | None = None,
) -> tuple[dict, torch.Tensor]:
    """One inversion of `members` (an ensemble, or one model), scored by the independent `judge`.

    conditional: `per_class` images of each of `classes`, each labelled with the class it was asked for.
    unconditional: per_class * len(classes) images, each labelled with the ensemble's prediction.
    Both through the activation filter (`keep`). Attack accuracy is the share of kept images the judge assigns
    to their label; `labels` counts the kept images per label (an unconditional generator may miss classes).
    Returns (scores, the kept images, label by label).
    """
    generator = train_generator(members, input_shape, num_classes, config, aux, progress=progress)
    if isinstance(generator, ConditionalGenerator):
        images, labels, _ = generate(generator, members, classes, per_class, keep, seed)
    else:
        images, labels, _ = generate_unconditional(generator, members, per_class * len(classes), keep, seed)
    nearest = nearest_private_distance(images, labels, *private)
    counts = {int(c): int((labels == c).sum()) for c in labels.unique(sorted=True)}
    return {
        **attack_accuracy(judge, images, labels),
        "models": len(members),
        "generator": config.generator,
        "labels": counts,
        "classes-covered": len(counts),
        "nearest-private-rmse": float(np.nanmean(nearest)),
    }, images


def ensemble_size_curve(
    states: Sequence[StateDict],
    load_model: Callable[[StateDict], nn.Module],
    judge: nn.Module,
    config: InversionConfig,
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    sizes: Sequence[int],
    private: tuple[torch.Tensor, torch.Tensor],
    per_class: int,
    keep: float,
    aux: torch.Tensor | None,
    distance: str = "weights",
    seed: int = 0,
    progress: RunProgress | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Attack accuracy against ensemble size: for each size n, the first n models of the farthest-model-sampling
    order of the pool `states` (greedy max-min weight distance from the pool's last model, so each ensemble holds
    the smaller ones), inverted with the same generator, losses, steps and seed, scored by the judge.

    The pool is any set of models of one architecture that share the classes: independently trained models (the
    paper's setting), or the uploads of a run. `private` holds the images the pool was trained on (scoring only).
    Returns ({"order": FMS order, "distances": pairwise weight distances, "sizes": {n: scores}}, "size-<n>" ->
    the kept images).
    """
    if not states:
        raise FedsimError("the ensemble-size curve needs at least one model in the pool")
    bad = [n for n in sizes if not 1 <= n <= len(states)]
    if bad:
        raise FedsimError(f"ensemble sizes {bad} are not between 1 and the pool's {len(states)} models")
    models = [load_model(state) for state in states]
    distances = pool_distances(distance, states, models, aux, input_shape, seed)
    order = farthest_model_sampling(distances, max(sizes))
    classes = sorted(int(c) for c in private[1].unique())
    invert = inversion(judge, config, input_shape, num_classes, per_class, keep, aux, seed)
    results: dict = {"order": order, "distances": np.round(distances, 4).tolist(), "sizes": {}}
    images_of = {}
    for n in sizes:
        results["sizes"][n], images_of[f"size-{n}"] = invert(
            [models[i] for i in order[:n]],
            classes=classes,
            private=private,
            progress=None if progress is None else lambda d, t, _p, n=n: progress(f"{n} models", d, t),
        )
    return results, images_of


def concatenated(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several (images, labels) data sets as one."""
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
