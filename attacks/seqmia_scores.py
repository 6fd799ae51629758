"""What a SeqMIA run scores: SeqMIA's and the loss baselines' scores of query sequences, the shadow non-members
they are calibrated against, and `MembershipScores`, every setting's scores with who is a member."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from attacks.membership_metrics import spread
from attacks.seqmia import SeqMIAClassifier, loss_baselines


@dataclass
class MembershipScores:
    """Every attack's scores by setting ("<mode>/<level>"), each part with who is a member, and what was noted.

    `parts` holds the scores that are pooled into one ROC per setting: at the FL client level each client's
    scores calibrated against its own attack model's held-out shadow non-members (one scale for all clients);
    `raw_parts` the same settings' uncalibrated scores, each client's on its own attack model's scale.
    """

    parts: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = field(default_factory=dict)
    raw_parts: dict[str, dict[str, list[tuple[np.ndarray, np.ndarray]]]] = field(default_factory=dict)
    per_client: dict[str, dict] = field(default_factory=dict)  # client -> attack -> report, FL client level
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time by phase (shadow replays, attack models)

    def timed(self, phase: str, start: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def add(self, key: str, attack_scores: dict[str, np.ndarray], n_members: int, raw: bool = False) -> None:
        """Scores of queries whose first `n_members` are members (raw=True: the uncalibrated ones)."""
        parts = self.raw_parts if raw else self.parts
        for name, s in attack_scores.items():
            parts.setdefault(key, {}).setdefault(name, []).append((s, member_mask(len(s), n_members)))

    def pooled(self, raw: bool = False) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """setting -> attack -> (scores, is_member), every part of a setting together."""
        return {
            key: {
                name: (np.concatenate([s for s, _ in parts]), np.concatenate([m for _, m in parts]))
                for name, parts in attacks.items()
            }
            for key, attacks in (self.raw_parts if raw else self.parts).items()
        }

    def per_client_spread(self) -> dict[str, dict]:
        """attack -> mean, spread, min and max over the clients of their own reports (FL client level)."""
        if not self.per_client:
            return {}
        names = next(iter(self.per_client.values()))
        return {name: spread([reports[name] for reports in self.per_client.values()]) for name in names}


def member_mask(n: int, n_members: int) -> np.ndarray:
    """Who is a member among `n` queries whose first `n_members` are members."""
    return np.r_[np.ones(n_members, bool), np.zeros(n - n_members, bool)]


def level_scores(classifier: SeqMIAClassifier, queries: np.ndarray) -> dict[str, np.ndarray]:
    """SeqMIA's scores of query sequences, and the two loss baselines'."""
    return {"seqmia": classifier.score(queries), **loss_baselines(queries)}


def calibration_references(
    classifier: SeqMIAClassifier, sequences: np.ndarray, labels: np.ndarray, notes: list[str]
) -> dict[str, np.ndarray]:
    """Each attack's scores of shadow non-members it never learnt from: the reference its scores are calibrated
    against. SeqMIA: the non-members of the attack model's held-out validation share; the loss baselines learn
    nothing, so every shadow non-member. With fewer than 2 held-out non-members SeqMIA falls back to every shadow
    non-member (noted: its training non-members score lower than unseen ones, which skews the scale)."""
    held = classifier.held_out[labels[classifier.held_out] == 0]
    if len(held) < 2:
        held = np.flatnonzero(labels == 0)
        notes.append("too few held-out shadow non-members: SeqMIA's scores calibrated on its training non-members")
    return {"seqmia": classifier.score(sequences[held]), **loss_baselines(sequences[labels == 0])}
