"""Choosing cells to label: deterministic, never an excluded or repeated cell, TypiClust covers
well-separated clusters where random draws miss some."""

import json

import numpy as np
import pytest

from ssl_blood.cli import main
from ssl_blood.features.embeddings import Embeddings, EmbedderSpec
from ssl_blood.errors import UserError
from ssl_blood.analysis.select import read_ids, select_cells, write_picks
from tests.helpers import run_cli

SPEC = EmbedderSpec(kind="pixels", identity="pixels:t", image_size=4, channels=1, num_classes=0,
                    source={"kind": "npz", "path": "/gone.npz", "size": 4})


def mixture(clusters=10, per=(200, 20), dim=32, seed=0):
    """Clusters of very different sizes: a random draw of `clusters` cells misses small ones."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 4
    sizes = [per[0] if c < 2 else per[1] for c in range(clusters)]
    labels = np.repeat(np.arange(clusters), sizes)
    x = centres[labels] + 0.3 * rng.normal(size=(len(labels), dim))
    emb = Embeddings(x.astype(np.float32), np.full(len(labels), -1), np.array(["train"] * len(labels)),
                     np.arange(len(labels)), (), SPEC)
    return emb, labels


@pytest.mark.parametrize("strategy", ["typiclust", "probcover", "kcenter", "random"])
def test_deterministic_no_duplicates_no_excluded(strategy):
    emb, _ = mixture()
    exclude = np.arange(0, 400, 7)
    a = select_cells(emb, 25, strategy, exclude, seed=3)
    b = select_cells(emb, 25, strategy, exclude, seed=3)
    ids = [p["id"] for p in a["picks"]]
    assert ids == [p["id"] for p in b["picks"]] and len(set(ids)) == 25
    assert not set(ids) & set(exclude.tolist()) and a["excluded"] == len(exclude)
    assert all(p["typicality"] > 0 for p in a["picks"])


def test_typiclust_covers_every_cluster_random_does_not():
    emb, labels = mixture()
    typi = select_cells(emb, 10, "typiclust", seed=0)["picks"]
    assert len({labels[p["id"]] for p in typi}) == 10  # one cell per cluster
    missed = [10 - len({labels[p["id"]] for p in select_cells(emb, 10, "random", seed=s)["picks"]})
              for s in range(5)]
    assert min(missed) > 0  # random draws land mostly in the two big clusters
    assert len({p["cluster"] for p in typi}) == 10


def test_next_round_continues_from_labelled_cells():
    emb, labels = mixture()
    first = [p["id"] for p in select_cells(emb, 10, "typiclust")["picks"]]
    second = [p["id"] for p in select_cells(emb, 10, "typiclust", exclude=first)["picks"]]
    assert not set(first) & set(second)


def test_picks_csv_roundtrip_and_bad_input(tmp_path):
    emb, _ = mixture()
    result = select_cells(emb, 5, "kcenter")
    write_picks(result, tmp_path / "picks.csv")
    header = (tmp_path / "picks.csv").read_text().splitlines()[0]
    assert header == "rank,id,split,cluster,typicality,label"
    assert list(read_ids(tmp_path / "picks.csv")) == [p["id"] for p in result["picks"]]
    (tmp_path / "ids.txt").write_text("3\n9999\n")
    with pytest.raises(UserError, match=r"`exclude` names 1 cell\(s\) not in the train split \(first: 9999\)"):
        select_cells(emb, 5, exclude=read_ids(tmp_path / "ids.txt"))
    for budget in (0, 561):
        with pytest.raises(UserError, match=f"`budget` {budget} must be between 1 and the 560"):
            select_cells(emb, budget)
    no_train = Embeddings(emb.features, emb.labels, np.array(["test"] * 560), emb.ids, (), SPEC)
    with pytest.raises(UserError, match="no 'train' split to choose from"):
        select_cells(no_train, 5)
    (tmp_path / "bad.csv").write_text("id\nabc\n")
    with pytest.raises(UserError, match="ids must be whole numbers"):
        read_ids(tmp_path / "bad.csv")
    (tmp_path / "latin1.csv").write_bytes("id,note\n3,caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="cannot be read as a UTF-8 CSV.*save it as a UTF-8 CSV"):
        read_ids(tmp_path / "latin1.csv")


def test_select_cli_with_montage(tiny_embeddings, tmp_path, capsys):
    out, montage = tmp_path / "picks.csv", tmp_path / "picks.png"
    assert main(["select", "--embeddings", str(tiny_embeddings), "--budget", "8", "--out", str(out),
                 "--montage", str(montage)]) == 0
    assert len(out.read_text().splitlines()) == 9 and montage.stat().st_size > 5000
    assert main(["select", "--embeddings", str(tiny_embeddings), "--budget", "8", "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["select", "--embeddings", str(tiny_embeddings), "--budget", "1000", "--out",
                 str(tmp_path / "x.csv")]) == 2
    assert "--budget 1000 must be between 1 and the 96" in capsys.readouterr().err


def test_auto_is_typiclust_without_a_classifier_and_a_large_first_round_gets_a_note(tiny_embeddings,
                                                                                    tmp_path, capsys):
    code, out, err = run_cli(capsys, "select", "--embeddings", tiny_embeddings, "--budget", "41",
                             "--out", tmp_path / "a.csv", "--json")
    assert code == 0 and json.loads(out)["strategy"] == "typiclust"
    assert "label 40 first, train a classifier, then select the rest 40 at a time with --classifier" in err
    code, out, err = run_cli(capsys, "select", "--embeddings", tiny_embeddings, "--budget", "40",
                             "--out", tmp_path / "b.csv", "--json")
    assert code == 0 and json.loads(out)["strategy"] == "typiclust" and "typiclust suits" not in err


def test_probcover_covers_every_cell_where_random_picks_do_not():
    """ProbCover's promise: with enough picks every cell lies within the ball radius of a pick
    (balls that are >= 95 % pure); random picks of the same number leave cells uncovered."""
    from ssl_blood.features.embeddings import l2_normalize

    emb, labels = mixture()
    x = l2_normalize(emb.features)

    def coverage(picks, radius):
        return float(((1 - x @ x[picks].T).min(1) <= radius).mean())

    result = select_cells(emb, 10, "probcover", seed=0)
    picks, radius = [p["id"] for p in result["picks"]], result["radius"]
    assert len(set(picks)) == 10 and 0 < radius < 1
    assert coverage(picks, radius) == 1.0
    random = [coverage([p["id"] for p in select_cells(emb, 10, "random", seed=s)["picks"]], radius)
              for s in range(5)]
    assert max(random) < 1.0
    more = [p["id"] for p in select_cells(emb, 40, "probcover", seed=0)["picks"]]
    assert len(set(more)) == 40 and set(picks) <= set(more)  # greedy: a larger budget extends


def test_margin_needs_a_classifier_and_picks_uncertain_cells_spread_out():
    emb, labels = mixture()
    with pytest.raises(UserError, match="strategy 'margin' ranks cells by the current classifier"):
        select_cells(emb, 5, "margin")
    # a classifier sure of clusters 0-7, torn between two classes on clusters 8 and 9
    probabilities = np.full((len(labels), 3), 0.0, dtype=np.float32)
    probabilities[:, 0] = 0.95
    probabilities[:, 1] = 0.05
    torn = labels >= 8
    rng = np.random.default_rng(0)
    probabilities[torn, 0] = 0.5 + 0.05 * rng.random(int(torn.sum()))
    probabilities[torn, 1] = 1 - probabilities[torn, 0]
    # 3 picks: the 30 smallest margins (all torn cells), spread over k-means clusters
    picks = select_cells(emb, 3, "margin", probabilities=probabilities)["picks"]
    assert all(labels[p["id"]] >= 8 for p in picks) and all(p["margin"] < 0.15 for p in picks)
    assert {labels[p["id"]] for p in picks} == {8, 9}  # diversified: both torn clusters


def test_exclude_by_path_from_the_sheets_download(tmp_path):
    from ssl_blood.analysis.select import read_cells

    emb, _ = mixture()
    paths = np.array([f"img/c{i:04d}.png" for i in range(len(emb.ids))])
    emb = Embeddings(emb.features, emb.labels, emb.split, emb.ids, (), SPEC, metadata={"path": paths})
    (tmp_path / "labels.csv").write_text('\ufeff"path","label","status"\r\n"img/c0003.png","a","labelled"\r\n'
                                         '"img/c0007.png","","unsure"\r\n')
    seen = read_cells(tmp_path / "labels.csv")
    assert seen == ["img/c0003.png", "img/c0007.png"]
    picks = select_cells(emb, 30, "kcenter", exclude=seen)["picks"]
    assert not {p["path"] for p in picks} & set(seen) and all("path" in p for p in picks)
