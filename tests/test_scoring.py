"""Tests of fedsim.scoring: order-free matching, hand-checked PSNR, SSIM on tiny images, label accuracy."""

from __future__ import annotations

import math

import pytest
import torch

from fedsim.errors import FedsimError
from fedsim.scoring import PSNR_CAP, match, pairwise_psnr, score, ssim


def _batch(seed: int = 0, b: int = 5, size: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_psnr_hand_checked() -> None:
    truth = torch.zeros(2, 1, 4, 4)
    rec = torch.stack([torch.full((1, 4, 4), 0.125), torch.full((1, 4, 4), 0.5)])
    psnr = pairwise_psnr(rec, truth).diagonal()
    assert psnr[0].item() == pytest.approx(10 * math.log10(64), abs=1e-9)  # MSE 1/64: 18.06 dB
    assert psnr[1].item() == pytest.approx(10 * math.log10(4), abs=1e-9)  # MSE 0.25 -> 6.02 dB


def test_identical_images_hit_the_finite_cap_and_float32_error_is_visible() -> None:
    truth = _batch()
    result = score(truth.clone(), torch.zeros(5), truth, torch.zeros(5))
    assert all(p == pytest.approx(PSNR_CAP) for p in result["psnr"])
    assert math.isfinite(result["psnr_mean"]) and result["psnr_mean"] >= 100
    nudged = truth + 1e-6  # float64 PSNR keeps tiny errors measurable: 10·log10(1/1e-12) = 120 dB
    assert score(nudged, torch.zeros(5), truth, torch.zeros(5))["psnr_median"] == pytest.approx(120, abs=0.5)


def test_permuted_batch_scores_the_same_and_match_inverts_the_permutation() -> None:
    truth = _batch(1)
    labels = torch.tensor([0, 1, 2, 3, 4])
    noisy = (truth + 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    perm = torch.tensor([3, 0, 4, 1, 2])
    straight = score(noisy, labels, truth, labels)
    permuted = score(noisy[perm], labels[perm], truth, labels)
    assert permuted["psnr"] == pytest.approx(straight["psnr"])
    assert permuted["ssim"] == pytest.approx(straight["ssim"])
    assert permuted["label_accuracy"] == straight["label_accuracy"] == 1.0
    order = match(noisy[perm], truth)
    assert torch.equal(perm[torch.as_tensor(order)], torch.arange(5))


def test_label_accuracy_after_matching_and_label_counts() -> None:
    truth = _batch(3, b=4)
    true_labels = torch.tensor([1, 1, 2, 3])
    rec_labels = torch.tensor([1, 2, 1, 5])  # matched pairs: 1 ok, 2≠1, 1≠2, 5≠3 -> 1/4
    result = score(truth.clone(), rec_labels, truth, true_labels)
    assert result["label_accuracy"] == 0.25
    assert result["label_count_accuracy"] == 0.75  # multisets share {1, 1, 2}


def test_ssim_on_tiny_images_uses_a_smaller_kernel() -> None:
    for size in (4, 8, 11, 16):
        truth = _batch(4, b=2, size=size)
        same = ssim(truth, truth)
        assert same.shape == (2,) and torch.allclose(same, torch.ones(2, dtype=same.dtype), atol=1e-6)
        other = ssim(_batch(5, b=2, size=size), truth)
        assert (other < 0.5).all()


def test_shape_mismatch_is_a_user_error() -> None:
    with pytest.raises(FedsimError, match="cannot score"):
        score(_batch(b=2), torch.zeros(2), _batch(b=3), torch.zeros(3))


def test_lpips_is_omitted_without_local_weights() -> None:
    result = score(_batch(b=2, size=32), torch.zeros(2), _batch(6, b=2, size=32), torch.zeros(2))
    try:
        import lpips  # noqa: F401
    except ImportError:
        assert "lpips" not in result
