"""TL-DMI (Ho et al., CVPR 2024) in the paper's split: public and private classes of one dataset.

    nice -n 10 python benchmarks/bench_tldmi.py [--settings mnist faces] [--variants none k1 k2]
        [--seeds 0] [--steps 500] [--shadows 4] [--runs /tmp/fedsim-tldmi-runs] [--quick]

Each setting splits one dataset by class (`public-classes`): MNIST digits 0-4 are public and 5-9 private;
Olivetti faces (32x32) subjects 1-20 (labels 0-19) are public and 21-40 private. No client holds a public
class, and accuracy is measured on the private classes' test split. Each variant is a federated run of
ConvNet clients on the private classes (in-process, through the run's own strategy stack and ClientApp code,
as benchmarks/bench_defenses.py does: one Ray simulation per run would cost more than the training here):

    none   no defense: every layer trained from the seeded initialisation
    k2     TL-DMI, the last 2 layers trained (fc.0, fc.2) on top of the frozen pre-trained convolutions
    k1     TL-DMI, the last layer (fc.2) only
    all    TL-DMI with k = all 4 layers (not run by default): nothing is frozen, and since the server copies
           only the layers clients freeze, nothing pre-trained is kept: it is the `none` run itself (the same
           per-round accuracies, to the last digit), i.e. k = all is no defense
    k2ft   k2 with tldmi-finetune: fc.0 starts from its pre-trained weights (the paper's fine-tuning), fc.2 anew
    allft  every layer fine-tuned from the pre-trained weights but the output layer (not run by default)

The server pre-trains on the public classes for `--pretrain-epochs` (per setting; every epoch's public test
accuracy is kept, to show it converged). Then the attacks read only the run folder, as `fedsim` does:

* model inversion (fedsim.app.model_attacks.run_inversion, ensemble = round): a generator against the final
  global model (single-model inversion) and one against the ensemble of the last round's client uploads
  (Ensemble Inversion), scored by the independent evaluation classifier (LeNet-5 on real private-class images
  the attacker never uses): attack accuracy, and the RMS pixel distance to the nearest private image;
* SeqMIA (fedsim.app.model_attacks.run_membership, mode fl) against the loss baseline, client level (MNIST only:
  the faces' 40 test images are too few non-members).

Results: benchmarks/results/tldmi.json (rewritten after every run: an interrupted benchmark resumes where it
stopped; finished runs and attacks under --runs are reused) and tldmi.png. Seeded; wall times are measured on a
shared CPU under load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_defenses import stack_run  # noqa: E402
from fedsim.app.model_attacks import run_inversion, run_membership  # noqa: E402
from fedsim.config import FedsimConfig  # noqa: E402
from fedsim.federation import Federation  # noqa: E402
from fedsim.files import atomic_write_bytes, atomic_write_json, atomic_write_text, save_tensors  # noqa: E402

DATA = Path(os.environ.get("FEDSIM_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
SETTINGS = {
    "mnist": {
        "run": {"dataset": "mnist", "public-classes": "0-4", "num-clients": 5, "examples-per-client": 200,
                "local-epochs": 2, "num-rounds": 5},
        "pretrain-epochs": 3,  # 4,103 public images; one epoch already gives 96.8 % on the public test split
        "membership": True,
    },
    "faces": {
        "run": {"dataset": "olivetti", "image-size": 32, "public-classes": "0-19", "num-clients": 2,
                "local-epochs": 5, "batch-size": 8, "lr": 0.05, "num-rounds": 10},
        "pretrain-epochs": 40,  # 160 public images (8 per subject)
        "membership": False,
    },
}  # fmt: skip
VARIANTS = {"none": None, "k1": 1, "k2": 2, "all": 4, "k2ft": 2, "allft": 4}  # tldmi-layers (None: no defense)
FINETUNE = {"k2ft", "allft"}  # tldmi-finetune: the trained hidden layers start from the pre-trained weights


def run_config(setting: str, variant: str, seed: int, runs: Path, pretrain_epochs: int, quick: bool) -> FedsimConfig:
    values = {"data-dir": str(DATA), "model": "convnet", "seed": seed, "out-dir": str(runs),
              "run-name": f"{setting}-{variant}-s{seed}", **SETTINGS[setting]["run"]}  # fmt: skip
    if quick:
        values["num-rounds"] = 2
    k = VARIANTS[variant]
    if k is not None:
        values |= {"defenses": "tldmi", "tldmi-layers": k, "tldmi-pretrain-epochs": pretrain_epochs,
                   "tldmi-finetune": variant in FINETUNE}  # fmt: skip
    return FedsimConfig.from_mapping(values)


def federated_run(config: FedsimConfig, run_dir: Path) -> None:
    """The run, in-process: the server's TL-DMI pre-training, then `num-rounds` rounds through the run's own
    strategy stack (CuriousStrategy -> FedAvg) with the ClientApp's training and defense mods
    (benchmarks/bench_defenses.py: stack_run). It writes what `fedsim run` writes and the attacks read:
    config.toml, captures/, model.safetensors, training.json and tldmi-pretrain.json."""
    fed = Federation.from_config(config)
    model = fed.build_model()
    if "tldmi" in config.defense_list():
        pretrain = fed.pretrain_public(model)
        public = f"{config.dataset} classes {config.public_classes}"
        atomic_write_json(run_dir / "tldmi-pretrain.json", {"public": public, **pretrain})
    atomic_write_text(run_dir / "config.toml", config.to_toml())
    result = stack_run(config, config.num_rounds, run_dir / "captures", model=model)
    save_tensors(run_dir / "model.safetensors", result["state"], {"model": config.model})
    rounds = [{"round": r + 1, "test-accuracy": a} for r, a in enumerate(result["accuracy"])]
    atomic_write_json(run_dir / "training.json", {"run": run_dir.name, "rounds": rounds})  # written last: done


def one_run(setting: str, variant: str, seed: int, args: argparse.Namespace) -> dict:
    """Simulate (or reuse a finished run folder), then invert and, where the setting says so, SeqMIA."""
    epochs = args.pretrain_epochs or SETTINGS[setting]["pretrain-epochs"]
    if args.quick:
        epochs = 1
    config = run_config(setting, variant, seed, args.runs, epochs, args.quick)
    run_dir = args.runs / config.run_name
    start = time.time()
    if not (run_dir / "training.json").exists():
        if run_dir.exists():  # an interrupted simulation: start it again
            import shutil

            shutil.rmtree(run_dir)
        federated_run(config, run_dir)
    sim_seconds = time.time() - start
    rounds = json.loads((run_dir / "training.json").read_text())["rounds"]
    pretrain = run_dir / "tldmi-pretrain.json"
    row = {
        "setting": setting,
        "variant": variant,
        "tldmi-layers": VARIANTS[variant],
        "seed": seed,
        "test-accuracy": rounds[-1]["test-accuracy"],
        "accuracy-per-round": [r["test-accuracy"] for r in rounds],
        "pretrain": json.loads(pretrain.read_text()) if pretrain.exists() else None,
        "simulation-seconds": sim_seconds,
    }
    t = time.time()
    done = run_dir / "inversion" / "results-round.json"  # a finished attack of an interrupted benchmark is kept
    inversion = json.loads(done.read_text()) if done.exists() else {}
    if inversion.get("steps") != args.steps or inversion.get("seed") != seed:
        inversion = run_inversion(run_dir, ensemble="round", size=5, selection="recent", steps=args.steps,
                                  batch_size=32, per_class=16, keep=0.5, seed=seed)  # fmt: skip
    target = inversion["targets"]["round"]
    row["inversion"] = {
        "evaluator": inversion["evaluator"],
        "single": target["single"],
        "ensemble": target["ensemble"],
        "ensemble-models": target["ensemble"]["models"],
        "steps": args.steps,
        "seconds": time.time() - t,
    }
    if SETTINGS[setting]["membership"] and not args.skip_membership:
        t = time.time()
        done = run_dir / "membership" / "results.json"
        membership = json.loads(done.read_text()) if done.exists() else {}
        if (membership.get("num-shadows"), membership.get("clients")) != (args.shadows, args.clients):
            membership = run_membership(run_dir, modes=("fl",), clients=args.clients, num_shadows=args.shadows,
                                        epochs=args.lstm_epochs, seed=seed)  # fmt: skip
        row["membership"] = {
            "fl/client": membership["results"].get("fl/client"),
            "fl/global": membership["results"].get("fl/global"),
            "per-client-spread": membership["per-client-spread"],
            "shadows": args.shadows,
            "clients": membership["clients"],
            "seconds": time.time() - t,
        }
    row["seconds"] = time.time() - start
    return row


def plot(rows: list[dict], path: Path) -> None:
    """Per setting: attack accuracy of single-model and ensemble inversion against the private test accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["setting"] for r in rows}, key=list(SETTINGS).index)
    with_mia = any("membership" in r for r in rows)
    cols = len(settings) + int(with_mia)
    fig, axes = plt.subplots(1, cols, figsize=(5 * cols, 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=False):
        own = [r for r in rows if r["setting"] == setting]
        for kind, marker, label in (("single", "o", "single-model inversion"), ("ensemble", "s", "Ensemble Inversion")):
            xs = [100 * r["test-accuracy"] for r in own]
            ys = [100 * r["inversion"][kind]["accuracy"] for r in own]
            ax.scatter(xs, ys, marker=marker, label=label)
            annotate(ax, own, xs, ys)
        ax.set_xlabel("private test accuracy (%)")
        ax.set_ylabel("attack accuracy (%, independent evaluator)")
        ax.set_title(f"{setting}: public classes {SETTINGS[setting]['run']['public-classes']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if with_mia:
        ax = axes[0][-1]
        own = [r for r in rows if "membership" in r and r["membership"]["fl/client"]]
        for attack, marker in (("seqmia", "o"), ("loss-final", "x")):
            xs = [100 * r["test-accuracy"] for r in own]
            ys = [r["membership"]["fl/client"][attack]["auc"] for r in own]
            ax.scatter(xs, ys, marker=marker, label=attack)
            annotate(ax, own, xs, ys)
        ax.set_xlabel("private test accuracy (%)")
        ax.set_ylabel("membership AUC, client level")
        ax.set_title("mnist: SeqMIA (FL trajectory) vs loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    title = "TL-DMI, public/private classes: none = no defense, kN = last N layers trained, ft = fine-tuned"
    fig.suptitle(f"{title} (ConvNet)", fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def annotate(ax, rows: list[dict], xs: list[float], ys: list[float]) -> None:
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(f"{r['variant']} s{r['seed']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=["none", "k1", "k2"], choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=500, help="generator steps per inversion")
    parser.add_argument("--pretrain-epochs", type=int, default=0, help="0: the setting's own (mnist 3, faces 40)")
    parser.add_argument("--shadows", type=int, default=4, help="SeqMIA shadow replays per client")
    parser.add_argument("--lstm-epochs", type=int, default=60, help="SeqMIA attention-LSTM epochs")
    parser.add_argument("--clients", type=int, nargs="+", default=[0, 1], help="SeqMIA target clients")
    parser.add_argument("--skip-membership", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 1 pre-training epoch (a smoke run)")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/fedsim-tldmi-runs"), help="run folders (reused)")
    parser.add_argument("--out", type=Path, default=RESULTS / "tldmi.json")
    parser.add_argument("--merge", type=Path, nargs="+", default=[], help="only merge these results files into --out")
    args = parser.parse_args()
    if args.merge:
        merge(args.out, args.merge)
        return
    if args.quick:  # a smoke run never mixes with the benchmark's results or run folders
        args.out, args.runs = Path("/tmp/fedsim-tldmi-quick.json"), args.runs / "quick"
    torch.set_num_threads(1)  # a shared CPU: one thread per process is fastest (see docs/model_attacks.md)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = list(previous.get("rows", []))
    done = {(r["setting"], r["variant"], r["seed"]) for r in rows}
    for setting in args.settings:
        for seed in args.seeds:
            for variant in args.variants:
                if (setting, variant, seed) in done:
                    continue
                print(f"{setting} {variant} seed {seed} ...", flush=True)
                row = one_run(setting, variant, seed, args)
                rows.append(row)
                summary = {
                    "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "setups": SETTINGS,
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs shared, 1 torch thread (times under load)",
                    "rows": rows,
                }
                atomic_write_json(args.out, summary)
                print(line(row), flush=True)
    if rows:
        plot(rows, args.out.with_suffix(".png"))
    for row in rows:
        print(line(row))
    print(f"results in {args.out}")


def merge(out: Path, parts: list[Path]) -> None:
    """Rows of several results files (e.g. variants run in parallel processes) in one file, and its plot."""
    merged: dict[tuple, dict] = {}
    summary: dict = {}
    for path in [out, *parts]:
        if path.exists():
            data = json.loads(path.read_text())
            summary = summary or data
            for row in data["rows"]:
                merged.setdefault((row["setting"], row["variant"], row["seed"]), row)
    order = {name: i for i, name in enumerate(VARIANTS)}
    rows = sorted(merged.values(), key=lambda r: (list(SETTINGS).index(r["setting"]), r["seed"], order[r["variant"]]))
    atomic_write_json(out, {**summary, "rows": rows, "merged-from": [str(p) for p in parts]})
    plot(rows, out.with_suffix(".png"))
    for row in rows:
        print(line(row))


def line(row: dict) -> str:
    inv = row["inversion"]
    single, ensemble = inv["single"], inv["ensemble"]
    text = (
        f"{row['setting']:5s} {row['variant']:4s} s{row['seed']}: acc {100 * row['test-accuracy']:.1f} %, "
        f"inversion single {100 * single['accuracy']:.1f} % / ensemble {100 * ensemble['accuracy']:.1f} % "
        f"(rmse {single['nearest-private-rmse']:.3f} / {ensemble['nearest-private-rmse']:.3f})"
    )
    mia = row.get("membership", {}).get("fl/client")
    if mia:
        text += f", SeqMIA AUC {mia['seqmia']['auc']:.3f} (loss {mia['loss-final']['auc']:.3f})"
    return text + f", {row['seconds']:.0f} s under load"


if __name__ == "__main__":
    main()
