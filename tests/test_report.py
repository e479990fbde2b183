"""The HTML report: built from a real (tiny) run, opened in headless Chromium."""

import json
import shutil

import pytest

from ssl_blood.cli import main
from ssl_blood.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
    run, _ = tiny_run
    work = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(run, work)
    path = build_report(work, baselines=["pixels"], device="cpu")
    return work, path


def test_report_is_self_contained(report):
    run, path = report
    page = path.read_text()
    assert path == run / "report.html"
    for section in ("Training", "Evaluation (frozen features)", "UMAP and immature granulocytes",
                    "Retrieval", "Configuration"):
        assert f">{section}<" in page
    assert page.count("data:image/png;base64,") >= 4
    assert "http://" not in page and "https://" not in page  # nothing fetched
    assert "baseline: raw pixels" in page
    analysis = run / "analysis"
    assert json.loads((analysis / "linear_probe-model.json").read_text())["test_acc"] > 0.5


def test_second_report_reuses_the_analysis(report):
    run, path = report
    before = {p: p.stat().st_mtime_ns for p in (run / "analysis").glob("*.npz")}
    build_report(run, run / "again.html", baselines=["pixels"], device="cpu")
    assert {p: p.stat().st_mtime_ns for p in (run / "analysis").glob("*.npz")} == before


def test_report_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["report", "--run", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "has no metrics.jsonl" in err and len(err.strip().splitlines()) == 1
    assert main(["report", "--run", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.browser
def test_report_renders_in_headless_chromium(report, artifacts):
    if not (CHROMIUM and CHROMEDRIVER):
        if __import__("os").environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("chromium / chromedriver not installed (Debian packages chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, path = report
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1280,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(path.as_uri())
        assert driver.title.startswith("ssl-blood report")
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
        assert len(images) >= 4
        assert all(complete and width > 100 for _, complete, width in images), images
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        driver.save_screenshot(str(artifacts / "report.png"))
    finally:
        driver.quit()
    assert (artifacts / "report.png").stat().st_size > 20_000
