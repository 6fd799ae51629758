"""Seeded fingerprints of short DLG, iDLG and IG runs on 8x8 CIFAR-10 images: PSNR, loss, evaluations, a hash
of the images and the result info (less the seconds), one line each. A change that should not move the attacks'
numbers leaves this output identical:

    PYTHONPATH=$PWD python benchmarks/attack_fingerprint.py [all|ig|dlg] > before.log   # then after the change
"""

import hashlib
import sys

sys.path.insert(0, ".")
import numpy as np
import torch
import torch.nn.functional as F

import tests.test_inverting_gradients as T
from attacks import AttackTarget, get_attack
from attacks.base import model_gradients, reconstruct_many
from fedsim.scoring import score
from tests.conftest import LOSSLESS_CIFAR

data = np.load(LOSSLESS_CIFAR, allow_pickle=False)
x = F.avg_pool2d(torch.tensor(data["x"][:4]).permute(0, 3, 1, 2).float() / 255, 4)
y = torch.tensor(data["y"][:4]).long()


def show(tag, r, xt, yt):
    h = hashlib.sha256(r.images.numpy().tobytes()).hexdigest()[:16]
    p = score(r.images, r.labels, xt, yt)["psnr"]
    info = {k: v for k, v in sorted(r.info.items()) if k not in ("seconds",)}
    print(
        f"{tag}: psnr={[round(float(v), 6) for v in p]} loss={r.loss!r} evals={r.info.get('evaluations')} sha={h}",
        flush=True,
    )
    print(f"  info={info}", flush=True)


def tgt(seed, i, n=1):
    m = T.relu_net(seed)
    return AttackTarget(m, model_gradients(m, x[i : i + n], y[i : i + n]), n, (3, 8, 8), 10), x[i : i + n], y[i : i + n]


which = sys.argv[1] if len(sys.argv) > 1 else "all"
if which in ("all", "ig"):
    t, xt, yt = tgt(0, 0)
    show("ig paper 120 r1", get_attack("ig", iterations=120, restarts=1).reconstruct(t), xt, yt)
    show("ig paper 40 r2 seed3", get_attack("ig", iterations=40).reconstruct(t, seed=3), xt, yt)
    show("ig breaching 30", get_attack("ig", preset="breaching", iterations=30).reconstruct(t), xt, yt)
    show(
        "ig features init 30",
        get_attack(
            "ig", iterations=30, restarts=1, init="features", feature_iterations=5, feature_weight=1.0
        ).reconstruct(t),
        xt,
        yt,
    )
    show(
        "ig keep last 30", get_attack("ig", iterations=30, restarts=1, keep="last", signed=False).reconstruct(t), xt, yt
    )
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 64, 10),
    ).train()
    with torch.no_grad():
        m(x[:2])
    ts = [AttackTarget(m, model_gradients(m, x[i : i + 1], y[i : i + 1]), 1, (3, 8, 8), 10) for i in (0, 1)]
    for i, r in enumerate(reconstruct_many(get_attack("ig", iterations=30, restarts=2, bn_weight=1e-2), ts, seed=1)):
        show(f"ig bn batched {i}", r, x[i : i + 1], y[i : i + 1])
if which in ("all", "dlg"):
    t, xt, yt = tgt(0, 0)
    show("dlg robust 30", get_attack("dlg", iterations=30).reconstruct(t, seed=0), xt, yt)
    show(
        "dlg paper 30",
        get_attack("dlg", iterations=30, optimizer="paper", image_param="sigmoid", restarts=2).reconstruct(t, seed=1),
        xt,
        yt,
    )
    show("idlg robust 30", get_attack("idlg", iterations=30).reconstruct(t, seed=0), xt, yt)
    show(
        "dlg robust restart_above 0 30",
        get_attack("dlg", iterations=20, restart_above=1e-12, extra_restarts=2).reconstruct(t, seed=2),
        xt,
        yt,
    )
    ts = [tgt(s, s)[0] for s in (1, 2)]
    for i, r in enumerate(reconstruct_many(get_attack("dlg", iterations=20, restart_above=1e-12), ts, seed=0)):
        show(f"dlg batched restart-on-demand {i}", r, x[i + 1 : i + 2], y[i + 1 : i + 2])
