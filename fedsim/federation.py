"""What server and clients both derive from a config: the dataset, the shards and the model."""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsim.config import FedsimConfig
from fedsim.datasets import LOADERS, ImageDataset, load_dataset, split_classes, to_float
from fedsim.errors import FedsimError
from fedsim.imprint import imprinted
from fedsim.models import build_model, load_pretrained
from fedsim.shards import check_batch_size, partition, summary
from fedsim.trap import first_linear


@dataclass
class Federation:
    """The data and model a config describes; every process that builds it gets the same one."""

    config: FedsimConfig
    data: ImageDataset
    shards: list[np.ndarray]
    public: ImageDataset | None = None  # the classes `public-classes` sets aside (never in a shard)

    @classmethod
    def from_config(cls, config: FedsimConfig) -> Federation:
        data = load_dataset(config.dataset, config.data_dir, config.download, config.image_size)
        public = None
        if config.public_class_list():
            public, data = split_classes(data, config.public_class_list())
        shards = partition(
            data.train_y, config.num_clients, config.partition, config.alpha, config.seed, config.examples_per_client
        )
        check_batch_size(shards, config.batch_size)
        fed = cls(config, data, shards, public)
        if "tldmi" in config.defense_list() and config.tldmi_public in LOADERS:
            fed.public_data()  # a missing public dataset is refused here, before any training
        return fed

    def build_model(self) -> nn.Module:
        """The initial global model: seeded, optionally loaded from a checkpoint."""
        model = build_model(self.config.model, self.data.input_shape, self.data.num_classes, seed=self.config.seed)
        if self.config.pretrained:
            load_pretrained(model, self.config.pretrained)
        if self.config.server_mode == "imprint":  # the cheating server's architecture, which the clients run too
            model = imprinted(model, self.data.input_shape, self.config.imprint_bins)
        if self.config.server_mode == "trap":  # architecture unchanged: refuse a model without a first linear layer
            first_linear(model, self.data.input_shape)
        if "tldmi" in self.config.defense_list():
            tldmi_layers(model, self.config.tldmi_layers)  # refuses a k deeper than the model
        return model

    # --- TL-DMI: the public data and the server's pre-training of the early layers -----------
    def public_data(self) -> ImageDataset:
        """TL-DMI's public dataset, resized and converted to the private data's channels (or the public classes)."""
        cfg = self.config
        if self.public is not None and not cfg.tldmi_public:
            return self.public
        c, h, w = self.data.input_shape
        public = load_dataset(cfg.tldmi_public, cfg.data_dir, cfg.download, h if h == w else 0)
        if public.input_shape[1:] != (h, w):
            raise FedsimError(
                f"tldmi-public = {cfg.tldmi_public!r} has images of {public.input_shape[1]}x{public.input_shape[2]}; "
                f"the clients' are {h}x{w} (set image-size to a common side length)"
            )
        return ImageDataset(
            public.name,
            _to_channels(public.train_x, c),
            public.train_y,
            _to_channels(public.test_x, c),
            public.test_y,
            public.classes,
            public.notes,
        )

    def pretrain_public(self, model: nn.Module) -> dict:
        """TL-DMI (Ho et al., CVPR 2024), server side: pre-train `model` on the public data, in place.

        A model of the same architecture with the public dataset's class count is trained (all layers,
        Adam 1e-3, batch 64, seeded) for `tldmi-pretrain-epochs` epochs; the public data is `tldmi-public`
        or, with `public-classes`, those classes of the clients' own dataset. With a checkpoint path as
        `tldmi-public` it is loaded instead. Then the tensors of the early layers, the ones the clients
        keep frozen, are copied into `model`; the last `tldmi-layers` keep the run's own initialisation, or with
        `tldmi-finetune` all but the output layer start from the pre-trained weights too (the paper's fine-tuning).
        Returns the public training loss, test accuracy and, per epoch, the public test accuracy.
        """
        cfg = self.config
        restart = 1 if cfg.tldmi_finetune else cfg.tldmi_layers  # the layers that keep the seeded initialisation
        early = set(model.state_dict()) - set(tldmi_trainable_keys(model, restart))
        if cfg.tldmi_public and cfg.tldmi_public not in LOADERS:
            source = build_model(cfg.model, self.data.input_shape, self.data.num_classes, seed=cfg.seed)
            missing = set(load_pretrained(source, cfg.tldmi_public))
            model.load_state_dict(
                {k: v for k, v in source.state_dict().items() if k in early and k not in missing}, strict=False
            )
            return {}
        public = self.public_data()
        dev = device()
        source = build_model(cfg.model, public.input_shape, public.num_classes, seed=cfg.seed).to(dev)
        source.load_state_dict(
            {k: v for k, v in model.state_dict().items() if source.state_dict()[k].shape == v.shape}, strict=False
        )
        x, y = to_float(public.train_x), public.train_y
        test_x, test_y = to_float(public.test_x), public.test_y
        rng = np.random.default_rng([cfg.seed, 0x7D41])
        optimizer = torch.optim.Adam(source.parameters(), lr=1e-3)
        loss_sum, seen, curve = 0.0, 0, []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            for _ in range(cfg.tldmi_pretrain_epochs):
                source.train()
                loss_sum, seen = 0.0, 0  # the last epoch's mean training loss
                order = torch.from_numpy(rng.permutation(len(x)))
                for start in range(0, len(x), 64):
                    idx = order[start : start + 64]
                    loss = nn.functional.cross_entropy(source(x[idx].to(dev)), y[idx].to(dev))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss_sum, seen = loss_sum + loss.item() * len(idx), seen + len(idx)
                curve.append(evaluate(source, test_x, test_y)["test-accuracy"])
        own = model.state_dict()
        model.load_state_dict(
            {k: v.cpu() for k, v in source.state_dict().items() if k in early and own[k].shape == v.shape},
            strict=False,
        )
        metrics = evaluate(source, test_x, test_y)
        return {
            "public-data": public.name,
            "public-train-loss": loss_sum / max(seen, 1),
            "public-test-accuracy": metrics["test-accuracy"],
            "public-test-accuracy-per-epoch": curve,
        }

    def shard(self, partition_id: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Client `partition_id`'s private images (float, [0, 1]), labels and dataset indices."""
        idx = self.shards[partition_id]
        return to_float(self.data.train_x[idx]), self.data.train_y[idx], idx

    def test_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.test_x, self.data.test_y
        if self.config.eval_examples:
            x, y = x[: self.config.eval_examples], y[: self.config.eval_examples]
        return to_float(x), y

    def summary(self) -> list[dict]:
        return summary(self.shards, self.data.train_y, self.data.num_classes)


@functools.lru_cache(maxsize=2)
def _federation(config_toml: str) -> Federation:
    return Federation.from_config(FedsimConfig.from_mapping(tomllib.loads(config_toml)))


def federation_for(config: FedsimConfig) -> Federation:
    """The federation of `config`, built once per process (a Ray actor serves many clients)."""
    return _federation(config.to_toml())


def tldmi_layers(model: nn.Module, k: int | None = None) -> list[str]:
    """The model's layers, or with `k` the names of the last k (the layers TL-DMI's clients train).

    A layer is a module that owns parameters directly (Conv2d, Linear, BatchNorm, ...), in the order
    the model registers its modules, which for every model in the zoo is the forward order.
    """
    names = [name for name, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    if k is None:
        return names
    if not 1 <= k <= len(names):
        raise FedsimError(
            f"tldmi-layers = {k} must be in 1..{len(names)}: {type(model).__name__} has {len(names)} layers "
            f"(modules with parameters), the last being {', '.join(reversed(names[-3:]))}"
        )
    return names[-k:]


def tldmi_trainable_keys(model: nn.Module, k: int) -> list[str]:
    """State-dict keys (parameters and buffers) of the last k layers, in state-dict order."""
    layers = set(tldmi_layers(model, k))
    return [key for key in model.state_dict() if key.rpartition(".")[0] in layers]


def freeze_for_tldmi(model: nn.Module, k: int) -> list[str]:
    """Freeze every layer but the last k (requires_grad False); returns the trainable parameter names.

    Frozen modules are marked so that training keeps them in eval mode: a frozen BatchNorm does
    not move its running statistics either, so a frozen layer comes back exactly as it was sent.
    """
    trainable = set(tldmi_layers(model, k))
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and name not in trainable:
            for p in own:
                p.requires_grad_(False)
            module.fedsim_frozen = True
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 images with `channels` channels: grey repeated to RGB, RGB averaged to grey."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.repeat(1, channels, 1, 1)
    if channels == 1:
        return x.float().mean(1, keepdim=True).round().to(torch.uint8)
    raise FedsimError(f"cannot convert {x.shape[1]}-channel public images to {channels} channels")


def device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> dict[str, float | None]:
    """Test loss and accuracy of `model` on (x, y), and how many examples: None for both when there are none."""
    if len(x) == 0:
        return {"test-loss": None, "test-accuracy": None, "test-examples": 0}
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size].to(dev), y[start : start + batch_size].to(dev)
        out = model(xb)
        loss += nn.functional.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    model.train(was_training)
    return {"test-loss": loss / len(x), "test-accuracy": correct / len(x), "test-examples": len(x)}
