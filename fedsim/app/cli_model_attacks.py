"""`fedsim membership` and `fedsim invert`: model-level attacks on a finished run (registered in fedsim/app/cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedsim.errors import FedsimError

console = Console()

RunDir = Annotated[Path, typer.Argument(help="a finished run folder, runs/<run-id>")]
Clients = Annotated[
    list[int] | None, typer.Option("--client", "-c", help="partition id to attack (repeat; default: every client)")
]
Seed = Annotated[int | None, typer.Option(help="seed of the attack (default: the run's seed)")]


class _Bars:
    """One rich progress bar per task name, fed by the orchestration's (task, done, total) callback."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> _Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, task: str, done: int, total: int) -> None:
        if task not in self.tasks:
            self.tasks[task] = self.progress.add_task(task, total=total)
        self.progress.update(self.tasks[task], completed=done, total=total)


def _check_run(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise FedsimError(f"run folder {run_dir} does not exist; give runs/<run-id> of a finished `fedsim run`")


def membership(
    run_dir: RunDir,
    mode: Annotated[
        list[str] | None, typer.Option("--mode", "-m", help="fl (the captured trajectory) and/or blackbox")
    ] = None,
    client: Clients = None,
    shadows: Annotated[int, typer.Option(help="shadow replays per client (attack-model training data)")] = 8,
    epochs: Annotated[int, typer.Option(help="epochs of the attention LSTM (the paper: 150)")] = 150,
    distill_epochs: Annotated[int, typer.Option("--distill-epochs", help="black-box distillation snapshots")] = 10,
    max_nonmembers: Annotated[int, typer.Option("--max-nonmembers", help="cap on non-member queries")] = 2000,
    seed: Seed = None,
) -> None:
    """SeqMIA membership inference against a run's clients and global model, with the loss baselines."""
    from fedsim.app.model_attacks import MODES, run_membership

    _check_run(run_dir)
    modes = tuple(mode or ["fl"])
    for name in modes:
        if name not in MODES:
            raise FedsimError(f"--mode {name!r} is not a membership mode; choose from: {', '.join(MODES)}")
    for key, value in {"--shadows": shadows, "--epochs": epochs, "--distill-epochs": distill_epochs}.items():
        if value < 1:
            raise FedsimError(f"{key} = {value} must be at least 1")
    if max_nonmembers < 10:
        raise FedsimError(f"--max-nonmembers = {max_nonmembers} must be at least 10")
    with _Bars() as bars:
        results = run_membership(
            run_dir,
            modes=modes,
            clients=client,
            num_shadows=shadows,
            epochs=epochs,
            distill_epochs=distill_epochs,
            max_nonmembers=max_nonmembers,
            seed=seed,
            progress=bars,
        )
    console.print(membership_table(results, f"membership inference on {run_dir.name}"))
    console.print(f"note: {results['calibration']}")
    for note in results["notes"]:
        console.print(f"note: {note}")
    console.print(f"results, ROC curves (log-log) and scores in [bold]{run_dir / 'membership'}[/]")


def membership_table(results: dict, title: str) -> Table:
    """Every setting's pooled reports, then fl/client's raw pooling and the mean of its clients' own reports.

    TPR is given as a step (a threshold reaching it exists) and interpolated along the ROC (as SeqMIA's paper)."""
    table = Table(title=title)
    columns = ("setting", "attack", "AUC", "TPR@1% step", "interp", "TPR@0.1% step", "interp", "members", "non-members")
    for column in columns:
        table.add_column(column, justify="right" if column not in ("setting", "attack") else "left")
    views = list(results["results"].items())
    views += [(f"{k} (pooled raw)", a) for k, a in results.get("pooled-raw", {}).items()]
    for key, attacks in views:
        for name, r in attacks.items():
            low = "" if r["tpr@0.1%fpr-measurable"] else " (<1/n)"
            cells = [f"{r['auc']:.4f}", f"{r['tpr@1%fpr']:.4f}", f"{r['tpr@1%fpr-interpolated']:.4f}"]
            cells += [f"{r['tpr@0.1%fpr']:.4f}{low}", f"{r['tpr@0.1%fpr-interpolated']:.4f}{low}"]
            table.add_row(key, name, *cells, str(r["members"]), str(r["non-members"]))
    for key, attacks in results.get("per-client-spread", {}).items():
        first = next(iter(results["per-client"].values()))
        for name, f in attacks.items():
            low = "" if f["measurable"]["tpr@0.1%fpr"] else " (<1/n)"
            cells = [f"{f[c]['mean']:.4f} ± {f[c]['std']:.4f}" for c in ("auc", "tpr@1%fpr", "tpr@1%fpr-interpolated")]
            cells += [
                f"{f[c]['mean']:.4f} ± {f[c]['std']:.4f}{low}" for c in ("tpr@0.1%fpr", "tpr@0.1%fpr-interpolated")
            ]
            label = f"{key} (mean of {f['count']} clients)"
            table.add_row(label, name, *cells, str(first[name]["members"]), str(first[name]["non-members"]))
    return table


def invert(
    run_dir: RunDir,
    client: Clients = None,
    ensemble: Annotated[str, typer.Option(help="client (k's uploads over rounds) or round (last round's)")] = "client",
    size: Annotated[int, typer.Option(help="models picked by farthest model sampling")] = 5,
    distance: Annotated[str, typer.Option(help="FMS distance: weights or outputs")] = "weights",
    selection: Annotated[str, typer.Option(help="fms (farthest model sampling) or recent (the latest models)")] = "fms",
    steps: Annotated[int, typer.Option(help="generator training steps")] = 1500,
    batch_size: Annotated[int, typer.Option("--batch-size", help="generated images per step")] = 64,
    per_class: Annotated[int, typer.Option("--per-class", help="images generated per class before filtering")] = 32,
    keep: Annotated[float, typer.Option(help="share of generated images kept (highest activations)")] = 0.5,
    lambda_activation: Annotated[float, typer.Option("--lambda-activation", help="activation loss weight")] = 0.1,
    aux: Annotated[str, typer.Option(help="public dataset as the generator's prior ('' = data-free)")] = "",
    evaluator: Annotated[
        str, typer.Option(help="evaluation classifier's architecture; auto: lenet5, or convnet against lenet5")
    ] = "auto",
    evaluator_epochs: Annotated[int, typer.Option("--evaluator-epochs", help="its epochs; 0 = auto")] = 0,
    seed: Seed = None,
    generator: Annotated[
        str, typer.Option(help="conditional (fedsim's G(z, c)) or unconditional (the paper's G(z), DAFL's losses)")
    ] = "conditional",
) -> None:
    """Ensemble inversion of each client's models against single-model inversion of the last model."""
    from fedsim.app.model_attacks import run_inversion

    _check_run(run_dir)
    if not 0 < keep <= 1:
        raise FedsimError(f"--keep = {keep} must be in (0, 1]")
    for key, value in {"--size": size, "--steps": steps, "--batch-size": batch_size, "--per-class": per_class}.items():
        if value < 1:
            raise FedsimError(f"{key} = {value} must be at least 1")
    if evaluator_epochs < 0:
        raise FedsimError(f"--evaluator-epochs = {evaluator_epochs} must be >= 0 (0 = auto)")
    if generator not in ("conditional", "unconditional"):
        raise FedsimError(f"--generator = {generator!r}; choose conditional or unconditional")
    with _Bars() as bars:
        results = run_inversion(
            run_dir,
            clients=client,
            ensemble=ensemble,
            size=size,
            distance=distance,
            selection=selection,
            steps=steps,
            batch_size=batch_size,
            per_class=per_class,
            keep=keep,
            lambda_activation=lambda_activation,
            aux_dataset=aux,
            evaluator=evaluator,
            evaluator_epochs=evaluator_epochs,
            seed=seed,
            progress=bars,
            generator=generator,
        )
    ev = results["evaluator"]
    console.print(
        f"evaluator: {ev['architecture']} trained on {ev['images']} {ev['trained-on']}, "
        f"accuracy {ev['accuracy']:.2%} on the {ev['accuracy-on']}"
    )
    table = Table(title=f"ensemble vs single-model inversion on {run_dir.name}")
    for column in ("target", "models", "ensemble acc", "single acc", "gain", "ensemble dist", "single dist"):
        table.add_column(column, justify="right")
    for target, entry in results["targets"].items():
        e, s = entry["ensemble"], entry["single"]
        table.add_row(
            target,
            f"{e['models']} of {entry['candidates']}",
            f"{e['accuracy']:.2%}",
            f"{s['accuracy']:.2%}",
            f"{entry['gain']:+.2%}",
            f"{e['nearest-private-rmse']:.4f}",
            f"{s['nearest-private-rmse']:.4f}",
        )
    console.print(table)
    console.print(f"results and image grids in [bold]{run_dir / 'inversion'}[/]")
