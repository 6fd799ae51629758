"""Benchmark of the gradient-inversion attacks on real CIFAR-10 images (not run in CI; CPU runs take long).

Parts (run one at a time with --part, results in benchmarks/results/<part>.json):
  dlg       DLG and iDLG on 20 lossless 32x32 images, DLG's LeNet, FedSGD, batch 1: PSNR, SSIM,
            label accuracy, gradient evaluations to reach 30 dB.
  grnn      GRNN vs DLG on LeNet-5 (re-initialised U(-0.5, 0.5) as GRNN's code does), batch sizes 1..64.
  grnn-paper  GRNN vs DLG in the GRNN paper's setting: random (seeded) batches of CIFAR-10 test images with
            distinct labels where the class count allows, the untrained LeNet-5 with a 100-class output,
            --trials batches per batch size solved in one batched run; mean, median, IQR, min, max of PSNR.
  analytic  the closed-form attack on the MLP: PSNR and seconds, batch 1 and small batches.
  timing    seconds per reconstruction per attack, and reconstructions/minute with and without
            batching several targets on one device (reconstruct_many).
Example: python benchmarks/bench_gradient_inversion.py --part dlg --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacks import AttackDiverged, AttackTarget, get_attack, infer_labels, model_gradients, reconstruct_many  # noqa: E402
from fedsim.files import atomic_write_json  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.scoring import pairwise_psnr, score  # noqa: E402

DATA = Path(os.environ.get("FEDSIM_SHARED_DATA", ROOT.parent / "shared" / "data"))
console = Console(width=150)


def cifar(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The lossless first CIFAR-10 training images: exact pixels, so PSNR is against the true originals."""
    data = np.load(DATA / "cifar10" / "cifar10_train_first200_kaggle_png.npz", allow_pickle=False)
    x = torch.tensor(data["x"][offset : offset + n]).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor(data["y"][offset : offset + n]).long()


def cifar_test(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 test images by index (JPEG-recompressed, as fedsim serves them): photos no test or demo uses."""
    data = np.load(DATA / "cifar10" / "cifar10_test_yoongikim_jpeg_q75.npz", allow_pickle=False)
    x = torch.tensor(data["x"][indices]).permute(0, 3, 1, 2).float() / 255
    return x, torch.tensor(data["y"][indices]).long()


def target_for(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int = 10) -> AttackTarget:
    return AttackTarget(model, model_gradients(model, x, y), len(y), tuple(x.shape[1:]), num_classes)


def grnn_lenet(seed: int, num_classes: int = 10) -> torch.nn.Module:
    """LeNet-5 with GRNN's weights_init: every weight and bias from U(-0.5, 0.5)."""
    model = build_model("lenet5", (3, 32, 32), num_classes, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.5, 0.5, generator=gen)
    return model


def evaluations_to(result, truth: torch.Tensor, threshold: float = 30.0) -> int | None:
    """Gradient evaluations until a snapshot first reaches `threshold` dB (None if never)."""
    evals = {h["iteration"]: h["evaluations"] for h in result.history}
    for iteration, images in result.snapshots:
        if pairwise_psnr(images, truth).diagonal().min() >= threshold:
            return evals.get(iteration)
    return None


def summarise(results: list, truths: list[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    scores, diverged = [], 0
    for result, (x, y) in zip(results, truths, strict=True):
        if isinstance(result, AttackDiverged):
            diverged += 1
            grey = torch.full_like(x, 0.5)  # a diverged attack recovers nothing: score it as a grey guess
            scores.append(score(grey, torch.full_like(y, -1), x, y))
        else:
            scores.append(score(result.images, result.labels, x, y))
    psnr = [p for s in scores for p in s["psnr"]]
    ssim = [v for s in scores for v in s["ssim"]]
    return {
        "psnr_median": float(np.median(psnr)),
        "psnr_mean": float(np.mean(psnr)),
        "ssim_median": float(np.median(ssim)),
        "ssim_mean": float(np.mean(ssim)),
        "label_accuracy": float(np.mean([s["label_accuracy"] for s in scores])),
        "diverged": diverged,
        "psnr": psnr,
        "ssim": ssim,
    }


def part_dlg(args: argparse.Namespace) -> dict:
    if args.indices:  # test-set photos nobody tuned for
        x, y = cifar_test(args.indices)
    else:
        x, y = cifar(5 if args.quick else 20)
    n = len(y)
    model = build_model("lenet-dlg", (3, 32, 32), 10, seed=args.seed)
    targets = [target_for(model, x[i : i + 1], y[i : i + 1]) for i in range(n)]
    truths = [(x[i : i + 1], y[i : i + 1]) for i in range(n)]
    # iDLG's step 1 alone: label inference from the last layer, independent of the optimisation.
    inferred = [infer_labels(model, t.gradients, 1, 10, (3, 32, 32)).labels for t in targets]
    out = {
        "label_inference": {"accuracy": float(np.mean([int(a) == int(b) for a, b in zip(inferred, y, strict=True)]))}
    }
    for name in args.dlg_attacks:
        options = {"snapshot_every": 1, "optimizer": args.optimizer, **({"iterations": 100} if args.quick else {})}
        if args.rescues is not None:
            options["rescues"] = args.rescues
        attack = get_attack(name, **options)
        console.print(f"[bold]{name}[/]: {n} images, {attack.iterations} L-BFGS steps, batched {args.group} at a time")
        start = time.perf_counter()
        results = []
        for i in range(0, n, args.group):
            results += reconstruct_many(attack, targets[i : i + args.group], seed=args.seed, raise_on_divergence=False)
            console.print(f"  {len(results)}/{n} done, {time.perf_counter() - start:.0f}s")
        summary = summarise(results, truths)
        reach = [
            None if isinstance(r, AttackDiverged) else evaluations_to(r, t[0])
            for r, t in zip(results, truths, strict=True)
        ]
        hits = [e for e in reach if e is not None]
        summary.update(
            seconds=time.perf_counter() - start,
            evaluations_to_30db_median=float(np.median(hits)) if hits else None,
            reached_30db=len(hits),
            rescued_images=sum(
                1 for r in results if not isinstance(r, AttackDiverged) and any(r.info.get("rescued", [0]))
            ),
            evaluations=[None if isinstance(r, AttackDiverged) else r.info["evaluations"] for r in results],
            images=n,
            optimizer=args.optimizer,
            converged=[None if isinstance(r, AttackDiverged) else r.info["converged"] for r in results],
            relative_loss=[None if isinstance(r, AttackDiverged) else r.info["relative_loss"] for r in results],
        )
        out[name] = summary
        save(args, "dlg", out)  # keep each attack's results of this long part
    table = Table(title="DLG / iDLG, LeNet (DLG), CIFAR-10 32x32, FedSGD batch 1")
    for col in (
        "attack",
        "images",
        "PSNR median",
        "PSNR mean",
        "SSIM median",
        "label acc",
        "diverged",
        "≥30 dB",
        "evals to 30 dB (median)",
        "seconds",
    ):
        table.add_column(col)
    for name, s in out.items():
        if name == "label_inference":
            continue
        table.add_row(
            name,
            str(s["images"]),
            f"{s['psnr_median']:.1f}",
            f"{s['psnr_mean']:.1f}",
            f"{s['ssim_median']:.3f}",
            f"{s['label_accuracy']:.0%}",
            str(s["diverged"]),
            f"{s['reached_30db']}/{s['images']}",
            str(s["evaluations_to_30db_median"]),
            f"{s['seconds']:.0f}",
        )
    console.print(table)
    console.print(f"iDLG label inference alone: {out['label_inference']['accuracy']:.0%} of {n} labels")
    return out


def part_grnn(args: argparse.Namespace) -> dict:
    args.trials = args.trials or 1
    out = {}
    for batch in args.batches:
        x, y = cifar(batch * args.trials)
        model = grnn_lenet(args.seed)
        targets = [
            target_for(model, x[t * batch : (t + 1) * batch], y[t * batch : (t + 1) * batch])
            for t in range(args.trials)
        ]
        truths = [(x[t * batch : (t + 1) * batch], y[t * batch : (t + 1) * batch]) for t in range(args.trials)]
        for name in args.attacks:
            options = {"iterations": {"grnn": 200, "dlg": 60}[name]} if args.quick else {}
            attack = get_attack(name, **options)
            start = time.perf_counter()
            results = reconstruct_many(attack, targets, seed=args.seed, raise_on_divergence=False)
            summary = summarise(results, truths)
            summary.update(seconds=time.perf_counter() - start, iterations=attack.iterations, trials=args.trials)
            out[f"{name}-b{batch}"] = summary
            console.print(
                f"{name} batch {batch}: PSNR mean {summary['psnr_mean']:.1f} dB, "
                f"SSIM {summary['ssim_mean']:.3f}, {summary['seconds']:.0f}s"
            )
            save(args, "grnn", out)  # keep partial results of this long part
    table = Table(title="GRNN vs DLG, LeNet-5 (U(-0.5, 0.5) init), CIFAR-10 32x32, FedSGD")
    for col in (
        "attack",
        "batch",
        "trials",
        "iterations",
        "PSNR mean",
        "PSNR median",
        "SSIM mean",
        "label acc",
        "diverged",
        "seconds",
    ):
        table.add_column(col)
    for key, s in out.items():
        name, batch = key.rsplit("-b", 1)
        table.add_row(
            name,
            batch,
            str(s["trials"]),
            str(s["iterations"]),
            f"{s['psnr_mean']:.1f}",
            f"{s['psnr_median']:.1f}",
            f"{s['ssim_mean']:.3f}",
            f"{s['label_accuracy']:.0%}",
            str(s["diverged"]),
            f"{s['seconds']:.0f}",
        )
    console.print(table)
    return out


def distinct_label_batch(labels: np.ndarray, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a random batch whose labels repeat as little as the class count allows: distinct labels up to
    one image per class; beyond, every class ⌊B/C⌋ times and B mod C classes (drawn at random) once more."""
    classes = np.unique(labels)
    rounds, rest = divmod(batch, len(classes))
    counts = {int(c): rounds for c in classes}
    for c in rng.choice(classes, rest, replace=False):
        counts[int(c)] += 1
    picks = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in counts.items() if n]
    return rng.permutation(np.concatenate(picks))


def spread(values: list[float]) -> dict:
    """Mean, median, quartiles, min and max of a list of PSNRs."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"mean": float(np.mean(values)), "median": float(median), "q1": float(q1), "q3": float(q3),
            "iqr": float(q3 - q1), "min": float(np.min(values)), "max": float(np.max(values))}  # fmt: skip


def merge_trials(kept: dict | None, fresh: dict, batch: int) -> dict:
    """The summary of the kept trials followed by freshly run ones (every trial has `batch` images)."""
    if not kept:
        return fresh
    kept_trials, fresh_trials = kept["trials"], len(fresh["psnr"]) // batch
    psnr = kept["psnr"] + fresh["psnr"]
    ssim = kept.get("ssim")  # older files kept only the SSIM summary: its mean still merges exactly
    ssim_mean = (kept["ssim_mean"] * kept_trials + fresh["ssim_mean"] * fresh_trials) / (kept_trials + fresh_trials)
    return {
        "psnr_median": float(np.median(psnr)),
        "psnr_mean": float(np.mean(psnr)),
        "ssim_median": float(np.median(ssim + fresh["ssim"])) if ssim is not None else None,
        "ssim_mean": float(ssim_mean),
        "label_accuracy": (kept["label_accuracy"] * kept_trials + fresh["label_accuracy"] * fresh_trials)
        / (kept_trials + fresh_trials),
        "diverged": kept["diverged"] + fresh["diverged"],
        "psnr": psnr,
        **({"ssim": ssim + fresh["ssim"]} if ssim is not None else {}),
        "evaluations": kept["evaluations"] + fresh["evaluations"],
        "seconds": kept["seconds"] + fresh["seconds"],
        "seconds_runs": kept.get("seconds_runs", [kept["seconds"]]) + [fresh["seconds"]],
    }


def part_grnn_paper(args: argparse.Namespace) -> dict:
    """GRNN vs DLG as the GRNN paper measures them (Ren et al. 2022, Tab. 3): per batch size, `--trials` random
    batches of CIFAR-10 test images (distinct labels where the class count allows), each on its own untrained
    LeNet-5 (U(-0.5, 0.5), 100 outputs: the labels live in a 100-class label space, as CIFAR-100's), the same
    batches for both attacks, every trial of one size solved in one batched run (attacks.problems.stack_targets).
    PSNR is per batch (the mean over its images after order-free matching), then summarised over the trials."""
    args.trials = args.trials or 10
    data = np.load(DATA / "cifar10" / "cifar10_test_yoongikim_jpeg_q75.npz", allow_pickle=False)
    labels = data["y"].astype(int)
    iterations = {"grnn": args.grnn_iterations, "dlg": args.dlg_iterations}
    if args.quick:
        iterations = {"grnn": 100, "dlg": 5}
    out = {"setup": {"num_classes": args.num_classes, "trials": args.trials, "iterations": iterations,
                     "dlg_restarts": args.dlg_restarts, "images": "cifar10 test (JPEG q75)"}}  # fmt: skip
    path = ROOT / "benchmarks" / "results" / f"grnn-paper{'-' + args.tag if args.tag else ''}.json"
    if path.exists() and not args.quick:  # resume: keep the (attack, batch size) cells, and the trials, measured
        out.update({k: v for k, v in json.loads(path.read_text())["results"].items() if k != "setup"})
    for batch in args.batches:
        rng = np.random.default_rng([args.seed, batch])
        indices = [distinct_label_batch(labels, batch, rng) for _ in range(args.trials)]
        truths = [cifar_test(list(i)) for i in indices]
        models = [grnn_lenet(args.seed * 1000 + t, args.num_classes) for t in range(args.trials)]
        targets = [target_for(m, x, y, args.num_classes) for m, (x, y) in zip(models, truths, strict=True)]
        for name in args.attacks:
            key = f"{name}-b{batch}"
            options = {"iterations": iterations[name]} | ({"restarts": args.dlg_restarts} if name == "dlg" else {})
            kept = out.get(key)
            done = kept["trials"] if kept else 0
            if kept and (kept["options"] != options or kept["indices"] != [i.tolist() for i in indices[:done]]):
                sys.exit(f"{path.name} holds {key} with other options or batches: pick another --tag")
            if done >= args.trials:
                console.print(f"{key}: kept from {path.name}")
                continue
            if done:
                console.print(f"{key}: {done} trials kept from {path.name}, running trials {done}..{args.trials - 1}")
            attack = get_attack(name, **options)
            start = time.perf_counter()
            # every trial is solved on its own (reconstruct_many stacks them, each as reconstruct(seed=seed) would),
            # so trials run later extend the kept ones exactly
            results = reconstruct_many(attack, targets[done:], seed=args.seed, raise_on_divergence=False)
            fresh = summarise(results, truths[done:])
            fresh["evaluations"] = [None if isinstance(r, AttackDiverged) else r.info["evaluations"] for r in results]
            fresh["seconds"] = time.perf_counter() - start
            out[key] = summary = merge_trials(kept, fresh, batch)
            per_batch = [float(np.mean(summary["psnr"][t * batch : (t + 1) * batch])) for t in range(args.trials)]
            summary.update(
                psnr_per_batch=per_batch,
                psnr_batches=spread(per_batch),
                psnr_images=spread(summary["psnr"]),
                options=options,
                trials=args.trials,
                distinct_labels=[len(set(labels[i].tolist())) for i in indices],
                indices=[i.tolist() for i in indices],
            )
            b = summary["psnr_batches"]
            console.print(
                f"{name} batch {batch}: PSNR mean {b['mean']:.1f} median {b['median']:.1f} "
                f"[{b['min']:.1f} .. {b['max']:.1f}] dB over {args.trials} batches, {summary['seconds']:.0f}s"
            )
            save(args, "grnn-paper", out)  # keep every finished (attack, batch size)
    table = Table(title=f"GRNN vs DLG, GRNN's setting: untrained LeNet-5, {args.num_classes} classes, "
                        f"random CIFAR-10 test batches, distinct labels")  # fmt: skip
    for col in ("attack", "batch", "trials", "iterations", "mean", "median", "IQR", "min", "max", "label acc", "s"):
        table.add_column(col)
    for key, s in out.items():
        if key == "setup":
            continue
        name, batch = key.rsplit("-b", 1)
        b = s["psnr_batches"]
        table.add_row(name, batch, str(s["trials"]), str(s["options"]["iterations"]), f"{b['mean']:.1f}",
                      f"{b['median']:.1f}", f"{b['q1']:.1f}-{b['q3']:.1f}", f"{b['min']:.1f}", f"{b['max']:.1f}",
                      f"{s['label_accuracy']:.0%}", f"{s['seconds']:.0f}")  # fmt: skip
    console.print(table)
    return out


def part_analytic(args: argparse.Namespace) -> dict:
    out = {}
    x, y = cifar(40)
    model = build_model("mlp", (3, 32, 32), 10, seed=args.seed)
    attack = get_attack("analytic")
    for batch in (1, 2, 4, 8):
        psnr, seconds, recovered, labels = [], [], 0, []
        for t in range(5 if args.quick else 20 // batch * (1 if batch == 1 else 2)):
            xs, ys = x[t * batch : (t + 1) * batch], y[t * batch : (t + 1) * batch]
            start = time.perf_counter()
            result = attack.reconstruct(target_for(model, xs, ys))
            seconds.append(time.perf_counter() - start)
            s = score(result.images, result.labels, xs, ys)
            psnr += s["psnr"]
            labels.append(s["label_accuracy"])
            recovered += result.info["recovered"]
        out[f"b{batch}"] = {
            "psnr_median": float(np.median(psnr)),
            "psnr_min": float(np.min(psnr)),
            "share_over_100db": float(np.mean(np.array(psnr) >= 100)),
            "label_accuracy": float(np.mean(labels)),
            "seconds_median": float(np.median(seconds)),
            "seconds_max": float(np.max(seconds)),
            "recovered": recovered,
            "examples": len(psnr),
        }
    table = Table(title="Analytic attack, MLP (first layer linear with bias), CIFAR-10 32x32, FedSGD")
    for col in (
        "batch",
        "examples",
        "recovered",
        "PSNR median",
        "PSNR min",
        "≥100 dB",
        "label acc",
        "s median",
        "s max",
    ):
        table.add_column(col)
    for key, s in out.items():
        table.add_row(
            key[1:],
            str(s["examples"]),
            str(s["recovered"]),
            f"{s['psnr_median']:.1f}",
            f"{s['psnr_min']:.1f}",
            f"{s['share_over_100db']:.0%}",
            f"{s['label_accuracy']:.0%}",
            f"{s['seconds_median']:.4f}",
            f"{s['seconds_max']:.4f}",
        )
    console.print(table)
    return out


def part_timing(args: argparse.Namespace) -> dict:
    """Equal work for both modes: fixed iteration budgets and tolerance 0 (no early stop)."""
    out = {}
    n = args.timing_targets
    x, y = cifar(n)
    setups = {
        "dlg": ("lenet-dlg", {"iterations": args.timing_iterations, "tolerance": 0.0}),
        "idlg": ("lenet-dlg", {"iterations": args.timing_iterations, "tolerance": 0.0}),
        "grnn": ("lenet5", {"iterations": args.timing_iterations * 10, "tolerance": 0.0}),
        "analytic": ("mlp", {}),
    }
    for name, (model_name, options) in setups.items():
        model = (
            grnn_lenet(args.seed)
            if model_name == "lenet5"
            else build_model(model_name, (3, 32, 32), 10, seed=args.seed)
        )
        targets = [target_for(model, x[i : i + 1], y[i : i + 1]) for i in range(n)]
        attack = get_attack(name, **options)
        start = time.perf_counter()
        for t in targets:
            try:
                attack.reconstruct(t, seed=args.seed)
            except AttackDiverged:
                pass
        sequential = time.perf_counter() - start
        start = time.perf_counter()
        reconstruct_many(attack, targets, seed=args.seed, raise_on_divergence=False)
        batched = time.perf_counter() - start
        out[name] = {
            "options": options,
            "targets": n,
            "seconds_per_reconstruction": sequential / n,
            "per_minute_sequential": 60 * n / sequential,
            "per_minute_batched": 60 * n / batched,
            "speedup": sequential / batched,
            "threads": torch.get_num_threads(),
        }
        console.print(f"{name}: {sequential / n:.2f}s each sequentially, batching x{sequential / batched:.1f}")
    table = Table(title=f"Throughput on {torch.get_num_threads()} CPU threads, {n} targets (CIFAR 32x32, batch 1)")
    for col in (
        "attack",
        "options",
        "s / reconstruction",
        "per minute (one by one)",
        "per minute (batched)",
        "speed-up",
    ):
        table.add_column(col)
    for name, s in out.items():
        table.add_row(
            name,
            json.dumps(s["options"]),
            f"{s['seconds_per_reconstruction']:.2f}",
            f"{s['per_minute_sequential']:.1f}",
            f"{s['per_minute_batched']:.1f}",
            f"x{s['speedup']:.1f}",
        )
    console.print(table)
    return out


def save(args: argparse.Namespace, part: str, result: dict) -> Path:
    folder = ROOT / "benchmarks" / "results"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{part}{'-' + args.tag if args.tag else ''}{'-quick' if args.quick else ''}.json"
    meta = {
        "part": part,
        "args": {k: v for k, v in vars(args).items() if k != "part"},
        "quick": args.quick,
        "seed": args.seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_json(path, {"meta": meta, "results": result})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["dlg", "grnn", "grnn-paper", "analytic", "timing", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="fewer images and iterations (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group", type=int, default=10, help="targets batched together in the dlg part")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64], help="grnn part: batch sizes")
    parser.add_argument("--attacks", nargs="+", default=["grnn", "dlg"], choices=["grnn", "dlg"])
    parser.add_argument("--trials", type=int, default=None,
                        help="grnn parts: batches per batch size (default 1; grnn-paper 10)")  # fmt: skip
    parser.add_argument("--num-classes", type=int, default=100, help="grnn-paper part: the LeNet's outputs")
    parser.add_argument("--grnn-iterations", type=int, default=1000, help="grnn-paper part: GRNN's RMSprop steps")
    parser.add_argument("--dlg-iterations", type=int, default=50,
                        help="grnn-paper part: DLG's L-BFGS steps (x20 inner: 1,000 evaluations)")  # fmt: skip
    parser.add_argument("--dlg-restarts", type=int, default=1, help="grnn-paper part: DLG restarts")
    parser.add_argument("--dlg-attacks", nargs="+", default=["idlg", "dlg"], choices=["idlg", "dlg"],
                        help="dlg part: which attacks")  # fmt: skip
    parser.add_argument("--rescues", type=int, default=None, help="dlg part: DLG/iDLG rescues (default: the preset's)")
    parser.add_argument("--optimizer", default="robust", choices=["robust", "paper"], help="dlg part: DLG/iDLG preset")
    parser.add_argument("--indices", type=int, nargs="*", default=[],
                        help="dlg part: CIFAR-10 test-set indices (default: the first training images)")  # fmt: skip
    parser.add_argument("--tag", default="", help="suffix of the results file, to keep runs done in pieces")
    parser.add_argument("--timing-targets", type=int, default=8)
    parser.add_argument("--timing-iterations", type=int, default=20)
    args = parser.parse_args()
    parts = ["analytic", "dlg", "timing", "grnn"] if args.part == "all" else [args.part]
    for part in parts:
        parts_by_name = {"dlg": part_dlg, "grnn": part_grnn, "grnn-paper": part_grnn_paper, "analytic": part_analytic}
        result = {**parts_by_name, "timing": part_timing}[part](args)
        console.print(f"saved {save(args, part, result)}")


if __name__ == "__main__":
    main()
