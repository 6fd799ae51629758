"""fedsim's Inverting Gradients beside breaching's `invertinggradients` on the same captured updates.

Real CIFAR-10 test photos no test or demo uses; the victim is fedsim's model (by default the trained ResNet-20
from ../shared/data/pretrained/resnet20_cifar10), FedSGD, batch 1. Each update goes through fedsim's capture
contract (`target_from_capture`: the global weights and the client's upload, as the curious server stores
them), fedsim attacks the AttackTargets, and the same targets are written to a directory
(benchmarks/peer_breaching.py's format) that breaching attacks in its own environment, in a subprocess
started at the same time, so both run under the same load. Same budget for both: iterations and restarts.

    PYTHONPATH=$PWD python benchmarks/bench_ig_peer.py --iterations 300 \
        --breaching-python /work/venv-breaching/bin/python

Writes benchmarks/results/ig_peer[-NAME].json: per target PSNR and seconds of each, medians, settings, load.
Wall times are measured under whatever load the machine has (reported as the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attacks import get_attack  # noqa: E402
from attacks.base import AttackTarget, model_gradients, reconstruct_many  # noqa: E402
from attacks.contract import target_from_capture  # noqa: E402
from benchmarks.peer_breaching import write_target  # noqa: E402
from fedsim.files import atomic_write_text  # noqa: E402
from fedsim.models import build_model, load_pretrained  # noqa: E402
from fedsim.scoring import score  # noqa: E402

DATA = Path(os.environ.get("FEDSIM_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
LR = 0.1  # the FedSGD learning rate of the round (the update is -lr·gradient; the attacks undo it)


def cifar_test(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(DATA / "cifar10" / "cifar10_test_yoongikim_jpeg_q75.npz", allow_pickle=False)
    return torch.tensor(data["x"][indices]).permute(0, 3, 1, 2).float() / 255, torch.tensor(data["y"][indices]).long()


def victim(name: str, seed: int) -> torch.nn.Module:
    model = build_model(name, (3, 32, 32), 10, seed=seed)
    if name == "resnet20":
        load_pretrained(model, DATA / "pretrained" / "resnet20_cifar10")
    return model.train()


def fedsgd_targets(indices: list[int], name: str = "convnet"):
    """The photos, their labels, the victim model (seed 0) and one batch-1 FedSGD target per photo (its gradient
    on that model, computed here: no capture path)."""
    x, y = cifar_test(indices)
    model = victim(name, 0)
    shape = tuple(x.shape[1:])
    targets = [
        AttackTarget(model, model_gradients(model, x[i : i + 1], y[i : i + 1]), 1, shape, 10) for i in range(len(y))
    ]
    return x, y, model, targets


def captured_target(model: torch.nn.Module, name: str, x: torch.Tensor, y: torch.Tensor):
    """What the curious server holds after one FedSGD client step on (x, y): the global weights, the upload, the
    record, turned into an AttackTarget by fedsim's capture contract."""
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = dict(zip([n for n, _ in model.named_parameters()], model_gradients(model, x, y), strict=True))
    client_state = {k: (v - LR * grads[k]) if k in grads else v for k, v in global_state.items()}
    record = {
        "model": name,
        "input_shape": [3, 32, 32],
        "num_classes": 10,
        "num_examples": len(y),
        "recipe": {"mode": "fedsgd", "lr": LR},
    }
    return target_from_capture(global_state, client_state, record)


def option_value(item: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON where it parses (numbers, true/false), else as a string."""
    key, _, value = item.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet20", choices=["resnet20", "convnet"])
    parser.add_argument("--indices", type=int, nargs="+", default=[9000, 9001, 9002, 9003])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--option", action="append", default=[], help="fedsim ig option KEY=VALUE")
    parser.add_argument("--breaching-python", default="/work/venv-breaching/bin/python")
    parser.add_argument("--no-peer", action="store_true", help="fedsim only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="")
    args = parser.parse_args()
    options = dict(option_value(item) for item in args.option)
    if not args.no_peer and not Path(args.breaching_python).exists():
        print(f"error: no breaching environment at {args.breaching_python} (see benchmarks/peer_breaching.py)")
        return 2
    torch.set_num_threads(1)
    x, y = cifar_test(args.indices)
    model = victim(args.model, args.seed)
    targets = [captured_target(model, args.model, x[i : i + 1], y[i : i + 1]) for i in range(len(y))]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ig-peer-") as tmp:
        peer = None
        if not args.no_peer:
            folder = Path(tmp) / "targets"
            for i, target in enumerate(targets):
                write_target(folder, f"cifar{args.indices[i]}", target, truth=x[i : i + 1], truth_labels=y[i : i + 1])
            command = [
                args.breaching_python,
                str(REPO / "benchmarks" / "peer_breaching.py"),
                "--targets",
                str(folder),
                "--out",
                str(Path(tmp) / "peer.json"),
                "--iterations",
                str(args.iterations),
                "--restarts",
                str(args.restarts),
                "--seed",
                str(args.seed),
            ]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            peer = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        attack = get_attack("ig", iterations=args.iterations, restarts=args.restarts, **options)
        start = time.perf_counter()
        results = reconstruct_many(attack, targets, seed=args.seed)
        fedsim_seconds = time.perf_counter() - start
        fedsim_rows = []
        for i, r in enumerate(results):
            s = score(r.images, r.labels, x[i : i + 1], y[i : i + 1])
            fedsim_rows.append(
                {
                    "id": f"cifar{args.indices[i]}",
                    "psnr": s["psnr"][0],
                    "ssim": s["ssim"][0],
                    "label_accuracy": float(r.labels.tolist() == y[i : i + 1].tolist()),
                    "cosine_distance": r.loss,
                }
            )
        peer_report, peer_log = None, ""
        if peer is not None:
            peer_log, _ = peer.communicate()
            if peer.returncode != 0:
                print(peer_log[-3000:])
                return 1
            peer_report = json.loads((Path(tmp) / "peer.json").read_text())
    report = {
        "benchmark": "ig_peer",
        "model": args.model,
        "pretrained": args.model == "resnet20",
        "recipe": "fedsgd",
        "batch": 1,
        "indices": args.indices,
        "iterations": args.iterations,
        "restarts": args.restarts,
        "seed": args.seed,
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg()[0],
        "threads": 1,
        "fedsim": {
            "options": {**type(attack).options(), **options, "iterations": args.iterations, "restarts": args.restarts},
            "resolved": {  # what ran, after the preset
                key: results[0].info.get(key)
                for key in ("preset", "units", "lr", "tv_weight", "init", "feature_weight")
            },
            "targets": fedsim_rows,
            "median_psnr": statistics.median(r["psnr"] for r in fedsim_rows),
            "seconds_total": fedsim_seconds,
            "note": "all targets solved together in one vmap; seconds_total is the wall time of all of them",
        },
        "breaching": None
        if peer_report is None
        else {
            **peer_report,
            "seconds_total": sum(t["seconds"] for t in peer_report["targets"]),
            "note": "targets one after another (breaching attacks one user at a time)",
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"ig_peer{'-' + args.name if args.name else ''}.json"
    atomic_write_text(out, json.dumps(report, indent=1))
    line = f"fedsim ig: median {report['fedsim']['median_psnr']:.2f} dB in {fedsim_seconds:.0f} s"
    if peer_report is not None:
        line += (
            f"; breaching: median {peer_report['median_psnr']:.2f} dB in {report['breaching']['seconds_total']:.0f} s"
        )
    print(line + f" (load {load:.1f}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
