"""HTML pages from the Jinja2 templates in fedsim/app/templates/, every value escaped, and what a page says of a run."""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from fedsim.errors import FedsimError

LEGEND = (
    "How to read: PSNR above about 30 dB: visually identical; below about 15 dB: nothing recognisable. "
    "SSIM 1 = identical, 0 = unrelated."
)
DATASET_NAMES = {
    "sample-mnist": "MNIST digits",
    "mnist": "MNIST digits",
    "sample-fashion-mnist": "Fashion-MNIST",
    "fashion-mnist": "Fashion-MNIST",
    "sample-cifar10": "CIFAR-10",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "lfw": "LFW faces",
    "olivetti": "Olivetti faces",
    "orl": "ORL faces",
    "imagefolder": "your own photos",
}
MODEL_NAMES = {"lenet-dlg": "LeNet", "lenet5": "LeNet-5", "convnet": "ConvNet", "mlp": "MLP", "resnet20": "ResNet-20"}
STRATEGY_NAMES = {
    "fedavg": "FedAvg",
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "fedmedian": "FedMedian",
    "krum": "Krum",
}

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("fedsim.app", "templates"),
    autoescape=True,  # client replies and files on disk reach the page: every value is text, never markup
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.globals["legend"] = LEGEND


def render(template: str, **values) -> str:
    return _ENV.get_template(template).render(**values)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def figure(data: bytes, mime: str, alt: str, caption: str = "", picture: bool = False, plot: bool = False) -> dict:
    """An embedded image for the templates; `picture` marks an image of data (shown with crisp pixels)."""
    return {"src": data_uri(data, mime), "alt": alt, "caption": caption, "picture": picture, "plot": plot}


@dataclass
class RunFacts:
    """What a page says of a run beyond its results: the run in words, class names, whether accuracy means anything."""

    description: str = ""
    classes: list[str] = field(default_factory=list)
    has_test_split: bool | None = None  # None: unknown (the data is not here), so accuracy is shown as recorded

    def label(self, value) -> str:
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.classes):
            return self.classes[value]
        return str(value)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe(config) -> str:
    """E.g. "3 clients, 3 rounds of FedAvg on CIFAR-10, ConvNet"."""
    training = STRATEGY_NAMES.get(config.strategy, config.strategy)
    if config.recipe == "fedsgd":  # one gradient per client: the batch size is what the attack faces
        training = f"FedSGD (batch {config.batch_size})" + ("" if config.strategy == "fedavg" else f", {training}")
    words = (
        f"{_plural(config.num_clients, 'client')}, {_plural(config.num_rounds, 'round')} of {training} on "
        f"{DATASET_NAMES.get(config.dataset, config.dataset)}, {MODEL_NAMES.get(config.model, config.model)}"
    )
    defenses = [d.strip() for d in str(getattr(config, "defenses", "")).split(",") if d.strip()]
    return words + (f"; clients defend with {', '.join(defenses)}" if defenses else "")


def run_facts(run_dir: Path) -> RunFacts:
    """The run's config.toml and, where its data is on this machine, the dataset's class names and test split."""
    from fedsim.config import FedsimConfig
    from fedsim.datasets import load_dataset, split_classes

    try:
        config = FedsimConfig.from_toml(run_dir / "config.toml")
    except (FedsimError, OSError):
        return RunFacts()
    facts = RunFacts(describe(config))
    try:
        data = load_dataset(config.dataset, config.data_dir, False, config.image_size)
        if config.public_class_list():  # the clients' classes, relabelled as the run saw them
            data = split_classes(data, config.public_class_list())[1]
    except (FedsimError, OSError):
        return facts
    facts.classes = [str(c) for c in data.classes]
    facts.has_test_split = len(data.test_y) > 0
    return facts


def finite(value) -> float | None:
    """A number for the page, or None where it is missing, not a number or infinite."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
