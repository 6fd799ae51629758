"""The leakage table: what a curious server reconstructs from real CIFAR-10 updates, cell by cell.

    nice python benchmarks/bench_leakage.py [--quick] [--attacks dlg,idlg,ig,grnn,analytic]
        [--states untrained,convnet-fedavg,resnet20] [--recipes fedsgd,fedavg] [--batches 1,4,16]
        [--trials 3] [--option ig.iterations=300 ...] [--cell-timeout 900] [--rerun] [--plots-only]
        [--breaching-python /work/venv-breaching/bin/python]

A cell is (attack, model state, recipe, batch):

* attack: DLG, iDLG, Inverting Gradients (ig), GRNN, and the analytic attack where it applies (a first
  linear layer with bias: the MLP, FedSGD);
* model state: `untrained` as in each attack's paper (DLG/iDLG: DLG's sigmoid LeNet; GRNN: LeNet-5 with
  GRNN's U(-0.5, 0.5) weights; Inverting Gradients: the ReLU ConvNet; analytic: the MLP), every one seeded;
  `convnet-fedavg`: the ConvNet after `--rounds` rounds of FedAvg (2 local epochs) of 4 clients on the 200
  lossless CIFAR-10 training images (the ClientApp's train function and Flower's aggregation, seeded); `resnet20`: the
  public CIFAR-10 ResNet-20 (../shared/data/pretrained/resnet20_cifar10), in training mode as clients train;
* recipe: `fedsgd` (one gradient step on the whole batch) or `fedavg` (one local epoch over the batch in
  mini-batches of a quarter of it: 4 local SGD steps; the attacks replay them through attacks.unroll); a
  FedAvg update of one image is one step, the FedSGD cell, so `fedavg` starts at batch 4;
* batch: the images behind one update (the client's shard).

Each cell attacks `--trials` clients of a federation over the lossless CIFAR-10 training images (exact pixels,
so PSNR is against the true originals): the client's reply to a real train message (clients.client_app.
local_train behind its mods) becomes an attacks.contract.AttackTarget through target_from_capture, as
`fedsim attack` does with a run's captures; all trials of a cell are solved in one batched run. Per cell:
median PSNR and SSIM over the images (order-free matching), label accuracy, seconds per update (measured
under load), the options used. LPIPS is left out: its AlexNet weights are not on this machine.

Results: benchmarks/results/leakage.json (each cell written atomically as it finishes; a re-run skips the
cells already there, --rerun repeats them), leakage.png (PSNR heat map), leakage_best.png (the best
reconstruction of every cell beside its truth), leakage.md (the table). --quick runs tiny budgets into
leakage-quick.*.

Peer (--breaching-python): when benchmarks/peer_breaching.py exists, the targets of the IG cells are exported
to a folder and that script runs them through breaching's invertinggradients in its own environment; its
PSNR and seconds go into the same cells (`peer`). Without the script the flag records why nothing ran.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from fedsim.files import atomic_write_json, atomic_write_text, load_tensors, save_tensors  # noqa: E402

DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
PEER_SCRIPT = REPO / "benchmarks" / "peer_breaching.py"
ATTACKS = ("dlg", "idlg", "ig", "grnn", "analytic")
STATES = ("untrained", "convnet-fedavg", "resnet20")
RECIPES = ("fedsgd", "fedavg")
LR = 0.1  # the clients' SGD learning rate (fedsim's default)
PAPER_MODEL = {"dlg": "lenet-dlg", "idlg": "lenet-dlg", "grnn": "lenet5", "ig": "convnet", "analytic": "mlp"}
# The budgets a cell runs unless --option says otherwise: DLG and iDLG at their defaults, as a user runs them
# (300 L-BFGS steps, one restart and a second on demand, the robust preset's rescues), GRNN at its paper's 1,000
# steps, Inverting Gradients at 500 signed-Adam steps and 1 restart, which fits a shared CPU (the paper: 4,800 to
# 24,000).
OPTIONS = {
    "dlg": {},
    "idlg": {},
    "ig": {"iterations": 500, "restarts": 1},
    "grnn": {"iterations": 1000},
    "analytic": {},
}
QUICK = {"dlg": {"iterations": 3}, "idlg": {"iterations": 3}, "ig": {"iterations": 10, "restarts": 1},
         "grnn": {"iterations": 10}, "analytic": {}}  # fmt: skip


class CellTimeout(Exception):
    pass


def cell_id(attack: str, state: str, recipe: str, batch: int) -> str:
    return f"{attack}|{state}|{recipe}|b{batch}"


def not_applicable(attack: str, state: str, recipe: str, batch: int) -> str | None:
    """Why a cell has no meaning (None if it has one)."""
    if attack == "analytic" and (state != "untrained" or recipe != "fedsgd"):
        return "the analytic attack needs a first linear layer with bias (the MLP) and one gradient step"
    if recipe == "fedavg" and batch < 4:
        return "a FedAvg update of fewer than 4 images in 4 local steps is not one; batch 1 is the FedSGD cell"
    return None


def model_name(attack: str, state: str) -> str:
    return {"untrained": PAPER_MODEL[attack], "convnet-fedavg": "convnet", "resnet20": "resnet20"}[state]


def config_for(model: str, batch: int, recipe: str, clients: int, seed: int, **extra):
    from fedsim.config import FedsimConfig

    local_batch = batch if recipe == "fedsgd" else max(1, batch // 4)
    return FedsimConfig.from_mapping({
        "dataset": "cifar10", "data-dir": str(DATA), "model": model, "num-clients": clients,
        "examples-per-client": batch, "batch-size": local_batch, "local-epochs": 1, "lr": LR, "seed": seed,
        "recipe": recipe, "eval-examples": 1000, **extra,
    })  # fmt: skip


_TRAINED: dict[tuple, tuple[dict, dict]] = {}


def global_state(attack: str, state: str, config, fed, args: argparse.Namespace):
    """(the global weights the server sends, facts about how they came about) for a model state."""
    from bench_defenses import fedavg_rounds
    from bench_gradient_inversion import grnn_lenet

    from fedsim.federation import Federation

    if state == "untrained":
        if attack == "grnn":  # GRNN's weights_init: every weight and bias from U(-0.5, 0.5)
            return grnn_lenet(args.seed).state_dict(), {"init": "U(-0.5, 0.5) (GRNN's code)"}
        return fed.build_model().state_dict(), {"init": "fedsim's seeded initialisation"}
    if state == "resnet20":
        return fed.build_model().state_dict(), {"checkpoint": config.pretrained}
    key = (args.rounds, args.seed)
    if key not in _TRAINED:  # the ConvNet after a few real FedAvg rounds, once per run
        train = config_for("convnet", 50, "fedavg", 4, args.seed, **{"batch-size": 10, "local-epochs": 2})
        train_fed = Federation.from_config(train)
        model = train_fed.build_model()
        start = time.perf_counter()
        accuracy = fedavg_rounds(train, train_fed, model, args.rounds)
        facts = {"rounds": args.rounds, "clients": 4, "examples_per_client": 50, "local_batch": 10,
                 "local_epochs": 2, "lr": LR,
                 "test_accuracy_per_round": accuracy, "train_seconds": time.perf_counter() - start}  # fmt: skip
        _TRAINED[key] = ({k: v.clone() for k, v in model.state_dict().items()}, facts)
        print(f"convnet-fedavg: {args.rounds} rounds, test accuracy {accuracy[-1]:.1%} (first 1,000 test images)")
    return _TRAINED[key]


def captures_for(attack: str, state: str, recipe: str, batch: int, args: argparse.Namespace):
    """The cell's targets: `trials` clients' replies to one train message, as target_from_capture makes them.
    (The federation's imports are here, so that --plots-only starts fast.)"""
    from bench_defenses import capture, client_app

    from fedsim.federation import Federation

    extra = {"pretrained": str(DATA / "pretrained" / "resnet20_cifar10")} if state == "resnet20" else {}
    config = config_for(model_name(attack, state), batch, recipe, args.trials, args.seed, **extra)
    fed = Federation.from_config(config)
    state_dict, facts = global_state(attack, state, config, fed, args)
    model = fed.build_model()
    model.load_state_dict(state_dict)
    app = client_app(config)
    out = []
    with tempfile.TemporaryDirectory() as truth_dir:
        recipe_sent = {"recipe": recipe, "lr": LR, "batch-size": config.batch_size, "local-epochs": 1,
                       "truth-dir": truth_dir}  # fmt: skip
        for p in range(args.trials):
            record, client_state, truth = capture(app, config, fed, model, state_dict, recipe_sent, p)
            out.append((record, client_state, truth))
    return state_dict, out, facts


def cell_options(attack: str, args: argparse.Namespace) -> dict:
    return {**(QUICK if args.quick else OPTIONS)[attack], **args.options.get(attack, {})}


def cell_targets(attack: str, state: str, recipe: str, batch: int, args: argparse.Namespace):
    """(the cell's AttackTargets, the captures with their truths, facts about the model state); the facts
    carry `capture_digest`, the SHA-256 of the global model and every update bit for bit."""
    from bench_defenses import capture_digest

    from attacks.contract import target_from_capture

    state_dict, caps, facts = captures_for(attack, state, recipe, batch, args)
    digest = capture_digest(state_dict, [client for _, client, _ in caps], [record for record, _, _ in caps])
    targets = [target_from_capture(state_dict, client, record) for record, client, _ in caps]
    return targets, caps, {**facts, "capture_digest": digest}


def run_cell(attack: str, state: str, recipe: str, batch: int, args: argparse.Namespace) -> dict:
    from attacks import AttackDiverged, get_attack, reconstruct_many
    from fedsim.scoring import score

    options = cell_options(attack, args)
    targets, caps, facts = cell_targets(attack, state, recipe, batch, args)
    attack_obj = get_attack(attack, **options)
    start, cpu = time.perf_counter(), time.process_time()
    results = reconstruct_many(attack_obj, targets, seed=args.seed, raise_on_divergence=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    psnr, ssim, labels, diverged, best = [], [], [], 0, None
    for result, (_, _, truth) in zip(results, caps, strict=True):
        x, y = truth["images"], truth["labels"]
        if isinstance(result, AttackDiverged):  # nothing reconstructed: scored as a grey guess
            diverged += 1
            images, guessed = torch.full_like(x, 0.5), torch.full_like(y, -1)
        else:
            images, guessed = result.images, result.labels
        s = score(images, guessed, x, y)
        psnr += s["psnr"]
        ssim += s["ssim"]
        labels.append(s["label_accuracy"])
        matched = images[torch.as_tensor(s["order"])]
        i = int(np.argmax(s["psnr"]))
        if best is None or s["psnr"][i] > best[0]:
            best = (s["psnr"][i], matched[i], x[i])
    cell = {
        "attack": attack, "state": state, "recipe": recipe, "batch": batch, "status": "done",
        "model": model_name(attack, state), "options": options, "trials": len(targets),
        "local_steps": 1 if recipe == "fedsgd" else 4,
        "psnr_median": float(np.median(psnr)), "psnr_mean": float(np.mean(psnr)),
        "psnr_min": float(np.min(psnr)), "psnr_max": float(np.max(psnr)),
        "ssim_median": float(np.median(ssim)), "label_accuracy": float(np.mean(labels)),
        "lpips": None, "diverged": diverged, "psnr": psnr, "ssim": ssim,
        "seconds_per_update": seconds / len(targets), "seconds": seconds,
        "cpu_seconds_per_update": cpu_seconds / len(targets), "cpu_seconds": cpu_seconds, "model_state": facts,
        "budget": {"iterations": attack_obj.iterations, "restarts": attack_obj.restarts}
        if hasattr(attack_obj, "iterations") else {},
        "objective": [None if isinstance(r, AttackDiverged) else r.info.get("objective") for r in results],
    }  # fmt: skip
    if best is not None:
        path = cells_dir(args) / f"{cell_id(attack, state, recipe, batch).replace('|', '_')}.safetensors"
        save_tensors(path, {"reconstruction": best[1], "truth": best[2]})
        cell["best_image"] = str(path.relative_to(REPO))
    return cell


# ----------------------------------------------------------------------------------------------
# The peer column: breaching's invertinggradients on the same targets (benchmarks/peer_breaching.py)
# ----------------------------------------------------------------------------------------------


def step_ordered_labels(target, truth: dict, partition: int, args: argparse.Namespace) -> torch.Tensor:
    """The true labels of a FedAvg update in the order the client's local steps used them: the client's epoch
    order comes from its seeded round generator (clients.training.round_generator, round 1), which the
    benchmark, knowing the seed, replays. (The server does not know it; the peer is given it, see below.)"""
    from clients.training import round_generator

    order = round_generator(args.seed, 1, partition).permutation(int(target.batch_size))
    return truth["labels"][torch.from_numpy(order)]


def peer_breaching(cell: dict, args: argparse.Namespace) -> dict:
    """Run benchmarks/peer_breaching.py (breaching's invertinggradients, in breaching's own environment) on the
    cell's own AttackTargets, re-captured from the same seeded federation (checked against the truth the cell
    kept), at fedsim's iteration and restart budget for the cell. breaching's multi-step (FedAvg) replay needs
    the labels: it is given the true ones in the client's step order, which fedsim's IG infers instead."""
    from dataclasses import replace

    key = cell_id(cell["attack"], cell["state"], cell["recipe"], cell["batch"])
    if not PEER_SCRIPT.exists():
        return {"status": f"not run: {PEER_SCRIPT.relative_to(REPO)} is not in this tree"}
    if not Path(args.breaching_python).exists():
        return {"status": f"not run: {args.breaching_python} does not exist"}
    budget = attack_budget(cell)
    sys.path.insert(0, str(PEER_SCRIPT.parent))
    from peer_breaching import write_target

    targets, caps, facts = cell_targets(cell["attack"], cell["state"], cell["recipe"], cell["batch"], args)
    kept = cell.get("model_state", {}).get("capture_digest")
    if kept != facts["capture_digest"]:  # the re-made captures must be, bit for bit, the ones the cell attacked
        why = "differ from the cell's" if kept else "cannot be checked (the cell has no capture digest)"
        return {"status": f"not run: the re-made captures {why}; re-run the cell with --rerun"}
    labels_given = cell["recipe"] == "fedavg"
    with tempfile.TemporaryDirectory() as folder:
        for i, (target, (_, _, truth)) in enumerate(zip(targets, caps, strict=True)):
            if labels_given:
                target = replace(target, labels=step_ordered_labels(target, truth, i, args))
            try:
                write_target(folder, f"target-{i:03d}", target, truth["images"], truth["labels"])
            except ValueError as exc:  # e.g. frozen parameters, or a FedAvg update without full batches
                return {"status": f"not run: {exc}"}
        out = Path(folder) / "peer.json"
        command = [args.breaching_python, str(PEER_SCRIPT), "--targets", folder, "--out", str(out),
                   "--iterations", str(budget["iterations"]), "--restarts", str(budget["restarts"]),
                   "--seed", str(args.seed)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.peer_timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"status": f"timeout: over {args.peer_timeout} s", **budget}
        if done.returncode != 0 or not out.exists():
            return {"status": f"failed (exit {done.returncode})", "stderr": done.stderr[-2000:]}
        report = json.loads(out.read_text())
    rows = report.get("targets", [])
    psnr = [float(r["psnr"]) for r in rows if r.get("psnr") is not None]
    seconds = [float(r["seconds"]) for r in rows if r.get("seconds") is not None]
    cpu = [float(r["cpu_seconds"]) for r in rows if r.get("cpu_seconds") is not None]
    return {"status": "done", "cell": key, **budget, "labels_given": labels_given,
            "psnr_median": statistics.median(psnr) if psnr else None, "psnr": psnr,
            "seconds_per_update": statistics.fmean(seconds) if seconds else None,
            "cpu_seconds_per_update": statistics.fmean(cpu) if cpu else None, "report": report}  # fmt: skip


def attack_budget(cell: dict) -> dict:
    """The iterations and restarts fedsim's attack ran a cell with: as the cell recorded them, or, for a cell
    written before it recorded them, its options over the attack's defaults."""
    from attacks import get_attack

    if cell.get("budget"):
        return cell["budget"]
    attack = get_attack(cell["attack"], **cell["options"])
    return {"iterations": attack.iterations, "restarts": attack.restarts}


def wants_peer(cell: dict | None, args: argparse.Namespace) -> bool:
    """An IG cell that is done and has no finished peer at its own budget yet (or --rerun)."""
    if not args.breaching_python or not cell or cell["attack"] != "ig" or cell["status"] != "done":
        return False
    peer = cell.get("peer") or {}
    budget = attack_budget(cell)
    same = (peer.get("iterations"), peer.get("restarts")) == (budget["iterations"], budget["restarts"])
    return args.rerun or peer.get("status") != "done" or not same


# ----------------------------------------------------------------------------------------------
# Files: the results, the heat map, the best reconstructions, the table
# ----------------------------------------------------------------------------------------------


def results_path(args: argparse.Namespace) -> Path:
    return RESULTS / f"leakage{'-quick' if args.quick else ''}.json"


def cells_dir(args: argparse.Namespace) -> Path:
    path = RESULTS / f"leakage{'-quick' if args.quick else ''}_cells"
    path.mkdir(parents=True, exist_ok=True)
    return path


def grid_axes(report: dict, args: argparse.Namespace) -> tuple[list, list]:
    """The grid's rows (state, recipe) and columns (attack, batch): every batch run so far or asked for."""
    batches = sorted(set(args.batches) | {c["batch"] for c in report["cells"].values()})
    rows = [(s, r) for s in STATES for r in RECIPES]
    cols = [(a, b) for a in ATTACKS for b in batches]
    return rows, cols


def heat_map(report: dict, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid_axes(report, args)
    values = np.full((len(rows), len(cols)), np.nan)
    text = [["" for _ in cols] for _ in rows]
    for i, (state, recipe) in enumerate(rows):
        for j, (attack, batch) in enumerate(cols):
            cell = report["cells"].get(cell_id(attack, state, recipe, batch))
            if cell is None:
                text[i][j] = "n/a" if not_applicable(attack, state, recipe, batch) else "not run"
            elif cell["status"] != "done":
                text[i][j] = cell["status"].split(":")[0]
            else:
                values[i, j] = cell["psnr_median"]
                text[i][j] = f"{cell['psnr_median']:.1f}"
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.5, 0.7 * len(rows) + 1.8))
    image = ax.imshow(values, cmap="viridis", vmin=5, vmax=40, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7,
                    color="white" if np.isnan(values[i, j]) or values[i, j] < 25 else "black")  # fmt: skip
    ax.set_facecolor("#bbbbbb")
    ax.set_xticks(range(len(cols)), [f"{a}\nb{b}" for a, b in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{s}\n{r}" for s, r in rows], fontsize=7)
    fig.colorbar(image, ax=ax, label="median PSNR (dB)")
    ax.set_title("Gradient leakage on real CIFAR-10 updates: median PSNR per cell")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def best_figure(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in report["cells"].values() if c.get("best_image")]
    if not cells:
        return
    results_folder = path.parent
    columns = 4
    rows = -(-len(cells) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, cell in zip(axes.flat, cells, strict=False):
        title = f"{cell['attack']} {cell['state']}\n{cell['recipe']} b{cell['batch']}: {max(cell['psnr']):.1f} dB"
        pair = best_pair(cell, results_folder)
        if pair is None:
            ax.text(0.5, 0.5, "image missing or invalid:\nsee the warning", ha="center", va="center", fontsize=7)
            ax.set_title(title, fontsize=7)
            continue
        side = torch.cat([pair["truth"], torch.ones(pair["truth"].shape[0], 32, 2), pair["reconstruction"]], dim=-1)
        ax.imshow(side.clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(title, fontsize=7)
    fig.suptitle("Best reconstruction per cell (left: truth, right: reconstruction)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def best_pair(cell: dict, results_folder: Path) -> dict[str, torch.Tensor] | None:
    """The cell's best (truth, reconstruction) pair from its safetensors file, which must lie in the results
    folder's `*_cells` folders; None (with one line on stderr) when the file is missing or lies elsewhere."""
    folder = results_folder.resolve()
    path = (REPO / str(cell["best_image"])).resolve()
    if path.parent.parent != folder or not path.parent.name.endswith("_cells") or path.suffix != ".safetensors":
        print(f"warning: {cell['best_image']!r} is not a cell image of {folder}: left out", file=sys.stderr)
        return None
    if not path.is_file():
        print(f"warning: {cell['best_image']} is missing: re-run its cell with --rerun", file=sys.stderr)
        return None
    pair = load_tensors(path)
    if set(pair) != {"truth", "reconstruction"} or pair["truth"].shape != pair["reconstruction"].shape:
        print(f"warning: {cell['best_image']} does not hold a truth and a reconstruction: left out", file=sys.stderr)
        return None
    return pair


def markdown(report: dict, args: argparse.Namespace) -> str:
    lines = [
        "| attack | model state | recipe | batch | trials | median PSNR (dB) | min-max | median SSIM | label acc "
        "| s / update (under load) | options | peer (breaching) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows, cols = grid_axes(report, args)
    for state, recipe in rows:
        for attack, batch in cols:
            cell = report["cells"].get(cell_id(attack, state, recipe, batch))
            if cell is None or cell["status"] != "done":
                continue
            peer = cell.get("peer", {})
            peer_text = peer.get("status", "-").split(":")[0]
            if peer.get("psnr_median") is not None:
                cpu = peer.get("cpu_seconds_per_update")
                peer_text = (
                    f"{peer['psnr_median']:.1f} dB, {peer['seconds_per_update']:.0f} s"
                    + (f" ({cpu:.0f} CPU s)" if cpu is not None else "")
                    + f", {peer['iterations']} it"
                    + (", labels given" if peer.get("labels_given") else "")
                )
            cpu = cell.get("cpu_seconds_per_update")
            seconds = f"{cell['seconds_per_update']:.0f}" + (f" ({cpu:.0f} CPU)" if cpu is not None else "")
            options = ", ".join(f"{k}={v}" for k, v in cell["options"].items()) or "-"
            lines.append(
                f"| {attack} | {state} | {recipe} | {batch} | {cell['trials']} | {cell['psnr_median']:.1f} "
                f"| {cell['psnr_min']:.1f}-{cell['psnr_max']:.1f} | {cell['ssim_median']:.3f} "
                f"| {cell['label_accuracy']:.0%} | {seconds} | {options} | {peer_text} |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, args: argparse.Namespace) -> None:
    path = results_path(args)
    heat_map(report, args, path.with_suffix(".png"))
    best_figure(report, path.with_name(path.stem + "_best.png"))
    atomic_write_text(path.with_suffix(".md"), markdown(report, args))


def chosen_cells(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    """The cells to run, in order: --cells as given, else the grid of the chosen axes, small batches first."""
    if args.cells:
        out = []
        for key in args.cells.split(","):
            parts = key.split("|")
            ok = len(parts) == 4 and parts[0] in ATTACKS and parts[1] in STATES and parts[2] in RECIPES
            if not ok or not parts[3].removeprefix("b").isdigit():
                print(f"error: --cells takes attack|state|recipe|bN ids, comma-separated; got {key!r}", file=sys.stderr)
                sys.exit(2)
            out.append((parts[0], parts[1], parts[2], int(parts[3][1:])))
        return [c for c in out if not not_applicable(*c)]
    grid = [(a, s, r, b) for b in args.batches for s in args.states for r in args.recipes for a in args.attacks]
    return [c for c in grid if not not_applicable(*c)]


def save_cell(path: Path, report: dict, key: str, cell: dict, defaults: dict) -> dict:
    """Add one finished cell to the results file atomically, keeping cells other runs wrote meanwhile."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            report["cells"] = {**json.loads(path.read_text())["cells"], **report["cells"]}
        report["cells"][key] = cell
        report["options_default"] = defaults
        atomic_write_json(path, report)
    return report


def add_peer(path: Path, report: dict, key: str, args: argparse.Namespace) -> dict:
    """Fill the peer column of a finished IG cell (outside the cell's own time limit)."""
    cell = report["cells"].get(key)
    if not wants_peer(cell, args):
        return report
    start = time.perf_counter()
    peer = peer_breaching(cell, args)
    shown = f"{peer['psnr_median']:.1f} dB" if peer.get("psnr_median") is not None else peer["status"]
    print(f"{key}: peer (breaching) {shown} ({time.perf_counter() - start:.0f} s)", flush=True)
    return save_cell(path, report, key, {**cell, "peer": peer}, report.get("options_default", {}))


def _alarm(signum, frame):  # noqa: ARG001
    raise CellTimeout


def parse_options(pairs: list[str]) -> dict[str, dict]:
    """`attack.key=value` pairs (value as JSON, else a string) into {attack: {key: value}}."""
    out: dict[str, dict] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        attack, _, key = name.partition(".")
        if not key or not value or attack not in ATTACKS:
            raise SystemExit(f"bad --option {pair!r}: write attack.key=value with attack one of {', '.join(ATTACKS)}")
        try:
            out.setdefault(attack, {})[key] = json.loads(value)
        except json.JSONDecodeError:
            out.setdefault(attack, {})[key] = value
    return out


def choices(text: str, allowed: tuple, name: str) -> list[str]:
    chosen = [c for c in text.split(",") if c]
    bad = [c for c in chosen if c not in allowed]
    if bad or not chosen:
        print(f"error: --{name} takes a comma-separated subset of {', '.join(allowed)}; got {text!r}", file=sys.stderr)
        sys.exit(2)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--states", default=",".join(STATES))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--cells", default="", help="run exactly these cells, in order: attack|state|recipe|bN,...")
    parser.add_argument("--trials", type=int, default=3, help="clients (updates) attacked per cell")
    parser.add_argument("--rounds", type=int, default=10, help="FedAvg rounds before the convnet-fedavg state")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--option", action="append", default=[], help="attack.key=value, e.g. ig.iterations=300")
    parser.add_argument("--cell-timeout", type=int, default=900, help="seconds a cell may take before it is dropped")
    parser.add_argument("--rerun", action="store_true", help="repeat cells already in the results")
    parser.add_argument("--plots-only", action="store_true", help="only redraw the figures and the table")
    parser.add_argument("--quick", action="store_true", help="tiny budgets, 1 trial, into leakage-quick.*")
    parser.add_argument("--breaching-python", default="", help="python of breaching's venv for the peer column")
    parser.add_argument("--peer-timeout", type=int, default=3600, help="seconds the peer may take per cell")
    args = parser.parse_args()
    args.attacks = choices(args.attacks, ATTACKS, "attacks")
    args.states = choices(args.states, STATES, "states")
    args.recipes = choices(args.recipes, RECIPES, "recipes")
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        args.batches = []
    if not args.batches or min(args.batches) < 1 or args.trials < 1 or min(args.cell_timeout, args.peer_timeout) < 1:
        print(
            "error: --batches takes positive integers; --trials, --cell-timeout, --peer-timeout must be >= 1",
            file=sys.stderr,
        )
        sys.exit(2)
    args.options = parse_options(args.option)
    if args.quick:
        args.trials, args.rounds = 1, 1
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    path = results_path(args)
    report = json.loads(path.read_text()) if path.exists() else {"benchmark": "bench_leakage", "cells": {}}
    report["machine"] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                         "note": "2 CPU cores shared with other work: seconds are measured under load"}  # fmt: skip
    report["lpips"] = "not computed: LPIPS needs torchvision's AlexNet weights, which are not on this machine"
    if not args.plots_only:
        signal.signal(signal.SIGALRM, _alarm)
        for attack, state, recipe, batch in chosen_cells(args):
            key = cell_id(attack, state, recipe, batch)
            if key in report["cells"] and not args.rerun:
                print(f"{key}: kept ({report['cells'][key]['status']})")
                report = add_peer(path, report, key, args)
                continue
            start = time.perf_counter()
            signal.alarm(args.cell_timeout)
            try:
                cell = run_cell(attack, state, recipe, batch, args)
            except CellTimeout:
                cell = {"attack": attack, "state": state, "recipe": recipe, "batch": batch,
                        "status": f"timeout: over {args.cell_timeout} s"}  # fmt: skip
            finally:
                signal.alarm(0)
            report = save_cell(path, report, key, cell, QUICK if args.quick else OPTIONS)
            shown = f"{cell['psnr_median']:.1f} dB" if cell["status"] == "done" else cell["status"]
            print(f"{key}: {shown} ({time.perf_counter() - start:.0f} s)", flush=True)
            report = add_peer(path, report, key, args)
    write_outputs(report, args)
    print(f"results in {path}")


if __name__ == "__main__":
    main()
