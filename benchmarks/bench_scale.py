"""How far fedsim goes on one machine: manifest index, float16 captures, and `fedsim run` with many clients.

    python benchmarks/bench_scale.py index --records 100000 --rounds 100
    python benchmarks/bench_scale.py psnr --images 4
    python benchmarks/bench_scale.py run --clients 200 --rounds 2 --fraction 0.25 --examples 10
    python benchmarks/bench_scale.py long --clients 5000 --rounds 20 --set fraction-train=0.02 --set batch-size=1
    python benchmarks/bench_scale.py overhead --clients 10 1000 5000 --fractions 1.0 0.05 0.02 --pairs 2 1 1
    python benchmarks/bench_scale.py attack --clients 8 --iterations 50 --nodes 1 2

Each writes benchmarks/results/scale-<part>.json. `run` samples the resident memory of the whole process
tree (the CLI, Ray and its workers) from /proc every 0.5 s and runs the same federation with capture on
and off, so the capture overhead is the ratio of the two wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = Path(os.environ.get("FEDSIM_SHARED_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT))

from fedsim.captures import CaptureStore  # noqa: E402


def machine() -> dict:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def save(part: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"scale-{part}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"-> {path}")


# --- the manifest index ------------------------------------------------------------------------------------


def bench_index(records: int, rounds: int) -> None:
    """Write `records` update records through CaptureStore, then time reading one round with and without the index."""
    per_round = records // rounds
    meta = {"model": "mlp", "input_shape": [1, 28, 28], "num_classes": 10, "num_examples": 10, "partition_id": 0}
    with tempfile.TemporaryDirectory() as tmp:
        store = CaptureStore(Path(tmp) / "captures")
        start = time.perf_counter()
        # Only the reading is measured: syncing 10^5 lines one by one would time the disk, not the store.
        with mock.patch("os.fsync"):
            for server_round in range(1, rounds + 1):
                store.write_global(server_round, {"w": torch.zeros(1)}, meta)
                for client in range(per_round):
                    store._append({"kind": "update", "round": server_round, "client": client, "file": "x", **meta})
        write_s = time.perf_counter() - start
        middle = rounds // 2
        timings = {}
        for label, reader in {
            "one-round-indexed": lambda: store.records("update", rounds=[middle]),
            "one-round-full-scan": lambda: [r for r in store.records("update") if r["round"] == middle],
        }.items():
            start = time.perf_counter()
            got = reader()
            timings[label] = round(time.perf_counter() - start, 4)
            assert len(got) == per_round, (label, len(got))
        size = store.manifest.stat().st_size
    save(
        "index",
        {
            "records": rounds * (per_round + 1),
            "rounds": rounds,
            "manifest_mb": round(size / 2**20, 2),
            "write_s_without_fsync": round(write_s, 2),
            "read_s": timings,
        },
    )


# --- float16 against float32 under attack -------------------------------------------------------------------


def bench_psnr(images: int, idlg: int) -> None:
    """Analytic (and optionally iDLG) on single-image FedSGD captures of an MLP / LeNet, stored float32 and float16."""
    sys.path.insert(0, str(ROOT / "tests"))
    from attacks import get_attack
    from attacks.contract import capture_states, target_from_capture
    from fedsim.scoring import score
    from tests.test_scale import fedsgd_capture

    data = np.load(DATA / "cifar10" / "cifar10_train_first200_kaggle_png.npz", allow_pickle=False)
    x_all = torch.tensor(data["x"][:images]).permute(0, 3, 1, 2).float() / 255
    y_all = torch.tensor(data["y"][:images]).long()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(images):
            for dtype in ("float32", "float16"):
                for attack in ["analytic"] + (["idlg"] if i < idlg else []):
                    x, y = x_all[i : i + 1], y_all[i : i + 1]
                    store = CaptureStore(Path(tmp) / f"{i}-{dtype}-{attack}", dtype)
                    record = fedsgd_capture(store, x, y)
                    global_state, client_state = capture_states(store, store.records("update")[0])
                    start = time.perf_counter()
                    options = {"iterations": 30} if attack == "idlg" else {}
                    result = get_attack(attack, **options).reconstruct(
                        target_from_capture(global_state, client_state, record)
                    )
                    psnr = score(result.images, result.labels, x, y)["psnr"][0]
                    rows.append(
                        {
                            "image": i,
                            "dtype": dtype,
                            "attack": attack,
                            "psnr": round(float(psnr), 2),
                            "seconds": round(time.perf_counter() - start, 2),
                            "update_bytes": store.path(record).stat().st_size,
                        }
                    )
                    print(rows[-1], flush=True)
    save("psnr", {"model": "mlp (CIFAR-10 32x32, one image per FedSGD capture, lr 0.1)", "rows": rows})


# --- fedsim run with many clients ---------------------------------------------------------------------------


def tree_memory(pid: int, cpu: dict[tuple[int, int], float] | None = None) -> tuple[int, int]:
    """Resident bytes of `pid` and all its descendants, from /proc, two ways: RSS summed (pages that processes
    share, torch's libraries in every worker, count once per process) and PSS summed (each shared page split
    among the processes that map it: what the tree takes from the machine). With `cpu`, each process's CPU
    seconds so far (utime + stime) recorded under (pid, start time)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    used: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            used[int(entry)] = (int(fields[19]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        except (OSError, ValueError):
            continue
    total, proportional, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        proportional += pss_bytes(p)
        if cpu is not None and p in used:
            cpu[(p, used[p][0])] = used[p][1]
        todo.extend(children.get(p, []))
    return total, proportional


def pss_bytes(pid: int) -> int:
    """The process's proportional set size (/proc/<pid>/smaps_rollup), 0 if it is gone or unreadable."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def timed_run(args: list[str], env: dict) -> dict:
    """Run a command, sampling its process tree every 0.5 s: wall seconds, peak bytes (RSS and PSS summed), and the
    CPU seconds of its processes as last sampled (RUSAGE_CHILDREN would miss Ray's workers: their raylet reaps them
    without adding their usage up; what a process spends after its last sample, at most 0.5 s of it, is missed)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0, 0]  # RSS summed, PSS summed
    cpu: dict[tuple[int, int], float] = {}

    def sample() -> None:
        while proc.poll() is None:
            peak[:] = map(max, peak, tree_memory(proc.pid, cpu))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{output[-3000:]}")
    gb = [round(b / 2**30, 3) for b in peak]
    return {"wall_s": round(wall, 2), "peak_gb": gb[0], "peak_pss_gb": gb[1], "cpu_s": round(sum(cpu.values()), 2)}


FEDSIM_ENV = {
    "PYTHONPATH": str(ROOT),
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray's memory monitor kills workers when the whole machine is nearly full: on a machine shared with other
    # jobs that is mostly their memory, and a killed client actor turns its replies into failures.
    "RAY_memory_monitor_refresh_ms": "0",
}


def fedsim_run(
    out: Path, name: str, clients: int, rounds: int, sets: list[str], model: str = "", variant: str | None = None
) -> dict:
    """One `fedsim run` on MNIST: wall time, peak memory of its process tree, per-round and capture times, disk.

    With `variant` ("" or one of benchmarks/scale_cpu.py's SCALE_CPU_VARIANT values, e.g. "nosync") the CLI runs
    through scale_cpu.py's driver, which can leave the capture writer's fsyncs or writes out."""
    if variant is None:
        cmd, env = [sys.executable, "-m", "fedsim"], {}
    else:
        cmd = [sys.executable, str(ROOT / "benchmarks" / "scale_cpu.py"), "driver", "--profile-dir", "-"]
        env = {"SCALE_CPU_VARIANT": variant, "SCALE_CPU_CODE": str(ROOT), "SCALE_CPU_THREADS": str(out / "threads")}
    cmd += ["run", "--dataset", "mnist", "--data-dir", str(DATA)]
    cmd += ["--clients", str(clients), "--rounds", str(rounds), "--out-dir", str(out), "--name", name]
    cmd += (["--model", model] if model else []) + [a for s in sets for a in ("--set", s)]
    load = round(os.getloadavg()[0], 2)
    row = {"name": name, "load_before": load, **timed_run(cmd, {**os.environ, **FEDSIM_ENV, **env})}
    run_dir = out / name
    lines = [json.loads(line) for line in (run_dir / "training.jsonl").read_text().splitlines()]
    lines = [r for r in lines if r.get("round", 0) >= 1]
    times = [r["time"] for r in lines]
    row["round_s"] = [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)]
    row["capture_s"] = [r.get("capture-seconds", 0.0) for r in lines]
    captures = run_dir / "captures"
    disk = sum(p.stat().st_size for p in captures.rglob("*") if p.is_file()) if captures.exists() else 0
    row["capture_mb_per_round"] = round(disk / 2**20 / rounds, 2)
    row["updates_captured"] = len(CaptureStore(captures).records("update")) if captures.exists() else 0
    row["failures"] = len(CaptureStore(captures).records("failure")) if captures.exists() else 0
    return row


def median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def bench_run(
    clients: int, rounds: int, fraction: float, examples: int, policy: list[str], dtype: str, batch: int = 0
) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for capture in ("false", "true"):
            sets = [
                f"fraction-train={fraction}",
                f"examples-per-client={examples}",
                f"capture={capture}",
                f"capture-dtype={dtype}",
                "eval-examples=500",
                f"batch-size={batch or max(1, min(32, examples // 2))}",  # shards of many clients are uneven
                *policy,
            ]
            row = {
                "capture": capture == "true",
                **fedsim_run(Path(tmp), f"c{clients}-{capture}", clients, rounds, sets, "mlp"),
            }
            rows.append(row)
            print(row, flush=True)
    plain_s, curious_s = rows[0]["wall_s"], rows[1]["wall_s"]
    save(
        f"run-{clients}",
        {
            "command": f"fedsim run --dataset mnist --model mlp --clients {clients} --rounds {rounds} "
            f"--set fraction-train={fraction} --set examples-per-client={examples} {' '.join(policy)}",
            "cohort": round(clients * fraction),
            "rows": rows,
            "curious_over_plain": round(curious_s / plain_s, 3),
        },
    )


def bench_long(clients: int, rounds: int, sets: list[str], tag: str) -> None:
    """One curious run as a user types it (default model and capture), many rounds: peak memory and time per round."""
    with tempfile.TemporaryDirectory() as tmp:
        row = fedsim_run(Path(tmp), f"long-{clients}", clients, rounds, sets)
    steady = row["round_s"]  # rounds 2 on: the first round also holds the start of Ray and the client actors
    save(
        f"long-{tag or clients}",
        {
            "command": f"fedsim run --dataset mnist --data-dir ../shared/data --clients {clients} --rounds {rounds} "
            + " ".join(f"--set {s}" for s in sets),
            "measured": "1-minute load average before the run in load_before (2 cores)",
            **row,
            "first_round_end_s": round(row["wall_s"] - sum(row["round_s"]), 1),
            "median_round_s": round(median(steady), 3),
            "median_capture_s": round(median(row["capture_s"][1:]), 4),
        },
    )


def bench_overhead(
    clients: list[int],
    fraction: dict[int, float],
    rounds: int,
    pairs: dict[int, int],
    sets: list[str],
    tag: str = "",
    variants: tuple[str, ...] = (),
) -> None:
    """Plain and curious runs alternated (same seed), so that a change in the machine's load hits both alike.

    The ratio is of the median time per round from round 2 on (the first round also holds the start of Ray); the curious
    runs also time their capture path, so its share of a round is measured inside the same run. Each of `variants`
    (scale_cpu.py's `nosync`, `drop`) adds a curious run so changed to every alternation, as `curious-<variant>`;
    with variants, every run goes through scale_cpu.py's driver, so that all modes start the same way.
    """
    results = []
    modes = ("plain", "curious", *(f"curious-{v}" for v in variants))
    with tempfile.TemporaryDirectory() as tmp:
        for n in clients:
            runs: dict[str, list[dict]] = {mode: [] for mode in modes}
            for pair in range(pairs[n]):
                for mode in modes:
                    extra = [f"fraction-train={fraction[n]}", f"capture={'false' if mode == 'plain' else 'true'}"]
                    variant = (mode.split("-", 1)[1] if "-" in mode else "") if variants else None
                    row = fedsim_run(Path(tmp), f"{mode}-{n}-{pair}", n, rounds, extra + sets, variant=variant)
                    runs[mode].append(row)
                    print(n, mode, pair, row, flush=True)
            per_round = {m: median([s for r in rows for s in r["round_s"]]) for m, rows in runs.items()}
            capture = median([s for r in runs["curious"] for s in r["capture_s"][1:]])
            # inside each curious run: its rounds against the same rounds less the time they spent capturing
            inside = median(
                [t / (t - c) for r in runs["curious"] for t, c in zip(r["round_s"], r["capture_s"][1:], strict=False)]
            )
            results.append(
                {
                    "clients": n,
                    "cohort": round(n * fraction[n]),
                    "median_round_s": {m: round(v, 3) for m, v in per_round.items()},
                    "curious_over_plain": round(per_round["curious"] / per_round["plain"], 3),
                    **{f"{mode}_over_plain": round(per_round[mode] / per_round["plain"], 3) for mode in modes[2:]},
                    "whole_runs_s": {m: round(sum(r["wall_s"] for r in rows), 2) for m, rows in runs.items()},
                    "curious_over_plain_whole_runs": round(
                        sum(r["wall_s"] for r in runs["curious"]) / sum(r["wall_s"] for r in runs["plain"]), 3
                    ),
                    # CPU seconds of every process of the runs: what the capture costs the machine, which the
                    # scheduling of 50 client trainings on 2 cores changes far less than it changes wall time
                    "cpu_s": {m: round(sum(r["cpu_s"] for r in rows), 1) for m, rows in runs.items()},
                    "curious_over_plain_cpu": round(
                        sum(r["cpu_s"] for r in runs["curious"]) / sum(r["cpu_s"] for r in runs["plain"]), 3
                    ),
                    "load_before_max": max(r["load_before"] for rows in runs.values() for r in rows),
                    "median_capture_s": round(capture, 4),
                    "capture_share_of_round": round(capture / per_round["curious"], 4),
                    "curious_over_curious_less_capture": round(inside, 3),
                    "peak_gb": {m: max(r["peak_gb"] for r in rows) for m, rows in runs.items()},
                    "peak_pss_gb": {m: max(r["peak_pss_gb"] for r in rows) for m, rows in runs.items()},
                    "capture_mb_per_round": max(r["capture_mb_per_round"] for r in runs["curious"]),
                    "runs": runs,
                }
            )
            save(
                f"overhead-{tag}" if tag else "overhead",
                {
                    "measured": "1-minute load average before each run in runs[*].load_before (2 cores)",
                    "rounds": rounds,
                    "sets": sets,
                    "results": results,
                },
            )


def bench_attack(clients: int, iterations: int, node_counts: list[int]) -> None:
    """Reconstructions per minute of `fedsim attack` on Ray clusters of 1 and of 2 one-CPU nodes (tests/ray_nodes.py).

    One FedSGD run (MLP on MNIST, one image per client) gives `clients` captures; each cluster attacks all of them
    with iDLG through RAY_ADDRESS. The rate counts the whole command (joining, shipping fedsim, worker start-up);
    the per-task seconds in each result.json give the cost of one reconstruction alone.
    """
    import shutil

    from tests.ray_nodes import RayNodes

    env = {**os.environ, **FEDSIM_ENV}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = ["recipe=fedsgd", "batch-size=1", "examples-per-client=4", "eval-examples=100", "capture-dtype=float16"]
        fedsim_run(Path(tmp), "source", clients, 1, sets, "mlp")
        for nodes in node_counts:
            run_dir = Path(tmp) / f"attack-{nodes}"
            shutil.copytree(Path(tmp) / "source", run_dir)
            cluster = RayNodes(cpus=1)
            try:
                for _ in range(nodes - 1):
                    cluster.add_node(cpus=1, resources={"worker": 1})
                cluster.wait(nodes)
                cmd = [sys.executable, "-m", "fedsim", "attack", str(run_dir), "-a", "idlg"]
                cmd += ["-o", f"iterations={iterations}", "--rounds", "1"]
                start = time.perf_counter()
                out = subprocess.run(cmd, env={**env, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True)
                wall = time.perf_counter() - start
            finally:
                left = cluster.stop()
            if out.returncode != 0:
                raise SystemExit(f"fedsim attack failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            results = [json.loads(p.read_text()) for p in (run_dir / "attacks").rglob("result.json")]
            ok = [r for r in results if r["status"] == "ok"]
            rows.append(
                {
                    "nodes": nodes,
                    "cpus_per_node": 1,
                    "reconstructions": len(ok),
                    "failed": [r.get("reason") for r in results if r["status"] != "ok"],
                    "wall_s": round(wall, 2),
                    "per_minute": round(60 * len(ok) / wall, 2),
                    "task_s_median": round(median([r["seconds"] for r in ok]), 2),
                    "tasks_per_node": {n: sum(r.get("node") == n for r in ok) for n in {r.get("node") for r in ok}},
                    "left_processes": left,
                }
            )
            print(rows[-1], flush=True)
    save(
        "attack",
        {
            "command": f"fedsim attack <run> -a idlg -o iterations={iterations} --rounds 1 (RAY_ADDRESS=<cluster>)",
            "measured": "under load: 2 cores shared with other jobs; every node on this one machine",
            "captures": clients,
            "rows": rows,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    index = sub.add_parser("index")
    index.add_argument("--records", type=int, default=100_000)
    index.add_argument("--rounds", type=int, default=100)
    psnr = sub.add_parser("psnr")
    psnr.add_argument("--images", type=int, default=4)
    psnr.add_argument("--idlg", type=int, default=0, help="also iDLG on the first N images (slow)")
    run = sub.add_parser("run")
    run.add_argument("--clients", type=int, default=200)
    run.add_argument("--rounds", type=int, default=2)
    run.add_argument("--fraction", type=float, default=0.25)
    run.add_argument("--examples", type=int, default=10)
    run.add_argument("--dtype", default="float32")
    run.add_argument("--batch", type=int, default=0, help="client batch size (0: half the examples, at most 32)")
    run.add_argument("--policy", nargs="*", default=[], help="extra capture keys, e.g. capture-policy=sample")
    long = sub.add_parser("long")
    long.add_argument("--clients", type=int, default=5000)
    long.add_argument("--rounds", type=int, default=20)
    long.add_argument("--tag", default="")
    long.add_argument("--set", dest="sets", action="append", default=[], help="a fedsim config key=value")
    over = sub.add_parser("overhead")
    over.add_argument("--clients", type=int, nargs="+", default=[10, 1000, 5000])
    over.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.05, 0.02])
    over.add_argument("--rounds", type=int, default=4)
    over.add_argument("--pairs", type=int, nargs="+", default=[2, 2, 2])
    over.add_argument("--set", dest="sets", action="append", default=[], help="a fedsim config key=value")
    over.add_argument("--tag", default="", help="results go to scale-overhead-<tag>.json")
    over.add_argument(
        "--variants", nargs="*", default=[], choices=["nosync", "drop"], help="curious runs without fsync / writes too"
    )
    attack = sub.add_parser("attack")
    attack.add_argument("--clients", type=int, default=8)
    attack.add_argument("--iterations", type=int, default=50)
    attack.add_argument("--nodes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if args.part == "index":
        bench_index(args.records, args.rounds)
    elif args.part == "psnr":
        bench_psnr(args.images, args.idlg)
    elif args.part == "attack":
        bench_attack(args.clients, args.iterations, args.nodes)
    elif args.part == "long":
        bench_long(args.clients, args.rounds, args.sets, args.tag)
    elif args.part == "overhead":
        bench_overhead(
            args.clients,
            dict(zip(args.clients, args.fractions, strict=True)),
            args.rounds,
            dict(zip(args.clients, args.pairs, strict=True)),
            args.sets,
            args.tag,
            tuple(args.variants),
        )
    else:
        bench_run(args.clients, args.rounds, args.fraction, args.examples, args.policy, args.dtype, args.batch)


if __name__ == "__main__":
    main()
