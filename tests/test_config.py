"""The run configuration: keys, types, values, files and overrides."""

import tomllib

import pytest

from fedsim.config import FedsimConfig, parse_overrides
from fedsim.errors import FedsimError
from tests.conftest import REPO


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
