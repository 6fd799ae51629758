"""CPU-seconds of a `fedsim run`, per process and per driver thread: what capturing costs, less load-bound than wall.

    python benchmarks/scale_cpu.py --clients 1000 --rounds 3 --capture true --set fraction-train=0.05 \
        --set batch-size=1 --set eval-examples=500 --tag curious-1000

    python benchmarks/scale_cpu.py writer --rounds 8

The run is started in a child process through `driver` below, which names the driver's Python threads (so that
/proc shows which thread spent what) and, with --profile, runs cProfile in the ServerApp thread and in the capture
writer thread. The parent samples the CPU time (utime + stime) of every process of the run's tree, and of every
thread of the driver, from /proc every 0.2 s, keeping the last value seen of each; wall time depends on the load
of the machine, CPU-seconds much less. SCALE_CPU_VARIANT=old runs the capture writer as it was before
`fedsim.files.tensor_parts` (safetensors' bytes, one write and fchmod per file), `nosync` skips its fsyncs and
`drop` its writes, to compare with plain runs. `--code DIR` runs the fedsim of another tree (a checkout of an
older commit) under the same measurement. Each round's `capture-seconds` (training.jsonl) comes back as
`capture_s`; with --profile, the cumulative seconds of each function of server/curious.py as `curious_cumtime`.

`writer` writes rounds of 50 ConvNet updates with the old and the new writer, alone and beside a thread that runs
Python all the time, and writes results/scale-cpu-writer.json.

    python benchmarks/scale_cpu.py replies --repeat 30 [--code DIR] [--tag after]

`replies` times what the ServerApp thread does with a round of 50 ConvNet replies before it hands them to the
writer: flwr's `ArrayRecord.to_torch_state_dict` (how the capture read a reply before `record_arrays`),
`server.reply_arrays.record_arrays` (when DIR has it), and the whole `CuriousStrategy._capture_round` with the writes
left out, of the fedsim tree DIR (default: this one; a checkout of an older commit times its capture path), and
writes results/scale-cpu-replies[-<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = Path(os.environ.get("FEDSIM_SHARED_DATA", ROOT.parent / "shared" / "data"))
TICK = os.sysconf("SC_CLK_TCK")


def _stat(path: str) -> tuple[str, int, float] | None:
    """(comm, parent pid, CPU seconds) from a /proc stat file."""
    try:
        text = Path(path).read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return ""


def sample(root: int, procs: dict, threads: dict) -> None:
    parents: dict[int, int] = {}
    seen: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(f"/proc/{entry}/stat")) is not None:
            parents[int(entry)] = st[1]
            seen[int(entry)] = (st[0], st[2])
    tree, todo = set(), [root]
    while todo:
        p = todo.pop()
        tree.add(p)
        todo.extend(c for c, parent in parents.items() if parent == p and c not in tree)
    for pid in tree:
        if pid in seen:
            old = procs.get(pid)
            procs[pid] = {
                "comm": seen[pid][0],
                "cmd": old["cmd"] if old and old["cmd"] else _cmdline(pid),
                "cpu_s": seen[pid][1],
            }
    try:
        for tid in os.listdir(f"/proc/{root}/task"):
            if (st := _stat(f"/proc/{root}/task/{tid}/stat")) is not None:
                threads[int(tid)] = {"name": st[0], "cpu_s": st[2]}
    except OSError:
        pass


def kind(row: dict) -> str:
    cmd = row["cmd"]
    if "driver" in cmd and "scale_cpu" in cmd:
        return "driver"
    if "ClientAppActor" in row["comm"] or "ClientAppActor" in cmd:
        return "client actors"
    if "ray::" in row["comm"] or "default_worker" in cmd:
        return "other ray workers"
    return "ray daemons (" + row["comm"] + ")"


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "driver", "--profile-dir", str(Path(tmp) / "prof") if args.profile else "-"]
        cmd += ["run", "--dataset", "mnist", "--data-dir", str(DATA), "--clients", str(args.clients)]
        cmd += ["--rounds", str(args.rounds), "--out-dir", tmp, "--name", "r", "--set", f"capture={args.capture}"]
        cmd += [a for s in args.set for a in ("--set", s)]
        cpu_file = Path(tmp) / "threads.jsonl"
        code = args.code.resolve()
        env = {**os.environ, "PYTHONPATH": str(code), "RAY_memory_monitor_refresh_ms": "0"}
        env["SCALE_CPU_THREADS"], env["SCALE_CPU_CODE"] = str(cpu_file), str(code)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=code, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs: dict = {}
        threads: dict = {}
        import threading

        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
        reader.start()
        while proc.poll() is None:
            sample(proc.pid, procs, threads)
            time.sleep(0.2)
        reader.join()
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"run failed:\n{out[0][-3000:]}")
        lines = [json.loads(x) for x in (Path(tmp) / "r" / "training.jsonl").read_text().splitlines()]
        times = [r["time"] for r in lines if r.get("round", 0) >= 1]
        capture_s = [r["capture-seconds"] for r in lines if r.get("round", 0) >= 1 and "capture-seconds" in r]
        exact = {
            k: v if k == "gc" else round(v, 3)
            for line in cpu_file.read_text().splitlines()
            for k, v in json.loads(line).items()
        }
        stats = {}
        if args.profile:
            import pstats

            for prof in sorted((Path(tmp) / "prof").glob("*.prof")):
                s = pstats.Stats(str(prof))
                s.sort_stats("tottime")
                rows = sorted(s.stats.items(), key=lambda kv: -kv[1][2])[:25]
                curious = {  # the curious wrapper's own functions, with what they call (cumulative seconds)
                    f"{name}": round(v[3], 4) for (f, _, name), v in s.stats.items() if f.endswith("server/curious.py")
                }
                stats[prof.stem] = {
                    "total_s": round(s.total_tt, 3),
                    "curious_cumtime": dict(sorted(curious.items(), key=lambda kv: -kv[1])),
                    "top_tottime": [
                        {
                            "fn": f"{Path(f).name}:{line}:{name}",
                            "calls": v[1],
                            "tottime": round(v[2], 4),
                            "cumtime": round(v[3], 4),
                        }
                        for (f, line, name), v in rows
                    ],
                }
    groups: dict[str, float] = {}
    for row in procs.values():
        groups[kind(row)] = groups.get(kind(row), 0.0) + row["cpu_s"]
    named: dict[str, float] = {}
    for row in threads.values():
        named[row["name"]] = named.get(row["name"], 0.0) + row["cpu_s"]
    return {
        "capture": args.capture,
        "variant": os.environ.get("SCALE_CPU_VARIANT", ""),
        "wall_s": round(wall, 2),
        "code": str(args.code.resolve()),
        "round_s": [round(b - a, 3) for a, b in zip(times, times[1:], strict=False)],
        "capture_s": capture_s,
        "cpu_s_by_kind": {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "cpu_s_total": round(sum(groups.values()), 2),
        "thread_time_s": exact,
        "driver_threads_cpu_s": {k: round(v, 2) for k, v in sorted(named.items(), key=lambda kv: -kv[1]) if v >= 0.05},
        "profiles": stats,
    }


def driver(profile_dir: str, argv: list[str]) -> None:
    """Run the fedsim CLI with named threads (and cProfile in the ServerApp and writer threads)."""
    import cProfile
    import ctypes
    import threading

    libc = ctypes.CDLL(None)

    def name(label: str) -> None:
        libc.prctl(15, label.encode()[:15], 0, 0, 0)  # PR_SET_NAME: /proc/<pid>/task/<tid>/comm

    sys.path.insert(0, os.environ.get("SCALE_CPU_CODE", str(ROOT)))
    from fedsim import captures
    from server import server_app

    profiles = Path(profile_dir) if profile_dir != "-" else None
    if profiles:
        profiles.mkdir(parents=True, exist_ok=True)

    thread_cpu = Path(os.environ["SCALE_CPU_THREADS"])

    def profiled(label: str, fn, *a, **kw):
        name(label)
        try:
            if profiles is None:
                return fn(*a, **kw)
            prof = cProfile.Profile()
            try:
                return prof.runcall(fn, *a, **kw)
            finally:
                prof.dump_stats(str(profiles / f"{label}.prof"))
        finally:  # the thread's own CPU time, exact (the /proc samples may miss its last 0.2 s)
            with open(thread_cpu, "a") as f:
                f.write(json.dumps({label: time.thread_time()}) + "\n")

    run_writer = captures.BackgroundWriter._run
    captures.BackgroundWriter._run = lambda self: profiled("capture-writer", run_writer, self)
    run_server = server_app.run_server

    def server(*a, **kw):
        return profiled("serverapp", run_server, *a, **kw)

    server_app.run_server = server
    start = threading.Thread.start

    def named_start(self):  # every other Python thread carries its Python name (first 15 characters)
        run = self.run

        def run_named():
            if self.name not in ("capture-writer",):
                name("py-" + self.name.replace("Thread-", "T")[:12])
            run()

        self.run = run_named
        start(self)

    threading.Thread.start = named_start
    import gc

    collections: dict[str, list[float]] = {}
    started: dict[int, float] = {}

    def on_gc(phase: str, info: dict) -> None:  # every collection in the driver: which generation, how long
        if phase == "start":
            started[threading.get_ident()] = time.perf_counter()
        elif threading.get_ident() in started:
            row = collections.setdefault(f"gen{info['generation']}", [0, 0.0])
            row[0] += 1
            row[1] += time.perf_counter() - started.pop(threading.get_ident())

    gc.callbacks.append(on_gc)
    import atexit

    atexit.register(lambda: thread_cpu.open("a").write(json.dumps({"gc": collections}) + "\n"))
    variant = os.environ.get("SCALE_CPU_VARIANT", "")
    if variant == "old":  # the writer before tensor_parts: safetensors' serialisation into one bytes object
        import fedsim.files
        from fedsim.files import tensor_bytes

        for module in (captures, fedsim.files):  # updates (captures) and the global weights (files.save_tensors)
            module.tensor_parts = lambda state, meta=None: tensor_bytes(state, meta)
            module.atomic_write_many = old_write_many
    elif variant == "drop":  # the captures are converted and handed over, but never written: isolates the writer
        captures.BackgroundWriter.submit = lambda self, job: None
    elif variant == "nosync":  # written, never synced: isolates fsync
        import fedsim.files

        fedsim.files.os.fsync = lambda fd: None
    sys.argv = ["fedsim", *argv]
    from fedsim.app.cli import main

    main()


def old_write_many(files: list) -> None:
    """fedsim.files.atomic_write_many as it was before tensor_parts (the baseline of `writer`): per file mkdir,
    mkstemp, fdopen, fchmod, one write of safetensors' bytes, flush; then fsync and close each; then rename."""
    import tempfile

    from fedsim.files import current_umask

    mode, pending = 0o666 & ~current_umask(), []
    for path, data in files:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        f = os.fdopen(fd, "wb")
        pending.append((path, tmp, f))
        os.fchmod(fd, mode)
        f.write(data)
        f.flush()
    for _, _, f in pending:
        os.fsync(f.fileno())
        f.close()
    for path, tmp, _ in pending:
        os.replace(tmp, path)


def writer_bench(rounds: int) -> dict:
    """One round of captures (50 ConvNet updates, as fedsim run hands them over) written by the old and the new
    writer, while a pure-Python thread (like Flower's loop that hands messages to the client actors) shares the GIL:
    the writer's CPU-seconds, its wall time, and the seconds that thread lost to it, per round (medians)."""
    import statistics
    import tempfile
    import threading

    sys.path.insert(0, str(ROOT))
    from flwr.app import ArrayRecord

    import fedsim.captures as captures
    from fedsim.files import atomic_write_many, tensor_bytes, tensor_parts
    from fedsim.models import build_model

    record = ArrayRecord(build_model("convnet", (1, 28, 28), 10, seed=0).state_dict())
    writers = {
        "before": (lambda state, meta=None: tensor_bytes(state, meta), old_write_many),
        "after": (tensor_parts, atomic_write_many),
    }
    result = {}
    for spin in (False, True):
        for label, (parts, write_many) in writers.items():
            captures.tensor_parts, captures.atomic_write_many = parts, write_many
            stop, count = threading.Event(), [0]

            def loop(stop: threading.Event, count: list[int]) -> None:
                table = {i: i for i in range(1000)}
                while not stop.is_set():
                    for key in table:
                        table.get(key)
                    count[0] += 1

            thread = threading.Thread(target=loop, args=(stop, count), daemon=True)
            if spin:
                thread.start()
            rows = []
            with tempfile.TemporaryDirectory() as tmp:
                store = captures.CaptureStore(tmp)
                for r in range(rounds + 1):
                    updates = [(n, record.to_torch_state_dict(), {"run": "x"}) for n in range(50)]
                    c0, t0, cpu0 = count[0], time.perf_counter(), time.thread_time()
                    store.write_updates(r, updates)
                    cpu, wall, spins = time.thread_time() - cpu0, time.perf_counter() - t0, count[0] - c0
                    c1, t1 = count[0], time.perf_counter()
                    time.sleep(0.3)
                    rate = (count[0] - c1) / (time.perf_counter() - t1)
                    if r:  # round 0 warms up
                        rows.append((cpu, wall, wall - spins / rate if spin else 0.0))
            stop.set()
            key = f"{label}, {'beside a Python thread' if spin else 'alone'}"
            result[key] = {
                name: round(statistics.median(row[i] for row in rows), 4)
                for i, name in enumerate(("writer_cpu_s", "writer_wall_s", "other_thread_lost_s"))
            }
            print(key, result[key], flush=True)
    captures.tensor_parts, captures.atomic_write_many = tensor_parts, atomic_write_many
    return {
        "updates_per_round": 50,
        "mb_per_round": round(50 * len(tensor_bytes(record.to_torch_state_dict())) / 2**20, 1),
        "rounds": rounds,
        "load_average": os.getloadavg(),
        "results": result,
    }


def replies_bench(repeat: int, code: Path) -> dict:
    """CPU-seconds (the thread's own) and wall seconds to turn one round of 50 ConvNet replies into what the
    capture writer gets, medians of `repeat` rounds (one more first, to warm up)."""
    import statistics

    sys.path.insert(0, str(code))
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from fedsim.captures import CaptureStore
    from fedsim.models import build_model
    from server.curious import CuriousStrategy

    state = build_model("convnet", (1, 28, 28), 10, seed=0).state_dict()
    replies = []
    for node in range(50):
        ids = {"run_id": 1, "message_id": f"r{node}", "src_node_id": 1000 + node, "dst_node_id": 0}
        ids.update(reply_to_message_id="i", group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
        content = {
            "arrays": ArrayRecord({k: v + node for k, v in state.items()}),
            "metrics": MetricRecord({"num-examples": 1, "train-loss": 0.5}),
            "fedsim": ConfigRecord({"partition-id": node}),
        }
        replies.append(Message(content=RecordDict(content), metadata=Metadata(**ids)))
    records = [r.content["arrays"] for r in replies]
    store = CaptureStore(Path(tempfile.mkdtemp()))
    store.write_updates = store.write_failures = lambda *a, **kw: None  # the ServerApp's side only
    strategy = CuriousStrategy(FedAvg(), store)
    cases = {
        "to_torch_state_dict": lambda: [r.to_torch_state_dict() for r in records],
        "capture_round": lambda: strategy._capture_round(1, replies),
    }
    try:
        from server.reply_arrays import record_arrays

        def checked() -> list[dict]:  # the tensors CuriousStrategy._state hands over
            return [{k: torch.from_numpy(v) for k, v in record_arrays(r).items()} for r in records]

        cases["record_arrays"] = checked
    except ImportError:
        pass
    result = {}
    for label, case in cases.items():
        rows = []
        for i in range(repeat + 1):
            wall, cpu = time.perf_counter(), time.thread_time()
            case()
            if i:
                rows.append((time.thread_time() - cpu, time.perf_counter() - wall))
        result[label] = {
            "cpu_s": round(statistics.median(r[0] for r in rows), 5),
            "wall_s": round(statistics.median(r[1] for r in rows), 5),
        }
        print(label, result[label], flush=True)
    return {
        "code": str(code),
        "replies": len(replies),
        "mb_per_round": round(sum(a.count_bytes() for a in records) / 2**20, 1),
        "repeat": repeat,
        "load_average": os.getloadavg(),
        "results": result,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "driver":
        return driver(sys.argv[3], sys.argv[4:])
    if len(sys.argv) > 1 and sys.argv[1] == "writer":
        rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 8
        result = {"command": "python benchmarks/scale_cpu.py " + " ".join(sys.argv[1:]), **writer_bench(rounds)}
        (RESULTS / "scale-cpu-writer.json").write_text(json.dumps(result, indent=1) + "\n")
        return None
    if len(sys.argv) > 1 and sys.argv[1] == "replies":
        parser = argparse.ArgumentParser(prog="scale_cpu.py replies")
        parser.add_argument("--repeat", type=int, default=30)
        parser.add_argument("--code", type=Path, default=ROOT, help="the fedsim tree whose capture path is timed")
        parser.add_argument("--tag", default="")
        args = parser.parse_args(sys.argv[2:])
        result = {"command": "python benchmarks/scale_cpu.py " + " ".join(sys.argv[1:])}
        result.update(replies_bench(args.repeat, args.code.resolve()))
        name = f"scale-cpu-replies{'-' + args.tag if args.tag else ''}.json"
        (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")
        return None
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--capture", choices=("true", "false"), default="true")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--profile", action="store_true", help="cProfile the ServerApp and writer threads")
    parser.add_argument("--tag", default="", help="also write benchmarks/results/scale-cpu-<tag>.json")
    parser.add_argument("--code", type=Path, default=ROOT, help="the fedsim tree to run (e.g. an older commit's)")
    args = parser.parse_args()
    result = {"command": " ".join(sys.argv), **measure(args)}
    print(json.dumps(result, indent=1))
    if args.tag:
        (RESULTS / f"scale-cpu-{args.tag}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
