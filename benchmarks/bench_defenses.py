"""Privacy-utility of the client defenses: accuracy after R FedAvg rounds vs DLG, iDLG and GRNN on FedSGD captures.

    nice -n 10 python benchmarks/bench_defenses.py [--data-dir ../shared/data] [--rounds 5] [--images 3]
        [--attacks dlg,idlg,grnn] [--iterations 40] [--restarts 4] [--grnn-iterations 300] [--unaware dlg]
        [--only noise,prune,ldp,clip,tldmi] [--skip-attack] [--skip-accuracy] [--quick]

For each defense and strength (the `none` baseline is every curve's zero point):

    noise   DLG's gradient-noise variance v in {1e-4, 1e-3, 1e-2, 1e-1}: noise-scale = lr * sqrt(v)
            (the server's pseudo-gradient -Δ/lr then carries noise of variance v, as in the DLG paper)
    prune   prune-percent p in {10, 20, 50, 90}
    ldp     Flower's LocalDpMod, ldp-epsilon in {1e4, 1e3, 1e2} (ldp-clip-norm 1, δ 1e-5: noise std
            4.84/ε, i.e. DLG variance (48.4/ε)² = 2.3e-5, 2.3e-3, 0.23)
    clip    clip-norm C in {1, 0.1, 0.01}
    tldmi   tldmi-layers k in {1, 2, all = 4}, early layers pre-trained on Fashion-MNIST (3 epochs)

these are measured on real MNIST (the offline test set: its first 80 % are the clients' data):

* utility: global test accuracy after `--rounds` rounds of FedAvg (3 clients of `--examples` images,
  1 local epoch, batch 32, lr 0.1) of the DLG paper's LeNet (`lenet-dlg`);
* privacy: DLG and iDLG (`--restarts` restarts of `--iterations` L-BFGS steps each) and GRNN (1 restart
  of `--grnn-iterations` RMSprop steps; the paper uses 1000) on FedSGD captures of batch 1 from
  `--images` clients at round 1, scored with fedsim.scoring.score (PSNR, SSIM, label accuracy against
  the image the client really used), and the relative error of the last layer's input features
  recovered in closed form from its gradient (what TL-DMI still sends).

Every attack runs as the defense-aware attacker (attacks.contract.target_from_capture with aware=True: it
reads what the client declared: under pruning it matches only the entries sent, under clipping only
the direction, under TL-DMI only the layers trained). The attacks in `--unaware` (DLG) run a second
time defense-unaware (`<attack>-unaware` in the results) where that changes the objective: pruning,
clipping and TL-DMI with frozen layers (k < all); against noise and LDP the two attackers are the same.

Both halves call the real ClientApp code in-process: `clients.client_app.local_train` wrapped in
`clients.defenses.defense_mods` (exactly the train function and mods the ClientApp registers), on
real flwr Messages; aggregation is Flower's own `FedAvg.aggregate_train`. This skips Ray's start-up
cost (one Ray simulation per setting would cost more than the training on 2 CPU cores); for a
deterministic setting (prune 50 % + TL-DMI k = 2, 2 rounds) the per-round accuracies equal those of
fedsim.app.simulation.simulate exactly. The capture
the attack sees is the reply the client sends, turned into a target with attacks.contract.target_from_capture,
as `fedsim attack` does on a run's captures. Noise is drawn from OS entropy (as in a real run), so
noisy settings vary slightly between runs.

Results: benchmarks/results/defenses.json (written after every setting) and defenses.png.

The privacy frontier (`--frontier`): accuracy and attack PSNR against the run's epsilon, for local DP
(ldp-epsilon per round in {1e1, 1e2, 1e3, 1e4, 1e5}) and central DP in its four modes (server- and
client-side, fixed and adaptive clipping; dp-target-epsilon in {1e1, ..., 1e5} over `--rounds`, dp-clip-norm 1,
adaptive: dp-clipped-count-stddev 1), beside the undefended baseline and the non-DP defenses (noise
v = 1e-3, 1e-2; clip C = 1; prune 50 %, 90 %; TL-DMI k = 2), drawn at ε = ∞. The federation: 3 clients of
500 MNIST images, 2 local epochs of batch 16, lr 0.1 (FRONTIER_BASE). Every point is a run through the
run's own strategy stack (server.server_app.server_strategy: CuriousStrategy -> PrivacyLedger -> Flower's
DP wrapper -> FedAvg), clients in-process behind the ClientApp's mods; the epsilon is the one the run's
privacy.json reports (Flower's RdpAccountant). DLG, iDLG and Inverting Gradients run on the curious
server's captures of a 1-round FedSGD run (batch 1, one image per client) with the same per-round
mechanism; a capture bit-identical (SHA-256) to one already attacked reuses that seeded result, which the
point records. Each point is written to benchmarks/results/dp_frontier_points/<key>.json as it finishes
and skipped when the benchmark runs again (so parallel runs with disjoint `--mechanisms` share the work);
numpy's and torch's generators are seeded per point (Flower's DP noise draws from numpy; the `noise`
defense keeps OS entropy). Results: benchmarks/results/dp_frontier.json and dp_frontier.png.
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


def fedavg_rounds(config: FedsimConfig, fed: Federation, model: torch.nn.Module, rounds: int) -> list[float]:
    """`rounds` rounds of FedAvg on every client (the ClientApp's train function and mods, Flower's aggregation),
    `model` updated in place to the last global model; returns the global test accuracy before and after each."""
    from flwr.serverapp.strategy import FedAvg

    test_x, test_y = fed.test_split()
    app, strategy = client_app(config), FedAvg()
    recipe = {"recipe": "fedavg", "lr": config.lr, "batch-size": config.batch_size, "local-epochs": config.local_epochs}
    state = model.state_dict()
    accuracy = [evaluate(model, test_x, test_y)["test-accuracy"]]
    for server_round in range(1, rounds + 1):
        replies = [app(train_message(state, recipe, server_round), context(p)) for p in range(config.num_clients)]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        state = arrays.to_torch_state_dict()
        model.load_state_dict(state)
        accuracy.append(evaluate(model, test_x, test_y)["test-accuracy"])
    return accuracy


def accuracy_half(base: dict, overrides: dict, rounds: int) -> dict:
    """Global test accuracy per round of FedAvg with the defense on every client."""
    config = FedsimConfig.from_mapping({**base, **overrides})
    fed = Federation.from_config(config)
    model = initial_model(config, fed)
    start = time.perf_counter()
    accuracy = fedavg_rounds(config, fed, model, rounds)
    return {"accuracy": accuracy[-1], "accuracy_per_round": accuracy, "seconds": time.perf_counter() - start}


def capture(app, config: FedsimConfig, fed: Federation, model: torch.nn.Module, state: dict, recipe: dict,
            partition: int, server_round: int = 1) -> tuple[dict, dict, dict]:  # fmt: skip
    """One client's reply to a train message, as the curious server records it: (the capture record the
    server writes in its manifest (server.curious), the weights the client sent back, the truth: the images
    and labels it trained on). `recipe` is the train config sent, with a "truth-dir" for the truth."""
    from server.server_app import trainable_names

    reply = app(train_message(state, recipe, server_round), context(partition))
    client_state = reply.content["arrays"].to_torch_state_dict()
    said = dict(reply.content["fedsim"])
    said.pop("partition-id", None)
    record = {
        "model": config.model,
        "input_shape": list(fed.data.input_shape),
        "num_classes": fed.data.num_classes,
        "trainable": trainable_names(config, model),  # the server's view; the aware attacker reads "declared"
        "recipe": {k: v for k, v in recipe.items() if k != "truth-dir"},
        "num_examples": int(reply.content["metrics"]["num-examples"]),
        "declared": said,
    }
    truth_file = Path(recipe["truth-dir"]) / f"round-{server_round:04d}" / f"client-{100 + partition}.safetensors"
    return record, client_state, load_tensors(truth_file)


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


ATTACK_NAMES = {"dlg": "DLG", "idlg": "iDLG", "grnn": "GRNN"}


def attack_options(args: argparse.Namespace) -> dict[str, dict]:
    """Each chosen attack's registry options: DLG and iDLG as `--iterations`/`--restarts`, GRNN its own."""
    dlg = {"iterations": args.iterations, "restarts": args.restarts}
    options = {"dlg": dlg, "idlg": dict(dlg), "grnn": {"iterations": args.grnn_iterations, "restarts": 1}}
    chosen = [a for a in args.attacks.split(",") if a]
    unknown = sorted(set(chosen) - set(options))
    if unknown:
        raise SystemExit(f"unknown attack(s) {', '.join(unknown)}; choose from {', '.join(options)}")
    return {a: options[a] for a in chosen}


def summarise(results: list, truths: list[dict], seconds: float) -> dict:
    """PSNR, SSIM and label accuracy of one attack's reconstructions (a failed image scores 0 dB, 0 SSIM)."""
    from fedsim.scoring import score

    per_image = []
    for result, truth in zip(results, truths, strict=True):
        if not hasattr(result, "images"):  # every restart diverged: nothing reconstructed
            per_image.append({"psnr": None, "ssim": None, "label_accuracy": 0.0, "failed": str(result)})
            continue
        s = score(result.images, result.labels, truth["images"], truth["labels"])
        per_image.append({"psnr": s["psnr_mean"], "ssim": s["ssim_mean"], "label_accuracy": s["label_accuracy"],
                          "loss": result.loss})  # fmt: skip
    psnr = [r["psnr"] if r["psnr"] is not None else 0.0 for r in per_image]
    ssim = [r["ssim"] if r["ssim"] is not None else 0.0 for r in per_image]
    return {
        "psnr_mean": statistics.fmean(psnr),
        "psnr_median": statistics.median(psnr),
        "ssim_mean": statistics.fmean(ssim),
        "label_accuracy": statistics.fmean(r["label_accuracy"] for r in per_image),
        "recognisable": sum(1 for r in per_image if (r["ssim"] or 0) >= 0.5) / len(per_image),
        "failed": sum(1 for r in per_image if "failed" in r),
        "per_image": per_image,
        "seconds": seconds,
    }


def awareness_matters(aware, unaware) -> bool:
    """Whether the defense-aware target differs from the unaware one (frozen layers, pruning mask, clipping)."""

    def trained(t):
        return [n for n, p in t.model.named_parameters() if p.requires_grad]

    return aware.mask is not None or bool(aware.rescale) or trained(aware) != trained(unaware)


def attack_half(base: dict, overrides: dict, images: int, attacks: dict[str, dict], unaware: set[str]) -> dict:
    """The attacks on batch-1 FedSGD captures of `images` clients at round 1, scored against what they trained on.

    Every attack runs as the defense-aware attacker (attacks.contract.target_from_capture, aware=True: it uses
    what the client declared); the attacks in `unaware` also run defense-unaware, where that changes the
    objective (pruning, clipping, TL-DMI with frozen layers), under the label `<attack>-unaware`.
    """
    from attacks import get_attack, reconstruct_many
    from attacks.contract import target_from_capture

    config = FedsimConfig.from_mapping(
        {**base, **overrides, "num-clients": images, "recipe": "fedsgd", "batch-size": 1}
    )
    fed = Federation.from_config(config)
    model = initial_model(config, fed)
    state = model.state_dict()
    app = client_app(config)
    targets, blind, truths, declared, features = [], [], [], [], []
    with tempfile.TemporaryDirectory() as truth_dir:
        recipe = {"recipe": "fedsgd", "lr": config.lr, "batch-size": 1, "local-epochs": config.local_epochs,
                  "truth-dir": truth_dir}  # fmt: skip
        for p in range(images):
            record, client_state, truth = capture(app, config, fed, model, state, recipe, p)
            targets.append(target_from_capture(state, client_state, record, aware=True))
            blind.append(target_from_capture(state, client_state, record, aware=False))
            truths.append(truth)
            features.append(last_layer_features(model, state, client_state, truths[-1]["images"], config.lr))
            declared.append(record["declared"].get("defenses", ""))
    matters = any(awareness_matters(a, u) for a, u in zip(targets, blind, strict=True))
    out: dict[str, dict] = {}
    runs = [(name, name, targets) for name in attacks]
    runs += [(name, f"{name}-unaware", blind) for name in attacks if name in unaware and matters]
    for name, label, chosen in runs:
        start = time.perf_counter()
        attack = get_attack(name, **attacks[name])
        results = reconstruct_many(attack, chosen, seed=config.seed, raise_on_divergence=False)
        out[label] = summarise(results, truths, time.perf_counter() - start)
    seen = {"declared": declared[0], "aware_differs": matters, "feature_error_median": statistics.median(features),
            "feature_errors": features}  # fmt: skip
    return {"attack": out, "capture": seen}


def plot(rows: list[dict], path: Path, attacks: list[str]) -> None:
    """Attack PSNR against accuracy, one curve per defense, one panel per attack; unaware DLG hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "attack" in r and "utility" in r]
    baseline = next((r for r in rows if r["defense"] == "none"), None)
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.2 * len(attacks), 5), sharey=True, squeeze=False)
    markers = {"noise": "o", "prune": "s", "ldp": "^", "clip": "D", "tldmi": "v"}
    colours = {d: f"C{i}" for i, d in enumerate(markers)}
    for ax, name in zip(axes[0], attacks, strict=True):
        for defense, marker in markers.items():
            points = [r for r in rows if r["defense"] == defense and name in r["attack"]]
            if not points:
                continue
            if baseline and name in baseline["attack"] and defense != "tldmi":
                points = [baseline, *points]
            xs = [100 * r["utility"]["accuracy"] for r in points]
            ys = [r["attack"][name]["psnr_mean"] for r in points]
            ax.plot(xs, ys, marker=marker, color=colours[defense], label=defense)
            for r, x, y in zip(points, xs, ys, strict=True):
                if r["defense"] == "none" and defense != "noise":
                    continue  # the shared baseline, labelled once
                offset = (4, -10) if defense == "tldmi" else (4, 4)
                ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=offset, fontsize=6)
            blind = [r for r in points if f"{name}-unaware" in r["attack"]]
            if blind:
                ax.plot([100 * r["utility"]["accuracy"] for r in blind],
                        [r["attack"][f"{name}-unaware"]["psnr_mean"] for r in blind], marker=marker,
                        color=colours[defense], markerfacecolor="none", linestyle=":",
                        label=f"{defense} (unaware)")  # fmt: skip
        ax.set_title(f"{ATTACK_NAMES.get(name, name)}")
        ax.set_xlabel("global test accuracy after FedAvg (%)")
        ax.grid(alpha=0.3)
        if ax is axes[0][0] or any(f"{name}-unaware" in r["attack"] for r in rows):
            ax.legend(fontsize=7)  # the same defenses in every panel: a legend where it adds something
    axes[0][0].set_ylabel("reconstruction PSNR (dB, mean over images)")
    fig.suptitle("Client defenses on MNIST / DLG's LeNet: privacy vs utility (hollow: defense-unaware attacker)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def line(row: dict, attacks: list[str]) -> str:
    """One compact table line: accuracy, then PSNR/SSIM/labels per attack, then the unaware attacks' PSNR."""
    acc = f"{100 * row['utility']['accuracy']:.1f}%" if "utility" in row else "-"
    parts = [f"{row['defense']:>6} {row['label']:>9}  acc {acc:>6}"]
    done = row.get("attack", {})
    for name in attacks:
        a = done.get(name)
        parts.append(f"{name} {a['psnr_mean']:5.1f} {a['ssim_mean']:.2f} {a['label_accuracy']:.2f}" if a else
                     f"{name} {'-':>5} {'-':>4} {'-':>4}")  # fmt: skip
    blind = [k for k in done if k.endswith("-unaware")]
    parts += [f"{k} {done[k]['psnr_mean']:5.1f}" for k in blind]
    if "capture" in row:
        parts.append(f"feat-err {row['capture']['feature_error_median']:.0e}")
    return "  ".join(parts)


# --- the privacy frontier: epsilon of the run on the x-axis ---------------------------------------

FRONTIER_BASE = {"model": "lenet-dlg", "num-clients": 3, "examples-per-client": 500, "local-epochs": 2,
                 "batch-size": 16, "lr": LR, "seed": 0}  # fmt: skip
"""The frontier's federation: 3 clients of 500 MNIST images, 2 local epochs of batch 16 (89 % after 8 rounds)."""
FRONTIER_CLIP = 1.0  # about the clients' update norms at these settings (0.7 to 2.8 over the 8 rounds)
FRONTIER_EPSILONS = (10.0, 100.0, 1e3, 1e4, 1e5)
FRONTIER_COUNT_STDDEV = 1.0  # adaptive clipping: the clipped count's noise, so that z can reach 2 (ε of 10 in 8 rounds)
FRONTIER_ATTACKS = ("dlg", "idlg", "ig")
CENTRAL = ("server-fixed", "client-fixed", "adaptive-server", "adaptive-client")
NON_DP = ("none", "noise", "clip", "prune", "tldmi")


def frontier_settings(public: str) -> list[dict]:
    """Every frontier point: the undefended baseline and the non-DP defenses (no ε), local DP by its per-round ε,
    central DP (four modes) by the run's target ε. `key` names the point's file (the resume key)."""
    out = [{"mechanism": "none", "label": "no defense", "overrides": {}}]
    for v in (1e-3, 1e-2):
        noise = {"defenses": "noise", "noise-scale": LR * math.sqrt(v)}
        out.append({"mechanism": "noise", "label": f"v={v:g}", "overrides": noise})
    clip = {"defenses": "clip", "clip-norm": FRONTIER_CLIP}
    out.append({"mechanism": "clip", "label": f"C={FRONTIER_CLIP:g}", "overrides": clip})
    for p in (50.0, 90.0):
        out.append({"mechanism": "prune", "label": f"p={p:g}%", "overrides": {"defenses": "prune", "prune-percent": p}})
    out.append({"mechanism": "tldmi", "label": "k=2", "overrides": {"defenses": "tldmi", "tldmi-layers": 2,
                "tldmi-public": public, "tldmi-pretrain-epochs": 3}})  # fmt: skip
    for eps in FRONTIER_EPSILONS:
        out.append({"mechanism": "ldp", "label": f"ε/round={eps:g}",
                    "overrides": {"defenses": "ldp", "ldp-epsilon": eps, "ldp-clip-norm": FRONTIER_CLIP}})  # fmt: skip
    for mode in CENTRAL:
        for eps in FRONTIER_EPSILONS:
            overrides = {"central-dp": mode, "dp-target-epsilon": eps, "dp-clip-norm": FRONTIER_CLIP}
            if mode.startswith("adaptive"):
                overrides["dp-clipped-count-stddev"] = FRONTIER_COUNT_STDDEV
            out.append({"mechanism": mode, "label": f"ε={eps:g}", "overrides": overrides})
    for s in out:
        s["key"] = f"{s['mechanism']}-{s['label'].split('=')[-1].rstrip('%')}".replace(" ", "-")
    return out


class Nodes:
    """The connected clients, as FedAvg asks a Grid for them while configuring a round."""

    def __init__(self, count: int) -> None:
        self.ids = [100 + i for i in range(count)]

    def get_node_ids(self):
        return list(self.ids)


def seed_everything(seed: int) -> None:
    """Flower's DP noise (its wrappers and LocalDpMod) draws from numpy's global generator: seed it, and torch.

    The `noise` defense keeps drawing from OS entropy (clients.defenses: the server must not regenerate it)."""
    import numpy as np

    np.random.seed(seed)
    torch.manual_seed(seed)


def stack_run(config: FedsimConfig, rounds: int, store_dir: Path | None, truth_dir: str = "",
              initial: dict | None = None, model: torch.nn.Module | None = None) -> dict:  # fmt: skip
    """`rounds` rounds through the run's real strategy stack, clients in-process behind the ClientApp's mods.

    `initial` is the round-1 global model's state (default: the seeded one, pre-trained as server_app does under
    TL-DMI), or `model` the round-1 global model itself; the final one is returned as "state".
    """
    from flwr.supercore.task_identity import TaskIdentity

    from clients.defenses import CentralDpClipping
    from fedsim.captures import CaptureStore
    from server.server_app import server_strategy, trainable_names

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # a ServerApp process's identity
    fed = Federation.from_config(config)
    if model is None:
        model = fed.build_model()
        model.load_state_dict(initial if initial is not None else initial_model(config, fed).state_dict())
    test_x, test_y = fed.test_split()
    store = CaptureStore(store_dir) if store_dir else None
    strategy, ledger = server_strategy(config, store, {"model": config.model, "input_shape": list(fed.data.input_shape),
                                                       "num_classes": fed.data.num_classes,
                                                       "trainable": trainable_names(config, model)})  # fmt: skip
    app = make_ffn(lambda msg, ctx: local_train(msg, ctx, config), [CentralDpClipping(config), *defense_mods(config)])
    node_of = {100 + p: p for p in range(config.num_clients)}
    recipe = {"recipe": config.recipe, "lr": config.lr, "batch-size": config.batch_size,
              "local-epochs": config.local_epochs, **({"truth-dir": truth_dir} if truth_dir else {})}  # fmt: skip
    arrays, accuracy = ArrayRecord(model.state_dict()), []
    for server_round in range(1, rounds + 1):
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(recipe), Nodes(config.num_clients))
        replies = []
        for msg in messages:
            pid = node_of[msg.metadata.dst_node_id]
            ctx = Context(run_id=1, node_id=msg.metadata.dst_node_id, node_config={"partition-id": pid},
                          state=RecordDict(), run_config={})  # fmt: skip
            replies.append(app(msg, ctx))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        model.load_state_dict(arrays.to_torch_state_dict())
        accuracy.append(evaluate(model, test_x, test_y)["test-accuracy"])
    return {"accuracy": accuracy, "privacy": ledger.report() if ledger else {}, "store": store,
            "state": model.state_dict()}  # fmt: skip


def run_epsilon(privacy: dict) -> float | None:
    """The run's ε: the model's under central DP, the most-spending client's under local DP; None without DP."""
    part = privacy.get("central") or privacy.get("local")
    return part["epsilon"] if part else None


def capture_digest(global_state: dict, updates: list[dict], records: list[dict]) -> str:
    """SHA-256 of what the curious server captured: the global model, every update bit for bit, what each declared."""
    import hashlib
    import json

    h = hashlib.sha256(json.dumps([r.get("declared") or {} for r in records], sort_keys=True).encode())
    for state in (global_state, *updates):
        for name in sorted(state):
            h.update(name.encode())
            h.update(state[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def attack_captures(tmp: Path, attack_config: FedsimConfig, initial: dict, attacks: dict[str, dict],
                    cache_dir: Path) -> dict:  # fmt: skip
    """A 1-round FedSGD run (batch 1) under the point's mechanism, its captures attacked by each attack.

    Each attack's result is kept per capture digest and options in `cache_dir`: a capture bit-identical to one
    already attacked (the raw update under every server-side mode, the clipped one under client-side clipping:
    the noise comes after the capture) gets the same, seeded, result, and the point says so (`attacks-reused`).
    """
    import hashlib
    import json

    from attacks import get_attack, reconstruct_many
    from attacks.contract import target_from_capture

    captured = stack_run(attack_config, 1, tmp / "captures", truth_dir=str(tmp / "truth"), initial=initial)
    store = captured["store"]
    global_state = store.load(store.global_record(1))
    records = sorted(store.records("update"), key=lambda r: str(r["client"]))
    updates = [store.load(r) for r in records]
    if attack_config.central_dp in ("client-fixed", "adaptive-client"):
        for r in records:  # the server sent the clipping norm: it knows the update it gets back is clipped
            r["declared"] = {**(r.get("declared") or {}), "defenses": "clip", "clip-norm": attack_config.dp_clip_norm}
    digest = capture_digest(global_state, updates, records)
    out = {"capture-sha256": digest, "capture-update-norms": [
        math.sqrt(sum(float((u[k].double() - global_state[k].double()).pow(2).sum()) for k in global_state))
        for u in updates]}  # fmt: skip
    targets = [target_from_capture(global_state, u, r, aware=True) for u, r in zip(updates, records, strict=True)]
    truths = [load_tensors(tmp / "truth" / "round-0001" / f"client-{r['client']}.safetensors") for r in records]
    results, reused = {}, []
    for name, options in attacks.items():
        budget = hashlib.sha256(json.dumps({name: options}, sort_keys=True).encode()).hexdigest()
        cached = cache_dir / f"{digest[:16]}-{name}-{budget[:8]}.json"  # the capture, the attack and its options
        if cached.exists():
            results[name] = json.loads(cached.read_text())["result"]
            reused.append(name)
            continue
        start = time.perf_counter()
        attack = get_attack(name, **options)
        found = reconstruct_many(attack, targets, seed=attack_config.seed, raise_on_divergence=False)
        results[name] = summarise(found, truths, time.perf_counter() - start)
        record = {"capture-sha256": digest, "attack": name, "options": options, "result": results[name]}
        atomic_write_json(cached, record)
    return {**out, "attack": results, "attack-reused": len(reused) == len(attacks), "attacks-reused": reused}


TRAINED = ("accuracy", "accuracy_per_round", "epsilon", "privacy", "training_seconds_under_load")


def frontier_point(base: dict, setting: dict, rounds: int, attacks: dict[str, dict], cache_dir: Path,
                   trained_before: dict | None = None) -> dict:  # fmt: skip
    """One point: a FedAvg run (accuracy, ε) and a FedSGD capture run attacked, under the same mechanism, seeded.

    `trained_before`: the point's earlier file, when only the attacks changed: its (seeded) FedAvg run is kept."""
    config = FedsimConfig.from_mapping({**base, **setting["overrides"], "num-rounds": rounds})
    start = time.perf_counter()
    seed_everything(config.seed)
    fed = Federation.from_config(config)
    initial = initial_model(config, fed).state_dict()  # TL-DMI's pre-training once, for both runs
    row = {"mechanism": setting["mechanism"], "label": setting["label"], "key": setting["key"],
           "overrides": setting["overrides"], "rounds": rounds}  # fmt: skip
    if trained_before is not None:
        row |= {k: trained_before[k] for k in TRAINED if k in trained_before}
        row["training"] = "kept from the point's earlier file: only the attacks changed"
    else:
        trained = stack_run(config, rounds, None, initial=initial)
        row |= {"accuracy": trained["accuracy"][-1], "accuracy_per_round": trained["accuracy"],
                "epsilon": run_epsilon(trained["privacy"]), "privacy": trained["privacy"],
                "training_seconds_under_load": time.perf_counter() - start}  # fmt: skip
    per_round = dict(setting["overrides"])
    if "dp-target-epsilon" in per_round:  # the same noise multiplier per round as the trained run
        per_round.pop("dp-target-epsilon")
        per_round["dp-noise-multiplier"] = row["privacy"]["central"]["noise-multiplier"]
    attack_config = FedsimConfig.from_mapping(
        {**base, **per_round, "recipe": "fedsgd", "batch-size": 1, "num-rounds": 1, "examples-per-client": 16}
    )
    seed_everything(config.seed)
    with tempfile.TemporaryDirectory() as tmp:
        row |= attack_captures(Path(tmp), attack_config, initial, attacks, cache_dir)
    row["seconds_under_load"] = time.perf_counter() - start
    return row


FRONTIER_STYLE = {  # mechanism: (legend, marker, colour)
    "ldp": ("local DP (ε per client)", "o", "C0"),
    "server-fixed": ("central DP, server-side fixed clipping (ε of the model)", "^", "C1"),
    "client-fixed": ("central DP, client-side fixed clipping", "s", "C2"),
    "adaptive-server": ("central DP, server-side adaptive clipping", "v", "C3"),
    "adaptive-client": ("central DP, client-side adaptive clipping", "D", "C4"),
}


def plot_frontier(rows: list[dict], path: Path) -> None:
    """Accuracy and each attack's PSNR against the run's ε (log scale); the runs without DP in a band at ∞.

    Server- and client-side clipping at the same ε give the same model here (same norm, same seeded noise),
    so the client-side curves are drawn hollow over the server-side ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a in FRONTIER_ATTACKS if any(a in r["attack"] for r in rows)]
    names = {"dlg": "DLG", "idlg": "iDLG", "ig": "Inverting Gradients"}
    panels = [("accuracy", "global test accuracy (%)", "the released model")]
    panels += [(a, f"{names[a]} PSNR (dB, mean of 3 images)", f"{names[a]} on the curious server's captures")
               for a in attacks]  # fmt: skip
    cols = 2
    fig, axes = plt.subplots((len(panels) + 1) // cols, cols, figsize=(13, 4.6 * ((len(panels) + 1) // cols)))
    axes = list(axes.flat)
    dp = [r for r in rows if r["epsilon"] is not None]
    top = max((r["epsilon"] for r in dp), default=10.0)
    inf_x = top * 30  # where ∞ is drawn: right of every finite ε, past a dashed line
    plain = [r for r in rows if r["epsilon"] is None]
    for ax, (what, ylabel, title) in zip(axes, panels, strict=False):

        def value(r, what=what):
            if what == "accuracy":
                return 100 * r["accuracy"]
            if what not in r["attack"] or what in r.get("stale_attacks", []):
                return float("nan")  # not run, or run with other options than the panel's
            return r["attack"][what]["psnr_mean"]

        for mechanism, (name, marker, colour) in FRONTIER_STYLE.items():
            points = sorted((r for r in dp if r["mechanism"] == mechanism), key=lambda r: r["epsilon"])
            if points:
                hollow = {"markerfacecolor": "none", "markersize": 10} if mechanism.endswith("client") or \
                    mechanism == "client-fixed" else {}  # fmt: skip
                ax.plot([r["epsilon"] for r in points], [value(r) for r in points], marker=marker, color=colour,
                        label=name, **hollow)  # fmt: skip
        values = [value(r) for r in plain]
        low, high = ax.get_ylim() if not values else (min([*values, *ax.get_ylim()]), max([*values, *ax.get_ylim()]))
        order = sorted(range(len(plain)), key=lambda i: values[i])
        for rank, i in enumerate(order):  # labels in a column, evenly spaced, each pointing at its run
            r = plain[i]
            colour = "black" if r["mechanism"] == "none" else f"C{5 + NON_DP.index(r['mechanism'])}"
            ax.plot([inf_x], [values[i]], marker="*" if r["mechanism"] == "none" else "X", color=colour,
                    markersize=9, linestyle="")  # fmt: skip
            text = "no defense" if r["mechanism"] == "none" else f"{r['mechanism']} {r['label']}"
            y_text = low + (high - low) * (0.04 + 0.92 * rank / max(len(plain) - 1, 1))
            ax.annotate(text, (inf_x, values[i]), xytext=(inf_x * 8, y_text), fontsize=7, va="center",
                        arrowprops={"arrowstyle": "-", "color": colour, "linewidth": 0.6})  # fmt: skip
        baseline = next((r for r in plain if r["mechanism"] == "none"), None)
        if baseline:
            ax.axhline(value(baseline), color="black", linestyle=":", linewidth=0.8)
        ax.axvline(top * 5, color="grey", linestyle="--", linewidth=0.8)
        ax.set(xscale="log", xlabel="ε of the run (δ = 1e-5); right of the dashed line: no DP (ε = ∞)",
               ylabel=ylabel, title=title)  # fmt: skip
        ax.set_xlim(right=inf_x * 3000)
        decades = [10.0**k for k in range(0, int(math.log10(top)) + 1, 2)]
        ax.set_xticks([*decades, inf_x], [*(f"$10^{{{int(math.log10(d))}}}$" for d in decades), "∞"])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("MNIST / DLG's LeNet, 3 clients, 6 FedAvg rounds: privacy spent against utility and against the "
                 "curious server\n(dotted: no defense; every point one run; hollow: client-side clipping)")  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def frontier_line(row: dict) -> str:
    eps = "∞" if row["epsilon"] is None else f"{row['epsilon']:.4g}"
    psnr = "  ".join(f"{a} {row['attack'][a]['psnr_mean']:5.1f}" for a in FRONTIER_ATTACKS if a in row["attack"])
    reused = " (capture seen before: attack reused)" if row.get("attack-reused") else ""
    return (f"{row['mechanism']:>15} {row['label']:>14}  ε {eps:>10}  acc {100 * row['accuracy']:5.1f}%  {psnr}"
            f"  ({row['seconds_under_load']:.0f} s){reused}")  # fmt: skip


def frontier_table(rows: list[dict]) -> str:
    """The frontier as a Markdown table: ε, accuracy, each attack's PSNR, and whose capture the server got."""
    attacks = [a for a in FRONTIER_ATTACKS if any(a in r["attack"] for r in rows)]
    names = {"dlg": "DLG", "idlg": "iDLG", "ig": "IG"}
    first: dict[str, str] = {}
    head = ["mechanism", "setting", "ε of the run", "accuracy", *(f"{names[a]} dB" for a in attacks), "capture"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        seen = first.setdefault(r["capture-sha256"], f"{r['mechanism']} {r['label']}")
        same = "its own" if seen == f"{r['mechanism']} {r['label']}" else f"= {seen}'s, bit for bit"
        eps = "∞ (no DP)" if r["epsilon"] is None else f"{r['epsilon']:.3g}"
        psnr = [f"{r['attack'][a]['psnr_mean']:.1f}" for a in attacks]
        for i, a in enumerate(attacks):  # an attack run with other options than the rest of the table
            if a in r.get("stale_attacks", []):
                psnr[i] += f" ({r['setup']['attacks'][a]['iterations']} steps)"
        cells = [r["mechanism"], r["label"], eps, f"{100 * r['accuracy']:.1f} %", *psnr, same]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect_frontier(points_dir: Path, out: Path, setup: dict) -> dict:
    """dp_frontier.json and .png from every point file in `points_dir`, in the settings' order."""
    import json

    order = {s["key"]: i for i, s in enumerate(frontier_settings(setup.get("public", "fashion-mnist")))}
    rows = [json.loads(f.read_text()) for f in sorted(points_dir.glob("*.json"))]
    rows.sort(key=lambda r: order.get(r["key"], len(order)))
    for r in rows:  # attacks run with other options than `setup`'s (a point not yet rerun)
        r["stale_attacks"] = [a for a in r["attack"] if r["setup"]["attacks"].get(a) != setup["attacks"].get(a)]
    report = {"benchmark": "bench_defenses --frontier", "setup": setup, "rows": rows,
              "seconds_under_load": sum(r["seconds_under_load"] for r in rows)}  # fmt: skip
    atomic_write_json(out, report)
    if rows:
        plot_frontier(rows, out.with_suffix(".png"))
    return report


def frontier(args: argparse.Namespace) -> None:
    """Run the frontier's points not yet on disk (each written atomically as it finishes), then collect them."""
    import json

    logging.getLogger("flwr").setLevel(logging.ERROR)  # not a warning per round that evaluation is off
    torch.set_num_threads(1)
    out = Path(args.out) if args.out != str(RESULTS / "defenses.json") else RESULTS / "dp_frontier.json"
    points_dir = out.parent / (out.stem + "_points")
    base = {**FRONTIER_BASE, "dataset": args.dataset, "data-dir": args.data_dir}
    if args.examples:
        base["examples-per-client"] = args.examples
    dlg = {"iterations": args.iterations, "restarts": args.restarts, "rescues": 3}  # a blown-up step is retried
    options = {"dlg": dlg, "idlg": dict(dlg), "ig": {"iterations": args.ig_iterations, "restarts": 1}}
    attacks = {a: options[a] for a in args.attacks.split(",") if a}
    rounds = args.rounds or 8
    setup = {"base": base, "rounds": rounds, "public": args.public, "attacks": attacks, "images": base["num-clients"],
             "attack-capture": "1 FedSGD round, batch 1, one image per client, seed 0"}  # fmt: skip
    chosen = [m for m in args.mechanisms.split(",") if m]
    known = (*NON_DP, "ldp", *CENTRAL)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"unknown mechanism(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    settings_ = sorted(
        (s for s in frontier_settings(args.public) if s["mechanism"] in chosen),
        key=lambda s: chosen.index(s["mechanism"]),
    )  # in the order asked: parallel runs share work
    if getattr(args, "reverse", False):
        settings_.reverse()
    for setting in [] if getattr(args, "collect_only", False) else settings_:
        path = points_dir / f"{setting['key']}.json"
        before = json.loads(path.read_text()) if path.exists() else None
        if before and before.get("setup") == setup:
            continue  # resumable: a point on disk with the same setup is done
        same_training = before and {**before["setup"], "attacks": None} == {**setup, "attacks": None}
        cache = points_dir.parent / (out.stem + "_attacks")
        row = frontier_point(base, setting, rounds, attacks, cache, before if same_training else None)
        atomic_write_json(path, {**row, "setup": setup})
        print(frontier_line(row), flush=True)
    report = collect_frontier(points_dir, out, setup)
    if report["rows"]:
        print(frontier_table(report["rows"]))
    print(f"{len(report['rows'])} points in {out} ({report['seconds_under_load'] / 60:.1f} min under load)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--public", default="fashion-mnist", help="TL-DMI's public dataset")
    parser.add_argument("--rounds", type=int, default=None, help="FedAvg rounds (default 5; the frontier 8)")
    parser.add_argument("--examples", type=int, default=None,
                        help="examples per client in the accuracy half (default 1000; the frontier 500)")  # fmt: skip
    parser.add_argument("--images", type=int, default=3, help="clients (one image each) attacked per setting")
    parser.add_argument("--attacks", default=None, help="attacks (dlg,idlg,grnn; frontier: dlg,idlg,ig)")
    parser.add_argument("--iterations", type=int, default=40, help="DLG/iDLG L-BFGS steps (x20 inner iterations)")
    parser.add_argument("--restarts", type=int, default=4, help="DLG/iDLG restarts (the best by loss is kept)")
    parser.add_argument("--grnn-iterations", type=int, default=300, help="GRNN RMSprop steps (1 restart)")
    parser.add_argument(
        "--unaware", default="dlg", help="attacks also run defense-unaware where awareness matters ('' for none)"
    )
    parser.add_argument(
        "--only", default="noise,prune,ldp,clip,tldmi", help="comma-separated defenses to run (the baseline always)"
    )
    parser.add_argument("--frontier", action="store_true", help="accuracy and DLG PSNR against the run's epsilon")
    parser.add_argument("--mechanisms", default=",".join((*NON_DP, "ldp", *CENTRAL)), help="frontier: which to run")
    parser.add_argument("--reverse", action="store_true", help="frontier: run the points in reverse order")
    parser.add_argument("--collect-only", action="store_true", help="frontier: only table and plot the points on disk")
    parser.add_argument("--ig-iterations", type=int, default=200, help="frontier: Inverting Gradients' Adam steps")
    parser.add_argument("--skip-attack", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 2 images, 5 DLG / 20 GRNN steps")
    parser.add_argument("--out", default=str(RESULTS / "defenses.json"))
    args = parser.parse_args()
    if args.frontier:
        args.attacks = args.attacks or ",".join(FRONTIER_ATTACKS)
        return frontier(args)
    args.rounds, args.examples = args.rounds or 5, args.examples or 1000
    args.attacks = args.attacks or "dlg,idlg,grnn"
    logging.getLogger("flwr").setLevel(logging.WARNING)  # no INFO line per aggregation or LocalDpMod call
    if args.quick:
        args.rounds, args.images, args.iterations, args.restarts, args.examples = 1, 2, 5, 1, 200
        args.grnn_iterations = 20
    attacks = attack_options(args)
    unaware = {a for a in args.unaware.split(",") if a} & set(attacks)
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
        "setup": {**vars(args), "base": base, "lr": LR, "attack_options": attacks},
        "rows": [],
    }
    started = time.perf_counter()
    for setting in chosen:
        row = {k: setting[k] for k in ("defense", "strength", "label")} | {"overrides": setting["overrides"]}
        if not args.skip_accuracy:
            row["utility"] = accuracy_half(base, setting["overrides"], args.rounds)
        if not args.skip_attack:
            row |= attack_half(base, setting["overrides"], args.images, attacks, unaware)
        report["rows"].append(row)
        report["seconds"] = time.perf_counter() - started
        atomic_write_json(out, report)
        print(line(row, list(attacks)), flush=True)
    if not args.skip_accuracy and not args.skip_attack:
        plot(report["rows"], out.with_suffix(".png"), list(attacks))
    print(f"results in {out} ({report['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
