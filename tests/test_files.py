"""Atomic writes: complete or absent, and readable by whoever the umask lets read them."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import pytest
import torch
from safetensors import safe_open

from fedsim.files import (
    atomic_write_json,
    atomic_write_many,
    atomic_write_text,
    current_umask,
    load_tensors,
    save_tensors,
    tensor_bytes,
    tensor_parts,
)


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_get_the_mode_the_umask_gives(tmp_path, mask, mode):
    with umask(mask):
        assert current_umask() == mask
        atomic_write_text(tmp_path / "report.html", "<p>hi</p>")
        atomic_write_json(tmp_path / "metrics.json", {"a": 1})
        save_tensors(tmp_path / "captures" / "update.safetensors", {"w": torch.zeros(2)})
    for name in ("report.html", "metrics.json", "captures/update.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert [p.name for p in tmp_path.rglob(".*.tmp")] == []


def test_a_rewrite_takes_the_umask_of_the_time(tmp_path):
    path = tmp_path / "metrics.json"
    with umask(0o077):
        atomic_write_json(path, {"a": 1})
    with umask(0o022):
        atomic_write_json(path, {"a": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_text().strip().endswith("}")


def test_tensor_parts_write_the_file_safetensors_writes_without_copying(tmp_path):
    tensors = {
        "w": torch.randn(3, 4),
        "t": torch.randn(4, 3).t(),  # not contiguous: copied once
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 5),
        "half": torch.randn(7).half(),
        "bf": torch.randn(2).bfloat16(),
        "steps": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "small": torch.arange(3, dtype=torch.int8),
    }
    parts = tensor_parts(tensors)
    assert b"".join(bytes(p) for p in parts) == tensor_bytes(tensors)  # byte for byte, without metadata
    assert all(p.obj is not None for p in parts[1:])  # views of the tensors' memory
    meta = {"kind": "update", "round": "3", "client": "17"}
    atomic_write_many([(tmp_path / "u.safetensors", tensor_parts(tensors, meta))])
    back = load_tensors(tmp_path / "u.safetensors")
    assert set(back) == set(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    with safe_open(str(tmp_path / "u.safetensors"), "pt") as f:
        assert f.metadata() == meta
    assert [p.name for p in tmp_path.glob(".*.tmp")] == []
