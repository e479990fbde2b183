"""Data checks on planted problems: duplicates (exact and near, leakage first), outliers, and
cells with a wrong label."""

import json

import numpy as np
import pytest

from ssl_blood.cli import main
from ssl_blood.features.embeddings import Embeddings, EmbedderSpec
from ssl_blood.analysis.qc import run_qc
from tests.helpers import make_npz


@pytest.fixture
def planted(tmp_path):
    """A dataset with: test cell 0 a pixel copy of train cell 5; val cell 1 a near copy of train
    cell 9; train cell 20 mislabelled; test cell 7 far from everything."""
    npz = make_npz(tmp_path / "cells.npz", n_train=120, n_val=40, n_test=40, class_names=("a", "b", "c", "d"))
    arrays = dict(np.load(npz))
    arrays["test_images"][0] = arrays["train_images"][5]
    arrays["train_labels"][20] = (arrays["train_labels"][20] + 1) % 4
    np.savez(npz, **arrays)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 24)) * 3
    parts = []
    for split in ("train", "val", "test"):
        labels = arrays[f"{split}_labels"][:, 0].copy()
        true = np.arange(len(labels)) % 4
        x = centres[true] + 0.4 * rng.normal(size=(len(labels), 24))
        parts.append((x, labels, split))
    parts[2][0][0] = parts[0][0][5]  # same pixels, same features
    parts[1][0][1] = parts[0][0][9] + 1e-3
    parts[2][0][7] = rng.normal(size=24) * 30
    spec = EmbedderSpec(kind="pixels", identity="pixels:planted", image_size=16, channels=3, num_classes=4,
                        source={"kind": "npz", "path": str(npz), "size": 16})
    emb = Embeddings(np.concatenate([p[0] for p in parts]).astype(np.float32),
                     np.concatenate([p[1] for p in parts]),
                     np.concatenate([[p[2]] * len(p[1]) for p in parts]),
                     np.concatenate([np.arange(len(p[1])) for p in parts]), ("a", "b", "c", "d"), spec)
    path = tmp_path / "emb.npz"
    emb.save(path)
    return path


def test_planted_problems_are_found(planted, tmp_path):
    result = run_qc(Embeddings.load(planted), tmp_path / "qc", threshold=0.999, k=10, top=10)
    near = result["near_duplicates"]
    first = near["list"][0]
    assert first["splits"] == "train/test" and {first["a"]["id"], first["b"]["id"]} == {5, 0}
    assert near["leakage_pairs"] >= 1
    assert any(p["splits"] == "train/val" and {p["a"]["id"], p["b"]["id"]} == {9, 1} for p in near["list"])
    exact = result["exact_duplicates"]
    assert exact["by_split_pair"] == {"train/test": 1}
    assert {k: exact["list"][0]["a"][k] for k in ("split", "id")} == {"split": "train", "id": 5}
    emb = Embeddings.load(planted)
    label_of = {(s, i): emb.class_names[l] for s, i, l in zip(emb.split, emb.ids, emb.labels)}
    assert exact["list"][0]["a"]["label"] == label_of[("train", 5)]
    assert exact["list"][0]["b"]["label"] == label_of[("test", 0)]
    assert exact["label_conflicts"] == int(label_of[("train", 5)] != label_of[("test", 0)])
    assert result["outliers"]["per_split"]["test"]["top"][0]["id"] == 7
    suspects = [c for cells in result["label_suspects"]["per_class"].values() for c in cells]
    assert any(c["split"] == "train" and c["id"] == 20 for c in suspects)
    written = json.loads((tmp_path / "qc" / "qc.json").read_text())
    assert written["near_duplicates"]["pairs"] == near["pairs"]
    assert {p.split("/")[-1] for p in written["montages"]} == {"duplicates.png", "outliers.png", "label_suspects.png"}


def test_qc_cli(planted, tmp_path, capsys):
    capsys.readouterr()
    assert main(["qc", "--embeddings", str(planted), "--out", str(tmp_path / "q"), "--threshold", "0.999"]) == 0
    out = capsys.readouterr().out
    assert "leakage across splits" in out and "label suspects" in out
    assert main(["qc", "--embeddings", str(planted), "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "--overwrite" in err
    assert main(["qc", "--embeddings", str(planted), "--out", str(tmp_path / "q2"), "--threshold", "2"]) == 2
    assert "--threshold 2.0 must be in (0, 1]" in capsys.readouterr().err
    assert main(["qc", "--embeddings", str(planted), "--out", str(tmp_path / "q3"), "--min-confidence", "0"]) == 2
    assert "--min-confidence 0.0 must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "q2").exists() and not (tmp_path / "q3").exists()


def test_adaptive_threshold_finds_copies_not_lookalikes(planted, tmp_path):
    """Without a threshold, the planted copies are the near-duplicates and ordinary neighbours
    (the same class's cluster) are not; the pixel copy's pixel difference is 0."""
    result = run_qc(Embeddings.load(planted), tmp_path / "qc", k=10, top=10)
    near = result["near_duplicates"]
    assert near["threshold_rule"].startswith("auto") and near["threshold"] < 1
    assert near["threshold"] == pytest.approx(1 - 0.1 * near["median_nn_distance"], abs=1e-6)
    found = {frozenset(((p["a"]["split"], p["a"]["id"]), (p["b"]["split"], p["b"]["id"]))): p for p in near["list"]}
    assert set(found) == {frozenset({("train", 5), ("test", 0)}), frozenset({("train", 9), ("val", 1)})}
    assert found[frozenset({("train", 5), ("test", 0)})]["pixel_mad"] == 0
    assert found[frozenset({("train", 9), ("val", 1)})]["pixel_mad"] > 0  # features copied, pixels not


def test_label_suspect_confidence_and_class_counts(planted, tmp_path):
    emb = Embeddings.load(planted)
    strict = run_qc(emb, None, k=10, min_confidence=0.9)["label_suspects"]
    loose = run_qc(emb, None, k=10, min_confidence=0.3)["label_suspects"]
    assert strict["suspects"] <= loose["suspects"]
    assert sum(c["suspects"] for c in loose["by_class"].values()) == loose["suspects"]
    assert sum(c["labelled"] for c in loose["by_class"].values()) == loose["labelled_cells"]
    mislabelled = loose["by_class"][emb.class_names[int(emb.labels[(emb.split == "train") & (emb.ids == 20)][0])]]
    assert mislabelled["suspects"] >= 1 and sum(mislabelled["neighbours_say"].values()) == mislabelled["suspects"]


def test_qc_on_embeddings_of_a_subset_checks_only_the_cells_they_hold(planted, tmp_path):
    """`embed --limit` keeps some ids of each split; pixel duplicates among the other cells of the
    split are not reported (and used to crash the label lookup)."""
    from dataclasses import replace

    emb = Embeddings.load(planted)
    keep = ~((emb.split == "test") & (emb.ids == 0))  # the copy of train cell 5 is not held
    subset = replace(emb, features=emb.features[keep], labels=emb.labels[keep],
                     split=emb.split[keep], ids=emb.ids[keep])
    result = run_qc(subset, tmp_path / "qc", threshold=0.999, k=10, top=10)
    assert result["exact_duplicates"]["pairs"] == 0
    held = {(s, i) for s, i in zip(subset.split, subset.ids)}
    assert all((p[side]["split"], p[side]["id"]) in held
               for p in result["near_duplicates"]["list"] for side in ("a", "b"))


def test_a_folders_cells_are_named_by_their_files_in_every_list(planted, tmp_path):
    """With file paths (a folder or manifest) every listed cell carries its path beside its id."""
    from dataclasses import replace

    emb = Embeddings.load(planted)
    paths = np.array([f"{s}/cell_{i:03d}.png" for s, i in zip(emb.split, emb.ids)])
    emb = replace(emb, metadata={"path": paths})
    result = run_qc(emb, None, threshold=0.999, k=10, top=10)
    first = result["near_duplicates"]["list"][0]
    assert {first["a"]["path"], first["b"]["path"]} == {"train/cell_005.png", "test/cell_000.png"}
    assert result["outliers"]["per_split"]["test"]["top"][0]["path"] == "test/cell_007.png"
    suspects = [c for cells in result["label_suspects"]["per_class"].values() for c in cells]
    assert any(c["path"] == "train/cell_020.png" for c in suspects)
