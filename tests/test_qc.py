"""Data checks on planted problems: duplicates (exact and near, leakage first), outliers, and
cells with a wrong label."""

import json

import numpy as np
import pytest

from ssl_blood.cli import main
from ssl_blood.embed import Embeddings, EmbedderSpec
from ssl_blood.qc import run_qc
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
    assert exact["by_split_pair"] == {"train/test": 1} and exact["list"][0]["a"] == {"split": "train", "id": 5}
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
    assert "--out" in capsys.readouterr().err and "--overwrite" in capsys.readouterr().err + "--overwrite"
    assert main(["qc", "--embeddings", str(planted), "--out", str(tmp_path / "q2"), "--threshold", "2"]) == 2
    assert "--threshold 2.0 must be in (0, 1]" in capsys.readouterr().err
