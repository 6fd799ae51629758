"""Classroom demos: a scenario file runs a small federation, attacks it and builds one page to show.

A scenario is a TOML file in fedsim/app/scenarios/ (copy one to change it and pass its path):

    title, summary, explanation     what the page and `fedsim demo --list` say
    [run]                           fedsim config keys of the federation
    [attack]                        attacks = [...], clients = [...], rounds = [...], [attack.options.<name>]
    [membership]                    optional: SeqMIA on the run (modes, shadows, epochs, max-nonmembers)
    [[variants]]                    optional: the same scenario again with other keys, e.g. a defense each;
      name, [variants.run]          a variant's own run keys (over [run])
      attacks = [...]               optional: the variant's own share of [attack] attacks (default: all)
      [variants.accuracy]           optional: keys of a second run that measures this variant's accuracy

Every section, key and attack option is checked when the scenario loads, before anything runs.
"""

from __future__ import annotations

import io
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from fedsim.app.pages import figure, finite, render, run_facts
from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError
from fedsim.files import atomic_write_text

SCENARIO_DIR = Path(__file__).parent / "scenarios"
SCENARIO_KEYS = ("title", "summary", "explanation", "run", "attack", "membership", "variants")
ATTACK_KEYS = ("attacks", "clients", "rounds", "options")
VARIANT_KEYS = ("name", "run", "accuracy", "attacks")
MEMBERSHIP_KEYS = {"modes": "modes", "shadows": "num_shadows", "epochs": "epochs", "max-nonmembers": "max_nonmembers"}


@dataclass
class Variant:
    name: str
    run: dict
    accuracy: dict | None = None
    attacks: list[str] | None = None


@dataclass
class Scenario:
    name: str
    title: str
    summary: str
    explanation: str
    run: dict
    attacks: list[str]
    clients: set[int] | None
    rounds: set[int] | None
    options: dict[str, dict]
    variants: list[Variant] = field(default_factory=list)
    membership: dict | None = None

    @classmethod
    def load(cls, name_or_path: str) -> Scenario:
        path = Path(name_or_path)
        if not path.suffix:
            path = SCENARIO_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise FedsimError(
                f"no scenario {name_or_path!r}; choose one of: {', '.join(scenario_names())}, "
                "or give the path of a scenario .toml file"
            )
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise FedsimError(f"scenario {path} is not valid TOML: {exc}") from None
        check_layout(data, f"scenario {path}")
        attack = data.get("attack", {})
        variants = [
            Variant(v.get("name", f"variant {i + 1}"), v.get("run", {}), v.get("accuracy"), v.get("attacks"))
            for i, v in enumerate(data.get("variants", []))
        ] or [Variant("", {})]
        scenario = cls(
            path.stem,
            data.get("title", path.stem),
            data.get("summary", ""),
            data.get("explanation", ""),
            data.get("run", {}),
            list(attack.get("attacks", ["dlg"] if "membership" not in data else [])),
            set(attack["clients"]) if "clients" in attack else None,
            set(attack["rounds"]) if "rounds" in attack else None,
            attack.get("options", {}),
            variants,
            data.get("membership"),
        )
        for variant in scenario.variants:  # refuse a bad key before anything runs
            scenario.config(variant, "check", Path("."))
            if variant.accuracy is not None:
                scenario.config(variant, "check", Path("."), accuracy=True)
        check_attacks(scenario.attacks, scenario.options, f"scenario {path}")
        return scenario

    def config(self, variant: Variant, name: str, out_dir: Path, accuracy: bool = False) -> FedsimConfig:
        keys = {**self.run, **variant.run, **((variant.accuracy or {}) if accuracy else {})}
        keys.update({"out-dir": str(out_dir), "run-name": name})
        if not accuracy:
            keys["save-truth"] = True  # the demo scores what the server recovers against the truth
        try:
            return FedsimConfig.from_mapping(keys)
        except FedsimError as exc:
            raise FedsimError(f"scenario {self.name}{' / ' + variant.name if variant.name else ''}: {exc}") from None


def _refuse_unknown(where: str, table: object, allowed: dict | set | tuple) -> None:
    if not isinstance(table, dict):
        raise FedsimError(f"{where} must be a table")
    unknown = [k for k in table if k not in allowed]
    if unknown:
        raise FedsimError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")


def _check_list(where: str, value: object, kind: type) -> None:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise FedsimError(f"{where} must be a list of {kind.__name__}s, got {value!r}")


def check_layout(data: dict, where: str) -> None:
    """Every section and key of a scenario is one the demo knows (a typo would otherwise be silently ignored)."""
    _refuse_unknown(where, data, SCENARIO_KEYS)
    for key in ("title", "summary", "explanation"):
        if not isinstance(data.get(key, ""), str):
            raise FedsimError(f"{where}: {key} must be a string")
    if not isinstance(data.get("run", {}), dict):
        raise FedsimError(f"{where}: [run] must be a table of fedsim config keys")
    attack = data.get("attack", {})
    _refuse_unknown(f"{where}: [attack]", attack, ATTACK_KEYS)
    _check_list(f"{where}: [attack] attacks", attack.get("attacks", []), str)
    for key in ("clients", "rounds"):
        _check_list(f"{where}: [attack] {key}", attack.get(key, []), int)
    options = attack.get("options", {})
    listed = attack.get("attacks", [] if "membership" in data else ["dlg"])
    _refuse_unknown(f"{where}: [attack.options]", options, listed)
    for name, table in options.items():
        if not isinstance(table, dict):
            raise FedsimError(f"{where}: [attack.options.{name}] must be a table")
    membership = data.get("membership", {})
    _refuse_unknown(f"{where}: [membership]", membership, MEMBERSHIP_KEYS)
    _check_list(f"{where}: [membership] modes", membership.get("modes", []), str)
    for key in ("shadows", "epochs", "max-nonmembers"):
        value = membership.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise FedsimError(f"{where}: [membership] {key} must be a positive whole number, got {value!r}")
    variants = data.get("variants", [])
    if not isinstance(variants, list):
        raise FedsimError(f"{where}: variants must be [[variants]] tables")
    for i, variant in enumerate(variants):
        _refuse_unknown(f"{where}: [[variants]] number {i + 1}", variant, VARIANT_KEYS)
        if not isinstance(variant.get("name", ""), str):
            raise FedsimError(f"{where}: [[variants]] number {i + 1}: name must be a string")
        for key in ("run", "accuracy"):
            if not isinstance(variant.get(key, {}), dict):
                raise FedsimError(f"{where}: [[variants]] number {i + 1}: {key} must be a table of config keys")
        _check_list(f"{where}: [[variants]] number {i + 1}: attacks", variant.get("attacks", []), str)
        extra = [a for a in variant.get("attacks", []) if a not in listed]
        if extra:
            raise FedsimError(
                f"{where}: [[variants]] number {i + 1}: attack {extra[0]!r} is not in [attack] attacks "
                f"({', '.join(listed) or 'none'})"
            )


def check_attacks(attacks: list[str], options: dict[str, dict], where: str) -> None:
    """Build every attack with its options now, so a bad option stops the demo before the federation trains."""
    from attacks import ATTACKS, get_attack

    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise FedsimError(f"{where}: unknown attack {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
    for name in attacks:
        try:
            get_attack(name, **options.get(name, {}))
        except FedsimError as exc:
            raise FedsimError(f"{where}: [attack.options.{name}]: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise FedsimError(f"{where}: [attack.options.{name}]: bad value ({exc})") from None


def scenario_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "run"


def run_demo(scenario: Scenario, out_dir: Path, console, executor: str = "ray") -> Path:
    """Run every variant of the scenario (federation, attack, scoring) and write the demo page."""
    from fedsim.app.attack_progress import AttackProgress
    from fedsim.app.attack_runner import plan, run_attacks
    from fedsim.app.progress import RoundProgress
    from fedsim.app.ray_cluster import shared_head
    from fedsim.app.report import final_accuracy, score_run
    from fedsim.app.simulation import simulate

    if out_dir.exists():
        shutil.rmtree(out_dir)  # a demo is re-run from scratch: old runs would be refused as existing
    started = time.time()
    with shared_head():  # one Ray for every variant's federation and for the attacks
        results = []
        for variant in scenario.variants:
            label = variant.name or scenario.title
            run_name = slug(variant.name) if variant.name else "run"
            config = scenario.config(variant, run_name, out_dir)
            console.print(
                f"[bold]{label}[/]: {config.num_clients} clients train ({config.recipe}, batch "
                f"{config.batch_size}) on {config.dataset}; the server captures their updates"
            )
            for attempt in range(1 + SIMULATION_RETRIES):
                with RoundProgress(config.num_rounds, console) as progress:
                    simulate(config, out_dir / run_name, on_round=progress.update)
                if not scenario.attacks or captured_updates(out_dir / run_name) or attempt == SIMULATION_RETRIES:
                    break
                console.print("  [yellow]no update was captured (a client was lost); the federation runs again[/]")
                shutil.rmtree(out_dir / run_name)
            accuracy_dir = out_dir / run_name
            accuracy = final_accuracy(accuracy_dir)
            if variant.accuracy is not None:
                acc_config = scenario.config(variant, f"{run_name}-accuracy", out_dir, accuracy=True)
                console.print(
                    f"  accuracy run: {acc_config.num_rounds} rounds of {acc_config.recipe} with the same defenses"
                )
                with RoundProgress(acc_config.num_rounds, console) as progress:
                    simulate(acc_config, out_dir / acc_config.run_name, on_round=progress.update)
                accuracy_dir = out_dir / acc_config.run_name
                accuracy = final_accuracy(accuracy_dir)
            results.append(
                {
                    "variant": label,
                    "run_dir": out_dir / run_name,
                    "summary": {},
                    "rows": [],
                    "cards": [],
                    "membership": None,
                    "accuracy": accuracy,
                    "has_test_split": run_facts(accuracy_dir).has_test_split,
                    "seed": config.seed,
                    "defenses": getattr(config, "defenses", ""),
                    "server_mode": config.server_mode,
                    "attacks": scenario.attacks if variant.attacks is None else variant.attacks,
                }
            )
        if scenario.attacks:
            # Every variant's captures in one batch of jobs: they share one Ray and every core.
            by_seed: dict[int, list] = {}
            for r in results:
                jobs = plan(r["run_dir"], r["attacks"], scenario.rounds, scenario.clients)[0]
                by_seed.setdefault(r["seed"], []).extend(jobs)
            total = sum(len(jobs) for jobs in by_seed.values())
            where = f" in {len(results)} federations" if len(results) > 1 else ""
            names = ", ".join(dict.fromkeys(a for r in results for a in r["attacks"]))
            console.print(f"the server attacks {total} captured update(s){where} with {names}")
            for seed, jobs in by_seed.items():  # the seed of each job is its own run's (a variant may change it)
                with AttackProgress(console, "attack") as progress:
                    run_attacks(jobs, scenario.options, seed=seed, executor=executor, on_event=progress.update)
    for r in results:
        if scenario.attacks:
            r["summary"], r["rows"], r["cards"] = score_run(r["run_dir"])
        if scenario.membership is not None:
            r["membership"] = membership_section(r["run_dir"], scenario.membership, console)
    page = out_dir / "report.html"
    atomic_write_text(page, demo_page(scenario, results, time.time() - started))
    return page


SIMULATION_RETRIES = 2
"""A round in which a client is lost captures nothing under secure aggregation (SecAgg+ drops the round), e.g.
when a machine short of memory has Ray's memory monitor kill a client actor: the variant's federation then
runs again (up to twice), so that the page has something to show."""


def captured_updates(run_dir: Path) -> int:
    """How many client updates (or secure aggregates) the run's server captured."""
    from fedsim.captures import CaptureStore

    captures = run_dir / "captures"
    return len(CaptureStore(captures).records("update")) if captures.is_dir() else 0


def demo_page(scenario: Scenario, results: list[dict], seconds: float) -> str:
    """The demo's page: the explanation, the trade-off across variants, and each variant's runs."""
    from fedsim.app.report import run_section

    variants = []
    for r in results:
        facts = run_facts(r["run_dir"])
        heading = r["variant"] if len(results) > 1 else ""
        section = (
            run_section(r["run_dir"], r["summary"], r["cards"], True, heading, facts) if scenario.attacks else None
        )
        variants.append(
            {
                "membership": r["membership"],
                "run": section,
                "description": facts.description,
                "accuracy": r["accuracy"],
                "has_test_split": r["has_test_split"],
            }
        )
    return render(
        "demo.html.j2",
        title=f"fedsim demo: {scenario.title}",
        heading=scenario.title,
        paragraphs=[p.strip() for p in scenario.explanation.split("\n\n") if p.strip()],
        tradeoff=_tradeoff_rows(results) if len(results) > 1 else [],
        varied=_varied(results)[0],
        tradeoff_plot=_tradeoff_figure(results) if len(results) > 1 else None,
        seconds=seconds,
        variants=variants,
    )


def _best_psnr(result: dict) -> float | None:
    values = [r["psnr_mean"] for r in result["rows"] if r.get("psnr_mean") is not None]
    return sorted(values)[len(values) // 2] if values else None


RECOGNISABLE_DB = 25.0  # attack PSNR above which the page calls the image recovered


def _tradeoff_rows(results: list[dict]) -> list[dict]:
    rows = []
    for r in results:
        psnr = _best_psnr(r)
        verdict = "" if psnr is None else ("image recovered" if psnr >= RECOGNISABLE_DB else "reconstruction fails")
        rows.append(
            {
                "variant": r["variant"],
                "psnr": psnr,
                "verdict": verdict,
                "accuracy": r["accuracy"],
                "has_test_split": r["has_test_split"],
            }
        )
    return rows


def _varied(results: list[dict]) -> tuple[str, str]:
    """What the variants change, as the trade-off table's heading and the plot's caption name it."""
    if len({r.get("defenses", "") for r in results}) > 1:
        return "client's defense", "each defense"
    if len({r.get("server_mode") for r in results}) > 1:
        return "server", "each server"
    return "variant", "each variant"


def _tradeoff_figure(results: list[dict]) -> dict | None:
    plot = _tradeoff_plot([r for r in results if r["has_test_split"] is not False])
    if plot is None:
        return None
    caption = f"{_varied(results)[1]}: what the attack recovers (PSNR) against what the model learns (accuracy)"
    return figure(plot, "image/png", "attack PSNR against model accuracy", caption, plot=True)


def _tradeoff_plot(results: list[dict]) -> bytes | None:
    points = [(r["variant"], _best_psnr(r), r["accuracy"]) for r in results]
    points = [p for p in points if p[1] is not None and p[2] is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, psnr, acc in points:
        ax.scatter(acc * 100, psnr, s=80)
        ax.annotate(name, (acc * 100, psnr), textcoords="offset points", xytext=(6, 4))
    accs = [acc * 100 for _, _, acc in points]
    ax.set_xlim(min(accs) - 4, max(accs) + 14)  # room for the labels right of the points
    ax.axhline(RECOGNISABLE_DB, color="grey", linestyle=":", linewidth=1)
    ax.annotate("above: the image is recognisable", (0.01, RECOGNISABLE_DB), xycoords=("axes fraction", "data"),
                xytext=(2, 3), textcoords="offset points", fontsize=8, color="grey")  # fmt: skip
    ax.set(xlabel="global model accuracy (%)", ylabel="attack PSNR (dB)", title="privacy against utility")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


QUESTIONS = {
    "fl/client": "in client k's shard? (its uploads)",
    "fl/global": "in anyone's data? (the global models)",
    "blackbox/client": "in client k's shard? (black-box)",
    "blackbox/global": "in anyone's data? (black-box)",
}


def membership_section(run_dir: Path, keys: dict, console) -> dict:
    """SeqMIA on the demo's run, shown as the loss gap over the rounds, a table and the ROC curves."""
    from fedsim.app.cli_model_attacks import _Bars
    from fedsim.app.model_attacks import run_membership

    options = {MEMBERSHIP_KEYS[k]: (tuple(v) if k == "modes" else v) for k, v in keys.items()}
    console.print("  the server asks, for each client's images and hundreds of others: was it in the client's shard?")
    with _Bars() as bars:
        results = run_membership(run_dir, progress=bars, **options)
    names = {"seqmia": "SeqMIA (whole trajectory)", "loss-final": "loss on the last model", "loss-mean": "mean loss"}
    rows = [
        {
            "question": QUESTIONS.get(key, key),
            "attack": names.get(name, name),
            "auc": finite(r["auc"]),
            "tpr": finite(r["tpr@1%fpr"]),
            "members": r["members"],
            "non_members": r["non-members"],
        }
        for key, attacks in results["results"].items()
        for name, r in attacks.items()
    ]
    figures = []
    gap = _loss_gap_plot(run_dir)
    if gap:
        caption = "client 0's uploaded models: loss on its own images against images it never saw"
        figures.append(figure(gap, "image/png", "loss on members and non-members over the rounds", caption))
    for png in sorted((run_dir / "membership").glob("roc-*.png")):
        caption = f"{png.stem}: true against false positive rate, log-log"
        figures.append(figure(png.read_bytes(), "image/png", f"ROC curve {png.stem}", caption, plot=True))
    return {"rows": rows, "figures": figures}


def _loss_gap_plot(run_dir: Path) -> bytes | None:
    """Mean loss of client 0's uploaded model per round on its shard and on unseen test images."""
    import matplotlib
    import torch

    from fedsim.captures import CaptureStore
    from fedsim.federation import Federation
    from fedsim.models import build_model

    config = FedsimConfig.from_toml(run_dir / "config.toml")
    fed = Federation.from_config(config)
    store = CaptureStore(run_dir / "captures")
    records = sorted((r for r in store.records("update") if r.get("partition_id") == 0), key=lambda r: r["round"])
    if not records:
        return None
    members_x, members_y, _ = fed.shard(0)
    test_x, test_y = fed.test_split()
    test_x, test_y = test_x[: len(members_x)], test_y[: len(members_y)]
    model = build_model(config.model, fed.data.input_shape, fed.data.num_classes)
    model.eval()
    curves: dict[str, list[float]] = {"client 0's own images (members)": [], "images it never saw": []}
    with torch.no_grad():
        for record in records:
            model.load_state_dict(store.load(record))
            for name, (x, y) in zip(curves, [(members_x, members_y), (test_x, test_y)], strict=True):
                curves[name].append(float(torch.nn.functional.cross_entropy(model(x), y)))
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    rounds = [r["round"] for r in records]
    for name, values in curves.items():
        ax.plot(rounds, values, marker="o", label=name)
    ax.set(xlabel="round", ylabel="mean loss", title="the model remembers its training images")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
