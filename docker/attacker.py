"""The attacker service: mirror the curious server's captures, attack them, write a report per run.

    python attacker.py --captures /var/lib/fedsim/captures --results /var/lib/fedsim/results

The captures volume is mounted read-only: the attacker cannot alter what the server captured. Every
`--interval` seconds each run folder under `--captures` is mirrored into `--results` (the manifest is read
first and written last, so the copy only lists tensors that are already complete in it); each run that
changed gets `fedsim attack <run>` (Ray inside; resumable, so finished reconstructions are skipped) and
`fedsim report <run>` (report.html). Attack names and resources come from the flags or from the environment:
FEDSIM_ATTACKS (default idlg), FEDSIM_ATTACK_NUM_CPUS (1), FEDSIM_ATTACK_NUM_GPUS (0),
FEDSIM_ATTACK_INTERVAL (15 s). `--once` does one pass and exits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from attacks import ATTACKS

MANIFEST = Path("captures") / "manifest.jsonl"


def runs_in(captures: Path) -> list[Path]:
    """Run folders under `captures`: those holding captures/manifest.jsonl."""
    if not captures.is_dir():
        return []
    return sorted(p for p in captures.iterdir() if p.is_dir() and (p / MANIFEST).is_file())


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def mirror(src: Path, dst: Path) -> bool:
    """Copy the new or changed files of run folder `src` into `dst`; True if anything changed.

    Files the attack and the report write into `dst` (attacks/, report.html, ...) are left alone. Hidden and
    temporary files (the capture store's `.name.*.tmp`) and symbolic links are never copied.
    """
    manifest = (src / MANIFEST).read_bytes()
    manifest = manifest[: manifest.rfind(b"\n") + 1]  # complete lines only
    changed = False
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if rel == MANIFEST or path.is_symlink() or not path.is_file():
            continue
        if any(part.startswith(".") for part in rel.parts) or path.name.endswith(".tmp"):
            continue
        target = dst / rel
        stat = path.stat()
        if target.is_file():
            have = target.stat()
            if have.st_size == stat.st_size and int(have.st_mtime) == int(stat.st_mtime):
                continue
        _copy_atomic(path, target)
        changed = True
    target = dst / MANIFEST
    if not target.is_file() or target.read_bytes() != manifest:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".manifest.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(manifest)
        os.replace(tmp, target)
        changed = True
    return changed


def attack_and_report(run: Path, attacks: str, num_cpus: str, num_gpus: str) -> bool:
    """`fedsim attack` then `fedsim report` on one mirrored run; False if either failed."""
    commands = [
        ["fedsim", "attack", str(run), "--attack", attacks, "--num-cpus", num_cpus, "--num-gpus", num_gpus],
        ["fedsim", "report", str(run)],
    ]
    for command in commands:
        print("$ " + " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            print(f"attacker: {' '.join(command[:2])} failed on {run.name}; retrying when it changes", flush=True)
            return False
    return True


def attack_names(text: str) -> str:
    """`--attack`: comma-separated names of the attack registry; an unknown one stops the attacker at start."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ATTACKS]
    if unknown or not names:
        choices = ", ".join(ATTACKS)
        raise argparse.ArgumentTypeError(f"unknown attack {', '.join(unknown) or repr(text)}; choose from: {choices}")
    return ",".join(names)


def main(argv: list[str] | None = None) -> None:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captures", type=Path, default=Path("/var/lib/fedsim/captures"))
    parser.add_argument("--results", type=Path, default=Path("/var/lib/fedsim/results"))
    parser.add_argument(
        "--attack",
        type=attack_names,
        default=env("FEDSIM_ATTACKS", "idlg"),
        help=f"comma-separated: {', '.join(ATTACKS)}",
    )
    parser.add_argument("--num-cpus", default=env("FEDSIM_ATTACK_NUM_CPUS", "1"))
    parser.add_argument("--num-gpus", default=env("FEDSIM_ATTACK_NUM_GPUS", "0"))
    parser.add_argument("--interval", type=float, default=float(env("FEDSIM_ATTACK_INTERVAL", "15")))
    parser.add_argument("--once", action="store_true", help="one pass, then exit")
    args = parser.parse_args(argv)

    print(f"attacker: watching {args.captures}, writing to {args.results} (attacks: {args.attack})", flush=True)
    pending = {run.name for run in runs_in(args.results)}  # finish what a previous attacker left
    while True:
        for run in runs_in(args.captures):
            if mirror(run, args.results / run.name):
                pending.add(run.name)
        for name in sorted(pending):  # a failure is retried when the run changes or the attacker restarts
            if attack_and_report(args.results / name, args.attack, args.num_cpus, args.num_gpus):
                print(f"attacker: report in {args.results / name / 'report.html'}", flush=True)
        pending.clear()
        if args.once:
            return
        time.sleep(args.interval)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
