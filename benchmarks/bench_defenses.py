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
(ldp-epsilon per round in {1e1, 1e2, 1e3, 1e4, 1e5}) and central DP with server-side and client-side fixed
clipping (dp-target-epsilon in {1, 8, 64, 512, 4096} over `--rounds`, dp-clip-norm 0.5). Every point is
a run through the run's own strategy stack (server.server_app.server_strategy: CuriousStrategy ->
PrivacyLedger -> Flower's DP wrapper -> FedAvg), clients in-process behind the ClientApp's mods; the
epsilon is the one the run's privacy.json reports (Flower's RdpAccountant). The attack (DLG) runs on the
curious server's captures of a 1-round FedSGD run (batch 1) with the same per-round mechanism. Results:
benchmarks/results/dp_frontier.json and dp_frontier.png.
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
    from server.server_app import trainable_names

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
            reply = app(train_message(state, recipe, 1), context(p))
            client_state = reply.content["arrays"].to_torch_state_dict()
            said = dict(reply.content["fedsim"])
            said.pop("partition-id", None)
            record = {  # what the curious server writes in the capture manifest (server.curious)
                "model": config.model,
                "input_shape": list(fed.data.input_shape),
                "num_classes": fed.data.num_classes,
                "trainable": trainable_names(config, model),  # the server's view; the aware attacker reads "declared"
                "recipe": {k: v for k, v in recipe.items() if k != "truth-dir"},
                "num_examples": int(reply.content["metrics"]["num-examples"]),
                "declared": said,
            }
            targets.append(target_from_capture(state, client_state, record, aware=True))
            blind.append(target_from_capture(state, client_state, record, aware=False))
            truths.append(load_tensors(Path(truth_dir) / "round-0001" / f"client-{100 + p}.safetensors"))
            features.append(last_layer_features(model, state, client_state, truths[-1]["images"], config.lr))
            declared.append(said.get("defenses", ""))
    matters = any(awareness_matters(a, u) for a, u in zip(targets, blind, strict=True))
    out: dict[str, dict] = {}
    runs = [(name, name, targets) for name in attacks]
    runs += [(name, f"{name}-unaware", blind) for name in attacks if name in unaware and matters]
    for name, label, chosen in runs:
        start = time.perf_counter()
        attack = get_attack(name, **attacks[name])
        results = reconstruct_many(attack, chosen, seed=config.seed, raise_on_divergence=False)
        out[label] = summarise(results, truths, time.perf_counter() - start)
    capture = {"declared": declared[0], "aware_differs": matters, "feature_error_median": statistics.median(features),
               "feature_errors": features}  # fmt: skip
    return {"attack": out, "capture": capture}


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

FRONTIER_CLIP = 0.5


def frontier_settings() -> list[dict]:
    """Every (mechanism, epsilon) point: local DP by its per-round epsilon, central DP by the run's target."""
    out = []
    for eps in (1e1, 1e2, 1e3, 1e4, 1e5):
        out.append({"mechanism": "ldp", "label": f"ε/round={eps:g}",
                    "overrides": {"defenses": "ldp", "ldp-epsilon": eps, "ldp-clip-norm": 1.0}})  # fmt: skip
    for mode in ("server-fixed", "client-fixed"):
        for eps in (1.0, 8.0, 64.0, 512.0, 4096.0):
            overrides = {"central-dp": mode, "dp-target-epsilon": eps, "dp-clip-norm": FRONTIER_CLIP}
            out.append({"mechanism": mode, "label": f"ε={eps:g}", "overrides": overrides})
    return out


class Nodes:
    """The connected clients, as FedAvg asks a Grid for them while configuring a round."""

    def __init__(self, count: int) -> None:
        self.ids = [100 + i for i in range(count)]

    def get_node_ids(self):
        return list(self.ids)


def stack_run(
    config: FedsimConfig, rounds: int, store_dir: Path | None, truth_dir: str = "", model: torch.nn.Module | None = None
) -> dict:
    """`rounds` rounds through the run's real strategy stack, clients in-process behind the ClientApp's mods.

    `model` is the initial global model (default: the config's seeded one); the final one is returned as "state".
    """
    from flwr.supercore.task_identity import TaskIdentity

    from clients.defenses import CentralDpClipping
    from fedsim.captures import CaptureStore
    from server.server_app import server_strategy, trainable_names

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # a ServerApp process's identity
    fed = Federation.from_config(config)
    model = model if model is not None else fed.build_model()
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


def run_epsilon(privacy: dict) -> float:
    """The run's epsilon: the model's under central DP, the most-spending client's under local DP."""
    return (privacy.get("central") or privacy.get("local"))["epsilon"]


def frontier_point(base: dict, setting: dict, rounds: int, dlg: dict) -> dict:
    """One point: a FedAvg run (accuracy, epsilon) and a FedSGD capture run attacked by DLG, same mechanism."""
    from attacks import get_attack, reconstruct_many
    from fedsim.app.attack_runner import load_target

    config = FedsimConfig.from_mapping({**base, **setting["overrides"], "num-rounds": rounds})
    start = time.perf_counter()
    trained = stack_run(config, rounds, None)
    row = {"mechanism": setting["mechanism"], "label": setting["label"], "overrides": setting["overrides"],
           "accuracy": trained["accuracy"][-1], "accuracy_per_round": trained["accuracy"],
           "epsilon": run_epsilon(trained["privacy"]), "privacy": trained["privacy"]}  # fmt: skip
    per_round = dict(setting["overrides"])
    if "dp-target-epsilon" in per_round:  # the same noise multiplier per round as the trained run
        per_round.pop("dp-target-epsilon")
        per_round["dp-noise-multiplier"] = trained["privacy"]["central"]["noise-multiplier"]
    attack_config = FedsimConfig.from_mapping(
        {**base, **per_round, "recipe": "fedsgd", "batch-size": 1, "num-rounds": 1, "examples-per-client": 16}
    )
    with tempfile.TemporaryDirectory() as tmp:
        captured = stack_run(attack_config, 1, Path(tmp) / "captures", truth_dir=str(Path(tmp) / "truth"))
        store = captured["store"]
        global_state = store.load(store.global_record(1))
        targets, truths = [], []
        for record in store.records("update"):
            targets.append(load_target(global_state, store.load(record), record, aware=True))
            truths.append(load_tensors(Path(tmp) / "truth" / "round-0001" / f"client-{record['client']}.safetensors"))
        results = reconstruct_many(get_attack("dlg", **dlg), targets, seed=0, raise_on_divergence=False)
    row["attack"] = {"dlg": summarise(results, truths, 0.0)}
    row["seconds"] = time.perf_counter() - start
    return row


def plot_frontier(rows: list[dict], path: Path) -> None:
    """Accuracy and DLG PSNR against the run's epsilon (log scale), one curve per mechanism."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, psnr) = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    names = {"ldp": "local DP (per client)", "server-fixed": "central DP, server-side clipping (the model)",
             "client-fixed": "central DP, client-side clipping (the model)"}  # fmt: skip
    for i, (mechanism, name) in enumerate(names.items()):
        points = sorted((r for r in rows if r["mechanism"] == mechanism), key=lambda r: r["epsilon"])
        if not points:
            continue
        xs = [r["epsilon"] for r in points]
        style = {"marker": "o^s"[i], "color": f"C{i}", "label": name}
        acc.plot(xs, [100 * r["accuracy"] for r in points], **style)
        psnr.plot(xs, [r["attack"]["dlg"]["psnr_mean"] for r in points], **style)
    acc.set(xscale="log", xlabel="ε of the run (δ = 1e-5)", ylabel="global test accuracy (%)", title="utility")
    psnr.set(xscale="log", xlabel="ε of the run (δ = 1e-5)", ylabel="DLG PSNR on the captures (dB)",
             title="what the curious server reconstructs")  # fmt: skip
    for ax in (acc, psnr):
        ax.grid(alpha=0.3)
    psnr.legend(fontsize=7)
    fig.suptitle("MNIST / DLG's LeNet, 3 clients: privacy spent against utility and against the curious server")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def merge_frontier(paths: list[str], out: Path) -> None:
    """One results file and one plot from the frontier's parts (run side by side, one per mechanism)."""
    import json

    parts = [json.loads(Path(p).read_text()) for p in paths]
    merged = {**parts[0], "rows": [row for part in parts for row in part["rows"]],
              "seconds": max(part.get("seconds", 0.0) for part in parts), "parts": paths}  # fmt: skip
    atomic_write_json(out, merged)
    plot_frontier(merged["rows"], out.with_suffix(".png"))
    print(f"{len(merged['rows'])} points in {out}")


def frontier(args: argparse.Namespace, base: dict) -> None:
    logging.getLogger("flwr").setLevel(logging.ERROR)  # not a warning per round that evaluation is off
    out = Path(args.out) if args.out != str(RESULTS / "defenses.json") else RESULTS / "dp_frontier.json"
    dlg = {"iterations": args.iterations, "restarts": args.restarts, "rescues": 3}  # a blown-up step is retried
    report = {"benchmark": "bench_defenses --frontier", "setup": {**vars(args), "base": base, "dlg": dlg}, "rows": []}
    started = time.perf_counter()
    chosen = {m for m in args.mechanisms.split(",") if m}
    for setting in [s for s in frontier_settings() if s["mechanism"] in chosen]:
        row = frontier_point(base, setting, args.rounds, dlg)
        report["rows"].append(row)
        report["seconds"] = time.perf_counter() - started
        atomic_write_json(out, report)
        print(f"{row['mechanism']:>12} {row['label']:>14}  ε {row['epsilon']:10.4g}  acc {100 * row['accuracy']:5.1f}%"
              f"  dlg {row['attack']['dlg']['psnr_mean']:5.1f} dB  ({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    plot_frontier(report["rows"], out.with_suffix(".png"))
    print(f"results in {out} ({report['seconds'] / 60:.1f} min)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--public", default="fashion-mnist", help="TL-DMI's public dataset")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--examples", type=int, default=1000, help="examples per client in the accuracy half")
    parser.add_argument("--images", type=int, default=3, help="clients (one image each) attacked per setting")
    parser.add_argument("--attacks", default="dlg,idlg,grnn", help="comma-separated attacks (dlg, idlg, grnn)")
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
    parser.add_argument("--mechanisms", default="ldp,server-fixed,client-fixed", help="frontier: which to run")
    parser.add_argument("--merge", default="", help="frontier: comma-separated part files to merge and plot")
    parser.add_argument("--skip-attack", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 2 images, 5 DLG / 20 GRNN steps")
    parser.add_argument("--out", default=str(RESULTS / "defenses.json"))
    args = parser.parse_args()
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
    if args.merge:
        return merge_frontier(args.merge.split(","), RESULTS / "dp_frontier.json")
    if args.frontier:
        return frontier(args, base)
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
