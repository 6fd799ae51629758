"""Classroom demos: a scenario file runs a small federation, attacks it and builds one page to show.

A scenario is a TOML file in fedsim/app/scenarios/ (copy one to change it and pass its path):

    title, summary, explanation     what the page and `fedsim demo --list` say
    [run]                           fedsim config keys of the federation
    [attack]                        attacks = [...], clients = [...], rounds = [...], [attack.options.<name>]
    [membership]                    optional: SeqMIA on the run (modes, shadows, epochs, max-nonmembers)
    [[variants]]                    optional: the same scenario again with other keys, e.g. a defense each;
      name, [variants.run]          a variant's own run keys (over [run])
      [variants.accuracy]           optional: keys of a second run that measures this variant's accuracy
"""

from __future__ import annotations

import html
import io
import shutil
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError

SCENARIO_DIR = Path(__file__).parent / "scenarios"
MEMBERSHIP_KEYS = {"modes": "modes", "shadows": "num_shadows", "epochs": "epochs", "max-nonmembers": "max_nonmembers"}


@dataclass
class Variant:
    name: str
    run: dict
    accuracy: dict | None = None


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
        attack = data.get("attack", {})
        variants = [
            Variant(v.get("name", f"variant {i + 1}"), v.get("run", {}), v.get("accuracy"))
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
        unknown_keys = set(scenario.membership or {}) - set(MEMBERSHIP_KEYS)
        if unknown_keys:
            raise FedsimError(
                f"scenario {path}: unknown [membership] key {', '.join(sorted(unknown_keys))}; "
                f"choose from {', '.join(MEMBERSHIP_KEYS)}"
            )
        for variant in scenario.variants:  # refuse a bad key before anything runs
            scenario.config(variant, "check", Path("."))
            if variant.accuracy is not None:
                scenario.config(variant, "check", Path("."), accuracy=True)
        from attacks import ATTACKS

        unknown = [a for a in scenario.attacks if a not in ATTACKS]
        if unknown:
            raise FedsimError(f"scenario {path}: unknown attack {', '.join(unknown)}; choose from {', '.join(ATTACKS)}")
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


def scenario_names() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "run"


def run_demo(scenario: Scenario, out_dir: Path, console, executor: str = "ray") -> Path:
    """Run every variant of the scenario (federation, attack, scoring) and write the demo page."""
    from fedsim.app.attack_progress import AttackProgress
    from fedsim.app.attack_runner import plan, run_attacks
    from fedsim.app.progress import RoundProgress
    from fedsim.app.report import final_accuracy, run_section, score_run
    from fedsim.app.simulation import simulate

    if out_dir.exists():
        shutil.rmtree(out_dir)  # a demo is re-run from scratch: old runs would be refused as existing
    started = time.time()
    results = []
    for variant in scenario.variants:
        label = variant.name or scenario.title
        run_name = slug(variant.name) if variant.name else "run"
        config = scenario.config(variant, run_name, out_dir)
        console.print(
            f"[bold]{label}[/]: {config.num_clients} clients train ({config.recipe}, batch "
            f"{config.batch_size}) on {config.dataset}; the server captures their updates"
        )
        with RoundProgress(config.num_rounds, console) as progress:
            simulate(config, out_dir / run_name, on_round=progress.update)
        accuracy = final_accuracy(out_dir / run_name)
        if variant.accuracy is not None:
            acc_config = scenario.config(variant, f"{run_name}-accuracy", out_dir, accuracy=True)
            console.print(
                f"  accuracy run: {acc_config.num_rounds} rounds of {acc_config.recipe} with the same defenses"
            )
            with RoundProgress(acc_config.num_rounds, console) as progress:
                simulate(acc_config, out_dir / acc_config.run_name, on_round=progress.update)
            accuracy = final_accuracy(out_dir / acc_config.run_name)
        results.append(
            {
                "variant": label,
                "run_dir": out_dir / run_name,
                "summary": {},
                "rows": [],
                "cards": [],
                "membership": "",
                "accuracy": accuracy,
                "seed": config.seed,
                "defenses": getattr(config, "defenses", ""),
            }
        )
    if scenario.attacks:
        # Every variant's captures in one batch of jobs: they share one Ray and every core.
        by_seed: dict[int, list] = {}
        for r in results:
            jobs = plan(r["run_dir"], scenario.attacks, scenario.rounds, scenario.clients)[0]
            by_seed.setdefault(r["seed"], []).extend(jobs)
        total = sum(len(jobs) for jobs in by_seed.values())
        where = f" in {len(results)} federations" if len(results) > 1 else ""
        console.print(f"the server attacks {total} captured update(s){where} with {', '.join(scenario.attacks)}")
        for seed, jobs in by_seed.items():  # the seed of each job is its own run's (a variant may change it)
            with AttackProgress(console, "attack") as progress:
                run_attacks(jobs, scenario.options, seed=seed, executor=executor, on_event=progress.update)
    for r in results:
        if scenario.attacks:
            r["summary"], r["rows"], r["cards"] = score_run(r["run_dir"])
        if scenario.membership is not None:
            r["membership"] = membership_section(r["run_dir"], scenario.membership, console)
    page = out_dir / "report.html"
    from fedsim.app.report import html_page
    from fedsim.files import atomic_write_text

    sections = [
        r["membership"]
        + (
            run_section(r["run_dir"], r["summary"], r["cards"], True, heading=r["variant"] if len(results) > 1 else "")
            if scenario.attacks
            else f"<p class='metrics'>Global test accuracy at the end: {r['accuracy']:.1%}</p>"
        )
        for r in results
    ]
    intro = _intro(scenario, results, time.time() - started)
    atomic_write_text(page, html_page(f"fedsim demo: {scenario.title}", scenario.title, intro, sections))
    return page


def _intro(scenario: Scenario, results: list[dict], seconds: float) -> str:
    paragraphs = "".join(f"<p>{html.escape(p.strip())}</p>" for p in scenario.explanation.split("\n\n") if p.strip())
    parts = [f'<div class="explain">{paragraphs}</div>']
    if len(results) > 1:
        parts.append(_tradeoff_table(results))
        plot = _tradeoff_plot(results)
        if plot:
            from fedsim.app.report import _img

            parts.append(
                f"<figure class='plot'>{_img(plot, 'image/png', 'attack PSNR against model accuracy')}"
                "<figcaption>each defense: what the attack recovers (PSNR) against what the model "
                "learns (accuracy)</figcaption></figure>"
            )
    parts.append(f"<p class='metrics'>Whole demo: {seconds:.0f} s on this machine.</p>")
    return "\n".join(parts)


def _best_psnr(result: dict) -> float | None:
    values = [r["psnr_mean"] for r in result["rows"] if r.get("psnr_mean") is not None]
    return sorted(values)[len(values) // 2] if values else None


RECOGNISABLE_DB = 25.0  # attack PSNR above which the page calls the image recovered


def _tradeoff_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        psnr, acc = _best_psnr(r), r["accuracy"]
        verdict = "" if psnr is None else ("image recovered" if psnr >= RECOGNISABLE_DB else "reconstruction fails")
        rows.append(
            f"<tr><td>{html.escape(r['variant'])}</td><td>{'' if psnr is None else f'{psnr:.1f}'}</td>"
            f"<td>{html.escape(verdict)}</td><td>{'' if acc is None else f'{acc:.1%}'}</td></tr>"
        )
    return (
        "<table><tr><th>client's defense</th><th>attack PSNR (dB)</th><th></th><th>model accuracy</th></tr>"
        + "".join(rows)
        + "</table>"
    )


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


def membership_section(run_dir: Path, keys: dict, console) -> str:
    """SeqMIA on the demo's run, shown as the loss gap over the rounds, a table and the ROC curves."""
    from fedsim.app.cli_model_attacks import _Bars
    from fedsim.app.model_attacks import run_membership
    from fedsim.app.report import _img

    options = {MEMBERSHIP_KEYS[k]: (tuple(v) if k == "modes" else v) for k, v in keys.items()}
    console.print("  the server asks, for each client's images and hundreds of others: was it in the client's shard?")
    with _Bars() as bars:
        results = run_membership(run_dir, progress=bars, **options)
    rows = []
    names = {"seqmia": "SeqMIA (whole trajectory)", "loss-final": "loss on the last model", "loss-mean": "mean loss"}
    for key, attacks in results["results"].items():
        for name, r in attacks.items():
            rows.append(
                f"<tr><td>{html.escape(QUESTIONS.get(key, key))}</td><td>{html.escape(names.get(name, name))}</td>"
                f"<td>{r['auc']:.2f}</td>"
                f"<td>{r['tpr@1%fpr']:.1%}</td><td>{r['members']}</td><td>{r['non-members']}</td></tr>"
            )
    table = (
        "<table><tr><th>question</th><th>attack</th><th>AUC</th><th>members caught at 1 % false alarms</th>"
        "<th>members</th><th>non-members</th></tr>" + "".join(rows) + "</table>"
    )
    figures = []
    gap = _loss_gap_plot(run_dir)
    if gap:
        figures.append(
            f"<figure>{_img(gap, 'image/png', 'loss on members and non-members over the rounds')}"
            "<figcaption>client 0's uploaded models: loss on its own images against images it never saw</figcaption>"
            "</figure>"
        )
    for png in sorted((run_dir / "membership").glob("roc-*.png")):
        figures.append(
            f"<figure class='plot'>{_img(png.read_bytes(), 'image/png', f'ROC curve {png.stem}')}"
            f"<figcaption>{html.escape(png.stem)}: true against false positive rate, log-log</figcaption></figure>"
        )
    return (
        "<section><h2>Membership inference</h2>"
        "<p>AUC 0.5 is guessing, 1.0 is perfect. The column that matters for privacy is how many members are "
        "caught while almost no outsiders are accused (1 % false alarms).</p>"
        f"{table}<div class='row'>{''.join(figures)}</div></section>"
    )


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
