"""Training with labels: the supervised reference and fine-tuning a pretrained checkpoint on the
same class-balanced subsets."""

import json

import numpy as np
import pytest

from ssl_blood.model.augment import AugmentConfig
from ssl_blood.cli import main
from ssl_blood.data import resolve_source
from ssl_blood.errors import UserError
from ssl_blood.evaluation.supervised import (FineTuneConfig, SupervisedConfig, fine_tune, labelled_subset,
                                  train_supervised)
from tests.helpers import make_npz

# Orientation matters in this task, so the augmentation keeps it (no flips or rotations).
UPRIGHT = AugmentConfig(crop_scale=(0.8, 1.0), hflip=0, vflip=0, rot90=False)


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """16-px images whose class is which half (left/right/top/bottom) is brighter: the tiny
    pretrained model's pooled features only partly see it; training end to end does."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("halves")
    arrays = {}
    for split, n in (("train", 200), ("val", 80), ("test", 80)):
        labels = np.arange(n) % 4
        images = rng.normal(110, 25, size=(n, 16, 16, 3))
        for i, label in enumerate(labels):
            part = [np.s_[:, :8], np.s_[:, 8:], np.s_[:8], np.s_[8:]][label]
            images[i][part] += 50
        arrays[f"{split}_images"] = np.clip(images, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez(root / "halves.npz", **arrays, class_names=np.array(["left", "right", "top", "bottom"]))
    return resolve_source(npz=str(root / "halves.npz")).to_dict()


def test_subsets_are_class_balanced_seeded_and_shared_with_few_shot():
    labels = np.repeat(np.arange(4), [50, 30, 40, 80])
    a = labelled_subset(labels, 4, seed=3, shots=5)
    assert np.array_equal(np.bincount(labels[a]), [5] * 4)
    assert np.array_equal(a, labelled_subset(labels, 4, seed=3, shots=5))
    assert not np.array_equal(a, labelled_subset(labels, 4, seed=4, shots=5))
    assert len(labelled_subset(labels, 4, seed=0, fraction=0.1)) == 20
    assert len(labelled_subset(labels, 4, seed=0)) == 200  # neither: every labelled cell
    with pytest.raises(UserError, match="fraction or shots, not both"):
        labelled_subset(labels, 4, 0, fraction=0.1, shots=2)


def test_fine_tune_improves_over_its_initial_probe(tiny_run, halves, tmp_path):
    run, _ = tiny_run
    cfg = FineTuneConfig(epochs=8, lrs=(1e-3,), backbone_lr_ratios=(1.0,), data=halves, shots=10,
                         augment_config=UPRIGHT)
    result = fine_tune(run / "checkpoint.pt", cfg, tmp_path / "ft", progress=False)
    assert result["labels"] == 40 and result["initial_probe_val_acc"] < 1.0
    assert result["val_acc"] > result["initial_probe_val_acc"]
    assert result["test_acc"] >= result["initial_probe_test_acc"]
    assert result["chosen"] == {"lr": 1e-3, "backbone_lr_ratio": 1.0, "best_epoch": result["best_epoch"],
                                "val_acc": result["val_acc"]}
    written = json.loads((tmp_path / "ft" / "fine_tune.json").read_text())
    assert written["test_acc"] == result["test_acc"]
    from ssl_blood.model.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "ft" / "checkpoint.pt")["kind"] == "fine-tune"


def test_supervised_fraction_uses_the_same_cells_as_fine_tune(tiny_run, halves):
    run, _ = tiny_run
    ft = fine_tune(run / "checkpoint.pt", FineTuneConfig(epochs=1, lrs=(1e-3,), backbone_lr_ratios=(1.0,),
                                                         data=halves, fraction=0.2, seed=5), progress=False)
    sup = train_supervised(SupervisedConfig(backbone="cnn6", epochs=1, data=halves, fraction=0.2, seed=5),
                           progress=False)
    assert ft["labelled_ids"] == sup["labelled_ids"] and len(sup["labelled_ids"]) == 40
    other = train_supervised(SupervisedConfig(backbone="cnn6", epochs=1, data=halves, fraction=0.2, seed=6),
                             progress=False)
    assert other["labelled_ids"] != sup["labelled_ids"]


def test_few_shot_episode_draws_the_same_cells_as_fine_tune_with_that_seed():
    from ssl_blood.evaluation.frozen import support_indices

    labels = np.repeat(np.arange(4), 30)
    ids = labelled_subset(labels, 4, seed=7, shots=3)
    rng = np.random.default_rng([7, 1, 3])
    assert np.array_equal(ids, support_indices(labels, 4, rng, shots=3))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"fraction": 1.5}, r"`fraction` 1.5 must be in \(0, 1\]"),
    ({"fraction": 0.0}, r"`fraction` 0.0 must be in \(0, 1\]"),
    ({"fraction": float("nan")}, r"`fraction` nan must be in \(0, 1\]"),
    ({"shots": 51}, r"asked for 51 labelled images of class 0 but the train split has 50"),
])
def test_bad_label_budgets(halves, kwargs, pattern):
    with pytest.raises(UserError, match=pattern):
        train_supervised(SupervisedConfig(backbone="cnn6", epochs=1, data=halves, **kwargs), progress=False)


def test_fine_tune_refuses_data_of_another_shape(tiny_run, tmp_path):
    run, _ = tiny_run
    gray = make_npz(tmp_path / "gray.npz", channels=1)
    with pytest.raises(UserError, match="3-channel 16-px images but this data has 1-channel"):
        fine_tune(run / "checkpoint.pt", FineTuneConfig(epochs=1, data=resolve_source(npz=str(gray)).to_dict()),
                  progress=False)


def test_cli(tiny_run, halves, tmp_path, capsys):
    run, _ = tiny_run
    capsys.readouterr()
    assert main(["fine-tune", "--checkpoint", str(run / "checkpoint.pt"), "--npz", halves["path"],
                 "--shots", "5", "--epochs", "2", "--lrs", "1e-3", "--backbone-lr-ratios", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["labels"] == 20 and "history" not in result
    assert main(["supervised", "--npz", halves["path"], "--backbone", "cnn6", "--shots", "5",
                 "--epochs", "1", "--out", str(tmp_path / "sup")]) == 0
    assert (tmp_path / "sup" / "supervised.json").exists()
    assert main(["supervised", "--npz", halves["path"], "--backbone", "cnn6", "--shots", "5",
                 "--epochs", "1", "--out", str(tmp_path / "sup")]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["fine-tune", "--checkpoint", str(run / "checkpoint.pt"), "--fraction", "2"]) == 2
    assert "--fraction 2.0 must be in (0, 1]" in capsys.readouterr().err
    for command in (["fine-tune", "--checkpoint", str(run / "checkpoint.pt")],
                    ["supervised", "--npz", halves["path"], "--backbone", "cnn6"]):
        assert main(command + ["--fraction", "nan", "--epochs", "1", "--out", str(tmp_path / "nan")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "--fraction nan must be in (0, 1]" in err
        assert not (tmp_path / "nan").exists()


def test_fine_tune_on_your_own_labels_keeps_a_classifier(tiny_run, tmp_path, capsys):
    """--labels: no val split is cut from a person's labels; the classifier's fine-tune head
    is trained and kept, and it classifies new cells."""
    import json

    from tests.helpers import assert_one_line_error, npz_slide, run_cli

    run, npz = tiny_run
    npz_slide(npz, "train", tmp_path / "cells", tmp_path / "labels.csv", labelled=24)
    folder = ("--image-dir", tmp_path / "cells", "--size", "16", "--cache-dir", "none")
    code, _, err = run_cli(capsys, "fine-tune", "--checkpoint", run / "checkpoint.pt", *folder,
                           "--labels", tmp_path / "labels.csv")
    assert_one_line_error(code, err, r"with --labels the fine-tuned classifier is kept: give --out")
    code, out, err = run_cli(capsys, "fine-tune", "--checkpoint", run / "checkpoint.pt", *folder,
                             "--labels", tmp_path / "labels.csv", "--stain", "0.1", "--steps", "8",
                             "--out", tmp_path / "clf", "--json")
    assert code == 0, err
    card = json.loads(out)
    assert card["head"] == "fine-tune" and sum(card["labels_per_class"].values()) == 24
    assert card["consistency"]["config"]["stain"] == 0.1
    code, _, err = run_cli(capsys, "predict", "--classifier", tmp_path / "clf", *folder,
                           "--out", tmp_path / "p.csv")
    assert code == 0, err
