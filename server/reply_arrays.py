"""A client's reply arrays as the curious server reads them: flwr's .npy bytes, decoded once each and checked.

Server side (it reads Flower's `Array`s); what it rejects becomes a failure record through fedsim.captures.BadValue.
"""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.app import Array, ArrayRecord

from fedsim.captures import BadValue

NPY_STYPE = "numpy.ndarray"  # flwr's SType.NUMPY: the Array's data is a .npy file
ARRAY_DTYPES = frozenset(
    np.dtype(name)
    for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    + ("float16", "float32", "float64")
)
"""The dtypes a captured array may have (native byte order): real numbers and flags, as a state dict holds."""
MAX_HEADER = 4096  # bytes of a .npy header the fast path reads; a longer one goes through numpy's own reader
MAX_LAYOUTS = 4096  # distinct headers remembered (a client can make as many as it likes)
_LAYOUTS: dict[bytes, tuple[np.dtype, tuple[int, ...], int] | None] = {}


def _npy_header(data: bytes) -> bytes | None:
    """The header of a .npy file of version 1.0 or 2.0 (magic, version, length, text), or None."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        return None
    if data[6:8] == b"\x01\x00":
        end = 10 + int.from_bytes(data[8:10], "little")
    elif data[6:8] == b"\x02\x00":
        end = 12 + int.from_bytes(data[8:12], "little")
    else:
        return None
    return data[:end] if end <= min(len(data), MAX_HEADER) else None


def _layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, values) of a .npy header in the plain layout np.save writes for an array of ARRAY_DTYPES (C
    order, native byte order); None for anything else. Parsed once per distinct header; numpy's own parser, which
    reads the header as a Python literal and never unpickles."""
    if header in _LAYOUTS:
        return _LAYOUTS[header]
    layout = None
    try:
        fp = io.BytesIO(header)
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(fp, max_header_size=MAX_HEADER)
        if fp.tell() == len(header) and not fortran_order and dtype in ARRAY_DTYPES and dtype.isnative:
            layout = (dtype, tuple(shape), math.prod(shape))
    except Exception:  # noqa: BLE001 (a header numpy cannot read: the array goes the slow way, and is refused there)
        layout = None
    if len(_LAYOUTS) < MAX_LAYOUTS:
        _LAYOUTS[header] = layout
    return layout


def _array_values(name: str, array: Array) -> np.ndarray:
    """One Array's values as a C-ordered array that owns its memory, or BadValue naming it.

    The plain layout is read straight from the bytes after the header (one copy); anything else (Fortran order,
    another byte order or .npy version, a header this does not know, another serialisation) goes through flwr's
    own `Array.numpy()`, numpy's reader with allow_pickle=False, as `ArrayRecord.to_torch_state_dict` does."""
    field = f"arrays.{str(name)[:80]}"
    data = array.data
    header = _npy_header(data) if array.stype == NPY_STYPE and isinstance(data, bytes) else None
    layout = None if header is None else _layout(header)
    if layout is not None and len(data) == len(header) + layout[2] * layout[0].itemsize:
        dtype, shape, count = layout
        values = np.frombuffer(data, dtype, count, len(header)).reshape(shape).copy()
    else:
        try:
            loaded = array.numpy()
        except Exception as exc:  # noqa: BLE001 (an untrusted array: whatever numpy or flwr raise, refused)
            raise BadValue(field, f"is not a readable numpy array ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(loaded, np.ndarray):
            if hasattr(loaded, "close"):
                loaded.close()  # an .npz archive: refused, never read
            raise BadValue(field, "is not a numpy array")
        if loaded.dtype.newbyteorder("=") not in ARRAY_DTYPES:
            raise BadValue(field, f"has dtype {loaded.dtype}, not one of bool, int, uint or float")
        dtype, shape = loaded.dtype, loaded.shape
        values = np.array(loaded, dtype=dtype.newbyteorder("="), order="C", copy=True)
    if str(array.dtype) != str(dtype):
        raise BadValue(field, f"declares dtype {str(array.dtype)[:40]} but holds {dtype}")
    declared = tuple(array.shape) if isinstance(array.shape, tuple | list) else array.shape
    if declared != shape:
        raise BadValue(field, f"declares shape {str(declared)[:80]} but holds {shape}")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise BadValue(field, "holds NaN or infinity")
    return values


def record_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """A client's ArrayRecord as numpy arrays, in its order, each checked, or BadValue naming the first bad one.

    Each array must hold a real dtype (ARRAY_DTYPES), the dtype and shape its Array declares, and, if floating,
    finite values only; its bytes are never unpickled. The values equal `arrays.to_torch_state_dict()`'s, but
    each array is copied once, owns its memory, is writable and C-ordered, and `torch.from_numpy` makes a tensor
    of it without another copy."""
    return {name: _array_values(name, array) for name, array in arrays.items()}
