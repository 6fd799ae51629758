"""Atomic file writes and safe tensor files: what was written is complete, or not there at all."""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedsim.errors import FedsimError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it into place.

    The file gets the mode an ordinary write would (0666 less the umask), not mkstemp's private 0600,
    so a run folder shared with a team stays readable by it; a umask of 077 keeps it private.
    """
    atomic_write_many([(path, data)])


def atomic_write_many(files: list[tuple[str | Path, bytes | list]]) -> None:
    """`atomic_write_bytes` for many files at once: all written, then all synced, then all renamed into place.

    Syncing after every file is written lets the file system commit them together: each sync after the first
    finds its data already on disk, which makes a round of captures several times cheaper than one by one.
    A file's data is bytes or a list of buffers (`tensor_parts`), written in one `writev`, never joined.
    Each file costs five system calls (open, writev, fsync, close, rename): in a background thread, each is a
    point where the thread gives Python's GIL up and must take it back from the threads that serve the clients.
    """
    pending: list[tuple[Path, str, int]] = []
    open_fds: set[int] = set()
    folders: set[Path] = set()
    try:
        for path, data in files:
            path = Path(path)
            if path.parent not in folders:
                path.parent.mkdir(parents=True, exist_ok=True)
                folders.add(path.parent)
            fd, tmp = _create_temp(path)
            open_fds.add(fd)
            pending.append((path, tmp, fd))
            _write_all(fd, data if isinstance(data, list) else [data])
        for _, _, fd in pending:
            os.fsync(fd)
            os.close(fd)
            open_fds.discard(fd)
        for path, tmp, _ in pending:
            os.replace(tmp, path)
    except BaseException:
        for _, tmp, fd in pending:
            if fd in open_fds:
                os.close(fd)
            Path(tmp).unlink(missing_ok=True)
        raise


def _create_temp(path: Path) -> tuple[int, str]:
    """A new temporary file beside `path` (as mkstemp makes it, but with the mode an ordinary write gets: 0666
    less the umask, which the kernel applies), open for writing."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def _write_all(fd: int, parts: list) -> None:
    """Write the buffers one after the other with as few `writev` calls as the kernel allows (the GIL is released
    while it copies them)."""
    views = [view for view in (memoryview(p).cast("B") for p in parts) if len(view)]
    limit = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16
    while views:
        written = os.writev(fd, views[:limit])
        while written and views:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0], written = views[0][written:], 0


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_line(path: str | Path, line: str) -> int:
    """Append one line (or several, joined by newlines) in a single write and sync it, so a crash leaves at
    most a partial last line; the file's size after it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
        os.fsync(fd)
        return os.lseek(fd, 0, os.SEEK_CUR)  # one writer per file: the line just written ends here
    finally:
        os.close(fd)


def read_jsonl(path: str | Path, numbered: bool = False) -> list:
    """Read a JSON-lines file of objects; `numbered` gives (line number, object) pairs.

    A last line that is not valid JSON is what a crash in the middle of an append leaves: it is
    skipped with a warning naming it. Anything else that is not a JSON object is refused.
    """
    path = Path(path)
    if not path.exists():
        return []
    if not path.is_file():  # a FIFO or a device would block or never end
        raise FedsimError(f"{path} is not a regular file; refused")
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise FedsimError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); the file is corrupt") from None
    except OSError as exc:
        raise FedsimError(f"cannot read {path}: {exc.strerror}") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            if i == len(lines) - 1:
                _warn_once(f"{path}, line {i + 1}, is cut off (a run stopped while writing it); skipped")
                break  # everything before it is intact
            raise FedsimError(f"{path}, line {i + 1}, is not valid JSON; the file is corrupt") from None
        if not isinstance(record, dict):
            raise FedsimError(f"{path}, line {i + 1}, is not a JSON object; the file is corrupt")
        records.append((i + 1, record) if numbered else record)
    return records


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning on stderr, once per process (readers re-read the same file many times)."""
    if message not in _warned:
        _warned.add(message)
        logging.getLogger("fedsim").warning("warning: %s", message)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors (no pickle: such a file never executes code when read), atomically."""
    atomic_write_many([(path, tensor_parts(tensors, metadata))])


def tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of `tensors`, in memory."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return st_save(clean, metadata=metadata)


# torch dtype -> safetensors' name, in safetensors' order of dtypes (a file lists its tensors by dtype, last first)
ST_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
ST_RANK = {dtype: rank for rank, dtype in enumerate(ST_DTYPES)}


def tensor_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> list:
    """The safetensors file of `tensors` as its header and one buffer per tensor, without copying the tensors' data
    (a tensor that is not on the CPU or not contiguous is copied once): the file `tensor_bytes` makes, in the
    same order (safetensors sorts by dtype, then name). Written with `atomic_write_many`, the kernel copies
    each buffer straight into the file, with Python's GIL released. (Only the metadata keys keep their order.)"""
    if any(value.dtype not in ST_DTYPES for value in tensors.values()):
        return [tensor_bytes(tensors, metadata)]  # a dtype this writer does not know: safetensors' own
    order = sorted(tensors, key=lambda k: (-ST_RANK[tensors[k].dtype], k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    parts, offset = [], 0
    for name in order:
        value = tensors[name]
        dtype = ST_DTYPES[value.dtype]
        if value.device.type == "cpu" and dtype != "BF16" and not value.requires_grad and value.is_contiguous():
            array = value.numpy()  # the tensor's memory as it is (each torch operation would give the GIL up)
        else:  # on another device, not contiguous, or bfloat16 (which numpy lacks: its bits as int16)
            value = value.detach().to("cpu").contiguous()
            array = (value.view(torch.int16) if dtype == "BF16" else value).numpy()
        header[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        if array.nbytes:
            parts.append(memoryview(array).cast("B"))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return [len(text).to_bytes(8, "little") + text, *parts]


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle, a truncated file) is refused with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FedsimError(f"tensor file {path} does not exist")
    data = path.read_bytes()
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise FedsimError(
            f"{path} is not a valid safetensors file ({exc}); it may be corrupt or of another "
            "format, and is never unpickled"
        ) from None
