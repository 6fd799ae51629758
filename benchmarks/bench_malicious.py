"""What each server learns from one FedSGD round on real CIFAR-10: honest-but-curious vs the imprint server,
each with and without Flower's SecAgg+.

    nice -n 10 python benchmarks/bench_malicious.py [--data-dir ../shared/data] [--clients 1,2,4,8] [--batch 8]
        [--dlg-iterations 20] [--dlg-clients 1] [--dlg-secure 4] [--no-secagg] [--out benchmarks/results/malicious.json]

N clients of B = 8 real CIFAR-10 training images each (the 200 lossless ones in ../shared/data/cifar10), one
FedSGD round (lr 0.1) of the ConvNet; the imprint server's bins come from the CIFAR-10 test split (its public
data). Rows:

* curious + dlg: DLG (`--dlg-iterations` L-BFGS steps, tiny on purpose: the machine is shared) on each client's
  update (no secure aggregation) for N in `--dlg-clients`, or on the one aggregate (with it) for N in
  `--dlg-secure`. SecAgg+ needs at least 3 clients (Flower's workflow refuses fewer than 3 shares), so N = 1, 2
  have no secure rows;
* imprint: the imprint attack on each client's update, or on the aggregate of N x B images.

Without secure aggregation a client's update is computed with the clients' own training step
(clients.training.train_fedsgd: tests/test_simulation.py checks a real run captures exactly that). With it each
row is a real Flower simulation (fedsim.app.simulation.simulate: SecAggPlusWorkflow + secaggplus_mod on Ray),
attacked from its capture store, as `fedsim attack` does. Columns: images recovered at >= 30 dB out of N x B,
images exact (bit-exact after quantising to 8 bits), median PSNR, attack seconds. Two extra rows: the goal's
one FedSGD update of batch 64, and a FedAvg update (2 local epochs of batch 4 over 8 images).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks import AttackDiverged, get_attack  # noqa: E402
from attacks.base import AttackTarget  # noqa: E402
from clients.training import train_fedavg, train_fedsgd  # noqa: E402
from fedsim.config import FedsimConfig  # noqa: E402
from fedsim.datasets import load_dataset, to_float  # noqa: E402
from fedsim.files import atomic_write_json, load_tensors  # noqa: E402
from fedsim.imprint import imprinted, tamper  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.scoring import pairwise_psnr  # noqa: E402

for key in ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK"):
    os.environ.setdefault(key, "1" if "TELEMETRY" not in key else "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
LR = 0.1


def scores(images: torch.Tensor, truth: torch.Tensor) -> dict:
    """Per true image its best reconstruction's PSNR; exact = equal after quantising both to 8 bits."""
    psnr = pairwise_psnr(images, truth).max(0).values
    rec, true = (images.flatten(1) * 255).round(), (truth.flatten(1) * 255).round()
    exact = (rec[:, None, :] == true[None, :, :]).all(-1).any(0)
    return {"psnr": [float(p) for p in psnr], "exact": int(exact.sum())}


def model_for(data, server: str, bins: int) -> torch.nn.Module:
    model = build_model("convnet", data.input_shape, data.num_classes, seed=0)
    if server == "imprint":
        model = imprinted(model, data.input_shape, bins)
        tamper(model, to_float(data.test_x), "brightness", seed=0)
    return model


def update_target(model, x, y, recipe: dict) -> AttackTarget:
    """One client's capture: its weights after the real local step, as the curious server receives them."""
    client = copy.deepcopy(model)
    if recipe["mode"] == "fedsgd":
        train_fedsgd(client, x, y, LR)
    else:
        train_fedavg(client, x, y, LR, recipe["local-epochs"], recipe["batch-size"], np.random.default_rng(0))
    names = [n for n, _ in model.named_parameters()]
    update = [client.state_dict()[n] - model.state_dict()[n] for n in names]
    return AttackTarget(
        model=model,
        gradients=[-u / LR for u in update] if recipe["mode"] == "fedsgd" else None,
        batch_size=len(x),
        input_shape=tuple(x.shape[1:]),
        num_classes=10,
        update=update,
        recipe={**recipe, "lr": LR, "num-examples": len(x)},
    )


def attack(name: str, target: AttackTarget, truth: torch.Tensor, options: dict) -> dict:
    start = time.perf_counter()
    try:
        result = get_attack(name, **options).reconstruct(target)
    except AttackDiverged as exc:  # nothing recovered: every true image counts at 0 dB
        return {"psnr": [0.0] * len(truth), "exact": 0, "seconds": time.perf_counter() - start, "diverged": str(exc)}
    return {**scores(result.images, truth), "seconds": time.perf_counter() - start}


def row(label: str, n: int, b: int, parts: list[dict], **extra) -> dict:
    psnr = [p for part in parts for p in part["psnr"]]
    out = {
        "row": label,
        "clients": n,
        "batch": b,
        "images": n * b,
        "recovered_30db": sum(p >= 30 for p in psnr),
        "exact": sum(part["exact"] for part in parts),
        "median_psnr": statistics.median(psnr) if psnr else None,
        "seconds": round(sum(part["seconds"] for part in parts), 2),
        "diverged": sum("diverged" in part for part in parts),
        **extra,
    }
    print(json.dumps(out), flush=True)
    return out


def secure_run(data_dir: str, n: int, b: int, server: str, out: Path) -> tuple:
    """A real SecAgg+ simulation of one FedSGD round; returns (target, truth, simulation seconds)."""
    from attacks.contract import target_from_capture
    from fedsim.app.simulation import simulate
    from fedsim.captures import CaptureStore

    config = FedsimConfig.from_mapping(
        {
            "dataset": "cifar10",
            "data-dir": data_dir,
            "num-clients": n,
            "examples-per-client": 200 // n,
            "num-rounds": 1,
            "recipe": "fedsgd",
            "batch-size": b,
            "lr": LR,
            "server-mode": server,
            "secure-aggregation": True,
            "save-truth": True,
            "eval-examples": 200,
            "out-dir": str(out),
            "run-name": f"{server}-{n}",
        }
    )
    start = time.perf_counter()
    simulate(config, out / f"{server}-{n}")
    seconds = time.perf_counter() - start
    store = CaptureStore(out / f"{server}-{n}" / "captures")
    (record,) = store.records("update")
    target = target_from_capture(store.load(store.global_record(1)), store.load(record), record)
    truth_dir = out / f"{server}-{n}" / "truth" / "round-0001"
    # the aggregate's batch: every client's, in the record's order of clients
    truth = torch.cat([load_tensors(truth_dir / f"client-{c}.safetensors")["images"] for c in record["aggregate_of"]])
    return target, truth.float(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bins", type=int, default=256)
    parser.add_argument("--dlg-iterations", type=int, default=20)
    parser.add_argument("--dlg-clients", default="1")
    parser.add_argument("--dlg-secure", default="4")
    parser.add_argument("--no-secagg", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "malicious.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset("cifar10", args.data_dir, False, 0)
    x_all, y_all = to_float(data.train_x), torch.as_tensor(data.train_y).long()
    clients = [int(c) for c in args.clients.split(",")]
    dlg_clients = {int(c) for c in args.dlg_clients.split(",") if c}
    dlg_secure = {int(c) for c in args.dlg_secure.split(",") if c}
    dlg = {"iterations": args.dlg_iterations}
    b, rows = args.batch, []
    models = {s: model_for(data, s, args.bins) for s in ("curious", "imprint")}
    for n in clients:
        shards = [(x_all[i * b : (i + 1) * b], y_all[i * b : (i + 1) * b]) for i in range(n)]
        fedsgd = {"mode": "fedsgd"}
        if n in dlg_clients:
            parts = [attack("dlg", update_target(models["curious"], x, y, fedsgd), x, dlg) for x, y in shards]
            rows.append(row("curious + dlg, each update", n, b, parts, iterations=args.dlg_iterations))
        parts = [attack("imprint", update_target(models["imprint"], x, y, fedsgd), x, {}) for x, y in shards]
        rows.append(row("imprint, each update", n, b, parts))
        if args.no_secagg or n < 3:  # SecAgg+ shares each key among at least 3 clients
            continue
        with tempfile.TemporaryDirectory() as tmp:
            if n in dlg_secure:
                target, truth, sim = secure_run(args.data_dir, n, b, "curious", Path(tmp))
                rows.append(
                    row(
                        "curious + dlg, SecAgg+ aggregate",
                        n,
                        b,
                        [attack("dlg", target, truth, dlg)],
                        iterations=args.dlg_iterations,
                        simulation_seconds=round(sim, 1),
                    )
                )
            target, truth, sim = secure_run(args.data_dir, n, b, "imprint", Path(tmp))
            rows.append(
                row(
                    "imprint, SecAgg+ aggregate",
                    n,
                    b,
                    [attack("imprint", target, truth, {})],
                    simulation_seconds=round(sim, 1),
                )
            )
    x, y = x_all[:64], y_all[:64]
    rows.append(
        row(
            "imprint, one FedSGD update of batch 64",
            1,
            64,
            [attack("imprint", update_target(models["imprint"], x, y, {"mode": "fedsgd"}), x, {})],
        )
    )
    x, y = x_all[:8], y_all[:8]
    fedavg = {"mode": "fedavg", "local-epochs": 2, "batch-size": 4}
    rows.append(
        row(
            "imprint, FedAvg update (2 epochs x 2 steps of batch 4)",
            1,
            8,
            [attack("imprint", update_target(models["imprint"], x, y, fedavg), x, {})],
        )
    )
    atomic_write_json(Path(args.out), {"lr": LR, "bins": args.bins, "model": "convnet", "rows": rows})
    print("| row | N | images | >= 30 dB | exact | median PSNR | seconds |\n|---|---|---|---|---|---|---|")
    for r in rows:
        median = f"{r['median_psnr']:.1f}" if r["median_psnr"] is not None else "-"
        cells = [r["row"], r["clients"], r["images"], r["recovered_30db"], r["exact"], median, r["seconds"]]
        print("| " + " | ".join(str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
