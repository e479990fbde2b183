import json

import numpy as np
import pytest

from ssl_blood.cli import main
from ssl_blood.features.embeddings import Embeddings, EmbedderSpec
from ssl_blood.errors import UserError
from ssl_blood.evaluation.frozen import (PROBE_WEIGHT_DECAYS, classification_metrics, cluster_metrics,
                                few_shot, knn_embeddings, knn_scores, linear_probe, mean_ci95,
                                probe_embeddings, support_indices)

NAMES = ["a", "b", "c", "d"]


def blobs(n, classes=4, dim=16, spread=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(classes, dim)) * 3
    labels = np.arange(n) % classes
    return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32), labels


def test_linear_probe_separable_reaches_100():
    (tx, ty), (vx, vy), (sx, sy) = blobs(400), blobs(100, seed=1), blobs(200, seed=2)
    result = linear_probe(tx, ty, vx, vy, sx, sy, NAMES, device="cpu")
    assert result["test_acc"] == 1.0 and result["val_acc"] == 1.0 and result["test_auc"] == 1.0
    assert result["val_acc_by_weight_decay"]["1e-05"] == 1.0
    best = max(float(k) for k, v in result["val_acc_by_weight_decay"].items() if v == 1.0)
    assert result["weight_decay"] == best  # ties on val: the strongest penalty wins
    assert result["weight_decay_grid"] == sorted(PROBE_WEIGHT_DECAYS)
    assert set(result["per_class"]) == set(NAMES) and result["macro_f1"] == 1.0


def test_linear_probe_shuffled_labels_near_chance():
    rng = np.random.default_rng(0)
    (tx, ty), (vx, vy), (sx, sy) = blobs(800), blobs(200, seed=1), blobs(800, seed=2)
    result = linear_probe(tx, rng.permutation(ty), vx, rng.permutation(vy), sx, rng.permutation(sy),
                          NAMES, device="cpu")
    assert abs(result["test_acc"] - 0.25) < 0.06 and abs(result["test_auc"] - 0.5) < 0.06


def test_acc_and_auc_match_medmnist_evaluator(data_root):
    from medmnist import Evaluator

    evaluator = Evaluator("bloodmnist", "test", root=str(data_root))
    y_true = evaluator.labels.squeeze()
    rng = np.random.default_rng(0)
    scores = rng.random((len(y_true), 8))
    scores[np.arange(len(y_true)), y_true] += rng.random(len(y_true))  # better than chance
    scores /= scores.sum(1, keepdims=True)
    auc, acc = evaluator.evaluate(scores)
    ours = classification_metrics(y_true, scores, [str(i) for i in range(8)])
    assert ours["acc"] == pytest.approx(acc) and ours["auc"] == pytest.approx(auc)
    assert 0.4 < acc < 0.9


def test_auc_undefined_on_tiny_subsets_is_none():
    result = classification_metrics(np.array([0, 0]), np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"])
    assert result["auc"] is None and result["acc"] == 0.5
    json.dumps(result)  # valid JSON (no NaN)


def test_knn_equals_numpy_reference():
    gx, gy = blobs(300, spread=2.0)
    qx, _ = blobs(50, spread=2.0, seed=5)
    k, t = 7, 0.07
    g = gx / np.linalg.norm(gx, axis=1, keepdims=True)
    q = qx / np.linalg.norm(qx, axis=1, keepdims=True)
    sims = q @ g.T
    expected = np.zeros((50, 4))
    for i in range(50):
        top = np.argsort(-sims[i])[:k]
        for j in top:
            expected[i, gy[j]] += np.exp(sims[i, j] / t)
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(knn_scores(gx, gy, qx, 4, k, t), expected, rtol=1e-4, atol=1e-6)


def test_knn_on_the_gallery_split_never_votes_for_itself():
    gx, gy = blobs(200, spread=2.5)
    wrong = gy.copy()
    wrong[:20] = (gy[:20] + 1) % 4  # mislabelled cells: their own vote would say "wrong label"
    ids = np.arange(200)
    scores = knn_scores(gx, wrong, gx[:20], 4, k=5, exclude_ids=ids[:20], gallery_ids=ids)
    assert (scores.argmax(1) == gy[:20]).mean() > 0.8  # neighbours, not themselves, decide
    self_included = knn_scores(gx, wrong, gx[:20], 4, k=5)
    assert (self_included.argmax(1) == wrong[:20]).mean() > (scores.argmax(1) == wrong[:20]).mean()


def test_knn_masks_unfilled_neighbours():
    from ssl_blood.features.index import CellIndex

    gx, gy = blobs(400, spread=0.2)
    index = CellIndex.build(gx, labels=gy, kind="ivf", nlist=40, nprobe=1, use_gpu=False)
    scores = knn_scores(gx, gy, gx[:30], 4, k=200, index=index)
    assert np.isfinite(scores).all() and np.allclose(scores.sum(1), 1)
    assert (scores.argmax(1) == gy[:30]).all()


def test_cluster_metrics():
    x, y = blobs(400, spread=0.2)
    good = cluster_metrics(x, y, 4)
    assert good["nmi"] > 0.99 and good["ari"] > 0.99 and good["purity"] == 1.0
    noise = cluster_metrics(np.random.default_rng(0).normal(size=(400, 16)), y, 4)
    assert noise["nmi"] < 0.1 and abs(noise["ari"]) < 0.05 and noise["purity"] < 0.4


def test_support_sets_are_class_balanced_and_seeded():
    labels = np.repeat(np.arange(8), [852, 2181, 1085, 2026, 849, 993, 2330, 1643])
    shots = support_indices(labels, 8, np.random.default_rng(0), shots=10)
    assert np.array_equal(np.bincount(labels[shots]), [10] * 8) and len(set(shots)) == 80
    one_percent = support_indices(labels, 8, np.random.default_rng(0), fraction=0.01)
    counts = np.bincount(labels[one_percent], minlength=8)
    assert counts.sum() == round(0.01 * len(labels)) == 120 and counts.max() - counts.min() <= 1
    again = support_indices(labels, 8, np.random.default_rng(0), fraction=0.01)
    other = support_indices(labels, 8, np.random.default_rng(1), fraction=0.01)
    assert np.array_equal(one_percent, again) and not np.array_equal(one_percent, other)


def test_few_shot_head_is_chosen_on_val():
    (tx, ty), (vx, vy), (sx, sy) = blobs(200), blobs(80, seed=1), blobs(100, seed=2)
    results = few_shot(tx, ty, vx, vy, sx, sy, 4, shots=(1, 5), fractions=(0.1,), episodes=5, seed=0)
    assert [r["setting"] for r in results] == ["1-shot", "5-shot", "0.1 of train"]
    for r in results:
        assert set(r["heads"]) == {"prototype", "knn", "logreg"} and r["chosen_on"] == "val"
        assert r["head"] == max(r["heads"], key=lambda h: r["heads"][h]["val_acc"])
        assert r["mean_acc"] == r["heads"][r["head"]]["test_acc"] and r["episodes"] == 5
    assert results[-1]["labels"] == 20 and results[0]["labels"] == 4
    again = few_shot(tx, ty, vx, vy, sx, sy, 4, shots=(1,), fractions=(), episodes=5, seed=0)
    assert again == results[:1]


def test_test_labels_never_choose_the_head():
    (tx, ty), (vx, vy), (sx, sy) = blobs(200), blobs(80, seed=1), blobs(100, seed=2)
    a = few_shot(tx, ty, vx, vy, sx, sy, 4, shots=(5,), fractions=(), episodes=3)
    b = few_shot(tx, ty, vx, vy, sx, (sy + 1) % 4, 4, shots=(5,), fractions=(), episodes=3)
    assert a[0]["head"] == b[0]["head"]  # other test labels, same choice


def test_mean_ci95_is_the_t_interval():
    mean, half = mean_ci95([1, 2, 3, 4, 5])
    assert mean == 3 and half == pytest.approx(2.7764451 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5))
    assert mean_ci95([0.5]) == (0.5, None)


def test_few_shot_bad_input():
    (tx, ty), (sx, sy) = blobs(40), blobs(20, seed=1)
    with pytest.raises(UserError, match="asked for 11 labelled images of class 0 but the train split has 10"):
        few_shot(tx, ty, sx, sy, sx, sy, 4, shots=(11,), fractions=(), episodes=1)
    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match=r"`fractions` entry .* must be in \(0, 1\]"):
            few_shot(tx, ty, sx, sy, sx, sy, 4, shots=(), fractions=(bad,), episodes=1)
    with pytest.raises(UserError, match="unknown few-shot `heads` entry 'svm'"):
        few_shot(tx, ty, sx, sy, sx, sy, 4, heads=("svm",))
    with pytest.raises(UserError, match="`heads` is empty"):
        few_shot(tx, ty, sx, sy, sx, sy, 4, heads=())
    with pytest.raises(UserError, match="`shots` and `fractions` are both empty"):
        few_shot(tx, ty, sx, sy, sx, sy, 4, shots=(), fractions=())


def write_embeddings(path, labelled=True, splits=("train", "val", "test"), subset=None):
    parts = [blobs(n, seed=i) for i, n in enumerate((120, 40, 40))][: len(splits)]
    emb = Embeddings(np.concatenate([p[0] for p in parts]),
                     np.concatenate([p[1] if labelled else -np.ones_like(p[1]) for p in parts]),
                     np.concatenate([[s] * len(p[1]) for s, p in zip(splits, parts)]),
                     np.concatenate([np.arange(len(p[1])) for p in parts]), tuple(NAMES),
                     SPEC, subset=subset or {})
    emb.save(path)
    return path


SPEC = EmbedderSpec(kind="pixels", identity="pixels:test", image_size=4, channels=1, num_classes=4,
                    source={"kind": "npz", "path": "/nowhere.npz", "size": 4})


def test_results_say_which_embeddings_and_subset(tmp_path):
    full = Embeddings.load(write_embeddings(tmp_path / "f.npz"))
    part = Embeddings.load(write_embeddings(tmp_path / "p.npz", subset={"limit": 40, "seed": 0}))
    for result in (probe_embeddings(full), knn_embeddings(full)):
        assert result["subset"] is None and result["identity"] == "pixels:test"
    assert probe_embeddings(part)["subset"] == {"limit": 40, "seed": 0}
    assert knn_embeddings(part)["subset"] == {"limit": 40, "seed": 0}
    assert probe_embeddings(full)["test_clusters"]["nmi"] > 0.9


def test_unlabelled_cells_are_skipped_by_labelled_evaluation(tmp_path):
    emb = Embeddings.load(write_embeddings(tmp_path / "f.npz"))
    emb.labels[:30] = -1  # unlabelled training cells serve pretraining only
    result = probe_embeddings(emb)
    assert result["test_acc"] > 0.9


def test_eval_commands_on_embeddings(tmp_path, capsys):
    emb = write_embeddings(tmp_path / "e.npz")
    capsys.readouterr()
    assert main(["linear-probe", "--embeddings", str(emb), "--json", "--out", str(tmp_path / "lp")]) == 0
    probe = json.loads(capsys.readouterr().out)
    assert {"val_acc", "test_acc", "test_auc", "balanced_acc", "macro_f1", "per_class",
            "weight_decay", "weight_decay_grid", "test_clusters", "identity", "subset"} <= probe.keys()
    assert (tmp_path / "lp" / "confusion_matrix.png").stat().st_size > 10_000
    assert main(["knn", "--embeddings", str(emb), "--json"]) == 0
    knn = json.loads(capsys.readouterr().out)
    assert knn["k"] == 20 and knn["temperature"] == 0.07 and knn["test_acc"] > 0.9
    assert main(["few-shot", "--embeddings", str(emb), "--shots", "1,5", "--fractions", "0.1",
                 "--episodes", "3", "--json"]) == 0
    shots = json.loads(capsys.readouterr().out)["results"]
    assert len(shots) == 3 and {"setting", "head", "mean_acc", "ci95", "episodes", "heads"} <= shots[0].keys()
    assert main(["few-shot", "--embeddings", str(emb), "--shots", "5", "--fractions", ""]) == 0
    assert "5-shot" in capsys.readouterr().out
    assert main(["few-shot", "--embeddings", str(emb), "--shots", "", "--fractions", ""]) == 2
    err = capsys.readouterr().err
    assert "--shots and --fractions are both empty" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, pattern", [
    (["linear-probe", "--embeddings", "{unlabelled}"], r"has no labels"),
    (["knn", "--embeddings", "{trainonly}"], r"no 'test' split"),
    (["few-shot", "--embeddings", "{good}", "--shots", "100"], r"asked for 100 labelled images"),
    (["few-shot", "--embeddings", "{good}", "--fractions", "1.5"], r"--fractions entry 1.5 must be in \(0, 1\]"),
    (["few-shot", "--embeddings", "{good}", "--fractions", "x"], r"comma-separated list of float"),
    (["linear-probe", "--embeddings", "{missing}"], r"no such file"),
])
def test_eval_bad_input(tmp_path, capsys, argv, pattern):
    files = {"unlabelled": write_embeddings(tmp_path / "u.npz", labelled=False),
             "trainonly": write_embeddings(tmp_path / "t.npz", splits=("train",)),
             "good": write_embeddings(tmp_path / "g.npz"), "missing": tmp_path / "m.npz"}
    capsys.readouterr()
    code = main([a.format(**files) for a in argv])
    err = capsys.readouterr().err
    import re

    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(pattern, err), err


def test_checkpoint_probed_on_another_dataset(tiny_run, tmp_path, capsys):
    """A backbone pretrained on one dataset is probed on another with its own 5 classes."""
    from tests.helpers import make_npz

    run, _ = tiny_run
    other = make_npz(tmp_path / "five.npz", classes=5)
    capsys.readouterr()
    code = main(["linear-probe", "--checkpoint", str(run / "checkpoint.pt"), "--npz", str(other),
                 "--json", "--out", str(tmp_path / "lp")])
    out = capsys.readouterr().out
    assert code == 0 and len(json.loads(out)["per_class"]) == 5


def test_linear_probe_from_checkpoint(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    capsys.readouterr()
    assert main(["linear-probe", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test ACC" in out and (tmp_path / "linear_probe.json").exists()


def test_few_shot_logistic_head_does_not_underfit_many_labels(data_root):
    """The fixed few-shot head stays near the val-tuned linear probe with thousands of labels
    (raw BloodMNIST pixels, 3,000 train cells): on unit-norm features its weight decay underfit
    to 54 % against the probe's 80 %."""
    from ssl_blood.evaluation.frozen import FEW_SHOT_PREDICTORS

    arrays = np.load(data_root / "bloodmnist.npz")
    tx = arrays["train_images"][:3000].reshape(3000, -1).astype(np.float32) / 255
    vx = arrays["val_images"][:1000].reshape(1000, -1).astype(np.float32) / 255
    ty, vy = arrays["train_labels"][:3000, 0], arrays["val_labels"][:1000, 0]
    predicted, = FEW_SHOT_PREDICTORS["logreg"](tx, ty, [vx], 8)
    probe = linear_probe(tx, ty, vx, vy, vx, vy, [str(c) for c in range(8)])
    assert (predicted == vy).mean() >= probe["test_acc"] - 0.04
