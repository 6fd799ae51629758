"""The capture store: atomic, readable after a crash, never unpickles."""

import io
import pickle

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedsim.captures import BadValue, CaptureStore
from fedsim.errors import FedsimError
from fedsim.files import load_tensors, read_jsonl
from server.reply_arrays import record_arrays


def test_write_and_read_back(tmp_path):
    store = CaptureStore(tmp_path)
    state = {"w": torch.randn(3, 4), "b": torch.arange(3)}
    store.write_global(1, state, {"model": "mlp"})
    store.write_update(1, 42, {k: v + 1 for k, v in state.items()}, {"num_examples": 5})
    store.write_failure(1, 7, "client crashed")
    assert [r["kind"] for r in store.records()] == ["global", "update", "failure"]
    update = store.records("update")[0]
    assert update["client"] == 42 and update["num_examples"] == 5
    torch.testing.assert_close(store.load(update)["w"], state["w"] + 1)
    torch.testing.assert_close(store.load(store.global_record(1))["b"], state["b"])
    assert not list(tmp_path.rglob("*.tmp")), "temporary files must be renamed into place"


def test_a_line_cut_by_a_crash_is_skipped(tmp_path):
    store = CaptureStore(tmp_path)
    store.write_update(1, 1, {"w": torch.zeros(2)}, {})
    with open(store.manifest, "a") as f:
        f.write('{"kind": "update", "round": 1, "cli')  # what SIGKILL in the middle of a write leaves
    assert len(store.records()) == 1


def test_corruption_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(FedsimError, match="line 2"):
        read_jsonl(path)


class Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_a_pickle_disguised_as_a_capture_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "client-1.safetensors"
    fake.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(FedsimError, match="not a valid safetensors file"):
        load_tensors(fake)
    assert not (tmp_path / "PWNED").exists()


def test_a_truncated_capture_is_refused(tmp_path):
    store = CaptureStore(tmp_path)
    record = store.write_update(1, 1, {"w": torch.randn(100)}, {})
    path = tmp_path / record["file"]
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(FedsimError, match="not a valid safetensors file"):
        store.load(record)


# --- a client's arrays, decoded once each and checked (record_arrays) -------------------------------------------


def npy(value: np.ndarray, version: tuple[int, int] | None = None) -> Array:
    """An Array as flwr makes it, optionally with a .npy file of another version."""
    if version is None:
        return Array(value)
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, value, version=version, allow_pickle=False)
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype="numpy.ndarray", data=buffer.getvalue())


def counting_numpy(monkeypatch) -> list[str]:
    """Count the arrays that go the slow way (flwr's Array.numpy, numpy's reader)."""
    calls: list[str] = []
    original = Array.numpy

    def numpy(self):
        calls.append(self.dtype)
        return original(self)

    monkeypatch.setattr(Array, "numpy", numpy)
    return calls


def test_record_arrays_equals_flwr_s_state_dict_for_every_dtype_and_shape(monkeypatch):
    rng = np.random.default_rng(0)
    values = {
        "conv.weight": rng.standard_normal((32, 1, 3, 3)).astype(np.float32),
        "scalar": np.array(1.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "half": rng.standard_normal((4, 5)).astype(np.float16),
        "double": rng.standard_normal(7),
        "steps": np.array(12, dtype=np.int64),
        "ids": rng.integers(-5, 5, (3, 2)).astype(np.int32),
        "pixels": rng.integers(0, 255, (2, 2, 3)).astype(np.uint8),
        "mask": rng.random(6) > 0.5,
        "small": np.arange(-3, 3, dtype=np.int8),
    }
    values["conv.weight"][0, 0, 0, 0] = np.finfo(np.float32).max  # finite, however large
    record = ArrayRecord({name: Array(value) for name, value in values.items()})
    slow = counting_numpy(monkeypatch)
    got = record_arrays(record)
    assert slow == [], "flwr's own arrays are read without numpy's reader"
    expected = record.to_torch_state_dict()
    assert list(got) == list(expected) == list(values)
    for name, value in got.items():
        tensor = torch.from_numpy(value)
        assert tensor.dtype == expected[name].dtype and tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]), name
        assert value.flags.owndata and value.flags.writeable and value.flags.c_contiguous, name
    got["conv.weight"][0] = 0  # its own memory: the reply's bytes are untouched
    assert torch.equal(record.to_torch_state_dict()["conv.weight"], expected["conv.weight"])
    assert record_arrays(ArrayRecord()) == {}


def test_a_layout_record_arrays_does_not_know_goes_through_numpy_s_reader(monkeypatch):
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
    arrays = {
        "fortran": Array(np.asfortranarray(x)),
        "big-endian": Array(x.astype(">f4")),
        "version-3": npy(x, (3, 0)),
        "version-2": npy(x, (2, 0)),  # the same header as 1.0 but for its length: read directly
        "trailing": Array(dtype="float32", shape=(2, 3, 4), stype="numpy.ndarray", data=Array(x).data + b"\0" * 4),
    }
    slow = counting_numpy(monkeypatch)
    got = record_arrays(ArrayRecord(arrays))
    assert slow == ["float32", ">f4", "float32", "float32"]  # all but version 2.0
    for name, value in got.items():
        assert value.dtype == np.float32 and value.dtype.isnative, name
        assert value.flags.c_contiguous and value.flags.owndata and value.flags.writeable, name
        np.testing.assert_array_equal(value, x, err_msg=name)
    for name in ("fortran", "version-3", "version-2", "trailing"):  # what flwr itself reads the same
        assert torch.equal(torch.from_numpy(got[name]), ArrayRecord({name: arrays[name]}).to_torch_state_dict()[name])


def object_array(payload) -> Array:
    buffer = io.BytesIO()
    np.save(buffer, np.array([payload, 1], dtype=object), allow_pickle=True)
    return Array(dtype="object", shape=(2,), stype="numpy.ndarray", data=buffer.getvalue())


def bad_arrays() -> dict[str, tuple[Array, str]]:
    good = Array(np.ones((2, 3), dtype=np.float32))
    npz = io.BytesIO()
    np.savez(npz, w=np.ones(2))
    return {
        "pickled-object": (object_array(Boom()), "not a readable numpy array"),
        "raw-pickle": (Array("float32", (2,), "numpy.ndarray", pickle.dumps(Boom())), "not a readable numpy array"),
        "truncated": (Array("float32", (2, 3), "numpy.ndarray", good.data[:-4]), "not a readable numpy array"),
        "empty": (Array("float32", (2, 3), "numpy.ndarray", b""), "not a readable numpy array"),
        "npz": (Array("float64", (2,), "numpy.ndarray", npz.getvalue()), "is not a numpy array"),
        "other-stype": (Array("float32", (2, 3), "torch.Tensor", good.data), "not a readable numpy array"),
        "complex": (Array(np.ones(2, dtype=np.complex64)), "has dtype complex64"),
        "text": (Array(np.array(["a", "b"])), "has dtype <U1"),
        "wrong-shape": (Array("float32", (3, 2), "numpy.ndarray", good.data), "declares shape (3, 2) but holds (2, 3)"),
        "wrong-dtype": (Array("int64", (2, 3), "numpy.ndarray", good.data), "declares dtype int64 but holds float32"),
        "nan": (Array(np.array([0.0, np.nan], dtype=np.float32)), "holds NaN or infinity"),
        "inf": (Array(np.array([[np.inf]], dtype=np.float32)), "holds NaN or infinity"),
        "minus-inf-half": (Array(np.array([1, -np.inf], dtype=np.float16)), "holds NaN or infinity"),
        "nan-fortran": (Array(np.asfortranarray(np.full((2, 2), np.nan))), "holds NaN or infinity"),
    }


@pytest.mark.parametrize("case", list(bad_arrays()))
def test_record_arrays_refuses_a_bad_array_by_name_and_never_unpickles(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    array, message = bad_arrays()[case]
    record = ArrayRecord({"good": Array(np.zeros(3, dtype=np.float32)), "w": array})
    with pytest.raises(BadValue, match="arrays.w") as caught:
        record_arrays(record)
    assert caught.value.field == "arrays.w" and message in str(caught.value), caught.value
    assert not (tmp_path / "PWNED").exists()
