"""Longer L-BFGS finishes of Inverting Gradients' kept iterate, PSNR tracked along the way (FedSGD, batch 1).

One IG run (its options via --opt, `polish` forced to 0) on CIFAR-10 test photos as benchmarks/bench_ig_sweep.py
builds them, then from its kept images each --finish NAME[:TV] runs L-BFGS (Armijo backtracking, attacks.lbfgs)
on one gradient distance + TV·(anisotropic TV, default 0): `cosine` (IG's), `paramwise` (the mean of each
parameter's cosine distance) or `l2` (DLG's squared distance, relative to ||g||²), boxed to [0, 1] where measured.
Prints and appends one JSON line per finish to benchmarks/results/ig_finish.jsonl: PSNR and cosine distance per
photo at each --at step.

    PYTHONPATH=$PWD python benchmarks/bench_ig_finish.py --idx 5810 5860 --opt preset=features \
        --finish cosine:0.01 l2 --at 30 100 300 --kept /tmp/kept.safetensors  # a second call with --kept reuses the run
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
from attacks.base import reconstruct_many  # noqa: E402
from attacks.inverting_gradients import cosine_distance, paramwise_cosine_distance  # noqa: E402
from attacks.lbfgs import BatchedLBFGS  # noqa: E402
from attacks.priors import total_variation  # noqa: E402
from attacks.problems import stack_problems, stack_targets, value_and_grad  # noqa: E402
from benchmarks.bench_ig_peer import fedsgd_targets, option_value  # noqa: E402
from fedsim.files import load_tensors, save_tensors  # noqa: E402
from fedsim.scoring import score  # noqa: E402


def relative_l2(simulated, observed) -> torch.Tensor:
    """||g' − g||² / ||g||² over all parameters (DLG's distance, made free of the gradient's scale)."""
    return sum(((s - o) ** 2).sum() for s, o in zip(simulated, observed, strict=True)) / sum(
        (o**2).sum() for o in observed
    )


DISTANCES = {"cosine": cosine_distance, "paramwise": paramwise_cosine_distance, "l2": relative_l2}


def read_kept(path: Path) -> dict:
    """The kept images, labels, options and photos of an earlier run (safetensors with JSON metadata, no pickle)."""
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {
        "kept": tensors["kept"],
        "labels": tensors["labels"],
        "opts": json.loads(meta["opts"]),
        "idx": json.loads(meta["idx"]),
        "matching_s": float(meta["matching_s"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idx", type=int, nargs="+", default=[9000])
    parser.add_argument("--opt", nargs="*", default=[], help="ig options KEY=VALUE")
    parser.add_argument("--finish", nargs="+", default=["cosine"], help="NAME[:TV], NAME one of cosine paramwise l2")
    parser.add_argument("--at", type=int, nargs="+", default=[30, 100, 200])
    parser.add_argument("--kept", type=Path, help="a file to save the kept images to, or to read them from")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x, y, model, targets = fedsgd_targets(args.idx)
    shape = tuple(x.shape[1:])
    options = {**dict(option_value(o) for o in args.opt), "polish": 0}
    start = time.time()
    if args.kept and args.kept.exists():  # the kept images of an earlier run of the same options and photos
        saved = read_kept(args.kept)
        if saved["opts"] != options or saved["idx"] != args.idx:
            raise SystemExit(f"{args.kept} holds another run: {saved['opts']} on {saved['idx']}")
        kept, labels, matching = saved["kept"], saved["labels"], saved["matching_s"]
    else:
        results = reconstruct_many(get_attack("ig", **options), targets)
        matching = time.time() - start
        kept = torch.stack([r.images for r in results])  # [K, 1, C, H, W]
        labels = stack_problems([r.labels for r in results], 1, torch.device("cpu"))
        if args.kept:
            meta = {"opts": json.dumps(options), "idx": json.dumps(args.idx), "matching_s": str(matching)}
            save_tensors(args.kept, {"kept": kept.contiguous(), "labels": labels.contiguous()}, meta)

    def psnr(images: torch.Tensor) -> list[float]:
        return [round(score(images[i], y[i : i + 1], x[i : i + 1], y[i : i + 1])["psnr"][0], 2) for i in range(len(y))]

    problems = stack_targets(targets, 1, torch.device("cpu"), unroll=True)
    out = REPO / "benchmarks" / "results" / "ig_finish.jsonl"
    base = {"tag": args.tag, "opts": options, "idx": args.idx, "matching_s": round(matching, 1)}
    print(json.dumps({**base, "psnr_kept": psnr(kept)}), flush=True)
    for spec in args.finish:
        name, _, weight = spec.partition(":")
        gap, tv = DISTANCES[name], float(weight or 0.0)

        def objective(p, c, v, lab, obs, gap=gap, tv=tv):
            images = v.view(1, *shape)
            simulated = problems.signal(p, c, images, lab)
            return gap(simulated, obs) + tv * total_variation(images), cosine_distance(simulated, obs)

        fn = value_and_grad(objective, problems.k, (0, 0, 0, 0, 0), argnum=2, has_aux=True)

        def closure(v: torch.Tensor, fn=fn) -> tuple[torch.Tensor, torch.Tensor]:
            g, (value, _) = fn(problems.params, problems.consts, v, labels, problems.observed)
            return torch.nan_to_num(g), torch.nan_to_num(value, nan=float("inf"))

        lbfgs = BatchedLBFGS(kept.flatten(1).clone(), closure, reset_stalled=True, line_search="armijo")
        trace, begun = [], time.time()
        for step in range(1, max(args.at) + 1):
            lbfgs.step()
            if step in args.at:
                z = lbfgs.z.clamp(0, 1)
                _, (_, cos) = fn(problems.params, problems.consts, z, labels, problems.observed)
                images = z.view_as(kept)
                trace.append({"step": step, "psnr": psnr(images), "cos": [float(f"{c:.3g}") for c in cos]})
                trace[-1]["median"] = float(np.median(trace[-1]["psnr"]))
                trace[-1]["s"] = round(time.time() - begun, 1)
        line = {**base, "finish": name, "tv": tv, "psnr_kept": psnr(kept), "trace": trace}
        print(json.dumps(line), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
