"""Central DP with Flower's wrappers under the curious server, the run's epsilon, and local DP's calibration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.client.mod.utils import make_ffn
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import local_train
from clients.defenses import CentralDpClipping, defense_mods, ldp_calibration, ldp_noise_std
from fedsim.captures import CaptureStore
from fedsim.config import FedsimConfig
from fedsim.errors import FedsimError
from fedsim.federation import Federation
from fedsim.privacy import (
    analytic_gaussian_delta,
    analytic_gaussian_std,
    classic_gaussian_std,
    gaussian_epsilon,
    noise_for_epsilon,
)
from server.dp import epsilon_of
from server.server_app import check_dp, server_strategy
from tests.conftest import invoke_cli
from tests.test_report import hostile_run  # noqa: F401  (the fixture: a scored run with markup everywhere)

BASE = {
    "dataset": "sample-mnist",
    "model": "lenet-dlg",
    "num-clients": 3,
    "num-rounds": 2,
    "recipe": "fedsgd",
    "batch-size": 2,
    "lr": 0.1,
}


def make_config(**overrides: object) -> FedsimConfig:
    return FedsimConfig.from_mapping({**BASE, **{k.replace("_", "-"): v for k, v in overrides.items()}})


# --- accounting ----------------------------------------------------------------------------------


def flower_epsilon(z: float, releases: int, delta: float, q: float = 1.0, orders=None) -> float:
    sampling = SamplingMethod.POISSON if q < 1 else SamplingMethod.NO_AMPLIFICATION
    population = 100
    ledger = RdpAccountant(
        PrivacyConfig(delta, population, NeighboringRelation.ADD_OR_REMOVE_ONE, sampling), orders=orders
    )
    ledger.compose(GaussianPrivacyEvent(z, max(int(q * population), 1), population), releases)
    return ledger.get_epsilon(delta)


def test_epsilon_matches_flowers_accountant_and_the_published_figures():
    # Abadi et al. 2016 (moments accountant): q = 0.01, sigma = 4, 10^4 steps, delta = 1e-5 -> epsilon 1.26;
    # RDP with the tighter conversion of dp-accounting gives a little less, never more.
    abadi = flower_epsilon(4.0, 10_000, 1e-5, q=0.01)
    assert gaussian_epsilon(4.0, 10_000, 1e-5, sampling_rate=0.01) == pytest.approx(abadi, rel=1e-9)
    assert 0.9 < abadi <= 1.26
    # dp-accounting's own test: noise multiplier 4.530877117 is exactly (1, 1e-6)-DP for one Gaussian release.
    fine = tuple(0.001 * i for i in range(1001, 100000, 7))
    assert flower_epsilon(4.530877117, 1, 1e-6, orders=fine) == pytest.approx(1.0, abs=2e-3)
    # T rounds of the Gaussian mechanism compose: epsilon grows, and the sampled run spends less.
    assert flower_epsilon(1.0, 10, 1e-5) > flower_epsilon(1.0, 1, 1e-5)
    config = make_config(num_clients=10, fraction_train=0.3)
    assert epsilon_of(config, 1.0, 5, 1e-5, SamplingMethod.NO_AMPLIFICATION) == pytest.approx(
        flower_epsilon(1.0, 5, 1e-5), rel=1e-9
    )
    assert epsilon_of(config, 1.0, 5, 1e-5, SamplingMethod.POISSON) < flower_epsilon(1.0, 5, 1e-5)


def test_a_target_epsilon_gives_the_noise_that_spends_it():
    z = noise_for_epsilon(2.0, 20, 1e-5)
    assert flower_epsilon(z, 20, 1e-5) == pytest.approx(2.0, rel=1e-4)
    assert flower_epsilon(z, 20, 1e-5) <= 2.0
    config = make_config(central_dp="server-fixed", dp_target_epsilon=2.0, num_rounds=20)
    assert config.noise_multiplier() == z


def test_the_classic_gaussian_bound_fails_from_epsilon_one_and_the_analytic_one_holds():
    for epsilon in (0.5, 1.0, 10.0, 100.0, 1000.0):
        sigma = analytic_gaussian_std(epsilon, 1e-5, 1.0)
        assert analytic_gaussian_delta(epsilon, sigma, 1.0) == pytest.approx(1e-5, rel=1e-6)
    # Balle and Wang 2018, Fig. 1 setting: the classic sigma at epsilon = 10 leaks more than its delta.
    assert analytic_gaussian_delta(10.0, classic_gaussian_std(10.0, 1e-5, 1.0), 1.0) > 1e-5
    assert analytic_gaussian_delta(100.0, classic_gaussian_std(100.0, 1e-5, 1.0), 1.0) > 0.9
    assert analytic_gaussian_std(1.0, 1e-5, 1.0) < classic_gaussian_std(1.0, 1e-5, 1.0)  # tighter below 1 too
    below, above = make_config(defenses="ldp", ldp_epsilon=0.5), make_config(defenses="ldp", ldp_epsilon=50.0)
    assert ldp_calibration(below) == "classic" and ldp_noise_std(below) == classic_gaussian_std(0.5, 1e-5, 1.0)
    assert ldp_calibration(above) == "analytic-gaussian"
    assert ldp_noise_std(above) == pytest.approx(analytic_gaussian_std(50.0, 1e-5, 1.0))


# --- the curious server and central DP -----------------------------------------------------------


class Nodes:
    """The connected SuperNodes, as FedAvg asks a Grid for them (the only thing it asks while configuring)."""

    def __init__(self, count: int) -> None:
        self.ids = [101 + i for i in range(count)]

    def get_node_ids(self):
        return list(self.ids)


def one_round(config: FedsimConfig, tmp_path):
    """Round 1 through the run's real strategy stack, each client training for real behind its real mods."""
    fed = Federation.from_config(config)
    model = fed.build_model()
    store = CaptureStore(tmp_path / "captures")
    strategy, ledger = server_strategy(config, store, {"model": config.model})
    from flwr.app import ArrayRecord, ConfigRecord

    recipe = ConfigRecord({"recipe": config.recipe, "lr": config.lr, "batch-size": config.batch_size})
    messages = list(strategy.configure_train(1, ArrayRecord(model.state_dict()), recipe, Nodes(config.num_clients)))
    client = make_ffn(lambda m, c: local_train(m, c, config), [CentralDpClipping(config), *defense_mods(config)])
    replies, sent = [], {}
    for pid, msg in enumerate(sorted(messages, key=lambda m: m.metadata.dst_node_id)):
        context = Context(1, msg.metadata.dst_node_id, {"partition-id": pid}, RecordDict(), {})
        reply = client(msg, context)
        arrays = reply.content["arrays"].to_torch_state_dict()
        sent[msg.metadata.dst_node_id] = {k: t.clone() for k, t in arrays.items()}
        replies.append(reply)
    released, _ = strategy.aggregate_train(1, replies)
    return model.state_dict(), store, sent, released.to_torch_state_dict(), ledger


def norm(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in update.values()))


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed", "adaptive-server", "adaptive-client"])
def test_the_curious_server_captures_before_the_central_noise(tmp_path, monkeypatch, mode):
    # What a ServerApp process has: its messages carry its run and task ids and the SuperLink's node id.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    clip, z, count_std = 0.05, 1.0, 1.0
    config = make_config(central_dp=mode, dp_clip_norm=clip, dp_noise_multiplier=z, dp_clipped_count_stddev=count_std)
    np.random.seed(3)  # Flower's DP noise and noisy clipped count draw from numpy's global generator
    global_w, store, sent, released, ledger = one_round(config, tmp_path)
    updates = store.records("update")
    assert len(updates) == 3
    clipped = []
    for record in updates:
        captured = store.load(record)
        assert all(torch.equal(captured[k], sent[record["client"]][k]) for k in sent[record["client"]])  # bit-exact
        update = {k: captured[k].double() - global_w[k].double() for k in global_w}
        if "server" in mode:
            assert norm(update) > 2 * clip  # the server clips after capturing: the raw update is exposed
        else:
            assert norm(update) <= clip * (1 + 1e-5)  # the client clipped it: that is what the server sees
        scale = min(1.0, clip / norm(update))
        clipped.append({k: v * scale for k, v in update.items()})
    plain = {k: global_w[k].double() + sum(u[k] for u in clipped) / 3 for k in global_w}
    noise = torch.cat([(released[k].double() - plain[k]).flatten() for k in global_w])
    std = z * clip / 3  # Flower's std: z·C/n on the mean
    if mode.startswith("adaptive"):
        # Andrew et al.'s split: the update gets z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), the clipped count the rest; and
        # Flower noises the mean with the norm it has just adapted for the next round, not the one it clipped at.
        adapted = ledger.strategy.clipping_norm
        assert abs(adapted / clip - 1) > 0.1  # the two norms differ enough here (seeded) to tell them apart
        std = (z**-2 - (2 * count_std) ** -2) ** -0.5 * adapted / 3
    assert float(noise.std()) == pytest.approx(std, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * std
    report = ledger.report()["central"]
    assert report["releases"] == 1
    assert report["epsilon"] == pytest.approx(flower_epsilon(z, 1, 1e-5), rel=1e-9)


@pytest.mark.parametrize("mode", ["adaptive-server", "adaptive-client"])
def test_flowers_adaptive_norm_shrinks_when_every_update_is_clipped(tmp_path, monkeypatch, mode):
    # Andrew et al. 2021 count the updates *within* the norm (b) and set C <- C exp(-lr (b - quantile)), so
    # a norm below every update grows. Flower 1.41 counts the *clipped* ones in that formula: it shrinks.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    clip = 0.05
    config = make_config(central_dp=mode, dp_clip_norm=clip, dp_noise_multiplier=1e-3, dp_clipped_count_stddev=1e-3)
    np.random.seed(0)
    global_w, store, _, _, ledger = one_round(config, tmp_path)
    for record in store.records("update"):
        captured = store.load(record)
        raw = norm({k: captured[k].double() - global_w[k].double() for k in global_w})
        assert raw > 2 * clip or (mode == "adaptive-client" and raw == pytest.approx(clip, rel=1e-5))
    # every update clipped: Flower's fraction is 1 (Andrew et al.'s b is 0), so C x exp(-0.2 (1 - 0.5))
    assert ledger.strategy.clipping_norm == pytest.approx(clip * math.exp(-0.2 * 0.5), rel=1e-3)
    assert ledger.report()["central"]["final-clip-norm"] < clip  # what privacy.json shows


# --- settings refused before training ------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"defenses": "ldp", "ldp-epsilon": 0}, r"ldp-epsilon = 0.0 must be > 0"),
        ({"central-dp": "server-fixed", "dp-target-epsilon": -1}, r"dp-target-epsilon = -1.0 must be >= 0"),
        ({"central-dp": "server-fixed", "dp-delta": 1.0}, r"dp-delta = 1.0 must be in \(0, 1\)"),
        ({"central-dp": "server-fixed", "dp-delta": 0}, r"dp-delta = 0.0 must be in \(0, 1\)"),
        ({"central-dp": "server-fixed", "dp-clip-norm": 0}, r"dp-clip-norm = 0.0 must be > 0"),
        ({"central-dp": "server-fixed", "dp-noise-multiplier": 0}, r"dp-noise-multiplier = 0.0 must be > 0"),
        ({"central-dp": "adaptive-server", "dp-target-quantile": 1.5}, r"dp-target-quantile = 1.5 must be in"),
        ({"central-dp": "adaptive-server", "dp-clip-lr": 0}, r"dp-clip-lr = 0.0 must be > 0"),
        ({"central-dp": "adaptive-client", "dp-target-quantile": 0}, r"dp-target-quantile = 0.0 must be in \(0, 1\]"),
        ({"central-dp": "adaptive-client", "dp-clip-norm": -0.1}, r"dp-clip-norm = -0.1 must be > 0"),
        (
            {"central-dp": "adaptive-client", "dp-target-epsilon": 2.0, "dp-clipped-count-stddev": 0.5},
            r"dp-target-epsilon = 2 cannot be reached in 2 rounds .*even noise multiplier 1 spends more",
        ),
        ({"central-dp": "adaptive-client", "dp-clipped-count-stddev": -1}, r"dp-clipped-count-stddev = -1.0"),
        ({"central-dp": "adaptive-client", "dp-noise-multiplier": 1.0}, r"must be below 2 x dp-clipped-count"),
        ({"central-dp": "server-fixed", "dp-target-epsilon": 1e-6}, r"dp-target-epsilon = 1e-06 cannot be reached"),
        ({"central-dp": "adaptive-server", "dp-target-epsilon": 1.0}, r"even noise multiplier 0.3 spends more"),
        ({"central-dp": "dp"}, r"central-dp = 'dp' is not allowed"),
        ({"central-dp": "server-fixed", "strategy": "fedprox"}, r"needs strategy = fedavg"),
        ({"ldp-calibration": "exact"}, r"ldp-calibration = 'exact' is not allowed"),
    ],
)
def test_bad_dp_settings_are_refused_in_one_line(values, message):
    with pytest.raises(FedsimError, match=message) as refused:
        FedsimConfig.from_mapping({**BASE, **values})
    assert "\n" not in str(refused.value)


def test_central_dp_refuses_unequal_weights_and_integer_counters():
    unequal = make_config(central_dp="server-fixed", recipe="fedavg", num_clients=7)  # 2400 examples: 343 or 342
    fed = Federation.from_config(unequal)
    assert check_dp(unequal, fed, fed.build_model()) == (
        "central-dp = server-fixed needs equal client weights, but the shards hold 342 to 343 examples; "
        "set examples-per-client to at most 342"
    )
    equal = make_config(central_dp="server-fixed", recipe="fedavg", examples_per_client=32)
    fed = Federation.from_config(equal)
    assert check_dp(equal, fed, fed.build_model()) is None
    counters = make_config(central_dp="client-fixed", model="resnet20", dataset="sample-cifar10")
    fed = Federation.from_config(counters)
    assert "integer counter" in check_dp(counters, fed, fed.build_model())


@pytest.mark.parametrize(
    ("setting", "line"),
    [
        (["dp-delta=2"], "error: dp-delta = 2.0 must be in (0, 1)"),
        (["dp-target-epsilon=0.001", "num-rounds=50"], "error: dp-target-epsilon = 0.001 cannot be reached in 50 "
         "rounds at dp-delta = 1e-05: even noise multiplier 1e+04 spends more"),
    ],
)  # fmt: skip
def test_the_cli_stops_a_bad_dp_run_with_one_line_and_exit_2(tmp_path, setting, line):
    sets = [arg for s in ["central-dp=server-fixed", *setting, f"out-dir={tmp_path}"] for arg in ("--set", s)]
    result = invoke_cli("run", *sets)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]
    assert not any(tmp_path.iterdir())


# --- end to end ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_dp_run_writes_its_epsilon(tmp_path, ray_head, no_strays):
    from fedsim.app.simulation import simulate

    config = make_config(
        central_dp="client-fixed",
        dp_noise_multiplier=2.0,
        dp_clip_norm=0.5,
        defenses="ldp",
        ldp_epsilon=20.0,
        out_dir=str(tmp_path),
        run_name="dp",
    )
    run_dir = simulate(config, tmp_path / "dp")
    privacy = json.loads((run_dir / "privacy.json").read_text())
    central, local = privacy["central"], privacy["local"]
    assert central["releases"] == 2
    assert central["epsilon"] == pytest.approx(flower_epsilon(2.0, 2, 1e-5), rel=1e-9)
    assert local["calibration"] == "analytic-gaussian"
    z = analytic_gaussian_std(20.0, 1e-5, 1.0)
    assert local["epsilon"] == pytest.approx(flower_epsilon(z, 2, 1e-5), rel=1e-6)
    assert sorted(local["clients"]) == ["0", "1", "2"]
    assert all(c["rounds"] == 2 for c in local["clients"].values())
    declared = CaptureStore(run_dir / "captures").records("update")[0]["declared"]
    assert declared["ldp-calibration"] == "analytic-gaussian"


def test_the_privacy_line_reads_privacy_json_as_untrusted(tmp_path):
    from fedsim.privacy import privacy_line

    assert privacy_line(tmp_path) == ""
    (tmp_path / "privacy.json").write_text(
        json.dumps(
            {
                "central": {"central-dp": "<script>", "epsilon": 1.5, "delta": 1e-5, "releases": 4},
                "local": {"calibration": "analytic-gaussian", "epsilon": 12.25, "delta": 1e-5},
            }
        )
    )
    assert privacy_line(tmp_path) == (
        "Privacy: central DP (central): ε = 1.5 at δ = 1e-05 for the released model over 4 rounds; "
        "local DP (analytic-gaussian noise): ε = 12.2 at δ = 1e-05 per client over the rounds it took part in."
    )
    (tmp_path / "privacy.json").write_text('{"central": {"epsilon": NaN, "delta": 1e-5}}')
    assert privacy_line(tmp_path) == ""


def test_the_report_shows_the_runs_epsilon_as_text(hostile_run):  # noqa: F811
    from fedsim.app.report import write_report
    from tests.test_report import HOSTILE, Page, assert_only_text

    account = {"central-dp": HOSTILE, "epsilon": 2.5, "delta": 1e-5, "releases": 3}
    (hostile_run / "privacy.json").write_text(json.dumps({"central": account}))
    page = Page(write_report(hostile_run).read_text())
    assert "Privacy: central DP (central): ε = 2.5 at δ = 1e-05 for the released model over 3 rounds." in page.all_text
    assert_only_text(page, HOSTILE)


@pytest.mark.slow
def test_the_frontier_resumes_is_seeded_and_shows_the_server_sees_the_raw_update(tmp_path):
    import argparse

    from benchmarks.bench_defenses import frontier

    args = argparse.Namespace(
        out=str(tmp_path / "frontier.json"), dataset="sample-mnist", data_dir="", public="sample-fashion-mnist",
        examples=16, rounds=1, iterations=1, restarts=1, ig_iterations=2, attacks="dlg",
        mechanisms="none,server-fixed",
    )  # fmt: skip
    frontier(args)
    points = tmp_path / "frontier_points"
    files = sorted(points.glob("*.json"))
    assert len(files) == 6  # the baseline and five ε
    rows = json.loads((tmp_path / "frontier.json").read_text())["rows"]
    none, central = rows[0], rows[1:]
    assert none["mechanism"] == "none" and none["epsilon"] is None and not none["attack-reused"]
    for row in central:
        assert row["epsilon"] == pytest.approx(row["overrides"]["dp-target-epsilon"], rel=1e-3)
        # the noise comes after the capture: the server's capture is the undefended run's, bit for bit
        assert row["capture-sha256"] == none["capture-sha256"] and row["attack-reused"]
    assert (tmp_path / "frontier.png").stat().st_size > 0
    written = {f.name: f.stat().st_mtime_ns for f in files}
    first = json.loads(files[0].read_text())
    files[0].unlink()
    frontier(args)  # resumes: only the missing point runs again, and gives the same numbers (seeded)
    assert {f.name: f.stat().st_mtime_ns for f in files[1:]} == {n: t for n, t in written.items() if n != files[0].name}
    again = json.loads(files[0].read_text())
    assert again["accuracy_per_round"] == first["accuracy_per_round"]
    assert again["privacy"] == first["privacy"] and again["capture-sha256"] == first["capture-sha256"]
    args.iterations = 2  # only the attacks change: every point keeps its FedAvg run and attacks its capture again
    frontier(args)
    rows_after = json.loads((tmp_path / "frontier.json").read_text())["rows"]
    assert [r["accuracy_per_round"] for r in rows_after] == [r["accuracy_per_round"] for r in rows]
    assert all(r["training"].startswith("kept") and r["setup"]["attacks"]["dlg"]["iterations"] == 2 for r in rows_after)
    assert [r["capture-sha256"] for r in rows_after] == [r["capture-sha256"] for r in rows]
