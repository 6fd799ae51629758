"""SeqMIA: metric functions against hand-computed values, the attention LSTM, the server's replays, end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from attacks.contract import Recipe, RunTrajectory
from attacks.membership_metrics import (
    calibrated_scores,
    membership_report,
    roc_auc,
    roc_curve,
    roc_png,
    sample_metrics,
    tpr_at_fpr,
    tpr_at_fpr_interpolated,
)
from attacks.seqmia import AttentionLSTM, loss_baselines, metric_sequences, train_attack_model
from attacks.seqmia_scores import calibration_references
from attacks.seqmia_sequences import level_states
from attacks.seqmia_shadow import frozen_parameters, replay_client
from tests.conftest import invoke_cli


def test_five_metrics_match_hand_computed_values():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]], dtype=torch.float64))
    m = sample_metrics(logits, torch.tensor([0, 0]))
    assert m.dtype == np.float64 and m.shape == (2, 5)
    ln2 = math.log(2)
    expected0 = [ln2, 0.5, 1 / math.sqrt(72), 1.5 * ln2, 0.5 * ln2 - 0.5 * math.log(0.75)]
    np.testing.assert_allclose(m[0], expected0, rtol=1e-12)
    # wrong and confident: loss -ln 0.1; modified entropy -(0.9) ln 0.1 - 0.1 ln 0.9 - 0.8 ln 0.2
    assert m[1, 0] == pytest.approx(-math.log(0.1), rel=1e-12)
    mentr = -0.9 * math.log(0.1) - 0.1 * math.log(0.9) - 0.8 * math.log(0.2)
    assert m[1, 4] == pytest.approx(mentr, rel=1e-12)


def test_tiny_losses_keep_their_precision_in_float64():
    m = sample_metrics(torch.tensor([[30.0, 0.0], [40.0, 0.0]]), torch.tensor([0, 0]))
    assert 0 < m[1, 0] < m[0, 0] < 1e-12  # float32 would round both losses to 0 and tie them
    assert m[0, 4] > 0  # modified entropy stays finite and positive


def test_roc_auc_and_tpr_at_fpr_by_hand():
    scores, members = np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0], bool)
    fpr, tpr, _ = roc_curve(scores, members)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert roc_auc(scores, members) == pytest.approx(0.75)
    assert tpr_at_fpr(fpr, tpr, 0.01) == 0.5


def test_ties_are_one_threshold_never_broken_by_order():
    scores, members = np.array([1.0, 1.0, 0.0]), np.array([1, 0, 0], bool)
    fpr, tpr, _ = roc_curve(scores, members)
    assert tpr_at_fpr(fpr, tpr, 0.01) == 0.0  # the member shares its score with a non-member
    assert roc_auc(scores, members) == pytest.approx(0.75)  # the tie counts one half
    close = np.array([1.0 + 1e-12, 1.0, 0.0])  # distinct in float64
    assert tpr_at_fpr(*roc_curve(close, members)[:2], 0.01) == 1.0


def test_report_counts_and_measurability():
    rng = np.random.default_rng(0)
    members = np.r_[np.ones(50, bool), np.zeros(500, bool)]
    report = membership_report(rng.normal(size=550) + members, members)
    assert report["members"] == 50 and report["non-members"] == 500 and report["min-fpr"] == 1 / 500
    assert report["tpr@1%fpr-measurable"] and not report["tpr@0.1%fpr-measurable"]
    png = roc_png({"a": (rng.normal(size=550), members)}, "t")
    assert png.startswith(b"\x89PNG")


def test_baselines_use_the_loss_of_the_last_step_and_the_mean():
    seq = np.zeros((2, 3, 5))
    seq[:, :, 0] = [[3.0, 2.0, 1.0], [1.0, 1.0, 2.0]]
    base = loss_baselines(seq)
    np.testing.assert_allclose(base["loss-final"], [-1.0, -2.0])
    np.testing.assert_allclose(base["loss-mean"], [-2.0, -4 / 3])


def toy_sequences(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Members' metrics rise over time, non-members' fall: the same values at every step on average, so only the
    temporal pattern separates them."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(-1, 1, 6)
    labels = rng.integers(0, 2, n)
    trend = np.where(labels[:, None] == 1, ramp, -ramp)
    seq = trend[:, :, None] + 0.3 * rng.normal(size=(n, 6, 5))
    return seq, labels


def test_attention_lstm_learns_a_separable_toy_sequence():
    x, y = toy_sequences(400, 0)
    clf = train_attack_model(x, y, epochs=25, seed=0)
    tx, ty = toy_sequences(400, 1)
    assert roc_auc(clf.score(tx), ty.astype(bool)) > 0.97
    again = train_attack_model(x, y, epochs=25, seed=0)
    np.testing.assert_array_equal(clf.score(tx), again.score(tx))  # same seed, same attack
    assert AttentionLSTM(5, 50)(torch.zeros(3, 4, 5)).shape == (3, 2)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def shift_trainer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, recipe: Recipe, rng: np.random.Generator):
    """A stand-in recipe: every trainable parameter moves by +1."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)


def test_replay_substitutes_the_shadow_for_the_client_and_keeps_frozen_layers():
    torch.manual_seed(0)
    g1 = Tiny().state_dict()
    u1 = {k: v + (0.5 if k.startswith("b") else 0.0) for k, v in g1.items()}  # the client froze layer a
    g2 = {k: v + 0.2 for k, v in g1.items()}
    u2 = {k: v + (0.5 if k.startswith("b") else 0.0) for k, v in g2.items()}
    final = {k: v + 0.3 for k, v in g2.items()}
    run = RunTrajectory(
        [1, 2], {1: g1, 2: g2}, final, {0: {1: u1, 2: u2}}, {0: {1: 0.25, 2: 0.25}}, {1: Recipe(), 2: Recipe()}
    )
    assert frozen_parameters(run, 0) == {"a.weight", "a.bias"}
    shadow = replay_client(Tiny(), run, 0, torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), shift_trainer, seed=0)
    for k in g1:
        moved = 1.0 if k.startswith("b") else 0.0
        torch.testing.assert_close(shadow.uploads[1][k], g1[k] + moved)
        # G'_2 = G_2 + D_2 with D_2 = w (V_1 - U_1); the final model carries D_3 = (1 - w) D_2 + w (V_2 - U_2)
        d2 = 0.25 * (shadow.uploads[1][k] - u1[k])
        torch.testing.assert_close(shadow.globals[2][k], g2[k] + d2)
        torch.testing.assert_close(shadow.final[k], final[k] + 0.75 * d2 + 0.25 * (shadow.uploads[2][k] - u2[k]))
    states = level_states("client", [1, 2], shadow.globals, shadow.uploads, shadow.final)
    assert len(states) == 4 and states[-1] is shadow.uploads[2]  # G1 V1 G2 V2: ends with the last upload
    seqs = metric_sequences((Tiny() for _ in range(3)), torch.randn(7, 4), torch.zeros(7, dtype=torch.long))
    assert seqs.shape == (7, 3, 5)


def test_cli_refuses_mistakes_with_a_clear_message(tmp_path):
    from fedsim.app.cli_model_attacks import membership
    from fedsim.errors import FedsimError

    with pytest.raises(FedsimError, match="does not exist"):
        membership(tmp_path / "nope")
    with pytest.raises(FedsimError, match="not a membership mode"):
        membership(tmp_path, mode=["whitebox"])
    with pytest.raises(FedsimError, match="not a fedsim run"):
        membership(tmp_path)


@pytest.mark.slow
def test_both_attacks_end_to_end_on_a_real_tiny_simulation(tmp_path, ray_head, no_strays):
    from fedsim.app.model_attacks import run_membership
    from fedsim.app.simulation import simulate
    from fedsim.config import FedsimConfig
    from fedsim.files import load_tensors

    config = FedsimConfig.from_mapping(
        {
            "dataset": "sample-mnist",
            "model": "mlp",
            "num-clients": 2,
            "num-rounds": 2,
            "examples-per-client": 24,
            "local-epochs": 2,
            "batch-size": 8,
            "out-dir": str(tmp_path),
            "run-name": "tiny",
        }
    )
    run_dir = simulate(config, tmp_path / "tiny")
    kwargs = {"num_shadows": 2, "epochs": 3, "distill_epochs": 2, "max_nonmembers": 200}
    result = run_membership(run_dir, modes=("fl", "blackbox"), **kwargs)
    for key in ("fl/client", "fl/global", "blackbox/global", "blackbox/client"):
        assert set(result["results"][key]) == {"seqmia", "loss-final", "loss-mean"}
        for report in result["results"][key].values():
            assert 0 <= report["auc"] <= 1 and 0 <= report["tpr@1%fpr"] <= 1
            assert report["members"] == 48 and report["non-members"] > 0
    raw = result["pooled-raw"]["fl/client"]["seqmia"]
    assert raw["members"] == 48 and 0 <= raw["tpr@0.1%fpr"] <= raw["tpr@0.1%fpr-interpolated"] <= 1
    spread = result["per-client-spread"]["fl/client"]["seqmia"]
    assert spread["count"] == 2 and spread["auc"]["min"] <= spread["auc"]["mean"] <= spread["auc"]["max"]
    out = run_dir / "membership"
    assert (out / "roc-fl-client.png").read_bytes().startswith(b"\x89PNG") and (out / "results.json").is_file()
    scores = load_tensors(out / "scores.safetensors")
    assert all(torch.isfinite(t.double()).all() for t in scores.values())
    calibrated = scores["fl/client/seqmia/scores"]
    assert ((calibrated >= 0) & (calibrated <= 1)).all() and "fl/client-raw/seqmia/scores" in scores
    again = run_membership(run_dir, modes=("fl",), clients=[0], **kwargs)  # same seed, same attack
    assert again["per-client"]["0"] == result["per-client"]["0"]

    # `fedsim invert` as a user types it (the command is registered in fedsim/app/cli.py)
    args = ["invert", str(run_dir), "--steps", "4", "--batch-size", "8", "--per-class", "2", "--size", "2"]
    done = invoke_cli(*args, "--evaluator-epochs", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ensemble vs single-model inversion" in done.stdout
    inverted = json.loads((run_dir / "inversion" / "results-client.json").read_text())
    for target in ("client-0", "client-1"):
        entry = inverted["targets"][target]
        assert len(entry["chosen"]) == 2 and 0 <= entry["ensemble"]["accuracy"] <= 1
        assert np.isfinite(entry["single"]["nearest-private-rmse"])
        assert (run_dir / "inversion" / f"{target}-ensemble.png").read_bytes().startswith(b"\x89PNG")


def test_step_and_interpolated_tpr_on_a_hand_made_roc():
    # scores 3 (member), 2 (member, non-member tied), 1 (non-member): ROC (0, 0) (0, .5) (.5, 1) (1, 1)
    scores, members = np.array([3.0, 2.0, 2.0, 1.0]), np.array([1, 1, 0, 0], bool)
    fpr, tpr, _ = roc_curve(scores, members)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    assert tpr_at_fpr(fpr, tpr, 0.25) == 0.5  # no threshold separates more without FPR 0.5
    assert tpr_at_fpr_interpolated(fpr, tpr, 0.25) == pytest.approx(0.75)  # halfway along the tied segment
    assert tpr_at_fpr_interpolated(fpr, tpr, 0.5) == pytest.approx(1.0)
    report = membership_report(scores, members)
    assert report["tpr@1%fpr"] == 0.5 and report["tpr@1%fpr-interpolated"] == pytest.approx(0.51)
    # distinct scores make a staircase ROC: the interpolation then reads the step TPR at every FPR, even below 1/n
    rng = np.random.default_rng(1)
    truth = np.r_[np.ones(50, bool), np.zeros(500, bool)]
    fpr, tpr, _ = roc_curve(rng.normal(size=550) + truth, truth)
    for target in (0.0005, 0.001, 0.0031, 0.01, 0.1):
        assert tpr_at_fpr_interpolated(fpr, tpr, target) == tpr_at_fpr(fpr, tpr, target)


def test_calibration_puts_two_clients_scores_on_one_scale():
    """Two clients' attack models score on different scales: pooled raw scores rank client B's non-members above
    client A's members; mapped to p-values against each client's own non-members, they pool cleanly."""
    rng = np.random.default_rng(0)
    truth = np.r_[np.ones(200, bool), np.zeros(2000, bool)]

    def client(offset: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
        scores = offset + scale * (rng.normal(size=len(truth)) + 2.0 * truth)
        return scores, offset + scale * rng.normal(size=1000)  # (queries, held-out shadow non-members)

    (a, ref_a), (b, ref_b) = client(0.0, 1.0), client(10.0, 5.0)
    both = np.r_[truth, truth]
    raw = roc_auc(np.r_[a, b], both)
    ca, cb = calibrated_scores(a, ref_a), calibrated_scores(b, ref_b)
    calibrated = roc_auc(np.r_[ca, cb], both)
    assert raw < 0.8 < calibrated
    for c, s in ((ca, a), (cb, b)):
        assert ((0 <= c) & (c <= 1)).all()
        assert roc_auc(c, truth) == pytest.approx(roc_auc(s, truth))  # a client's own ranking is kept
    assert (np.diff(calibrated_scores(np.sort(a), ref_a)) > 0).all()  # strictly increasing, tails included
    np.testing.assert_allclose(calibrated_scores(np.array([0.0]), np.array([-1.0, 1.0])), [0.5])


def test_calibration_references_are_the_held_out_shadow_non_members():
    x, y = toy_sequences(200, 0)
    clf = train_attack_model(x, y, epochs=2, seed=0)
    notes: list[str] = []
    refs = calibration_references(clf, x, y, notes)
    held = clf.held_out[y[clf.held_out] == 0]
    assert len(clf.held_out) == 40 and not notes
    np.testing.assert_array_equal(refs["seqmia"], clf.score(x[held]))
    assert len(refs["loss-final"]) == (y == 0).sum()  # the baselines learn nothing: every shadow non-member
    unheld = train_attack_model(x, y, epochs=2, seed=0, validation=0)
    assert len(calibration_references(unheld, x, y, notes)["seqmia"]) == (y == 0).sum() and len(notes) == 1
