"""Differential-privacy arithmetic: Gaussian noise calibration and epsilon of composed Gaussian releases.

Pure math (scipy and Google's dp-accounting, the backend of Flower's own RdpAccountant, imported when
needed): the config validates DP settings with it before anything runs, and the local-DP mod calibrates
its noise with it.
The run's reported epsilon comes from Flower's accountant (server/dp.py), which these numbers match.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np

CENTRAL_DP = ("none", "server-fixed", "client-fixed", "adaptive-server", "adaptive-client")
"""Central DP with Flower's strategy wrappers (server/dp.py): who clips, and whether the norm adapts."""
CLASSIC = "classic"
ANALYTIC = "analytic-gaussian"
MAX_NOISE_MULTIPLIER = 1e4
"""The largest noise multiplier a target epsilon may ask for: beyond it the released model is noise."""


def classic_gaussian_std(epsilon: float, delta: float, sensitivity: float) -> float:
    """Dwork and Roth's Gaussian mechanism, σ = Δ·sqrt(2 ln(1.25/δ))/ε: (ε, δ)-DP only for ε < 1 (their Thm 3.22)."""
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


def analytic_gaussian_delta(epsilon: float, sigma: float, sensitivity: float) -> float:
    """The exact δ of the Gaussian mechanism at ε (Balle and Wang 2018, Theorem 8), for any ε >= 0.

    δ(ε) = Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ), computed in logs so that large ε stays finite.
    """
    from scipy.special import log_ndtr

    a = sensitivity / (2 * sigma) - epsilon * sigma / sensitivity
    b = -sensitivity / (2 * sigma) - epsilon * sigma / sensitivity
    log_a, log_b = float(log_ndtr(a)), float(log_ndtr(b))
    return math.exp(log_a) * -math.expm1(min(epsilon + log_b - log_a, 0.0))


def analytic_gaussian_std(epsilon: float, delta: float, sensitivity: float) -> float:
    """The smallest σ whose Gaussian mechanism is (ε, δ)-DP (Balle and Wang 2018, Theorem 8 solved for σ)."""
    from scipy.optimize import brentq

    def excess(log_sigma: float) -> float:
        return math.log(max(analytic_gaussian_delta(epsilon, math.exp(log_sigma), sensitivity), 1e-300)) - math.log(
            delta
        )

    low, high = math.log(sensitivity) - 20.0, math.log(sensitivity) + 20.0
    return math.exp(brentq(excess, low, high, xtol=1e-12))


@functools.lru_cache(maxsize=64)
def local_dp_calibration(epsilon: float, delta: float, sensitivity: float, choice: str = "auto") -> tuple[str, float]:
    """(calibration, σ) for one local-DP release: the classic bound where it holds (ε < 1), else the analytic one."""
    if choice == CLASSIC or (choice == "auto" and epsilon < 1):
        return CLASSIC, classic_gaussian_std(epsilon, delta, sensitivity)
    return ANALYTIC, analytic_gaussian_std(epsilon, delta, sensitivity)


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float, sampling_rate: float = 1.0) -> float:
    """ε at δ of `releases` Gaussian releases of noise multiplier z, each on a Poisson sample of rate q (RDP)."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    if releases == 0:
        return 0.0
    event = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_event.PoissonSampledDpEvent(sampling_rate, event)
    accountant = RdpAccountant()
    accountant.compose(event, releases)
    return float(accountant.get_epsilon(delta))


@functools.lru_cache(maxsize=64)
def noise_for_epsilon(target: float, releases: int, delta: float, high: float = MAX_NOISE_MULTIPLIER) -> float | None:
    """The noise multiplier whose `releases` Gaussian releases spend `target` ε at δ; None if `high` spends more."""
    from scipy.optimize import brentq

    if gaussian_epsilon(high, releases, delta) > target:
        return None

    def excess(log_z: float) -> float:
        return gaussian_epsilon(math.exp(log_z), releases, delta) - target

    low = math.log(1e-3)
    if excess(low) <= 0:
        return 1e-3
    log_z = brentq(excess, low, math.log(high), xtol=1e-6)
    return float(np.nextafter(math.exp(log_z), math.inf))  # just above the root: ε never over the target


def central_dp_problem(central_dp: str, recipe: str, shard_sizes: list[int], dtypes: dict[str, str]) -> str | None:
    """Why a run cannot have central DP with these shards and this model, or None.

    Flower's DP wrappers clip and noise every tensor of the model (an integer counter cannot take noise), and
    their accounting holds for FedAvg's average with equal weights: every client's shard the same size.
    """
    if central_dp == "none":
        return None
    counters = [name for name, dtype in dtypes.items() if "float" not in dtype]
    if counters:
        return (
            f"central-dp = {central_dp} adds noise to every tensor of the model, but {counters[0]} is an "
            "integer counter; choose a model without BatchNorm (e.g. mlp, lenet-dlg, convnet)"
        )
    if recipe == "fedavg" and len(set(shard_sizes)) > 1:
        return (
            f"central-dp = {central_dp} needs equal client weights, but the shards hold {min(shard_sizes)} to "
            f"{max(shard_sizes)} examples; set examples-per-client to at most {min(shard_sizes)}"
        )
    return None


def privacy_line(run_dir: Path) -> str:
    """The run's privacy in one sentence, from its privacy.json ('' when the run has no DP or the file is unusable).

    The file is read as untrusted: only finite numbers and known words make it into the sentence.
    """
    try:
        data = json.loads((Path(run_dir) / "privacy.json").read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(data, dict):
        return ""
    parts = []
    central, local = _spent(data.get("central")), _spent(data.get("local"))
    if central:
        mode = data["central"].get("central-dp")
        mode = mode if mode in CENTRAL_DP else "central"
        releases = data["central"].get("releases")
        rounds = releases if isinstance(releases, int) and not isinstance(releases, bool) and releases >= 0 else "?"
        parts.append(f"central DP ({mode}): {central} for the released model over {rounds} rounds")
    if local:
        calibration = data["local"].get("calibration")
        calibration = calibration if calibration in (CLASSIC, ANALYTIC) else "Gaussian"
        parts.append(f"local DP ({calibration} noise): {local} per client over the rounds it took part in")
    return ("Privacy: " + "; ".join(parts) + ".") if parts else ""


def _spent(part: object) -> str:
    """'ε = 1.23 at δ = 1e-05' from one account of privacy.json, or '' when its numbers are not finite."""
    if not isinstance(part, dict):
        return ""
    epsilon, delta = part.get("epsilon"), part.get("delta")
    numbers = [v for v in (epsilon, delta) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != 2 or not all(math.isfinite(v) for v in numbers):
        return ""
    return f"ε = {epsilon:.3g} at δ = {delta:.3g}"
