"""DLG and iDLG defaults against the paper's optimiser on images nobody tuned for (not run in CI).

DLG's LeNet (untrained, sigmoid, U(-0.5, 0.5) as in the paper), FedSGD, batch 1. Two image sets:
  cifar    20 CIFAR-10 test photos drawn at random (seeded) from indices 6000-9999, which no test, demo
           or other benchmark uses; the indices go into the results.
  folder   an image folder of real photos, read by fedsim's own image-folder loader
           (fedsim.datasets.load_image_folder, 32x32): ORL faces of subjects s36-s40 (two photos each,
           centre-cropped to a square), written as PNGs into a folder with one sub-folder per subject.
For each attack (dlg, idlg) and each optimiser setting (the defaults; `optimizer=paper`, the paper's
L-BFGS with its noise init), on exactly the same captured gradients, all images of a set run as one
batched job. Per image: PSNR, SSIM, label right, converged, gradient evaluations (feature-fit
evaluations included and also given apart) and seconds until the image first reaches 30 dB.
Results: benchmarks/results/dlg-defaults[-<tag>].json.
Example: python benchmarks/bench_dlg_defaults.py --sets cifar folder --configs default paper
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attacks import AttackDiverged, get_attack, reconstruct_many  # noqa: E402
from benchmarks.bench_gradient_inversion import DATA, cifar_test, console, evaluations_to, target_for  # noqa: E402
from fedsim.datasets import load_dataset, to_float  # noqa: E402
from fedsim.files import atomic_write_json  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.scoring import pairwise_psnr, score  # noqa: E402

CONFIGS = {"default": {}, "paper": {"optimizer": "paper"}}
FOLDER_SUBJECTS = ("s36", "s37", "s38", "s39", "s40")


def cifar_indices(count: int, seed: int) -> list[int]:
    """`count` distinct CIFAR-10 test indices from 6000-9999, a seeded draw (sorted)."""
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(np.arange(6000, 10000), size=count, replace=False))


def orl_folder(root: Path, photos: int) -> Path:
    """An image folder (one sub-folder per subject) of ORL face photos, centre-cropped square, as PNG."""
    for subject in FOLDER_SUBJECTS:
        (root / subject).mkdir(parents=True, exist_ok=True)
        for k in range(1, photos + 1):
            image = Image.open(DATA / "orl_faces" / subject / f"{k}.pgm")
            w, h = image.size
            top = (h - w) // 2
            image.crop((0, top, w, top + w)).save(root / subject / f"{k}.png")
    return root


def image_set(name: str, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, int, dict]:
    """Images [N, 3, 32, 32] in [0, 1], labels, class count and a description of where they came from."""
    if name == "cifar":
        indices = args.indices or cifar_indices(args.count, args.draw_seed)
        x, y = cifar_test(indices)
        return x, y, 10, {"source": "cifar10_test_yoongikim_jpeg_q75.npz", "indices": indices}
    with tempfile.TemporaryDirectory() as tmp:
        data = load_dataset("imagefolder", str(orl_folder(Path(tmp), args.folder_photos)), image_size=32)
        x = to_float(torch.cat([data.train_x, data.test_x]))
        y = torch.cat([data.train_y, data.test_y]).long()
    source = {"source": "orl_faces via fedsim's image-folder loader", "subjects": list(FOLDER_SUBJECTS)}
    return x, y, data.num_classes, {**source, "photos_per_subject": args.folder_photos}


def seconds_to(result, truth: torch.Tensor, times: dict[int, float], threshold: float = 30.0) -> float | None:
    """Wall seconds of the batched job until the image's snapshot first reaches `threshold` dB."""
    for iteration, images in result.snapshots:
        if pairwise_psnr(images, truth).diagonal().min() >= threshold:
            return times.get(iteration, times.get(min(times, key=lambda k: abs(k - iteration)), None))
    return None


def total_to(evals: int, chosen: int, side: int, per_restart: list[int]) -> int:
    """The honest cost to 30 dB: every restart's gradient evaluations until the kept one first reached 30 dB.

    Restarts side by side (the first `side`) step together, so each is charged the kept one's count
    (`side` times it; a restart that stopped early cost less, so this is an upper bound). A restart on
    demand runs after them: if it is the one kept, every earlier restart's whole run counts as well."""
    if chosen < side:
        return side * evals
    return sum(per_restart[:chosen]) + evals


def parse_options(items: list[str]) -> dict:
    """`key=value` attack options (ints, floats and words), e.g. restarts=1."""
    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def run(attack_name: str, config: str, targets, x, y, args: argparse.Namespace) -> dict:
    iterations = args.paper_iterations if config == "paper" and args.paper_iterations else args.iterations
    options = {"snapshot_every": 1, **CONFIGS[config], **({"iterations": iterations} if iterations else {}),
               **parse_options(args.option)}  # fmt: skip
    attack = get_attack(attack_name, **options)
    times: dict[int, float] = {}
    start = time.perf_counter()

    def progress(iteration: int, _loss: float) -> None:
        times.setdefault(0, time.perf_counter() - start)  # the first step's end bounds the start's time
        times[iteration] = time.perf_counter() - start

    results = reconstruct_many(attack, targets, seed=args.seed, progress=progress, raise_on_divergence=False,
                               max_group=len(targets))  # fmt: skip
    seconds = time.perf_counter() - start
    rows = []
    for i, result in enumerate(results):
        truth = x[i : i + 1]
        if isinstance(result, AttackDiverged):
            rows.append({"image": i, "dropped": str(result), "psnr": None, "reached_30db": False})
            continue
        s = score(result.images, result.labels, truth, y[i : i + 1])
        info = result.info
        chosen = info["chosen_restart"]
        evals = evaluations_to(result, truth)
        fit = info.get("feature_evaluations", [0] * info["restarts"])[chosen]
        side = info.get("side_by_side", info["restarts"])
        per_restart = info.get("restart_evaluations", [])
        total = None if evals is None else total_to(evals, chosen, side, per_restart)
        rows.append({
            "image": i,
            "psnr": s["psnr"][0],
            "ssim": s["ssim"][0],
            "label_right": bool(s["label_accuracy"] == 1.0),
            "converged": info["converged"],
            "relative_loss": info["relative_loss"],
            "init": info.get("init"),
            "optimizer": info["optimizer"],
            "reached_30db": evals is not None,
            "evaluations_to_30db": evals,
            "feature_evaluations": fit,
            "matching_evaluations_to_30db": None if evals is None else evals - fit,
            "seconds_to_30db": seconds_to(result, truth, times),
            "evaluations": info["evaluations"],
            "evaluations_all_restarts": info["evaluations_all_restarts"],
            "total_evaluations_to_30db": total,
            "restarts": info["restarts"],
            "side_by_side": side,
            "on_demand": info.get("on_demand", 0),
            "chosen_restart": chosen,
            "dropped_restarts": info["dropped_restarts"],
            "rescued": info.get("rescued"),
        })  # fmt: skip
    psnr = [r["psnr"] if r["psnr"] is not None else 0.0 for r in rows]
    reach = [r["evaluations_to_30db"] for r in rows if r["reached_30db"]]
    matching = [r["matching_evaluations_to_30db"] for r in rows if r["reached_30db"]]
    totals = [r["total_evaluations_to_30db"] for r in rows if r["reached_30db"]]
    secs = [r["seconds_to_30db"] for r in rows if r["reached_30db"] and r["seconds_to_30db"] is not None]
    summary = {
        "attack": attack_name,
        "config": config,
        "options": options,
        "images": len(rows),
        "dropped": sum(1 for r in rows if r["psnr"] is None),
        "below_30db": sum(1 for p in psnr if p < 30),
        "psnr_min": float(np.min(psnr)),
        "psnr_median": float(np.median(psnr)),
        "ssim_median": float(np.median([r["ssim"] for r in rows if r["psnr"] is not None] or [0.0])),
        "label_accuracy": float(np.mean([r.get("label_right", False) for r in rows])),
        "converged": sum(1 for r in rows if r.get("converged")),
        "reached_30db": len(reach),
        "evaluations_to_30db_median": float(np.median(reach)) if reach else None,
        "matching_evaluations_to_30db_median": float(np.median(matching)) if matching else None,
        "total_evaluations_to_30db_median": float(np.median(totals)) if totals else None,
        "evaluations_all_restarts_median": float(np.median([r["evaluations_all_restarts"] for r in rows if r["psnr"]])),
        "on_demand_restarts": sum(r.get("on_demand", 0) for r in rows),
        "seconds_to_30db_median": float(np.median(secs)) if secs else None,
        "seconds": seconds,
        "per_image": rows,
    }
    console.print(
        f"{attack_name} {config}: PSNR min {summary['psnr_min']:.1f} median {summary['psnr_median']:.1f}, "
        f"<30 dB {summary['below_30db']}, dropped {summary['dropped']}, converged {summary['converged']}/{len(rows)}, "
        f"evals to 30 dB {summary['evaluations_to_30db_median']} "
        f"(matching {summary['matching_evaluations_to_30db_median']}, "
        f"all restarts {summary['total_evaluations_to_30db_median']}), on demand {summary['on_demand_restarts']}, "
        f"{seconds:.0f}s"
    )
    return summary


def report(paths: list[Path]) -> None:
    """A markdown table of the runs in results files (one row per set, attack and optimiser setting)."""

    def num(value: float | None, fmt: str) -> str:
        return "—" if value is None else format(value, fmt)

    print("| set | attack | optimiser | images | ≥ 30 dB | dropped | PSNR min / median | SSIM median | labels "
                  "| converged | evals to 30 dB (matching) | s to 30 dB |")  # fmt: skip
    print("|" + " --- |" * 12)
    for path in paths:
        for name, entry in json.loads(path.read_text())["sets"].items():
            for r in entry["runs"].values():
                print(
                    f"| {name} | {r['attack']} | {r['config']} | {r['images']} | {r['images'] - r['below_30db']} "
                    f"| {r['dropped']} | {r['psnr_min']:.1f} / {r['psnr_median']:.1f} | {r['ssim_median']:.3f} "
                    f"| {r['label_accuracy']:.0%} | {r['converged']} | {num(r['evaluations_to_30db_median'], ',.0f')} "
                    f"({num(r['matching_evaluations_to_30db_median'], ',.0f')}) "
                    f"| {num(r['seconds_to_30db_median'], '.0f')} |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["cifar", "folder"], choices=["cifar", "folder"])
    parser.add_argument("--attacks", nargs="+", default=["idlg", "dlg"], choices=["idlg", "dlg"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--count", type=int, default=20, help="cifar: images drawn")
    parser.add_argument("--draw-seed", type=int, default=13, help="cifar: seed of the index draw")
    parser.add_argument("--indices", type=int, nargs="*", default=[], help="cifar: explicit test indices instead")
    parser.add_argument("--folder-photos", type=int, default=2, help="folder: photos per subject (of 10)")
    parser.add_argument("--iterations", type=int, default=0, help="L-BFGS steps (0: the attack's default)")
    parser.add_argument("--paper-iterations", type=int, default=0,
                        help="L-BFGS steps of the paper's optimiser (0: as --iterations)")  # fmt: skip
    parser.add_argument("--option", nargs="*", default=[], help="attack options key=value (e.g. restarts=1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the results file")
    parser.add_argument("--report", nargs="+", type=Path, help="print the markdown table of these results files")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        return
    torch.set_num_threads(1)
    path = ROOT / "benchmarks" / "results" / f"dlg-defaults{'-' + args.tag if args.tag else ''}.json"
    out: dict = {"meta": {"args": vars(args), "torch": torch.__version__, "threads": 1,
                          "date": time.strftime("%Y-%m-%d %H:%M:%S"), "model": "lenet-dlg", "recipe": "fedsgd",
                          "batch": 1}, "sets": {}}  # fmt: skip
    if args.resume and path.exists():
        out["sets"] = json.loads(path.read_text())["sets"]
    for name in args.sets:
        x, y, classes, source = image_set(name, args)
        model = build_model("lenet-dlg", (3, 32, 32), classes, seed=args.seed)
        targets = [target_for(model, x[i : i + 1], y[i : i + 1], classes) for i in range(len(y))]
        entry = out["sets"].setdefault(name, {**source, "labels": y.tolist(), "classes": classes, "runs": {}})
        for attack_name in args.attacks:
            for config in args.configs:
                if f"{attack_name}-{config}" in entry["runs"]:
                    continue
                entry["runs"][f"{attack_name}-{config}"] = run(attack_name, config, targets, x, y, args)
                atomic_write_json(path, out)  # keep what is done
    console.print(f"saved {path}")


if __name__ == "__main__":
    main()
