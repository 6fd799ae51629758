"""The report page: every value from a client or a file is text on the page, never markup; what a page shows."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from fedsim.app.attack_runner import plan, run_attacks
from fedsim.app.report import write_report
from fedsim.config import FedsimConfig
from fedsim.datasets import load_dataset
from fedsim.errors import FedsimError
from tests.test_attack_runner import make_run

HOSTILE = '<script>alert("x")</script>'
HOSTILE_TAG = "<img src=x onerror=alert(1)>"  # a folder name can hold this (no slash in it)


class Page(HTMLParser):
    """Every element and attribute of a page, its visible text, and the card headings in page order."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.headings: list[str] = []
        self._in_heading = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_heading = tag == "h3"
        if self._in_heading:
            self.headings.append("")

    def handle_endtag(self, tag):
        self._in_heading = self._in_heading and tag != "h3"

    def handle_data(self, data):
        self.text.append(data)
        if self._in_heading:
            self.headings[-1] += data

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def assert_only_text(page: Page, *hostile: str) -> None:
    """No script, no event handler, no element the hostile strings could have made; they appear as text."""
    assert not [t for t, _ in page.tags if t == "script"]
    assert not [(t, a) for t, a in page.tags if any(name.startswith("on") for name in a)]
    assert all(a.get("src", "data:").startswith("data:") for t, a in page.tags if t == "img")
    for value in hostile:
        assert value in page.all_text, value


def photo_folder(root, classes: list[str], per_class: int = 4):
    """An image folder with `per_class` photos a class: with 4, every 5th image is never reached, no test split."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def hostile_run(tmp_path):
    """A scored run whose client replies, results, run folder and class names all carry markup."""
    run_dir = tmp_path / f"run {HOSTILE_TAG}"
    make_run(run_dir, clients=3)
    manifest = run_dir / "captures" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    # Clients name their own partitions; markup there is refused by the store's schema (tests/test_hostile.py).
    partition_ids = {100: 2, 101: 1, 102: 0}
    for record in records:
        if record["kind"] == "update":
            record["partition_id"] = partition_ids[record["client"]]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    folder = photo_folder(tmp_path / "photos", [f"{i} {HOSTILE_TAG}" for i in range(10)])
    config = FedsimConfig.from_mapping(
        {"dataset": "imagefolder", "data-dir": str(folder), "image-size": 12, "model": "mlp", "num-clients": 3}
    )
    (run_dir / "config.toml").write_text(config.to_toml())
    # What the server records when the dataset has no test images: an evaluation over nothing.
    (run_dir / "training.jsonl").write_text(json.dumps({"round": 1, "test-loss": 0.0, "test-accuracy": 0.0}) + "\n")
    assert len(run_attacks(plan(run_dir, ["analytic"])[0], executor="local")) == 3
    results = sorted((run_dir / "attacks" / "analytic").glob("*/result.json"))
    first, second = (json.loads(p.read_text()) for p in results[:2])
    first["info"]["objective"] = HOSTILE
    first["labels"] = [HOSTILE]
    # result files from elsewhere are untrusted too: a partition id with markup is shown as text
    second.update(status="failed", reason=HOSTILE, attack=HOSTILE, partition_id=HOSTILE)
    results[0].write_text(json.dumps(first))
    results[1].write_text(json.dumps(second))
    return run_dir


def test_markup_from_clients_and_files_is_text_on_the_report(hostile_run):
    page = Page(write_report(hostile_run).read_text())
    assert_only_text(page, HOSTILE, HOSTILE_TAG, f"client {HOSTILE}", f"fedsim report: run {HOSTILE_TAG}")
    assert f"recovered label {HOSTILE}" in page.all_text
    assert f"reconstruction failed: {HOSTILE}" in page.all_text
    assert f"objective: {HOSTILE}" in page.all_text


def test_cards_come_by_round_then_client(hostile_run):
    page = Page(write_report(hostile_run).read_text())
    clients = [h.rsplit("client ", 1)[1] for h in page.headings]
    assert clients == ["0", "2", HOSTILE]


def test_a_partition_id_with_markup_is_refused_before_any_attack(hostile_run):
    manifest = hostile_run / "captures" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    next(r for r in records if r["kind"] == "update")["partition_id"] = HOSTILE
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(FedsimError, match="field partition_id"):
        plan(hostile_run, ["analytic"])


def test_a_dataset_without_test_images_says_so(hostile_run):
    page = Page(write_report(hostile_run).read_text())
    assert "Global test accuracy: no test split" in page.all_text
    assert "0.0 %" not in page.all_text


def test_the_page_speaks_of_the_run_in_words_and_of_labels_by_class(hostile_run):
    page = Page(write_report(hostile_run).read_text())
    assert "3 clients, 3 rounds of FedAvg on your own photos, MLP" in page.all_text
    label = int(load_dataset("sample-cifar10").train_y[2])  # client 102 (partition 0) trained on image 2
    name = f"{label} {HOSTILE_TAG}"  # the class's folder name
    assert f"image 1 true label {name} recovered label {name} \u2713" in page.all_text
    assert "How to read: PSNR above about 30 dB: visually identical; below about 15 dB: nothing recognisable" in (
        page.all_text
    )
    pictures = [a for t, a in page.tags if t == "img" and a.get("alt") == "private images"]
    assert len(pictures) == 3
    for attrs in pictures:
        png = base64.b64decode(attrs["src"].split(",", 1)[1])
        assert min(Image.open(io.BytesIO(png)).size) >= 192  # 12-pixel images, enlarged by whole pixels


def test_markup_in_a_demo_page_is_text():
    from fedsim.app.pages import render

    values = {
        "title": HOSTILE,
        "heading": HOSTILE,
        "paragraphs": [HOSTILE],
        "tradeoff": [{"variant": HOSTILE, "psnr": None, "verdict": HOSTILE, "accuracy": 0.5, "has_test_split": True}],
        "varied": HOSTILE,
        "tradeoff_plot": None,
        "seconds": 1.0,
        "variants": [
            {
                "membership": {
                    "rows": [
                        {
                            "question": HOSTILE,
                            "attack": HOSTILE_TAG,
                            "auc": 0.5,
                            "tpr": 0.1,
                            "members": HOSTILE,
                            "non_members": 3,
                        }
                    ],
                    "figures": [],
                },
                "run": None,
                "description": HOSTILE_TAG,
                "accuracy": None,
                "has_test_split": False,
            }
        ],
    }
    page = Page(render("demo.html.j2", **values))
    assert_only_text(page, HOSTILE, HOSTILE_TAG)
    assert "Global test accuracy at the end: no test split" in page.all_text


def test_an_old_small_animation_is_enlarged_by_whole_pixels():
    """Runs attacked before the pictures grew keep 12-pixel animations: the page enlarges them."""
    from fedsim.images import enlarged_gif

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)) for _ in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    big = enlarged_gif(buffer.getvalue())
    with Image.open(io.BytesIO(big)) as gif:
        assert gif.size == (192, 192) and gif.n_frames == 3
        first = np.asarray(gif.convert("RGB")).astype(int)
    assert (first[:16, :16] == first[0, 0]).all()  # one source pixel became a block of 16 x 16
    assert enlarged_gif(big) == big
