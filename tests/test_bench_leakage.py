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


def test_peer_labels_follow_the_clients_step_order():
    """The FedAvg peer is told the labels in the order the client's local steps used them: replaying plain SGD
    steps in that order reproduces the client's update exactly."""
    from types import SimpleNamespace

    import torch
    from bench_leakage import step_ordered_labels

    from clients.training import round_generator, train_fedavg

    torch.manual_seed(0)
    x, y = torch.rand(4, 6), torch.tensor([0, 1, 2, 3])
    model = torch.nn.Linear(6, 4)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    train_fedavg(model, x, y, 0.5, 1, 1, round_generator(7, 1, 2))
    labels = step_ordered_labels(SimpleNamespace(batch_size=4), {"labels": y}, 2, SimpleNamespace(seed=7))
    replay = torch.nn.Linear(6, 4)
    replay.load_state_dict(start)
    for label in labels:
        image = x[y == label]
        loss = torch.nn.functional.cross_entropy(replay(image), label.view(1))
        grads = torch.autograd.grad(loss, list(replay.parameters()))
        with torch.no_grad():
            for p, g in zip(replay.parameters(), grads, strict=True):
                p.sub_(0.5 * g)
    assert sorted(labels.tolist()) == [0, 1, 2, 3]
    for a, b in zip(model.parameters(), replay.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_peer_is_wanted_until_it_ran_at_the_cells_budget():
    from types import SimpleNamespace

    from bench_leakage import wants_peer

    args = SimpleNamespace(breaching_python="/x/python", rerun=False)
    cell = {"attack": "ig", "status": "done", "options": {"iterations": 200, "restarts": 1}}
    assert wants_peer(cell, args)
    assert not wants_peer({**cell, "peer": {"status": "done", "iterations": 200, "restarts": 1}}, args)
    assert wants_peer({**cell, "peer": {"status": "done", "iterations": 24000, "restarts": 1}}, args)
    assert wants_peer({**cell, "peer": {"status": "timeout: over 10 s", "iterations": 200, "restarts": 1}}, args)
    assert not wants_peer({**cell, "attack": "grnn"}, args)
    assert not wants_peer(cell, SimpleNamespace(breaching_python="", rerun=False))


def test_trials_run_later_extend_the_kept_ones():
    from bench_gradient_inversion import merge_trials

    kept = {"trials": 2, "psnr": [10.0, 12.0, 20.0, 22.0], "ssim_mean": 0.2, "label_accuracy": 0.5, "diverged": 0,
            "evaluations": [5, 5], "seconds": 10.0}  # fmt: skip
    fresh = {"psnr": [30.0, 32.0], "ssim": [0.5, 0.5], "ssim_mean": 0.5, "label_accuracy": 1.0, "diverged": 1,
             "evaluations": [None], "seconds": 4.0}  # fmt: skip
    merged = merge_trials(kept, fresh, batch=2)
    assert merged["psnr"] == [10.0, 12.0, 20.0, 22.0, 30.0, 32.0]
    assert merged["psnr_median"] == 21.0 and abs(merged["ssim_mean"] - 0.3) < 1e-12
    assert abs(merged["label_accuracy"] - 2 / 3) < 1e-12 and merged["diverged"] == 1
    assert merged["ssim_median"] is None and merged["seconds_runs"] == [10.0, 4.0] and merged["seconds"] == 14.0
    assert merge_trials(None, fresh, batch=2) is fresh


def test_every_shipped_cell_has_its_best_image():
    """The table in docs/ and the figure are redrawn from benchmarks/results (`--plots-only`): each cell's best
    pair must ship beside it."""
    import json

    from bench_leakage import REPO, RESULTS, best_pair

    for name in ("leakage.json", "leakage-quick.json"):
        report = json.loads((RESULTS / name).read_text())
        for key, cell in report["cells"].items():
            if cell.get("best_image"):
                pair = best_pair(cell, RESULTS)
                assert pair is not None, f"{name}: {key}: {cell['best_image']} (under {REPO})"
                assert pair["truth"].shape == pair["reconstruction"].shape


def test_the_best_figure_marks_a_missing_or_foreign_image(tmp_path, capsys):
    import torch
    from bench_leakage import best_figure

    from fedsim.files import save_tensors

    kept = tmp_path / "leakage_cells" / "pair.safetensors"
    kept.parent.mkdir()
    save_tensors(kept, {"truth": torch.rand(3, 32, 32), "reconstruction": torch.rand(3, 32, 32)})
    images = [str(kept), str(tmp_path / "leakage_cells" / "absent.safetensors"), "../../etc/passwd"]
    cells = {
        f"c{i}": {
            "attack": "ig",
            "state": "untrained",
            "recipe": "fedsgd",
            "batch": 1,
            "psnr": [10.0],
            "best_image": image,
        }  # fmt: skip
        for i, image in enumerate(images)
    }
    out = tmp_path / "leakage_best.png"
    best_figure({"cells": cells}, out)
    assert out.is_file() and out.stat().st_size > 1000
    err = capsys.readouterr().err
    assert "absent.safetensors is missing" in err and "'../../etc/passwd' is not a cell image" in err
    assert "pair.safetensors" not in err
