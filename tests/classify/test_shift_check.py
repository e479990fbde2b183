"""The batch shift check of predict: calibrated on the training lab's own unlabelled cells, quiet
on a clean slide, loud on a slide with another stain, blur or exposure."""

import json

import numpy as np
import pytest

from ssl_blood.classify.classifier import Classifier
from ssl_blood.data.shifts import apply_shift
from tests.helpers import npz_slide, run_cli, write_png


@pytest.fixture(scope="module")
def lab(tiny_run, tmp_path_factory):
    run, npz = tiny_run
    root = tmp_path_factory.mktemp("lab")
    arrays = np.load(npz)
    npz_slide(npz, "train", root / "today", root / "labels.csv", labelled=40)
    test = np.ascontiguousarray(arrays["test_images"].transpose(0, 3, 1, 2))
    for name, images in (("clean", test), ("stain", apply_shift(test, "stain", 5, seed=0)),
                         ("brightness", apply_shift(test, "brightness", 5))):
        for i, image in enumerate(images):
            write_png(root / name / f"c{i:03d}.png", image.transpose(1, 2, 0))
    from ssl_blood.cli import main

    assert main(["train-classifier", "--checkpoint", str(run / "checkpoint.pt"), "--image-dir",
                 str(root / "today"), "--size", "16", "--cache-dir", "none", "--labels",
                 str(root / "labels.csv"), "--out", str(root / "clf")]) == 0
    return root


def test_shift_check_is_calibrated_on_the_labs_unlabelled_cells(lab):
    card = json.loads((lab / "clf" / "card.json").read_text())
    assert card["shift_check"]["calibrated_on"] == "56 unlabelled cells of the source"
    model = Classifier.load(lab / "clf")
    clean = model.tensors["clean_ood"].numpy()
    assert model.shift_check(clean[:20])["shift_warning"] is False
    assert model.shift_check(clean[:20] * 3 + 1)["shift_warning"] is True


@pytest.mark.parametrize("slide, warned", [("clean", False), ("stain", True), ("brightness", True)])
def test_predict_warns_on_a_shifted_slide_only(lab, tmp_path, capsys, slide, warned):
    code, out, err = run_cli(capsys, "predict", "--classifier", lab / "clf", "--image-dir", lab / slide,
                             "--size", "16", "--cache-dir", "none", "--out", tmp_path / "p.csv", "--json")
    assert code == 0, err
    counts = json.loads(out)
    assert counts["shift_warning"] is warned and counts["shift_score"] > 0
    assert ("look unlike the cells the classifier knows" in err) is warned
