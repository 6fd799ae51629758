"""Ensemble Inversion in the paper's setting: attack accuracy against ensemble size, independently trained models.

    nice -n 10 python benchmarks/bench_ensemble_inversion_paper.py [--seeds 0 1 2] [--generators unconditional]

For each seed, a pool of 10 models (fedsim's MLP by default), each trained alone on its own disjoint MNIST shard
of 500 images from its own initialisation with the clients' FedAvg code (`run_ensemble_sizes`). Ensembles of 1,
2, 5 and 10 of them, in farthest-model-sampling order, are inverted data-free and with 500 Fashion-MNIST images
as the auxiliary prior; an independent LeNet-5, trained on the 2,000 held-out MNIST test images, scores the
attack accuracy. `unconditional` is the paper's generator with DAFL's losses; `conditional` is fedsim's earlier
class-conditional variant, run with the same budget. Each finished (model, generator, seed) is written at once to
the JSON, and a re-run skips it (resumable). Writes benchmarks/results/ensemble_inversion_paper.json, the plot
ensemble_inversion_paper.png and, for seed 0, sample grids in ensemble_inversion_paper/<model>-<generator>-s0/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedsim.app.model_attacks import run_ensemble_sizes
from fedsim.config import FedsimConfig
from fedsim.files import atomic_write_bytes, atomic_write_json

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEDSIM_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--generators", nargs="+", default=["unconditional", "conditional"])
    parser.add_argument("--model", default="mlp", help="the members' architecture (fedsim's zoo)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--members", type=int, default=10, help="models in the pool, one per shard")
    parser.add_argument("--examples", type=int, default=500, help="images in each member's shard")
    parser.add_argument("--member-epochs", type=int, default=10)
    parser.add_argument("--aux", nargs="*", default=["fashion-mnist"], help="auxiliary priors besides data-free")
    parser.add_argument("--aux-images", type=int, default=500)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS / "ensemble_inversion_paper.json")
    parser.add_argument("--merge", type=Path, nargs="*", default=[], help="add the rows of these result files")
    parser.add_argument("--report-only", action="store_true", help="run nothing: plot and tabulate --out")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared CPU: one thread per process is fastest (see docs/model_attacks.md)
    console = Console(width=150)
    done = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    settings = json.loads(json.dumps(vars(args), default=str))
    for extra in args.merge:  # e.g. seeds run in parallel processes, each into its own file
        key = {(r["model"], r["generator"], r["seed"]) for r in done}
        done += [r for r in json.loads(extra.read_text())["rows"] if (r["model"], r["generator"], r["seed"]) not in key]
    if args.merge:
        atomic_write_json(args.out, {"settings": settings, "rows": done})
    for seed in [] if args.report_only else args.seeds:
        for generator in args.generators:
            if any((r["model"], r["generator"], r["seed"]) == (args.model, generator, seed) for r in done):
                console.print(f"{args.model} {generator} seed {seed}: done, skipped")
                continue
            config = FedsimConfig.from_mapping(
                {
                    "data-dir": str(DATA),
                    "dataset": "mnist",
                    "model": args.model,
                    "num-clients": args.members,
                    "examples-per-client": args.examples,
                    "local-epochs": args.member_epochs,
                    "lr": 0.05,
                    "batch-size": 32,
                    "seed": seed,
                }
            )
            start = time.time()
            last = [0.0]

            def step(task: str, d: int, t: int, g: str = generator, s: int = seed, last=last, start=start) -> None:
                if d == t or time.time() - last[0] > 30:
                    last[0] = time.time()
                    console.print(f"  {time.time() - start:6.0f} s  {g} seed {s}: {task} {d}/{t}")

            grids = RESULTS / "ensemble_inversion_paper" / f"{args.model}-{generator}-s{seed}" if seed == 0 else None
            row = run_ensemble_sizes(
                config,
                sizes=tuple(args.sizes),
                generator=generator,
                aux_datasets=("", *args.aux),
                aux_images=args.aux_images,
                steps=args.steps,
                out_dir=grids,
                progress=step,
            )
            row["seconds (measured under load)"] = round(time.time() - start, 1)
            done.append(row)
            atomic_write_json(args.out, {"settings": settings, "rows": done})
    atomic_write_bytes(args.out.with_suffix(".png"), plot(done))
    report(console, done)
    console.print(f"raw results in {args.out}, plot in {args.out.with_suffix('.png')}")


def curves(rows: list[dict]) -> dict[tuple[str, str, str], dict[int, list[float]]]:
    """(model, generator, prior) -> ensemble size -> attack accuracy of each seed."""
    out: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for row in rows:
        for prior, result in row["priors"].items():
            curve = out.setdefault((row["model"], row["generator"], prior), {})
            for n, scores in result["sizes"].items():
                curve.setdefault(int(n), []).append(scores["accuracy"])
    return out


def plot(rows: list[dict]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=110)
    ax = fig.add_subplot()
    for (model, generator, prior), curve in sorted(curves(rows).items()):
        sizes = sorted(curve)
        means = [statistics.mean(curve[n]) for n in sizes]
        line = "-" if generator == "unconditional" else "--"
        (handle,) = ax.plot(sizes, means, line, marker="o", label=f"{model}, {generator}, {prior}")
        for n in sizes:
            ax.scatter([n] * len(curve[n]), curve[n], s=10, color=handle.get_color(), alpha=0.5)
    ax.axhline(0.3, color="k", lw=0.6, ls=":")
    ax.set(
        xscale="log",
        xticks=[1, 2, 5, 10],
        xticklabels=["1", "2", "5", "10"],
        ylim=(0, 1.02),
        xlabel="models in the ensemble (farthest model sampling)",
        ylabel="attack accuracy (independent LeNet-5)",
        title="Ensemble inversion on MNIST: mean of seeds (dots: each seed)",
    )
    ax.legend(fontsize=7, loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def report(console: Console, rows: list[dict]) -> None:
    table = Table(title="attack accuracy against ensemble size (mean over seeds; classes covered; nearest RMSE)")
    sizes = sorted({int(n) for r in rows for p in r["priors"].values() for n in p["sizes"]})
    for column in ("model", "generator", "prior", "seeds", *(f"{n} model(s)" for n in sizes)):
        table.add_column(column)
    grouped: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        for prior, result in row["priors"].items():
            grouped.setdefault((row["model"], row["generator"], prior), []).append(result["sizes"])
    for (model, generator, prior), results in sorted(grouped.items()):
        cells = []
        for n in sizes:
            scores = [{int(k): v for k, v in r.items()}[n] for r in results]
            acc = statistics.mean(s["accuracy"] for s in scores)
            cover = statistics.mean(s["classes-covered"] for s in scores)
            rmse = statistics.mean(s["nearest-private-rmse"] for s in scores)
            cells.append(f"{acc:.1%} ({cover:.1f} cl., {rmse:.3f})")
        table.add_row(model, generator, prior, str(len(results)), *cells)
    console.print(table)


if __name__ == "__main__":
    main()
