"""Ensemble inversion against single-model inversion on real Flower runs: MNIST (data-free) and faces.

    nice -n 10 python benchmarks/bench_ensemble_inversion.py [--settings mnist faces] [--variants none tldmi]

Each setting runs a real simulation of ConvNet clients, then `run_inversion`: for each client, a generator
trained against 5 of its uploads picked by farthest model sampling (FMS) against one trained against its last
upload; for MNIST also the ensemble of every client's last-round upload against the final global model. An
independent evaluation classifier (LeNet-5, trained on real images the attacker never uses) scores the attack
accuracy; the distance to the nearest private image of the class is the RMS pixel distance. Writes
benchmarks/results/ensemble_inversion.json. TL-DMI clients train only the last layer on top of layers
pre-trained on Fashion-MNIST (fedsim's own defense: defenses = "tldmi").
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
from fedsim.app.model_attacks import run_inversion  # noqa: E402
from fedsim.app.simulation import simulate  # noqa: E402
from fedsim.config import FedsimConfig  # noqa: E402

DATA = Path(os.environ.get("FEDSIM_SHARED_DATA", REPO.parent / "shared" / "data"))
SETTINGS = {
    # every client holds every digit: its uploads over the rounds and the last round's uploads share the classes
    "mnist": (
        {"dataset": "mnist", "num-clients": 5, "examples-per-client": 200, "local-epochs": 2, "num-rounds": 10},
        [("client", [0, 1]), ("round", None)],
    ),
    # each client holds its own identities (Dirichlet 0.01): only its own uploads share its subjects
    "faces": (
        {
            "dataset": "olivetti",
            "image-size": 32,
            "num-clients": 4,
            "partition": "dirichlet",
            "alpha": 0.01,
            "local-epochs": 5,
            "batch-size": 8,
            "lr": 0.05,
            "num-rounds": 10,
        },
        [("client", [0, 1, 2, 3])],
    ),
}
VARIANTS = {
    "none": {},
    "tldmi": {"defenses": "tldmi", "tldmi-public": "fashion-mnist", "tldmi-layers": 1, "tldmi-pretrain-epochs": 3},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--size", type=int, default=5, help="models FMS picks for the ensemble")
    parser.add_argument("--selection", default="fms", choices=["fms", "recent"], help="recent: the latest models")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ensemble_inversion.json")
    parser.add_argument("--runs", type=Path, default=None, help="keep the run folders here (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared CPU: one thread per process is fastest (see docs/model_attacks.md)
    console = Console(width=150)
    jobs = [(s, v, seed) for s in args.settings for v in args.variants for seed in args.seeds]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.runs or Path(tmp)
        with run_bars(console, len(jobs)) as (bar, task, step):
            for setting, variant, seed in jobs:
                values, attacks = SETTINGS[setting]
                name = f"{setting}-{variant}-s{seed}"
                config = FedsimConfig.from_mapping(
                    {
                        "data-dir": str(DATA),
                        "model": "convnet",
                        "seed": seed,
                        "out-dir": str(out),
                        "run-name": name,
                        **values,
                        **VARIANTS[variant],
                    }
                )
                bar.update(task, description=f"{name}: simulating")
                start = time.time()
                run_dir = simulate(config, out / name)
                accuracy = json.loads((run_dir / "training.json").read_text())["rounds"][-1]["test-accuracy"]
                for ensemble, clients in attacks:
                    bar.update(task, description=f"{name}: {ensemble} ensembles")
                    result = run_inversion(
                        run_dir,
                        clients=clients,
                        ensemble=ensemble,
                        size=args.size,
                        selection=args.selection,
                        steps=args.steps,
                        batch_size=32,
                        per_class=16,
                        keep=0.5,
                        seed=seed,
                        progress=step,
                    )
                    rows.append(
                        {
                            "setting": setting,
                            "variant": variant,
                            "seed": seed,
                            "ensemble": ensemble,
                            "test-accuracy": accuracy,
                            "seconds": time.time() - start,
                            **result,
                        }
                    )
                bar.advance(task)
    write_rows(args, rows)
    report(console, rows)
    console.print(f"raw results in {args.out}")


def report(console: Console, rows: list[dict]) -> None:
    table = Table(title="ensemble vs single-model inversion (attack accuracy by an independent evaluator)")
    for column in (
        "setting",
        "defense",
        "global acc",
        "evaluator",
        "ensemble",
        "targets",
        "ensemble acc",
        "single acc",
        "gain",
        "ens. nearest RMSE",
        "single nearest RMSE",
    ):
        table.add_column(column)
    for row in rows:
        targets = list(row["targets"].values())
        ens = [t["ensemble"]["accuracy"] for t in targets]
        single = [t["single"]["accuracy"] for t in targets]
        ev = row["evaluator"]
        table.add_row(
            row["setting"],
            row["variant"],
            f"{row['test-accuracy']:.2%}",
            f"{ev['architecture']} {ev['accuracy']:.1%}",
            row["ensemble"],
            str(len(targets)),
            f"{statistics.mean(ens):.2%}",
            f"{statistics.mean(single):.2%}",
            f"{statistics.mean(ens) - statistics.mean(single):+.2%}",
            f"{statistics.mean(t['ensemble']['nearest-private-rmse'] for t in targets):.4f}",
            f"{statistics.mean(t['single']['nearest-private-rmse'] for t in targets):.4f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
