"""One typed run configuration, shared by `fedsim run`, `flwr run` and the apps."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedsim.errors import FedsimError
from fedsim.privacy import CENTRAL_DP, MAX_NOISE_MULTIPLIER, noise_for_epsilon

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "krum")
RECIPES = ("fedavg", "fedsgd")
PARTITIONS = ("iid", "dirichlet")
DEFENSES = ("noise", "clip", "ldp", "prune", "tldmi")
"""The client-side defenses a run may name; clients/defenses.py holds them, in the order clients apply them."""
NOISE_TYPES = ("gaussian", "laplace")
SERVER_MODES = ("curious", "imprint", "trap")
"""curious: honest-but-curious; imprint: a server that tampers with the model's architecture; trap: one that sets
trap weights in its first fully connected layer, architecture unchanged (docs/malicious_server.md)."""


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_run_name(name: str) -> str:
    """A run name is one safe folder name (letters, digits, '.', '_', '-'): it can never climb out of out-dir."""
    if not RUN_NAME.fullmatch(name):
        raise FedsimError(
            f"run-name = {name[:80]!r} must be one folder name of letters, digits, '.', '_' and '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return name


LDP_CALIBRATIONS = ("auto", "classic", "analytic")

CLASS_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def parse_classes(text: str) -> list[int]:
    """The sorted class labels of a list such as "0-4" or "0,2,5-7" (FedsimError if malformed or repeated)."""
    spec = text.replace(" ", "")
    if not spec:
        return []
    if not CLASS_LIST.fullmatch(spec):
        raise FedsimError(f"public-classes = {text[:80]!r} must list class labels and ranges, e.g. '0-4' or '0,2,5-7'")
    labels: list[int] = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if last < first or last > 100_000:
            raise FedsimError(f"public-classes: range {part!r} must run low-high, below 100000")
        labels.extend(range(first, last + 1))
    if len(set(labels)) != len(labels):
        raise FedsimError(f"public-classes = {text[:80]!r} names a class twice")
    return sorted(labels)


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


@dataclass(frozen=True)
class Range:
    """Where a float key's value may lie. Every float key is also finite: NaN and infinity are refused."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            bound = f"{'>' if self.low_open else '>='} {self.low:g}" if self.low > -math.inf else "any number"
        else:
            bound = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return bound + (f" ({self.why})" if self.why else "")


POSITIVE = Range(0.0, low_open=True)
NON_NEGATIVE = Range(0.0)


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
    public_classes: str = field(
        default="",
        metadata={
            "help": "classes of the dataset set aside as public (e.g. '0-4'): no client holds them, the test split "
            "leaves them out, the others are relabelled 0..; TL-DMI pre-trains on them ('' = none)"
        },
    )
    model: str = field(default="convnet", metadata={"help": "model architecture (see `fedsim models`)"})
    pretrained: str = field(
        default="", metadata={"help": "checkpoint to load into the initial global model ('' = none)"}
    )
    # The federation
    # 2, as many as the SuperNodes of Flower's default simulation: a bare `flwr run .` trains.
    num_clients: int = field(default=2, metadata={"help": "number of clients (SuperNodes)"})
    num_rounds: int = field(default=3, metadata={"help": "number of federated rounds"})
    fraction_train: float = field(
        default=1.0, metadata={"help": "share of clients sampled each round", "range": Range(0.0, 1.0, low_open=True)}
    )
    partition: str = field(default="iid", metadata={"help": "how the training set is split", **_choice(*PARTITIONS)})
    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Dirichlet concentration for partition = dirichlet (> 0)",
            "range": Range(0.0, low_open=True, why="Dirichlet concentration; small = more label skew"),
        },
    )
    examples_per_client: int = field(
        default=0, metadata={"help": "keep only this many examples per shard; 0 keeps all"}
    )
    seed: int = field(default=0, metadata={"help": "seed of shards, initial model, batches and attacks"})
    # The server's strategy
    strategy: str = field(default="fedavg", metadata={"help": "aggregation strategy", **_choice(*STRATEGIES)})
    proximal_mu: float = field(default=0.01, metadata={"help": "FedProx proximal term weight", "range": NON_NEGATIVE})
    server_lr: float = field(default=0.01, metadata={"help": "server learning rate (FedAdam's eta)", "range": POSITIVE})
    num_malicious: int = field(default=0, metadata={"help": "Krum's assumed number of malicious clients"})
    # The clients' local recipe
    recipe: str = field(default="fedavg", metadata={"help": "local training recipe", **_choice(*RECIPES)})
    lr: float = field(default=0.1, metadata={"help": "client SGD learning rate", "range": POSITIVE})
    batch_size: int = field(default=32, metadata={"help": "client batch size (FedSGD: examples behind one gradient)"})
    local_epochs: int = field(default=2, metadata={"help": "FedAvg local epochs"})
    # What the curious server keeps, and where
    capture: bool = field(default=True, metadata={"help": "write every client update to the capture store"})
    capture_policy: str = field(
        default="all",
        metadata={
            "help": "which updates to capture: all, a seeded sample (capture-fraction), or capture-partitions",
            **_choice("all", "sample", "partitions"),
        },
    )
    capture_fraction: float = field(
        default=1.0,
        metadata={
            "help": "capture-policy = sample: share of each round's replies captured (seeded by seed and round)",
            "range": Range(0.0, 1.0, low_open=True),
        },
    )
    capture_partitions: str = field(
        default="", metadata={"help": "capture-policy = partitions: comma-separated partition ids, e.g. '0,3,7'"}
    )
    capture_dtype: str = field(
        default="float32",
        metadata={
            "help": "precision of captured updates; float16 halves the disk (stored relative to the global weights)",
            **_choice("float32", "float16"),
        },
    )
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
    # Client-side defenses (clients/defenses.py; docs/defenses.md)
    defenses: str = field(
        default="",
        metadata={"help": f"comma-separated client defenses: {', '.join(DEFENSES)} ('' = none)"},
    )
    defense_clients: str = field(
        default="", metadata={"help": "comma-separated partition ids that apply the defenses ('' = every client)"}
    )
    noise_type: str = field(
        default="gaussian", metadata={"help": "distribution of the update noise", **_choice(*NOISE_TYPES)}
    )
    noise_scale: float = field(
        default=0.01,
        metadata={
            "help": "noise on the update: Gaussian std sigma or Laplace scale b (DLG's variance = (sigma/lr)^2)",
            "range": Range(0.0, why="Gaussian std or Laplace scale"),
        },
    )
    clip_norm: float = field(
        default=1.0, metadata={"help": "L2 bound of the update (client - global weights)", "range": POSITIVE}
    )
    ldp_epsilon: float = field(
        default=1.0, metadata={"help": "local DP epsilon (Flower's LocalDpMod)", "range": POSITIVE}
    )
    ldp_delta: float = field(
        default=1e-5,
        metadata={"help": "local DP delta, in (0, 1)", "range": Range(0.0, 1.0, low_open=True, high_open=True)},
    )
    ldp_clip_norm: float = field(
        default=1.0,
        metadata={"help": "local DP clipping norm of the update (also its L2 sensitivity)", "range": POSITIVE},
    )
    ldp_calibration: str = field(
        default="auto",
        metadata={
            "help": "local DP noise: classic bound (valid for epsilon < 1), analytic Gaussian, or auto (classic "
            "below 1, analytic from 1)",
            **_choice(*LDP_CALIBRATIONS),
        },
    )
    prune_percent: float = field(
        default=20.0,
        metadata={
            "help": "per tensor, zero this % of the update's smallest-magnitude entries",
            "range": Range(0.0, 100.0, high_open=True),
        },
    )
    tldmi_layers: int = field(
        default=1,
        metadata={"help": "TL-DMI: number of layers (modules with parameters) clients train, from the output"},
    )
    tldmi_public: str = field(
        default="", metadata={"help": "TL-DMI: public dataset name or checkpoint path that pre-trains the early layers"}
    )
    tldmi_pretrain_epochs: int = field(
        default=3, metadata={"help": "TL-DMI: server epochs of pre-training on the public dataset"}
    )
    tldmi_finetune: bool = field(
        default=False,
        metadata={
            "help": "TL-DMI: the trained layers but the output layer also start from the pre-trained weights "
            "(fine-tuning, as the paper does); false: from the run's seeded initialisation"
        },
    )
    # A server that cheats (fedsim/imprint.py, server/secagg.py; docs/malicious_server.md)
    server_mode: str = field(
        default="curious", metadata={"help": "what the server does to the model it sends", **_choice(*SERVER_MODES)}
    )
    imprint_bins: int = field(
        default=256, metadata={"help": "imprint: rows of the imprint block (bins of the statistic)"}
    )
    imprint_statistic: str = field(
        default="brightness",
        metadata={"help": "imprint: the statistic the rows measure", **_choice("brightness", "random")},
    )
    secure_aggregation: bool = field(
        default=False, metadata={"help": "Flower's SecAgg+: the server receives only the sum of the updates"}
    )
    secagg_num_shares: int = field(default=3, metadata={"help": "SecAgg+: shares of each client's secret key"})
    secagg_threshold: int = field(
        default=2, metadata={"help": "SecAgg+: shares needed to reconstruct a key (the fewest clients a round needs)"}
    )
    secagg_quantization_range: int = field(
        default=4194304, metadata={"help": "SecAgg+: integer levels each parameter is quantised to"}
    )
    # Central DP (server/dp.py; docs/defenses.md, "Central DP and accounting")
    central_dp: str = field(
        default="none",
        metadata={
            "help": "central DP with Flower's strategy wrappers: who clips, fixed or adaptive norm",
            **_choice(*CENTRAL_DP),
        },
    )
    dp_noise_multiplier: float = field(
        default=1.0,
        metadata={"help": "central DP: noise std over the clipping norm, per client update", "range": POSITIVE},
    )
    dp_clip_norm: float = field(
        default=1.0,
        metadata={"help": "central DP: clipping norm of each update (adaptive: the initial norm)", "range": POSITIVE},
    )
    dp_target_quantile: float = field(
        default=0.5,
        metadata={
            "help": "adaptive clipping: Flower's target_clipped_quantile, compared with the share of updates clipped",
            "range": Range(0.0, 1.0, low_open=True),
        },
    )
    dp_clip_lr: float = field(
        default=0.2, metadata={"help": "adaptive clipping: learning rate of the clipping norm", "range": POSITIVE}
    )
    dp_clipped_count_stddev: float = field(
        default=0.0,
        metadata={
            "help": "adaptive clipping: noise std of the clipped count; 0 = Flower's default (sampled clients / 20)",
            "range": NON_NEGATIVE,
        },
    )
    dp_delta: float = field(
        default=1e-5,
        metadata={
            "help": "central DP: the delta at which the run's epsilon is reported, in (0, 1)",
            "range": Range(0.0, 1.0, low_open=True, high_open=True),
        },
    )
    dp_target_epsilon: float = field(
        default=0.0,
        metadata={
            "help": "central DP: choose the noise multiplier that spends this epsilon over the run (0 = off)",
            "range": NON_NEGATIVE,
        },
    )
    # Resources
    client_num_cpus: float = field(default=1.0, metadata={"help": "CPUs per client actor", "range": POSITIVE})
    client_num_gpus: float = field(
        default=0.0, metadata={"help": "GPU fraction per client actor (0 = CPU only)", "range": NON_NEGATIVE}
    )

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
            key, value = f.name.replace("_", "-"), getattr(self, f.name)
            allowed = f.metadata.get("choices")
            if allowed and value not in allowed:
                raise FedsimError(f"{key} = {value!r} is not allowed; choose one of: {', '.join(allowed)}")
            within = f.metadata.get("range", Range())
            if isinstance(value, float) and value not in within:
                finite = "" if math.isfinite(value) else "a finite number "
                raise FedsimError(f"{key} = {value} must be {finite}{within}")
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
        for key, value in {
            "image-size": self.image_size,
            "examples-per-client": self.examples_per_client,
            "eval-examples": self.eval_examples,
            "num-malicious": self.num_malicious,
        }.items():
            if value < 0:
                raise FedsimError(f"{key} = {value} must be >= 0")
        if self.run_name:
            check_run_name(self.run_name)
        self.public_class_list()  # refuses a malformed list; the dataset's class count is checked when loaded
        self._validate_defenses()
        self._validate_server()
        self._validate_capture()
        self._validate_central_dp()

    def _validate_capture(self) -> None:
        from fedsim.capture_policy import parse_partitions

        try:
            chosen = parse_partitions(self.capture_partitions)
        except ValueError:
            raise FedsimError(
                f"capture-partitions = {self.capture_partitions[:80]!r} must be comma-separated ids, e.g. 0,3"
            ) from None
        for pid in chosen:
            if not 0 <= pid < self.num_clients:
                raise FedsimError(f"capture-partitions: partition id {pid} is outside 0..{self.num_clients - 1}")
        if self.capture_policy == "partitions" and not chosen:
            raise FedsimError("capture-policy = partitions needs capture-partitions, e.g. capture-partitions = '0,3'")

    # --- defenses ------------------------------------------------------------------------
    def defense_list(self) -> list[str]:
        """The defenses named by `defenses`, in the order written."""
        return [name.strip() for name in self.defenses.split(",") if name.strip()]

    def public_class_list(self) -> list[int]:
        """The classes listed in `public-classes` ("0-4,7": ranges and single labels), sorted; [] when none."""
        return parse_classes(self.public_classes)

    def defense_partitions(self) -> list[int] | None:
        """The partition ids listed in `defense-clients`; None when every client defends itself."""
        if not self.defense_clients.strip():
            return None
        return [int(part) for part in self.defense_clients.split(",") if part.strip()]

    def defends(self, partition_id: int, defense: str | None = None) -> bool:
        """Whether client `partition_id` applies `defense` (any defense when None)."""
        names = self.defense_list()
        if not names or (defense is not None and defense not in names):
            return False
        chosen = self.defense_partitions()
        return chosen is None or partition_id in chosen

    def _validate_defenses(self) -> None:
        names = self.defense_list()
        for name in names:
            if name not in DEFENSES:
                raise FedsimError(f"defenses: unknown defense {name!r}; choose from: {', '.join(DEFENSES)}")
        if len(set(names)) != len(names):
            raise FedsimError(f"defenses = {self.defenses!r} names a defense twice")
        try:
            chosen = self.defense_partitions()
        except ValueError:
            raise FedsimError(
                f"defense-clients = {self.defense_clients!r} must be comma-separated partition ids, e.g. '0,2'"
            ) from None
        for pid in chosen or []:
            if not 0 <= pid < self.num_clients:
                raise FedsimError(
                    f"defense-clients: partition id {pid} is outside 0..{self.num_clients - 1} "
                    f"(num-clients = {self.num_clients})"
                )
        if self.tldmi_layers < 1:
            raise FedsimError(f"tldmi-layers = {self.tldmi_layers} must be at least 1 (layers trained from the output)")
        if self.tldmi_pretrain_epochs < 0:
            raise FedsimError(f"tldmi-pretrain-epochs = {self.tldmi_pretrain_epochs} must be >= 0")
        if "tldmi" in names:
            self._validate_tldmi_public()

    def _validate_tldmi_public(self) -> None:
        from fedsim.datasets import LOADERS

        public = self.tldmi_public.strip()
        if public and self.public_classes.strip():
            raise FedsimError(
                "defenses = tldmi takes one public source: tldmi-public (another dataset or a checkpoint) or "
                "public-classes (classes of the clients' dataset); set only one"
            )
        if self.public_classes.strip():
            return
        if not public:
            raise FedsimError(
                "defenses = tldmi needs tldmi-public: a public dataset name (one of: "
                f"{', '.join(LOADERS)}) or a checkpoint path, disjoint from the clients' data, "
                "or public-classes (e.g. '0-4': classes of the clients' dataset no client holds)"
            )
        if public in LOADERS:
            if public.removeprefix("sample-") == self.dataset.removeprefix("sample-"):
                raise FedsimError(
                    f"tldmi-public = {public!r} overlaps the clients' private dataset {self.dataset!r}; "
                    "the public data must be disjoint from it (e.g. fashion-mnist for mnist clients)"
                )
            if public == "imagefolder":
                raise FedsimError(
                    "tldmi-public = 'imagefolder' is not supported: it would read data-dir, the clients' own data"
                )
        elif not Path(public).expanduser().exists():
            raise FedsimError(
                f"tldmi-public = {public!r} is neither a dataset (one of: {', '.join(LOADERS)}) "
                "nor an existing checkpoint path"
            )

    # --- a server that cheats, secure aggregation -----------------------------------------
    def captured_examples(self) -> int:
        """Examples behind one capture in FedSGD: one client's batch, or every client's under secure aggregation."""
        clients = max(1, math.floor(self.fraction_train * self.num_clients)) if self.secure_aggregation else 1
        return self.batch_size * clients

    def _validate_server(self) -> None:
        if self.server_mode == "imprint":
            if self.imprint_bins < self.captured_examples():
                raise FedsimError(
                    f"imprint-bins = {self.imprint_bins} is fewer than the {self.captured_examples()} images "
                    "behind one capture: no bin could hold an image alone; use at least that many "
                    "(4x recovers about 78%)"
                )
        if self.server_mode != "curious" and "tldmi" in self.defense_list():
            raise FedsimError(
                f"server-mode = {self.server_mode} cannot tamper with a TL-DMI model: its clients freeze the "
                "first layers"
            )
        if self.secure_aggregation:
            if self.defense_list():
                raise FedsimError(
                    "secure-aggregation with client defenses is not supported: the defense mods read the "
                    "Message-API reply, which SecAgg+ replaces with its legacy masked one; drop one of them"
                )
            sampled = max(1, math.floor(self.fraction_train * self.num_clients))
            if self.secagg_threshold < 2 or self.secagg_num_shares < self.secagg_threshold:
                raise FedsimError(
                    f"secagg-threshold = {self.secagg_threshold} must be at least 2 and at most "
                    f"secagg-num-shares = {self.secagg_num_shares}"
                )
            if self.secagg_num_shares < 3:  # Flower's SecAggPlusWorkflow refuses fewer
                raise FedsimError(f"secagg-num-shares = {self.secagg_num_shares} must be at least 3 (SecAgg+)")
            if sampled < max(self.secagg_threshold, 3):
                raise FedsimError(
                    f"secure-aggregation needs at least {max(self.secagg_threshold, 3)} clients per round "
                    f"(SecAgg+ shares each key among at least 3; secagg-threshold = {self.secagg_threshold}); "
                    f"this run samples {sampled} "
                    f"(num-clients = {self.num_clients}, fraction-train = {self.fraction_train})"
                )
            if not 1 <= self.secagg_quantization_range < 2**32 // max(sampled, 1):
                raise FedsimError(
                    f"secagg-quantization-range = {self.secagg_quantization_range} must be in "
                    "[1, 2^32 / clients per round)"
                )

    # --- central DP ----------------------------------------------------------------------
    def sampled_clients(self) -> int:
        """How many clients FedAvg samples a round: int(num-clients x fraction-train), at least one."""
        return max(int(self.num_clients * self.fraction_train), 1)

    def noise_multiplier(self) -> float:
        """The central noise multiplier the run uses: dp-noise-multiplier, or the one dp-target-epsilon asks for."""
        if self.dp_target_epsilon <= 0:
            return self.dp_noise_multiplier
        return noise_for_epsilon(self.dp_target_epsilon, self.num_rounds, self.dp_delta, self.max_noise_multiplier())

    def max_noise_multiplier(self) -> float:
        """The largest noise multiplier the run's clipping allows (Flower's adaptive clipping caps it at 2 σ_b)."""
        if self.central_dp.startswith("adaptive"):
            return min(2 * self.clipped_count_stddev() * (1 - 1e-9), MAX_NOISE_MULTIPLIER)
        return MAX_NOISE_MULTIPLIER

    def clipped_count_stddev(self) -> float:
        return self.dp_clipped_count_stddev or self.sampled_clients() / 20

    def _validate_central_dp(self) -> None:
        if self.central_dp == "none":
            return
        if self.strategy != "fedavg":
            raise FedsimError(
                f"central-dp = {self.central_dp} needs strategy = fedavg (Flower's DP wrappers account the uniform "
                f"average of clipped updates), not {self.strategy}"
            )
        if self.dp_target_epsilon > 0:
            if self.noise_multiplier() is None:
                raise FedsimError(
                    f"dp-target-epsilon = {self.dp_target_epsilon:g} cannot be reached in {self.num_rounds} rounds at "
                    f"dp-delta = {self.dp_delta:g}: even noise multiplier {self.max_noise_multiplier():.4g} spends more"
                )
        elif self.central_dp.startswith("adaptive") and self.dp_noise_multiplier >= 2 * self.clipped_count_stddev():
            raise FedsimError(
                f"dp-noise-multiplier = {self.dp_noise_multiplier:g} must be below 2 x dp-clipped-count-stddev = "
                f"{2 * self.clipped_count_stddev():g} for adaptive clipping (raise dp-clipped-count-stddev)"
            )

    # --- files ---------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path, base: FedsimConfig | None = None) -> FedsimConfig:
        """Read a config file: flat dashed keys, or a pyproject.toml's `[tool.flwr.app.config]`."""
        path = Path(path)
        if not path.exists():
            raise FedsimError(f"config file {path} does not exist")
        if path.is_dir():
            raise FedsimError(f"config file {path} is a directory; give the path of a TOML file")
        if not path.is_file():
            raise FedsimError(f"config file {path} is not a regular file")
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise FedsimError(f"config file {path} cannot be read: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise FedsimError(f"config file {path} is not UTF-8 text (invalid byte at offset {exc.start})") from None
        try:
            data = tomllib.loads(text)
        except ValueError as exc:  # TOMLDecodeError, or an integer longer than Python converts
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


def parse_overrides(pairs: list[str], flag: str = "--set", example: str = "num-rounds=5") -> dict[str, Any]:
    """Parse `key=value` pairs, values read as TOML (so 0.1 is a float and true a bool; bare words are strings)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise FedsimError(f"{flag} {pair!r} must look like key=value, e.g. {flag} {example}")
        key, raw = (part.strip() for part in pair.split("=", 1))
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except ValueError:  # not a TOML value (or an integer longer than Python converts): the word itself
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
            try:
                return float(value)
            except OverflowError:
                raise FedsimError(f"{key} must be a finite number; got an integer too large for a float") from None
    elif kind is str:
        if isinstance(value, str):
            return value
        if key == "defense-clients":  # `--set defense-clients=1` reads as an integer, `[0, 2]` as a list
            if isinstance(value, int) and not isinstance(value, bool):
                return str(value)
            if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return ",".join(str(v) for v in value)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise FedsimError(f"{key} = {value!r} must be {names[kind]}")
