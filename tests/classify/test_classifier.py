"""The classifier a lab keeps: labels CSV in, train-classifier, predict on a folder of PNGs,
calibration, and every way its inputs can be wrong."""

import csv
import json

import numpy as np
import pytest

from ssl_blood.classify.calibration import calibration_report, expected_calibration_error
from ssl_blood.classify.labels import apply_labels, read_labels
from ssl_blood.cli import main
from ssl_blood.data import load_split, resolve_source
from ssl_blood.errors import UserError
from tests.helpers import assert_one_line_error, run_cli, tree, two_clusters, write_png


@pytest.fixture(scope="module")
def slides(tiny_run, tmp_path_factory):
    """Two folders of PNGs (flat, unlabelled): `today` from the synthetic train split, `tomorrow`
    from its test split, with the true class of every file."""
    run, npz = tiny_run
    root = tmp_path_factory.mktemp("slides")
    arrays = np.load(npz)
    truth = {}
    for name, split in (("today", "train"), ("tomorrow", "test")):
        for i, (image, label) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0])):
            write_png(root / name / f"cell_{i:04d}.png", image)
            truth[(name, f"cell_{i:04d}.png")] = int(label)
    return run, root, truth


def _fill(picks, truth, names, folder):
    """A person fills in picks.csv's empty label column."""
    with open(picks, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["label"] = names[truth[(folder, row["path"])]]
    with open(picks, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]), lineterminator="\r\n")  # a spreadsheet's CRLF
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_select_fill_train_predict_round_trip(slides, tmp_path, capsys):
    from tests.helpers import CELL_NAMES

    run, root, truth = slides
    ckpt = str(run / "checkpoint.pt")
    folder = ["--image-dir", str(root / "today"), "--size", "16", "--cache-dir", "none"]
    assert main(["embed", "--checkpoint", ckpt, *folder, "--out", str(tmp_path / "e.npz")]) == 0
    assert main(["select", "--embeddings", str(tmp_path / "e.npz"), "--budget", "40",
                 "--out", str(tmp_path / "picks.csv")]) == 0
    rows = _fill(tmp_path / "picks.csv", truth, CELL_NAMES, "today")
    assert {"path", "label"} <= set(rows[0]) and len(rows) == 40
    capsys.readouterr()
    assert main(["train-classifier", "--checkpoint", ckpt, *folder, "--labels", str(tmp_path / "picks.csv"),
                 "--out", str(tmp_path / "clf"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert sum(card["labels_per_class"].values()) == 40 and card["cross_validation"]["folds"] >= 2
    assert card["calibration"]["bins"] == 15 and card["labels_file"]["sha256"]
    card_md = (tmp_path / "clf" / "card.md").read_text()
    assert card_md.startswith("# Classifier: 4 classes, 40 labelled")
    assert "averaged over 8 dihedral view(s)" in card_md and "a second head" in card_md
    # the labelled cells themselves: the classifier agrees with the labels it was given
    assert main(["predict", "--classifier", str(tmp_path / "clf"), *folder,
                 "--out", str(tmp_path / "today.csv"), "--min-probability", "0"]) == 0
    with open(tmp_path / "today.csv") as f:
        predicted = {r["path"]: r for r in csv.DictReader(f)}
    given = {r["path"]: r["label"] for r in rows}
    assert np.mean([predicted[p]["predicted"] == label for p, label in given.items()]) >= 0.9
    # tomorrow's slide: one row per file, counts that add up, better than chance
    capsys.readouterr()
    assert main(["predict", "--classifier", str(tmp_path / "clf"), "--image-dir", str(root / "tomorrow"),
                 "--size", "16", "--cache-dir", "none", "--out", str(tmp_path / "tomorrow.csv"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    with open(tmp_path / "tomorrow.csv") as f:
        out = list(csv.DictReader(f))
    assert len(out) == counts["cells"] == 40
    assert sum(c["cells"] for c in counts["classes"].values()) == 40
    assert counts["review"] == sum(int(r["review"]) for r in out)
    assert all(abs(sum(float(r[f"p_{c}"]) for c in CELL_NAMES) - 1) < 1e-3 for r in out)
    right = np.mean([CELL_NAMES.index(r["predicted"]) == truth[("tomorrow", r["path"])] for r in out])
    assert right > 0.5  # 4 classes: chance is 0.25
    assert json.loads((tmp_path / "tomorrow.counts.json").read_text())["cells"] == 40
    # the next round: given the classifier, select picks by its margin (auto), never a labelled cell
    code, out, err = run_cli(capsys, "select", "--embeddings", tmp_path / "e.npz", "--budget", "8",
                             "--labels", tmp_path / "picks.csv", "--classifier", tmp_path / "clf",
                             "--out", tmp_path / "picks2.csv", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["strategy"] == "margin" and all("margin" in p for p in result["picks"])
    assert len(result["picks"]) == 8 and not {p["path"] for p in result["picks"]} & set(given)
    # bad input: one line, exit 2, nothing written
    before = tree(tmp_path)
    code, _, err = run_cli(capsys, "predict", "--classifier", tmp_path / "clf", "--image-dir",
                           root / "tomorrow", "--size", "16", "--out", tmp_path / "tomorrow.csv")
    assert_one_line_error(code, err, r"--out .*tomorrow.csv exists; set --overwrite")
    (tmp_path / "clf" / "head.pt").write_bytes((tmp_path / "clf" / "head.pt").read_bytes() + b"x")
    code, _, err = run_cli(capsys, "predict", "--classifier", tmp_path / "clf", "--image-dir",
                           root / "tomorrow", "--size", "16", "--out", tmp_path / "new.csv")
    assert_one_line_error(code, err, r"--classifier .*head.pt was altered")
    assert not (tmp_path / "new.csv").exists()
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("clf")} == \
        {k: v for k, v in before.items() if not k.startswith("clf")}


def test_a_classifier_refuses_images_of_another_channel_count(tiny_run, tmp_path, capsys):
    from tests.helpers import make_npz

    run, _ = tiny_run
    assert main(["train-classifier", "--checkpoint", str(run / "checkpoint.pt"), "--shots", "5",
                 "--out", str(tmp_path / "clf")]) == 0
    gray = make_npz(tmp_path / "gray.npz", channels=1)
    code, _, err = run_cli(capsys, "predict", "--classifier", tmp_path / "clf", "--npz", gray,
                           "--out", tmp_path / "p.csv")
    assert_one_line_error(code, err, r"are \(1, 16, 16\) .* made for \(3, 16, 16\)")
    assert not (tmp_path / "p.csv").exists()
    config = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    (tmp_path / "clf" / "classifier.json").write_text(json.dumps({**config, "format_version": 99}))
    code, _, err = run_cli(capsys, "predict", "--classifier", tmp_path / "clf", "--npz", gray,
                           "--out", tmp_path / "p.csv")
    assert_one_line_error(code, err, r"has format 99, from a newer ssl-blood")


def test_calibration_cools_an_over_confident_head_and_leaves_a_calibrated_one():
    rng = np.random.default_rng(0)
    n, c = 600, 4
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += 1.5  # a moderately good classifier...
    hot = logits * 6  # ...made over-confident
    folds = np.arange(n) % 5
    report = calibration_report(hot, labels, folds)
    assert report["kept"] and report["temperature"] > 2
    assert report["nll_after"] < report["nll_before"] and report["ece_after"] < report["ece_before"]
    from ssl_blood.classify.calibration import softmax

    honest = rng.normal(size=(n, c)) * 2  # labels drawn from the head's own probabilities:
    drawn = np.array([rng.choice(c, p=p) for p in softmax(honest)])  # calibrated by construction
    fine = calibration_report(honest, drawn, folds)
    assert fine["temperature"] == 1.0 or abs(fine["temperature"] - 1) < 0.2
    assert fine["nll_after"] <= fine["nll_before"]  # never worse than uncalibrated
    probs = np.eye(c)[labels]  # perfectly confident and right
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0)


def test_cross_fitted_calibration_cools_only_an_over_confident_head():
    rng = np.random.default_rng(1)
    n, c = 120, 8  # a lab's 120 labels in 3 folds: the 2-SE rule's noisy regime
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), labels] += 2.0
    folds = np.arange(n) % 3
    hot = calibration_report(logits * 4, labels, folds, cross_fitted=True)
    assert hot["kept"] and hot["temperature"] > 2
    assert hot["nll_after"] < hot["nll_before"] and hot["ece_after"] < hot["ece_before"]
    shy = calibration_report(logits * 0.3, labels, folds, cross_fitted=True)  # under-confident
    assert not shy["kept"] and shy["temperature"] == 1.0  # never sharpened
    assert shy["ece_after"] == shy["ece_before"] and shy["nll_after"] == shy["nll_before"]


def test_matching_temperature_recovers_the_temperature_between_two_models():
    from ssl_blood.classify.calibration import fit_temperature, matching_temperature, softmax

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(500, 5)) * 3
    assert matching_temperature(logits, softmax(logits, 2.5)) == pytest.approx(2.5, rel=1e-3)
    assert matching_temperature(logits, softmax(logits, 0.5)) == pytest.approx(0.5, rel=1e-3)
    labels = logits.argmax(1)  # one-hot targets: the NLL temperature
    assert fit_temperature(logits, labels) == pytest.approx(matching_temperature(logits, np.eye(5)[labels]))


@pytest.mark.parametrize("text, pattern", [
    ("path,label\na.png,x\na.png,y\n", r"'a.png' is labelled 'x' on line 2 and 'y' on line 3"),
    ("path,label\nnone.png,x\nb.png,x\n", r"line 2 names path 'none.png', which is not a cell"),
    ("file,label\na.png,x\n", r"needs a 'label' column and an 'id' or 'path' column"),
    ("path,label\na.png,\n", r"labels no cell"),
    ("id,label\nabc,x\n", r"line 2 has id 'abc'"),
])
def test_bad_labels_files(text, pattern, tmp_path):
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        write_png(tmp_path / "imgs" / name, np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "labels.csv").write_text(text)
    cells = load_split(resolve_source(image_dir=str(tmp_path / "imgs"), size=16, cache_dir=""), "train")
    with pytest.raises(UserError, match=pattern):
        apply_labels(cells, read_labels(tmp_path / "labels.csv"))


def test_labels_from_a_spreadsheet_are_read(tmp_path):
    """BOM, CRLF and a quoted comma in a class name: all accepted."""
    (tmp_path / "imgs").mkdir()
    for name in ("a.png", "b.png"):
        write_png(tmp_path / "imgs" / name, np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "labels.csv").write_bytes('\ufeffpath,label\r\na.png,"band, immature"\r\nb.png,blast\r\n'.encode())
    cells = load_split(resolve_source(image_dir=str(tmp_path / "imgs"), size=16, cache_dir=""), "train")
    labelled = apply_labels(cells, read_labels(tmp_path / "labels.csv"))
    assert labelled.class_names == ("band, immature", "blast")
    by_path = dict(zip(labelled.metadata["path"], labelled.labels.tolist()))
    assert by_path == {"a.png": 0, "b.png": 1}


def test_a_single_class_is_refused_and_a_single_cell_class_is_noted(tiny_run, tmp_path, capsys):
    run, npz = tiny_run
    (tmp_path / "one.csv").write_text("id,label\n0,a\n1,a\n")
    code, _, err = run_cli(capsys, "train-classifier", "--checkpoint", run / "checkpoint.pt",
                           "--labels", tmp_path / "one.csv", "--out", tmp_path / "clf")
    assert_one_line_error(code, err, r"the labels name one class \(a\); a classifier needs cells of at least 2")
    assert not (tmp_path / "clf").exists()
    (tmp_path / "labels.csv").write_text("id,label\n" + "".join(f"{i},a\n" for i in range(6)) + "6,b\n")
    code, out, err = run_cli(capsys, "train-classifier", "--checkpoint", run / "checkpoint.pt",
                             "--labels", tmp_path / "labels.csv", "--out", tmp_path / "clf", "--json")
    assert code == 0 and "1 class(es) have a single labelled cell" in err
    assert json.loads(out)["labels_per_class"] == {"a": 6, "b": 1}


def test_onnx_export_matches_pytorch(tiny_run, tmp_path, capsys):
    import onnx
    import onnxruntime

    from ssl_blood.classify import Classifier

    run, npz = tiny_run
    assert main(["train-classifier", "--checkpoint", str(run / "checkpoint.pt"), "--shots", "6",
                 "--out", str(tmp_path / "clf")]) == 0
    assert main(["export", "--classifier", str(tmp_path / "clf"), "--out", str(tmp_path / "clf.onnx")]) == 0
    proto = onnx.load(str(tmp_path / "clf.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    model = Classifier.load(tmp_path / "clf", "cpu")
    assert json.loads(meta["class_names"]) == list(model.class_names) and meta["views"] == str(model.views) == "8"
    cells = load_split(resolve_source(npz=str(npz)), "test")
    expected = model.predict(cells, min_probability=0).probabilities
    session = onnxruntime.InferenceSession(str(tmp_path / "clf.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7, len(cells)):  # the batch axis is dynamic
        got = session.run(None, {"images": cells.images[:batch].numpy()})[0]
        assert np.abs(got - expected[:batch]).max() < 1e-4
    code, _, err = run_cli(capsys, "export", "--classifier", tmp_path / "clf", "--out", tmp_path / "clf.onnx")
    assert_one_line_error(code, err, r"--out .*clf.onnx exists; set --overwrite")


def test_a_classifier_embeds_in_the_precision_it_was_fitted_in(tiny_run, tmp_path):
    """"auto" precision is a timing test on some CPUs; a saved classifier keeps the precision of
    the features its head was fitted on, so predict reads the same features on every run."""
    from ssl_blood.classify import Classifier

    run, npz = tiny_run
    assert main(["train-classifier", "--checkpoint", str(run / "checkpoint.pt"), "--shots", "6",
                 "--out", str(tmp_path / "clf")]) == 0
    config_path = tmp_path / "clf" / "classifier.json"
    config = json.loads(config_path.read_text())
    fitted = Classifier.load(tmp_path / "clf", "cpu")
    assert config["precision"] == fitted.embedder.feature_precision == fitted.embedder.spec.precision
    cells = load_split(resolve_source(npz=str(npz)), "test")
    plain = fitted.features(cells.images)
    other = "bf16" if config["precision"] == "fp32" else "fp32"
    config_path.write_text(json.dumps({**config, "precision": other}))
    switched = Classifier.load(tmp_path / "clf", "cpu")
    assert switched.embedder.feature_precision == other
    assert np.abs(switched.features(cells.images) - plain).max() > 1e-4  # bf16 rounds at ~1e-3


def test_linear_probe_on_your_own_labels_is_cross_validated(tiny_run, tmp_path, capsys):
    """A folder of PNGs and a labels file: the probe is scored by cross-validation on the
    labelled cells (never a 3-cell val split), with per-class recall."""
    from tests.helpers import npz_slide

    run, npz = tiny_run
    npz_slide(npz, "train", tmp_path / "cells", tmp_path / "labels.csv", labelled=32)
    code, out, err = run_cli(capsys, "linear-probe", "--checkpoint", run / "checkpoint.pt", "--image-dir",
                             tmp_path / "cells", "--size", "16", "--cache-dir", "none", "--labels",
                             tmp_path / "labels.csv", "--out", tmp_path / "eval", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["protocol"].endswith("-fold stratified cross-validation on the labelled cells")
    assert sum(result["labels_per_class"].values()) == 32 and set(result["recall"]) == set(result["labels_per_class"])
    assert result["accuracy"] > 0.5 and result["accuracy_ci95"][0] <= result["accuracy"] <= result["accuracy_ci95"][1]
    assert json.loads((tmp_path / "eval" / "linear_probe_labels.json").read_text()) == result
    code, _, err = run_cli(capsys, "linear-probe", "--embeddings", tmp_path / "e.npz", "--labels",
                           tmp_path / "labels.csv")
    assert_one_line_error(code, err, r"--labels are scored on features embedded from --checkpoint")


def test_few_shot_on_your_own_labels_scores_every_head_by_cross_validation(tiny_run, tmp_path, capsys):
    """few-shot --labels: prototype, kNN and logistic heads, each cross-validated on the same
    folds of the person's labelled cells; the best is named; a head name it lacks is refused."""
    from tests.helpers import npz_slide

    run, npz = tiny_run
    truth = npz_slide(npz, "train", tmp_path / "cells", tmp_path / "labels.csv", labelled=40)
    args = ["few-shot", "--checkpoint", run / "checkpoint.pt", "--image-dir", tmp_path / "cells", "--size",
            "16", "--cache-dir", "none", "--labels", tmp_path / "labels.csv"]
    code, out, err = run_cli(capsys, *args, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["heads"]) == {"prototype", "knn", "logreg"}
    assert result["head"] == max(result["heads"], key=lambda h: result["heads"][h]["accuracy"])
    labelled = set(list(truth.values())[:40])
    for metrics in result["heads"].values():
        assert 0 <= metrics["balanced_accuracy"] <= 1 and set(metrics["recall"]) == set(result["labels_per_class"])
    assert result["heads"][result["head"]]["accuracy"] > 1.5 / len(labelled)  # well above chance
    code, out, err = run_cli(capsys, *args, "--heads", "prototype")
    assert code == 0, err
    assert "prototype*" in out and "prototype recall" in out
    code, _, err = run_cli(capsys, *args, "--heads", "svm")
    assert_one_line_error(code, err, r"unknown few-shot --heads entry 'svm'")


def test_views_are_the_classifiers_own_and_predict_may_use_fewer(slides, tmp_path, capsys):
    """A classifier averages 8 dihedral views by default, records it, and classifies with them;
    predict --views 1 is the fast path (same classes for most cells); --from keeps the views."""
    from ssl_blood.classify import Classifier

    from tests.helpers import CELL_NAMES

    run, root, truth = slides
    folder = ["--image-dir", str(root / "today"), "--size", "16", "--cache-dir", "none"]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label")] + [(f"cell_{i:04d}.png", CELL_NAMES[truth[("today", f"cell_{i:04d}.png")]])
                                                     for i in range(32)])
    assert main(["train-classifier", "--checkpoint", str(run / "checkpoint.pt"), *folder,
                 "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "clf")]) == 0
    model = Classifier.load(tmp_path / "clf", "cpu")
    assert model.views == 8 == json.loads((tmp_path / "clf" / "classifier.json").read_text())["views"]
    cells = load_split(resolve_source(image_dir=str(root / "tomorrow"), size=16, cache_dir=""), "train")
    eight, one = model.predict(cells), model.predict(cells, views=1)
    np.testing.assert_allclose(eight.probabilities, model.probabilities(model.embedder(cells.images, views=8)), atol=1e-5)
    assert np.abs(model.features(cells.images) - model.features(cells.images, views=1)).max() > 1e-3
    assert (eight.predicted == one.predicted).mean() >= 0.8  # the synthetic classes are easy
    capsys.readouterr()
    assert main(["predict", "--classifier", str(tmp_path / "clf"), "--image-dir", str(root / "tomorrow"),
                 "--size", "16", "--cache-dir", "none", "--views", "1", "--out", str(tmp_path / "p.csv"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["views"] == 1
    code, _, err = run_cli(capsys, "train-classifier", "--from", tmp_path / "clf", *folder, "--labels",
                           tmp_path / "labels.csv", "--views", "2", "--out", tmp_path / "clf2")
    assert_one_line_error(code, err, r"averages 8 views per cell; its views stay \(leave --views out\)")
    assert not (tmp_path / "clf2").exists()


def test_the_smoothed_review_score_lowers_a_call_its_neighbours_disagree_with():
    """Two cells called class 0 at 0.8: one among pool cells called 0, one among pool cells
    called 1; a pool cell scored against its own pool is not its own neighbour."""
    from ssl_blood.classify.classifier import smoothed_scores
    from ssl_blood.features.embeddings import l2_normalize

    pool = l2_normalize(np.array([[1, 0], [1, 0.1], [1, -0.1], [0, 1], [0.1, 1], [-0.1, 1]], dtype=np.float32))
    pool_p = np.array([[0.9, 0.1]] * 3 + [[0.2, 0.8]] * 3)
    p = np.array([[0.8, 0.2], [0.8, 0.2]])
    scores = smoothed_scores(p, np.array([[1, 0.05], [0.05, 1]], dtype=np.float32), pool, pool_p, k=3)
    assert scores == pytest.approx([(0.8 + 3 * 0.9) / 4, (0.8 + 3 * 0.2) / 4])
    own = smoothed_scores(pool_p, pool, pool, pool_p, k=2, pool_queries=True)
    assert own == pytest.approx([0.9] * 3 + [0.8] * 3)  # the two others of its cluster
    pool_p[0] = [0.1, 0.9]  # a pool cell its cluster disagrees with: its own call, their view of it
    assert smoothed_scores(pool_p, pool, pool, pool_p, k=2, pool_queries=True)[0] == pytest.approx((0.9 + 0.1 + 0.1) / 3)


def test_the_review_threshold_of_a_smoothed_score_sends_the_asked_share_of_the_pool():
    from ssl_blood.classify.classifier import POOL_LOGITS, LinearHead, smoothed_scores
    from ssl_blood.classify.calibration import softmax
    from ssl_blood.features.embeddings import l2_normalize

    rng = np.random.default_rng(0)
    features = l2_normalize(rng.normal(0, 1, (500, 8)).astype(np.float32))
    tensors = {"shift_pool_features": torch_tensor(features), POOL_LOGITS: torch_tensor(rng.normal(0, 2, (500, 3)))}
    for score in ("smoothed", "top"):
        head = LinearHead(tensors, "", 1.5, {}, score)
        threshold = head.pool_threshold(0.2)
        p = softmax(tensors[POOL_LOGITS].numpy(), 1.5)
        expected = smoothed_scores(p, features, features, p, pool_queries=True) if score == "smoothed" else p.max(1)
        assert head.smooths == (score == "smoothed")
        assert (expected < threshold).mean() == pytest.approx(0.2, abs=0.005)
    assert not LinearHead({}, "", 1.0, {}, "smoothed").smooths  # no pool kept: the top probability


def torch_tensor(array):
    import torch

    return torch.as_tensor(np.asarray(array, dtype=np.float32))


def test_a_classifier_reviews_by_its_neighbours_when_the_folder_has_unlabelled_cells(slides, tmp_path, capsys):
    """Default: the smoothed score, kept in the folder, written per cell, what the flag compares;
    --review-score top: the calibrated probability; labelled cells alone: the top probability."""
    from ssl_blood.classify import Classifier
    from ssl_blood.classify.calibration import softmax
    from ssl_blood.classify.classifier import POOL_LOGITS, smoothed_scores

    from tests.helpers import CELL_NAMES

    run, root, truth = slides
    folder = ["--image-dir", str(root / "today"), "--size", "16", "--cache-dir", "none"]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label")] + [(f"cell_{i:04d}.png", CELL_NAMES[truth[("today", f"cell_{i:04d}.png")]])
                                                     for i in range(32)])
    tomorrow = ["--image-dir", str(root / "tomorrow"), "--size", "16", "--cache-dir", "none"]
    for score in ("auto", "smoothed", "top"):
        capsys.readouterr()
        assert main(["train-classifier", "--checkpoint", str(run / "checkpoint.pt"), *folder, "--views", "1",
                     "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / score),
                     "--review-score", score, "--json"]) == 0
        card = json.loads(capsys.readouterr().out)
        assert card["review_score"]["asked"] == score
        chosen = card["review_score"]["score"]
        if score == "auto":  # by cross-validation on the 32 labelled cells
            compared = card["review_score"]["cv_accepted_accuracy"]
            assert chosen == ("smoothed" if compared["smoothed"] > compared["top"] else "top")
        else:
            assert chosen == score
        assert json.loads((tmp_path / score / "classifier.json").read_text())["review_score"] == chosen
        assert "Cells go to review when" in (tmp_path / score / "card.md").read_text()
        assert main(["predict", "--classifier", str(tmp_path / score), *tomorrow,
                     "--out", str(tmp_path / f"{score}.csv"), "--review", str(tmp_path / f"{score}.html")]) == 0
        with open(tmp_path / f"{score}.csv") as f:
            rows = list(csv.DictReader(f))
        model = Classifier.load(tmp_path / score, "cpu")
        cells = load_split(resolve_source(image_dir=str(root / "tomorrow"), size=16, cache_dir=""), "train")
        prediction = model.predict(cells)
        review_score = np.array([float(r["review_score"]) for r in rows])
        top = np.array([float(r["probability"]) for r in rows])
        np.testing.assert_allclose(review_score, prediction.review_scores, atol=1e-4)
        flagged = (prediction.review_scores < model.thresholds["min_probability"]) | (
            prediction.ood > model.thresholds["max_ood"])
        assert [int(r["review"]) for r in rows] == flagged.astype(int).tolist() == prediction.review.astype(int).tolist()
        assert prediction.review_score == chosen
        if chosen == "top":
            np.testing.assert_allclose(review_score, top, atol=1e-4)
        else:  # pool: the folder's 64 unlabelled cells, whose calls average in
            assert model.tensors[POOL_LOGITS].shape == (96 - 32, 4)
            expected = smoothed_scores(prediction.probabilities, model.features(cells.images),
                                       model.tensors["shift_pool_features"].numpy(),
                                       softmax(model.tensors[POOL_LOGITS].numpy(), model.temperature))
            np.testing.assert_allclose(prediction.review_scores, expected, atol=1e-6)
            assert "averaged with its nearest cells" in (tmp_path / f"{score}.html").read_text()
    labelled_only = load_split(resolve_source(image_dir=str(root / "today"), size=16, cache_dir=""), "train")
    labelled_only = labelled_only.subset(np.arange(32))
    table = read_labels(tmp_path / "labels.csv")
    model = Classifier.train(model.embedder, apply_labels(labelled_only, table), views=1)
    assert model.review_score == "top" and model.card["review_score"]["meaning"].endswith("(no unlabelled cells to lean on)")


def test_auto_reviews_by_the_neighbours_only_where_they_review_the_labelled_cells_better():
    """Labelled cells whose confident calls are wrong and whose neighbours know better: auto
    takes the smoothed score; sure calls that are right, among neighbours that call every cell
    wrongly: the top probability."""
    from ssl_blood.classify.classifier import POOL_LOGITS, LinearHead, _chosen_review_score

    pool, pool_labels, features, labels = two_clusters(20)
    wrong = np.arange(40) % 5 == 0  # a fifth of the calls wrong
    calls = np.where(wrong, 1 - labels, labels)
    for pool_calls, p_wrong, p_right, expected in ((pool_labels, 0.9, 0.7, "smoothed"),
                                                   (1 - pool_labels, 0.6, 0.9, "top")):
        oof = np.where(np.eye(2)[calls] == 1, np.where(wrong, p_wrong, p_right)[:, None],
                       np.where(wrong, 1 - p_wrong, 1 - p_right)[:, None])
        tensors = {"shift_pool_features": torch_tensor(pool), POOL_LOGITS: torch_tensor(8.0 * np.eye(2)[pool_calls])}
        head = LinearHead(tensors, "", 1.0, {}, "smoothed")
        chosen, compared = _chosen_review_score(head, "auto", oof, labels, features, 0.2)
        other = "top" if expected == "smoothed" else "smoothed"
        assert chosen == expected and compared[expected] == 1.0 > compared[other]
    assert _chosen_review_score(LinearHead({}, "", 1.0, {}, "smoothed"), "auto", oof, labels, features, 0.2) == ("top", None)


def test_a_lab_s_larger_crops_are_read_at_the_checkpoint_s_side_unless_a_side_is_given(slides, tmp_path, capsys):
    """A lab's 40-px crops through a 16-px checkpoint: without --size every command reads them at
    the checkpoint's side (and says so); a side the user gives is kept, and refused if it does
    not fit."""
    from PIL import Image

    from tests.helpers import CELL_NAMES

    run, root, truth = slides
    crops = tmp_path / "crops"
    for path in sorted((root / "today").glob("*.png"))[:48]:
        write_png(crops / path.name, np.asarray(Image.open(path)), size=40)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p.name},{CELL_NAMES[truth[('today', p.name)]]}\n"
                                                for p in sorted(crops.glob("*.png"))[:24]))
    ckpt = str(run / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train-classifier", "--checkpoint", ckpt, "--image-dir", str(crops), "--cache-dir", "none",
                 "--labels", str(labels), "--out", str(tmp_path / "clf")]) == 0
    assert "reading the images at 16 px, the side the backbone was trained at" in capsys.readouterr().err
    card_md = (tmp_path / "clf" / "card.md").read_text()
    assert "review_rate_target" not in card_md and "15%" in card_md
    assert main(["predict", "--classifier", str(tmp_path / "clf"), "--image-dir", str(crops),
                 "--cache-dir", "none", "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv") as f:
        assert len(list(csv.DictReader(f))) == 48
    from ssl_blood.classify.classifier import Classifier

    given_a_source = Classifier.load(tmp_path / "clf").predict(resolve_source(image_dir=str(crops), cache_dir=""))
    assert len(given_a_source.predicted) == 48  # Python: a source is read at the backbone's side too
    capsys.readouterr()
    code, _, err = run_cli(capsys, "predict", "--classifier", tmp_path / "clf", "--image-dir", crops,
                           "--size", "40", "--cache-dir", "none", "--out", tmp_path / "q.csv")
    assert_one_line_error(code, err, r"\(3, 40, 40\).*made for \(3, 16, 16\).*--size")
    assert not (tmp_path / "q.csv").exists()


def test_a_guessed_side_is_not_recorded_and_a_chosen_one_is_final(tmp_path):
    from ssl_blood.data import DataSource

    for i in range(3):
        write_png(tmp_path / "cells" / f"c{i}.png", np.full((40, 40, 3), 60 * i, np.uint8))
    guessed = resolve_source(image_dir=str(tmp_path / "cells"), cache_dir="")
    chosen = resolve_source(image_dir=str(tmp_path / "cells"), size=24, cache_dir="")
    assert (guessed.size, guessed.size_guessed) == (40, True) and not chosen.size_guessed
    assert "size_guessed" not in guessed.to_dict()
    assert not DataSource.from_dict(guessed.to_dict()).size_guessed  # recorded: the side is chosen
    assert not guessed.with_size(28).size_guessed


def test_shifted_copies_of_a_held_out_cell_never_train_its_fold():
    """Features without any signal and copies identical to their cells: were a held-out cell's
    copies in its fold's training set, the out-of-fold accuracy would be near perfect."""
    from ssl_blood.classify.classifier import _cross_validated_logistic

    rng = np.random.default_rng(0)
    features = rng.normal(size=(80, 64)).astype(np.float32)
    labels = np.arange(80) % 4
    origin = np.tile(np.arange(80), 2)
    fit = _cross_validated_logistic(features, labels, 4, seed=0, copies=(features[origin], origin))
    leaked = _cross_validated_logistic(features, labels, 4, seed=0)  # the same cells, no copies
    assert (fit["oof_logits"].argmax(1) == labels).mean() < 0.5  # chance is 0.25
    assert abs((fit["oof_logits"].argmax(1) == labels).mean()
               - (leaked["oof_logits"].argmax(1) == labels).mean()) < 0.2


def test_shift_copies_train_the_head_are_kept_and_carried_by_from(slides, tmp_path, capsys):
    from tests.helpers import CELL_NAMES

    run, root, truth = slides
    folder = ["--image-dir", str(root / "today"), "--size", "16", "--cache-dir", "none"]
    names = sorted(p.name for p in (root / "today").glob("*.png"))
    for part, chosen in (("first", names[:32]), ("more", names[32:48])):
        (tmp_path / f"{part}.csv").write_text("path,label\n" + "".join(
            f"{n},{CELL_NAMES[truth[('today', n)]]}\n" for n in chosen))
    capsys.readouterr()
    assert main(["train-classifier", "--checkpoint", str(run / "checkpoint.pt"), *folder, "--labels",
                 str(tmp_path / "first.csv"), "--shift-copies", "2", "--out", str(tmp_path / "clf"),
                 "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["shift_copies"]["per_cell"] == 2 and card["shift_copies"]["copies"] == 64
    assert "2 shifted copies of each labelled cell" in (tmp_path / "clf" / "card.md").read_text()
    assert main(["train-classifier", "--from", str(tmp_path / "clf"), *folder, "--labels",
                 str(tmp_path / "more.csv"), "--out", str(tmp_path / "clf2"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["shift_copies"]["copies"] == 96  # the first classifier's 64 and 2 of each added cell
    before = tree(tmp_path)
    for bad in (["--head", "fine-tune", "--shift-copies", "2"], ["--shift-copies", "-1"]):
        code, _, err = run_cli(capsys, "train-classifier", "--checkpoint", run / "checkpoint.pt", *folder,
                               "--labels", tmp_path / "first.csv", *bad, "--out", tmp_path / "bad")
        assert_one_line_error(code, err, r"--shift-copies -?\d+: a whole number of copies, for head logistic")
    code, _, err = run_cli(capsys, "train-classifier", "--from", tmp_path / "clf", *folder, "--labels",
                           tmp_path / "more.csv", "--shift-copies", "4", "--out", tmp_path / "bad")
    assert_one_line_error(code, err, "learned from 2 shifted copies per cell; its copies stay .leave --shift-copies out.")
    assert tree(tmp_path) == before
