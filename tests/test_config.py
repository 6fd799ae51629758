"""The run configuration: keys, types, values, files and overrides."""

import math
import tomllib
from dataclasses import fields

import pytest

from fedsim.config import STRATEGIES, FedsimConfig, parse_overrides
from fedsim.errors import FedsimError
from tests.conftest import REPO, invoke_cli

FLOAT_KEYS = [
    f.name.replace("_", "-") for f in fields(FedsimConfig) if isinstance(getattr(FedsimConfig(), f.name), float)
]


def test_defaults_are_valid_and_round_trip_through_toml(tmp_path):
    config = FedsimConfig()
    config.validate()
    path = tmp_path / "c.toml"
    path.write_text(config.to_toml())
    assert FedsimConfig.from_toml(path) == config


def test_flower_run_config_has_exactly_the_fedsim_keys_and_defaults():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    flower = pyproject["tool"]["flwr"]["app"]["config"]
    assert flower == FedsimConfig().to_mapping()
    assert FedsimConfig.from_run_config(flower) == FedsimConfig()


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(FedsimError, match=r"unknown config key 'num-round'.*did you mean 'num-rounds'"):
        FedsimConfig.from_mapping({"num-round": 3})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("strategy", "fedfoo", "choose one of: fedavg, fedprox"),
        ("recipe", "sgd", "choose one of: fedavg, fedsgd"),
        ("partition", "shards", "choose one of: iid, dirichlet"),
        ("alpha", 0.0, "alpha = 0.0 must be > 0"),
        ("alpha", -1.0, "must be > 0"),
        ("num-clients", 0, "at least 1"),
        ("batch-size", 0, "at least 1"),
        ("lr", 0.0, "lr = 0.0 must be > 0"),
        ("fraction-train", 1.5, r"must be in \(0, 1\]"),
        ("num-rounds", "three", "must be an integer"),
        ("dataset", "imagenet", "unknown dataset 'imagenet'; choose one of: sample-mnist"),
        ("model", "vgg", "unknown model 'vgg'; choose one of: lenet-dlg"),
    ],
)
def test_bad_values_are_refused_with_the_allowed_ones(key, value, message):
    with pytest.raises(FedsimError, match=message):
        FedsimConfig.from_mapping({key: value})


def test_overrides_parse_as_toml_values():
    assert parse_overrides(["lr=0.5", "num-rounds=4", "capture=false", "dataset=mnist", 'run-name="a b"']) == {
        "lr": 0.5,
        "num-rounds": 4,
        "capture": False,
        "dataset": "mnist",
        "run-name": "a b",
    }
    with pytest.raises(FedsimError, match="key=value"):
        parse_overrides(["lr"])


def test_an_integer_is_accepted_for_a_float_key_but_not_a_bool_for_an_int():
    assert FedsimConfig.from_mapping({"lr": 1}).lr == 1.0
    with pytest.raises(FedsimError):
        FedsimConfig.from_mapping({"num-rounds": True})


def test_config_file_errors(tmp_path):
    with pytest.raises(FedsimError, match="does not exist"):
        FedsimConfig.from_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 1")
    with pytest.raises(FedsimError, match="not valid TOML"):
        FedsimConfig.from_toml(bad)


def test_configuration_reference_documents_every_key():
    reference = (REPO / "docs" / "configuration.md").read_text()
    missing = [key for key in FedsimConfig.keys() if f"| `{key}` |" not in reference]
    assert not missing, f"docs/configuration.md lacks {missing}"


def test_config_file_that_is_a_directory_or_not_utf8_is_refused(tmp_path):
    with pytest.raises(FedsimError, match=r"config file .* is a directory; give the path of a TOML file$"):
        FedsimConfig.from_toml(tmp_path)
    latin = tmp_path / "latin1.toml"
    latin.write_bytes('run-name = "café"\n'.encode("latin-1"))
    with pytest.raises(FedsimError, match=r"latin1\.toml is not UTF-8 text \(invalid byte at offset 15\)$"):
        FedsimConfig.from_toml(latin)


def test_an_integer_too_long_to_read_is_refused_in_one_line(tmp_path):
    huge = tmp_path / "huge.toml"
    huge.write_text(f"num-rounds = {'9' * 5000}\n")
    with pytest.raises(FedsimError, match="not valid TOML"):
        FedsimConfig.from_toml(huge)
    with pytest.raises(FedsimError, match="lr must be a finite number; got an integer too large for a float"):
        FedsimConfig.from_mapping({"lr": 10**400})


# --- float keys: finite and in range -------------------------------------------------------------


def test_every_float_key_declares_its_range():
    assert "lr" in FLOAT_KEYS and "client-num-cpus" in FLOAT_KEYS
    for f in fields(FedsimConfig):
        if f.name.replace("_", "-") in FLOAT_KEYS:
            assert "range" in f.metadata, f.name


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_key_refuses_nan_and_infinity_naming_the_key_value_and_range(key, value):
    with pytest.raises(FedsimError) as refused:
        FedsimConfig.from_mapping({key: value})
    message = str(refused.value)
    assert message.startswith(f"{key} = {value} must be a finite number "), message
    assert any(bound in message for bound in ("> 0", ">= 0", "in (0, 1]", "in (0, 1)", "in [0, 100)")), message


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr", -0.1, "lr = -0.1 must be > 0"),
        ("server-lr", 0, "server-lr = 0.0 must be > 0"),
        ("proximal-mu", -1, "proximal-mu = -1.0 must be >= 0"),
        ("fraction-train", 0, "fraction-train = 0.0 must be in (0, 1]"),
        ("ldp-delta", 1.5, "ldp-delta = 1.5 must be in (0, 1)"),
        ("client-num-cpus", 0, "client-num-cpus = 0.0 must be > 0"),
        ("client-num-gpus", -0.5, "client-num-gpus = -0.5 must be >= 0"),
    ],
)
def test_float_keys_outside_their_range_are_refused(key, value, message):
    with pytest.raises(FedsimError) as refused:
        FedsimConfig.from_mapping({key: value})
    assert str(refused.value) == message


def test_float_keys_accept_their_boundaries():
    config = FedsimConfig.from_mapping(
        {"fraction-train": 1.0, "prune-percent": 0.0, "noise-scale": 0.0, "client-num-gpus": 0.0, "proximal-mu": 0}
    )
    assert config.fraction_train == 1.0 and config.prune_percent == 0.0 and config.proximal_mu == 0.0


def cli_mistakes(tmp_path) -> list[tuple[list[str], str]]:
    latin = tmp_path / "latin1.toml"
    latin.write_bytes("run-name = 'caf\xe9'\n".encode("latin-1"))
    return [
        (["--set", "lr=nan"], "error: lr = nan must be a finite number > 0"),
        (["--set", "noise-scale=nan"], "error: noise-scale = nan must be a finite number >= 0 (Gaussian std or"),
        (["--set", "client-num-cpus=nan"], "error: client-num-cpus = nan must be a finite number > 0"),
        (["--config", str(latin)], f"error: config file {latin} is not UTF-8 text (invalid byte at offset 15)"),
        (["--config", str(tmp_path)], f"error: config file {tmp_path} is a directory; give the path of a TOML file"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_cli_refuses_hostile_values_in_one_line_with_status_2(case, tmp_path):
    args, expected = cli_mistakes(tmp_path)[case]
    result = invoke_cli("run", "--out-dir", str(tmp_path / "runs"), *args)  # a hang fails at pytest-timeout
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and " ".join(lines[0].split()).startswith(expected), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "runs").exists()


# --- registries beside the config -----------------------------------------------------------------


def test_every_strategy_name_builds_its_flower_strategy():
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, Krum

    from server.strategies import STRATEGIES as BUILT
    from server.strategies import make_strategy

    assert tuple(BUILT) == STRATEGIES
    expected = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedmedian": FedMedian, "krum": Krum}
    values = {"num-clients": 4, "fraction-train": 0.5, "proximal-mu": 0.3, "server-lr": 0.2, "num-malicious": 1}
    for name in STRATEGIES:
        strategy = make_strategy(FedsimConfig.from_mapping({**values, "strategy": name}))
        assert type(strategy) is expected[name]
        assert strategy.fraction_train == 0.5 and strategy.min_available_nodes == 4
    assert make_strategy(FedsimConfig.from_mapping({**values, "strategy": "fedprox"})).proximal_mu == 0.3
    fedadam = make_strategy(FedsimConfig.from_mapping({**values, "strategy": "fedadam"}))
    assert fedadam.eta == 0.2 and fedadam.eta_l == 0.1
    assert make_strategy(FedsimConfig.from_mapping({**values, "strategy": "krum"})).num_malicious_nodes == 1
