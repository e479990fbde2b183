"""Label spreading on the kNN graph: two moons with 2 labels per class are learned almost
perfectly where a linear head on the 4 labelled points is not; the propagate head of
train-classifier chooses its settings by cross-validation and can fall back to none."""

import json

import numpy as np
import torch

from ssl_blood.classify.propagation import affinity, neighbour_table, pseudo_labels, spread
from ssl_blood.evaluation.frozen import fit_logistic


def moons(n=600, seed=0):
    """Two interleaved half circles, lifted into 16-D (away from the origin, so cosine
    neighbourhoods are the moons' own)."""
    from sklearn.datasets import make_moons

    x, y = make_moons(n, noise=0.06, random_state=seed)
    rotation = np.linalg.qr(np.random.default_rng(seed).normal(size=(16, 16)))[0]
    lifted = np.concatenate([x, np.zeros((n, 13)), np.full((n, 1), 6.0)], 1) @ rotation
    return lifted.astype(np.float32), y


def two_per_class(y, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.choice(np.flatnonzero(y == c), 2, replace=False) for c in (0, 1)])


def test_spreading_learns_two_moons_from_two_labels_per_class_a_linear_head_does_not():
    x, y = moons()
    wins = []
    for seed in range(3):
        seeds = two_per_class(y, seed)
        sims, pos = neighbour_table(x, 10)
        scores = spread(affinity(sims, pos, 10), seeds, y[seeds], 2, alpha=0.99, iterations=200)
        spread_acc = (scores.argmax(1) == y).mean()
        mean, std = x[seeds].mean(0), x[seeds].std(0) + 1e-6
        head = fit_logistic(torch.as_tensor((x[seeds] - mean) / std), torch.as_tensor(y[seeds]), 2, 1e-3)
        with torch.no_grad():
            linear_acc = (head(torch.as_tensor((x - mean) / std)).argmax(1).numpy() == y).mean()
        assert spread_acc >= 0.97, spread_acc
        wins.append(spread_acc - linear_acc)
    assert min(wins) > 0.05, wins  # the linear head on 4 points misses the moons' curl


def test_pseudo_labels_are_the_most_confident_per_class_and_never_labelled_cells():
    scores = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.99, 0.01]])
    rows, labels = pseudo_labels(scores, candidates=np.array([0, 1, 2, 3]), per_class=np.array([1, 2]))
    assert rows.tolist() == [0, 2, 3] and labels.tolist() == [0, 1, 1]  # row 4 is not a candidate


def test_train_classifier_propagate_head_on_a_folder(tiny_run, tmp_path, capsys):
    """The whole flat folder is the unlabelled pool; 8 labelled cells; the card says what CV
    chose, including whether pseudo-labels helped at all."""
    from tests.helpers import npz_slide, run_cli

    run, npz = tiny_run
    npz_slide(npz, "train", tmp_path / "pool", tmp_path / "labels.csv", labelled=8)
    code, out, err = run_cli(capsys, "train-classifier", "--checkpoint", run / "checkpoint.pt", "--image-dir",
                             tmp_path / "pool", "--size", "16", "--cache-dir", "none", "--labels",
                             tmp_path / "labels.csv", "--head", "propagate", "--out", tmp_path / "clf", "--json")
    assert code == 0, err
    card = json.loads(out)
    prop = card["propagation"]
    assert card["head"] == "propagate" and prop["unlabelled_cells"] == 88
    ratio = prop["pseudo_per_label"]
    assert ratio in (0, 5, 20) and prop["pseudo_labels"] <= min(ratio * 8, 88)  # the pool holds 88
    assert (prop["pseudo_labels"] > 0) is (ratio > 0)
    # chosen by the cross-validated log loss; the card's accuracy is that setting's
    losses = prop["head_cv_log_loss_by_pseudo_per_label"]
    assert losses[str(ratio)] == min(losses.values())
    chosen = prop["head_cv_accuracy_by_pseudo_per_label"][str(ratio)]
    assert card["cross_validation"]["accuracy"] <= chosen + 1e-9
