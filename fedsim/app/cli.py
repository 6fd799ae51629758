"""The `fedsim` command line."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

from fedsim.config import FedsimConfig, parse_overrides
from fedsim.errors import FedsimError
from fedsim.privacy import privacy_line

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err = Console(stderr=True)


def show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"fedsim {version('fedsim')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("fedsim (not installed: pip install -e .)")
        raise typer.Exit()


@app.callback()
def options(
    _version: Annotated[
        bool, typer.Option("--version", callback=show_version, is_eager=True, help="print fedsim's version and exit")
    ] = False,
) -> None:
    """fedsim: federated learning with an honest-but-curious server that attacks client updates."""


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # '[' in a path is text
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
    attack_names = [a.strip() for a in config.attacks.split(",") if a.strip()]
    if attack_names:
        from attacks import ATTACKS

        unknown = [a for a in attack_names if a not in ATTACKS]
        if unknown:
            fail(f"attacks = {config.attacks!r}: unknown {', '.join(unknown)}; choose from: {', '.join(ATTACKS)}")
    # Imported once the config is valid: they load torch, Flower and Ray, seconds a mistake need not wait for.
    from fedsim.app.progress import RoundProgress
    from fedsim.app.ray_cluster import shared_head
    from fedsim.app.simulation import simulate
    from server.server_app import run_dir_for

    run_dir = run_dir_for(config)
    console.print(
        f"[bold]fedsim run[/] {config.dataset} / {config.model} / {config.num_clients} clients / "
        f"{config.num_rounds} rounds of {config.recipe} with {config.strategy} -> {run_dir}"
    )
    # With attacks to run after the federation, one Ray head serves both; alone, the run starts its own Ray.
    with shared_head() if attack_names else contextlib.nullcontext():
        with RoundProgress(config.num_rounds, console) as progress:
            simulate(config, run_dir, on_round=progress.update, verbose=verbose)
        _after_run(config, run_dir, attack_names)


def _after_run(config, run_dir: Path, attack_names: list[str]) -> None:
    """The run's table, its privacy line, and the attacks it lists with their report."""
    summary = json.loads((run_dir / "training.json").read_text())
    table = Table(title=f"run {run_dir.name}")
    for column in ("round", "train loss", "test accuracy", "captures"):
        table.add_column(column, justify="right")
    for row in summary["rounds"]:
        loss = row.get("train-loss")
        table.add_row(
            str(row.get("round", "")),
            "" if loss is None else f"{loss:.4f}",
            "no test split" if row.get("test-accuracy") is None else f"{row['test-accuracy']:.2%}",
            str(row.get("captures", "")),
        )
    console.print(table)
    if privacy := privacy_line(run_dir):
        console.print(privacy, markup=False)
    console.print(f"captures, model and metrics in [bold]{run_dir}[/]")
    if attack_names:
        from fedsim.app.attack_progress import AttackProgress
        from fedsim.app.attack_runner import plan, run_attacks
        from fedsim.app.report import write_report

        jobs, _ = plan(run_dir, attack_names)
        with AttackProgress(console, "attacks") as progress:
            run_attacks(jobs, seed=config.seed, on_event=progress.update)
        console.print(f"report: [bold]{write_report(run_dir)}[/]")


def _ids(text: str | None, what: str) -> set[int] | None:
    if not text:
        return None
    try:
        return {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        fail(f"{what} must be comma-separated integers, e.g. 1,2; got {text!r}")


def _attack_options(pairs: list[str], attacks: list[str]) -> dict[str, dict]:
    """`--option iterations=100` applies to every attack; `--option grnn.iterations=500` to one.

    Every value is checked against the kind of the option's default, and each attack is built once with
    its options, so a bad one is refused (naming `--option`) before any work starts.
    """
    from attacks import ATTACKS, get_attack

    options: dict[str, dict] = {name: {} for name in attacks}
    for key, value in parse_overrides(pairs, flag="--option", example="iterations=100").items():
        target, _, name = key.rpartition(".")
        for attack in [target] if target else attacks:
            if attack not in options:
                fail(f"--option {key}: {attack!r} is not among the attacks of this command ({', '.join(attacks)})")
            name = name.replace("-", "_")
            allowed = ATTACKS[attack].options()
            if name not in allowed:
                fail(f"--option {key}: {attack} has no option {name!r}; its options: {', '.join(sorted(allowed))}")
            problem = _option_problem(value, allowed[name])
            if problem:
                fail(f"--option {key}={value!r}: {attack}'s {name} must be {problem} (default {allowed[name]!r})")
            options[attack][name] = value
    for attack in attacks:
        try:
            get_attack(attack, **options[attack])
        except Exception as exc:  # the attack's own range checks: 'rescues must be 0 or more'
            given = " ".join(f"{k}={v!r}" for k, v in options[attack].items())
            fail(f"--option {given}: {exc}; {attack}'s options: {', '.join(sorted(ATTACKS[attack].options()))}")
    return options


def _option_problem(value: object, default: object) -> str | None:
    """What kind of value an attack option takes, if `value` is not of it (None: it is)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, int) or default is None:  # None: an optional count (snapshot_every)
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if isinstance(default, float):
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    return None


class _AttackCommand(TyperCommand):
    """`fedsim attack`, whose `--attack` help lists the attack registry.

    The registry is read when the help is shown, not when the CLI starts: importing the attacks loads torch,
    which every other command (and `fedsim --help`) would otherwise wait for.
    """

    def format_help(self, ctx, formatter) -> None:
        from attacks import ATTACKS

        for param in self.params:
            if param.name == "attacks":
                param.help = f"comma-separated: {', '.join(ATTACKS)}"
        super().format_help(ctx, formatter)


def run_dirs(path: Path) -> list[Path]:
    """`path` itself if it is a run, else every run folder directly inside it."""
    path = Path(path)
    if (path / "captures" / "manifest.jsonl").exists():
        return [path]
    if not path.is_dir():
        raise FedsimError(f"{path} does not exist; give a run folder (runs/<run-id>) or a folder of runs")
    runs = sorted(p for p in path.iterdir() if (p / "captures" / "manifest.jsonl").exists())
    if not runs:
        raise FedsimError(f"{path} holds no captures (no captures/manifest.jsonl in it or its sub-folders)")
    return runs


@app.command(cls=_AttackCommand)
def attack(
    path: Annotated[Path, typer.Argument(help="a run folder (runs/<run-id>) or a folder of runs")],
    attacks: Annotated[str, typer.Option("--attack", "-a", help="comma-separated attack names")] = "idlg",
    rounds: Annotated[str | None, typer.Option(help="only these rounds, e.g. 1,2")] = None,
    clients: Annotated[str | None, typer.Option(help="only these clients (partition ids), e.g. 0,2")] = None,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-o", help="attack option, e.g. iterations=100 or grnn.iterations=500"),
    ] = None,
    executor: Annotated[str, typer.Option(help="ray (tasks on this machine or RAY_ADDRESS) or local")] = "ray",
    num_cpus: Annotated[float, typer.Option("--num-cpus", help="CPUs per reconstruction task")] = 1.0,
    num_gpus: Annotated[float, typer.Option("--num-gpus", help="GPUs per reconstruction task (fractions share)")] = 0.0,
    batch: Annotated[int, typer.Option(help="reconstructions batched together on one device")] = 1,
    max_batch: Annotated[int, typer.Option("--max-batch", help="skip updates of more examples than this")] = 64,
    seed: Annotated[int | None, typer.Option(help="attack seed (default: the run's seed)")] = None,
    watch: Annotated[bool, typer.Option(help="keep attacking new captures as they arrive (Ctrl-C stops)")] = False,
    aware: Annotated[
        bool,
        typer.Option(
            "--defense-aware/--defense-unaware",
            help="use the defenses clients declared (frozen layers, pruned entries, clipping); "
            "unaware results go to attacks/<attack>-unaware",
        ),
    ] = True,
    redo: Annotated[
        bool, typer.Option("--redo", help="recompute results made with other options or seed than these")
    ] = False,
    keep: Annotated[bool, typer.Option("--keep", help="keep results made with other options or seed")] = False,
) -> None:
    """Reconstruct clients' private images from the captured updates (results are written as each finishes)."""
    run_dirs(path)  # a wrong path is refused before torch and the attacks load
    from attacks import ATTACKS
    from fedsim.app.attack_progress import AttackProgress
    from fedsim.app.attack_runner import plan, run_attacks, triage

    names = [a.strip() for a in attacks.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown or not names:
        fail(f"unknown attack {', '.join(unknown) or repr(attacks)}; choose from: {', '.join(ATTACKS)}")
    if executor not in ("ray", "local"):
        fail(f"--executor {executor!r} is not allowed; choose ray or local")
    if batch < 1 or num_cpus <= 0 or num_gpus < 0:
        fail("--batch must be >= 1, --num-cpus > 0 and --num-gpus >= 0")
    if redo and keep:
        fail("--redo and --keep contradict each other; give one")
    options = _attack_options(option or [], names)
    attempted = failures = 0
    where: Path | None = None  # the run the failures are in, or the folder of runs
    warned: set[str] = set()

    def warn(line: str) -> None:
        if line not in warned:  # once per problem, not once per --watch pass
            warned.add(line)
            err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)

    while True:
        for run_dir in run_dirs(path):
            run_seed = seed if seed is not None else _run_seed(run_dir)
            jobs, skipped = plan(run_dir, names, _ids(rounds, "--rounds"), _ids(clients, "--clients"), max_batch, aware)
            for item in skipped:
                console.print(
                    escape(f"skipped round {item['round']} client {item['partition_id']}: {item['reason']}"),
                    style="yellow",
                )
            if not jobs:
                if not watch:
                    console.print(f"{run_dir}: nothing to attack", markup=False)
                continue
            states = triage(jobs, options, run_seed, warn)
            if states["other"] and not (redo or keep):
                job = states["other"][0]
                fail(
                    f"{len(states['other'])} finished result(s) in {run_dir / 'attacks'} were made with other options "
                    f"or seed than these (e.g. {job.out / 'result.json'}); add --redo to recompute them "
                    "or --keep to keep them"
                )
            todo = len(states["todo"]) + (len(states["other"]) if redo else 0)
            if not todo:
                if not watch:
                    console.print(
                        f"{run_dir}: all {len(jobs)} reconstructions already done -> {run_dir / 'attacks'}",
                        markup=False,
                    )
                continue
            with AttackProgress(console, escape(run_dir.name)) as progress:
                summaries = run_attacks(
                    jobs,
                    options,
                    seed=run_seed,
                    executor=executor,
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    batch=batch,
                    on_event=progress.update,
                    redo=redo,
                )
            failed = [s for s in summaries if s["status"] != "ok"]
            attempted, failures = attempted + len(summaries), failures + len(failed)
            where = run_dir if where in (None, run_dir) else path / "<run>"
            console.print(
                f"{run_dir}: {len(jobs) - todo} already done, {todo - len(failed)} reconstructed, "
                f"{len(failed)} failed -> {run_dir / 'attacks'}",
                markup=False,
            )
            for s in failed:
                console.print(
                    escape(f"failed {s['attack']} round {s['round']} client {s['partition_id']}: {s['reason']}"),
                    style="red",
                )
        if not watch:
            break
        time.sleep(5)
    if attempted and failures == attempted:
        err.print(
            f"[bold red]error:[/] all {failures} reconstruction(s) failed; the reasons are above and in "
            f"{escape(str(where))}/attacks/<attack>/<capture>/result.json",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


def _run_seed(run_dir: Path) -> int:
    config_file = run_dir / "config.toml"
    return FedsimConfig.from_toml(config_file).seed if config_file.exists() else 0


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="a run folder (runs/<run-id>)")],
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="open the page in a browser")] = False,
) -> None:
    """Score the reconstructions against the truth and write report.html and metrics.json."""
    from fedsim.app.report import write_report

    page = write_report(path)
    console.print(f"report: [bold]{page}[/]")
    if open_browser:
        import webbrowser

        if _has_display():
            webbrowser.open(page.resolve().as_uri())


@app.command()
def demo(
    scenario: Annotated[str, typer.Argument(help="scenario name (see --list) or path of a scenario .toml")] = "dlg",
    list_: Annotated[bool, typer.Option("--list", help="list the scenarios and exit")] = False,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="where the demo's runs and page go")] = Path("runs/demos"),
    data_dir: Annotated[
        str | None,
        typer.Option(
            "--data-dir",
            help="your own photos: one sub-folder per class (runs the scenario on them as dataset imagefolder)",
        ),
    ] = None,
    open_browser: Annotated[bool, typer.Option("--open/--no-open", help="open the page in a browser")] = True,
    executor: Annotated[str, typer.Option(help="ray or local")] = "ray",
) -> None:
    """A classroom demo, offline: a small federation trains, the server reconstructs, a page shows it."""
    from fedsim.app.demo import Scenario, run_demo, scenario_names

    if list_:
        table = Table("scenario", "what it shows")
        for name in scenario_names():
            table.add_row(name, Scenario.load(name).summary)
        console.print(table)
        return
    loaded = Scenario.load(scenario)
    if data_dir is not None:
        loaded.run.update({"dataset": "imagefolder", "data-dir": data_dir})
        loaded.run.setdefault("image-size", 32)
    page = run_demo(loaded, out_dir / loaded.name, console, executor=executor)
    console.print(f"demo page: [bold]{page.resolve()}[/]")
    if open_browser and _has_display():
        import webbrowser

        try:
            webbrowser.open(page.resolve().as_uri())
        except webbrowser.Error:
            pass  # no browser here: the path above is the way in


def _has_display() -> bool:
    """A graphical browser can open (never a text browser taking over the terminal of a headless machine)."""
    import os

    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


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


# Model-level attacks on a finished run (SeqMIA, Ensemble Inversion) live in their own module.
from fedsim.app.cli_model_attacks import invert, membership  # noqa: E402

app.command()(membership)
app.command()(invert)


def main() -> None:
    """Entry point: user mistakes become one clear line on stderr and exit status 2, never a traceback."""
    try:
        app()
    except FedsimError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
