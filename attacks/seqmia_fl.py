"""SeqMIA against federated learning (Li et al., CCS 2024, on a run's captured trajectory): the procedure.

For each target client the server replays the client's rounds with shadow data of its own (attacks/seqmia_shadow.py),
learns an attack model on the shadow members' and non-members' metric sequences, and scores the real queries'
sequences over the captured trajectory (attacks/seqmia_sequences.py), at client level (the client's uploads) and at
global level (the global models). The black-box mode attacks the final models alone (attacks/seqmia_blackbox.py).
The scores, calibrated and raw, are collected in `MembershipScores` (attacks/seqmia_scores.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from attacks.contract import RunTrajectory
from attacks.membership_metrics import calibrated_scores, membership_report
from attacks.seqmia import train_attack_model
from attacks.seqmia_blackbox import BlackBox, Progress
from attacks.seqmia_scores import MembershipScores, calibration_references, level_scores, member_mask
from attacks.seqmia_sequences import real_sequences
from attacks.seqmia_shadow import TrainFn, shadow_dataset, shadow_sizes

Data = tuple[torch.Tensor, torch.Tensor]
MODES = ("fl", "blackbox")


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
            truth = member_mask(len(queries), len(my))
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
