"""The HTML report: built from a real (tiny) run, opened in headless Chromium."""

import json
import shutil

import pytest

from ssl_blood.cli import main
from ssl_blood.analysis.report import build_report
from tests.helpers import CHROMEDRIVER, CHROMIUM, chrome, console_errors, requested_urls, tree


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
                    "Interactive map", "Retrieval", "Configuration"):
        assert f">{section}<" in page
    assert page.count("data:image/png;base64,") >= 4
    import re  # nothing fetched: no remote src/href/url() (licence comments may name sites)

    assert not re.search(r"""<(script|link|img)[^>]*(src|href)=\\?["']https?://|url\(["']?https?://""", page)
    assert "baseline: raw pixels" in page and "k-means NMI" in page and "<iframe" in page
    analysis = run / "analysis"
    probe = json.loads((analysis / "linear_probe-model.json").read_text())
    assert probe["test_acc"] > 0.5 and 0 <= probe["test_clusters"]["nmi"] <= 1
    assert not (analysis / "embeddings-pixels.npz").exists()  # recomputed, not stored


def test_second_report_reuses_the_analysis(report):
    run, path = report
    before = {p: p.stat().st_mtime_ns for p in (run / "analysis").glob("*")}
    assert run / "analysis" / "embeddings-model.npz" in before and len(before) > 5
    build_report(run, run / "again.html", baselines=["pixels"], device="cpu")
    assert {p: p.stat().st_mtime_ns for p in (run / "analysis").glob("*")} == before


def test_report_bad_input(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["report", "--run", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "has no checkpoint.pt" in err and len(err.strip().splitlines()) == 1
    assert main(["report", "--run", str(tmp_path / "nope")]) == 2
    assert "--run " in (err := capsys.readouterr().err) and "nope: no such folder" in err


def test_refused_report_touches_nothing(report, capsys):
    run, _ = report
    before = tree(run)
    capsys.readouterr()
    assert main(["report", "--run", str(run), "--limit", "-1"]) == 2
    assert "--limit -1 must be a positive number" in capsys.readouterr().err
    assert main(["report", "--run", str(run), "--baselines", "imagenet"]) == 2
    assert main(["report", "--run", str(run), "--out", str(run)]) == 2
    assert tree(run) == before  # the cached analyses are all still there


@pytest.mark.browser
def test_report_renders_in_headless_chromium(report, artifacts):
    if not (CHROMIUM and CHROMEDRIVER):
        if __import__("os").environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("chromium / chromedriver not installed (Debian packages chromium, chromium-driver)")
    _, path = report
    driver = chrome()
    try:
        driver.set_window_size(1280, 2000)
        driver.get(path.as_uri())
        assert driver.title.startswith("ssl-blood report")
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);")
        assert len(images) >= 4
        assert all(complete and width > 100 for _, complete, width in images), images
        frame = driver.find_element("css selector", "iframe")
        assert frame.get_attribute("sandbox") == "allow-scripts allow-downloads"
        driver.switch_to.frame(frame)  # sandboxed: the page's own scripts cannot reach into it
        frame_models = driver.execute_script("return window.Bokeh ? Bokeh.documents.length : 0;")
        driver.switch_to.default_content()
        assert frame_models == 1  # the interactive map runs inside the page
        assert console_errors(driver) == []
        assert all(u.startswith(("file:", "data:", "about:")) for u in requested_urls(driver))
        driver.save_screenshot(str(artifacts / "report.png"))
    finally:
        driver.quit()
    assert (artifacts / "report.png").stat().st_size > 20_000


def test_a_run_stopped_early_says_so_and_what_it_means(tmp_path):
    from ssl_blood.analysis.report import render, stopped_early

    history = [{"epoch": 1, "loss": 5.0}, {"epoch": 2, "loss": 4.0}]
    assert stopped_early({"epochs": 2}, history) is None
    note = stopped_early({"epochs": 32}, history)
    assert note.startswith("2 of 32 planned epochs were trained") and "--resume" in note
    page = render(tmp_path, {"epochs": 32, "method": "simclr"}, history, {"curves": None})
    assert "Stopped early." in page and "2 of 32 planned epochs" in page
    assert "Stopped early." not in render(tmp_path, {"epochs": 2}, history, {"curves": None})
