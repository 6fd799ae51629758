"""The `fedsim` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedsim.config import FedsimConfig, parse_overrides
from fedsim.errors import FedsimError

app = typer.Typer(
    help="fedsim: federated learning with an honest-but-curious server that attacks client updates.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def load_config(config_file: Path | None, overrides: list[str], **options: object) -> FedsimConfig:
    """Defaults < config file < explicit options < --set pairs."""
    config = FedsimConfig.from_toml(config_file) if config_file else FedsimConfig()
    explicit = {key.replace("_", "-"): value for key, value in options.items() if value is not None}
    return FedsimConfig.from_mapping({**explicit, **parse_overrides(overrides)}, base=config)


@app.command()
def run(
    config_file: Annotated[Path | None, typer.Option("--config", "-f", help="TOML file of config keys")] = None,
    dataset: Annotated[str | None, typer.Option(help="dataset name, e.g. sample-mnist, mnist, cifar10")] = None,
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="folder with local dataset copies")] = None,
    model: Annotated[str | None, typer.Option(help="model name, e.g. convnet, lenet-dlg, resnet20")] = None,
    clients: Annotated[int | None, typer.Option(help="number of clients")] = None,
    rounds: Annotated[int | None, typer.Option(help="number of rounds")] = None,
    recipe: Annotated[str | None, typer.Option(help="fedavg or fedsgd")] = None,
    strategy: Annotated[str | None, typer.Option(help="fedavg, fedprox, fedadam, fedmedian or krum")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of everything")] = None,
    name: Annotated[str | None, typer.Option(help="run folder name under out-dir")] = None,
    out_dir: Annotated[str | None, typer.Option("--out-dir", help="where runs/<run-id>/ goes")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="any config key: --set key=value")] = None,
    verbose: Annotated[bool, typer.Option(help="show Flower's and Ray's own logs")] = False,
) -> None:
    """Run a federated simulation in which the server captures every client update."""
    from fedsim.progress import RoundProgress
    from fedsim.simulation import simulate
    from server.server_app import run_dir_for

    config = load_config(
        config_file,
        set_ or [],
        dataset=dataset,
        data_dir=data_dir,
        model=model,
        num_clients=clients,
        num_rounds=rounds,
        recipe=recipe,
        strategy=strategy,
        seed=seed,
        run_name=name,
        out_dir=out_dir,
    )
    run_dir = run_dir_for(config)
    console.print(
        f"[bold]fedsim run[/] {config.dataset} / {config.model} / {config.num_clients} clients / "
        f"{config.num_rounds} rounds of {config.recipe} with {config.strategy} -> {run_dir}"
    )
    with RoundProgress(config.num_rounds, console) as progress:
        simulate(config, run_dir, on_round=progress.update, verbose=verbose)
    summary = json.loads((run_dir / "metrics.json").read_text())
    table = Table(title=f"run {run_dir.name}")
    for column in ("round", "train loss", "test accuracy", "captures"):
        table.add_column(column, justify="right")
    for row in summary["rounds"]:
        loss = row.get("train-loss")
        table.add_row(
            str(row.get("round", "")),
            "" if loss is None else f"{loss:.4f}",
            f"{row['test-accuracy']:.2%}",
            str(row.get("captures", "")),
        )
    console.print(table)
    console.print(f"captures, model and metrics in [bold]{run_dir}[/]")


@app.command()
def datasets() -> None:
    """List the datasets fedsim loads."""
    from fedsim.datasets import DESCRIPTIONS

    table = Table("name", "what")
    for key, text in DESCRIPTIONS.items():
        table.add_row(key, text)
    console.print(table)


@app.command()
def models() -> None:
    """List the model zoo."""
    from fedsim.models import MODELS

    table = Table("name", "what")
    for key, cls in MODELS.items():
        table.add_row(key, (cls.__doc__ or "").strip().splitlines()[0])
    console.print(table)


@app.command("config")
def show_config() -> None:
    """Print every config key with its default and meaning (a valid TOML file)."""
    from dataclasses import fields

    lines = FedsimConfig().to_toml().splitlines()
    for f, line in zip(fields(FedsimConfig), lines, strict=True):
        print(f"# {f.metadata.get('help', '')}")
        print(line)


def main() -> None:
    """Entry point: user mistakes become one clear line on stderr and exit status 2, never a traceback."""
    try:
        app()
    except FedsimError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
