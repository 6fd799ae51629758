"""Client-side defenses against the curious server, as Flower ClientApp mods.

Every mod has Flower's Mod signature, `mod(msg, context, call_next) -> Message`: it lets the client
train (`call_next`), then changes the weights in the reply before they leave the client. Each mod
reads the run config (bound at construction, or `context.run_config` under `flwr run`) and acts only
when its defense is listed in `defenses` and this client's `partition-id` is in `defense-clients`
(empty = every client); otherwise it just calls `call_next`.

The *update* a defense changes is Δ = reply − global on the floating-point tensors of the state dict
(weights, biases and BatchNorm running statistics; integer counters such as `num_batches_tracked`
pass unchanged). Under TL-DMI only the tensors of the last k layers are in the update: the frozen
layers go back bit-identical to the global ones, noise included.

Order, as the reply passes through them (the registry `DEFENSES` holds them in this order;
`defense_mods` lists them the other way round, because Flower calls the first mod of the list first
and it therefore sees the reply last):

    tldmi -> clip -> noise -> prune -> ldp

TL-DMI first restores the frozen layers; clipping bounds the update's L2 norm before noise (the
Gaussian mechanism); pruning comes after noise so the reply keeps exactly p % zeros (pruning is
post-processing and keeps whatever privacy the noise gives); Flower's LocalDpMod is last and
clips and noises whatever update the others left.

Each mod declares itself in the reply's ConfigRecord "fedsim" (the curious server stores it in the
capture record's "declared"): "defenses" lists the ones applied, in order, with their parameters.

A defense is one DefenseMod subclass (its `name`, how it changes an update, what it declares) and
one line in `DEFENSES`; its name is in fedsim.config.DEFENSES and its keys are fields of FedsimConfig
(the config, in the core, validates runs before any client exists and cannot import this module).

Noise is drawn from the operating system's entropy, not from the run's `seed`: a noise the server
can regenerate from the run config would protect nothing. Runs with noise or ldp are therefore not
bit-reproducible.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod

from fedsim.config import FedsimConfig
from fedsim.privacy import local_dp_calibration

CallNext = Callable[[Message, Context], Message]


@functools.lru_cache(maxsize=4)
def _config_from_run(items: tuple) -> FedsimConfig:
    return FedsimConfig.from_run_config(dict(items))


@functools.lru_cache(maxsize=4)
def _tldmi_keys(config_toml: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """(state-dict keys of the last k layers, their trainable parameter names) for the run's model."""
    import tomllib

    from fedsim.federation import federation_for, freeze_for_tldmi, tldmi_trainable_keys

    config = FedsimConfig.from_mapping(tomllib.loads(config_toml))
    model = federation_for(config).build_model()
    keys = frozenset(tldmi_trainable_keys(model, config.tldmi_layers))
    return keys, tuple(freeze_for_tldmi(model, config.tldmi_layers))


def tldmi_keys(config: FedsimConfig) -> tuple[frozenset[str], tuple[str, ...]]:
    """TL-DMI's trainable state-dict keys and parameter names for `config`'s model (built once per process)."""
    return _tldmi_keys(config.to_toml())


def declare(reply: Message, defense: str, **params: object) -> None:
    """Add `defense` and its parameters to the reply's "fedsim" ConfigRecord (what the client says it did)."""
    if "fedsim" not in reply.content.config_records:
        reply.content["fedsim"] = ConfigRecord()
    record = reply.content["fedsim"]
    done = [name for name in str(record.get("defenses", "")).split(",") if name]
    record["defenses"] = ",".join([*done, defense])
    for key, value in params.items():
        record[key] = value


class DefenseMod:
    """Base of the defense mods: config lookup, selection of clients, the reply's declaration.

    A defense says how it changes an update (`change`) and what it declares (`declared`); the base
    applies the change to the defended tensors of the reply and adds the declaration.
    """

    name = ""

    def __init__(self, config: FedsimConfig | None = None) -> None:
        self.config = config

    def config_for(self, context: Context) -> FedsimConfig:
        return self.config or _config_from_run(tuple(sorted(context.run_config.items())))

    def __call__(self, msg: Message, context: Context, call_next: CallNext) -> Message:
        config = self.config_for(context)
        partition_id = int(context.node_config.get("partition-id", 0))
        if not config.defends(partition_id, self.name):
            return call_next(msg, context)
        sent = _single_arrays(msg)
        reply = call_next(msg, context)
        if reply.has_error() or sent is None or _single_arrays(reply) is None:
            return reply
        self.apply(reply, sent, config, partition_id)
        declare(reply, self.name, **self.declared(config))
        return reply

    def change(self, update: dict[str, torch.Tensor], config: FedsimConfig) -> dict[str, torch.Tensor]:
        """The defended update from the client's update {name: tensor}."""
        raise NotImplementedError

    def declared(self, config: FedsimConfig) -> dict[str, object]:
        """The parameters the client declares in its reply (the "fedsim" ConfigRecord)."""
        raise NotImplementedError

    def apply(self, reply: Message, sent: ArrayRecord, config: FedsimConfig, partition_id: int) -> None:
        """Replace the reply's weights by global + change(update) on the defended tensors; others stay."""
        keys = self.defended_keys(sent, config, partition_id)
        record_key, arrays = next(iter(reply.content.array_records.items()))
        global_w = {k: torch.from_numpy(np.array(sent[k].numpy(), copy=True)) for k in keys}
        update = {k: torch.from_numpy(np.array(arrays[k].numpy(), copy=True)) - global_w[k] for k in keys}
        update = self.change(update, config)
        out = {}
        for key in arrays:
            if key in update:
                out[key] = Array((global_w[key] + update[key].to(global_w[key].dtype)).numpy())
            else:
                out[key] = arrays[key]
        reply.content[record_key] = ArrayRecord(out)

    @staticmethod
    def defended_keys(sent: ArrayRecord, config: FedsimConfig, partition_id: int) -> list[str]:
        """The tensors whose update a defense changes: floating point, and under TL-DMI only the last k layers."""
        keys = [k for k in sent if np.issubdtype(np.dtype(sent[k].dtype), np.floating)]
        if config.defends(partition_id, "tldmi"):
            trainable, _ = tldmi_keys(config)
            keys = [k for k in keys if k in trainable]
        return keys


class ClipDefense(DefenseMod):
    """Scale the update so that its L2 norm (over all defended tensors together) is at most `clip-norm`."""

    name = "clip"

    def change(self, update, config):
        return clip_update(update, config.clip_norm)

    def declared(self, config):
        return {"clip-norm": config.clip_norm}


class NoiseDefense(DefenseMod):
    """Add i.i.d. Gaussian (std σ) or Laplace (scale b) noise of `noise-scale` to every entry of the update.

    The DLG paper adds noise of variance v to the *gradient*; the server derives the gradient as
    −Δ/lr, so noise of std σ on the update is gradient noise of variance (σ/lr)²: v = (σ/lr)².
    """

    name = "noise"

    def change(self, update, config):
        rng = np.random.default_rng()  # OS entropy: the server cannot regenerate it from the run config
        return add_noise(update, config.noise_type, config.noise_scale, rng)

    def declared(self, config):
        return {"noise-type": config.noise_type, "noise-scale": config.noise_scale}


class PruneDefense(DefenseMod):
    """Gradient pruning (DLG paper, sec. 5): per tensor, zero the `prune-percent` % smallest-magnitude entries."""

    name = "prune"

    def change(self, update, config):
        return prune_update(update, config.prune_percent)

    def declared(self, config):
        return {"prune-percent": config.prune_percent}


class LocalDpDefense(DefenseMod):
    """Local differential privacy with Flower's own `LocalDpMod`, on the defended tensors only.

    LocalDpMod clips the difference between the reply and the incoming arrays to `ldp-clip-norm`
    and adds Gaussian noise of std sensitivity·sqrt(2 ln(1.25/δ))/ε to every entry. The sensitivity
    is `ldp-clip-norm` (the L2 sensitivity of one clipped update). That classic bound is (ε, δ)-DP
    only for ε < 1; from ε = 1 (`ldp-calibration = auto`) the noise std is the analytic Gaussian
    mechanism's (fedsim.privacy), handed to LocalDpMod as the ε at which its formula gives that std.
    LocalDpMod would also clip and noise integer counters (and fail on them) and TL-DMI's frozen
    layers, so it is shown the defended tensors only: the others are set aside before it runs and
    put back, unchanged, after. LocalDpMod changes the update itself, around the client's training,
    so this mod replaces the base's `__call__`.
    """

    name = "ldp"

    def __call__(self, msg: Message, context: Context, call_next: CallNext) -> Message:
        config = self.config_for(context)
        partition_id = int(context.node_config.get("partition-id", 0))
        if not config.defends(partition_id, self.name) or _single_arrays(msg) is None:
            return call_next(msg, context)
        record_key = next(iter(msg.content.array_records))
        full = msg.content[record_key]
        keys = self.defended_keys(full, config, partition_id)
        aside: dict[str, ArrayRecord] = {}

        def inner(m: Message, c: Context) -> Message:
            m.content[record_key] = full  # the client trains on the whole model
            reply = call_next(m, c)
            if reply.has_error() or _single_arrays(reply) is None:
                return reply
            reply_key, arrays = next(iter(reply.content.array_records.items()))
            aside["reply"] = arrays
            reply.content[reply_key] = ArrayRecord({k: arrays[k] for k in keys})
            return reply

        dp = LocalDpMod(config.ldp_clip_norm, config.ldp_clip_norm, localdpmod_epsilon(config), config.ldp_delta)
        msg.content[record_key] = ArrayRecord({k: full[k] for k in keys})
        try:
            reply = dp(msg, context, inner)
        finally:
            msg.content[record_key] = full
        if reply.has_error() or "reply" not in aside:
            return reply
        reply_key, private = next(iter(reply.content.array_records.items()))
        arrays = aside["reply"]
        reply.content[reply_key] = ArrayRecord({k: private[k] if k in private else arrays[k] for k in arrays})
        declare(reply, self.name, **self.declared(config))
        return reply

    def declared(self, config):
        return {
            "ldp-epsilon": config.ldp_epsilon,
            "ldp-delta": config.ldp_delta,
            "ldp-clip-norm": config.ldp_clip_norm,
            "ldp-noise-std": ldp_noise_std(config),
            "ldp-calibration": ldp_calibration(config),
        }


class TldmiDefense(DefenseMod):
    """TL-DMI (Ho et al., CVPR 2024), client side: only the last `tldmi-layers` layers leave the client changed.

    The client app freezes the early layers before training (requires_grad False, eval mode); this mod
    then puts the global arrays back for every tensor outside the last k layers, integer counters
    included, so the server sees exactly zero update there whatever happened during training.
    """

    name = "tldmi"

    def apply(self, reply, sent, config, partition_id):
        trainable_keys, _ = tldmi_keys(config)
        record_key, arrays = next(iter(reply.content.array_records.items()))
        reply.content[record_key] = ArrayRecord({k: arrays[k] if k in trainable_keys else sent[k] for k in arrays})

    def declared(self, config):
        _, trainable_params = tldmi_keys(config)
        return {
            "tldmi-layers": config.tldmi_layers,
            "tldmi-public": config.tldmi_public,
            "public-classes": config.public_classes,
            "tldmi-finetune": config.tldmi_finetune,
            "trainable": list(trainable_params),
        }


DEFENSES: tuple[type[DefenseMod], ...] = (TldmiDefense, ClipDefense, NoiseDefense, PruneDefense, LocalDpDefense)
"""Every defense, in the order they change a reply (the innermost mod first); its names are fedsim.config's."""


class CentralDpClipping(DefenseMod):
    """The client's half of central DP with client-side clipping: Flower's `fixedclipping_mod` or
    `adaptiveclipping_mod`, with the norm the server's DP wrapper sends. It acts last, on every client,
    when `central-dp` is client-fixed or adaptive-client (it is the server's DP, not a client's choice)."""

    MODS = {"client-fixed": fixedclipping_mod, "adaptive-client": adaptiveclipping_mod}

    def __call__(self, msg: Message, context: Context, call_next: CallNext) -> Message:
        mod = self.MODS.get(self.config_for(context).central_dp)
        return call_next(msg, context) if mod is None else mod(msg, context, call_next)


def defense_mods(config: FedsimConfig | None = None) -> list[DefenseMod]:
    """Every defense mod, in Flower's `mods=[...]` order (the first wraps all others, so it acts last).

    All are installed in every client; each one checks the run config and passes through when its
    defense is off for this client.
    """
    return [defense(config) for defense in reversed(DEFENSES)]


# --- the transformations, on an update {name: tensor} ------------------------------------------


def update_norm(update: dict[str, torch.Tensor]) -> float:
    """L2 norm of an update, all tensors flattened together."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


def clip_update(update: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    norm = update_norm(update)
    if norm <= max_norm:
        return update
    scale = max_norm / norm
    return {k: (t.double() * scale).to(t.dtype) for k, t in update.items()}


def add_noise(
    update: dict[str, torch.Tensor], kind: str, scale: float, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    if scale == 0:
        return update
    draw = rng.normal if kind == "gaussian" else rng.laplace
    return {k: t + torch.from_numpy(draw(0.0, scale, tuple(t.shape))).to(t.dtype) for k, t in update.items()}


def prune_update(update: dict[str, torch.Tensor], percent: float) -> dict[str, torch.Tensor]:
    """Per tensor, set the round(p·n/100) entries of smallest magnitude to zero (ties broken by position)."""
    out = {}
    for key, t in update.items():
        count = int(round(percent / 100.0 * t.numel()))
        flat = t.flatten().clone()
        if count > 0:
            flat[torch.topk(flat.abs(), count, largest=False, sorted=False).indices] = 0
        out[key] = flat.view_as(t)
    return out


def ldp_noise_std(config: FedsimConfig) -> float:
    """The std of the local DP noise: the classic sensitivity·sqrt(2 ln(1.25/δ))/ε (sensitivity = ldp-clip-norm),
    or the analytic Gaussian mechanism's std where `ldp-calibration` picks it."""
    return _calibration(config)[1]


def ldp_calibration(config: FedsimConfig) -> str:
    """Which bound calibrates the local DP noise: "classic" or "analytic-gaussian"."""
    return _calibration(config)[0]


def localdpmod_epsilon(config: FedsimConfig) -> float:
    """The ε to give LocalDpMod so that its classic formula adds noise of std `ldp_noise_std`."""
    return config.ldp_clip_norm * math.sqrt(2 * math.log(1.25 / config.ldp_delta)) / ldp_noise_std(config)


def _calibration(config: FedsimConfig) -> tuple[str, float]:
    return local_dp_calibration(config.ldp_epsilon, config.ldp_delta, config.ldp_clip_norm, config.ldp_calibration)


def _single_arrays(msg: Message) -> ArrayRecord | None:
    if not msg.has_content() or len(msg.content.array_records) != 1:
        return None
    return next(iter(msg.content.array_records.values()))
