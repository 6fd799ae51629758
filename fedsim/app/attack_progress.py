"""Progress of an attack fan-out: done/total and the latest gradient-matching loss."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class AttackProgress:
    """A rich progress bar fed by fedsim.app.attack_runner's events."""

    def __init__(self, console: Console | None = None, label: str = "attacks") -> None:
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task(label, total=None, status="")
        self.done = 0

    def __enter__(self) -> AttackProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self.done = event["total"] - event["todo"]
            self.progress.update(self.task, total=event["total"], completed=self.done, status="starting workers...")
        elif kind == "loss":
            self.progress.update(self.task, status=f"{event['job']} it {event['iteration']} loss {event['loss']:.3e}")
        elif kind == "done":
            self.done += 1
            state = f"loss {event['loss']:.3e}" if event["status"] == "ok" else "[red]failed[/]"
            self.progress.update(
                self.task,
                completed=self.done,
                status=f"{event['attack']} round {event['round']} client {event['client']}: {state}",
            )
