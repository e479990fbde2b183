"""`ssl-blood robustness` and predict --adapt adabn: the shift table and figure, AdaBN's
normalising away of a slide-wide intensity change, and the bad inputs."""

import csv
import json

import numpy as np
import pytest
import torch

from ssl_blood.features.embeddings import Embedder
from tests.helpers import assert_one_line_error, npz_slide, run_cli, tree


@pytest.fixture(scope="module")
def classifier(tiny_run, tmp_path_factory):
    """A classifier from 5 labels per class of the tiny run's synthetic train split."""
    from ssl_blood.cli import main

    run, npz = tiny_run
    out = tmp_path_factory.mktemp("robust") / "clf"
    assert main(["train-classifier", "--checkpoint", str(run / "checkpoint.pt"), "--shots", "5",
                 "--out", str(out)]) == 0
    return out, npz


def test_robustness_table_figure_and_summary(classifier, tmp_path, capsys):
    clf, npz = classifier
    code, out, err = run_cli(capsys, "robustness", "--classifier", clf, "--npz", npz, "--split", "test",
                             "--corruptions", "brightness,stain", "--severities", "1,5",
                             "--adapt", "none,adabn", "--out", tmp_path / "r", "--json")
    assert code == 0, err
    summary = json.loads(out)
    with open(tmp_path / "r" / "robustness.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (1 + 2 * 2) * 2  # clean + 2 corruptions x 2 severities, per adaptation
    assert {r["adapt"] for r in rows} == {"none", "adabn"} and "recall_basophil" in rows[0]
    by = {(r["corruption"], r["severity"], r["adapt"]): r for r in rows}
    # the synthetic classes differ in brightness: a 50 % brighter slide costs accuracy
    assert float(by[("brightness", "5", "none")]["accuracy"]) < float(by[("clean", "0", "none")]["accuracy"])
    assert summary["cells"] == 40 and set(summary["summary"]) == {"none", "adabn"}
    assert (tmp_path / "r" / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    full = json.loads((tmp_path / "r" / "robustness.json").read_text())
    assert len(full["rows"]) == len(rows) and full["rows"][0]["shift_warning"] is not None


def test_adabn_normalises_away_a_slide_wide_intensity_change(tiny_run):
    """A whole slide 30 % darker (no clipping: an affine change of every channel): the
    unadapted features move; with BatchNorm re-estimated on each slide the dark slide's features
    stay near the normal slide's (up to the convolutions' zero-padded borders)."""
    from ssl_blood.data import load_split, resolve_source

    run, npz = tiny_run
    embedder = Embedder.from_checkpoint(run / "checkpoint.pt", "cpu")
    images = load_split(resolve_source(npz=str(npz)), "train").images
    dark = (images.float() * 0.7).round().to(torch.uint8)

    def moved(a, b):  # in units of the features' own spread
        return float(np.linalg.norm(a - b, axis=1).mean() / np.linalg.norm(b - b.mean(0), axis=1).mean())

    unadapted = moved(embedder(dark), embedder(images))
    adapted = moved(embedder.adapted(dark)(dark), embedder.adapted(images)(images))
    # measured 0.58 against 0.91 here (16 px: the borders weigh), 0.10 against 0.29 on BloodMNIST
    assert adapted < 0.75 * unadapted, (unadapted, adapted)


def test_predict_adapt_adabn_on_a_folder(classifier, tmp_path, capsys):
    clf, npz = classifier
    npz_slide(npz, "test", tmp_path / "slide")
    folder = ("--image-dir", tmp_path / "slide", "--size", "16", "--cache-dir", "none")
    code, out, err = run_cli(capsys, "predict", "--classifier", clf, *folder, "--adapt", "adabn",
                             "--out", tmp_path / "p.csv", "--json")
    assert code == 0, err
    counts = json.loads(out)
    assert counts["adapt"] == "adabn" and counts["cells"] == 40 and counts["shift_warning"] is not None
    # too few cells to estimate a slide's statistics: one line, nothing written
    few = tmp_path / "few"
    few.mkdir()
    for name in sorted(p.name for p in (tmp_path / "slide").iterdir())[:10]:
        (few / name).write_bytes((tmp_path / "slide" / name).read_bytes())
    code, _, err = run_cli(capsys, "predict", "--classifier", clf, "--image-dir", few, "--size", "16",
                           "--cache-dir", "none", "--adapt", "adabn", "--out", tmp_path / "q.csv")
    assert_one_line_error(code, err, r"AdaBN needs at least 32 cells.*without --adapt")
    assert not (tmp_path / "q.csv").exists()


@pytest.mark.parametrize("extra, pattern", [
    (("--corruptions", "stain,sepia"), r"unknown --corruptions sepia; choose from stain, blur"),
    (("--severities", "0-6"), r"--severities \[0, 1, 2, 3, 4, 5, 6\] must be within 1-5"),
    (("--severities", "two"), r"--severities 'two': give a range such as 1-5"),
    (("--adapt", "none,tent"), r"--adapt tent: choose from none, adabn"),
])
def test_robustness_bad_requests_are_one_line_and_write_nothing(classifier, tmp_path, capsys, extra, pattern):
    clf, npz = classifier
    before = tree(tmp_path)
    code, _, err = run_cli(capsys, "robustness", "--classifier", clf, "--npz", npz, *extra,
                           "--out", tmp_path / "r")
    assert_one_line_error(code, err, pattern)
    assert tree(tmp_path) == before


def test_robustness_needs_labelled_cells_and_keeps_an_existing_report(classifier, tmp_path, capsys):
    clf, npz = classifier
    npz_slide(npz, "test", tmp_path / "slide")  # a flat folder: no labels
    code, _, err = run_cli(capsys, "robustness", "--classifier", clf, "--image-dir", tmp_path / "slide",
                           "--size", "16", "--cache-dir", "none", "--corruptions", "blur",
                           "--severities", "3", "--out", tmp_path / "r")
    assert_one_line_error(code, err, r"robustness measures accuracy and needs labelled cells.*--labels")
    assert not (tmp_path / "r").exists()
    code, _, err = run_cli(capsys, "robustness", "--classifier", clf, "--npz", npz, "--corruptions",
                           "blur", "--severities", "3", "--out", tmp_path / "r")
    assert code == 0, err
    kept = tree(tmp_path / "r")
    code, _, err = run_cli(capsys, "robustness", "--classifier", clf, "--npz", npz, "--corruptions",
                           "blur", "--severities", "3", "--out", tmp_path / "r")
    assert_one_line_error(code, err, r"already holds robustness.csv.*set --overwrite")
    assert tree(tmp_path / "r") == kept


def test_medmnistc_corruptions_join_when_installed_and_are_skipped_cleanly_otherwise(classifier, tmp_path, capsys):
    from ssl_blood.analysis.robustness import available_corruptions, medmnistc_corruptions

    extra = medmnistc_corruptions()
    names = list(available_corruptions())
    assert names[:4] == ["stain", "blur", "resample", "brightness"]
    if not extra:  # medmnistc (or ImageMagick) absent: only ssl-blood's own shifts, no error
        assert names == ["stain", "blur", "resample", "brightness"]
        pytest.skip("medmnistc with Wand/ImageMagick is not installed (pip install -e '.[corruptions]')")
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    for name, corrupt in extra.items():
        out = corrupt(images, 2, seed=1)
        assert out.shape == images.shape and out.dtype == np.uint8, name
        assert np.array_equal(out, corrupt(images, 2, seed=1)), name  # seeded
    clf, npz = classifier
    first = next(iter(extra))
    code, _, err = run_cli(capsys, "robustness", "--classifier", clf, "--npz", npz, "--corruptions",
                           first, "--severities", "1", "--out", tmp_path / "r")
    assert code == 0, err


def test_a_corruption_that_cannot_apply_to_these_images_is_left_out_and_said(classifier, monkeypatch, tmp_path):
    import ssl_blood.analysis.robustness as robustness
    from ssl_blood.classify.classifier import Classifier
    from ssl_blood.data import load_split, resolve_source
    from ssl_blood.data.shifts import SHIFTS

    def too_small(images, severity, seed=0):
        raise ValueError("empty range for randrange()")

    monkeypatch.setattr(robustness, "available_corruptions", lambda: {**SHIFTS, "medmnistc-bubble": too_small})
    clf, npz = classifier
    cells = load_split(resolve_source(npz=str(npz)), "test")
    result = robustness.run_robustness(Classifier.load(clf, "cpu"), cells, ["blur", "medmnistc-bubble"], [2])
    assert result["corruptions"] == ["blur"] and "randrange" in result["skipped"]["medmnistc-bubble"]
    assert [r["corruption"] for r in result["rows"]] == ["clean", "blur"]

    def too_small_at_5(images, severity, seed=0):  # medmnistc's bubble on 28-px images
        if severity == 5:
            raise ValueError("empty range for randrange() (15, 14, -1)")
        return images[:, :, ::-1].copy()

    monkeypatch.setattr(robustness, "available_corruptions", lambda: {**SHIFTS, "medmnistc-bubble": too_small_at_5})
    result = robustness.run_robustness(Classifier.load(clf, "cpu"), cells, ["medmnistc-bubble"], [3, 5])
    assert result["corruptions"] == ["medmnistc-bubble"]  # kept where it applies
    assert result["skipped"]["medmnistc-bubble"].startswith("at severity 5: medmnistc cannot apply")
    assert result["left_out"] == {"medmnistc-bubble": [5]}
    assert [(r["corruption"], r["severity"]) for r in result["rows"]] == [("clean", 0), ("medmnistc-bubble", 3)]
    from ssl_blood.analysis.plots import robustness_heat_map_png

    assert robustness_heat_map_png(result, tmp_path / "map.png").stat().st_size > 0  # the gap drawn as n/a
