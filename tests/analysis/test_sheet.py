"""The labelling sheet: select --sheet on a folder of PNGs, labelled in headless Chromium by key
and click, kept across a reload, downloaded, and fed to train-classifier --labels unedited."""

import csv
import json
import os
import time

import numpy as np
import pytest

from ssl_blood.cli import main
from tests.helpers import (CHROMEDRIVER, CHROMIUM, assert_one_line_error, chrome, console_errors,
                           requested_urls, run_cli, stored_answers, tree, wait_for, write_png)

HOSTILE = '<img src=x onerror="window.__xss=1">'
ODD_NAME = 'cell "<b>7" &amp; <i>.png'  # a file name that is markup, quotes and an entity


@pytest.fixture(scope="module")
def slide(tiny_run, tmp_path_factory):
    """A flat folder of PNGs (the synthetic train split), its embeddings, and the checkpoint."""
    run, npz = tiny_run
    root = tmp_path_factory.mktemp("sheet")
    arrays = np.load(npz)
    for i, image in enumerate(arrays["train_images"]):
        write_png(root / "slide" / (ODD_NAME if i == 7 else f"cell_{i:04d}.png"), image)
    ckpt = str(run / "checkpoint.pt")
    assert main(["embed", "--checkpoint", ckpt, "--image-dir", str(root / "slide"), "--size", "16",
                 "--cache-dir", "none", "--out", str(root / "e.npz")]) == 0
    return root, ckpt


def _browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("chromium / chromedriver not installed (Debian packages chromium, chromium-driver)")
    return chrome()


def _downloaded(folder, name, timeout=10.0):
    path = folder / name
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and not list(folder.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise AssertionError(f"{name} was not downloaded")


def _press(driver, key):
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


@pytest.mark.browser
def test_sheet_labels_by_key_and_click_survives_reload_and_feeds_labels(slide, tmp_path, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    root, ckpt = slide
    classes = f"basophil,{HOSTILE},monocyte,neutrophil"
    code, out, err = run_cli(capsys, "select", "--embeddings", root / "e.npz", "--budget", "6",
                             "--out", tmp_path / "picks.csv", "--sheet", tmp_path / "picks.html",
                             "--classes", classes, "--exclude", _one_cell_csv(tmp_path))
    assert code == 0, err
    assert "open" in out and (tmp_path / "picks.html").stat().st_size < 200_000
    with open(tmp_path / "picks.csv") as f:
        picks = [r["path"] for r in csv.DictReader(f)]
    assert "cell_0000.png" not in picks  # excluded
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _browser()
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                               {"behavior": "allow", "downloadPath": str(downloads)})
        driver.get((tmp_path / "picks.html").as_uri())
        assert driver.find_element(By.ID, "name").text.endswith(picks[0])
        _press(driver, "1")  # cell 1: basophil by key, moves on
        driver.find_element(By.CSS_SELECTOR, '#answers button[data-answer="monocyte"]').click()  # cell 2
        _press(driver, "u")  # cell 3: unsure
        _press(driver, Keys.ARROW_LEFT)
        assert "unsure" in driver.find_element(By.ID, "answer").text
        assert wait_for(lambda: stored_answers(driver, "ssl-blood-sheet:") == 3)
        driver.refresh()  # work is kept across a reload
        progress = wait_for(lambda: (t := driver.find_element(By.ID, "progress").text).startswith("3 / 6 answered")
                            and t) or driver.find_element(By.ID, "progress").text
        assert progress.startswith("3 / 6 answered"), progress
        # the hostile class name is a button's text, not markup
        labels = [b.text for b in driver.find_elements(By.CSS_SELECTOR, "#answers button")]
        assert f"2 {HOSTILE}" in labels and driver.execute_script("return window.__xss") is None
        for tile in driver.find_elements(By.CSS_SELECTOR, ".tile")[3:]:
            tile.click()
            _press(driver, "4")  # the rest: neutrophil
        _press(driver, "n")
        nbrs = driver.find_elements(By.CSS_SELECTOR, "#nbrs .tile")
        assert 1 <= len(nbrs) <= 6 and all(n.find_element(By.TAG_NAME, "img").get_attribute("src")
                                           .startswith("data:image/png") for n in nbrs)
        driver.find_element(By.ID, "download").click()
        path = _downloaded(downloads, "labels.csv")
        assert not [u for u in requested_urls(driver) if not u.startswith(("file:", "data:", "blob:"))]
        assert not console_errors(driver)
    finally:
        driver.quit()
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    expected = ["basophil", "monocyte", ""] + ["neutrophil"] * 3
    assert [r["path"] for r in rows] == picks
    assert [r["label"] for r in rows] == expected
    assert [r["status"] for r in rows] == ["labelled", "labelled", "unsure"] + ["labelled"] * 3
    # the download is a --labels file as it is
    code, out, err = run_cli(capsys, "train-classifier", "--checkpoint", ckpt, "--image-dir", root / "slide",
                             "--size", "16", "--cache-dir", "none", "--labels", path,
                             "--out", tmp_path / "clf", "--json")
    assert code == 0, err
    card = json.loads(out)
    assert card["labels_per_class"] == {"basophil": 1, "monocyte": 1, "neutrophil": 3}
    # and a second round excludes every cell answered, unsure ones too
    code, _, err = run_cli(capsys, "select", "--embeddings", root / "e.npz", "--budget", "90",
                           "--labels", path, "--out", tmp_path / "picks2.csv")
    assert code == 0, err
    with open(tmp_path / "picks2.csv") as f:
        assert not {r["path"] for r in csv.DictReader(f)} & set(picks)


def _one_cell_csv(tmp_path):
    (tmp_path / "seen.csv").write_text("path\ncell_0000.png\n")
    return tmp_path / "seen.csv"


@pytest.mark.browser
def test_sheet_command_shows_odd_file_names_as_text_and_prefills_labels(slide, tmp_path, capsys):
    from selenium.webdriver.common.by import By

    root, _ = slide
    with open(tmp_path / "cells.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows([[ODD_NAME, "monocyte"], ["cell_0001.png", ""], ["cell_0002.png", "basophil"]])
    code, out, err = run_cli(capsys, "sheet", "--labels", tmp_path / "cells.csv", "--embeddings", root / "e.npz",
                             "--out", tmp_path / "sheet.html")
    assert code == 0, err and "3 cells, 2 already labelled" in out
    page = (tmp_path / "sheet.html").read_text()
    assert "<b>7" not in page  # the name is data (escaped JSON), never markup
    driver = _browser()
    try:
        driver.get((tmp_path / "sheet.html").as_uri())
        assert driver.find_element(By.ID, "name").text == f"1 / 3: {ODD_NAME}"
        assert "answer: monocyte" in driver.find_element(By.ID, "answer").text
        assert driver.find_element(By.ID, "progress").text.startswith("2 / 3 answered")
        assert not driver.find_elements(By.CSS_SELECTOR, "#name b") and not console_errors(driver)
    finally:
        driver.quit()


def test_sheet_bad_input_is_one_line_and_writes_nothing(slide, tmp_path, capsys):
    root, _ = slide
    (tmp_path / "cells.csv").write_text("path,label\nnot_here.png,\n")
    (tmp_path / "empty.csv").write_text("path,label\n")
    before = tree(tmp_path)
    cases = [
        (["sheet", "--labels", tmp_path / "cells.csv", "--embeddings", root / "e.npz"],
         r"names 1 cell\(s\) that are not in the train split .*not_here.png"),
        (["sheet", "--labels", tmp_path / "empty.csv", "--embeddings", root / "e.npz"],
         r"names no cell; a sheet needs at least one"),
        (["sheet", "--labels", tmp_path / "cells.csv"], r"give the cells' data \(--image-dir"),
        (["select", "--embeddings", root / "e.npz", "--budget", "3", "--out", tmp_path / "p.csv",
          "--sheet", tmp_path / "p.html", "--classes", "a,b,a"], r"--classes names class 'a' twice"),
        (["select", "--embeddings", root / "e.npz", "--budget", "3", "--out", tmp_path / "p.csv",
          "--sheet", tmp_path / "p.html", "--classes", "a,,b"], r"--classes holds an empty class name"),
        (["select", "--embeddings", root / "e.npz", "--budget", "3", "--out", tmp_path / "p.csv",
          "--strategy", "margin"], r"strategy 'margin' ranks cells by the current classifier; give one \(--classifier\)"),
    ]
    for argv, pattern in cases:
        code, _, err = run_cli(capsys, *argv[:1], *argv[1:], *(["--out", tmp_path / "s.html"]
                                                                 if argv[0] == "sheet" else []))
        assert_one_line_error(code, err, pattern)
    assert tree(tmp_path) == before
