"""Privacy-utility of the client defenses: global accuracy after R FedAvg rounds vs DLG on FedSGD captures.

    nice -n 10 python benchmarks/bench_defenses.py [--data-dir ../shared/data] [--rounds 5] [--images 3]
        [--iterations 40] [--restarts 4] [--only noise,prune,ldp,tldmi,clip] [--skip-attack] [--skip-accuracy]
        [--quick]

For each defense and strength (the `none` baseline is every curve's zero point):

    noise   DLG's gradient-noise variance v in {1e-4, 1e-3, 1e-2, 1e-1}: noise-scale = lr * sqrt(v)
            (the server's pseudo-gradient -Δ/lr then carries noise of variance v, as in the DLG paper)
    prune   prune-percent p in {10, 20, 50, 90}
    ldp     Flower's LocalDpMod, ldp-epsilon in {1e4, 1e3, 1e2} (ldp-clip-norm 1, δ 1e-5: noise std
            4.84/ε, i.e. DLG variance (48.4/ε)² = 2.3e-5, 2.3e-3, 0.23)
    clip    clip-norm C in {1, 0.1, 0.01} (only with --only ...,clip: not in the default sweep)
    tldmi   tldmi-layers k in {1, 2, all = 4}, early layers pre-trained on Fashion-MNIST (3 epochs)

these are measured on real MNIST (the offline test set: its first 80 % are the clients' data):

* utility: global test accuracy after `--rounds` rounds of FedAvg (3 clients of `--examples` images,
  1 local epoch, batch 32, lr 0.1) of the DLG paper's LeNet (`lenet-dlg`);
* privacy: DLG (attacks.get_attack("dlg"), `--restarts` restarts of `--iterations` L-BFGS steps) on
  FedSGD captures of batch 1 from `--images` clients at round 1, scored with fedsim.scoring.score
  (PSNR, SSIM, label accuracy against the image the client really used), and the relative error of
  the last layer's input features recovered in closed form from its gradient (what TL-DMI still sends).

Both halves call the real ClientApp code in-process: `clients.client_app.local_train` wrapped in
`clients.defenses.defense_mods` (exactly the train function and mods the ClientApp registers), on
real flwr Messages; aggregation is Flower's own `FedAvg.aggregate_train`. This skips Ray's start-up
cost (one Ray simulation per setting would cost more than the training on 2 CPU cores); for a
deterministic setting (prune 50 % + TL-DMI k = 2, 2 rounds) the per-round accuracies equal those of
fedsim.simulation.simulate exactly. The capture
the attack sees is the reply the client sends, turned into a target with fedsim.attack_runner.load_target,
as `fedsim attack` does on a run's captures. Noise is drawn from OS entropy (as in a real run), so
noisy settings vary slightly between runs.

Results: benchmarks/results/defenses.json (written after every setting) and defenses.png.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict  # noqa: E402
from flwr.client.mod.utils import make_ffn  # noqa: E402

from clients.client_app import local_train  # noqa: E402
from clients.defenses import defense_mods  # noqa: E402
from fedsim.config import FedsimConfig  # noqa: E402
from fedsim.federation import Federation, evaluate  # noqa: E402
from fedsim.files import atomic_write_json, load_tensors  # noqa: E402

LR = 0.1
RESULTS = REPO / "benchmarks" / "results"


def settings(public: str) -> list[dict]:
    """Every (defense, strength) point; the baseline first."""
    out = [{"defense": "none", "strength": 0, "label": "none", "overrides": {}}]
    for v in (1e-4, 1e-3, 1e-2, 1e-1):
        overrides = {"defenses": "noise", "noise-scale": LR * math.sqrt(v)}
        out.append({"defense": "noise", "strength": v, "label": f"v={v:g}", "overrides": overrides})
    for p in (10.0, 20.0, 50.0, 90.0):
        overrides = {"defenses": "prune", "prune-percent": p}
        out.append({"defense": "prune", "strength": p, "label": f"p={p:g}%", "overrides": overrides})
    for eps in (1e4, 1e3, 1e2):
        overrides = {"defenses": "ldp", "ldp-epsilon": eps, "ldp-clip-norm": 1.0, "ldp-delta": 1e-5}
        out.append({"defense": "ldp", "strength": eps, "label": f"ε={eps:g}", "overrides": overrides})
    for c in (1.0, 0.1, 0.01):
        overrides = {"defenses": "clip", "clip-norm": c}
        out.append({"defense": "clip", "strength": c, "label": f"C={c:g}", "overrides": overrides})
    for k in (4, 2, 1):
        overrides = {"defenses": "tldmi", "tldmi-layers": k, "tldmi-public": public, "tldmi-pretrain-epochs": 3}
        out.append({"defense": "tldmi", "strength": k, "label": f"k={k}" + (" (all)" if k == 4 else ""),
                    "overrides": overrides})  # fmt: skip
    return out


def train_message(state: dict[str, torch.Tensor], recipe: dict, server_round: int) -> Message:
    """The message a Flower strategy sends: global arrays and the train config."""
    content = RecordDict(
        {"arrays": ArrayRecord(state), "config": ConfigRecord({**recipe, "server-round": server_round})}
    )
    metadata = Metadata(
        run_id=1,
        message_id=f"r{server_round}",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def context(partition_id: int) -> Context:
    return Context(run_id=1, node_id=100 + partition_id, node_config={"partition-id": partition_id},
                   state=RecordDict(), run_config={})  # fmt: skip


def client_app(config: FedsimConfig):
    """The ClientApp's train function with its defense mods, callable in-process."""
    return make_ffn(lambda msg, ctx: local_train(msg, ctx, config), defense_mods(config))


def initial_model(config: FedsimConfig, fed: Federation) -> torch.nn.Module:
    """The server's round-1 model: seeded, with TL-DMI's public pre-training when on (as server_app does)."""
    model = fed.build_model()
    if "tldmi" in config.defense_list():
        fed.pretrain_public(model)
    return model


def accuracy_half(base: dict, overrides: dict, rounds: int) -> dict:
    """Global test accuracy per round of FedAvg with the defense on every client."""
    from flwr.serverapp.strategy import FedAvg

    config = FedsimConfig.from_mapping({**base, **overrides})
    fed = Federation.from_config(config)
    model = initial_model(config, fed)
    test_x, test_y = fed.test_split()
    app, strategy = client_app(config), FedAvg()
    recipe = {"recipe": "fedavg", "lr": config.lr, "batch-size": config.batch_size, "local-epochs": config.local_epochs}
    state = model.state_dict()
    accuracy = [evaluate(model, test_x, test_y)["test-accuracy"]]
    start = time.perf_counter()
    for server_round in range(1, rounds + 1):
        replies = [app(train_message(state, recipe, server_round), context(p)) for p in range(config.num_clients)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        state = arrays.to_torch_state_dict()
        model.load_state_dict(state)
        accuracy.append(evaluate(model, test_x, test_y)["test-accuracy"])
    return {"accuracy": accuracy[-1], "accuracy_per_round": accuracy, "seconds": time.perf_counter() - start}


def last_layer_features(model: torch.nn.Module, state: dict, client_state: dict, image: torch.Tensor, lr: float):
    """What the last Linear layer's gradient alone reveals of one image (batch 1, FedSGD).

    Its gradients are g_W = (p - y) h^T and g_b = p - y, so h = g_W[c] / g_b[c] for any class c: the
    input features of the last layer, exactly. TL-DMI with k = 1 still sends them. Returns the relative
    error of the recovered features against the image's true ones (1e-7: exact; about 1 or more: hidden).
    """
    name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    g_w = (state[f"{name}.weight"] - client_state[f"{name}.weight"]).double() / lr
    g_b = (state[f"{name}.bias"] - client_state[f"{name}.bias"]).double() / lr
    c = int(g_b.abs().argmax())
    recovered = g_w[c] / g_b[c]
    seen = {}
    hook = dict(model.named_modules())[name].register_forward_hook(lambda m, i, o: seen.update(h=i[0].detach()))
    with torch.no_grad():
        model.train()
        model(image)
    hook.remove()
    true = seen["h"][0].double()
    return float((recovered - true).norm() / true.norm())


def attack_half(base: dict, overrides: dict, images: int, iterations: int, restarts: int) -> dict:
    """DLG on batch-1 FedSGD captures of `images` clients at round 1, scored against what they trained on."""
    from attacks import get_attack, reconstruct_many
    from fedsim.attack_runner import load_target
    from fedsim.scoring import score
    from server.server_app import trainable_names

    config = FedsimConfig.from_mapping(
        {**base, **overrides, "num-clients": images, "recipe": "fedsgd", "batch-size": 1}
    )
    fed = Federation.from_config(config)
    model = initial_model(config, fed)
    state = model.state_dict()
    app = client_app(config)
    targets, truths, declared, features = [], [], [], []
    with tempfile.TemporaryDirectory() as truth_dir:
        recipe = {"recipe": "fedsgd", "lr": config.lr, "batch-size": 1, "local-epochs": config.local_epochs,
                  "truth-dir": truth_dir}  # fmt: skip
        for p in range(images):
            reply = app(train_message(state, recipe, 1), context(p))
            client_state = reply.content["arrays"].to_torch_state_dict()
            said = dict(reply.content["fedsim"])
            record = {  # what the curious server writes in the capture manifest
                "model": config.model,
                "input_shape": list(fed.data.input_shape),
                "num_classes": fed.data.num_classes,
                "trainable": said.get("trainable") or trainable_names(config, model),
                "recipe": {k: v for k, v in recipe.items() if k != "truth-dir"},
                "num_examples": int(reply.content["metrics"]["num-examples"]),
            }
            targets.append(load_target(state, client_state, record))
            truths.append(load_tensors(Path(truth_dir) / "round-0001" / f"client-{100 + p}.safetensors"))
            features.append(last_layer_features(model, state, client_state, truths[-1]["images"], config.lr))
            declared.append(said.get("defenses", ""))
    start = time.perf_counter()
    attack = get_attack("dlg", iterations=iterations, restarts=restarts)
    results = reconstruct_many(attack, targets, seed=config.seed, raise_on_divergence=False)
    seconds = time.perf_counter() - start
    per_image = []
    for result, truth, feature_error in zip(results, truths, features, strict=True):
        if not hasattr(result, "images"):  # every restart diverged: nothing reconstructed
            per_image.append({"psnr": None, "ssim": None, "label_accuracy": 0.0, "failed": str(result),
                              "feature_error": feature_error})  # fmt: skip
            continue
        s = score(result.images, result.labels, truth["images"], truth["labels"])
        per_image.append({"psnr": s["psnr_mean"], "ssim": s["ssim_mean"], "label_accuracy": s["label_accuracy"],
                          "loss": result.loss, "feature_error": feature_error})  # fmt: skip
    psnr = [r["psnr"] if r["psnr"] is not None else 0.0 for r in per_image]
    ssim = [r["ssim"] if r["ssim"] is not None else 0.0 for r in per_image]
    return {
        "psnr_mean": statistics.fmean(psnr),
        "psnr_median": statistics.median(psnr),
        "ssim_mean": statistics.fmean(ssim),
        "label_accuracy": statistics.fmean(r["label_accuracy"] for r in per_image),
        "recognisable": sum(1 for r in per_image if (r["ssim"] or 0) >= 0.5) / len(per_image),
        "feature_error_median": statistics.median(features),
        "per_image": per_image,
        "declared": declared[0],
        "seconds": seconds,
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = next((r for r in rows if r["defense"] == "none"), None)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = {"noise": "o", "prune": "s", "ldp": "^", "clip": "D", "tldmi": "v"}
    for defense, marker in markers.items():
        points = [r for r in rows if r["defense"] == defense and "attack" in r and "utility" in r]
        if not points:
            continue
        if baseline and "attack" in baseline and "utility" in baseline and defense != "tldmi":
            points = [baseline, *points]
        xs = [100 * r["utility"]["accuracy"] for r in points]
        ys = [r["attack"]["psnr_mean"] for r in points]
        ax.plot(xs, ys, marker=marker, label=defense)
        for r, x, y in zip(points, xs, ys, strict=True):
            if r["defense"] == "none" and defense != "noise":
                continue  # the shared baseline, labelled once
            offset = (4, -10) if defense == "tldmi" else (4, 4)
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=offset, fontsize=7)
    ax.set_xlabel("global test accuracy after FedAvg (%)")
    ax.set_ylabel("DLG reconstruction PSNR (dB, mean over images)")
    ax.set_title("Client defenses on MNIST / DLG's LeNet: privacy vs utility")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--public", default="fashion-mnist", help="TL-DMI's public dataset")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--examples", type=int, default=1000, help="examples per client in the accuracy half")
    parser.add_argument("--images", type=int, default=3, help="clients (one image each) attacked per setting")
    parser.add_argument("--iterations", type=int, default=40, help="DLG L-BFGS steps (x20 inner iterations)")
    parser.add_argument("--restarts", type=int, default=4, help="DLG restarts (the best by loss is kept)")
    parser.add_argument(
        "--only", default="noise,prune,ldp,tldmi", help="comma-separated defenses to run (the baseline always)"
    )
    parser.add_argument("--skip-attack", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 2 images, 5 DLG steps")
    parser.add_argument("--out", default=str(RESULTS / "defenses.json"))
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # no INFO line per aggregation or LocalDpMod call
    if args.quick:
        args.rounds, args.images, args.iterations, args.restarts, args.examples = 1, 2, 5, 1, 200
    base = {
        "dataset": args.dataset,
        "data-dir": args.data_dir,
        "model": "lenet-dlg",
        "num-clients": 3,
        "examples-per-client": args.examples,
        "local-epochs": 1,
        "batch-size": 32,
        "lr": LR,
        "seed": 0,
    }
    only = {d for d in args.only.split(",") if d}
    chosen = [s for s in settings(args.public) if not only or s["defense"] in only or s["defense"] == "none"]
    out = Path(args.out)
    report = {
        "benchmark": "bench_defenses",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "setup": {**vars(args), "base": base, "lr": LR},
        "rows": [],
    }
    for setting in chosen:
        row = {k: setting[k] for k in ("defense", "strength", "label")} | {"overrides": setting["overrides"]}
        if not args.skip_accuracy:
            row["utility"] = accuracy_half(base, setting["overrides"], args.rounds)
        if not args.skip_attack:
            row["attack"] = attack_half(base, setting["overrides"], args.images, args.iterations, args.restarts)
        report["rows"].append(row)
        atomic_write_json(out, report)
        acc = f"{100 * row['utility']['accuracy']:.1f}%" if "utility" in row else "-"
        att = row.get("attack", {})
        nan = float("nan")
        print(
            f"{setting['defense']:>6} {setting['label']:>10}  accuracy {acc:>6}  "
            f"PSNR {att.get('psnr_mean', nan):6.2f} dB  SSIM {att.get('ssim_mean', nan):.3f}  "
            f"labels {att.get('label_accuracy', nan):.2f}  recognisable {att.get('recognisable', nan):.2f}  "
            f"last-layer feature error {att.get('feature_error_median', nan):.1e}",
            flush=True,
        )
    if not args.skip_accuracy and not args.skip_attack:
        plot(report["rows"], out.with_suffix(".png"))
    print(f"results in {out}")


if __name__ == "__main__":
    main()
