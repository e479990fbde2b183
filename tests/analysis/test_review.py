"""The review page: predict --review on a folder of PNGs, cells confirmed and corrected in
headless Chromium, the differential count following the answers, corrections.csv added to the
classifier's labels with train-classifier --from."""

import csv
import json
import os
import time

import pytest

from tests.helpers import (CELL_NAMES, CHROMEDRIVER, CHROMIUM, assert_one_line_error, chrome,
                           console_errors, npz_slide, requested_urls, run_cli, stored_answers, tree,
                           wait_for)


@pytest.fixture(scope="module")
def clinic(tiny_run, tmp_path_factory):
    """today/ (labelled from a CSV) and tomorrow/ (to classify) folders of PNGs, a classifier
    trained on 40 of today's cells, and tomorrow's true classes."""
    from ssl_blood.cli import main

    run, npz = tiny_run
    root = tmp_path_factory.mktemp("clinic")
    truth = {("today", p): c for p, c in npz_slide(npz, "train", root / "today", root / "labels.csv",
                                                   labelled=40).items()}
    truth.update({("tomorrow", p): c for p, c in npz_slide(npz, "test", root / "tomorrow").items()})
    assert main(["train-classifier", "--checkpoint", str(run / "checkpoint.pt"), "--image-dir",
                 str(root / "today"), "--size", "16", "--cache-dir", "none", "--labels",
                 str(root / "labels.csv"), "--out", str(root / "clf")]) == 0
    return root, truth


TOMORROW = ["--size", "16", "--cache-dir", "none"]


def _counts_after(driver):
    from selenium.webdriver.common.by import By

    return {r.get_attribute("data-class"): int(r.find_element(By.CSS_SELECTOR, "td.after").text)
            for r in driver.find_elements(By.CSS_SELECTOR, "#counts tr[data-class]")}


@pytest.mark.browser
def test_review_confirm_correct_reload_download_and_add_to_the_classifier(clinic, tmp_path, capsys):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("chromium / chromedriver not installed (Debian packages chromium, chromium-driver)")
    root, truth = clinic
    code, out, err = run_cli(capsys, "predict", "--classifier", root / "clf", "--image-dir", root / "tomorrow",
                             *TOMORROW, "--max-ood", "0", "--out", tmp_path / "pred.csv",
                             "--review", tmp_path / "review.html", "--json")
    assert code == 0, err
    counts = json.loads(out)
    assert counts["review"] >= 3 and counts["review_page"] == str(tmp_path / "review.html")
    with open(tmp_path / "pred.csv") as f:
        predicted = {r["path"]: r for r in csv.DictReader(f)}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chrome()
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.get((tmp_path / "review.html").as_uri())
        shown = [t.find_element(By.CSS_SELECTOR, "span").text for t in driver.find_elements(By.CSS_SELECTOR, ".tile")]
        assert len(shown) == counts["review"] and all(predicted[n]["review"] == "1" for n in shown)
        # grouped by predicted class (class order), least sure first within a class
        order = [(CELL_NAMES.index(predicted[n]["predicted"]), float(predicted[n]["probability"])) for n in shown]
        assert order == sorted(order)
        before = _counts_after(driver)
        assert before == {c: counts["classes"][c]["accepted"] for c in CELL_NAMES}
        first, second, third = shown[:3]
        ActionChains(driver).send_keys(Keys.ENTER).perform()  # confirm the first
        other = next(c for c in CELL_NAMES if c != predicted[second]["predicted"])
        ActionChains(driver).send_keys(str(CELL_NAMES.index(other) + 1)).perform()  # correct the second
        driver.find_element(By.CSS_SELECTOR, '#answers button[data-answer="not a cell"]').click()
        after = _counts_after(driver)
        expected = dict(before)
        expected[predicted[first]["predicted"]] += 1
        expected[other] += 1
        assert after == expected
        assert wait_for(lambda: stored_answers(driver, "ssl-blood-review:") == 3)
        driver.refresh()
        assert driver.find_element(By.ID, "progress").text == f"3 / {len(shown)} reviewed"
        assert _counts_after(driver) == expected
        driver.find_element(By.ID, "download").click()
        path = downloads / "corrections.csv"
        end = time.monotonic() + 10
        while not path.is_file() and time.monotonic() < end:
            time.sleep(0.1)
        assert not [u for u in requested_urls(driver) if not u.startswith(("file:", "data:", "blob:"))]
        assert not console_errors(driver)
    finally:
        driver.quit()
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["path"], r["label"], r["status"]) for r in rows] == [
        (first, predicted[first]["predicted"], "confirmed"), (second, other, "corrected"),
        (third, "", "not a cell")]
    # the corrections go into the classifier's labels as they are
    code, out, err = run_cli(capsys, "train-classifier", "--from", root / "clf", "--image-dir", root / "tomorrow",
                             *TOMORROW, "--labels", path, "--out", tmp_path / "clf2", "--json")
    assert code == 0, err
    card = json.loads(out)
    assert sum(card["labels_per_class"].values()) == 42
    assert card["added_to"]["classifier_labels"] == 40 and card["added_to"]["added_labels"] == 2


def test_review_and_from_bad_input_one_line_nothing_written(clinic, tmp_path, capsys):
    root, _ = clinic
    (tmp_path / "review.html").write_text("kept")
    (tmp_path / "new.csv").write_text("path,label\nc000.png,lymphocyte\n")
    before = tree(tmp_path)
    cases = [
        (["predict", "--classifier", root / "clf", "--image-dir", root / "tomorrow", *TOMORROW,
          "--out", tmp_path / "p.csv", "--review", tmp_path / "review.html"],
         r"--review .*review.html exists; set --overwrite"),
        (["train-classifier", "--from", root / "clf", "--checkpoint", root / "clf" / "head.pt",
          "--out", tmp_path / "c"], r"give --checkpoint \(a new classifier\) or --from \(add labels"),
        (["train-classifier", "--from", root / "clf", "--image-dir", root / "tomorrow", *TOMORROW,
          "--labels", tmp_path / "new.csv", "--out", tmp_path / "c"],
         r"class 'lymphocyte' on line 2 is not one of basophil"),
    ]
    for argv, pattern in cases:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, pattern)
    assert tree(tmp_path) == before
