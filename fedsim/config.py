"""One typed run configuration, shared by `fedsim run`, `flwr run` and the apps."""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedsim.errors import FedsimError

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "krum")
RECIPES = ("fedavg", "fedsgd")
PARTITIONS = ("iid", "dirichlet")


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


@dataclass
class FedsimConfig:
    """Every key of a fedsim run. Keys are written with dashes everywhere (TOML, `--set`, Flower run config)."""

    # What is learned, from what
    dataset: str = field(default="sample-mnist", metadata={"help": "dataset name (see `fedsim datasets`)"})
    data_dir: str = field(default="data", metadata={"help": "folder with local copies of datasets"})
    download: bool = field(
        default=False, metadata={"help": "download torchvision datasets that are missing (needs internet)"}
    )
    image_size: int = field(
        default=0, metadata={"help": "resize images to this side length; 0 keeps the dataset's size"}
    )
    model: str = field(default="convnet", metadata={"help": "model architecture (see `fedsim models`)"})
    pretrained: str = field(
        default="", metadata={"help": "checkpoint to load into the initial global model ('' = none)"}
    )
    # The federation
    num_clients: int = field(default=3, metadata={"help": "number of clients (SuperNodes)"})
    num_rounds: int = field(default=3, metadata={"help": "number of federated rounds"})
    fraction_train: float = field(default=1.0, metadata={"help": "share of clients sampled each round"})
    partition: str = field(default="iid", metadata={"help": "how the training set is split", **_choice(*PARTITIONS)})
    alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration for partition = dirichlet (> 0)"})
    examples_per_client: int = field(
        default=0, metadata={"help": "keep only this many examples per shard; 0 keeps all"}
    )
    seed: int = field(default=0, metadata={"help": "seed of shards, initial model, batches and attacks"})
    # The server's strategy
    strategy: str = field(default="fedavg", metadata={"help": "aggregation strategy", **_choice(*STRATEGIES)})
    proximal_mu: float = field(default=0.01, metadata={"help": "FedProx proximal term weight"})
    server_lr: float = field(default=0.01, metadata={"help": "server learning rate (FedAdam's eta)"})
    num_malicious: int = field(default=0, metadata={"help": "Krum's assumed number of malicious clients"})
    # The clients' local recipe
    recipe: str = field(default="fedavg", metadata={"help": "local training recipe", **_choice(*RECIPES)})
    lr: float = field(default=0.1, metadata={"help": "client SGD learning rate"})
    batch_size: int = field(default=32, metadata={"help": "client batch size (FedSGD: examples behind one gradient)"})
    local_epochs: int = field(default=2, metadata={"help": "FedAvg local epochs"})
    # What the curious server keeps, and where
    capture: bool = field(default=True, metadata={"help": "write every client update to the capture store"})
    save_truth: bool = field(
        default=False, metadata={"help": "simulation only: clients record the examples they trained on, for scoring"}
    )
    out_dir: str = field(default="runs", metadata={"help": "folder that receives runs/<run-id>/"})
    run_name: str = field(default="", metadata={"help": "name of the run folder; '' = time stamp and seed"})
    eval_examples: int = field(
        default=0, metadata={"help": "test examples for the global accuracy; 0 = the whole test split"}
    )
    # Attacks the run ends with (`fedsim attack` does the same on a finished run)
    attacks: str = field(
        default="", metadata={"help": "comma-separated gradient-inversion attacks to run on the captures at the end"}
    )
    # Resources
    client_num_cpus: float = field(default=1.0, metadata={"help": "CPUs per client actor"})
    client_num_gpus: float = field(default=0.0, metadata={"help": "GPU fraction per client actor (0 = CPU only)"})

    # --- conversions -------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        """The dashed keys, in declaration order."""
        return [f.name.replace("_", "-") for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: dict[str, Any], base: FedsimConfig | None = None) -> FedsimConfig:
        """Build a config from dashed keys, refusing unknown keys and values of the wrong type."""
        config = dataclasses.replace(base) if base is not None else cls()
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        for key, value in values.items():
            if key not in by_key:
                raise FedsimError(_unknown_key_message(key, list(by_key)))
            f = by_key[key]
            setattr(config, f.name, _coerce(key, value, type(getattr(cls(), f.name))))
        config.validate()
        return config

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> FedsimConfig:
        """Build a config from a Flower run config (`context.run_config`)."""
        return cls.from_mapping(dict(run_config))

    def to_mapping(self) -> dict[str, Any]:
        """The dashed-key form: what `[tool.flwr.app.config]` and `config.toml` hold."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        """Refuse values that cannot work, naming the key and what is allowed."""
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                key = f.name.replace("_", "-")
                raise FedsimError(
                    f"{key} = {getattr(self, f.name)!r} is not allowed; choose one of: {', '.join(allowed)}"
                )
        from fedsim.datasets import LOADERS
        from fedsim.models import MODELS

        if self.dataset not in LOADERS:
            raise FedsimError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(LOADERS)}")
        if self.model not in MODELS:
            raise FedsimError(f"unknown model {self.model!r}; choose one of: {', '.join(MODELS)}")
        positive = {
            "num-clients": self.num_clients,
            "num-rounds": self.num_rounds,
            "batch-size": self.batch_size,
            "local-epochs": self.local_epochs,
        }
        for key, value in positive.items():
            if value < 1:
                raise FedsimError(f"{key} = {value} must be at least 1")
        if self.alpha <= 0:
            raise FedsimError(f"alpha = {self.alpha} must be > 0 (Dirichlet concentration; small = more label skew)")
        if not 0 < self.fraction_train <= 1:
            raise FedsimError(f"fraction-train = {self.fraction_train} must be in (0, 1]")
        if self.lr <= 0:
            raise FedsimError(f"lr = {self.lr} must be > 0")
        for key, value in {
            "image-size": self.image_size,
            "examples-per-client": self.examples_per_client,
            "eval-examples": self.eval_examples,
            "num-malicious": self.num_malicious,
            "proximal-mu": self.proximal_mu,
            "client-num-gpus": self.client_num_gpus,
        }.items():
            if value < 0:
                raise FedsimError(f"{key} = {value} must be >= 0")
        if self.client_num_cpus <= 0:
            raise FedsimError(f"client-num-cpus = {self.client_num_cpus} must be > 0")
        if self.server_lr <= 0:
            raise FedsimError(f"server-lr = {self.server_lr} must be > 0")

    # --- files ---------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path, base: FedsimConfig | None = None) -> FedsimConfig:
        """Read a config file: flat dashed keys, or a pyproject.toml's `[tool.flwr.app.config]`."""
        path = Path(path)
        if not path.is_file():
            raise FedsimError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise FedsimError(f"config file {path} is not valid TOML: {exc}") from None
        if "tool" in data:
            data = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
        return cls.from_mapping(data, base=base)

    def to_toml(self) -> str:
        """The config as a TOML document that `fedsim run --config` reads back."""
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, str):
                text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                text = repr(value)
            lines.append(f"{f.name.replace('_', '-')} = {text}")
        return "\n".join(lines) + "\n"


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Parse `key=value` pairs, values read as TOML (so 0.1 is a float and true a bool; bare words are strings)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise FedsimError(f"--set {pair!r} must look like key=value, e.g. --set num-rounds=5")
        key, raw = (part.strip() for part in pair.split("=", 1))
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw
    return values


def _unknown_key_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown config key {key!r}{hint}; known keys: {', '.join(known)}"


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise FedsimError(f"{key} = {value!r} must be {names[kind]}")
