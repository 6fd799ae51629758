"""Improved DLG (Zhao, Mopuri, Bilen 2020): infer the labels from the last layer, then optimise images alone."""

from __future__ import annotations

import torch

from attacks.base import AttackTarget
from attacks.dlg import DLG
from attacks.labels import METHODS, infer_labels
from fedsim.errors import FedsimError


class IDLG(DLG):
    """iDLG: step 1 reads the labels off the last layer's gradient (attacks.labels), step 2 is DLG
    with the labels fixed, so L-BFGS optimises the dummy images only (same defaults as DLG).

    Labels given in the target (`AttackTarget.labels`) are used as they are.
    """

    name = "idlg"
    optimise_labels = False

    def __init__(self, *, label_method: str = "auto", **options: object) -> None:
        if label_method not in METHODS:
            raise FedsimError(f"idlg: unknown label_method {label_method!r}; choose one of: {', '.join(METHODS)}")
        super().__init__(**options)  # type: ignore[arg-type]
        self.label_method = label_method

    def _fixed_labels(self, target: AttackTarget, observed: list[torch.Tensor]) -> tuple[torch.Tensor, str]:
        return target_labels(target, observed, self.label_method, self.name)


def target_labels(
    target: AttackTarget, observed: list[torch.Tensor], method: str, attack: str
) -> tuple[torch.Tensor, str]:
    """The labels of a target's examples: given in the target, else inferred from its last layer (attacks.labels)."""
    n = target.batch_size
    if target.recipe.fedavg or target.gradients is None:
        n = target.recipe.num_examples or n
    if target.labels is not None:
        if target.labels.numel() != n:
            raise FedsimError(f"{attack}: target has {target.labels.numel()} labels for {n} examples")
        return target.labels.detach().long().cpu(), "given"
    estimate = infer_labels(target.model, observed, n, target.num_classes, tuple(target.input_shape), method=method)
    return estimate.labels, estimate.method
