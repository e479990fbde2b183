"""Figures: every one is written atomically, names are drawn literally, curves have bands."""

import numpy as np
from PIL import Image

from ssl_blood.analysis import plots


def test_curves_with_bands_and_log_axis(tmp_path):
    path = plots.curves_png([{"label": "a", "x": [8, 40, 400], "y": [0.5, 0.7, 0.9], "std": [0.05, 0.03, 0.01]},
                             {"label": "b $\\x$", "x": [8, 40, 400], "y": [0.4, 0.6, 0.8], "style": "s--"}],
                            tmp_path / "c.png", "labelled cells", "test ACC", "title", log_x=True)
    image = np.asarray(Image.open(path).convert("L"))
    assert image.shape[1] > 1000 and len(np.unique(image)) > 30
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cell_grid_with_captions_and_mathtext_names(tmp_path):
    cells = [np.random.default_rng(i).integers(0, 255, (3, 16, 16), dtype=np.uint8) for i in range(4)]
    path = plots.cell_grid([cells[:2], cells[2:]], tmp_path / "g.png", "a $x^2$ title",
                           ["row $a$", "row b"], [["$\\alpha$", "b"], ["c", "d_e$"]], dpi=100)
    assert Image.open(path).size[0] > 100


def test_long_class_names_are_shortened_under_thumbnails():
    names = ["basophil", "immature granulocytes", "red blood cell precursor"]
    assert [plots._short(names, i) for i in range(3)] == ["basophil", "IG", "RBCP"]
    assert plots._short(names, -1) == "unlabelled"


def test_retrieval_montage_with_fewer_neighbours_in_some_rows(tmp_path):
    img = np.zeros((3, 8, 8), np.uint8)
    rows = [{"query": img, "caption": "q1", "neighbours": [img] * 3, "labels": [0, 1, -1], "similarities": [0.9, 0.8, 0.7]},
            {"query": img, "caption": "q2", "neighbours": [img], "labels": [0], "similarities": [0.5]}]
    assert Image.open(plots.retrieval_montage(rows, ["a", "b"], tmp_path / "m.png")).size[0] > 100
