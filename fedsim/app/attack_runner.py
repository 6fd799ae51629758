"""Fan captured updates out to gradient-inversion attacks, as Ray tasks, writing each result as it finishes.

A job is one (attack, captured update). Results land in `runs/<id>/attacks/<attack>/<capture>/`:
`result.json` (written last: its presence means done), `reconstruction.safetensors`,
`reconstruction.png`, `snapshots.safetensors` and `animation.gif`. A re-run skips finished jobs and
retries failed ones; a crashed or diverged reconstruction is recorded as failed and never stops the others.
A capture store may come from someone else: its records are checked before they name a folder, and every
write must land inside the run's attacks folder.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attacks.contract import capture_states, declared_defenses, target_from_capture
from fedsim.captures import CaptureStore
from fedsim.errors import FedsimError
from fedsim.files import atomic_write_bytes, atomic_write_json, save_tensors
from fedsim.images import gif_bytes, grid, png_bytes

Progress = Callable[[dict], None]
RESULT = "result.json"
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x00-\x08\x0b-\x1f\x7f]")


@dataclass
class AttackJob:
    """One attack on one captured update."""

    run_dir: Path
    attack: str
    record: dict
    aware: bool = True  # a defense-aware attacker uses what the client declared (attacks.contract.target_from_capture)

    @property
    def name(self) -> str:
        """The job's folder name, built only from integers the record was checked to hold."""
        return f"round-{_whole(self.record, 'round'):04d}-client-{_whole(self.record, 'client')}"

    @property
    def label(self) -> str:
        """The attack's name in results and reports: `dlg`, or `dlg-unaware` for the defense-unaware attacker."""
        return self.attack if self.aware else f"{self.attack}-unaware"

    @property
    def out(self) -> Path:
        """The job's folder; refused unless it resolves inside the run's attacks folder (symlinks followed)."""
        base = Path(self.run_dir).resolve() / "attacks"
        out = (base / self.label / self.name).resolve()
        if not out.is_relative_to(base) or len(out.relative_to(base).parts) != 2:
            raise FedsimError(f"refusing to write {out}: it is outside {base}")
        return out

    def seed(self, base: int) -> int:
        """A seed per job that depends only on the run's seed and the capture, never on scheduling order."""
        # Flower draws node ids at random; the partition id and the round are what a re-run shares.
        who = self.record.get("partition_id", self.record["client"])
        return (base * 1_000_003 + zlib.crc32(f"{self.attack}/{self.record['round']}/{who}".encode())) % 2**31

    def result(self, warn: Callable[[str], None] | None = None) -> dict | None:
        """The job's stored result; None if there is none or it is unreadable (then it is recomputed)."""
        path = self.out / RESULT
        if not path.exists():
            return None
        try:
            result = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            result = None
        if not isinstance(result, dict) or not isinstance(result.get("status"), str):
            if warn:
                warn(f"{path} is unreadable (truncated, not JSON or wrong types); recomputing it")
            return None
        return result

    def status(self) -> str | None:
        result = self.result()
        return result["status"] if result else None

    def settings(self, options: dict, seed: int) -> dict:
        """What a finished result was made with: a re-run with other settings must not pass for done."""
        from attacks import ATTACKS

        effective = {**ATTACKS[self.attack].options(), **options}
        return _jsonable({"attack": self.attack, "options": effective, "defense_aware": self.aware, "seed": seed})

    def state(self, options: dict, seed: int, warn: Callable[[str], None] | None = None) -> str:
        """`done`, `todo` (never run, failed or unreadable) or `other` (done, with other settings)."""
        result = self.result(warn)
        if result is None or result["status"] != "ok":
            return "todo"
        return "done" if result.get("settings") == self.settings(options, seed) else "other"


def _whole(record: dict, key: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise FedsimError(f"capture record's {key} must be a whole number >= 0, got {_shown(value)}")
    return value


def _shown(value: Any) -> str:
    return clean_text(repr(value))[:80]


def clean_text(text: str, limit: int = 2000) -> str:
    """`text` without terminal escape codes or control characters, on one line: safe to store and print."""
    return _ESCAPES.sub("", str(text).replace("\n", " ").replace("\t", " "))[:limit]


def plan(
    run_dir: Path,
    attacks: list[str],
    rounds: set[int] | None = None,
    clients: set[int] | None = None,
    max_batch: int = 64,
    aware: bool = True,
) -> tuple[list[AttackJob], list[dict]]:
    """The jobs for `attacks` on the run's captured updates, and the captures skipped (with why)."""
    store = CaptureStore(run_dir / "captures")
    jobs, skipped = [], []
    wanted = sorted(rounds) if rounds else None  # only these rounds' lines are read (the store's index)
    globals_seen = {r["round"] for r in store.records("global", rounds=wanted)}
    for record in store.records("update", rounds=wanted):
        if rounds and record["round"] not in rounds:
            continue
        if clients and record.get("partition_id") not in clients:
            continue
        if record["round"] not in globals_seen:
            skipped.append({**_ident(record), "reason": "the global model of this round was not captured"})
            continue
        if (record.get("num_examples") or 0) > max_batch:  # None: the client did not say
            skipped.append(
                {
                    **_ident(record),
                    "reason": f"{record['num_examples']} examples behind the update "
                    f"(more than --max-batch {max_batch})",
                }
            )
            continue
        jobs.extend(AttackJob(run_dir, attack, record, aware) for attack in attacks)
    return jobs, skipped


def _ident(record: dict) -> dict:
    ident = {"round": record["round"], "client": record["client"], "partition_id": record.get("partition_id")}
    return {**ident, "aggregate_of": record["aggregate_of"]} if record.get("aggregate_of") else ident


def execute(
    payloads: list[dict],
    attack: str,
    options: dict,
    device: str | None,
    report: Callable[[str, int, float], None] | None = None,
) -> list[dict]:
    """Run one attack on one or more captures (several: batched on one device). Never raises."""
    from attacks import get_attack
    from attacks.base import reconstruct_many

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    try:
        attacker = get_attack(attack, **options)
        targets = [target_from_capture(p["global"], p["client"], p["record"], p.get("aware", True)) for p in payloads]
        if len(targets) == 1:
            name = payloads[0]["name"]
            progress = (lambda it, loss: report(name, it, loss)) if report else None
            results = [attacker.reconstruct(targets[0], seed=payloads[0]["seed"], device=device, progress=progress)]
        else:
            results = reconstruct_many(attacker, targets, seed=payloads[0]["seed"], device=device)
    except Exception as exc:  # a crashed or diverged reconstruction is reported, never fatal to the others
        return [
            {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "seconds": time.time() - start}
            for _ in payloads
        ]
    outcomes = []
    for result in results:
        outcomes.append(
            {
                "status": "ok",
                "images": result.images.cpu(),
                "labels": result.labels.cpu(),
                "loss": float(result.loss),
                "history": result.history,
                "info": result.info,
                "snapshots": [(int(i), s.cpu()) for i, s in result.snapshots],
                "seconds": time.time() - start,
                "device": str(device),
            }
        )
    return outcomes


def write_result(job: AttackJob, outcome: dict, options: dict, seed: int = 0) -> dict:
    """Store one finished job; result.json goes last so a crash never leaves a half-done job marked done."""
    out = job.out  # refused before anything is written if it would land outside the run
    summary = {
        "status": outcome["status"],
        "attack": job.label,
        "method": job.attack,
        "defense_aware": job.aware,
        "declared": declared_defenses(job.record),
        **_ident(job.record),
        "recipe": job.record.get("recipe"),
        "num_examples": job.record.get("num_examples"),
        "options": options,
        "settings": job.settings(options, seed),
        "seconds": round(outcome.get("seconds", 0.0), 3),
    }
    if outcome.get("node"):
        summary["node"] = outcome["node"]  # the Ray node it ran on
    if outcome["status"] == "ok":
        images, snapshots = outcome["images"], outcome["snapshots"]
        save_tensors(out / "reconstruction.safetensors", {"images": images, "labels": outcome["labels"]})
        atomic_write_bytes(out / "reconstruction.png", png_bytes(grid(images)))
        if snapshots:
            save_tensors(out / "snapshots.safetensors", {f"it{i:06d}": s for i, s in snapshots})
            atomic_write_bytes(out / "animation.gif", gif_bytes([s for _, s in snapshots]))
        summary.update(
            loss=outcome["loss"],
            labels=outcome["labels"].tolist(),
            info=_jsonable(outcome["info"]),
            history=_jsonable(outcome["history"]),
            device=outcome.get("device"),
        )
    else:
        summary["reason"] = clean_text(outcome["reason"])
    atomic_write_json(out / RESULT, summary)
    return summary


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _payload(job: AttackJob, store: CaptureStore, seed: int) -> dict:
    global_state, client_state = capture_states(store, job.record)
    return {
        "name": f"{job.label} round {job.record['round']} client {job.record.get('partition_id')}",
        "record": job.record,
        "seed": job.seed(seed),
        "aware": job.aware,
        "global": global_state,
        "client": client_state,
    }


def _load_group(group: list[AttackJob], seed: int, options: dict, emit: Progress) -> tuple[list, list, list]:
    """Payloads of the jobs whose captures load; a corrupt capture fails its own job only."""
    store = CaptureStore(group[0].run_dir / "captures")
    jobs, payloads, summaries = [], [], []
    for job in group:
        try:
            payloads.append(_payload(job, store, seed))
            jobs.append(job)
        except Exception as exc:  # a corrupt or hostile capture fails its own job only
            reason = str(exc) if isinstance(exc, FedsimError) else f"{type(exc).__name__}: {exc}"
            summaries += _finish([job], [{"status": "failed", "reason": reason}], options, seed, emit)
    return jobs, payloads, summaries


def run_attacks(
    jobs: list[AttackJob],
    options: dict[str, dict] | None = None,
    *,
    seed: int = 0,
    executor: str = "ray",
    num_cpus: float = 1,
    num_gpus: float = 0,
    batch: int = 1,
    device: str | None = None,
    on_event: Progress | None = None,
    redo: bool = True,
) -> list[dict]:
    """Run `jobs` (skipping finished ones), writing each result as it finishes; returns their summaries.

    A result made with other settings (options, seed) is recomputed when `redo`, else kept.
    """
    options = options or {}
    emit = on_event or (lambda event: None)
    states = triage(jobs, options, seed, lambda line: emit({"event": "warning", "message": line}))
    todo = states["todo"] + (states["other"] if redo else [])
    groups: list[list[AttackJob]] = []
    for label in dict.fromkeys(job.label for job in todo):
        same = [job for job in todo if job.label == label]
        groups.extend(same[i : i + batch] for i in range(0, len(same), batch))
    emit({"event": "start", "total": len(jobs), "todo": len(todo)})
    if executor == "local":
        return _run_local(groups, options, seed, device, emit)
    if executor == "ray":
        return _run_ray(groups, options, seed, num_cpus, num_gpus, device, emit)
    raise FedsimError(f"executor {executor!r} is not known; choose ray or local")


def triage(
    jobs: list[AttackJob], options: dict[str, dict], seed: int, warn: Callable[[str], None] | None = None
) -> dict[str, list[AttackJob]]:
    """The jobs by state: `done`, `todo` (never run, failed, unreadable), `other` (done with other settings)."""
    states: dict[str, list[AttackJob]] = {"done": [], "todo": [], "other": []}
    for job in jobs:
        states[job.state(options.get(job.attack, {}), seed, warn)].append(job)
    return states


def _finish(group: list[AttackJob], outcomes: list[dict], options: dict, seed: int, emit: Progress) -> list[dict]:
    summaries = []
    for job, outcome in zip(group, outcomes, strict=True):
        summary = write_result(job, outcome, options.get(job.attack, {}), seed)
        summaries.append(summary)
        emit({"event": "done", **summary})
    return summaries


def _run_local(groups, options, seed, device, emit) -> list[dict]:
    summaries = []
    for group in groups:
        group, payloads, failed = _load_group(group, seed, options, emit)
        summaries += failed
        if not group:
            continue
        report = lambda name, it, loss: emit({"event": "loss", "job": name, "iteration": it, "loss": loss})  # noqa: E731
        outcomes = execute(payloads, group[0].attack, options.get(group[0].attack, {}), device, report)
        summaries += _finish(group, outcomes, options, seed, emit)
    return summaries


def _run_ray(groups, options, seed, num_cpus, num_gpus, device, emit) -> list[dict]:
    """One Ray task per group: on this machine, or on the cluster RAY_ADDRESS names."""
    import ray
    from ray.util.queue import Queue

    started_here = not ray.is_initialized()
    if started_here:
        from fedsim.app.ray_cluster import init
        from fedsim.app.simulation import OFFLINE_FLOWER, flower_offline

        flower_offline()  # also Ray's quiet settings
        init(OFFLINE_FLOWER, include_dashboard=False, log_to_driver=False, logging_level="error")
    try:
        losses = Queue()

        @ray.remote
        def task(payloads: list[dict], attack: str, attack_options: dict) -> list[dict]:
            last = [0.0]

            def report(name: str, it: int, loss: float) -> None:
                if time.time() - last[0] > 0.5:  # throttled: the queue is an actor
                    last[0] = time.time()
                    try:
                        losses.put_nowait((name, it, loss))
                    except Exception:  # the queue's actor was lost: progress is only for the display
                        pass

            from fedsim.app.ray_cluster import current_node

            node = current_node()  # where each reconstruction ran, kept in its result.json
            return [{**outcome, "node": node} for outcome in execute(payloads, attack, attack_options, device, report)]

        pending, summaries = {}, []
        for group in groups:
            group, payloads, failed = _load_group(group, seed, options, emit)
            summaries += failed
            if not group:
                continue
            ref = task.options(num_cpus=num_cpus, num_gpus=num_gpus).remote(
                payloads, group[0].attack, options.get(group[0].attack, {})
            )
            pending[ref] = (group, payloads)
        progress = True
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            try:
                while progress and not losses.empty():
                    name, it, loss = losses.get_nowait()
                    emit({"event": "loss", "job": name, "iteration": it, "loss": loss})
            except ray.exceptions.RayError:  # the queue's actor was lost (e.g. to Ray's memory monitor): no progress
                progress = False
            for ref in done:
                group, payloads = pending.pop(ref)
                try:
                    outcomes = ray.get(ref)
                except ray.exceptions.OutOfMemoryError:  # Ray's memory monitor killed the worker: once more, here
                    emit({"event": "warning", "message": f"{group[0].label}: its worker was killed for memory; "
                          "running it in this process"})  # fmt: skip
                    outcomes = execute(payloads, group[0].attack, options.get(group[0].attack, {}), device)
                except Exception as exc:  # the worker itself died
                    outcomes = [{"status": "failed", "reason": f"worker failed: {exc}"} for _ in group]
                summaries += _finish(group, outcomes, options, seed, emit)
        return summaries
    finally:
        if started_here:
            ray.shutdown()
