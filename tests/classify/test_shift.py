"""The batch shift check of predict (classify.shift): calibrated on the training lab's own
unlabelled cells, quiet on a clean slide whatever its class mix, loud on a slide with another
stain, blur or exposure."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_blood.classify import shift
from ssl_blood.classify.classifier import Classifier
from ssl_blood.data.shifts import apply_shift
from tests.helpers import CELL_NAMES, npz_slide, run_cli, write_png


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
    assert model.has_shift_reference and len(model.tensors["shift_pool_features"]) == 56


@pytest.mark.parametrize("slide, warned", [("clean", False), ("stain", True), ("brightness", True)])
def test_predict_warns_on_a_shifted_slide_only(lab, tmp_path, capsys, slide, warned):
    code, out, err = run_cli(capsys, "predict", "--classifier", lab / "clf", "--image-dir", lab / slide,
                             "--size", "16", "--cache-dir", "none", "--out", tmp_path / "p.csv", "--json")
    assert code == 0, err
    counts = json.loads(out)
    assert counts["shift_warning"] is warned and counts["shift_score"] > 0
    assert ("look unlike the cells the classifier knows" in err) is warned


# ------------------------------------------------------------------ the test on synthetic cells


def synthetic_lab(n: int, classes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cells of 4 well-separated classes: features (n, 32) around a class centre, and 8-px RGB
    images whose colour follows the class."""
    centres = np.random.default_rng(0).normal(size=(4, 32)) * 3
    features = centres[classes] + rng.normal(size=(n, 32))
    colour = np.array([[200, 80, 80], [80, 200, 80], [80, 80, 200], [150, 150, 60]])[classes]
    images = colour[:, :, None, None] + rng.normal(0, 20, size=(n, 3, 8, 8))
    return features.astype(np.float32), np.clip(images, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def check():
    rng = np.random.default_rng(1)
    return shift.ShiftCheck(shift.reference(*synthetic_lab(1000, rng.integers(0, 4, 1000), rng)))


def test_clean_batches_rarely_warn_whatever_their_class_mix(check):
    rng = np.random.default_rng(2)
    warned = []
    for b in range(60):  # half with the pool's mix, half with almost only one or two classes
        mix = rng.integers(0, 4, 200) if b % 2 else rng.choice([b % 4, (b + 1) % 4], 200, p=[0.9, 0.1])
        warned.append(check(*synthetic_lab(200, mix, rng))["shift_warning"])
    assert np.mean(warned) <= 0.05


def test_a_moved_feature_space_or_a_darker_slide_warns_in_its_own_view(check):
    rng = np.random.default_rng(3)
    features, images = synthetic_lab(200, rng.integers(0, 4, 200), rng)
    moved = check(features + 0.5 * rng.normal(size=32).astype(np.float32), images)
    assert moved["shift_warning"] and moved["shift_views"]["features"]["statistic"] > moved["shift_views"]["features"]["threshold"]
    darker = check(features, (images * 0.8).astype(np.uint8))
    assert darker["shift_warning"]
    assert darker["shift_views"]["image_statistics"]["statistic"] > darker["shift_views"]["image_statistics"]["threshold"]
    assert darker["shift_views"]["features"]["statistic"] < darker["shift_views"]["features"]["threshold"]


def test_image_statistics_see_focus_and_stain():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(5, 3, 28, 28)).astype(np.uint8)
    stats = shift.image_statistics(images)
    assert stats.shape == (5, 8)
    blurred = shift.image_statistics(apply_shift(images, "blur", 5))
    assert (blurred[:, 6:] < stats[:, 6:]).all()  # Laplacian and gradient fall out of focus
    assert np.allclose(stats[:, :3], torch.as_tensor(images).float().mean((2, 3)).numpy() / 255, atol=1e-5)


@pytest.mark.parametrize("slide, adapted", [("clean", "none"), ("stain", "adabn"), ("brightness", "adabn")])
def test_predict_adapt_auto_re_estimates_batchnorm_only_where_the_check_warns(lab, tmp_path, capsys,
                                                                              slide, adapted):
    code, out, err = run_cli(capsys, "predict", "--classifier", lab / "clf", "--image-dir", lab / slide,
                             "--size", "16", "--cache-dir", "none", "--adapt", "auto",
                             "--out", tmp_path / "p.csv", "--json")
    assert code == 0, err
    counts = json.loads(out)
    assert counts["adapt"] == "auto" and counts["adapted"] == adapted
    assert ("BatchNorm was re-estimated on them" in err) is (adapted == "adabn")


def test_the_adabn_head_is_fitted_under_the_labs_own_statistics(lab):
    """The AdaBN head was fitted on the labelled cells' features under BatchNorm statistics
    re-estimated on the lab's own cells, so the lab's own clean cells re-estimated on
    themselves meet it in its space: it classifies them as the unadapted head does (the head
    of format 1 mapped the features instead)."""
    from ssl_blood.data import load_split, resolve_source

    model = Classifier.load(lab / "clf")
    card = json.loads((lab / "clf" / "card.json").read_text())
    assert model.adapted_head is not None and "adabn" in card
    assert card["adabn"]["cross_validation"]["accuracy"] >= 0.8
    kept = [k for k in model.tensors if k.startswith("adabn/batchnorm/")]
    assert kept and all(k.endswith(("running_mean", "running_var")) for k in kept)
    cells = load_split(resolve_source(image_dir=str(lab / "clean"), size=16, cache_dir=""), "train")
    both = model.predict_each(cells, ("none", "adabn"))
    assert both["adabn"].adapted == "adabn" and both["none"].adapted == "none"
    assert (both["adabn"].predicted == both["none"].predicted).mean() >= 0.9
    # a source re-estimated with the kept statistics embeds the labelled cells as at training
    labelled = model.embedder.with_batchnorm({k[len("adabn/batchnorm/"):]: v for k, v in model.tensors.items()
                                              if k.startswith("adabn/batchnorm/")})
    today = load_split(resolve_source(image_dir=str(lab / "today"), size=16, cache_dir=""), "train")
    first = today.subset(np.arange(40))
    np.testing.assert_allclose(labelled(first.images, views=model.views)[:5],
                               model.tensors["adabn/features"].numpy()[:5], atol=1e-4)


def add_labels(lab: Path, tiny_run, slide: str, base: Path, out: Path) -> Path:
    """`train-classifier --from base` with 8 labels of `slide` (a test-split slide of `lab`)."""
    import csv

    from ssl_blood.cli import main

    truth = dict(enumerate(np.load(tiny_run[1])["test_labels"][:, 0]))  # the slides are the test split
    labels = out.parent / f"{out.name}-labels.csv"
    with open(labels, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label"], *[[f"c{i:03d}.png", CELL_NAMES[int(truth[i])]] for i in range(8)]])
    assert main(["train-classifier", "--from", str(base), "--image-dir", str(lab / slide), "--size", "16",
                 "--cache-dir", "none", "--labels", str(labels), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def stain_added(lab, tiny_run, tmp_path_factory) -> Path:
    """The lab's classifier with 8 labels of the stained slide added (`--from`)."""
    return add_labels(lab, tiny_run, "stain", lab / "clf", tmp_path_factory.mktemp("added") / "clf2")


def test_a_new_labs_added_labels_sit_under_its_own_statistics(lab, stain_added):
    """Labels added from another lab's slide (`--from`): the AdaBN head learns the new cells'
    features under BatchNorm statistics re-estimated on that slide's own cells, as predict
    --adapt adabn will re-estimate its slides; the first lab's cells keep theirs."""
    from ssl_blood.data import load_split, resolve_source

    first, added = Classifier.load(lab / "clf"), Classifier.load(stain_added)
    old = first.tensors["adabn/features"].numpy()
    np.testing.assert_array_equal(added.tensors["adabn/features"].numpy()[:len(old)], old)
    slide = load_split(resolve_source(image_dir=str(lab / "stain"), size=16, cache_dir=""), "train")
    own = first.embedder.adapted(slide.subset(np.arange(8, len(slide))).images)  # the slide's 32 unlabelled cells
    np.testing.assert_allclose(added.tensors["adabn/features"].numpy()[len(old):],
                               own(slide.subset(np.arange(8)).images, views=added.views), atol=1e-4)
    under_first = first.embedder.with_batchnorm({k[len("adabn/batchnorm/"):]: v for k, v in first.tensors.items()
                                                 if k.startswith("adabn/batchnorm/")})
    assert not np.allclose(under_first(slide.subset(np.arange(8)).images, views=added.views),
                           added.tensors["adabn/features"].numpy()[len(old):], atol=1e-3)


@pytest.mark.parametrize("slide, warned, nearest, adapted", [
    ("clean", False, 0, "none"),  # the first lab's: known, its statistics the backbone's
    ("stain", None, 1, "adabn"),  # the added lab's: nearer it than the first, so re-estimated
    ("brightness", True, None, "adabn")])  # neither's
def test_an_added_classifier_knows_both_labs_and_adapts_the_new_ones_slides(lab, stain_added, tmp_path, capsys,
                                                                             slide, warned, nearest, adapted):
    """After `--from` the first lab's slides do not warn (before, the added lab's cells became
    the only reference and they did), the added lab's slides are still re-estimated by
    --adapt auto (before, auto never adapted them), and a third lab's warn. Whether the added
    lab's own slide warns is left to the synthetic test below: its 32-cell pool here is too
    small to calibrate the check."""
    code, out, err = run_cli(capsys, "predict", "--classifier", stain_added, "--image-dir", lab / slide,
                             "--size", "16", "--cache-dir", "none", "--adapt", "auto", "--out", tmp_path / "p.csv", "--json")
    assert code == 0, err
    counts = json.loads(out)
    assert counts["adapted"] == adapted and len(counts["shift_lab_scores"]) == 2
    assert counts["shift_unlike_first_lab"] is (slide != "clean")
    if warned is not None:
        assert counts["shift_warning"] is warned
        assert ("look unlike the cells the classifier knows" in err) is warned
    if nearest is not None:
        assert counts["shift_nearest_lab"] == nearest
    quiet_yet_adapted = not counts["shift_warning"] and adapted == "adabn"  # said why
    assert ("look like those of a lab whose labels were added" in err) is quiet_yet_adapted


def test_the_added_labs_note_is_not_said_of_the_first_labs_slides(lab, stain_added, tmp_path, capsys):
    """--adapt adabn re-estimates every slide; only one nearer an added lab is said to be like it."""
    code, out, err = run_cli(capsys, "predict", "--classifier", stain_added, "--image-dir", lab / "clean",
                             "--size", "16", "--cache-dir", "none", "--adapt", "adabn", "--out", tmp_path / "p.csv", "--json")
    assert code == 0, err
    counts = json.loads(out)
    assert counts["adapted"] == "adabn" and counts["shift_nearest_lab"] == 0
    assert "look like those of a lab whose labels were added" not in err


def test_a_batch_like_any_known_lab_does_not_warn():
    """KnownLabs on two synthetic labs (the second darker and moved in feature space): a
    batch of either is quiet and named by its lab, only the second's is unlike the first,
    and a third lab's warns."""
    rng = np.random.default_rng(5)
    first = synthetic_lab(1000, rng.integers(0, 4, 1000), rng)
    offset = 0.5 * np.random.default_rng(6).normal(size=32).astype(np.float32)

    def second_lab(n: int) -> tuple[np.ndarray, np.ndarray]:
        features, images = synthetic_lab(n, rng.integers(0, 4, n), rng)
        return features + offset, (images * 0.8).astype(np.uint8)

    tensors = {shift.EARLIER.format(0) + k: v for k, v in shift.reference(*first).items()}
    tensors.update(shift.reference(*second_lab(1000)))
    labs = shift.KnownLabs(tensors)
    for batch, nearest in ((synthetic_lab(200, rng.integers(0, 4, 200), rng), 0), (second_lab(200), 1)):
        result = labs(*batch)
        assert not result["shift_warning"] and result["shift_nearest_lab"] == nearest
        assert shift.unlike_first_lab(result) is (nearest == 1)
    features, images = synthetic_lab(200, rng.integers(0, 4, 200), rng)
    third = labs(features - offset, np.clip(images * 1.3, 0, 255).astype(np.uint8))
    assert third["shift_warning"] and shift.unlike_first_lab(third)


def test_labs_added_twice_are_all_kept_oldest_first(lab, tiny_run, stain_added, tmp_path):
    """A second `--from` keeps both labs the classifier knew, the first lab first (its pool is
    the backbone's statistics' lab, what auto compares with), and the card counts them."""
    twice = Classifier.load(add_labels(lab, tiny_run, "brightness", stain_added, tmp_path / "clf3"))
    first, once = Classifier.load(lab / "clf"), Classifier.load(stain_added)
    earlier = shift.earlier_references(twice.tensors)
    assert len(earlier) == 2
    for kept, known in zip(earlier, (first.tensors, once.tensors)):
        for key in shift.KEYS:
            torch.testing.assert_close(kept[key], known[key])
    assert twice.card["shift_check"]["known_labs"] == 3
    assert "slides like any of the 3 labs it learned from do not warn" in (tmp_path / "clf3" / "card.md").read_text()
    assert shift.earlier_references(first.tensors) == [] and "known_labs" not in first.card["shift_check"]
