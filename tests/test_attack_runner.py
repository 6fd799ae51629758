"""The attack fan-out on real captures: Ray tasks, results written as they finish, resumable, failure-isolated."""

from __future__ import annotations

import json

import pytest
import torch

from attacks.contract import target_from_capture
from clients.training import train_fedsgd
from fedsim.captures import CaptureStore
from fedsim.datasets import load_dataset, to_float
from fedsim.federation import device
from fedsim.files import save_tensors
from fedsim.models import build_model
from tests.conftest import invoke_cli


def make_run(run_dir, model_name="mlp", size=12, clients=3, batch=1):
    """Captures as the curious server writes them: FedSGD updates of real CIFAR images, plus the truth."""
    data = load_dataset("sample-cifar10", image_size=size)
    store = CaptureStore(run_dir / "captures")
    model = build_model(model_name, data.input_shape, 10, seed=0)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    meta = {
        "model": model_name,
        "input_shape": list(data.input_shape),
        "num_classes": 10,
        "trainable": [n for n, _ in model.named_parameters()],
    }
    recipe = {"recipe": "fedsgd", "lr": 0.1, "batch-size": batch, "local-epochs": 1}
    store.write_global(1, global_state, {**meta, "recipe": recipe})
    for client in range(clients):
        x, y = (
            to_float(data.train_x[client * batch : (client + 1) * batch]),
            data.train_y[client * batch : (client + 1) * batch],
        )
        model.load_state_dict(global_state)
        train_fedsgd(model.to(device()), x, y, 0.1)
        store.write_update(
            1,
            100 + client,
            model.cpu().state_dict(),
            {**meta, "recipe": recipe, "num_examples": batch, "partition_id": client},
        )
        save_tensors(
            run_dir / "truth" / "round-0001" / f"client-{100 + client}.safetensors", {"images": x, "labels": y}
        )
    return store


@pytest.mark.slow
def test_ray_fan_out_scores_resumes_and_isolates_failures(tmp_path, ray_head, no_strays):
    from fedsim.app.attack_runner import plan, run_attacks
    from fedsim.app.report import write_report

    run_dir = tmp_path / "run"
    store = make_run(run_dir)
    corrupt, nan = store.records("update")[1:3]
    (store.root / corrupt["file"]).write_bytes(b"not a safetensors file")  # refused, never unpickled
    state = store.load(nan)
    save_tensors(store.root / nan["file"], {k: torch.full_like(v, float("nan")) for k, v in state.items()})
    jobs, skipped = plan(run_dir, ["analytic"])
    assert len(jobs) == 3 and not skipped
    events = []
    summaries = run_attacks(jobs, executor="ray", on_event=events.append)
    by_client = {s["partition_id"]: s for s in summaries}
    assert by_client[0]["status"] == "ok"
    assert by_client[1]["status"] == "failed" and "not a valid safetensors" in by_client[1]["reason"]
    assert by_client[2]["status"] == "failed"
    assert (run_dir / "attacks" / "analytic" / "round-0001-client-100" / "reconstruction.png").exists()
    assert [e["event"] for e in events].count("done") == 3

    # Repair the two captures: a re-run skips the finished job and retries the failed ones.
    make_run(tmp_path / "fresh")
    for record in (corrupt, nan):
        (store.root / record["file"]).write_bytes((tmp_path / "fresh" / "captures" / record["file"]).read_bytes())
    again = run_attacks(plan(run_dir, ["analytic"])[0], executor="local")
    assert sorted(s["partition_id"] for s in again) == [1, 2] and all(s["status"] == "ok" for s in again)

    page = write_report(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scored = [r for r in metrics["reconstructions"] if r.get("psnr_mean") is not None]
    assert len(scored) == 3 and min(r["psnr_mean"] for r in scored) >= 100  # exact: the physical limit
    text = page.read_text()
    assert text.count("data:image/png;base64,") >= 4 and "http" not in text.replace("http-equiv", "")


def test_cli_attack_and_report_on_a_run(tmp_path):
    run_dir = tmp_path / "run"
    make_run(run_dir, clients=2)
    result = invoke_cli("attack", str(run_dir), "--attack", "analytic", "--executor", "local")
    assert result.returncode == 0, result.stderr
    assert "2 reconstructed, 0 failed" in " ".join(result.stdout.split())
    result = invoke_cli("attack", str(run_dir), "--attack", "analytic", "--executor", "local")
    assert "all 2 reconstructions already done" in " ".join(result.stdout.split())
    result = invoke_cli("report", str(run_dir))
    assert result.returncode == 0 and (run_dir / "report.html").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["attack", "/nonexistent"], "/nonexistent does not exist"),
        (["attack", "{run}", "--attack", "dlx"], "unknown attack dlx; choose from: dlg, idlg, grnn, analytic"),
        (["attack", "{run}", "--attack", "dlg", "--option", "iteratons=5"], "iteratons"),
        (["attack", "{run}", "--executor", "spark"], "--executor 'spark' is not allowed"),
        (["report", "/nonexistent"], "is not a run folder"),
    ],
)
def test_attack_cli_mistakes(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    make_run(run_dir, clients=1)
    result = invoke_cli(*[a.replace("{run}", str(run_dir)) for a in args])
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in " ".join(result.stderr.split()) and "Traceback" not in result.stderr


def test_target_from_capture_uses_declared_defenses_only_when_aware():

    model = build_model("lenet-dlg", (1, 16, 16), 10, seed=0)
    global_state = model.state_dict()
    client_state = {k: v + 0.01 for k, v in global_state.items()}
    client_state["fc.bias"] = global_state["fc.bias"].clone()  # pruned to exactly zero update
    base = {"model": "lenet-dlg", "input_shape": [1, 16, 16], "num_classes": 10, "num_examples": 1}
    base["recipe"] = {"recipe": "fedsgd", "lr": 0.1, "batch-size": 1}
    every = [n for n, _ in model.named_parameters()]
    record = {
        **base,
        "trainable": every,
        "declared": {"defenses": "tldmi,clip,prune", "trainable": ["fc.weight", "fc.bias"]},
    }

    aware = target_from_capture(global_state, client_state, record)
    assert [n for n, p in aware.model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    assert aware.rescale and len(aware.mask) == 2 and float(aware.mask[1].sum()) == 0 and bool(aware.mask[0].all())
    unaware = target_from_capture(global_state, client_state, record, aware=False)
    assert len(unaware.gradients) == len(every) and unaware.mask is None and not unaware.rescale

    noisy = target_from_capture(global_state, client_state, {**record, "declared": {"defenses": "clip,noise"}})
    assert not noisy.rescale and noisy.mask is None and len(noisy.gradients) == len(every)
