"""The model zoo: every architecture adapts to a dataset's input shape and class count."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedsim.errors import FedsimError

InputShape = tuple[int, int, int]


def _flat_features(body: nn.Module, input_shape: InputShape) -> int:
    """Number of features `body` produces for one input of `input_shape`."""
    with torch.no_grad():
        return int(body(torch.zeros(1, *input_shape)).flatten(1).shape[1])


class LeNetDLG(nn.Module):
    """The LeNet of Zhu et al. (DLG, NeurIPS 2019): sigmoid, three 5x5 convs of 12 channels, one FC.

    Weights and biases are drawn from U(-0.5, 0.5) as in the paper's code; this
    initialisation is what makes the gradient so informative for DLG.
    """

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        channels = input_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
        )
        self.fc = nn.Linear(_flat_features(self.body, input_shape), num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.uniform_(module.weight, -0.5, 0.5)
                nn.init.uniform_(module.bias, -0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class LeNet5(nn.Module):
    """LeNet-5 as used by GRNN (Ren et al., ACM TIST 2022): sigmoid activations and max-pooling."""

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        channels = input_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, padding=2),
            nn.Sigmoid(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5),
            nn.Sigmoid(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(
            nn.Linear(_flat_features(self.body, input_shape), 120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class ConvNet(nn.Module):
    """A small ReLU ConvNet that trains well: the model for realistic federated training."""

    def __init__(self, input_shape: InputShape, num_classes: int, width: int = 32) -> None:
        super().__init__()
        channels = input_shape[0]
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.fc = nn.Sequential(
            nn.Linear(2 * width * 16, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
        # He initialisation: with PyTorch's default, plain SGD sits on a plateau for hundreds of steps.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class MLP(nn.Module):
    """A multi-layer perceptron whose first layer is fully connected with bias.

    The analytic attack reconstructs its inputs exactly: the physical limit of gradient leakage.
    """

    def __init__(self, input_shape: InputShape, num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        c, h, w = input_shape
        self.fc = nn.Sequential(
            nn.Linear(c * h * w, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class _BasicBlock(nn.Module):
    """ResNet basic block with the parameter-free "option A" shortcut of He et al. (2016), sec. 4.2."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else 0

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pad:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 (He et al. 2016), layer names as in akamaster/pytorch_resnet_cifar10.

    Inputs are images in [0, 1]; the ImageNet normalisation that the public checkpoint was
    trained with is applied inside the model, so every model in the zoo sees the same data.
    """

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, input_shape: InputShape, num_classes: int) -> None:
        super().__init__()
        channels = input_shape[0]
        mean = self.MEAN if channels == 3 else (0.5,) * channels
        std = self.STD if channels == 3 else (0.25,) * channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(*[_BasicBlock(16, 16, 1) for _ in range(3)])
        self.layer2 = nn.Sequential(_BasicBlock(16, 32, 2), _BasicBlock(32, 32, 1), _BasicBlock(32, 32, 1))
        self.layer3 = nn.Sequential(_BasicBlock(32, 64, 2), _BasicBlock(64, 64, 1), _BasicBlock(64, 64, 1))
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


MODELS: dict[str, Callable[[InputShape, int], nn.Module]] = {
    "lenet-dlg": LeNetDLG,
    "lenet5": LeNet5,
    "convnet": ConvNet,
    "mlp": MLP,
    "resnet20": ResNet20,
}


def build_model(name: str, input_shape: InputShape, num_classes: int, seed: int | None = None) -> nn.Module:
    """Build model `name` for inputs of `input_shape` (C, H, W) and `num_classes` classes.

    With a seed, the initial weights are the same on every machine and in every process.
    """
    if name not in MODELS:
        raise FedsimError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    if seed is None:
        return MODELS[name](tuple(input_shape), num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](tuple(input_shape), num_classes)


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load a checkpoint into `model`, skipping tensors whose shape does not fit.

    Accepts a safetensors file or a torch checkpoint (loaded with weights_only=True, never
    unpickling code), with or without a DataParallel `module.` prefix or a `state_dict` key.
    Returns the names of the model's tensors that kept their own initialisation.
    """
    path = Path(path)
    if path.is_dir():
        candidates = sorted([*path.glob("*.safetensors"), *path.glob("*.th"), *path.glob("*.pt"), *path.glob("*.pth")])
        if not candidates:
            raise FedsimError(f"no checkpoint (.safetensors, .th, .pt, .pth) in {path}")
        path = candidates[0]
    if not path.exists():
        raise FedsimError(f"checkpoint {path} does not exist; give the path of a .safetensors or .th file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt or code-carrying file: refuse, never unpickle
            raise FedsimError(f"cannot read checkpoint {path} as plain tensors: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise FedsimError(f"checkpoint {path} has no tensor that fits {type(model).__name__}")
    model.load_state_dict(fitting, strict=False)
    # BatchNorm's step counter is bookkeeping that older checkpoints lack; it is not a weight.
    return [k for k in own if k not in fitting and not k.endswith("num_batches_tracked")]
