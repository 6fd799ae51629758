"""Trap weights (When the Curious Abandon Honesty) on real images: how many of a FedSGD batch come back exactly.

    nice -n 10 python benchmarks/bench_trap.py [--data-dir ../shared/data] [--batches 4,8,16,32,64]
        [--out benchmarks/results/trap.json]

The MLP (256 rows in its first layer), trap weights scaled on the test split for the batch (fedsim/trap.py), one
FedSGD step of the clients' own training (lr 0.1) on the first images of each training split, then the trap attack
on the update. "exact" = equal to a reconstruction after quantising both to 8 bits.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks import get_attack  # noqa: E402
from attacks.base import AttackTarget  # noqa: E402
from clients.training import train_fedsgd  # noqa: E402
from fedsim.datasets import load_dataset, to_float  # noqa: E402
from fedsim.files import atomic_write_json  # noqa: E402
from fedsim.models import build_model  # noqa: E402
from fedsim.trap import set_traps  # noqa: E402

LR = 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--datasets", default="cifar10,mnist")
    parser.add_argument("--batches", default="4,8,16,32,64")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "trap.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.datasets.split(","):
        data = load_dataset(name, args.data_dir, False, 0)
        x_all, y_all = to_float(data.train_x), torch.as_tensor(data.train_y).long()
        for b in [int(v) for v in args.batches.split(",")]:
            model = build_model("mlp", data.input_shape, data.num_classes, seed=0)
            tampering = set_traps(model, data.input_shape, to_float(data.test_x), b, seed=0)
            x, y = x_all[:b], y_all[:b]
            client = copy.deepcopy(model)
            train_fedsgd(client, x, y, LR)
            names = [n for n, _ in model.named_parameters()]
            update = [client.state_dict()[n] - model.state_dict()[n] for n in names]
            target = AttackTarget(
                model=model,
                gradients=[-u / LR for u in update],
                batch_size=b,
                input_shape=tuple(x.shape[1:]),
                num_classes=data.num_classes,
                update=update,
                recipe={"mode": "fedsgd", "lr": LR, "num-examples": b},
            )
            result = get_attack("trap").reconstruct(target)
            rec, true = (result.images.flatten(1) * 255).round(), (x.flatten(1) * 255).round()
            exact = int((rec[:, None, :] == true[None, :, :]).all(-1).any(0).sum())
            row = {"dataset": name, "batch": b, "exact": exact, "scale": tampering["scale"], "rows": tampering["rows"]}
            print(row, flush=True)
            rows.append(row)
    atomic_write_json(Path(args.out), {"model": "mlp", "lr": LR, "rows": rows})


if __name__ == "__main__":
    main()
