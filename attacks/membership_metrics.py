"""Membership-inference metrics: per-sample signals (SeqMIA's five) and Carlini et al.'s ROC figures, in float64."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

METRIC_NAMES = ("loss", "max-prob", "prob-std", "entropy", "modified-entropy")
FPR_TARGETS = (0.01, 0.001)


def sample_metrics(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """SeqMIA's five metrics of each sample [N, 5] in float64: loss, max probability, standard deviation of the
    probabilities, entropy and Song & Mittal's modified entropy, computed from the logits in float64.

    Modified entropy: -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i), with log(1 - p_i) taken as the
    log-sum-exp of the other logits minus that of all logits, so confident predictions keep their precision.
    """
    z = logits.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    n, k = z.shape
    rows = torch.arange(n)
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    log_p = z - lse
    p = log_p.exp()
    # log(1 - p_i) = logsumexp_{j != i} z_j - logsumexp_j z_j: exact even where 1 - p_i rounds to 0
    others = z.unsqueeze(1).expand(-1, k, -1).masked_fill(torch.eye(k, dtype=torch.bool), float("-inf"))
    lse_others = torch.logsumexp(others, dim=2)
    log_not = lse_others - lse
    # the loss -log p_y = log(1 + exp(lse_{j != y} - z_y)), which keeps losses far below 1e-16 distinct
    loss = F.softplus(lse_others[rows, y] - z[rows, y], threshold=50)
    max_prob = p.max(dim=1).values
    std = p.std(dim=1, unbiased=False)
    entropy = -(p * log_p).sum(dim=1)
    terms = torch.nan_to_num(-p * log_not, nan=0.0)  # 0 * log 0 = 0
    terms[rows, y] = 0.0
    mentropy = log_not[rows, y].exp() * loss + terms.sum(dim=1)
    return torch.stack([loss, max_prob, std, entropy, mentropy], dim=1).numpy()


def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of `scores` (higher = member) with one point per distinct score, so tied scores are never split.

    Returns (fpr, tpr, thresholds), starting at (0, 0) with threshold +inf; float64 throughout.
    """
    s = np.asarray(scores, dtype=np.float64)
    m = np.asarray(is_member, dtype=bool)
    if s.shape != m.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {m.shape} must be 1-D of the same length")
    if not np.isfinite(s).all():
        raise ValueError("membership scores must be finite")
    n_pos, n_neg = int(m.sum()), int((~m).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"an ROC needs members and non-members; got {n_pos} and {n_neg}")
    order = np.argsort(-s, kind="mergesort")
    s, m = s[order], m[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tps = np.cumsum(m)[last_of_value]
    fps = np.cumsum(~m)[last_of_value]
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    return fpr, tpr, np.r_[np.inf, s[last_of_value]]


def roc_auc(scores: np.ndarray, is_member: np.ndarray) -> float:
    """Area under the ROC (ties count one half, as in the Mann-Whitney statistic)."""
    fpr, tpr, _ = roc_curve(scores, is_member)
    return float(np.trapezoid(tpr, fpr))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Step TPR: the highest TPR among thresholds whose FPR is at most `target` (0 if none but the empty one)."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max())


def tpr_at_fpr_interpolated(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Interpolated TPR, as SeqMIA's paper computes it: the ROC's polyline read at `target` (numpy.interp on the
    ROC points). Never below the step TPR; equal to it wherever the scores are distinct (the ROC is then a
    staircase, flat from a false positive to the next member), above it only across a score that members and
    non-members share, whose diagonal segment credits members no threshold separates."""
    return float(np.interp(target, fpr, tpr))


def calibrated_scores(scores: np.ndarray, reference: np.ndarray, tail: float = 0.1) -> np.ndarray:
    """Scores mapped onto one scale: 1 - the empirical p-value against `reference`, held-out non-member scores of
    the same attack model (the share of reference scores below a score, ties counting one half).

    Between reference scores the map is linear, so it is strictly increasing and a client's own ranking is kept;
    beyond the largest (smallest) reference score it decays exponentially towards 1 (0) with the mean excess of
    the top (bottom) `tail` share of the references as the scale (a peaks-over-threshold exponential tail).
    Returns values in [0, 1], float64.
    """
    s = np.asarray(scores, dtype=np.float64)
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    if ref.ndim != 1 or len(ref) < 2 or not np.isfinite(ref).all() or not np.isfinite(s).all():
        raise ValueError("calibration needs at least two finite reference scores and finite scores")
    m = len(ref)
    cdf = (np.arange(m) + 0.5) / m  # mid-ranks: distinct references, and ties averaged by the interpolation
    out = np.interp(s, ref, cdf)
    k = max(2, int(np.ceil(tail * m)))
    top = max(float(np.mean(ref[-k:] - ref[-k])), 1e-12)
    bottom = max(float(np.mean(ref[k - 1] - ref[:k])), 1e-12)
    hi, lo = s > ref[-1], s < ref[0]
    out[hi] = 1.0 - (0.5 / m) * np.exp(-(s[hi] - ref[-1]) / top)
    out[lo] = (0.5 / m) * np.exp(-(ref[0] - s[lo]) / bottom)
    return out


def membership_report(scores: np.ndarray, is_member: np.ndarray) -> dict:
    """AUC, TPR at 1 % and 0.1 % FPR, balanced accuracy, and the counts that bound what is measurable.

    `tpr@X%fpr` is the step TPR (a threshold that reaches it exists); `tpr@X%fpr-interpolated` is the paper's
    linear interpolation of the ROC at X %. A TPR at FPR f is only measured when there are at least 1/f
    non-members (`measurable`); the smallest measurable FPR is 1 / non-members.
    """
    fpr, tpr, _ = roc_curve(scores, is_member)
    m = np.asarray(is_member, dtype=bool)
    n_pos, n_neg = int(m.sum()), int((~m).sum())
    report = {
        "auc": float(np.trapezoid(tpr, fpr)),
        "members": n_pos,
        "non-members": n_neg,
        "min-fpr": 1.0 / n_neg,
        "balanced-accuracy": float(np.max(1 - (fpr + (1 - tpr)) / 2)),
    }
    for target in FPR_TARGETS:
        key = f"tpr@{target * 100:g}%fpr"
        report[key] = tpr_at_fpr(fpr, tpr, target)
        report[f"{key}-interpolated"] = tpr_at_fpr_interpolated(fpr, tpr, target)
        report[f"{key}-measurable"] = bool(n_neg * target >= 1)
    return report


SUMMARY_KEYS = ("auc", "balanced-accuracy") + tuple(
    f"tpr@{t * 100:g}%fpr{suffix}" for t in FPR_TARGETS for suffix in ("", "-interpolated")
)


def spread(reports: list[Mapping]) -> dict:
    """Mean, standard deviation (n - 1), min and max of each report figure over several reports (e.g. clients)."""
    out: dict = {"count": len(reports)}
    for key in SUMMARY_KEYS:
        values = np.array([r[key] for r in reports], dtype=np.float64)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[key] = {"mean": float(values.mean()), "std": std, "min": float(values.min()), "max": float(values.max())}
    out["measurable"] = {
        f"tpr@{t * 100:g}%fpr": all(r[f"tpr@{t * 100:g}%fpr-measurable"] for r in reports) for t in FPR_TARGETS
    }
    return out


def format_report(name: str, report: Mapping) -> str:
    """One line: AUC and TPR at low FPR with the numbers of members and non-members."""
    parts = [f"{name}: AUC {report['auc']:.4f}"]
    for target in FPR_TARGETS:
        key = f"tpr@{target * 100:g}%fpr"
        mark = "" if report[f"{key}-measurable"] else " (below 1/n)"
        parts.append(f"TPR@{target * 100:g}%FPR {report[key]:.4f}{mark}")
    parts.append(f"n = {report['members']} members / {report['non-members']} non-members")
    return ", ".join(parts)


def roc_png(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], title: str) -> bytes:
    """ROC curves {name: (scores, is_member)} on log-log axes (Carlini et al. 2022), as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.5), dpi=110)
    ax = fig.add_subplot()
    floor, counts = 1.0, ""
    for name, (scores, is_member) in curves.items():
        m = np.asarray(is_member, dtype=bool)
        counts = counts or f"\n{int(m.sum())} members / {int((~m).sum())} non-members"
        fpr, tpr, _ = roc_curve(scores, is_member)
        n_neg = int((~np.asarray(is_member, dtype=bool)).sum())
        floor = min(floor, 0.5 / n_neg)
        auc = float(np.trapezoid(tpr, fpr))
        ax.plot(np.maximum(fpr, 0.5 / n_neg), np.maximum(tpr, 0.5 / n_neg), label=f"{name} (AUC {auc:.3f})")
    ax.plot([floor, 1], [floor, 1], "k--", lw=0.8, label="chance")
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(floor, 1),
        ylim=(floor, 1),
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title + counts,
    )
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
