"""Steps along −∇ from Inverting Gradients' kept images: the objective's change against its linear prediction.

Reads the kept images that benchmarks/bench_ig_finish.py saved (--kept FILE, the untrained ConvNet, FedSGD,
batch 1), and for each photo and step size t moves the image to x − t·∇f(x), f the cosine distance of the
gradients (+ TV·anisotropic TV), in float32 and float64. Prints one JSON line per photo and precision: the
change of f, the first-order prediction −t·‖∇f‖², the largest pixel change and how many ReLUs and max-pool
choices switched (first convolution's ReLUs, its pool, second convolution's ReLUs, its pool). Where a switch
jumps f the objective is not smooth there and a line search stalls.

    PYTHONPATH=$PWD python benchmarks/bench_ig_finish.py --idx 5810 5860 5942 5070 \
        --opt preset=features feature_weight=10.0 feature_decay=linear --kept /tmp/ig_kept_combo.safetensors
    PYTHONPATH=$PWD python benchmarks/bench_ig_steps.py --idx 5810 5860 5942 5070 --kept /tmp/ig_kept_combo.safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attacks.base import model_gradients  # noqa: E402
from attacks.inverting_gradients import cosine_distance  # noqa: E402
from attacks.priors import total_variation  # noqa: E402
from benchmarks.bench_ig_finish import read_kept  # noqa: E402
from benchmarks.bench_ig_peer import cifar_test  # noqa: E402
from fedsim.models import build_model  # noqa: E402


def pool_choice(h: torch.Tensor) -> torch.Tensor:
    """Which entry of each 2×2 window the max-pool takes."""
    return torch.nn.functional.max_pool2d(h, 2, return_indices=True)[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idx", type=int, nargs="+", required=True)
    parser.add_argument("--kept", type=Path, required=True, help="bench_ig_finish.py's --kept file")
    parser.add_argument("--tv", type=float, default=0.0, help="TV weight added to the cosine distance")
    parser.add_argument("--t", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1, 1.0, 10.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y = cifar_test(args.idx)
    saved = read_kept(args.kept)
    if saved["idx"] != args.idx:
        raise SystemExit(f"{args.kept} holds photos {saved['idx']}")
    base = build_model("convnet", tuple(x.shape[1:]), 10, seed=0).train()
    for dtype in (torch.float32, torch.float64):
        model = copy.deepcopy(base).to(dtype)
        for i, photo in enumerate(args.idx):
            label = y[i : i + 1]
            observed = model_gradients(model, x[i : i + 1].to(dtype), label)

            def f(z: torch.Tensor, observed=observed, label=label, model=model) -> tuple[float, torch.Tensor]:
                z = z.detach().clone().requires_grad_()
                value = cosine_distance(model_gradients(model, z, label, create_graph=True), observed)
                value = value + args.tv * total_variation(z)
                return float(value.detach()), torch.autograd.grad(value, z)[0]

            def signs(z: torch.Tensor, model=model) -> list[torch.Tensor]:
                """The ReLUs' signs and the max-pools' choices of both convolution blocks."""
                first = model.body[:2](z)
                second = model.body[3:5](model.body[2](first))
                return [first > 0, pool_choice(first), second > 0, pool_choice(second)]

            z0 = saved["kept"][i].to(dtype)
            v0, g0 = f(z0)
            s0, steps = signs(z0), []
            for t in args.t:
                z = z0 - t * g0
                flips = [int((a != b).sum()) for a, b in zip(signs(z), s0, strict=True)]
                change = f(z)[0] - v0
                steps.append({"t": t, "df": float(f"{change:.3g}"), "linear": float(f"{-t * float((g0**2).sum()):.3g}"),
                              "max_dx": float(f"{t * float(g0.abs().max()):.2g}"), "switches": flips})  # fmt: skip
            print(
                json.dumps(
                    {"photo": photo, "dtype": str(dtype).split(".")[-1], "f": float(f"{v0:.4g}"), "steps": steps}
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
