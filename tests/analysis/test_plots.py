"""Figures: every one is written atomically, names are drawn literally, curves have bands."""

import numpy as np
import pytest
from PIL import Image

from ssl_blood.analysis import plots


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plots module saves, captured as they are written."""
    from ssl_blood import files

    saved, real = [], files.save_figure

    def capture(fig, path, **kwargs):
        saved.append(fig)
        return real(fig, path, **kwargs)

    monkeypatch.setattr(files, "save_figure", capture)
    return saved


def _texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def test_curves_with_bands_and_log_axis(tmp_path, figures):
    from matplotlib.collections import PolyCollection

    path = plots.curves_png([{"label": "a", "x": [8, 40, 400], "y": [0.5, 0.7, 0.9], "std": [0.05, 0.03, 0.01]},
                             {"label": "b $\\x$", "x": [8, 40, 400], "y": [0.4, 0.6, 0.8], "style": "s--"}],
                            tmp_path / "c.png", "labelled cells", "test ACC", "title", log_x=True)
    ax = figures[0].axes[0]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 1  # only the series with a std has a band, spanning y +- std
    lower, upper = bands[0].get_paths()[0].vertices[:, 1].min(), bands[0].get_paths()[0].vertices[:, 1].max()
    assert (lower, upper) == pytest.approx((0.45, 0.91))
    assert ax.get_xscale() == "log" and [line.get_label() for line in ax.get_lines()][:2] == ["a", "b $\\x$"]
    assert "b $\\x$" in _texts(figures[0])  # the legend shows the name as given, not as TeX
    assert Image.open(path).size[0] > 1000
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cell_grid_with_captions_and_mathtext_names(tmp_path, figures):
    cells = [np.random.default_rng(i).integers(0, 255, (3, 16, 16), dtype=np.uint8) for i in range(4)]
    path = plots.cell_grid([cells[:2], cells[2:]], tmp_path / "g.png", "a $x^2$ title",
                           ["row $a$", "row b"], [["$\\alpha$", "b"], ["c", "d_e$"]], dpi=100)
    texts = _texts(figures[0])
    for name in ("a $x^2$ title", "row $a$", "$\\alpha$", "d_e$"):
        assert name in texts  # drawn literally: parse_math is off, so "$" shows as "$"
    from matplotlib.text import Text

    assert all(not t._parse_math for t in figures[0].findobj(Text) if "$" in t.get_text())
    images = [ax.images[0].get_array() for ax in figures[0].axes if ax.images]
    assert len(images) == 4 and np.array_equal(np.asarray(images[0]), cells[0].transpose(1, 2, 0))
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
