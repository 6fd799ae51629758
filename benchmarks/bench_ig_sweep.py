"""One setting of Inverting Gradients on real CIFAR-10 test photos, FedSGD, batch 1: PSNR per image, one JSON line.

The FedSGD gradient of each photo on fedsim's model (seed 0; the ResNet-20 with its pretrained weights, in
training mode as the clients compute it), the targets solved together, PSNR by fedsim's scorer. Appends to
benchmarks/results/ig_sweep.jsonl, one line per setting (with the kept images' plain cosine distance over all
parameters and per parameter tensor, whichever distance the attack matched):

    PYTHONPATH=$PWD python benchmarks/bench_ig_sweep.py --idx 9000 9001 9002 --opt restarts=1 feature_weight=1.0 \
        --tag feat1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attacks import get_attack  # noqa: E402
from attacks.base import model_gradients, reconstruct_many  # noqa: E402
from attacks.inverting_gradients import cosine_distance  # noqa: E402
from benchmarks.bench_ig_peer import fedsgd_targets, option_value  # noqa: E402
from fedsim.scoring import score  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idx", type=int, nargs="+", default=[9000])
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--opt", nargs="*", default=[], help="ig options KEY=VALUE")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y, model, targets = fedsgd_targets(args.idx, args.model)
    options = dict(option_value(o) for o in args.opt)
    start = time.time()
    results = reconstruct_many(get_attack("ig", **options), targets)
    seconds = time.time() - start
    psnr = [score(r.images, r.labels, x[i : i + 1], y[i : i + 1])["psnr"][0] for i, r in enumerate(results)]
    kept = [model_gradients(model, r.images, r.labels) for r in results]  # the kept images' own gradients
    plain = [float(cosine_distance(g, t.gradients)) for g, t in zip(kept, targets, strict=True)]
    layers = [
        [float(cosine_distance([a], [b])) for a, b in zip(g, t.gradients, strict=True)]
        for g, t in zip(kept, targets, strict=True)
    ]
    line = {
        "tag": args.tag,
        "model": args.model,
        "opts": options,
        "idx": args.idx,
        "psnr": [round(v, 2) for v in psnr],
        "cos": [float(f"{r.loss:.3g}") for r in results],  # the attack's own distance (cosine or paramwise)
        "cos_all": [float(f"{v:.3g}") for v in plain],  # one cosine over all parameters, whatever the distance
        "cos_layers": [[float(f"{v:.2g}") for v in per] for per in layers],  # 1 - cos per parameter tensor
        **(
            {"fit": [float(f"{min(r.info['feature_fit_objective']):.3g}") for r in results]}
            if "feature_fit_objective" in results[0].info
            else {}
        ),
        "median": float(np.median(psnr)),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(line))
    out = REPO / "benchmarks" / "results" / "ig_sweep.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
