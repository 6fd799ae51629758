"""The command line as a user meets it: bad input gives one clear line, status 2, no traceback."""

import pytest

from tests.conftest import ONE_ACTOR, invoke_cli, run_cli


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "num-round=3"], "unknown config key 'num-round' (did you mean 'num-rounds'?)"),
        (["--model", "vgg"], "unknown model 'vgg'; choose one of: lenet-dlg, lenet5, convnet, mlp, resnet20"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'; choose one of:"),
        (["--strategy", "fedfoo"], "strategy = 'fedfoo' is not allowed; choose one of: fedavg, fedprox"),
        (
            ["--dataset", "mnist", "--data-dir", "/nonexistent"],
            "run with --download (needs internet) or point --data-dir",
        ),
        (["--set", "partition=dirichlet", "--set", "alpha=0"], "alpha = 0.0 must be > 0"),
        (
            ["--dataset", "sample-cifar10", "--clients", "201"],
            "num-clients = 201 is more than the 200 training examples",
        ),
        (
            ["--clients", "3", "--set", "batch-size=1000"],
            "batch-size = 1000 is larger than the smallest shard (800 examples)",
        ),
        (["--config", "/nonexistent.toml"], "config file /nonexistent.toml does not exist"),
    ],
)
def test_user_mistakes(args, expected, tmp_path):
    result = invoke_cli("run", "--out-dir", str(tmp_path), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr + result.stdout
    assert "error:" in result.stderr


def test_help_reads_well():
    result = invoke_cli("run", "--help")
    assert result.returncode == 0
    for option in ("--config", "--dataset", "--set", "--clients", "--rounds"):
        assert option in result.stdout


def test_config_command_prints_a_valid_config(tmp_path):
    from fedsim.config import FedsimConfig

    result = invoke_cli("config")
    path = tmp_path / "c.toml"
    path.write_text(result.stdout)
    assert FedsimConfig.from_toml(path) == FedsimConfig()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "--set", "num-round=3"], "error: unknown config key 'num-round' (did you mean 'num-rounds'?)"),
        (["attack", "/nonexistent"], "error: /nonexistent does not exist"),
    ],
)
def test_the_command_in_its_own_process_prints_one_line_without_a_traceback(args, expected, tmp_path):
    """What a user's shell sees: the interpreter starts, the mistake is one line on stderr, status 2."""
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_a_run_that_lists_attacks_ends_with_reconstructions_and_a_report(tmp_path, no_strays):
    """`fedsim run --set attacks=analytic`: the run, then every capture attacked and scored, in one command."""
    import json

    result = run_cli(
        "run", "--out-dir", str(tmp_path), "--name", "leak", "--dataset", "sample-mnist", "--model", "mlp",
        "--recipe", "fedsgd", "--clients", "2", "--rounds", "1", "--set", "batch-size=1",
        "--set", "save-truth=true", "--set", "attacks=analytic", *ONE_ACTOR,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "leak"
    assert len(list((run / "attacks" / "analytic").glob("round-0001-client-*/result.json"))) == 2
    assert (run / "report.html").exists() and "report:" in result.stdout
    summary = json.loads((run / "metrics.json").read_text())["summary"]["analytic"]
    assert summary["reconstructions"] == 2 and summary["failed"] == 0
    assert summary["median_psnr_mean"] > 100 and summary["median_label_accuracy"] == 1.0  # the MLP's input, exactly
