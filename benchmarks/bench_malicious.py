"""What each server learns on real CIFAR-10: honest-but-curious (DLG, iDLG, Inverting Gradients) vs the imprint
server, each without and with Flower's SecAgg+, for one FedSGD round and one FedAvg round.

    nice -n 10 python benchmarks/bench_malicious.py [--data-dir ../shared/data] [--clients 1,2,4,8,16] [--batch 8]
        [--recipes fedsgd,fedavg] [--attacks dlg,idlg,ig,imprint] [--dlg-iterations 3] [--dlg-max-iter 8]
        [--ig-iterations 24] [--no-secagg] [--work-dir /tmp/fedsim-bench-malicious]
        [--out benchmarks/results/malicious.json]

N clients of B = 8 real CIFAR-10 training images each (the 200 lossless ones in ../shared/data/cifar10), the
ConvNet at lr 0.1; FedSGD is one gradient step on the client's 8 images, FedAvg 2 local epochs of batch 4 over
them (4 steps). The imprint server's bins (256, of brightness) come from the CIFAR-10 test split, its public data.
Rows, for every N and both recipes:

* curious + dlg / idlg / ig, each update: the attack on every client's own update (no secure aggregation), all
  N targets solved together (attacks.base.reconstruct_many), one restart each;
* curious + dlg / idlg / ig, SecAgg+ aggregate: the attack on the one aggregate of N x B images the server gets;
* imprint, each update / SecAgg+ aggregate: the imprint attack (closed form) on the same.

SecAgg+ needs at least 3 clients on Flower 1.41 (its workflow refuses fewer than 3 shares, `num_shares`), so for
N = 1, 2 the secure rows are written with `"skipped"` saying so. The honest attacks' budgets are tiny on purpose
(the 2-core machine is shared): DLG and iDLG `--dlg-iterations` L-BFGS steps of at most `--dlg-max-iter`
evaluations, IG `--ig-iterations` signed-Adam steps; their rows are floors, not the attacks' best, and each row
records its gradient evaluations, which do not depend on the machine's load.

Without secure aggregation a client's update is computed with the clients' own training step
(clients.training: tests/test_simulation.py checks a real run captures exactly that). With it, each (N, recipe,
server) is one real Flower simulation (fedsim.app.simulation.simulate: SecAggPlusWorkflow + secaggplus_mod on
Ray), attacked from its capture store as `fedsim attack` does; the three honest attacks share the curious run.
Columns: images recovered at >= 30 dB out of N x B (per true image, its best reconstruction), images exact
(bit-exact after quantising to 8 bits), median PSNR, attack seconds (measured under load). Two extra rows: the
goal's one FedSGD update of batch 64, and one FedAvg update of 8 images.

Resumable per row: every finished row is written at once (atomically) to `--out`; a rerun with the same settings
skips the rows already there, and the simulations' capture stores are kept in `--work-dir`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks import AttackDiverged, get_attack  # noqa: E402
from attacks.base import AttackTarget, reconstruct_many  # noqa: E402
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
HONEST = ("dlg", "idlg", "ig")
RECIPES = {
    "fedsgd": {"mode": "fedsgd"},
    "fedavg": {"mode": "fedavg", "local-epochs": 2, "batch-size": 4},
}
SIMULATION_ATTEMPTS = 3
"""A SecAgg+ round fails when a client is lost (on a machine short of memory Ray's memory monitor kills client
actors): the simulation is then run again."""
NO_SECAGG = "SecAgg+ needs at least 3 clients on Flower 1.41 (SecAggPlusWorkflow's num_shares >= 3)"


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


def attack_all(name: str, targets: list[AttackTarget], truths: list[torch.Tensor], options: dict) -> list[dict]:
    """Every target attacked (compatible ones together); per target its scores and its share of the seconds."""
    start = time.perf_counter()
    results = reconstruct_many(get_attack(name, **options), targets, raise_on_divergence=False)
    seconds = (time.perf_counter() - start) / len(targets)
    parts = []
    for result, truth in zip(results, truths, strict=True):
        if isinstance(result, AttackDiverged):  # nothing recovered: every true image counts at 0 dB
            parts.append({"psnr": [0.0] * len(truth), "exact": 0, "seconds": seconds, "diverged": str(result)})
            continue
        work = {"evaluations": int(result.info.get("evaluations_all_restarts", 1))}
        parts.append({**scores(result.images, truth), "seconds": seconds, **work})
    return parts


def summary(label: str, recipe: str, n: int, b: int, parts: list[dict], **extra) -> dict:
    psnr = [p for part in parts for p in part["psnr"]]
    return {
        "row": label,
        "recipe": recipe,
        "clients": n,
        "batch": b,
        "images": n * b,
        "recovered_30db": sum(p >= 30 for p in psnr),
        "exact": sum(part["exact"] for part in parts),
        "median_psnr": statistics.median(psnr) if psnr else None,
        "seconds": round(sum(part["seconds"] for part in parts), 2),
        "evaluations": sum(part.get("evaluations", 0) for part in parts),
        "diverged": sum("diverged" in part for part in parts),
        **extra,
    }


def secure_run(data_dir: str, n: int, b: int, server: str, recipe: str, work: Path) -> tuple:
    """A real SecAgg+ simulation of one round (kept in `work`, reused on a rerun); (target, truth, seconds)."""
    from attacks.contract import target_from_capture
    from fedsim.app.simulation import simulate
    from fedsim.captures import CaptureStore

    fedavg = recipe == "fedavg"
    run_dir = work / f"{server}-{recipe}-{n}"
    config = FedsimConfig.from_mapping(
        {
            "dataset": "cifar10",
            "data-dir": data_dir,
            "num-clients": n,
            "examples-per-client": b if fedavg else 200 // n,
            "num-rounds": 1,
            "recipe": recipe,
            "batch-size": RECIPES["fedavg"]["batch-size"] if fedavg else b,
            "local-epochs": RECIPES["fedavg"]["local-epochs"],
            "lr": LR,
            "server-mode": server,
            "secure-aggregation": True,
            "save-truth": True,
            "eval-examples": 200,
            "out-dir": str(work),
            "run-name": run_dir.name,
        }
    )
    seconds_file = run_dir / "simulation-seconds.json"
    for _attempt in range(SIMULATION_ATTEMPTS):
        if seconds_file.exists() and CaptureStore(run_dir / "captures").records("update"):
            break
        shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted or failed simulation starts again
        start = time.perf_counter()
        simulate(config, run_dir)
        if CaptureStore(run_dir / "captures").records("update"):  # else the round failed (a client was lost)
            atomic_write_json(seconds_file, {"seconds": time.perf_counter() - start})
    if not (seconds_file.exists() and CaptureStore(run_dir / "captures").records("update")):
        raise SystemExit(f"{run_dir.name}: no aggregate captured in {SIMULATION_ATTEMPTS} simulations")
    seconds = json.loads(seconds_file.read_text())["seconds"]
    store = CaptureStore(run_dir / "captures")
    (record,) = store.records("update")
    target = target_from_capture(store.load(store.global_record(1)), store.load(record), record)
    truth_dir = run_dir / "truth" / "round-0001"
    # the aggregate's batch: every client's, in the record's order of clients
    truth = torch.cat([load_tensors(truth_dir / f"client-{c}.safetensors")["images"] for c in record["aggregate_of"]])
    return target, truth.float(), seconds


class Results:
    """The results file, one row at a time: rows already there with the same settings are not run again."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path, self.settings = path, settings
        old = json.loads(path.read_text()) if path.exists() else {}
        same = {k: old.get(k) for k in settings} == settings
        self.rows: list[dict] = old.get("rows", []) if same else []

    def done(self, label: str, recipe: str, n: int, b: int) -> bool:
        return any((r["row"], r["recipe"], r["clients"], r["batch"]) == (label, recipe, n, b) for r in self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        atomic_write_json(self.path, {**self.settings, "rows": self.rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bins", type=int, default=256)
    parser.add_argument("--recipes", default="fedsgd,fedavg")
    parser.add_argument("--attacks", default="dlg,idlg,ig,imprint")
    parser.add_argument("--dlg-iterations", type=int, default=3)
    parser.add_argument("--dlg-max-iter", type=int, default=8)
    parser.add_argument("--ig-iterations", type=int, default=24)
    parser.add_argument("--no-secagg", action="store_true")
    parser.add_argument("--work-dir", default="/tmp/fedsim-bench-malicious")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "malicious.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = {
        "dlg": {"iterations": args.dlg_iterations, "max_iter": args.dlg_max_iter, "restarts": 1},
        "idlg": {"iterations": args.dlg_iterations, "max_iter": args.dlg_max_iter, "restarts": 1},
        "ig": {"iterations": args.ig_iterations, "restarts": 1},
        "imprint": {},
    }
    chosen = [a for a in args.attacks.split(",") if a]
    settings = {"lr": LR, "bins": args.bins, "model": "convnet", "recipes": RECIPES, "options": options}
    results = Results(Path(args.out), settings)
    data = load_dataset("cifar10", args.data_dir, False, 0)
    x_all, y_all = to_float(data.train_x), torch.as_tensor(data.train_y).long()
    b, work = args.batch, Path(args.work_dir)
    models = {s: model_for(data, s, args.bins) for s in ("curious", "imprint")}
    for recipe in [r for r in args.recipes.split(",") if r]:
        for n in [int(c) for c in args.clients.split(",")]:
            shards = [(x_all[i * b : (i + 1) * b], y_all[i * b : (i + 1) * b]) for i in range(n)]
            truths = [x for x, _ in shards]
            for name in chosen:
                label = f"{'curious + ' + name if name in HONEST else 'imprint'}, each update"
                if results.done(label, recipe, n, b):
                    continue
                model = models["imprint" if name == "imprint" else "curious"]
                targets = [update_target(model, x, y, RECIPES[recipe]) for x, y in shards]
                results.add(summary(label, recipe, n, b, attack_all(name, targets, truths, options[name])))
            if args.no_secagg:
                continue
            for server in ("curious", "imprint"):
                names = [a for a in chosen if (a == "imprint") == (server == "imprint")]
                labels = {a: f"{'curious + ' + a if a in HONEST else 'imprint'}, SecAgg+ aggregate" for a in names}
                todo = [a for a in names if not results.done(labels[a], recipe, n, b)]
                if not todo:
                    continue
                if n < 3:
                    for a in todo:
                        skipped = {"recovered_30db": None, "exact": None, "median_psnr": None, "seconds": None}
                        results.add({**summary(labels[a], recipe, n, b, []), **skipped, "skipped": NO_SECAGG})
                    continue
                target, truth, sim = secure_run(args.data_dir, n, b, server, recipe, work)
                for a in todo:
                    parts = attack_all(a, [target], [truth], options[a])
                    results.add(summary(labels[a], recipe, n, b, parts, simulation_seconds=round(sim, 1)))
    if "imprint" in chosen:
        extra = [
            ("imprint, one FedSGD update of batch 64", "fedsgd", 64),
            ("imprint, one FedAvg update (2 epochs x 2 steps of batch 4)", "fedavg", 8),
        ]
        for label, recipe, size in extra:
            if not results.done(label, recipe, 1, size):
                x, y = x_all[:size], y_all[:size]
                target = update_target(models["imprint"], x, y, RECIPES[recipe])
                results.add(summary(label, recipe, 1, size, attack_all("imprint", [target], [x], {})))
    print(table(results.rows))


def table(rows: list[dict]) -> str:
    """The results as the Markdown table docs/malicious_server.md shows."""
    lines = [
        "| recipe | row | N | images | >= 30 dB | exact | median PSNR | evaluations | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("skipped"):
            skipped = "n/a: SecAgg+ needs >= 3 clients"
            cells = [r["recipe"], r["row"], r["clients"], r["images"], skipped, "", "", "", ""]
        else:
            cells = [
                r["recipe"],
                r["row"],
                r["clients"],
                r["images"],
                r["recovered_30db"],
                r["exact"],
                f"{r['median_psnr']:.1f}",
                r["evaluations"],
                r["seconds"],
            ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
