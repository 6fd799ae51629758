"""`fedsim attack` and `fedsim report` on a capture store from someone else: no escape, no injection, no traceback."""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fedsim.errors import FedsimError
from tests.test_attack_runner import make_run

ANALYTIC = ["--attack", "analytic", "--executor", "local"]


def fedsim(capsys, *args) -> tuple[int, str, str]:
    """The CLI's entry point, in this process: (exit status, stdout, stderr). Any other exception fails the test."""
    from fedsim.app import cli

    argv, sys.argv = sys.argv, ["fedsim", *map(str, args)]
    cli.console.soft_wrap = True  # long paths on one line, as a wide terminal shows them
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.argv, cli.console.soft_wrap = argv, False
    out = capsys.readouterr()
    return code, " ".join(out.out.split()), out.err


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def changed_outside(before: dict, after: dict, run_dir: Path) -> list[str]:
    inside = str(run_dir) + "/"
    return sorted(p for p in set(before) | set(after) if not p.startswith(inside) and before.get(p) != after.get(p))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "captures" / "manifest.jsonl").read_text().splitlines()]


def write_records(run_dir: Path, recs: list) -> None:
    (run_dir / "captures" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A real capture store of two FedSGD updates, built once and copied for each case."""
    root = tmp_path_factory.mktemp("base")
    make_run(root / "run", clients=2)
    return root / "run"


@pytest.fixture
def run_dir(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "runs" / "run")
    return tmp_path / "runs" / "run"


def test_a_client_naming_a_path_never_writes_outside_the_run(run_dir, tmp_path, capsys):
    recs = records(run_dir)
    for r in recs:
        if r["kind"] == "update":
            r["client"] = "/../../../../elsewhere"
    write_records(run_dir, recs)
    before = snapshot(tmp_path)
    code, out, err = fedsim(capsys, "attack", run_dir, *ANALYTIC)
    line = one_error_line(err)  # the capture store's schema refuses the record, naming its line and field
    assert code == 2 and "manifest.jsonl, line" in line and "field client" in line
    assert changed_outside(before, snapshot(tmp_path), run_dir) == []
    assert not (run_dir / "attacks").exists()


def test_job_folders_are_confined_to_the_attacks_folder(run_dir, tmp_path, capsys):
    from fedsim.app.attack_runner import AttackJob, plan, write_result

    job = plan(run_dir, ["analytic"])[0][0]
    for client in ("../../x", "/etc/passwd", 1.5, True, -1, None):
        with pytest.raises(FedsimError, match="whole number"):
            _ = AttackJob(run_dir, "analytic", {**job.record, "client": client}).out
    with pytest.raises(FedsimError, match="outside"):
        write_result(AttackJob(run_dir, "../../../x", job.record), {"status": "failed", "reason": "r"}, {})
    # A store that arrives with its attacks folder a link to elsewhere is refused before anything is written.
    (tmp_path / "elsewhere").mkdir()
    (run_dir / "attacks").mkdir()
    (run_dir / "attacks" / "analytic").symlink_to(tmp_path / "elsewhere")
    before = snapshot(tmp_path)
    code, _, err = fedsim(capsys, "attack", run_dir, *ANALYTIC)
    assert code == 2 and "refusing to write" in one_error_line(err)
    assert changed_outside(before, snapshot(tmp_path), run_dir) == [] and not any((tmp_path / "elsewhere").iterdir())


@pytest.mark.parametrize("corrupt", ['{"status": "o', "not json", "[1, 2]", '{"status": 5}', "\xff\xfe"])
def test_an_unreadable_result_is_recomputed_with_a_warning(run_dir, tmp_path, capsys, corrupt):
    assert fedsim(capsys, "attack", run_dir, *ANALYTIC)[0] == 0
    result = run_dir / "attacks" / "analytic" / "round-0001-client-100" / "result.json"
    result.write_bytes(corrupt.encode("latin-1"))
    before = snapshot(tmp_path)
    code, out, err = fedsim(capsys, "attack", run_dir, *ANALYTIC)
    assert code == 0 and "1 already done, 1 reconstructed, 0 failed" in out
    warnings = [line for line in err.splitlines() if "unreadable" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "result.json" in warnings[0]
    assert json.loads(result.read_text())["status"] == "ok"
    assert changed_outside(before, snapshot(tmp_path), run_dir) == []


def test_a_re_run_with_other_options_refuses_unless_told_to_redo_or_keep(run_dir, capsys):
    assert fedsim(capsys, "attack", run_dir, *ANALYTIC)[0] == 0
    result = run_dir / "attacks" / "analytic" / "round-0001-client-100" / "result.json"
    settings = json.loads(result.read_text())["settings"]
    assert settings["attack"] == "analytic" and settings["defense_aware"] is True and settings["seed"] == 0
    assert settings["options"]["min_bias_grad"] == 1e-6
    assert "all 2 reconstructions already done" in fedsim(capsys, "attack", run_dir, *ANALYTIC)[1]

    other = [*ANALYTIC, "--option", "min_bias_grad=0.01"]
    code, _, err = fedsim(capsys, "attack", run_dir, *other)
    line = one_error_line(err)
    assert code == 2 and "2 finished result(s)" in line and "--redo" in line and "--keep" in line
    for flags in (["--seed", "3"], ["--defense-aware"]):
        assert fedsim(capsys, "attack", run_dir, *ANALYTIC, *flags)[0] == (2 if flags[0] == "--seed" else 0)

    code, out, _ = fedsim(capsys, "attack", run_dir, *other, "--keep")
    assert code == 0 and "all 2 reconstructions already done" in out
    assert json.loads(result.read_text())["settings"] == settings
    code, out, _ = fedsim(capsys, "attack", run_dir, *other, "--redo")
    assert code == 0 and "0 already done, 2 reconstructed" in out
    assert json.loads(result.read_text())["settings"]["options"]["min_bias_grad"] == 0.01
    assert "already done" in fedsim(capsys, "attack", run_dir, *other)[1]
    assert "contradict" in one_error_line(fedsim(capsys, "attack", run_dir, *other, "--redo", "--keep")[2])


def test_exit_status_is_1_when_every_job_failed(run_dir, capsys):
    (run_dir / "captures" / "round-0001" / "client-100.safetensors").write_bytes(b"junk")
    code, out, _ = fedsim(capsys, "attack", run_dir, *ANALYTIC)
    assert code == 0 and "1 reconstructed, 1 failed" in out  # one failure among successes is a result
    (run_dir / "captures" / "round-0001" / "client-101.safetensors").write_bytes(b"junk")
    shutil.rmtree(run_dir / "attacks")
    code, out, err = fedsim(capsys, "attack", run_dir, *ANALYTIC)
    line = one_error_line(err)
    assert code == 1 and "all 2 reconstruction(s) failed" in line and "result.json" in line


def test_a_truncated_last_manifest_line_is_named(run_dir, capsys, caplog):
    manifest = run_dir / "captures" / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + '{"kind": "update", "rou')
    code, out, _ = fedsim(capsys, "attack", run_dir, *ANALYTIC)
    warnings = [r.getMessage() for r in caplog.records if "cut off" in r.getMessage()]
    assert code == 0 and "2 reconstructed" in out
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and str(manifest) in warnings[0]


def test_failure_reasons_carry_no_terminal_escapes(run_dir, capsys):
    from fedsim.app.attack_runner import plan, write_result

    # A reason that arrives with terminal codes is written without them.
    job = plan(run_dir, ["analytic"])[0][0]
    write_result(job, {"status": "failed", "reason": "\x1b[31mred\x1b[0m\x07[bold]x[/]"}, {})
    result = json.loads((job.out / "result.json").read_text())
    assert result["reason"] == "red[bold]x[/]"
    # A record whose file name carries them is refused by the store's schema, and the line shows no codes.
    recs = records(run_dir)
    for r in recs:
        if r["kind"] == "update":
            r["file"] = "round-0001/\x1b[31mred\x1b[0m\x07[bold]x[/].safetensors"
    write_records(run_dir, recs)
    code, out, err = fedsim(capsys, "attack", run_dir, *ANALYTIC)
    assert code == 2 and "\x1b" not in out + err and "\x07" not in out + err
    assert "field file" in one_error_line(err)


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("iterations=abc", ["--option iterations='abc'", "must be an integer", "default 300"]),
        ("nokey", ["--option 'nokey' must look like key=value", "e.g. --option iterations=100"]),
        ("rescues=-1", ["--option rescues=-1", "rescues must be 0 or more", "dlg's options: ", "iterations"]),
        ("unknown=1", ["--option unknown", "dlg has no option 'unknown'", "its options: ", "rescues"]),
        ("lr=nan", ["--option lr=nan", "a finite number"]),
        ("unroll=1", ["--option unroll=1", "true or false"]),
        ("image_param=3", ["--option image_param=3", "a string"]),
        ("idlg.lr=1", ["--option idlg.lr", "not among the attacks"]),
    ],
)
def test_option_mistakes_name_the_option_flag(run_dir, capsys, option, expected):
    code, _, err = fedsim(capsys, "attack", run_dir, "--attack", "dlg", "--executor", "local", "--option", option)
    line = one_error_line(err)
    assert code == 2 and "--set" not in line and all(text in line for text in expected), line


# ----------------------------------------------------------------------------------------------
# Fuzz: mutate one field of one manifest record, then attack and report.
# ----------------------------------------------------------------------------------------------

HTML = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']
PATHS = ["../../x", "/etc/passwd", "a/../../b", "/../../../../elsewhere"]
VALUES = ["x", 7, -3, 2.5, [1], {"a": 1}, None, math.nan, math.inf, *PATHS, *HTML]
FIELDS = ["kind", "round", "client", "file", "model", "input_shape", "num_classes", "trainable", "recipe"]
FIELDS += ["num_examples", "partition_id"]


class Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = Missing()


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.bad: list = []

    def handle_starttag(self, tag, attrs):
        if tag == "script" or any(name.startswith("on") for name, _ in attrs):
            self.bad.append((tag, attrs))


def cases(n: int = 60, seed: int = 0) -> list:
    """Every path and HTML string in the fields that name folders or reach the page first (quick), then random."""
    fixed = [(1, field, value) for field in ("client", "file") for value in PATHS + HTML]
    fixed += [(0, "round", "../../x"), (1, "model", HTML[0]), (2, "recipe", {"recipe": HTML[1]}), (2, "kind", 7)]
    fixed += [(1, "num_examples", None)]  # once compared with --max-batch as it came
    rng = random.Random(seed)
    more = [(rng.randrange(3), rng.choice(FIELDS), rng.choice([*VALUES, MISSING])) for _ in range(n - len(fixed))]
    return fixed + [pytest.param(*case, marks=pytest.mark.slow) for case in more]


@pytest.mark.parametrize(("index", "field", "value"), cases(), ids=lambda v: repr(v)[:24])
def test_mutated_records_never_escape_inject_or_crash(run_dir, tmp_path, capsys, index, field, value):
    recs = records(run_dir)
    if value is MISSING:
        recs[index].pop(field, None)
    else:
        recs[index][field] = value
    write_records(run_dir, recs)
    before = snapshot(tmp_path)
    code, out, err = fedsim(capsys, "attack", run_dir, *ANALYTIC, "--option", "cpu_threads=1")
    assert code in (0, 1, 2) and "Traceback" not in err
    if code == 2:
        one_error_line(err)
    code, out, err = fedsim(capsys, "report", run_dir)
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        one_error_line(err)
    assert changed_outside(before, snapshot(tmp_path), run_dir) == []
    page = run_dir / "report.html"
    if page.exists():
        tags = Tags()
        tags.feed(page.read_text())
        assert tags.bad == []


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("input_shape", [3, 100_000, 100_000], "input_shape"),
        ("input_shape", [3, 12, True], "input_shape"),
        ("num_classes", 10**12, "num_classes"),
        ("file", "../../../outside.safetensors", "leads outside the capture store"),
        ("partition_id", [0], "partition_id"),
    ],
)
def test_a_record_that_would_hang_or_escape_is_refused(run_dir, tmp_path, capsys, field, value, expected):
    recs = records(run_dir)
    recs[1][field] = value
    write_records(run_dir, recs)
    (tmp_path / "outside.safetensors").write_bytes(  # a real capture where the path points: still refused
        (run_dir / "captures" / recs[2]["file"]).read_bytes()
    )
    before = snapshot(tmp_path)
    code, _, err = fedsim(capsys, "attack", run_dir, *ANALYTIC)
    line = one_error_line(err)
    assert code == 2 and "manifest.jsonl, line 2" in line and f"field {field}" in line and expected in line, line
    assert changed_outside(before, snapshot(tmp_path), run_dir) == []
