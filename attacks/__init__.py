"""Gradient-inversion attacks of an honest-but-curious server: a registry of attack classes by name."""

from __future__ import annotations

from typing import Any

from attacks.analytic import Analytic
from attacks.base import (
    Attack,
    AttackDiverged,
    Reconstruction,
    gradients_from_update,
    model_gradients,
    reconstruct_many,
)
from attacks.contract import AttackTarget, Recipe
from attacks.dlg import DLG
from attacks.grnn import GRNN
from attacks.idlg import IDLG
from attacks.imprint import Imprint
from attacks.inverting_gradients import InvertingGradients
from attacks.labels import infer_labels
from attacks.trap import Trap
from fedsim.errors import FedsimError

ATTACKS: dict[str, type[Attack]] = {
    "dlg": DLG,
    "idlg": IDLG,
    "grnn": GRNN,
    "analytic": Analytic,
    "ig": InvertingGradients,
    "imprint": Imprint,
    "trap": Trap,
}


def get_attack(name: str, **options: Any) -> Attack:
    """An attack by registry name, configured by keyword options (see `ATTACKS[name].options()`)."""
    if name not in ATTACKS:
        raise FedsimError(f"unknown attack {name!r}; choose one of: {', '.join(ATTACKS)}")
    cls = ATTACKS[name]
    allowed = cls.options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise FedsimError(
            f"unknown option(s) for attack {name!r}: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    try:
        return cls(**options)
    except TypeError as exc:  # e.g. a value of the wrong type reaching a comparison
        raise FedsimError(f"bad option value for attack {name!r}: {exc}") from None


__all__ = [
    "ATTACKS",
    "Attack",
    "AttackDiverged",
    "AttackTarget",
    "Recipe",
    "Reconstruction",
    "get_attack",
    "gradients_from_update",
    "infer_labels",
    "model_gradients",
    "reconstruct_many",
]
