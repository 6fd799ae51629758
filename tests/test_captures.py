"""The capture store: atomic, readable after a crash, never unpickles."""

import pickle

import pytest
import torch

from fedsim.captures import CaptureStore
from fedsim.errors import FedsimError
from fedsim.files import load_tensors, read_jsonl


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
