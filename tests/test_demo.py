"""The classroom demo: scenario files, one command, and a page that renders in a real headless browser."""

from __future__ import annotations

import shutil

import pytest

from fedsim.app.demo import Scenario, scenario_names
from fedsim.errors import FedsimError
from tests.conftest import invoke_cli, run_cli


def test_every_shipped_scenario_loads():
    names = scenario_names()
    assert {"dlg", "grnn-batch", "defenses", "membership"} <= set(names)
    for name in names:
        scenario = Scenario.load(name)
        assert scenario.title and scenario.summary and scenario.explanation
        assert scenario.attacks or scenario.membership is not None


def test_a_bad_scenario_is_refused_with_its_problem(tmp_path):
    with pytest.raises(FedsimError, match="no scenario 'nope'; choose one of: .*dlg"):
        Scenario.load("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nmodle = "lenet-dlg"\n')
    with pytest.raises(FedsimError, match="unknown config key 'modle'"):
        Scenario.load(str(bad))


def test_demo_list():
    result = invoke_cli("demo", "--list")
    assert result.returncode == 0 and "dlg" in result.stdout and "grnn-batch" in result.stdout


def open_page(page, tmp_path) -> tuple[list, list, str]:
    """Open `page` in headless Chromium: (every image's [alt, complete, width, height], console errors, text)."""
    chromedriver = shutil.which("chromedriver")
    if chromedriver is None:
        pytest.skip("chromedriver is not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome'}",
    ):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        driver.get(page.resolve().as_uri())
        sizes = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]);"
        )
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        return sizes, errors, driver.title + driver.page_source
    finally:
        driver.quit()


def quick_demo(tmp_path, name: str, replace: tuple[str, str], cut: str | None = None):
    """Run scenario `name` (made quicker by one text replacement, and cut before `cut`) through the CLI."""
    if shutil.which("chromedriver") is None:
        pytest.skip("chromedriver is not installed (apt-get install chromium chromium-driver)")
    from fedsim.app.demo import SCENARIO_DIR

    scenario = tmp_path / "quick.toml"
    text = (SCENARIO_DIR / f"{name}.toml").read_text()
    assert replace[0] in text and (cut is None or cut in text)
    text = text if cut is None else text[: text.index(cut)]
    scenario.write_text(text.replace(*replace))
    # The attacks run in this process: the Ray fan-out is the photos demo's (and test_attack_runner's) to test.
    result = run_cli("demo", str(scenario), "--no-open", "--executor", "local", "--out-dir", str(tmp_path / "demos"))
    assert result.returncode == 0, result.stdout + result.stderr
    page = tmp_path / "demos" / "quick" / "report.html"
    assert page.exists() and str(page.resolve()) in result.stdout.replace("\n", "")
    return page


@pytest.mark.slow
def test_demo_page_renders_in_a_real_browser(tmp_path, no_strays):
    page = quick_demo(tmp_path, "dlg", ("iterations = 150", "iterations = 40"))
    sizes, errors, text = open_page(page, tmp_path)
    assert len(sizes) >= 4
    assert all(complete and width > 0 and height > 0 for _, complete, width, height in sizes), sizes
    alts = [alt for alt, *_ in sizes]
    assert "loss and PSNR curves" in alts and "reconstruction emerging" in alts and "private images" in alts
    assert not errors, errors
    assert "Deep Leakage from Gradients" in text


@pytest.mark.slow
def test_defenses_demo_page_shows_the_tradeoff(tmp_path, no_strays):
    """Two of the scenario's defenses (none, noise): the trade-off table and plot, and every image renders."""
    page = quick_demo(tmp_path, "defenses", ("iterations = 80", "iterations = 30"), cut='[[variants]]\nname = "pruning')
    sizes, errors, text = open_page(page, tmp_path)
    assert all(complete and width > 0 and height > 0 for _, complete, width, height in sizes), sizes
    alts = [alt for alt, *_ in sizes]
    assert "attack PSNR against model accuracy" in alts and alts.count("private images") == 2
    assert not errors, errors
    assert "no defense" in text and "noise, variance 1e-2" in text and "model accuracy" in text


@pytest.mark.slow
def test_membership_demo_page_shows_the_loss_gap_and_roc_curves(tmp_path, no_strays):
    page = quick_demo(tmp_path, "membership", ("epochs = 60", "epochs = 20"))
    sizes, errors, text = open_page(page, tmp_path)
    assert all(complete and width > 0 and height > 0 for _, complete, width, height in sizes), sizes
    alts = [alt for alt, *_ in sizes]
    assert "loss on members and non-members over the rounds" in alts
    assert {"ROC curve roc-fl-client", "ROC curve roc-fl-global"} <= set(alts)
    assert not errors, errors
    assert "SeqMIA" in text and "No attack results" not in text


@pytest.mark.slow
def test_the_demo_runs_on_a_teachers_own_photos(tmp_path, shared_data, no_strays):
    """`fedsim demo dlg --data-dir photos/`: real photos (lossless CIFAR-10 PNGs), one sub-folder per class."""
    import numpy as np
    from PIL import Image

    data = np.load(shared_data / "cifar10" / "cifar10_train_first200_kaggle_png.npz", allow_pickle=False)
    photos = tmp_path / "photos"
    for i, (image, label) in enumerate(zip(data["x"][:60], data["y"][:60], strict=True)):
        folder = photos / f"class-{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    scenario = tmp_path / "photos.toml"
    from fedsim.app.demo import SCENARIO_DIR

    scenario.write_text((SCENARIO_DIR / "dlg.toml").read_text().replace("iterations = 150", "iterations = 20"))
    result = run_cli("demo", str(scenario), "--data-dir", str(photos), "--no-open", "--out-dir", str(tmp_path / "d"))
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "d" / "photos" / "run"
    assert 'dataset = "imagefolder"' in (run / "config.toml").read_text()
    assert list((run / "attacks").glob("*/*/reconstruction.png"))
    assert (tmp_path / "d" / "photos" / "report.html").stat().st_size > 10_000
