"""Peer: breaching's `invertinggradients` attack (Geiping et al.'s own framework) on the updates fedsim attacks.

breaching is never a fedsim dependency: this script runs in breaching's own environment, and the fedsim side
hands it the captured updates as files (safetensors + JSON, never pickle):

    python3 -m venv /work/venv-breaching
    /work/venv-breaching/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/venv-breaching/bin/pip install --no-deps breaching && /work/venv-breaching/bin/pip install \
        hydra-core scipy safetensors          # breaching's other dependency, lpips, is not needed here
    PYTHONPATH=$PWD /work/venv-breaching/bin/python benchmarks/peer_breaching.py --targets DIR --out FILE.json

`PYTHONPATH` is the fedsim checkout: the script builds the victim model from `fedsim.models` (torch only), the
same architecture fedsim attacks. It runs breaching's `minimal_example.py` route: a hand-built server payload
(the model's parameters, no buffers: the client computed its update in training mode, BatchNorm on batch
statistics, as fedsim's clients do) and the user's shared data, then `attacker.reconstruct`. Offline.

The targets directory DIR, one pair of files per target (`write_target` writes them from an AttackTarget):

    DIR/<id>.safetensors   "state.<key>"  every tensor of the model's state dict as the server sent it
                           "signal.<i>"   the observed signal, one tensor per parameter in
                                          model.named_parameters() order: the gradient (FedSGD) or the weight
                                          update, client minus global (FedAvg)
                           "truth"        (optional) the true images [B, C, H, W] in [0, 1], only for scoring
    DIR/<id>.json          {"model": "resnet20", "input_shape": [3, 32, 32], "num_classes": 10,
                            "batch_size": 1, "labels": [3] or null (null: breaching infers them),
                            "truth_labels": [3] or null (only for scoring),
                            "recipe": {"mode": "fedsgd"}
                                   or {"mode": "fedavg", "lr": 0.01, "steps": 4, "batch_size": 2}}

FedAvg updates are attacked with breaching's multi-step objective (the local steps replayed on the candidate
batch in a fixed order, `batch_size` examples a step); they need their labels.

Normalisation: breaching optimises the candidate in the normalised space of the data (randn init, step size
0.1, the box [(0 - m)/s, (1 - m)/s] in those units). The candidate is fed to the fedsim model, which takes
images in [0, 1], through x = z·s + m, with (m, s) the model's own normalisation where it has one (the
ResNet-20's) and breaching's CIFAR-10 constants otherwise.

FILE.json: {"peer": "breaching", "attack": "invertinggradients", "config": {...},
            "targets": [{"id", "psnr" (null without truth), "seconds", "cpu_seconds", "labels",
                         "label_accuracy"}],
            "median_psnr", "median_seconds"}; with --images DIR2 each reconstruction is also written to
DIR2/<id>.safetensors ("images", [B, C, H, W] in [0, 1]).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# breaching's CIFAR-10 data constants (breaching/config/case/data/CIFAR10.yaml).
CIFAR10_MEAN = (0.4914672374725342, 0.4822617471218109, 0.4467701315879822)
CIFAR10_STD = (0.24703224003314972, 0.24348513782024384, 0.26158785820007324)


def write_target(
    directory: str | Path,
    name: str,
    target,
    truth: torch.Tensor | None = None,
    truth_labels: torch.Tensor | None = None,
) -> None:
    """Write one fedsim AttackTarget (attacks.contract) into a targets directory in the format above; the
    true images and labels only score (breaching never sees them)."""
    from safetensors.torch import save_file

    from attacks.base import local_steps

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = target.model
    if not all(p.requires_grad for p in model.parameters()):
        raise ValueError(f"{name}: breaching matches every parameter; this target has frozen ones")
    fedavg = target.recipe.fedavg or target.gradients is None
    signal = target.update if fedavg else target.gradients
    tensors = {
        f"state.{k}": v.detach().float().contiguous() for k, v in model.state_dict().items() if v.is_floating_point()
    }
    tensors.update({f"signal.{i}": s.detach().float().contiguous() for i, s in enumerate(signal)})
    if truth is not None:
        tensors["truth"] = truth.detach().float().contiguous()
    if fedavg:
        n = target.recipe.num_examples or target.batch_size
        batch = target.recipe.batch_size or n
        if n % batch or target.labels is None:
            raise ValueError(f"{name}: breaching's multi-step replay needs full batches and the labels")
        recipe = {"mode": "fedavg", "lr": target.recipe.lr, "steps": local_steps(target.recipe, n), "batch_size": batch}
    else:
        n, recipe = target.batch_size, {"mode": "fedsgd"}
    meta = {
        "model": type(model).__name__,
        "input_shape": list(target.input_shape),
        "num_classes": int(target.num_classes),
        "batch_size": int(n),
        "labels": None if target.labels is None else [int(v) for v in target.labels],
        "recipe": recipe,
        "truth_labels": None if truth_labels is None else [int(v) for v in truth_labels],
    }
    save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(meta, indent=1))


MODEL_CLASSES = {
    "LeNetDLG": "lenet-dlg",
    "LeNet5": "lenet5",
    "ConvNet": "convnet",
    "MLP": "mlp",
    "ResNet20": "resnet20",
}


class Normalised(torch.nn.Module):
    """The fedsim model seen from breaching's normalised data space: forward(z) = model(z·s + m)."""

    def __init__(self, model: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.shift, self.scale = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z * self.scale + self.shift)


def psnr(images: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean PSNR (dB, images in [0, 1]) after matching reconstructions to truths by optimal assignment."""
    from scipy.optimize import linear_sum_assignment

    mse = ((images[:, None] - truth[None]) ** 2).flatten(2).mean(2).clamp(min=1e-30)
    table = 10 * torch.log10(1 / mse)
    rows, cols = linear_sum_assignment(-table.numpy())
    return float(table[rows, cols].mean())


def load_target(directory: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    meta = json.loads((directory / f"{name}.json").read_text())
    return meta, load_file(str(directory / f"{name}.safetensors"))


def attack_one(meta: dict, tensors: dict[str, torch.Tensor], cfg, seed: int) -> dict:
    import breaching

    from fedsim.models import build_model

    model = build_model(
        MODEL_CLASSES.get(meta["model"], meta["model"]), tuple(meta["input_shape"]), meta["num_classes"]
    )
    state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    model.load_state_dict(state, strict=False)
    own = getattr(model, "MEAN", None) if meta["input_shape"][0] == 3 else None
    mean = torch.tensor(own if own else CIFAR10_MEAN[: meta["input_shape"][0]])
    std = torch.tensor(model.STD if own else CIFAR10_STD[: meta["input_shape"][0]])
    wrapped = Normalised(model, mean, std)
    wrapped.train()

    class DataConfig:  # the minimal_example's data_cfg_default, for this target
        modality = "vision"
        size = (50_000,)
        classes = meta["num_classes"]
        shape = tuple(meta["input_shape"])
        normalize = True

    DataConfig.mean, DataConfig.std = tuple(mean.tolist()), tuple(std.tolist())
    setup = dict(device=torch.device("cpu"), dtype=torch.float)
    loss_fn = torch.nn.CrossEntropyLoss()
    attacker = breaching.attacks.prepare_attack(wrapped, loss_fn, cfg, setup)
    signal = [tensors[f"signal.{i}"] for i in range(len(list(wrapped.parameters())))]
    labels = None if meta["labels"] is None else torch.tensor(meta["labels"])
    recipe = meta["recipe"]
    hyper = None
    if recipe["mode"] == "fedavg":
        if labels is None:
            raise ValueError("a FedAvg target needs its labels for breaching's multi-step replay")
        b = recipe["batch_size"]
        per_step = [labels[(i * b) % len(labels) : (i * b) % len(labels) + b] for i in range(recipe["steps"])]
        hyper = dict(lr=recipe["lr"], steps=recipe["steps"], data_per_step=b, labels=per_step)
    payload = [dict(parameters=[p.detach() for p in wrapped.parameters()], buffers=None, metadata=DataConfig)]
    shared = [
        dict(
            gradients=signal,
            buffers=None,
            metadata=dict(num_data_points=meta["batch_size"], labels=labels, local_hyperparams=hyper),
        )
    ]
    torch.manual_seed(seed)
    start, cpu = time.perf_counter(), time.process_time()
    reconstruction, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    images = (reconstruction["data"].detach() * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp(0, 1)
    found = [int(v) for v in reconstruction["labels"]]
    out = {"seconds": seconds, "cpu_seconds": cpu_seconds, "labels": found, "images": images}
    if "truth" in tensors:
        out["psnr"] = psnr(images, tensors["truth"])
    if meta.get("truth_labels") or meta["labels"]:
        truth_labels = sorted(meta.get("truth_labels") or meta["labels"])
        out["label_accuracy"] = sum(a == b for a, b in zip(sorted(found), truth_labels, strict=True)) / len(
            truth_labels
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", type=Path, required=True, help="directory of <id>.safetensors + <id>.json")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for per-target PSNR and seconds")
    parser.add_argument("--images", type=Path, default=None, help="directory for the reconstructions")
    parser.add_argument("--iterations", type=int, default=24_000, help="breaching's max_iterations (its default)")
    parser.add_argument("--restarts", type=int, default=1, help="breaching's restarts.num_trials (its default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    names = sorted(p.stem for p in args.targets.glob("*.json")) if args.targets.is_dir() else []
    if not names:
        print(f"error: {args.targets} holds no <id>.json targets", file=sys.stderr)
        return 2
    if args.iterations < 1 or args.restarts < 1:
        print("error: --iterations and --restarts must be >= 1", file=sys.stderr)
        return 2
    import logging

    import breaching

    logging.getLogger("breaching").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = breaching.get_attack_config("invertinggradients")
    cfg.optim.max_iterations = args.iterations
    cfg.optim.callback = max(args.iterations, 1)
    cfg.restarts.num_trials = args.restarts
    rows = []
    for name in names:
        meta, tensors = load_target(args.targets, name)
        result = attack_one(meta, tensors, cfg, args.seed)
        if args.images is not None:
            from safetensors.torch import save_file

            args.images.mkdir(parents=True, exist_ok=True)
            save_file({"images": result["images"].contiguous()}, str(args.images / f"{name}.safetensors"))
        row = {"id": name, **{k: v for k, v in result.items() if k != "images"}}
        rows.append(row)
        print(f"{name}: {row.get('psnr', float('nan')):.2f} dB, {row['seconds']:.1f} s", flush=True)
    scored = [r["psnr"] for r in rows if r.get("psnr") is not None]
    report = {
        "peer": "breaching",
        "attack": "invertinggradients",
        "config": {
            "max_iterations": args.iterations,
            "restarts": args.restarts,
            "step_size": float(cfg.optim.step_size),
            "signed": str(cfg.optim.signed),
            "boxed": bool(cfg.optim.boxed),
            "step_size_decay": str(cfg.optim.step_size_decay),
            "tv_scale": float(cfg.regularization.total_variation.scale),
            "init": str(cfg.init),
            "label_strategy": str(cfg.label_strategy),
            "threads": args.threads,
            "seed": args.seed,
        },
        "targets": rows,
        "median_psnr": statistics.median(scored) if scored else None,
        "median_seconds": statistics.median(r["seconds"] for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
