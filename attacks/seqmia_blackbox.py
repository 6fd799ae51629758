"""SeqMIA's black-box mode (the paper's) against final models: distillation snapshots stand in for a target's
training trajectory, and a shadow federation shaped like the run teaches the attack models."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.contract import Recipe, RunTrajectory, StateDict
from attacks.seqmia import Progress as StepProgress
from attacks.seqmia import SeqMIAClassifier, metric_sequences, train_attack_model
from attacks.seqmia_sequences import loaded_models
from attacks.seqmia_shadow import TrainFn
from fedsim.errors import FedsimError

Progress = Callable[[str, int, int], None]  # (task, done, total)


def distill_snapshots(
    target: nn.Module,
    student: nn.Module,
    x: torch.Tensor,
    *,
    epochs: int = 20,
    lr: float = 0.05,
    batch_size: int = 100,
    seed: int = 0,
    progress: StepProgress | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Distil `target` into `student` on unlabelled data `x`, keeping a snapshot after every epoch.

    As in the paper's code: soft labels = the target's softmax, cross-entropy with them, SGD with momentum 0.9,
    weight decay 5e-4 on weights, the lr times 0.9 every 5 epochs. Returns `epochs` state dicts, oldest first.
    """
    dev = next(student.parameters()).device
    target.eval()
    with torch.no_grad():
        soft = torch.cat([F.softmax(target(x[s : s + 512].to(dev)), dim=1).cpu() for s in range(0, len(x), 512)])
    decay = [p for n, p in student.named_parameters() if not n.endswith("bias") and "bn" not in n]
    no_decay = [p for n, p in student.named_parameters() if n.endswith("bias") or "bn" in n]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.9)
    rng = np.random.default_rng([seed, 11])
    snapshots = []
    student.train()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(student(x[idx].to(dev)), soft[idx].to(dev))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        scheduler.step()
        snapshots.append({k: v.detach().cpu().clone() for k, v in student.state_dict().items()})
        if progress is not None:
            progress(epoch + 1, epochs, total / len(x))
    return snapshots


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
        return metric_sequences(loaded_models(self.template, [*snaps, final_state]), x, y)

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
