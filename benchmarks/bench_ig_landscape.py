"""How sharp Inverting Gradients' objective is around the truth: untrained ConvNet, FedSGD, batch 1.

Two measurements on real CIFAR-10 test photos (fedsim's ConvNet, seed 0, the photos' true labels):

1. The cosine distance (over all parameters, and per parameter tensor) between the photo's gradient and the
   gradient of the photo plus Gaussian pixel noise of each σ in --sigmas (clamped to [0, 1]), beside that
   image's PSNR: how far from the truth an image may be for a given distance.
2. Inverting Gradients started from the photo plus noise of σ = --start-sigma instead of from its own
   random draw (the attack's `initial_images` replaced for this run only), at each --lr: whether the
   attack, started close, climbs to the truth or drifts off.

Writes benchmarks/results/ig_landscape.json; the table is in docs/attacks.md:

    PYTHONPATH=$PWD python benchmarks/bench_ig_landscape.py --idx 1032 2890 7105 7700
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attacks import get_attack, ig_setup  # noqa: E402
from attacks.base import model_gradients, reconstruct_many  # noqa: E402
from attacks.inverting_gradients import cosine_distance  # noqa: E402
from benchmarks.bench_ig_peer import fedsgd_targets  # noqa: E402
from fedsim.files import atomic_write_json  # noqa: E402
from fedsim.scoring import score  # noqa: E402


def noisy(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    return (x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(0, 1)


def near_truth(x: torch.Tensor, sigma: float):
    """A stand-in for ig_setup.initial_images: with restarts=1 it is called once per target, in target order,
    and returns that target's photo plus noise of σ (seed 7 + its position)."""
    calls = iter(range(len(x)))

    def initial_images(init: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        i = next(calls)
        return noisy(x[i : i + 1], sigma, 7 + i)

    return initial_images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idx", type=int, nargs="+", default=[1032, 2890, 7105, 7700])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.05, 0.1])
    parser.add_argument("--start-sigma", type=float, default=0.05)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--iterations", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y, model, targets = fedsgd_targets(args.idx)
    psnr = lambda image, i: float(score(image, y[i : i + 1], x[i : i + 1], y[i : i + 1])["psnr"][0])  # noqa: E731
    curve = []
    for i, t in enumerate(targets):
        for j, sigma in enumerate(args.sigmas):
            image = noisy(x[i : i + 1], sigma, 1000 * i + j)
            g = model_gradients(model, image, y[i : i + 1])
            layers = [float(cosine_distance([a], [b])) for a, b in zip(g, t.gradients, strict=True)]
            row = {"idx": args.idx[i], "sigma": sigma, "psnr": round(psnr(image, i), 2)}
            row |= {
                "cos": float(f"{float(cosine_distance(g, t.gradients)):.3g}"),
                "cos_layers": [float(f"{v:.2g}") for v in layers],
            }
            curve.append(row)
            print(json.dumps(row), flush=True)
    started = []
    real_initial_images = ig_setup.initial_images
    for lr in args.lr:
        ig_setup.initial_images = near_truth(x, args.start_sigma)
        try:
            start = time.time()
            results = reconstruct_many(
                get_attack("ig", preset="paper", restarts=1, iterations=args.iterations, lr=lr), targets
            )
        finally:
            ig_setup.initial_images = real_initial_images
        row = {
            "lr": lr,
            "start_sigma": args.start_sigma,
            "iterations": args.iterations,
            "start_psnr": [round(psnr(noisy(x[i : i + 1], args.start_sigma, 7 + i), i), 2) for i in range(len(y))],
            "psnr": [round(psnr(r.images, i), 2) for i, r in enumerate(results)],
            "cos": [float(f"{r.loss:.3g}") for r in results],
            "seconds": round(time.time() - start, 1),
        }
        started.append(row)
        print(json.dumps(row), flush=True)
    atomic_write_json(
        REPO / "benchmarks" / "results" / "ig_landscape.json",
        {"idx": args.idx, "curve": curve, "started_near_truth": started},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
