import json

import numpy as np
import pytest
from PIL import Image

from ssl_blood.cli import main
from ssl_blood.features.embeddings import Embeddings
from ssl_blood.errors import UserError
from ssl_blood.analysis.umap_ig import (class_index, has_class, confusion_rows, fit_umap, neighbour_composition,
                               subclusters)

NAMES = ("basophil", "immature granulocytes", "monocyte", "neutrophil")


def clusters(n_per=60, dim=24, seed=0, centres_seed=7):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(centres_seed).normal(size=(len(NAMES), dim)) * 4
    labels = np.repeat(np.arange(len(NAMES)), n_per)
    return (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


@pytest.fixture(scope="module")
def umap_coords():
    features, labels = clusters()
    coords, params = fit_umap(features, seed=0)
    return coords, labels, params


def test_umap_separates_known_clusters(umap_coords):
    from sklearn.metrics import silhouette_score

    coords, labels, params = umap_coords
    assert coords.shape == (240, 2) and params["metric"] == "cosine" and params["random_state"] == 0
    assert silhouette_score(coords, labels) > 0.5
    centroids = np.stack([coords[labels == c].mean(0) for c in range(4)])
    assert np.mean(np.array([np.argmin(np.linalg.norm(centroids - p, axis=1)) for p in coords]) == labels) > 0.95


def test_neighbour_composition_sums_to_one_and_matches_brute_force():
    features, labels = clusters(n_per=20, seed=3)
    features[labels == 1] = features[labels == 1] * 0.2 + features[labels == 2] * 0.8  # IG near monocytes
    comp = neighbour_composition(features, labels, NAMES, k=10)
    normed = features / np.linalg.norm(features, axis=1, keepdims=True)
    sims = normed @ normed.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :10]
    for c, name in enumerate(NAMES):
        counts = np.bincount(labels[top[labels == c]].ravel(), minlength=4)
        assert sum(comp[name].values()) == pytest.approx(1.0)
        assert [comp[name][n] for n in NAMES] == pytest.approx(list(counts / counts.sum()))
    assert comp["immature granulocytes"]["monocyte"] > 0.1 > comp["basophil"]["monocyte"]


def test_subclusters_deterministic_and_finds_the_right_k():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    features = np.concatenate([c + rng.normal(size=(40, 16)) for c in centres]).astype(np.float32)
    a, b = subclusters(features, seed=1), subclusters(features, seed=1)
    assert a == b and a["k"] == 3 and sorted(a["sizes"]) == [40, 40, 40]
    assert all(len(r) == 8 for r in a["representatives"]) and "silhouette" in a["criterion"]


def test_class_index_and_confusion_rows():
    assert class_index(NAMES, "Immature granulocytes") == 1 and class_index(NAMES, "mono") == 2
    with pytest.raises(UserError, match="`highlight` 'blasts' is not a class"):
        class_index(NAMES, "blasts")
    assert has_class(NAMES, "immature") and not has_class(NAMES, "blasts")
    probe = {"class_names": list(NAMES), "confusion_matrix": [[5, 1, 0, 0], [0, 6, 3, 1], [0, 2, 8, 0], [0, 0, 0, 9]]}
    rows = confusion_rows(probe, "immature granulocytes")
    assert rows["true_as"]["monocyte"] == 3 and rows["recall"] == pytest.approx(0.6)
    assert rows["predicted_from"]["monocyte"] == 2 and rows["precision"] == pytest.approx(6 / 9)


def write_embeddings(path, features, labels, source=None):
    from ssl_blood.features.embeddings import EmbedderSpec

    spec = EmbedderSpec(kind="pixels", identity=f"pixels:{path.stem}", image_size=16, channels=3,
                        num_classes=4, source=source or {"kind": "npz", "path": "/gone.npz", "size": 16})
    Embeddings(features, labels, np.array(["test"] * len(labels)), np.arange(len(labels)), NAMES,
               spec).save(path)
    return path


def test_umap_command_writes_pictures_and_numbers(tmp_path, capsys):
    from tests.helpers import make_npz

    npz = make_npz(tmp_path / "cells.npz", n_test=240, classes=4)
    source = {"kind": "npz", "path": str(npz), "size": 16}
    features, labels = clusters()
    emb = write_embeddings(tmp_path / "e.npz", features, labels, source)
    other = write_embeddings(tmp_path / "o.npz", clusters(seed=5, centres_seed=9)[0], labels, source)
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"class_names": list(NAMES), "confusion_matrix": np.eye(4, dtype=int).tolist()}))
    capsys.readouterr()
    assert main(["umap", "--embeddings", str(emb), "--compare", str(other), "--probe", str(probe),
                 "--out", str(tmp_path / "u")]) == 0
    assert "immature granulocytes (60 test cells" in capsys.readouterr().out
    result = json.loads((tmp_path / "u" / "ig_analysis.json").read_text())
    main_analysis = result["analyses"]["raw pixels"]
    assert main_analysis["cells"] == 60 and main_analysis["linear_probe_confusion"]["recall"] == 1.0
    assert main_analysis["umap"]["n_neighbors"] == 15
    for name, min_pixels in (("umap.png", 1_000_000), ("ig_subclusters.png", 50_000), ("ig_neighbours.png", 200_000)):
        image = Image.open(tmp_path / "u" / name)
        assert image.size[0] * image.size[1] > min_pixels
        assert len(np.unique(np.asarray(image.convert("L")))) > 30  # not a blank canvas
    assert (tmp_path / "u" / "umap.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize("argv, pattern", [
    (["--highlight", "blasts"], r"--highlight 'blasts' is not a class"),
    (["--split", "train"], r"no 'train' split"),
    (["--highlight", "mono"], r"the test split has no 'monocyte' cells to highlight"),
])
def test_umap_bad_input(tmp_path, capsys, argv, pattern):
    features, labels = clusters(n_per=10)
    features, labels = features[labels != 2], labels[labels != 2]  # no monocytes in this split
    emb = write_embeddings(tmp_path / "e.npz", features, labels)
    capsys.readouterr()
    code = main(["umap", "--embeddings", str(emb), "--out", str(tmp_path / "u")] + argv)
    err = capsys.readouterr().err
    import re

    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(pattern, err), err


def test_too_few_cells_for_umap(tmp_path, capsys):
    features, labels = clusters(n_per=3)
    emb = write_embeddings(tmp_path / "e.npz", features, labels)
    capsys.readouterr()
    assert main(["umap", "--embeddings", str(emb), "--out", str(tmp_path / "u")]) == 2
    assert "UMAP needs more than n_neighbors=15 cells, the split has 12" in capsys.readouterr().err


def test_dollar_signs_in_class_names_are_drawn_literally(tmp_path):
    """Matplotlib would parse $...$ as mathtext (and fail on $\\x$); names are data."""
    from ssl_blood.analysis.plots import confusion_matrix_png

    names = ["$\\x$ cells", "a_b$", "50$", "plain"]
    path = confusion_matrix_png(np.eye(4, dtype=int) * 3, names, tmp_path / "cm.png", "title $\\alpha$")
    assert Image.open(path).size[0] > 100
