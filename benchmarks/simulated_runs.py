"""What the benchmarks over real simulations share: the progress bars over their runs and the JSON they write."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


@contextmanager
def run_bars(console: Console, runs: int) -> Iterator[tuple[Progress, TaskID, Callable[[str, int, int], None]]]:
    """A bar over the `runs` and one under it for the current stage. Yields (the bars, the runs' task, a
    `progress(name, done, total)` for the stage's bar)."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("runs", total=runs)
        inner = bar.add_task("", total=1)

        def step(name: str, done: int, total: int) -> None:
            bar.update(inner, description=f"  {name}", completed=done, total=total)

        yield bar, task, step


def write_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    """{"settings": the arguments (without the run folders), "rows": rows} as JSON in args.out."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"settings": vars(args) | {"out": str(args.out), "runs": None}, "rows": rows}, indent=2, default=str)
        + "\n"
    )
