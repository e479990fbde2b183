"""Consistency training (head fixmatch): it improves over its initial head on a tiny synthetic
image set, resumes bit for bit, FlexMatch's thresholds behave as published, and
train-classifier --head fixmatch gives a folder that carries its own backbone."""

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from ssl_blood.classify.consistency import (ConsistencyConfig, HeadedBackbone, class_thresholds,
                                            cutout, train_consistency)
from ssl_blood.data import channel_stats
from ssl_blood.evaluation.frozen import fit_logistic
from ssl_blood.model.augment import eval_preprocess
from ssl_blood.model.backbones import build_backbone
from tests.helpers import assert_one_line_error, npz_slide, run_cli, tree, two_clusters


COLOURS = np.array([[200, 60, 60], [60, 180, 60], [70, 70, 210], [200, 190, 60]])


def discs(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, np.ndarray]:
    """Four classes told apart by the colour of a central disc, on a random background colour
    with strong noise: much of what a random network's features carry (the background) says
    nothing of the class, so a head on 4 labels per class is weak (about 54 %)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] + 0.5
    images, labels = np.empty((n, 3, size, size), np.uint8), np.arange(n) % 4
    for i, c in enumerate(labels):
        cy, cx = size / 2 + rng.uniform(-2, 2, 2)
        disc = np.hypot(yy - cy, xx - cx) < 5
        image = np.where(disc[None], (COLOURS[c] + rng.normal(0, 15, 3))[:, None, None],
                         rng.uniform(0, 255, 3)[:, None, None])
        images[i] = np.clip(image + rng.normal(0, 25, image.shape), 0, 255)
    return torch.as_tensor(images), labels


def _start(labelled, labels, mean, std, unlabelled, seed=0):
    """A random cnn6 whose BatchNorm statistics are those of the cells (as pretraining leaves
    them), its head the logistic regression of the labelled cells' features."""
    torch.manual_seed(seed)
    backbone = build_backbone("cnn6", 3, "s1").train()
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # a cumulative average over one pass
            module.reset_running_stats()
    with torch.no_grad():
        backbone(eval_preprocess(torch.cat([labelled, unlabelled]), mean, std, 16))
    backbone.eval()
    with torch.no_grad():
        x = backbone(eval_preprocess(labelled, mean, std, 16)).numpy()
    m, s = x.mean(0), x.std(0) + 1e-6
    head = fit_logistic(torch.as_tensor((x - m) / s), torch.as_tensor(labels), 4, 1e-3)
    model = HeadedBackbone(backbone, nn.Linear(x.shape[1], 4))
    with torch.no_grad():
        w = head.weight / torch.as_tensor(s)
        model.head.weight.copy_(w)
        model.head.bias.copy_(head.bias - w @ torch.as_tensor(m))
    return model


def _accuracy(model, images, labels, mean, std):
    model.eval()
    with torch.no_grad():
        return float((model(eval_preprocess(images, mean, std, 16)).argmax(1).numpy() == labels).mean())


@pytest.fixture(scope="module")
def disc_data():
    images, labels = discs(480, seed=0)
    test_images, test_labels = discs(200, seed=1)
    mean, std = channel_stats(images)
    rng = np.random.default_rng(0)  # 4 labels per class
    rows = np.concatenate([rng.choice(np.flatnonzero(labels == c), 4, replace=False) for c in range(4)])
    rest = np.setdiff1d(np.arange(len(labels)), rows)
    return images[rows], labels[rows], images[rest], test_images, test_labels, mean, std


def test_consistency_training_improves_over_its_initial_head(disc_data):
    """Both the consistency training and the same training without the unlabelled cells'
    loss; only the first is asserted to improve by a margin. Which of the two ends higher on one
    draw of 16 labels is not a property of the code: on an AMD Zen 4 CPU FixMatch led (0.865 vs
    0.755), on an Intel Xeon the same seeds gave 0.84 vs 0.885 (float order moves the
    trajectory); the comparison across draws is experiments/semi_supervised.py's."""
    labelled, labels, unlabelled, test_images, test_labels, mean, std = disc_data
    accuracy = {}
    for name, weight in (("fixmatch", 1.0), ("labelled only", 0.0)):
        model = _start(labelled, labels, mean, std, unlabelled)
        accuracy["initial"] = _accuracy(model, test_images, test_labels, mean, std)
        cfg = ConsistencyConfig(steps=150, labelled_batch=8, unlabelled_ratio=4, lr=1e-3,
                                backbone_lr_ratio=1.0, threshold=0.9, ema_decay=0.9,
                                unlabelled_weight=weight, precision="fp32")
        ema, report = train_consistency(model, labelled, labels, unlabelled, mean, std, 16, cfg,
                                        torch.device("cpu"))
        accuracy[name] = _accuracy(ema, test_images, test_labels, mean, std)
        assert report["steps"] == 150
    # measured: 0.545 -> 0.865 (AMD) / 0.84 (Intel); other label draws: +0.2-0.36
    assert accuracy["fixmatch"] >= accuracy["initial"] + 0.15, accuracy
    assert accuracy["labelled only"] > accuracy["initial"], accuracy  # the labels alone help too


@pytest.mark.parametrize("extra", [{}, {"shift_augment": 0.5}, {"teacher": "ema", "align": True}])
def test_a_run_resumes_exactly(disc_data, tmp_path, monkeypatch, extra):
    """Interrupted after its step-4 state, a rerun continues from there and ends with the same
    weights as a run that never stopped (with shifted views too: their draws resume; and with
    the EMA teacher and distribution alignment: the running mean prediction resumes)."""
    import ssl_blood.classify.consistency as consistency

    labelled, labels, unlabelled, _, _, mean, std = disc_data
    cfg = ConsistencyConfig(steps=10, labelled_batch=8, unlabelled_ratio=2, save_every=4,
                            precision="fp32", **extra)
    straight, _ = train_consistency(_start(labelled, labels, mean, std, unlabelled), labelled, labels,
                                    unlabelled, mean, std, 16, cfg, torch.device("cpu"))
    real_step, calls = consistency._step, []

    def interrupted(state, *args):
        calls.append(state.step)
        if state.step == 6:
            raise KeyboardInterrupt
        return real_step(state, *args)

    monkeypatch.setattr(consistency, "_step", interrupted)
    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        train_consistency(_start(labelled, labels, mean, std, unlabelled), labelled, labels, unlabelled,
                          mean, std, 16, cfg, torch.device("cpu"), state_path=state)
    monkeypatch.setattr(consistency, "_step", real_step)
    resumed, report = train_consistency(_start(labelled, labels, mean, std, unlabelled), labelled, labels,
                                        unlabelled, mean, std, 16, cfg, torch.device("cpu"),
                                        state_path=state)
    assert report["resumed_at"] == 4 and report["steps"] == 10
    for name, tensor in straight.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name
    # a state of other settings is refused, not silently continued
    from ssl_blood.errors import UserError

    with pytest.raises(UserError, match="other settings"):
        train_consistency(_start(labelled, labels, mean, std, unlabelled), labelled, labels, unlabelled, mean,
                          std, 16, ConsistencyConfig(steps=10, threshold=0.8), torch.device("cpu"),
                          state_path=state)


def test_distribution_alignment_lifts_the_class_the_network_under_calls():
    """ReMixMatch's alignment: with labelled shares 50/50 and a network that has called class 1
    a tenth of the time, a cell at 0.6/0.4 becomes a class-1 call; the running mean moves
    toward the batch's mean prediction; a class without labels keeps a pseudo-count."""
    from ssl_blood.classify.consistency import _aligned, _State, class_shares

    shares = class_shares(np.array([0, 0, 1, 1]), 3)
    assert torch.allclose(shares, torch.tensor([3, 3, 1]) / 7.0)
    state = _State(0, 1, None, None, None, None, None, None, [],
                   target_shares=torch.tensor([0.5, 0.5]), mean_prediction=torch.tensor([0.9, 0.1]))
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    aligned = _aligned(state, probs)
    assert torch.allclose(aligned.sum(1), torch.ones(2))
    assert aligned[0].argmax() == 1 and aligned[1].argmax() == 0
    assert 0.1 < float(state.mean_prediction[1]) < 0.25 and float(state.mean_prediction[0]) < 0.9


def test_an_unknown_teacher_is_refused_by_name():
    from ssl_blood.errors import UserError

    with pytest.raises(UserError, match="`teacher` 'mean'"):
        ConsistencyConfig(teacher="mean").check()


def test_flexmatch_thresholds_scale_with_each_class_learning_effect():
    selected = torch.tensor([0] * 60 + [1] * 30 + [-1] * 10)
    t = class_thresholds(selected, 3, 0.95, adaptive=True)
    assert t[0] == pytest.approx(0.95) and t[1] == pytest.approx(0.95 * 0.5 / 1.5)
    assert t[2] == 0  # nothing predicted confidently as class 2 yet: every pseudo-label counts
    warm = class_thresholds(torch.tensor([0] * 10 + [-1] * 90), 2, 0.95, adaptive=True)
    assert warm[0] == pytest.approx(0.95 * (10 / 90) / (2 - 10 / 90))  # warm-up: over the unused
    floored = class_thresholds(selected, 3, 0.95, adaptive=True, floor=0.7)
    assert floored.tolist() == pytest.approx([0.95, 0.7, 0.7])
    assert class_thresholds(selected, 3, 0.95, adaptive=False).tolist() == pytest.approx([0.95] * 3)


def test_shifted_views_shift_the_share_asked_and_repeat_from_the_same_generator():
    from ssl_blood.classify.consistency import _shifted

    images = torch.randint(20, 200, (400, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert _shifted(images, 0.0, torch.Generator().manual_seed(1)) is images
    once = _shifted(images, 0.5, torch.Generator().manual_seed(1))
    moved = (once != images).flatten(1).any(1).float().mean().item()
    assert 0.4 < moved < 0.6, moved  # about half, each under one shift
    assert torch.equal(once, _shifted(images, 0.5, torch.Generator().manual_seed(1)))
    assert (_shifted(images, 1.0, torch.Generator().manual_seed(2)) != images).flatten(1).any(1).all()
    assert once.dtype == torch.uint8 and once.shape == images.shape


def test_cutout_blanks_one_square_per_image():
    x = torch.ones(64, 3, 16, 16)
    out = cutout(x, 0.5, torch.Generator().manual_seed(0))
    blank = (out == 0).all(1).flatten(1).sum(1)
    assert blank.min() >= 1 and blank.max() <= 64 and (out[out != 0] == 1).all()
    assert not torch.equal(blank, blank[:1].expand_as(blank))  # not the same box for all


@pytest.fixture
def pool(tiny_run, tmp_path):
    run, npz = tiny_run
    truth = npz_slide(npz, "train", tmp_path / "pool", tmp_path / "labels.csv", labelled=16)
    return run, tmp_path, truth


def _assert_altered_file_refused(capsys, classifier, name, folder, out):
    """A byte appended to the classifier's file `name`: predict refuses in one line, writes nothing."""
    with open(classifier / name, "ab") as f:
        f.write(b"\0")
    code, _, err = run_cli(capsys, "predict", "--classifier", classifier, *folder, "--out", out)
    assert_one_line_error(code, err, f"{name} is missing or was altered")
    assert not out.exists()


def test_train_classifier_fixmatch_keeps_its_own_backbone_and_moves(pool, capsys):
    run, tmp_path, truth = pool
    folder = ("--image-dir", tmp_path / "pool", "--size", "16", "--cache-dir", "none")
    code, out, err = run_cli(capsys, "train-classifier", "--checkpoint", run / "checkpoint.pt",
                             *folder, "--labels", tmp_path / "labels.csv", "--head", "fixmatch",
                             "--steps", "6", "--shift-augment", "0.5", "--out", tmp_path / "clf", "--json")
    assert code == 0, err
    card = json.loads(out)
    assert card["head"] == "fixmatch" and card["consistency"]["steps"] == 6
    assert card["consistency"]["config"]["shift_augment"] == 0.5
    assert card["consistency"]["pretrained"]["checkpoint"].endswith("checkpoint.pt")
    # the temperature matched to the trained model and its fold models on the folder's own cells
    calibration = card["calibration"]
    assert calibration["method"].startswith("matched to the average of the trained model and its")
    assert calibration["temperature"] > 0 and "held_out_temperature" in calibration
    assert f"the held-out cells alone gave {calibration['held_out_temperature']:.2f}" in \
        (tmp_path / "clf" / "card.md").read_text()
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == [
        "backbone.pt", "card.json", "card.md", "classifier.json", "head.pt"]  # no state left
    assert ("consistency-trained with the unlabelled cells (50% of their views under a random stain or "
            "scanner shift) for 6 steps") in (tmp_path / "clf" / "card.md").read_text()
    shutil.move(tmp_path / "clf", tmp_path / "moved")  # the folder runs wherever it is
    code, out, err = run_cli(capsys, "predict", "--classifier", tmp_path / "moved", *folder,
                             "--out", tmp_path / "p.csv", "--json")
    assert code == 0, err and json.loads(out)["cells"] == len(truth)
    _assert_altered_file_refused(capsys, tmp_path / "moved", "backbone.pt", folder, tmp_path / "q.csv")


def test_self_contained_classifier_runs_without_the_pretraining_run(pool, capsys):
    run, tmp_path, truth = pool
    shutil.copy(run / "checkpoint.pt", tmp_path / "ckpt.pt")
    folder = ("--image-dir", tmp_path / "pool", "--size", "16", "--cache-dir", "none")
    code, _, err = run_cli(capsys, "train-classifier", "--checkpoint", tmp_path / "ckpt.pt", *folder,
                           "--labels", tmp_path / "labels.csv", "--self-contained", "--out", tmp_path / "clf")
    assert code == 0, err
    (tmp_path / "ckpt.pt").unlink()
    code, out, err = run_cli(capsys, "predict", "--classifier", tmp_path / "clf", *folder,
                             "--out", tmp_path / "p.csv", "--json")
    assert code == 0, err
    assert json.loads(out)["cells"] == len(truth)
    # and it keeps it when labels are added to it
    code, _, err = run_cli(capsys, "train-classifier", "--from", tmp_path / "clf", *folder,
                           "--labels", tmp_path / "labels.csv", "--out", tmp_path / "clf2")
    assert code == 0, err
    assert (tmp_path / "clf2" / "backbone.pt").read_bytes() == (tmp_path / "clf" / "backbone.pt").read_bytes()


@pytest.mark.parametrize("extra, pattern", [
    (("--minutes", "5"), "--minutes, --steps and --stain set the training of heads fixmatch and fine-tune"),
    (("--head", "fixmatch", "--steps", "0"), "--steps 0 must be a positive number"),
    (("--head", "fixmatch", "--minutes", "-1"), "--minutes -1.0 must be a positive number"),
    (("--stain", "0.2"), "--minutes, --steps and --stain set the training of heads fixmatch"),
    (("--head", "fine-tune", "--stain", "1.5"), r"--stain 1.5 must be in \[0, 1\)"),
    (("--head", "fine-tune", "--calibration-folds", "-1"), "--calibration-folds -1 must be 0 or more"),
    (("--head", "fine-tune", "--shift-augment", "0.5"), "--shift-augment shifts the unlabelled cells' training "
                                                       "views, which only head fixmatch learns from"),
    (("--head", "fixmatch", "--shift-augment", "1.5"), r"--shift-augment 1.5 must be in \[0, 1\]"),
    (("--ensemble",), "--ensemble keeps the models a trained head's calibration reruns make: give "
                      "--head fine-tune or fixmatch with --calibration-folds >= 2 .head logistic"),
    (("--head", "fine-tune", "--ensemble", "--calibration-folds", "0"), "--calibration-folds >= 2 .head fine-tune, 0"),
])
def test_fixmatch_bad_input_is_one_line_and_writes_nothing(pool, capsys, extra, pattern):
    run, tmp_path, _ = pool
    before = tree(tmp_path)
    code, _, err = run_cli(capsys, "train-classifier", "--checkpoint", run / "checkpoint.pt",
                           "--image-dir", tmp_path / "pool", "--size", "16", "--cache-dir", "none",
                           "--labels", tmp_path / "labels.csv", *extra, "--out", tmp_path / "clf")
    assert_one_line_error(code, err, pattern)
    assert tree(tmp_path) == before


def test_fixmatch_needs_unlabelled_cells(tiny_run, tmp_path, capsys):
    run, npz = tiny_run
    npz_slide(npz, "test", tmp_path / "pool", tmp_path / "labels.csv", labelled=40)  # every cell
    code, _, err = run_cli(capsys, "train-classifier", "--checkpoint", run / "checkpoint.pt",
                           "--image-dir", tmp_path / "pool", "--size", "16", "--cache-dir", "none",
                           "--labels", tmp_path / "labels.csv", "--head", "fixmatch",
                           "--out", tmp_path / "clf")
    assert_one_line_error(code, err, "head 'fixmatch' learns from unlabelled cells too")
    assert not (tmp_path / "clf").exists()


def test_fine_tune_head_needs_no_unlabelled_cells(tiny_run, tmp_path, capsys):
    """The same training without the unlabelled loss: a folder whose every cell is labelled."""
    run, npz = tiny_run
    npz_slide(npz, "test", tmp_path / "pool", tmp_path / "labels.csv", labelled=40)
    code, out, err = run_cli(capsys, "train-classifier", "--checkpoint", run / "checkpoint.pt",
                             "--image-dir", tmp_path / "pool", "--size", "16", "--cache-dir", "none",
                             "--labels", tmp_path / "labels.csv", "--head", "fine-tune", "--steps", "5",
                             "--out", tmp_path / "clf", "--json")
    assert code == 0, err
    card = json.loads(out)
    assert card["head"] == "fine-tune" and card["consistency"]["config"]["unlabelled_weight"] == 0
    assert card["consistency"]["pseudo_label_rate"] == 0 and (tmp_path / "clf" / "backbone.pt").is_file()
    card_md = (tmp_path / "clf" / "card.md").read_text()
    assert "trained on the labelled cells for 5 steps" in card_md
    # calibrated by the training rerun on folds (cross-fitted), whose states are gone once written
    cv = card["cross_validation"]
    assert cv["cross_fitted"] and card["calibration"]["cross_fitted"] and 2 <= cv["folds"] <= 3
    assert "cross-fitted" in card_md and not list((tmp_path / "clf").glob("consistency-state*"))


def test_an_ensemble_keeps_its_fold_models_and_predicts_with_their_average(pool, capsys):
    """--ensemble: the folder holds the fold models' backbones, predict's probabilities are the
    average of the trained model's and theirs (each at temperature 1), the ONNX graph gives the
    same, an altered member is refused, and labels added give a single model (said)."""
    import onnxruntime

    from ssl_blood.classify import Classifier
    from ssl_blood.classify.calibration import softmax
    from ssl_blood.cli import main
    from ssl_blood.data import load_split, resolve_source

    run, tmp_path, truth = pool
    folder = ("--image-dir", tmp_path / "pool", "--size", "16", "--cache-dir", "none")
    code, out, err = run_cli(capsys, "train-classifier", "--checkpoint", run / "checkpoint.pt", *folder,
                             "--labels", tmp_path / "labels.csv", "--head", "fine-tune", "--steps", "4",
                             "--calibration-folds", "2", "--ensemble", "--out", tmp_path / "clf", "--json")
    assert code == 0, err
    card = json.loads(out)
    assert card["ensemble"]["models"] == 3 and "calibration-fold models" in card["ensemble"]["note"]
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == [
        "backbone.pt", "card.json", "card.md", "classifier.json", "head.pt", "member0.pt", "member1.pt"]
    assert "Ensemble of 3 models (review below " in (tmp_path / "clf" / "card.md").read_text()
    model = Classifier.load(tmp_path / "clf", "cpu")
    cells = load_split(resolve_source(image_dir=str(tmp_path / "pool"), size=16), "train")
    prediction = model.predict(cells, min_probability=0)
    logits = [model.head.logits(model.features(cells.images))]
    logits += [m.head.logits(m.embedder(cells.images, views=model.views)) for m in model.members]
    assert np.abs(prediction.probabilities - np.mean([softmax(z) for z in logits], 0)).max() < 1e-5
    assert not np.allclose(logits[0], logits[1], atol=1e-2)  # the members are other models
    assert prediction.thresholds["min_probability"] == 0
    assert model.predict(cells).thresholds["min_probability"] == model.ensemble["thresholds"]["min_probability"]
    assert main(["export", "--classifier", str(tmp_path / "clf"), "--out", str(tmp_path / "clf.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "clf.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": cells.images.numpy()})[0]
    assert np.abs(got - prediction.probabilities).max() < 1e-4
    code, _, err = run_cli(capsys, "train-classifier", "--from", tmp_path / "clf", *folder,
                           "--labels", tmp_path / "labels.csv", "--out", tmp_path / "clf2")
    assert code == 0 and "labels added to an ensemble give a single model" in err and "--ensemble" in err
    assert not list((tmp_path / "clf2").glob("member*"))
    code, _, err = run_cli(capsys, "train-classifier", "--from", tmp_path / "clf", *folder, "--labels",
                           tmp_path / "labels.csv", "--head", "fine-tune", "--out", tmp_path / "clf3")
    assert_one_line_error(code, err, "labels are added to a classifier with its own head")  # no note first
    code, out, err = run_cli(capsys, "predict", "--classifier", tmp_path / "clf", *folder,
                             "--out", tmp_path / "p.csv", "--json")
    assert code == 0 and json.loads(out)["models"] == 3, err
    for written in ("p.csv", "p.counts.json"):
        (tmp_path / written).unlink()
    _assert_altered_file_refused(capsys, tmp_path / "clf", "member1.pt", folder, tmp_path / "p.csv")


def test_cross_fitting_judges_each_fold_by_a_model_that_never_saw_its_labels(monkeypatch):
    """`_cross_fitted_logits` trains once per fold with that fold's labels hidden (its cells
    unlabelled) and scores exactly that fold's cells with the fold's model."""
    from ssl_blood.classify import classifier as module
    from ssl_blood.data.cells import CellData

    labels = np.repeat(np.arange(3), 6)
    images = torch.as_tensor(np.repeat(labels * 80, 3 * 4 * 4).reshape(-1, 3, 4, 4).astype(np.uint8))
    cells = CellData(torch.cat([images, images[:2]]), torch.as_tensor(np.concatenate([labels, [-1, -1]])),
                     torch.arange(20), "train", ("a", "b", "c"), None)  # 2 unlabelled cells
    seen = []

    def fake_training(head, embedder, fold_cells, seed, cfg, state_path, progress):
        hidden = fold_cells.labels.numpy()
        seen.append(hidden.copy())
        fold = len(seen) - 1

        def features(images, progress=False, views=1):  # the class as a feature, plus the fold
            x = images.float().mean((1, 2, 3)).numpy()[:, None] / 80
            return np.concatenate([x, np.full_like(x, fold)], 1)
        return b"", features, {"steps": 3}, 0.5

    monkeypatch.setattr(module, "_trained_backbone", fake_training)
    folds = module._calibration_folds(labels, 3, seed=0)
    assert sorted(np.bincount(folds)) == [6, 6, 6] and all(np.bincount(labels[folds == f]).tolist() == [2, 2, 2]
                                                           for f in range(3))
    oof, pooled, models = module._cross_fitted_logits("fine-tune", None, cells, folds, 0,
                                                      ConsistencyConfig(steps=3), None, False, 1, pool=images[:2])
    assert len(seen) == 3
    for f, hidden in enumerate(seen):
        assert (hidden[:18][folds == f] == -1).all() and (hidden[:18][folds != f] == labels[folds != f]).all()
        assert (hidden[18:] == -1).all()  # the unlabelled cells stay unlabelled
    assert oof.shape == (18, 3) and (oof.argmax(1) == labels).all()  # each fold scored, by its own model
    assert pooled.shape == (3, 2, 3)  # and each fold model scored the unlabelled cells
    assert len(models) == 3 and all(fit["head"].out_features == 3 for _, _, fit in models)  # kept for an ensemble
    assert module._calibration_folds(np.array([0, 0, 1]), 3, seed=0) is None  # a class of one cell


def test_recalibration_from_held_out_logits_tempers_an_over_confident_head():
    """Held-out logits three times too sharp: the temperature is kept (about 3), the review
    threshold sends the asked share of the labelled cells to review, and the card says so."""
    from ssl_blood.classify.calibration import softmax
    from ssl_blood.classify.classifier import Classifier

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 400)
    logits = rng.normal(0, 1, (400, 4))
    logits[np.arange(400), labels] += 1.5
    sharp = 3 * logits
    folds = np.arange(400) % 4
    model = Classifier.__new__(Classifier)
    model.class_names, model.temperature = ("a", "b", "c", "d"), 1.0
    model.thresholds = {"min_probability": 0.99, "max_ood": 2.0}
    model.tensors, model.review_score = {}, "top"
    model.card = {"cross_validation": {"folds": 5, "accuracy": 1.0}}
    model.recalibrate(sharp, labels, folds, review_rate=0.2)
    assert model.card["calibration"]["kept"] and model.temperature == pytest.approx(3, rel=0.3)
    calibrated = softmax(sharp, model.temperature).max(1)
    assert (calibrated < model.thresholds["min_probability"]).mean() == pytest.approx(0.2, abs=0.01)
    assert model.card["cross_validation"]["folds"] == 4 and model.card["cross_validation"]["cross_fitted"]
    assert model.card["cross_validation"]["accuracy"] == pytest.approx((sharp.argmax(1) == labels).mean())
    assert model.card["calibration"]["ece_after"] < model.card["calibration"]["ece_before"]


def test_an_ensemble_of_the_fold_models_sets_the_temperature_and_the_review_share():
    """Given the fold models' view of unlabelled cells, the temperature brings the trained
    model to their average there, cooling or sharpening it, whatever the held-out logits say;
    the review threshold sends the asked share of those cells to review."""
    from ssl_blood.classify.calibration import matching_temperature, softmax
    from ssl_blood.classify.classifier import Classifier

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 120)
    held_out = rng.normal(0, 1, (120, 4))
    held_out[np.arange(120), labels] += 1.5
    held_out *= 3  # the held-out logits alone ask for a temperature near 3
    pool = rng.normal(0, 1, (1000, 4)) * 2

    def model():
        m = Classifier.__new__(Classifier)
        m.class_names, m.temperature = ("a", "b", "c", "d"), 1.0
        m.thresholds, m.card = {"min_probability": 0.99, "max_ood": 2.0}, {"cross_validation": {}}
        m.tensors, m.review_score = {}, "top"
        return m

    agreeing = model()  # fold models as sure as the trained one: nothing to cool
    agreeing.recalibrate(held_out, labels, np.arange(120) % 3, 0.15, (pool, np.stack([pool] * 3)))
    assert agreeing.temperature == pytest.approx(1.0, abs=1e-3)
    assert agreeing.card["calibration"]["held_out_temperature"] > 2
    hot = model()  # the trained model twice as sharp as three fold models
    hot.recalibrate(held_out, labels, np.arange(120) % 3, 0.15, (2 * pool, np.stack([pool] * 3)))
    average = (softmax(2 * pool) + 3 * softmax(pool)) / 4
    assert hot.temperature == pytest.approx(matching_temperature(2 * pool, average)) and 1.2 < hot.temperature < 2
    share = (softmax(2 * pool, hot.temperature).max(1) < hot.thresholds["min_probability"]).mean()
    assert share == pytest.approx(0.15, abs=0.005) and hot.card["thresholds"] == hot.thresholds
    shy = model()  # a trained model less sure than its fold models is sharpened towards them
    shy.recalibrate(held_out, labels, np.arange(120) % 3, 0.15, (0.5 * pool, np.stack([pool] * 3)))
    assert 0.5 < shy.temperature < 0.9 and shy.card["calibration"]["held_out_temperature"] > 2


def test_a_trained_heads_review_score_is_chosen_again_on_its_cross_fitted_calls():
    """auto: the choice the trained backbone's own (optimistic) cross-validation made is made
    again on the held-out calls; the threshold then sends the asked share of the pool to review."""
    import torch

    from ssl_blood.classify.calibration import softmax
    from ssl_blood.classify.classifier import POOL_LOGITS, Classifier, smoothed_scores

    pool, pool_labels, features, labels = two_clusters(30)
    wrong = np.arange(60) % 5 == 0  # held-out calls: a fifth wrong and sure, the neighbours right
    held_out = 2.0 * np.eye(2)[np.where(wrong, 1 - labels, labels)] * np.where(wrong, 1.5, 0.5)[:, None]
    pool_logits = 3.0 * np.eye(2)[pool_labels]
    model = Classifier.__new__(Classifier)
    model.class_names, model.temperature, model.review_score = ("a", "b"), 1.0, "top"
    model.thresholds = {"min_probability": 0.99, "max_ood": 2.0}
    model.tensors = {"features": torch.as_tensor(features), "shift_pool_features": torch.as_tensor(pool),
                     POOL_LOGITS: torch.as_tensor(pool_logits, dtype=torch.float32)}
    model.card = {"cross_validation": {}, "review_score": {"asked": "auto", "score": "top"}}
    model.recalibrate(held_out, labels, np.arange(60) % 3, 0.2,
                      (pool_logits, np.stack([pool_logits] * 3)))
    assert model.review_score == "smoothed" == model.card["review_score"]["score"]
    p = softmax(pool_logits, model.temperature)
    own = smoothed_scores(p, pool, pool, p, pool_queries=True)
    assert model.thresholds["min_probability"] == pytest.approx(np.quantile(own, 0.2))
