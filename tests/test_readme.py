"""The README's library example runs as printed: against captures written as the server writes them, and a real run."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO
from tests.test_attack_runner import make_run


def readme_example() -> str:
    """The README's one python block."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1, f"README.md should hold one python example, found {len(blocks)}"
    return blocks[0]


def run_example(workdir: Path, monkeypatch) -> dict:
    """Execute the example in `workdir` (where it finds runs/leak) and return its variables."""
    monkeypatch.chdir(workdir)
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102 - the repository's own README
    return namespace


def test_readme_example_reconstructs_a_captured_update(tmp_path, monkeypatch, capsys):
    # A FedSGD update of one real CIFAR-10 image through the analytic attack's MLP: small enough for the fast suite.
    make_run(tmp_path / "runs" / "leak", clients=1)
    found = run_example(tmp_path, monkeypatch)
    assert found["update"]["kind"] == "update"
    assert found["metrics"]["psnr_mean"] > 30
    assert found["metrics"]["labels_correct"] == [True]
    assert re.fullmatch(r"PSNR \d+\.\d dB, label right: \[True\]\n", capsys.readouterr().out)
