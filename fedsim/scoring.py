"""Scoring of reconstructions against the true batch: order-free matching, PSNR, SSIM, label accuracy."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics.functional.image import structural_similarity_index_measure

from fedsim.errors import FedsimError

# PSNR is computed in float64 with this MSE floor, so identical images score a finite
# 10·log10(1/1e-30) = 300 dB, while float32-exact reconstructions (MSE ~1e-15) show ~150 dB.
MSE_FLOOR = 1e-30
PSNR_CAP = 10 * np.log10(1 / MSE_FLOOR)


def _check(reconstructed: torch.Tensor, truth: torch.Tensor) -> None:
    if reconstructed.dim() != 4 or reconstructed.shape != truth.shape:
        raise FedsimError(
            f"cannot score: reconstruction {tuple(reconstructed.shape)} vs truth {tuple(truth.shape)}; "
            "both must be [B, C, H, W] of the same shape"
        )


def pairwise_psnr(reconstructed: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """PSNR (data range 1, float64) of every reconstruction i against every true image j: [B, B]."""
    a = reconstructed.detach().cpu().double().flatten(1)
    b = truth.detach().cpu().double().flatten(1)
    mse = ((a[:, None, :] - b[None, :, :]) ** 2).mean(-1)
    return 10 * torch.log10(1 / mse.clamp(min=MSE_FLOOR))


def match(reconstructed: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """order[j] = index of the reconstruction assigned to true image j, maximising the summed PSNR
    (scipy's linear_sum_assignment on -PSNR), so that the batch order of a reconstruction is irrelevant."""
    _check(reconstructed, truth)
    cost = -pairwise_psnr(reconstructed, truth).numpy()
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(cols), dtype=np.int64)
    order[cols] = rows
    return order


def ssim(reconstructed: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (torchmetrics, data range 1, gaussian kernel 11x11 with sigma 1.5).

    Images smaller than 11 pixels use the largest odd kernel that fits, with sigma scaled by
    kernel/11 so the window keeps the same shape relative to its size (documented choice).
    """
    _check(reconstructed, truth)
    side = min(truth.shape[-2:])
    kernel = 11 if side >= 11 else max(1, side - (1 - side % 2))
    sigma = 1.5 * kernel / 11
    values = structural_similarity_index_measure(
        reconstructed.detach().cpu().double(),
        truth.detach().cpu().double(),
        gaussian_kernel=True,
        kernel_size=kernel,
        sigma=sigma,
        data_range=1.0,
        reduction="none",
    )
    return values.reshape(-1)


def _lpips(reconstructed: torch.Tensor, truth: torch.Tensor) -> torch.Tensor | None:
    """LPIPS (AlexNet) only when the package and its backbone weights are already on disk; never downloads."""
    try:
        import lpips  # type: ignore[import-not-found]
    except ImportError:
        return None
    weights = Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth"
    if not weights.exists() or min(truth.shape[-2:]) < 32:
        return None
    try:
        metric = lpips.LPIPS(net="alex", verbose=False)
        a, b = reconstructed.detach().cpu().float(), truth.detach().cpu().float()
        if a.shape[1] == 1:
            a, b = a.repeat(1, 3, 1, 1), b.repeat(1, 3, 1, 1)
        with torch.no_grad():
            return metric(a * 2 - 1, b * 2 - 1).reshape(-1).double()
    except Exception:  # a broken local install must not break scoring: LPIPS is optional
        return None


def score(
    reconstruction_images: torch.Tensor,
    reconstruction_labels: torch.Tensor,
    true_images: torch.Tensor,
    true_labels: torch.Tensor,
) -> dict:
    """Match reconstructions to true images, then per-image PSNR/SSIM, label accuracy and batch summaries.

    label_accuracy compares labels of matched pairs; label_count_accuracy compares the label
    multisets (what label inference alone can know for a batch).
    """
    _check(reconstruction_images, true_images)
    order = match(reconstruction_images, true_images)
    rec = reconstruction_images.detach().cpu()[torch.as_tensor(order)]
    rec_labels = reconstruction_labels.detach().cpu().long()[torch.as_tensor(order)]
    true_labels = true_labels.detach().cpu().long()
    psnr = pairwise_psnr(rec, true_images).diagonal()
    ssim_values = ssim(rec, true_images)
    correct = rec_labels == true_labels
    common = Counter(rec_labels.tolist()) & Counter(true_labels.tolist())
    result = {
        "order": order.tolist(),
        "psnr": psnr.tolist(),
        "ssim": ssim_values.tolist(),
        "psnr_mean": float(psnr.mean()),
        "psnr_median": float(np.median(psnr.numpy())),
        "ssim_mean": float(ssim_values.mean()),
        "ssim_median": float(np.median(ssim_values.numpy())),
        "labels_correct": correct.tolist(),
        "label_accuracy": float(correct.double().mean()),
        "label_count_accuracy": sum(common.values()) / len(true_labels),
    }
    lpips_values = _lpips(rec, true_images)
    if lpips_values is not None:
        result.update(lpips=lpips_values.tolist(), lpips_mean=float(lpips_values.mean()))
    return result
