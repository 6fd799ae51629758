"""What server and clients both derive from a config: the dataset, the shards and the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsim.config import FedsimConfig
from fedsim.datasets import ImageDataset, load_dataset, to_float
from fedsim.models import build_model, load_pretrained
from fedsim.shards import check_batch_size, partition, summary


@dataclass
class Federation:
    """The data and model a config describes; every process that builds it gets the same one."""

    config: FedsimConfig
    data: ImageDataset
    shards: list[np.ndarray]

    @classmethod
    def from_config(cls, config: FedsimConfig) -> Federation:
        data = load_dataset(config.dataset, config.data_dir, config.download, config.image_size)
        shards = partition(
            data.train_y, config.num_clients, config.partition, config.alpha, config.seed, config.examples_per_client
        )
        check_batch_size(shards, config.batch_size)
        return cls(config, data, shards)

    def build_model(self) -> nn.Module:
        """The initial global model: seeded, optionally loaded from a checkpoint."""
        model = build_model(self.config.model, self.data.input_shape, self.data.num_classes, seed=self.config.seed)
        if self.config.pretrained:
            load_pretrained(model, self.config.pretrained)
        return model

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


def device() -> torch.device:
    """CUDA when present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> dict[str, float]:
    """Test loss and accuracy of `model` on (x, y)."""
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
    return {"test-loss": loss / max(len(x), 1), "test-accuracy": correct / max(len(x), 1)}
