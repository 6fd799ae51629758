"""The capture store: every client update and global model the curious server saw, on disk.

Layout of `runs/<run-id>/captures/`:
    manifest.jsonl                 one JSON record per capture, appended after its file is complete
    index/round-0003.idx           "offset length" of each of round 3's lines in the manifest, so that one
                                   round is read without reading the others (a store without it is scanned)
    round-0003/global.safetensors  the global weights sent to the clients in round 3
    round-0003/client-<node>.safetensors  client <node>'s weights as it sent them back
Updates may be stored in float16 (`capture-dtype`): then the file holds the update minus the round's
global weights (which stay float32), so that half the bytes keep most of the update's precision;
`load` gives float32 weights back either way.
Tensor files are written atomically and listed in the manifest only once complete, so a run killed
at any moment leaves every listed capture readable.

A store may come from another machine, so everything read from it is untrusted: every record is
checked against the schema below (`check_record`) and every tensor file must lie inside the store.
A last manifest line cut by a crash is skipped with a warning (see `fedsim.files.read_jsonl`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from fedsim.config import DEFENSES, NOISE_TYPES, RECIPES, SERVER_MODES
from fedsim.errors import FedsimError
from fedsim.files import append_line, atomic_write_many, load_tensors, read_jsonl, save_tensors, tensor_parts

MANIFEST = "manifest.jsonl"
INDEX = "index"
DTYPES = ("float32", "float16")
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


def _flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadValue(field, f"{str(value)[:80]!r} is not true or false")
    return value


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


SERVER = {
    "mode": lambda f, v: _choice(f, v, SERVER_MODES),
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
    "dtype": lambda f, v: _choice(f, v, DTYPES),
    "delta": _flag,
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


class BackgroundWriter:
    """One thread that runs a store's writes in the order they were handed over, off the caller's path.

    `submit` blocks while `depth` writes are waiting, so at most that many rounds of updates are held in memory;
    the first write that fails is raised by the next `submit` or by `flush`.
    """

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:  # after a failure nothing more is written: the store ends where it failed
                    job()
            except BaseException as exc:  # noqa: BLE001 (handed to the caller's thread)
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, job: Callable[[], Any]) -> None:
        self._raise()
        self._queue.put(job)

    def flush(self) -> None:
        """Wait until every write handed over is on disk; raise the first that failed."""
        self._queue.join()
        self._raise()

    def close(self) -> None:
        self._queue.put(None)
        self.thread.join()


def _deferrable(method: Callable) -> Callable:
    """A write that goes to the store's background writer when it has one (and then returns None)."""

    @functools.wraps(method)
    def write(self: CaptureStore, *args: Any, **kwargs: Any) -> Any:
        writer = self._writer
        if writer is None or threading.current_thread() is writer.thread:
            return method(self, *args, **kwargs)
        writer.submit(functools.partial(method, self, *args, **kwargs))
        return None

    return write


class CaptureStore:
    """Writes and reads the captures of one run; `dtype` is how client updates are stored."""

    def __init__(self, root: str | Path, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise FedsimError(f"capture dtype {dtype!r} is not one of: {', '.join(DTYPES)}")
        self.root = Path(root)
        self.dtype = dtype
        self._globals: dict[int, dict] = {}
        self._folders: dict[Path, Path] = {}  # resolved folders of tensor files, checked once each
        self._root: Path | None = None
        self._writer: BackgroundWriter | None = None

    def write_in_background(self) -> None:
        """From now on the writes run on one thread of their own, in order, and return None: a server hands a
        round's captures over and goes on while they are written. `flush` waits for them; `close` also ends
        the thread."""
        if self._writer is None:
            self._writer = BackgroundWriter()

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Wait for the background writes (raising the first that failed) and end their thread."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.flush()
            finally:
                writer.close()

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def index_path(self, server_round: int) -> Path:
        return self.root / INDEX / f"round-{server_round:04d}.idx"

    def _append(self, record: dict[str, Any]) -> dict[str, Any]:
        return self._append_many([record])[0]

    def _append_many(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append records to the manifest in one synced write, then their offsets to each round's index."""
        now = round(time.time(), 3)
        records = [{"time": now, **record} for record in records]
        lines = [(json.dumps(record, sort_keys=False, allow_nan=False) + "\n").encode() for record in records]
        if not lines:
            return records
        self.root.mkdir(parents=True, exist_ok=True)
        end = append_line(self.manifest, b"".join(lines).decode())
        entries: dict[int, list[str]] = {}
        offset = end - sum(len(line) for line in lines)
        for record, line in zip(records, lines, strict=True):
            entries.setdefault(record["round"], []).append(f"{offset} {len(line)}")
            offset += len(line)
        # After the manifest lines: a crash in between leaves the index short, which `_indexed` detects.
        for server_round, round_entries in entries.items():
            append_line(self.index_path(server_round), "\n".join(round_entries))
        return records

    @_deferrable
    def write_global(self, server_round: int, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
        """Store the global weights of a round (once per round, always float32: float16 updates are relative to it)."""
        rel = f"round-{server_round:04d}/global.safetensors"
        save_tensors(self.root / rel, state, {"kind": "global", "round": str(server_round)})
        return self._append({"kind": "global", "round": server_round, "file": rel, **meta})

    @_deferrable
    def write_update(
        self,
        server_round: int,
        client: int,
        state: dict[str, torch.Tensor],
        meta: dict[str, Any],
        base: dict[str, torch.Tensor] | None = None,
    ) -> dict:
        """Store one client's reply: its local weights as it sent them, or in float16 as weights minus `base`.

        `base` is the round's global state; without it a float16 update stores the weights themselves.
        """
        return self.write_updates(server_round, [(client, state, meta)], base)[0]

    @_deferrable
    def write_updates(
        self,
        server_round: int,
        updates: list[tuple[int, dict[str, torch.Tensor], dict[str, Any]]],
        base: dict[str, torch.Tensor] | None = None,
    ) -> list[dict]:
        """`write_update` for (client, state, meta) of a whole round: the files are written and synced together,
        then their records appended in one write, so no record ever names a file that is not on disk."""
        files, records = [], []
        for client, state, meta in updates:
            rel = f"round-{server_round:04d}/client-{client}.safetensors"
            extra: dict[str, Any] = {}
            if self.dtype == "float16":
                state = {k: _half(v, None if base is None else base.get(k)) for k, v in state.items()}
                extra = {"dtype": "float16", "delta": base is not None}
            header = {"kind": "update", "round": str(server_round), "client": str(client)}
            files.append((self.root / rel, tensor_parts(state, header)))  # the tensors' own memory, not a copy
            records.append({"kind": "update", "round": server_round, "client": client, "file": rel, **meta, **extra})
        atomic_write_many(files)
        return self._append_many(records)

    @_deferrable
    def write_failure(self, server_round: int, client: int, reason: str) -> dict:
        """Record that a client's reply was an error: the round goes on without it."""
        return self.write_failures(server_round, [(client, reason)])[0]

    @_deferrable
    def write_failures(self, server_round: int, failures: list[tuple[int, str]]) -> list[dict]:
        """`write_failure` for (client, reason) of a whole round, in one synced append."""
        return self._append_many(
            [
                {"kind": "failure", "round": server_round, "client": client, "reason": reason}
                for client, reason in failures
            ]
        )

    def records(self, kind: str | None = None, rounds: Iterable[int] | None = None) -> list[dict]:
        """The manifest's records, optionally of one kind ("global", "update", "failure") and of some rounds only.

        With `rounds`, only those rounds' lines are read, through the index (a store without one, or whose
        index does not match the manifest, is read whole). A record that breaks the schema, or whose file
        leads outside the store, is refused with one line naming the manifest, the line and the field.
        """
        manifest = self.manifest
        if not manifest.resolve().is_relative_to(self.root.resolve()):
            raise FedsimError(f"{manifest} leads outside the capture store {self.root}; refused")
        wanted = None if rounds is None else sorted(set(rounds))
        numbered = self._indexed(wanted) if wanted is not None else None
        if numbered is None:
            numbered = read_jsonl(manifest, numbered=True)
        records = []
        for number, record in numbered:
            try:
                check_record(record)
                if "file" in record:
                    self._confined(record["file"], whole=False)
            except BadValue as exc:
                raise FedsimError(f"{manifest}, line {number}, field {exc}; the capture store is corrupt") from None
            records.append(record)
        return [r for r in records if (kind is None or r["kind"] == kind) and (wanted is None or r["round"] in wanted)]

    def _indexed(self, rounds: list[int]) -> list[tuple[str, Any]] | None:
        """The records of `rounds`, read through the index; None when the index is missing or does not match."""
        if not (self.root / INDEX).is_dir() or not self.manifest.is_file():
            return None
        size = self.manifest.stat().st_size
        last = max((int(p.stem.removeprefix("round-")) for p in (self.root / INDEX).glob("round-*.idx")), default=None)
        if last is None or not self._ends_at(last, size):
            return None  # a crash between manifest and index, or a manifest appended by another writer
        found: list[tuple[str, Any]] = []
        with open(self.manifest, "rb") as f:
            for server_round in rounds:
                path = self.index_path(server_round)
                if not path.is_file():
                    continue
                for entry in path.read_text(encoding="ascii", errors="replace").splitlines():
                    record = self._indexed_line(f, entry, size, server_round)
                    if record is None:
                        return None
                    found.append((f"at byte {entry.split()[0]}", record))
        return found

    def _ends_at(self, server_round: int, size: int) -> bool:
        entries = self.index_path(server_round).read_text(encoding="ascii", errors="replace").split()
        try:
            return len(entries) >= 2 and int(entries[-2]) + int(entries[-1]) == size
        except ValueError:
            return False

    @staticmethod
    def _indexed_line(f, entry: str, size: int, server_round: int) -> dict | None:
        """The record an index entry points at, if it is one whole manifest line of that round."""
        try:
            offset, length = (int(x) for x in entry.split())
        except ValueError:
            return None
        if offset < 0 or length < 2 or offset + length > size or length > 2**24:
            return None
        f.seek(max(offset - 1, 0))
        before = f.read(1) if offset > 0 else b"\n"  # a whole line starts after a newline
        line = f.read(length)
        if before != b"\n" or not line.endswith(b"\n") or b"\n" in line[:-1]:
            return None
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("round") == server_round else None

    def _confined(self, rel: Any, whole: bool = True) -> Path:
        """The resolved path of a record's file, if it stays inside the store (BadValue otherwise).

        Reading the manifest resolves each folder once (10^5 records share a few) and the file itself only
        when it is a symbolic link; `whole` resolves the whole path, as loading it does.
        """
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BadValue("file", f"{str(rel)[:200]!r} leads outside the capture store (absolute or '..')")
        root = self._resolved_root()
        if whole or os.path.islink(self.root / rel):
            whole, resolved = True, (self.root / rel).resolve()
        else:
            parent = Path(rel).parent
            if parent not in self._folders:
                self._folders[parent] = (self.root / parent).resolve()
            resolved = self._folders[parent]
        if not resolved.is_relative_to(root):
            raise BadValue("file", f"{rel!r} leads outside the capture store (through a symbolic link)")
        return resolved if whole else resolved / Path(rel).name

    def _resolved_root(self) -> Path:
        if self._root is None:
            self._root = self.root.resolve()
        return self._root

    def path(self, record: dict) -> Path:
        """The tensor file of a record: a relative path that stays inside the store, or refused."""
        if "file" not in record:
            raise FedsimError(f"capture record {record} has no tensor file")
        try:
            return self._confined(record["file"])
        except BadValue as exc:
            raise FedsimError(f"capture {exc} of {self.root}; refused") from None

    def load(self, record: dict) -> dict[str, torch.Tensor]:
        """The tensors of one capture record; float16 updates come back as float32 weights."""
        tensors = load_tensors(self.path(record))
        if record.get("dtype") != "float16":
            return tensors
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
        if record.get("delta") is True:
            base = load_tensors(self.path(self.global_record(record["round"])))
            for name, value in tensors.items():
                if name not in base or base[name].shape != value.shape:
                    raise FedsimError(f"{self.path(record)}: {name!r} does not match the round's global weights")
                if value.is_floating_point():
                    tensors[name] = base[name].float() + value
        return tensors

    def global_record(self, server_round: int) -> dict:
        if server_round not in self._globals:
            for r in self.records("global", rounds=[server_round]):
                self._globals[server_round] = r
        if server_round in self._globals:
            return self._globals[server_round]
        raise FedsimError(f"no global model captured for round {server_round} in {self.root}")


def _half(value: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """A floating tensor in float16 (minus `base` when given, in float32 first); other tensors as they are."""
    if not value.is_floating_point():
        return value
    if base is not None and base.shape == value.shape:
        value = value.float() - base.float()
    half = value.to(torch.float16)
    # float16 ends at 65504: a value beyond it stays float32 rather than turn into infinity
    return half if bool(torch.isfinite(half).all()) or not bool(torch.isfinite(value).all()) else value.float()
