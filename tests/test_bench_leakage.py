"""The leakage benchmark's grid and the GRNN paper setting's batches: which cells exist, how batches are drawn."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_gradient_inversion import distinct_label_batch, spread  # noqa: E402
from bench_leakage import cell_id, not_applicable, parse_options  # noqa: E402


def test_batches_have_distinct_labels_up_to_the_class_count():
    labels = np.repeat(np.arange(10), 50)
    rng = np.random.default_rng(0)
    for batch in (1, 4, 8, 10):
        picks = distinct_label_batch(labels, batch, rng)
        assert len(picks) == batch and len(set(labels[picks].tolist())) == batch
    picks = distinct_label_batch(labels, 16, rng)
    counts = np.bincount(labels[picks], minlength=10)
    assert len(set(picks.tolist())) == 16 and counts.min() == 1 and counts.max() == 2


def test_batches_are_seeded_and_random():
    labels = np.repeat(np.arange(10), 50)
    a = distinct_label_batch(labels, 8, np.random.default_rng([0, 8]))
    b = distinct_label_batch(labels, 8, np.random.default_rng([0, 8]))
    c = distinct_label_batch(labels, 8, np.random.default_rng([1, 8]))
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_spread_reports_quartiles():
    s = spread([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s["min"], s["q1"], s["median"], s["q3"], s["max"], s["iqr"]) == (1, 2, 3, 4, 5, 2)


def test_cells_without_meaning_are_left_out():
    assert not_applicable("analytic", "resnet20", "fedsgd", 1)
    assert not_applicable("analytic", "untrained", "fedavg", 4)
    assert not_applicable("analytic", "untrained", "fedsgd", 4) is None
    assert not_applicable("ig", "untrained", "fedavg", 1)
    assert not_applicable("ig", "convnet-fedavg", "fedavg", 4) is None
    assert cell_id("ig", "resnet20", "fedsgd", 16) == "ig|resnet20|fedsgd|b16"


def test_options_parse_as_json_values():
    assert parse_options(["ig.iterations=300", "ig.signed=false", "grnn.lr=1e-4"]) == {
        "ig": {"iterations": 300, "signed": False},
        "grnn": {"lr": 1e-4},
    }
    with pytest.raises(SystemExit):
        parse_options(["nope.iterations=3"])
