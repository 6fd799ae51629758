"""Progress on the terminal: a bar over rounds with the latest loss and accuracy."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class RoundProgress:
    """A rich progress bar over federated rounds, fed by the server's per-round hook."""

    def __init__(self, num_rounds: int, console: Console | None = None) -> None:
        self.progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task("rounds", total=num_rounds, status="starting clients...")

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, row: dict) -> None:
        accuracy = row.get("test-accuracy")
        accuracy = "no test split" if accuracy is None else f"test accuracy {accuracy:.2%}"
        if row.get("round", 0) == 0:
            self.progress.update(self.task, status=f"initial {accuracy}")
            return
        loss = row.get("train-loss")
        status = f"train loss {loss:.4f}, " if loss is not None else ""
        status += f"{accuracy}, {row.get('captures', 0)} captures"
        self.progress.update(self.task, completed=row["round"], status=status)
