"""Which client updates the curious server keeps each round: all, a seeded sample, or named partitions."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass

POLICIES = ("all", "sample", "partitions")
DTYPES = ("float32", "float16")


def parse_partitions(text: str) -> tuple[int, ...]:
    """The partition ids of a comma-separated list such as "0,3,7" (ValueError if one is not an integer)."""
    return tuple(int(part) for part in text.split(",") if part.strip())


def rank(seed: int, server_round: int, partition_id: int) -> int:
    """A client's place in the round's draw: a hash of run seed, round and partition id, the same on every machine."""
    digest = hashlib.sha256(f"fedsim-capture:{seed}:{server_round}:{partition_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True)
class CapturePolicy:
    """What to capture of a round's replies.

    "all" keeps every update; "sample" keeps ceil(fraction * replies) of them, those of lowest `rank`
    (so the same seed, round and cohort always give the same sample, and a client's chance does not
    depend on its node id); "partitions" keeps the listed partition ids only.
    """

    policy: str = "all"
    fraction: float = 1.0
    partitions: tuple[int, ...] = ()
    seed: int = 0

    def select(self, server_round: int, partition_ids: Iterable[int]) -> set[int]:
        """The partition ids, among those that replied in `server_round`, whose updates are captured."""
        ids = sorted(set(partition_ids))
        if self.policy == "all":
            return set(ids)
        if self.policy == "partitions":
            return set(ids) & set(self.partitions)
        keep = min(len(ids), math.ceil(self.fraction * len(ids) - 1e-9))
        return set(sorted(ids, key=lambda pid: rank(self.seed, server_round, pid))[:keep])
