"""The capture store: every client update and global model the curious server saw, on disk.

Layout of `runs/<run-id>/captures/`:
    manifest.jsonl                 one JSON record per capture, appended after its file is complete
    round-0003/global.safetensors  the global weights sent to the clients in round 3
    round-0003/client-<node>.safetensors  client <node>'s weights as it sent them back
Tensor files are written atomically and listed in the manifest only once complete, so a run killed
at any moment leaves every listed capture readable.

A store may come from another machine, so everything read from it is untrusted: every record is
checked against the schema below (`check_record`) and every tensor file must lie inside the store.
A last manifest line cut by a crash is skipped with a warning (see `fedsim.files.read_jsonl`).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedsim.config import DEFENSES, NOISE_TYPES, RECIPES
from fedsim.errors import FedsimError
from fedsim.files import append_line, load_tensors, read_jsonl, save_tensors

MANIFEST = "manifest.jsonl"
KINDS = ("global", "update", "failure")
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_ID = 2**64 - 1  # Flower's node ids are unsigned 64-bit integers
MAX_SIDE = 4096  # pixels per image side, and channels, a capture record may declare
MAX_INPUT = 2**24  # values in one input image (C*H*W)
MAX_CLASSES = 100_000
MAX_EXAMPLES = 10**9
MAX_TEXT = 4096


class BadValue(ValueError):
    """A field of a record that breaks the schema; `field` is its dotted path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


# --- value checks: each returns the value, or raises BadValue naming the field -----------------------


def check_int(field: str, value: Any, low: int = 0, high: int = MAX_ID) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadValue(field, f"{value!r} is not an integer")
    if not low <= value <= high:
        raise BadValue(field, f"{value} is outside {low}..{high}")
    return value


def check_number(
    field: str, value: Any, low: float = -math.inf, high: float = math.inf, open_low: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadValue(field, f"{value!r} is not a number")
    if not math.isfinite(value):
        raise BadValue(field, f"{value} is not a finite number")
    if value < low or value > high or (open_low and value == low):
        raise BadValue(field, f"{value} is outside {'(' if open_low else '['}{low}, {high}]")
    return value


def check_name(field: str, value: Any) -> str:
    """A name that is safe as a path component and in a page: [A-Za-z0-9._-], not '.' or '..'."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or value in (".", ".."):
        raise BadValue(field, f"{value!r} is not a name of letters, digits, '.', '_' and '-' (at most 128)")
    return value


def check_text(field: str, value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT or any(ord(c) < 32 and c not in "\t\n" for c in value):
        raise BadValue(field, f"{str(value)[:80]!r} is not a printable text of at most {MAX_TEXT} characters")
    return value


def _choice(field: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise BadValue(field, f"{str(value)[:80]!r} is not one of: {', '.join(allowed)}")
    return value


def _names(field: str, value: Any) -> list[str]:
    if not isinstance(value, list):
        raise BadValue(field, f"{str(value)[:80]!r} is not a list of names")
    return [check_name(f"{field}[{i}]", v) for i, v in enumerate(value)]


def _ids(field: str, value: Any) -> list[int]:
    if not isinstance(value, list):
        raise BadValue(field, f"{str(value)[:80]!r} is not a list of node ids")
    return [check_int(f"{field}[{i}]", v) for i, v in enumerate(value)]


def _input_shape(field: str, value: Any) -> list[int]:
    if not isinstance(value, list) or len(value) != 3:
        raise BadValue(field, f"{str(value)[:80]!r} is not [channels, height, width]")
    shape = [check_int(f"{field}[{i}]", v, 1, MAX_SIDE) for i, v in enumerate(value)]
    if math.prod(shape) > MAX_INPUT:
        raise BadValue(field, f"{shape} has more than {MAX_INPUT} values per image")
    return shape


def _model(field: str, value: Any) -> str:
    from fedsim.models import MODELS

    return _choice(field, check_name(field, value), tuple(MODELS))


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda field, value: None if value is None else check(field, value)


def _mapping(schema: dict[str, Callable[[str, Any], Any]], what: str) -> Callable[[str, Any], dict]:
    """A JSON object whose known keys follow `schema`; other keys are kept (they were checked to be finite)."""

    def check(field: str, value: Any) -> dict:
        if not isinstance(value, dict):
            raise BadValue(field, f"{str(value)[:80]!r} is not {what}")
        for key, item in value.items():
            if key in schema:
                schema[key](f"{field}.{key}", item)
        return value

    return check


def _defense_list(field: str, value: Any) -> str:
    names = [n for n in check_text(field, value).split(",") if n]
    for name in names:
        _choice(field, name, DEFENSES)
    if len(set(names)) != len(names):
        raise BadValue(field, f"{value!r} names a defense twice")
    return value


RECIPE = {
    "recipe": lambda f, v: _choice(f, v, RECIPES),
    "lr": lambda f, v: check_number(f, v, 0, open_low=True),
    "batch-size": lambda f, v: check_int(f, v, 1, MAX_EXAMPLES),
    "local-epochs": lambda f, v: check_int(f, v, 1, 10**6),
    "proximal-mu": lambda f, v: check_number(f, v, 0),
}

DECLARED = {
    "recipe": lambda f, v: _choice(f, v, RECIPES),
    "defenses": _defense_list,
    "clip-norm": lambda f, v: check_number(f, v, 0, open_low=True),
    "noise-type": lambda f, v: _choice(f, v, NOISE_TYPES),
    "noise-scale": lambda f, v: check_number(f, v, 0),
    "prune-percent": lambda f, v: check_number(f, v, 0, 100),
    "ldp-epsilon": lambda f, v: check_number(f, v, 0, open_low=True),
    "ldp-delta": lambda f, v: check_number(f, v, 0, 1, open_low=True),
    "ldp-clip-norm": lambda f, v: check_number(f, v, 0, open_low=True),
    "ldp-noise-std": lambda f, v: check_number(f, v, 0),
    "tldmi-layers": lambda f, v: check_int(f, v, 1, 10**6),
    "tldmi-public": check_text,
    "trainable": _names,
}
"""What a client may declare in its reply's "fedsim" ConfigRecord (clients/defenses.py `declare`)."""


def _flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadValue(field, f"{str(value)[:80]!r} is not true or false")
    return value


SERVER = {
    "mode": lambda f, v: _choice(f, v, ("curious", "imprint")),
    "statistic": check_name,
    "bins": lambda f, v: check_int(f, v, 2, 65536),  # sizes the imprint block the attack rebuilds
    "secure-aggregation": _flag,
}
"""How the server behaved, as its capture records say (server/imprint.py `server_field`)."""

FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "time": lambda f, v: check_number(f, v, 0),
    "kind": lambda f, v: _choice(f, v, KINDS),
    "round": lambda f, v: check_int(f, v, 0, 10**9),
    "client": lambda f, v: v if isinstance(v, str) and check_name(f, v) else check_int(f, v),
    "file": check_text,  # and confined to the store by CaptureStore.records and .path
    "reason": lambda f, v: v if isinstance(v, str) else check_text(f, v),
    "run": check_name,
    "model": _model,
    "dataset": check_name,
    "input_shape": _input_shape,
    "num_classes": lambda f, v: check_int(f, v, 1, MAX_CLASSES),
    "trainable": _names,
    "recipe": _mapping(RECIPE, "a recipe (an object of lr, batch-size, ...)"),
    "clients": _ids,
    "num_examples": lambda f, v: check_int(f, v, 0, MAX_EXAMPLES),
    "train_loss": _optional(lambda f, v: check_number(f, v)),
    "partition_id": _optional(lambda f, v: check_int(f, v, 0, 10**9)),
    "declared": _mapping(DECLARED, "an object of declared defenses"),
    "server": _mapping(SERVER, "an object saying how the server behaved"),
    "aggregate_of": _ids,
}
"""Every field a reader of the capture store uses, with its type and range."""

REQUIRED = {"global": ("round", "file"), "update": ("round", "client", "file"), "failure": ("round", "client")}


def _finite_everywhere(field: str, value: Any) -> None:
    """No NaN or infinity anywhere in a record, known field or not (JSON's NaN, Infinity, 1e999)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise BadValue(field, f"{value} is not a finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _finite_everywhere(f"{field}.{key}" if field else str(key), item)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _finite_everywhere(f"{field}[{i}]", item)


def check_record(record: Any) -> dict:
    """`record` if it follows the capture schema, else BadValue naming the first field that does not."""
    if not isinstance(record, dict):
        raise BadValue("(record)", f"{str(record)[:80]!r} is not a JSON object")
    _finite_everywhere("", record)
    if "kind" not in record:
        raise BadValue("kind", "missing")
    for key, check in FIELDS.items():
        if key in record:
            check(key, record[key])
    for key in REQUIRED[record["kind"]]:
        if key not in record:
            raise BadValue(key, f"missing (a {record['kind']} record needs {', '.join(REQUIRED[record['kind']])})")
    return record


def check_declared(declared: dict[str, Any]) -> dict[str, Any]:
    """What a client declared in its reply, if it follows the schema (the curious server checks before writing).

    Known keys follow DECLARED; any other key must be a name and its value a finite number, a flag, a
    printable text, or a list of those.
    """
    for key, value in declared.items():
        field = f"declared.{key}"
        check_name(field, key)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                check_text(field, item)
            elif not isinstance(item, bool):
                check_number(field, item)
    return FIELDS["declared"]("declared", declared)


class CaptureStore:
    """Writes and reads the captures of one run."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def _append(self, record: dict[str, Any]) -> dict[str, Any]:
        record = {"time": round(time.time(), 3), **record}
        append_line(self.manifest, json.dumps(record, sort_keys=False, allow_nan=False))
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
        """The manifest's records, optionally of one kind ("global", "update", "failure"), each checked.

        A record that breaks the schema, or whose file leads outside the store, is refused with one line
        naming the manifest, the line and the field.
        """
        manifest = self.manifest
        if not manifest.resolve().is_relative_to(self.root.resolve()):
            raise FedsimError(f"{manifest} leads outside the capture store {self.root}; refused")
        records = []
        for number, record in read_jsonl(manifest, numbered=True):
            try:
                check_record(record)
                if "file" in record:
                    self._confined(record["file"])
            except BadValue as exc:
                raise FedsimError(f"{manifest}, line {number}, field {exc}; the capture store is corrupt") from None
            records.append(record)
        return [r for r in records if kind is None or r["kind"] == kind]

    def _confined(self, rel: Any) -> Path:
        """The resolved path of a record's file, if it stays inside the store (BadValue otherwise)."""
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BadValue("file", f"{str(rel)[:200]!r} leads outside the capture store (absolute or '..')")
        resolved = (self.root / rel).resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise BadValue("file", f"{rel!r} leads outside the capture store (through a symbolic link)")
        return resolved

    def path(self, record: dict) -> Path:
        """The tensor file of a record: a relative path that stays inside the store, or refused."""
        if "file" not in record:
            raise FedsimError(f"capture record {record} has no tensor file")
        try:
            return self._confined(record["file"])
        except BadValue as exc:
            raise FedsimError(f"capture {exc} of {self.root}; refused") from None

    def load(self, record: dict) -> dict[str, torch.Tensor]:
        """The tensors of one capture record."""
        return load_tensors(self.path(record))

    def global_record(self, server_round: int) -> dict:
        for r in self.records("global"):
            if r["round"] == server_round:
                return r
        raise FedsimError(f"no global model captured for round {server_round} in {self.root}")
