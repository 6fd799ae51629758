"""What curiosity costs: wall time per round with the curious wrapper against the bare inner strategy.

    python benchmarks/bench_curious_overhead.py [--rounds 6] [--repeats 3] [--recipe fedavg|fedsgd]

Both variants run the same seeded simulation (same shards, batches and model), alternating, so drifts
in machine load hit both. Round 1 (Ray actors starting) is left out of the per-round times.
Goal: ratio curious / plain <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedsim.app.simulation import simulate
from fedsim.config import FedsimConfig


def rows(run_dir: Path) -> list[dict]:
    return sorted(
        (json.loads(line) for line in (run_dir / "training.jsonl").read_text().splitlines()), key=lambda r: r["round"]
    )


def seconds_per_round(run_dir: Path) -> list[float]:
    stamps = [r["time"] for r in rows(run_dir)]
    return [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]  # rounds 2..R


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipe", default="fedavg", choices=["fedavg", "fedsgd"])
    parser.add_argument("--clients", type=int, default=3)
    args = parser.parse_args()
    console = Console()
    times: dict[str, list[float]] = {"curious": [], "plain": []}
    capture_seconds: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for variant in ("curious", "plain"):
                config = FedsimConfig.from_mapping(
                    {
                        "num-rounds": args.rounds,
                        "recipe": args.recipe,
                        "num-clients": args.clients,
                        "out-dir": tmp,
                        "run-name": f"{variant}-{repeat}",
                    }
                )
                start = time.time()
                run_dir = simulate(config, Path(tmp) / config.run_name, curious=variant == "curious")
                per_round = seconds_per_round(run_dir)
                times[variant].extend(per_round)
                capture_seconds.extend(r.get("capture-seconds", 0.0) for r in rows(run_dir)[2:] if variant == "curious")
                console.print(
                    f"{variant:8s} repeat {repeat}: {time.time() - start:6.1f} s total, "
                    f"median {statistics.median(per_round):.3f} s/round"
                )
    table = Table(title=f"seconds per round, {args.recipe}, {args.clients} clients, sample-mnist / convnet")
    for column in ("variant", "rounds timed", "median s/round", "mean s/round"):
        table.add_column(column)
    for variant, values in times.items():
        table.add_row(variant, str(len(values)), f"{statistics.median(values):.3f}", f"{statistics.mean(values):.3f}")
    console.print(table)
    ratio = statistics.median(times["curious"]) / statistics.median(times["plain"])
    console.print(f"ratio curious / plain (median): [bold]{ratio:.3f}[/] (goal <= 1.05)")
    share = statistics.mean(capture_seconds) / statistics.mean(times["curious"])
    console.print(
        f"time spent writing captures: {statistics.mean(capture_seconds):.4f} s/round = "
        f"[bold]{share:.2%}[/] of a round (the wrapper's own cost, free of load noise)"
    )
    out = Path(__file__).parent / "results" / f"curious_overhead_{args.recipe}.json"
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "seconds_per_round": times,
                "ratio": ratio,
                "capture_seconds_per_round": capture_seconds,
                "capture_share": share,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
