"""Wall time of each classroom demo scenario, as a teacher runs it: `fedsim demo <scenario> --no-open`.

    python benchmarks/bench_demo.py [--scenarios dlg,grnn-batch,defenses,membership] [--repeats 1]

Each scenario runs in a fresh process (interpreter start, Ray start and shutdown included), so the time
is what the audience waits. Goal: dlg <= 180 s on a 2-core laptop CPU; the other scenarios under 3
minutes too where possible. Prints a table and writes benchmarks/results/demo.json, with the headline
numbers each page reports (median attack PSNR per variant, accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def run_once(scenario: str, out_dir: Path) -> dict:
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "fedsim.app.cli", "demo", scenario, "--no-open", "--out-dir", str(out_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"fedsim demo {scenario} failed:\n{done.stdout}\n{done.stderr}")
    page = out_dir / scenario / "report.html"
    return {"seconds": seconds, "page_bytes": page.stat().st_size, "headline": headline(out_dir / scenario)}


def headline(demo_dir: Path) -> dict:
    """What the page says in numbers: per run folder, median PSNR per attack, final accuracy, membership AUCs."""
    out = {}
    for run in sorted(p for p in demo_dir.iterdir() if p.is_dir()):
        entry = {}
        metrics = run / "metrics.json"
        if metrics.exists():
            summary = json.loads(metrics.read_text()).get("summary", {})
            entry["psnr"] = {a: s.get("median_psnr_mean") for a, s in summary.items()}
        training = run / "training.json"
        if training.exists():
            rounds = json.loads(training.read_text())
            rounds = rounds.get("rounds", rounds) if isinstance(rounds, dict) else rounds
            accuracies = [r["test-accuracy"] for r in rounds if "test-accuracy" in r]
            entry["accuracy"] = accuracies[-1] if accuracies else None
        membership = run / "membership" / "results.json"
        if membership.exists():
            results = json.loads(membership.read_text())["results"]
            entry["membership_auc"] = {f"{k}/{a}": r["auc"] for k, v in results.items() for a, r in v.items()}
        out[run.name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="dlg,grnn-batch,defenses,membership")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "demo.json"))
    args = parser.parse_args()
    console = Console()
    report = {
        "benchmark": "bench_demo",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "scenarios": {},
    }
    table = Table("scenario", "wall time (s)", "goal", "page (KiB)", "what the page reports")
    for scenario in [s for s in args.scenarios.split(",") if s]:
        runs = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                console.print(f"fedsim demo {scenario} ...")
                runs.append(run_once(scenario, Path(tmp)))
        seconds = [r["seconds"] for r in runs]
        report["scenarios"][scenario] = {"seconds": seconds, "median_seconds": statistics.median(seconds), **runs[-1]}
        Path(args.out).write_text(json.dumps(report, indent=2))
        said = []
        for run, entry in runs[-1]["headline"].items():
            if run.endswith("-accuracy"):
                continue
            parts = [f"{a} {v:.1f} dB" for a, v in (entry.get("psnr") or {}).items() if v is not None]
            accuracy = runs[-1]["headline"].get(f"{run}-accuracy", entry).get("accuracy")
            if accuracy is not None:
                parts.append(f"acc {accuracy:.0%}")
            parts += [f"{k} AUC {v:.2f}" for k, v in (entry.get("membership_auc") or {}).items() if "seqmia" in k]
            said.append(f"{run}: {', '.join(parts)}")
        goal = "<= 180 s" if scenario == "dlg" else "< 180 s"
        table.add_row(
            scenario,
            " / ".join(f"{s:.0f}" for s in seconds),
            goal,
            f"{runs[-1]['page_bytes'] / 1024:.0f}",
            re.sub(r"\s+", " ", "; ".join(said)),
        )
    console.print(table)
    console.print(f"results in {args.out}")


if __name__ == "__main__":
    main()
