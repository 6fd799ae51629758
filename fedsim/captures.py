"""The capture store: every client update and global model the curious server saw, on disk.

Layout of `runs/<run-id>/captures/`:
    manifest.jsonl                 one JSON record per capture, appended after its file is complete
    round-0003/global.safetensors  the global weights sent to the clients in round 3
    round-0003/client-<node>.safetensors  client <node>'s weights as it sent them back
Tensor files are written atomically and listed in the manifest only once complete, so a run killed
at any moment leaves every listed capture readable.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fedsim.errors import FedsimError
from fedsim.files import append_line, load_tensors, read_jsonl, save_tensors

MANIFEST = "manifest.jsonl"


class CaptureStore:
    """Writes and reads the captures of one run."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def _append(self, record: dict[str, Any]) -> dict[str, Any]:
        import json

        record = {"time": round(time.time(), 3), **record}
        append_line(self.manifest, json.dumps(record, sort_keys=False))
        return record

    def write_global(self, server_round: int, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
        """Store the global weights of a round (once per round)."""
        rel = f"round-{server_round:04d}/global.safetensors"
        save_tensors(self.root / rel, state, {"kind": "global", "round": str(server_round)})
        return self._append({"kind": "global", "round": server_round, "file": rel, **meta})

    def write_update(
        self, server_round: int, client: int, state: dict[str, torch.Tensor], meta: dict[str, Any]
    ) -> dict:
        """Store one client's reply: its full local weights, as it sent them."""
        rel = f"round-{server_round:04d}/client-{client}.safetensors"
        save_tensors(self.root / rel, state, {"kind": "update", "round": str(server_round), "client": str(client)})
        return self._append({"kind": "update", "round": server_round, "client": client, "file": rel, **meta})

    def write_failure(self, server_round: int, client: int, reason: str) -> dict:
        """Record that a client's reply was an error: the round goes on without it."""
        return self._append({"kind": "failure", "round": server_round, "client": client, "reason": reason})

    def records(self, kind: str | None = None) -> list[dict]:
        """The manifest's records, optionally of one kind ("global", "update", "failure")."""
        records = read_jsonl(self.manifest)
        return [r for r in records if kind is None or r.get("kind") == kind]

    def load(self, record: dict) -> dict[str, torch.Tensor]:
        """The tensors of one capture record."""
        if "file" not in record:
            raise FedsimError(f"capture record {record} has no tensor file")
        return load_tensors(self.root / record["file"])

    def global_record(self, server_round: int) -> dict:
        for r in self.records("global"):
            if r["round"] == server_round:
                return r
        raise FedsimError(f"no global model captured for round {server_round} in {self.root}")
