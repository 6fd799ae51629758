"""SeqMIA against the loss baselines on real Flower runs, with and without TL-DMI, over several seeds.

    nice -n 10 python benchmarks/bench_seqmia.py [--seeds 0 1 2] [--variants none tldmi] [--quick]

Each seed runs a real simulation (MNIST from ../shared/data, an MLP, 5 clients of --examples-per-client examples,
10 local epochs, 5 rounds), then `run_membership` in --modes (fl: the captured trajectory; blackbox: the paper's
mode against the final models). At the FL client level it reports three views: each client's own ROC (mean and
spread over clients), every client's scores pooled after calibration (each mapped to 1 - its p-value against its
own attack model's held-out shadow non-members) and pooled raw (uncalibrated, each client's on its own scale).
TPR at 1 % and 0.1 % FPR is given as a step (a threshold reaching it exists) and interpolated (the paper's
linear interpolation of the ROC). With N non-members per client the smallest non-zero FPR is 1/N: 0.1 % needs
N >= 1,000. Prints mean and spread over seeds and writes benchmarks/results/seqmia.json (or --out). TL-DMI clients
train only the last layer on top of layers pre-trained on Fashion-MNIST (fedsim's own defense: defenses = "tldmi").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.simulated_runs import run_bars, write_rows  # noqa: E402
from fedsim.app.model_attacks import run_membership  # noqa: E402
from fedsim.app.simulation import simulate  # noqa: E402
from fedsim.config import FedsimConfig  # noqa: E402

DATA = Path(os.environ.get("FEDSIM_SHARED_DATA", REPO.parent / "shared" / "data"))
VARIANTS = {
    "none": {},
    "tldmi": {"defenses": "tldmi", "tldmi-public": "fashion-mnist", "tldmi-layers": 1, "tldmi-pretrain-epochs": 3},
}
COLUMNS = (
    "auc",
    "tpr@1%fpr",
    "tpr@1%fpr-interpolated",
    "tpr@0.1%fpr",
    "tpr@0.1%fpr-interpolated",
)
HEADERS = ("AUC", "TPR@1% step", "TPR@1% interp", "TPR@0.1% step", "TPR@0.1% interp")


def setting(seed: int, variant: str, out: Path, quick: bool, examples: int) -> FedsimConfig:
    values = {
        "dataset": "mnist",
        "data-dir": str(DATA),
        "model": "mlp",
        "num-clients": 5,
        "num-rounds": 3 if quick else 5,
        "examples-per-client": examples,
        "local-epochs": 10,
        "lr": 0.1,
        "batch-size": 32,
        "seed": seed,
        "out-dir": str(out),
        "run-name": f"{variant}-s{seed}",
        **VARIANTS[variant],
    }
    return FedsimConfig.from_mapping(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--shadows", type=int, default=32, help="shadow replays per client")
    parser.add_argument("--examples-per-client", type=int, default=500, help="members per client")
    parser.add_argument("--max-nonmembers", type=int, default=2000, help="non-member queries (shared by clients)")
    parser.add_argument("--epochs", type=int, default=150, help="attention-LSTM epochs (early stopping)")
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="clients to attack (default: all)")
    parser.add_argument("--modes", nargs="+", default=["fl", "blackbox"], choices=["fl", "blackbox"])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 4 shadows, 40 LSTM epochs (a smoke run)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "seqmia.json")
    parser.add_argument("--runs", type=Path, default=None, help="keep the run folders here (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared CPU: one thread per process is fastest (see docs/model_attacks.md)
    console = Console(width=150)
    jobs = [(v, s) for v in args.variants for s in args.seeds]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.runs or Path(tmp)
        with run_bars(console, len(jobs)) as (bar, task, step):
            for variant, seed in jobs:
                config = setting(seed, variant, out, args.quick, args.examples_per_client)
                bar.update(task, description=f"{variant} seed {seed}: simulating")
                start = time.time()
                run_dir = simulate(config, out / config.run_name)
                accuracy = json.loads((run_dir / "training.json").read_text())["rounds"][-1]["test-accuracy"]
                bar.update(task, description=f"{variant} seed {seed}: attacking")
                result = run_membership(
                    run_dir,
                    modes=tuple(args.modes),
                    clients=args.clients,
                    num_shadows=4 if args.quick else args.shadows,
                    epochs=40 if args.quick else args.epochs,
                    max_nonmembers=args.max_nonmembers,
                    seed=seed,
                    progress=step,
                )
                rows.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "test-accuracy": accuracy,
                        "seconds": time.time() - start,
                        "attack-seconds": result["seconds"],
                        "results": result["results"],
                        "pooled-raw": result["pooled-raw"],
                        "per-client": result["per-client"],
                        "per-client-spread": result["per-client-spread"],
                        "notes": result["notes"],
                    }
                )
                bar.advance(task)
    write_rows(args, rows)
    report(console, rows)
    console.print(f"raw results in {args.out}")


def views(row: dict) -> dict[str, dict[str, dict]]:
    """setting (with its view) -> attack -> report figures of one seed's row."""
    out: dict[str, dict[str, dict]] = {}
    for key, attacks in row["results"].items():
        label = f"{key} pooled, calibrated" if key in row["pooled-raw"] else f"{key} pooled"
        out[label] = attacks
    for key, attacks in row["pooled-raw"].items():
        out[f"{key} pooled, raw"] = attacks
    for key, attacks in row["per-client-spread"].items():
        out[f"{key} per-client mean"] = {name: {c: f[c]["mean"] for c in COLUMNS} for name, f in attacks.items()}
    return out


def counts(row: dict, label: str, name: str) -> str:
    if label.endswith("per-client mean"):
        first = next(iter(row["per-client"].values()))[name]
        return f"{first['members']} / {first['non-members']} per client ({len(row['per-client'])} clients)"
    report = views(row)[label][name]
    return f"{report['members']} / {report['non-members']}"


def report(console: Console, rows: list[dict]) -> None:
    """One table per variant: each setting, view and attack, mean ± standard deviation over seeds."""
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        accs = [r["test-accuracy"] for r in mine]
        table = Table(title=f"{variant}: global test accuracy {statistics.mean(accs):.2%} (seeds {len(mine)})")
        for column in ("setting / view", "attack", *HEADERS, "n members / non-members"):
            table.add_column(column)
        for label, attacks in views(mine[0]).items():
            for name in attacks:
                cells = []
                for column in COLUMNS:
                    values = [views(r)[label][name][column] for r in mine]
                    spread = statistics.stdev(values) if len(values) > 1 else 0.0
                    cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
                table.add_row(label, name, *cells, counts(mine[0], label, name))
        console.print(table)
        for r in mine:
            seconds = ", ".join(f"{k} {v:.0f} s" for k, v in r["attack-seconds"].items())
            console.print(f"seed {r['seed']}: {r['seconds']:.0f} s in all; {seconds}")


if __name__ == "__main__":
    main()
