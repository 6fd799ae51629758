"""Client defenses: each Flower mod changes the update as specified, on real flwr Messages."""

from __future__ import annotations

import math
import time

import numpy
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.client.mod.utils import make_ffn

from clients.client_app import local_train
from clients.defenses import (
    DEFENSES,
    ClipDefense,
    LocalDpDefense,
    NoiseDefense,
    PruneDefense,
    TldmiDefense,
    defense_mods,
    ldp_noise_std,
    update_norm,
)
from fedsim import config as fedsim_config
from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError
from fedsim.federation import Federation, tldmi_layers
from server.server_app import trainable_names
from tests.conftest import invoke_cli

BASE = {
    "dataset": "sample-mnist",
    "model": "lenet-dlg",
    "recipe": "fedsgd",
    "batch-size": 2,
    "lr": 0.1,
    "num-clients": 3,
}


def make_config(**overrides: object) -> FedsimConfig:
    return FedsimConfig.from_mapping({**BASE, **{k.replace("_", "-"): v for k, v in overrides.items()}})


def train_message(state: dict[str, torch.Tensor], config: FedsimConfig, server_round: int = 1) -> Message:
    """The message the server sends in a round: the global arrays and the train config (as FedAvg sends them)."""
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "config": ConfigRecord(
                {
                    "recipe": config.recipe,
                    "lr": config.lr,
                    "batch-size": config.batch_size,
                    "local-epochs": config.local_epochs,
                    "server-round": server_round,
                }
            ),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id="instruction",
        src_node_id=0,
        dst_node_id=11,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def context(partition_id: int, run_config: dict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=11,
        node_config={"partition-id": partition_id},
        state=RecordDict(),
        run_config=run_config or {},
    )


def real_training(config: FedsimConfig):
    """call_next = the client app's real local training step."""
    return lambda msg, ctx: local_train(msg, ctx, config)


def shift_by(delta: float):
    """call_next = a deterministic stand-in for training: every float tensor moves by `delta`, counters by 1."""

    def step(msg: Message, ctx: Context) -> Message:
        state = msg.content["arrays"].to_torch_state_dict()
        moved = {k: (v + delta if v.is_floating_point() else v + 1) for k, v in state.items()}
        return Message(content=RecordDict({"arrays": ArrayRecord(moved)}), reply_to=msg)

    return step


def global_state(config: FedsimConfig) -> dict[str, torch.Tensor]:
    return Federation.from_config(config).build_model().state_dict()


def update_of(reply: Message, sent: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = reply.content["arrays"].to_torch_state_dict()
    return {k: state[k] - sent[k] for k in sent}


def raw_update(config: FedsimConfig, sent: dict[str, torch.Tensor], partition_id: int = 0) -> dict:
    """The update the client computes without any defense (local training is seeded, so it is repeatable)."""
    plain = FedsimConfig.from_mapping({**config.to_mapping(), "defenses": ""})
    return update_of(local_train(train_message(sent, plain), context(partition_id), plain), sent)


# --- clipping ------------------------------------------------------------------------------------


def test_clip_scales_a_larger_update_to_the_clip_norm_keeping_its_direction():
    config = make_config(defenses="clip", clip_norm=0.05)
    sent = global_state(config)
    raw = raw_update(config, sent)
    assert update_norm(raw) > 0.05 * 10
    reply = ClipDefense(config)(train_message(sent, config), context(0), real_training(config))
    clipped = update_of(reply, sent)
    assert update_norm(clipped) == pytest.approx(0.05, rel=1e-4)
    scale = 0.05 / update_norm(raw)
    for key in sent:
        torch.testing.assert_close(clipped[key], raw[key] * scale, atol=1e-6, rtol=1e-3)
    assert dict(reply.content["fedsim"])["defenses"] == "clip"
    assert dict(reply.content["fedsim"])["clip-norm"] == 0.05


def test_clip_leaves_a_smaller_update_unchanged():
    config = make_config(defenses="clip", clip_norm=1e6)
    sent = global_state(config)
    raw = raw_update(config, sent)
    reply = ClipDefense(config)(train_message(sent, config), context(0), real_training(config))
    for key, value in update_of(reply, sent).items():
        torch.testing.assert_close(value, raw[key], atol=1e-7, rtol=0)


# --- pruning -------------------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [10.0, 50.0, 90.0])
def test_prune_zeroes_exactly_p_percent_of_each_tensor_the_smallest(percent):
    config = make_config(defenses="prune", prune_percent=percent)
    sent = global_state(config)
    raw = raw_update(config, sent)
    reply = PruneDefense(config)(train_message(sent, config), context(0), real_training(config))
    pruned = update_of(reply, sent)
    for key, u in pruned.items():
        zeros = u == 0
        # Entries whose update rounded to 0 in float32 (a saturated sigmoid's input) are the smallest of all:
        # they are among the pruned ones, so exactly round(p·n/100) zeros unless there were more before.
        already = int((raw[key] == 0).sum())
        assert already < 0.1 * u.numel()
        assert int(zeros.sum()) == max(round(percent / 100 * u.numel()), already), key
        # the kept entries are the raw ones, and every pruned entry was no larger than every kept one
        torch.testing.assert_close(u[~zeros], raw[key][~zeros], atol=1e-6, rtol=1e-4)
        assert raw[key][zeros].abs().max() <= raw[key][~zeros].abs().min() * (1 + 1e-4)
    total = sum(int((u == 0).sum()) for u in pruned.values()) / sum(u.numel() for u in pruned.values())
    assert total == pytest.approx(percent / 100, abs=0.002)


# --- noise ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "scale"), [("gaussian", 0.05), ("laplace", 0.02)])
def test_noise_has_the_requested_distribution(kind, scale):
    config = make_config(defenses="noise", noise_type=kind, noise_scale=scale)
    sent = global_state(config)
    reply = NoiseDefense(config)(train_message(sent, config), context(0), shift_by(0.0))
    noise = torch.cat([u.flatten().double() for u in update_of(reply, sent).values()])
    n = noise.numel()
    assert n > 10_000
    std = scale if kind == "gaussian" else scale * math.sqrt(2)
    assert float(noise.std()) == pytest.approx(std, rel=0.05)
    assert abs(float(noise.mean())) < 5 * std / math.sqrt(n)
    # E|x| tells the two apart: sigma*sqrt(2/pi) for Gaussian, b for Laplace
    mean_abs = scale * math.sqrt(2 / math.pi) if kind == "gaussian" else scale
    assert float(noise.abs().mean()) == pytest.approx(mean_abs, rel=0.03)
    declared = dict(reply.content["fedsim"])
    assert declared["noise-type"] == kind and declared["noise-scale"] == scale


def test_noise_is_added_to_the_update_and_spares_integer_counters():
    config = make_config(defenses="noise", noise_scale=0.01)
    sent = {"layer.weight": torch.zeros(200, 100), "bn.num_batches_tracked": torch.tensor(7)}
    reply = NoiseDefense(config)(train_message(sent, config), context(0), shift_by(0.5))
    update = update_of(reply, sent)
    assert float(update["layer.weight"].mean()) == pytest.approx(0.5, abs=0.001)
    assert float(update["layer.weight"].std()) == pytest.approx(0.01, rel=0.05)
    assert reply.content["arrays"]["bn.num_batches_tracked"].numpy().item() == 8  # the client's count, as it was


def test_noise_is_fresh_each_time_not_derived_from_the_seed():
    config = make_config(defenses="noise", noise_scale=0.01)
    sent = global_state(config)
    first = update_of(NoiseDefense(config)(train_message(sent, config), context(0), shift_by(0.0)), sent)
    second = update_of(NoiseDefense(config)(train_message(sent, config), context(0), shift_by(0.0)), sent)
    assert not torch.equal(first["fc.weight"], second["fc.weight"])


# --- local DP (Flower's LocalDpMod) ------------------------------------------------------------


def test_local_dp_clips_the_update_before_its_noise():
    # epsilon huge: the (classic) noise is ~1e-8, so what is left is LocalDpMod's clipping of the update
    config = make_config(defenses="ldp", ldp_clip_norm=0.05, ldp_epsilon=1e8, ldp_calibration="classic")
    sent = global_state(config)
    raw = raw_update(config, sent)
    assert update_norm(raw) > 0.5
    reply = LocalDpDefense(config)(train_message(sent, config), context(0), real_training(config))
    update = update_of(reply, sent)
    assert update_norm(update) <= 0.05 * (1 + 1e-4)
    assert update_norm(update) == pytest.approx(0.05, rel=1e-3)
    assert any(not torch.allclose(update[k], raw[k]) for k in sent)


def test_local_dp_noise_has_the_gaussian_mechanism_std_and_spares_counters():
    config = make_config(defenses="ldp", ldp_clip_norm=1.0, ldp_epsilon=50.0, ldp_delta=1e-5, ldp_calibration="classic")
    sent = {"layer.weight": torch.zeros(100, 100), "bn.num_batches_tracked": torch.tensor(3)}
    # the update (0.001 per entry, norm 0.1) is below the clip norm: what LocalDpMod adds is its noise
    reply = LocalDpDefense(config)(train_message(sent, config), context(0), shift_by(0.001))
    noise = update_of(reply, sent)["layer.weight"].double() - 0.001
    expected = 1.0 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 50.0
    assert ldp_noise_std(config) == pytest.approx(expected)
    assert float(noise.std()) == pytest.approx(expected, rel=0.05)
    assert reply.content["arrays"]["bn.num_batches_tracked"].numpy().item() == 4
    declared = dict(reply.content["fedsim"])
    assert declared["defenses"] == "ldp" and declared["ldp-noise-std"] == pytest.approx(expected)


# --- TL-DMI --------------------------------------------------------------------------------------


def test_layers_are_modules_with_parameters_counted_from_the_output():
    config = make_config()
    model = Federation.from_config(config).build_model()
    assert tldmi_layers(model) == ["body.0", "body.2", "body.4", "fc"]
    assert tldmi_layers(model, 2) == ["body.4", "fc"]
    with pytest.raises(FedsimError, match=r"tldmi-layers = 5 must be in 1\.\.4"):
        tldmi_layers(model, 5)


@pytest.mark.parametrize("k", [1, 2])
def test_tldmi_freezes_early_layers_bit_identical_and_trains_the_last_k(k):
    config = make_config(
        defenses="tldmi", tldmi_layers=k, tldmi_public="sample-cifar10", recipe="fedavg", examples_per_client=16
    )
    sent = global_state(config)
    trained = {
        f"{name}.{p}"
        for name in tldmi_layers(Federation.from_config(config).build_model(), k)
        for p in ("weight", "bias")
    }
    # the client app itself freezes (requires_grad False): without the mod the early layers already stay put
    plain = local_train(train_message(sent, config), context(0), config)
    for key, value in plain.content["arrays"].to_torch_state_dict().items():
        assert torch.equal(value, sent[key]) == (key not in trained), key
    reply = TldmiDefense(config)(train_message(sent, config), context(0), real_training(config))
    state = reply.content["arrays"].to_torch_state_dict()
    for key in sent:
        if key in trained:
            assert not torch.equal(state[key], sent[key]), key
        else:
            assert torch.equal(state[key], sent[key]), key
    declared = dict(reply.content["fedsim"])
    assert declared["defenses"] == "tldmi" and declared["tldmi-layers"] == k
    assert sorted(declared["trainable"]) == sorted(trained)


def test_tldmi_frozen_batchnorm_keeps_its_statistics():
    config = FedsimConfig.from_mapping(
        {
            "dataset": "sample-cifar10",
            "model": "resnet20",
            "recipe": "fedsgd",
            "batch-size": 4,
            "defenses": "tldmi",
            "tldmi-layers": 2,
            "tldmi-public": "sample-mnist",
        }
    )
    sent = global_state(config)
    reply = local_train(train_message(sent, config), context(1), config)  # freezing alone, no mod
    state = reply.content["arrays"].to_torch_state_dict()
    changed = sorted(k for k in sent if not torch.equal(state[k], sent[k]))
    assert changed == [
        "layer3.2.bn2.bias",
        "layer3.2.bn2.num_batches_tracked",
        "layer3.2.bn2.running_mean",
        "layer3.2.bn2.running_var",
        "layer3.2.bn2.weight",
        "linear.bias",
        "linear.weight",
    ]


def test_tldmi_pretraining_sets_only_the_early_layers():
    config = make_config(defenses="tldmi", tldmi_layers=1, tldmi_public="sample-cifar10", tldmi_pretrain_epochs=1)
    fed = Federation.from_config(config)
    model = fed.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = fed.pretrain_public(model)  # 200 CIFAR-10 images, made grey and 28x28
    after = model.state_dict()
    assert all(not torch.equal(after[k], before[k]) for k in before if not k.startswith("fc."))
    assert torch.equal(after["fc.weight"], before["fc.weight"]) and torch.equal(after["fc.bias"], before["fc.bias"])
    assert metrics["public-train-loss"] > 0 and 0 <= metrics["public-test-accuracy"] <= 1


# --- TL-DMI in the paper's split: public and private classes of one dataset ----------------------

SPLIT = {"dataset": "sample-mnist", "public-classes": "0-4", "model": "lenet-dlg", "num-clients": 2}


def test_public_classes_split_the_dataset_into_disjoint_relabelled_parts():
    from fedsim.datasets import load_dataset

    full = load_dataset("sample-mnist")
    fed = Federation.from_config(FedsimConfig.from_mapping(SPLIT))
    for split in ("train", "test"):
        x, y = getattr(full, f"{split}_x"), getattr(full, f"{split}_y")
        private = y >= 5
        assert torch.equal(getattr(fed.data, f"{split}_x"), x[private])  # the clients' data: digits 5-9 only
        assert torch.equal(getattr(fed.data, f"{split}_y"), y[private] - 5)
        assert torch.equal(getattr(fed.public, f"{split}_x"), x[~private])  # the server's: digits 0-4 only
        assert torch.equal(getattr(fed.public, f"{split}_y"), y[~private])
    assert fed.data.classes == ["5", "6", "7", "8", "9"] and fed.public.classes == ["0", "1", "2", "3", "4"]
    shards = torch.from_numpy(numpy.concatenate(fed.shards))
    assert int(shards.max()) < len(fed.data.train_y)  # every shard index points into the private part
    assert fed.build_model().state_dict()["fc.weight"].shape[0] == 5  # the private task's head


@pytest.mark.parametrize("k", [1, 2])
def test_tldmi_on_public_classes_pretrains_the_early_layers_then_clients_leave_them_bit_identical(k):
    config = FedsimConfig.from_mapping(
        {**SPLIT, "defenses": "tldmi", "tldmi-layers": k, "tldmi-pretrain-epochs": 2, "recipe": "fedavg",
         "examples-per-client": 16, "batch-size": 8}
    )  # fmt: skip
    fed = Federation.from_config(config)
    model = fed.build_model()
    before = {key: v.clone() for key, v in model.state_dict().items()}
    metrics = fed.pretrain_public(model)
    assert metrics["public-data"] == "sample-mnist[public]" and len(metrics["public-test-accuracy-per-epoch"]) == 2
    assert metrics["public-test-accuracy"] > 0.3  # 5 digits (chance 0.2), 2 epochs of the sigmoid LeNet
    trained = {f"{name}.{p}" for name in tldmi_layers(model, k) for p in ("weight", "bias")}
    sent = model.state_dict()
    for key in sent:  # pre-training moved the frozen layers only; the trained ones keep the seeded init
        assert torch.equal(sent[key], before[key]) == (key in trained), key
    reply = TldmiDefense(config)(train_message(sent, config), context(0), real_training(config))
    state = reply.content["arrays"].to_torch_state_dict()
    for key in sent:
        assert torch.equal(state[key], sent[key]) == (key not in trained), key
    assert dict(reply.content["fedsim"])["public-classes"] == "0-4"


def test_tldmi_finetune_starts_every_layer_but_the_output_one_from_the_pretrained_weights():
    config = FedsimConfig.from_mapping(
        {**SPLIT, "defenses": "tldmi", "tldmi-layers": 4, "tldmi-finetune": True, "tldmi-pretrain-epochs": 1}
    )
    fed = Federation.from_config(config)
    model = fed.build_model()
    before = {key: v.clone() for key, v in model.state_dict().items()}
    fed.pretrain_public(model)
    for key, value in model.state_dict().items():  # k = all: every layer trained, all but `fc` pre-trained
        assert torch.equal(value, before[key]) == key.startswith("fc."), key


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"public-classes": "0-x"}, r"public-classes = '0-x' must list class labels and ranges, e.g. '0-4'"),
        ({"public-classes": "4-0"}, r"public-classes: range '4-0' must run low-high"),
        ({"public-classes": "0-4,3"}, r"public-classes = '0-4,3' names a class twice"),
        ({"public-classes": "-1"}, r"public-classes = '-1' must list class labels"),
        (
            {"public-classes": "0-4", "defenses": "tldmi", "tldmi-public": "sample-fashion-mnist"},
            r"defenses = tldmi takes one public source: tldmi-public .* or public-classes",
        ),
    ],
)
def test_bad_public_classes_are_refused_naming_the_key(values, message):
    with pytest.raises(FedsimError, match=message):
        FedsimConfig.from_mapping(values)


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ("0-10", r"public-classes must be labels in 0\.\.9: sample-mnist has 10 classes"),
        ("0-8", r"public-classes leaves 1 of sample-mnist's 10 classes private; the clients need at least 2"),
    ],
)
def test_public_classes_outside_the_dataset_are_refused_where_it_is_loaded(classes, message):
    with pytest.raises(FedsimError, match=message):
        Federation.from_config(FedsimConfig.from_mapping({**SPLIT, "public-classes": classes}))


def test_cli_refuses_bad_public_classes_in_one_line_with_status_2(tmp_path):
    result = invoke_cli("run", "--out-dir", str(tmp_path), "--set", "public-classes=0-12")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: public-classes must be labels in 0..9: sample-mnist has 10 classes"]
    assert "Traceback" not in result.stdout + result.stderr


def test_capture_records_list_what_tldmi_clients_train():
    model = Federation.from_config(make_config()).build_model()
    everyone = make_config(defenses="tldmi", tldmi_layers=2, tldmi_public="sample-cifar10")
    assert trainable_names(everyone, model) == ["body.4.weight", "body.4.bias", "fc.weight", "fc.bias"]
    some = make_config(defenses="tldmi", tldmi_public="sample-cifar10", defense_clients="1")
    assert trainable_names(some, model) == [n for n, _ in model.named_parameters()]  # the client declares its own
    assert trainable_names(make_config(), model) == [n for n, _ in model.named_parameters()]


# --- selection, order, declarations ------------------------------------------------------------


def test_clients_outside_defense_clients_are_untouched():
    config = make_config(
        defenses="noise,clip,prune,ldp,tldmi", defense_clients="1", tldmi_public="sample-cifar10", clip_norm=1e-3
    )
    sent = global_state(config)
    app = make_ffn(real_training(config), defense_mods(config))
    reply = app(train_message(sent, config), context(0))
    plain = local_train(train_message(sent, config), context(0), config)
    for key, value in reply.content["arrays"].to_torch_state_dict().items():
        assert torch.equal(value, plain.content["arrays"].to_torch_state_dict()[key]), key
    assert "defenses" not in dict(reply.content["fedsim"])
    protected = app(train_message(sent, config), context(1))
    assert dict(protected.content["fedsim"])["defenses"] == "tldmi,clip,noise,prune,ldp"


def test_all_mods_apply_in_the_documented_order_and_declare_themselves():
    config = make_config(
        defenses="prune,noise,tldmi,clip",
        tldmi_public="sample-cifar10",
        tldmi_layers=2,
        noise_scale=1e-3,
        prune_percent=50.0,
        clip_norm=0.1,
    )
    sent = global_state(config)
    reply = make_ffn(real_training(config), defense_mods(config))(train_message(sent, config), context(2))
    update = update_of(reply, sent)
    declared = dict(reply.content["fedsim"])
    assert declared["defenses"] == "tldmi,clip,noise,prune"  # applied order, whatever order the config lists
    assert declared["partition-id"] == 2 and declared["prune-percent"] == 50.0
    for key, u in update.items():
        if key.startswith(("body.0", "body.2")):
            assert torch.equal(u, torch.zeros_like(u)), key  # frozen: no noise, no update
        else:
            assert int((u == 0).sum()) == round(0.5 * u.numel()), key  # pruning came after the noise


def test_the_registry_holds_each_defense_the_config_accepts_once_in_the_applied_order():
    names = [defense.name for defense in DEFENSES]
    assert sorted(names) == sorted(fedsim_config.DEFENSES) and len(set(names)) == len(names)
    assert names == ["tldmi", "clip", "noise", "prune", "ldp"]  # README "Order"
    assert [mod.name for mod in defense_mods()] == names[::-1]  # Flower calls the first mod first


def test_mods_read_the_flower_run_config_when_not_bound():
    config = make_config(defenses="prune", prune_percent=50.0)
    sent = global_state(config)
    reply = PruneDefense()(train_message(sent, config), context(0, config.to_mapping()), real_training(config))
    assert dict(reply.content["fedsim"])["defenses"] == "prune"


def test_a_client_error_reply_passes_through():
    config = make_config(defenses="clip,noise")
    sent = global_state(config)

    def failing(msg: Message, ctx: Context) -> Message:
        from flwr.app import Error

        return Message(Error(code=0, reason="boom"), reply_to=msg)

    reply = make_ffn(failing, defense_mods(config))(train_message(sent, config), context(0))
    assert reply.has_error() and reply.error.reason == "boom"


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"defenses": "noise,dropout"}, r"defenses: unknown defense 'dropout'; choose from: noise, clip, ldp"),
        ({"noise-scale": -0.1}, r"noise-scale = -0.1 must be >= 0"),
        ({"noise-type": "uniform"}, r"noise-type = 'uniform' is not allowed; choose one of: gaussian, laplace"),
        ({"prune-percent": 100.0}, r"prune-percent = 100.0 must be in \[0, 100\)"),
        ({"prune-percent": -1}, r"prune-percent = -1.0 must be in \[0, 100\)"),
        ({"ldp-epsilon": 0}, r"ldp-epsilon = 0.0 must be > 0"),
        ({"ldp-delta": 1.0}, r"ldp-delta = 1.0 must be in \(0, 1\)"),
        ({"ldp-delta": 0}, r"ldp-delta = 0.0 must be in \(0, 1\)"),
        ({"clip-norm": 0}, r"clip-norm = 0.0 must be > 0"),
        ({"ldp-clip-norm": -1}, r"ldp-clip-norm = -1.0 must be > 0"),
        ({"defenses": "tldmi"}, r"defenses = tldmi needs tldmi-public"),
        ({"defenses": "tldmi", "tldmi-public": "sample-mnist"}, r"tldmi-public = 'sample-mnist' overlaps"),
        ({"defenses": "tldmi", "tldmi-public": "mnist"}, r"tldmi-public = 'mnist' overlaps"),
        ({"defenses": "tldmi", "tldmi-public": "no/such/ckpt"}, r"neither a dataset .* nor an existing checkpoint"),
        ({"tldmi-layers": 0}, r"tldmi-layers = 0 must be at least 1"),
        ({"num-clients": 3, "defense-clients": "0,3"}, r"defense-clients: partition id 3 is outside 0\.\.2"),
        ({"defense-clients": "a"}, r"defense-clients = 'a' must be comma-separated partition ids"),
    ],
)
def test_bad_defense_settings_are_refused_naming_the_key(values, message):
    with pytest.raises(FedsimError, match=message):
        FedsimConfig.from_mapping(values)


def test_defense_clients_accepts_an_integer_or_a_list():
    assert FedsimConfig.from_mapping({"defense-clients": 1}).defense_partitions() == [1]
    assert FedsimConfig.from_mapping({"num-clients": 3, "defense-clients": [0, 2]}).defense_partitions() == [0, 2]
    assert FedsimConfig().defense_partitions() is None and not FedsimConfig().defends(0)


def test_tldmi_deeper_than_the_model_is_refused_where_the_model_is_built():
    config = make_config(defenses="tldmi", tldmi_public="sample-cifar10", tldmi_layers=9)
    with pytest.raises(FedsimError, match=r"tldmi-layers = 9 must be in 1\.\.4: LeNetDLG has 4 layers"):
        Federation.from_config(config).build_model()


def test_cli_refuses_a_bad_defense_in_one_line_with_status_2(tmp_path):
    result = invoke_cli("run", "--out-dir", str(tmp_path), "--set", "defenses=noise", "--set", "noise-scale=-1")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: noise-scale = -1.0 must be >= 0 (Gaussian std or Laplace scale)"]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "captures").exists()


def test_cli_refuses_tldmi_deeper_than_the_model_before_ray(tmp_path):
    result = invoke_cli(
        "run", "--out-dir", str(tmp_path), "--model", "lenet-dlg",
        "--set", "defenses=tldmi", "--set", "tldmi-public=sample-cifar10", "--set", "tldmi-layers=7",
    )  # fmt: skip
    assert result.returncode == 2
    assert "tldmi-layers = 7 must be in 1..4" in result.stderr and "Traceback" not in result.stderr


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_simulation_with_every_defense_records_what_clients_declared(tmp_path, ray_head, no_strays):
    from fedsim.app.simulation import simulate
    from fedsim.captures import CaptureStore
    from fedsim.files import load_tensors

    config = FedsimConfig.from_mapping(
        {
            "dataset": "sample-mnist",
            "model": "lenet-dlg",
            "num-clients": 3,
            "num-rounds": 2,
            "examples-per-client": 64,
            "local-epochs": 1,
            "defenses": "noise,clip,prune,tldmi,ldp",
            "defense-clients": "0,2",
            "tldmi-public": "sample-fashion-mnist",
            "tldmi-layers": 2,
            "tldmi-pretrain-epochs": 1,
            "noise-scale": 0.001,
            "ldp-epsilon": 1000.0,
            "out-dir": str(tmp_path),
            "run-name": "defended",
        }
    )
    run_dir = simulate(config, tmp_path / "defended")
    store = CaptureStore(run_dir / "captures")
    updates = store.records("update")
    assert len(updates) == 6 and not store.records("failure")
    fresh = Federation.from_config(config).build_model().state_dict()
    first_global = store.load(store.global_record(1))
    assert not torch.equal(first_global["body.0.weight"], fresh["body.0.weight"])  # pre-trained on public data
    assert torch.equal(first_global["fc.weight"], fresh["fc.weight"])  # the last k layers keep the run's init
    for record in updates:
        declared = record["declared"]
        state, sent = store.load(record), store.load(store.global_record(record["round"]))
        if record["partition_id"] in (0, 2):
            assert declared["defenses"] == "tldmi,clip,noise,prune,ldp"
            assert declared["noise-scale"] == 0.001 and declared["tldmi-public"] == "sample-fashion-mnist"
            assert declared["trainable"] == ["body.4.weight", "body.4.bias", "fc.weight", "fc.bias"]
            for key in ("body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"):
                assert torch.equal(state[key], sent[key])
            assert not torch.equal(state["fc.weight"], sent["fc.weight"])
        else:
            assert "defenses" not in declared
            assert not torch.equal(state["body.0.weight"], sent["body.0.weight"])
        assert record["trainable"] == [n for n, _ in Federation.from_config(config).build_model().named_parameters()]
    assert (run_dir / "tldmi-pretrain.json").exists()
    final = load_tensors(run_dir / "model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in final.values())
