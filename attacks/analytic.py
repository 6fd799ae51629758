"""Closed-form input recovery through a first fully connected layer with bias (Phong et al. 2017, Fan et al. 2020).

For z = W x + b, dL/dW_i = dL/db_i · x for every unit i of one example, so x = dL/dW_i / dL/db_i
exactly. For a batch, row i sums the examples for which unit i passes gradient; a row that a
single example dominates (the others inactive behind a ReLU, say) still yields that example
exactly, so rows are turned into candidates, candidates that agree are clustered, and each
cluster is one recovered example.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from attacks.base import Attack, AttackTarget, Progress, Trial, observed_signal, trainable_parameters
from attacks.base import cross_entropy as _ce
from attacks.labels import infer_labels
from attacks.problems import attack_copy
from fedsim.errors import FedsimError


def first_linear(model: nn.Module, input_shape: Sequence[int]) -> nn.Linear:
    """The model's first layer, which must be nn.Linear with a trainable bias on the flattened input."""
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is None:
            continue  # containers and parameter-free layers (Flatten, activations)
        features = int(torch.tensor(list(input_shape)).prod())
        ok = isinstance(module, nn.Linear) and module.bias is not None and module.in_features == features
        params = trainable_parameters(model)
        if ok and len(params) >= 2 and params[0] is module.weight and params[1] is module.bias:
            return module
        raise FedsimError(
            f"the analytic attack needs a model whose first layer is fully connected with a trainable bias "
            f"(nn.Linear on the {features} flattened inputs); this model starts with {module}. "
            "Use dlg, idlg or grnn for it."
        )
    raise FedsimError("the analytic attack found no layer with parameters in the model")


def linear_input(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """The input of a linear layer for one example from its gradient, by least squares over the rows:
    x = Σ_i g_b[i]·g_W[i] / Σ_i g_b[i]² (dL/dW_i = dL/db_i · x for every unit i)."""
    return (bias_grad[:, None] * weight_grad).sum(0) / (bias_grad**2).sum()


class Analytic(Attack):
    """Exact reconstruction from the first linear layer; closed form, so restarts and seeds do not matter.

    Batch 1 recovers the input to float precision: x = Σ_i g_b[i]·g_W[i] / Σ_i g_b[i]² (least
    squares over all rows). Batches > 1 recover only the examples that own some rows alone.
    Empty slots (not enough single-example rows) are returned mid-grey and counted in info.
    """

    name = "analytic"
    batchable = False

    def __init__(
        self,
        *,
        min_bias_grad: float = 1e-6,
        cluster_tolerance: float = 1e-3,
        range_tolerance: float = 1e-3,
        cpu_threads: int | None = 1,
    ) -> None:
        super().__init__(cpu_threads=cpu_threads)
        self.min_bias_grad, self.cluster_tolerance, self.range_tolerance = (
            min_bias_grad,
            cluster_tolerance,
            range_tolerance,
        )

    def _solve(
        self, targets: Sequence[AttackTarget], *, seed: int, device: torch.device, progress: Progress | None
    ) -> tuple[list[list[Trial]], list[dict]]:
        trials, infos = [], []
        for target in targets:
            trial, info = self._attack(target, device)
            trials.append([trial])
            infos.append(info)
            if progress:
                progress(0, trial.loss)
        return trials, infos

    def _attack(self, target: AttackTarget, device: torch.device) -> tuple[Trial, dict]:
        first_linear(target.model, target.input_shape)
        model = attack_copy(target.model, device)
        objective, signal = observed_signal(target, unroll=False)
        n = target.batch_size if objective == "gradient" else (target.recipe.num_examples or target.batch_size)
        g_w = signal[0].detach().to(device).double()  # float64: keep the division exact
        g_b = signal[1].detach().to(device).double()
        rows = (g_b.abs() > self.min_bias_grad * g_b.abs().max()).nonzero().squeeze(1)
        if rows.numel() == 0:
            raise FedsimError("analytic attack: the first layer's bias gradient is zero; nothing leaks")
        clusters = self._clusters(g_w[rows] / g_b[rows, None], rows)
        images, owners = [], []
        for members in clusters[:n]:
            x = linear_input(g_w[members], g_b[members])
            images.append(x.view(*target.input_shape))
            owners.append(members)
        missing = n - len(images)
        images += [torch.full(tuple(target.input_shape), 0.5, dtype=torch.float64, device=device)] * missing
        x = torch.stack(images)
        labels, method = self._labels(target, model, x[: len(owners)], owners, g_b, n, signal)
        loss = self._loss(model, x, labels, signal)
        history = [{"iteration": 0, "loss": loss, "evaluations": 1}]
        trial = Trial(x.float().cpu(), labels, loss, history, [(0, x.clamp(0, 1).float().cpu())], 1)
        info = {
            "objective": objective,
            "label_method": method,
            "attack": self.name,
            "recovered": len(owners),
            "missing": missing,
            "rows_used": int(rows.numel()),
            "cluster_sizes": [len(c) for c in clusters],
        }
        return trial, info

    def _clusters(self, candidates: torch.Tensor, rows: torch.Tensor) -> list[torch.Tensor]:
        """Group rows whose candidate inputs agree; plausible (inside [0, 1]) and large clusters first."""
        lo, hi = -self.range_tolerance, 1 + self.range_tolerance
        plausible = ((candidates >= lo) & (candidates <= hi)).all(1)
        reps: list[torch.Tensor] = []
        members: list[list[int]] = []
        scale = candidates.shape[1] ** 0.5
        for j in range(candidates.shape[0]):
            if not plausible[j]:
                continue
            for c, rep in enumerate(reps):
                if torch.linalg.vector_norm(candidates[j] - rep) / scale < self.cluster_tolerance:
                    members[c].append(j)
                    break
            else:
                reps.append(candidates[j])
                members.append([j])
        members.sort(key=len, reverse=True)
        return [rows[torch.tensor(m, device=rows.device)] for m in members]

    def _labels(
        self,
        target: AttackTarget,
        model: nn.Module,
        x: torch.Tensor,
        owners: list[torch.Tensor],
        g_b: torch.Tensor,
        n: int,
        signal: list[torch.Tensor],
    ) -> tuple[torch.Tensor, str]:
        """Each recovered example's label: the class whose single-example bias gradient reproduces B·g_b
        on the rows that example owns (exact when those rows are its alone)."""
        if target.labels is not None:
            return target.labels.detach().long().cpu(), "given"
        if len(owners) < n:
            return infer_labels(target.model, signal, n, target.num_classes, tuple(target.input_shape)).labels, "bias"
        bias = trainable_parameters(model)[1]
        labels = []
        for xi, rows in zip(x, owners, strict=True):
            errors = []
            for c in range(target.num_classes):
                loss = _ce(model(xi[None].to(bias.dtype)), torch.tensor([c], device=x.device))
                (gb,) = torch.autograd.grad(loss, [bias])
                errors.append(float(((gb.double()[rows] - n * g_b[rows]) ** 2).sum()))
            labels.append(int(torch.tensor(errors).argmin()))
        return torch.tensor(labels, dtype=torch.long), "analytic-rows"

    def _loss(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, signal: list[torch.Tensor]) -> float:
        """Gradient distance of the reconstruction, reported like the other attacks' final loss."""
        weight = trainable_parameters(model)[0]
        loss = _ce(model(x.to(weight.device, weight.dtype)), labels.to(weight.device))
        grads = torch.autograd.grad(loss, trainable_parameters(model))
        return float(
            sum(((a.double() - b.to(a.device).double()) ** 2).sum() for a, b in zip(grads, signal, strict=True))
        )
