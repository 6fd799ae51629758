"""SeqMIA against the loss baselines on real Flower runs, with and without TL-DMI, over several seeds.

    nice -n 10 python benchmarks/bench_seqmia.py [--seeds 0 1 2] [--variants none tldmi] [--quick]

Each seed runs a real simulation (MNIST from ../shared/data, an MLP, 5 clients of 50 examples, 10 local epochs,
5 rounds: small shards and several epochs, so that leakage is measurable), then `run_membership` in both modes
(the captured trajectory, and the paper's black-box mode against the final models). Prints AUC and TPR at 1 %
and 0.1 % FPR (mean and spread over seeds, with the numbers of members and non-members per seed) and writes
benchmarks/results/seqmia.json. TL-DMI clients train only the last layer on top of layers pre-trained on
Fashion-MNIST (fedsim's own defense: defenses = "tldmi").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedsim.app.model_attacks import run_membership
from fedsim.app.simulation import simulate
from fedsim.config import FedsimConfig

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEDSIM_SHARED_DATA", REPO.parent / "shared" / "data"))
VARIANTS = {
    "none": {},
    "tldmi": {"defenses": "tldmi", "tldmi-public": "fashion-mnist", "tldmi-layers": 1, "tldmi-pretrain-epochs": 3},
}
COLUMNS = ("auc", "tpr@1%fpr", "tpr@0.1%fpr")


def setting(seed: int, variant: str, out: Path, quick: bool) -> FedsimConfig:
    values = {
        "dataset": "mnist",
        "data-dir": str(DATA),
        "model": "mlp",
        "num-clients": 5,
        "num-rounds": 3 if quick else 5,
        "examples-per-client": 50,
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
    parser.add_argument("--shadows", type=int, default=8)
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
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        ) as bar:
            task = bar.add_task("runs", total=len(jobs))
            inner = bar.add_task("", total=1)

            def step(name: str, done: int, total: int) -> None:
                bar.update(inner, description=f"  {name}", completed=done, total=total)

            for variant, seed in jobs:
                config = setting(seed, variant, out, args.quick)
                bar.update(task, description=f"{variant} seed {seed}: simulating")
                start = time.time()
                run_dir = simulate(config, out / config.run_name)
                accuracy = json.loads((run_dir / "training.json").read_text())["rounds"][-1]["test-accuracy"]
                bar.update(task, description=f"{variant} seed {seed}: attacking")
                result = run_membership(
                    run_dir,
                    modes=("fl", "blackbox"),
                    num_shadows=4 if args.quick else args.shadows,
                    epochs=40 if args.quick else 150,
                    seed=seed,
                    progress=step,
                )
                rows.append(
                    {
                        "variant": variant,
                        "seed": seed,
                        "test-accuracy": accuracy,
                        "seconds": time.time() - start,
                        "results": result["results"],
                        "notes": result["notes"],
                    }
                )
                bar.advance(task)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"settings": vars(args) | {"out": str(args.out), "runs": None}, "rows": rows}, indent=2, default=str)
        + "\n"
    )
    report(console, rows)
    console.print(f"raw results in {args.out}")


def report(console: Console, rows: list[dict]) -> None:
    """One table per variant: each setting and attack, mean ± standard deviation over seeds."""
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == variant]
        accs = [r["test-accuracy"] for r in mine]
        table = Table(title=f"{variant}: global test accuracy {statistics.mean(accs):.2%} (seeds {len(mine)})")
        for column in ("setting", "attack", "AUC", "TPR@1%FPR", "TPR@0.1%FPR", "n members / non-members"):
            table.add_column(column)
        for key, attacks in mine[0]["results"].items():
            for name in attacks:
                cells = []
                for column in COLUMNS:
                    values = [r["results"][key][name][column] for r in mine]
                    spread = statistics.stdev(values) if len(values) > 1 else 0.0
                    cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f}")
                first = mine[0]["results"][key][name]
                table.add_row(key, name, *cells, f"{first['members']} / {first['non-members']}")
        console.print(table)


if __name__ == "__main__":
    main()
