"""A bounded wait for the SuperNodes a run needs: one clear error instead of waiting forever."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from flwr.serverapp import Grid

from fedsim.errors import FedsimError


def node_wait_seconds() -> float:
    """How long a run waits for its SuperNodes (Flower's strategies would wait without end): 120 s by default."""
    return float(os.environ.get("FEDSIM_NODE_WAIT_SECONDS", "120"))


def too_few_nodes(connected: int, needed: int, waited: float) -> str:
    fix = f"run with --run-config 'num-clients={connected}', or " if connected else ""
    return (
        f"only {connected} SuperNode(s) connected within {waited:.0f} s but the run has num-clients = {needed}: "
        f"{fix}start {needed} SuperNodes (a simulation: flwr run . --federation-config 'num-supernodes={needed}')"
    )


class BoundedGrid:
    """The run's Grid, except that fewer than `needed` SuperNodes for longer than `timeout` seconds is an error."""

    def __init__(self, grid: Grid, needed: int, timeout: float | None = None) -> None:
        self._grid, self.needed = grid, needed
        self.timeout = node_wait_seconds() if timeout is None else timeout
        self._short_since: float | None = None

    def get_node_ids(self) -> Iterable[int]:
        ids = list(self._grid.get_node_ids())
        if len(ids) >= self.needed:
            self._short_since = None
            return ids
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
        elif now - self._short_since > self.timeout:
            raise FedsimError(too_few_nodes(len(ids), self.needed, self.timeout))
        return ids

    def wait(self) -> list[int]:
        """Return once `needed` SuperNodes are connected; raise after `timeout` seconds with fewer."""
        log, said = logging.getLogger("fedsim"), -1.0
        while len(ids := list(self.get_node_ids())) < self.needed:
            if time.monotonic() - said >= 10:
                log.warning("waiting for %d SuperNodes (num-clients): %d connected", self.needed, len(ids))
                said = time.monotonic()
            time.sleep(0.5)
        return ids

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
