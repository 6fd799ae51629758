"""The classroom demo: scenario files, one command, and a page that renders in a real headless browser."""

from __future__ import annotations

import shutil

import pytest

from fedsim.demo import Scenario, scenario_names
from fedsim.errors import FedsimError
from tests.conftest import run_cli


def test_every_shipped_scenario_loads():
    names = scenario_names()
    assert {"dlg", "grnn-batch"} <= set(names)
    for name in names:
        scenario = Scenario.load(name)
        assert scenario.title and scenario.summary and scenario.explanation and scenario.attacks


def test_a_bad_scenario_is_refused_with_its_problem(tmp_path):
    with pytest.raises(FedsimError, match="no scenario 'nope'; choose one of: .*dlg"):
        Scenario.load("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text('[run]\nmodle = "lenet-dlg"\n')
    with pytest.raises(FedsimError, match="unknown config key 'modle'"):
        Scenario.load(str(bad))


def test_demo_list():
    result = run_cli("demo", "--list")
    assert result.returncode == 0 and "dlg" in result.stdout and "grnn-batch" in result.stdout


@pytest.mark.slow
def test_demo_page_renders_in_a_real_browser(tmp_path, no_strays):
    chromedriver = shutil.which("chromedriver")
    if chromedriver is None:
        pytest.skip("chromedriver is not installed (apt-get install chromium chromium-driver)")
    scenario = tmp_path / "quick.toml"
    from fedsim.demo import SCENARIO_DIR

    scenario.write_text((SCENARIO_DIR / "dlg.toml").read_text().replace("iterations = 150", "iterations = 40"))
    result = run_cli("demo", str(scenario), "--no-open", "--out-dir", str(tmp_path / "demos"))
    assert result.returncode == 0, result.stdout + result.stderr
    page = tmp_path / "demos" / "quick" / "report.html"
    assert page.exists()

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
        assert len(sizes) >= 4
        assert all(complete and width > 0 and height > 0 for _, complete, width, height in sizes), sizes
        alts = [alt for alt, *_ in sizes]
        assert "loss and PSNR curves" in alts and "reconstruction emerging" in alts and "private images" in alts
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
        assert "Deep Leakage from Gradients" in driver.title + driver.page_source
    finally:
        driver.quit()
