"""The classroom demo: scenario files, one command, and a page that renders in a real headless browser."""

from __future__ import annotations

import os
import re
import shutil

import pytest

from fedsim.app.demo import SCENARIO_DIR, Scenario, scenario_names
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


DLG = (SCENARIO_DIR / "dlg.toml").read_text()


@pytest.mark.parametrize(
    "text, expected",
    [
        (DLG + "\n[atack]\nattacks = ['dlg']\n", "unknown key 'atack'; allowed: title, summary, explanation, run"),
        ("tittle = 'x'\n" + DLG, "unknown key 'tittle'"),
        (DLG.replace("[attack]\n", "[attack]\nclient = [0]\n"), "[attack]: unknown key 'client'; allowed: attacks"),
        (DLG.replace("restarts = 2", "restart = 2"), "unknown option(s) for attack 'dlg': restart; allowed:"),
        (DLG.replace("restarts = 2", "restarts = 0"), "[attack.options.dlg]"),
        (DLG.replace("rescues = 5", "rescues = -1"), "rescues must be 0 or more"),
        (DLG + "\n[attack.options.grnn]\niterations = 5\n", "[attack.options]: unknown key 'grnn'; allowed: dlg"),
        (DLG.replace("rounds = [1]", "rounds = 1"), "rounds must be a list of ints"),
        (DLG + "\n[[variants]]\nnmae = 'x'\n", "[[variants]] number 1: unknown key 'nmae'; allowed: name, run"),
        (DLG + "\n[membership]\nshadow = 2\n", "[membership]: unknown key 'shadow'"),
    ],
)
def test_every_scenario_mistake_is_one_line_before_anything_runs(tmp_path, text, expected):
    """A typo in a scenario stops the demo at once (exit 2, one line naming it), before the federation trains."""
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(FedsimError) as caught:
        Scenario.load(str(bad))
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_scenario_mistake_exits_2_without_training(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(DLG.replace("iterations = ", "iteration = "))
    result = invoke_cli("demo", str(bad), "--no-open", "--out-dir", str(tmp_path / "demos"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unknown option(s) for attack 'dlg': iteration" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and not (tmp_path / "demos").exists()


def test_demo_list():
    result = invoke_cli("demo", "--list")
    assert result.returncode == 0 and "dlg" in result.stdout and "grnn-batch" in result.stdout


def chromedriver_or_skip() -> str:
    """chromedriver's path; without Chromium and its driver a skip that says what to install (a failure in CI)."""
    chromedriver = shutil.which("chromedriver")
    if chromedriver is None or not (shutil.which("chromium") or shutil.which("chromium-browser")):
        missing = "Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; .ci/run installs them")
        pytest.skip(missing)
    return chromedriver


def open_page(page, tmp_path) -> tuple[list, list, str]:
    """Open `page` in headless Chromium as a projector shows it (1280 px wide): every image's [alt, complete,
    natural width, natural height, rendered width], the console errors, and the page's title and text."""
    chromedriver = chromedriver_or_skip()
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
        "--window-size=1280,1024",
        f"--user-data-dir={tmp_path / 'chrome'}",
    ):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        driver.get(page.resolve().as_uri())
        sizes = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight,"
            " i.getBoundingClientRect().width]);"
        )
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        return sizes, errors, driver.title + " " + driver.execute_script("return document.body.innerText;")
    finally:
        driver.quit()


def one_actor(scenario: str) -> str:
    """The scenario with two CPUs per client actor: on a 2-core machine one actor per simulation, the clients
    taking turns in it (tests/conftest.py `ray_head` says why)."""
    assert "[run]\n" in scenario
    return scenario.replace("[run]\n", "[run]\nclient-num-cpus = 2.0\n", 1)


def quick_demo(tmp_path, name: str, replace: tuple[str, str], cut: str | None = None):
    """Run scenario `name` (made quicker by one text replacement, and cut before `cut`) through the CLI."""
    chromedriver_or_skip()
    scenario = tmp_path / "quick.toml"
    text = (SCENARIO_DIR / f"{name}.toml").read_text()
    assert replace[0] in text and (cut is None or cut in text)
    text = text if cut is None else text[: text.index(cut)]
    scenario.write_text(one_actor(text.replace(*replace)))
    # The attacks run in this process: the Ray fan-out is test_cli's and test_attack_runner's to test.
    result = run_cli("demo", str(scenario), "--no-open", "--executor", "local", "--out-dir", str(tmp_path / "demos"))
    assert result.returncode == 0, result.stdout + result.stderr
    page = tmp_path / "demos" / "quick" / "report.html"
    assert page.exists() and str(page.resolve()) in result.stdout.replace("\n", "")
    return page


@pytest.mark.slow
def test_defenses_demo_page_shows_the_tradeoff(tmp_path, no_strays):
    """Two of the scenario's defenses (none, noise): the trade-off table and plot, and every image renders."""
    page = quick_demo(tmp_path, "defenses", ("iterations = 80", "iterations = 12"), cut='[[variants]]\nname = "pruning')
    sizes, errors, text = open_page(page, tmp_path)
    assert all(complete and width > 0 and height > 0 for _, complete, width, height, _shown in sizes), sizes
    alts = [alt for alt, *_ in sizes]
    assert "attack PSNR against model accuracy" in alts and alts.count("private images") == 2
    assert not errors, errors
    assert "no defense" in text and "noise, variance 1e-2" in text and "model accuracy" in text


@pytest.mark.slow
def test_membership_demo_page_shows_the_loss_gap_and_roc_curves(tmp_path, no_strays):
    page = quick_demo(tmp_path, "membership", ("epochs = 60", "epochs = 20"))
    sizes, errors, text = open_page(page, tmp_path)
    assert all(complete and width > 0 and height > 0 for _, complete, width, height, _shown in sizes), sizes
    alts = [alt for alt, *_ in sizes]
    assert "loss on members and non-members over the rounds" in alts
    assert {"ROC curve roc-fl-client", "ROC curve roc-fl-global"} <= set(alts)
    assert not errors, errors
    assert "SeqMIA" in text and "No attack results" not in text


@pytest.mark.slow
def test_the_demo_runs_on_a_teachers_own_photos_and_renders_in_a_real_browser(tmp_path, shared_data, no_strays):
    """`fedsim demo dlg --data-dir photos/`: real photos (lossless CIFAR-10 PNGs), one sub-folder per class; then
    the page as a projector shows it in Chromium. The attacks run in this process (`--executor local`): the Ray
    fan-out that the demo uses by default is the same `run_attacks` that `fedsim run --set attacks=...`
    (tests/test_cli.py) and tests/test_attack_runner.py run on Ray, and a second Ray start here would only add
    its seconds."""
    import numpy as np
    from PIL import Image

    chromedriver_or_skip()
    data = np.load(shared_data / "cifar10" / "cifar10_train_first200_kaggle_png.npz", allow_pickle=False)
    photos = tmp_path / "photos"
    for i, (image, label) in enumerate(zip(data["x"][:60], data["y"][:60], strict=True)):
        folder = photos / f"class-{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    scenario = tmp_path / "photos.toml"
    text = (SCENARIO_DIR / "dlg.toml").read_text().replace("iterations = 120", "iterations = 12")
    scenario.write_text(one_actor(text))
    result = run_cli(
        "demo", str(scenario), "--data-dir", str(photos), "--no-open", "--executor", "local", "--out-dir",
        str(tmp_path / "d"),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "d" / "photos" / "run"
    assert 'dataset = "imagefolder"' in (run / "config.toml").read_text()
    assert list((run / "attacks").glob("*/*/reconstruction.png"))
    page = tmp_path / "d" / "photos" / "report.html"
    assert page.stat().st_size > 10_000 and str(page.resolve()) in result.stdout.replace("\n", "")

    sizes, errors, text = open_page(page, tmp_path)
    assert len(sizes) >= 4
    assert all(complete and width > 0 and height > 0 for _, complete, width, height, _shown in sizes), sizes
    alts = [alt for alt, *_ in sizes]
    assert "loss and PSNR curves" in alts and "reconstruction emerging" in alts and "private images" in alts
    assert not errors, errors
    assert "Deep Leakage from Gradients" in text
    # For a projector: every picture of data at least 192 px, in the file and on the screen.
    pictures = [s for s in sizes if s[0] in ("private images", "reconstruction", "reconstruction emerging")]
    assert len(pictures) == 6 and all(natural >= 192 and shown >= 192 for _, _, natural, _, shown in pictures), sizes
    text = " ".join(text.split())
    assert re.search(r"2 clients, 1 round of FedSGD \(batch 1\) on .+, LeNet", text) and "Run run" not in text, text
    assert re.search(r"true label (class-\d) recovered label (class-\d)", text), text
    assert "PSNR above about 30 dB: visually identical; below about 15 dB: nothing recognisable" in text
    assert "SSIM 1 = identical" in text
    headings = re.findall(r"dlg · round (\d+) · client (\d+)", text)
    assert headings == [("1", "0"), ("1", "1")], headings


def test_a_variant_attacks_only_its_own_share_of_the_scenarios_attacks(tmp_path):
    scenario = Scenario.load("malicious")
    assert [v.attacks for v in scenario.variants] == [["dlg"], ["imprint"]]
    bad = tmp_path / "bad.toml"
    bad.write_text((SCENARIO_DIR / "malicious.toml").read_text().replace('attacks = ["imprint"]', 'attacks = ["ig"]'))
    with pytest.raises(FedsimError, match="attack 'ig' is not in \\[attack\\] attacks"):
        Scenario.load(str(bad))


@pytest.mark.slow
def test_the_malicious_demo_shows_secure_aggregation_failing_against_a_cheating_server(tmp_path, no_strays):
    """`fedsim demo malicious` (DLG cut to 2 iterations): under SecAgg+ the curious server's DLG recovers nothing
    recognisable, the cheating server's imprint gets the images back; both on one page."""
    import json

    scenario = tmp_path / "quick.toml"
    text = (SCENARIO_DIR / "malicious.toml").read_text()
    assert "iterations = 8 " in text
    scenario.write_text(one_actor(text.replace("iterations = 8 ", "iterations = 2 ")))
    result = run_cli("demo", str(scenario), "--no-open", "--executor", "local", "--out-dir", str(tmp_path / "demos"))
    assert result.returncode == 0, result.stdout + result.stderr
    demo = tmp_path / "demos" / "quick"
    curious = json.loads((demo / "honest-but-curious-server" / "metrics.json").read_text())["summary"]
    cheating = json.loads((demo / "cheating-server--imprint" / "metrics.json").read_text())["summary"]
    assert set(curious) == {"dlg"} and set(cheating) == {"imprint"}
    assert curious["dlg"]["median_psnr_mean"] < 15  # nothing recognisable
    assert cheating["imprint"]["median_psnr_mean"] > 30  # the images, most of them exactly
    page = re.sub(r"<[^>]+>", " ", (demo / "report.html").read_text())
    page = " ".join(page.split())
    assert "honest-but-curious server" in page and "cheating server (imprint)" in page
    assert "server attack PSNR (dB)" in page and "reconstruction fails" in page and "image recovered" in page


def test_a_federation_that_captured_nothing_is_noticed(tmp_path):
    """What makes the demo run a variant's federation again: no captured update (a round a lost client dropped)."""
    from fedsim.app.demo import captured_updates

    assert captured_updates(tmp_path / "never-ran") == 0
    (tmp_path / "run" / "captures").mkdir(parents=True)
    assert captured_updates(tmp_path / "run") == 0
