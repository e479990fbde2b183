import json

import numpy as np
import pytest
from PIL import Image

from ssl_blood.cli import main
from ssl_blood.features.index import CellIndex
from ssl_blood.features.neighbours import neighbours
from ssl_blood.features.retrieval import retrieval_metrics
from tests.helpers import CELL_NAMES


def test_precision_and_map_on_known_neighbours():
    gallery_labels = np.array([0] * 5 + [1] * 5)
    query_labels = np.array([0, 1])
    neighbour_labels = np.array([[0, 0, 1, 0, 1, 1, 1, 1, 1, 1],   # hits at ranks 1, 2, 4
                                 [0, 1, 1, 1, 1, 1, 0, 0, 0, 0]])  # hits at ranks 2-6
    m = retrieval_metrics(query_labels, neighbour_labels, gallery_labels, ["a", "b"])
    assert m["per_class"]["a"]["precision@1"] == 1.0 and m["per_class"]["b"]["precision@1"] == 0.0
    assert m["per_class"]["a"]["precision@5"] == pytest.approx(3 / 5)
    assert m["per_class"]["b"]["precision@10"] == pytest.approx(5 / 10)
    ap_a = (1 / 1 + 2 / 2 + 3 / 4) / 5  # min(R=5, 10) relevant cells
    ap_b = (1 / 2 + 2 / 3 + 3 / 4 + 4 / 5 + 5 / 6) / 5
    assert m["per_class"]["a"]["mAP@10"] == pytest.approx(ap_a)
    assert m["overall"]["mAP@10"] == pytest.approx((ap_a + ap_b) / 2)
    assert m["overall"]["queries"] == 2


def test_unfilled_neighbours_never_count():
    """-2 marks a place an approximate index left empty: a miss, never a hit."""
    m = retrieval_metrics(np.array([0, 0]), np.array([[0, -2, -2], [0, 0, 0]]), np.array([0] * 5 + [1]),
                          ["a", "b"], ks=(1, 3))
    assert m["overall"]["precision@3"] == pytest.approx((1 / 3 + 1) / 2)


def test_ivf_padding_is_not_returned_as_a_neighbour(tmp_path):
    from ssl_blood.features.retrieval import describe, evaluate_index

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16))
    labels = np.repeat(np.arange(20), 20)
    gallery = (centres[labels] + 0.05 * rng.normal(size=(400, 16))).astype(np.float32)
    index = CellIndex.build(gallery, labels=labels, kind="ivf", nlist=40, nprobe=1, use_gpu=False,
                            meta={"class_names": [str(c) for c in range(20)], "gallery_split": "train"})
    sims, pos = neighbours(index, gallery[:5], 100)
    answers = describe(index, sims, pos, [{"id": i} for i in range(5)])
    for a, row in zip(answers, pos):
        assert a["found"] == int((row >= 0).sum()) and a["found"] < 100
        assert len(a["neighbours"]) == a["found"] and len({n["id"] for n in a["neighbours"]}) == a["found"]
        assert all(np.isfinite(n["similarity"]) for n in a["neighbours"])
    result = evaluate_index(index, gallery[:40], labels[:40], k=10)
    assert result["unfilled"] == int((neighbours(index, gallery[:40], 10)[1] < 0).sum())


def test_neighbours_exclude_the_query_itself():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(50, 8)).astype(np.float32)
    index = CellIndex.build(gallery, ids=np.arange(50) + 100, use_gpu=False)
    _, pos = neighbours(index, gallery[:3], 5, exclude_ids=[100, 101, 102])
    assert pos.shape == (3, 5)
    assert all(i not in row for i, row in zip(range(3), pos))
    _, pos = neighbours(index, gallery[:3], 5)
    assert list(pos[:, 0]) == [0, 1, 2]
    from ssl_blood.errors import UserError

    with pytest.raises(UserError, match="`k` 50 must be smaller than the 50 gallery cells"):
        neighbours(index, gallery[:3], 50, exclude_ids=[100, 101, 102])


@pytest.fixture
def index_dir(tiny_run, tmp_path):
    run, _ = tiny_run
    emb = tmp_path / "emb.npz"
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(emb)]) == 0
    assert main(["index", "--embeddings", str(emb), "--out", str(tmp_path / "idx")]) == 0
    return tmp_path / "idx"


def test_retrieve_split_ids_json_and_montage(index_dir, tmp_path, capsys):
    capsys.readouterr()
    montage = tmp_path / "m.png"
    assert main(["retrieve", "--index", str(index_dir), "--split", "test", "--ids", "0,5,7",
                 "--k", "4", "--json", "--montage", str(montage)]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert [a["query"]["id"] for a in answers] == [0, 5, 7]
    for a in answers:
        assert a["query"]["split"] == "test" and a["query"]["class"] in CELL_NAMES
        assert [n["rank"] for n in a["neighbours"]] == [1, 2, 3, 4]
        sims = [n["similarity"] for n in a["neighbours"]]
        assert sims == sorted(sims, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in sims)
        assert {"id", "split", "label", "class", "similarity"} <= a["neighbours"][0].keys()
        assert a["found"] == 4
    image = Image.open(montage)
    assert image.size[0] > 400 and len(np.unique(np.asarray(image.convert("L")))) > 20


def test_retrieve_from_image_files_of_other_sizes_and_modes(index_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).convert("RGBA").save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(tmp_path / "b.jpg")
    capsys.readouterr()
    assert main(["retrieve", "--index", str(index_dir), "--image", str(tmp_path / "a.png"),
                 str(tmp_path / "b.jpg"), "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("query") == 2 and "similarity" in out


def test_retrieve_evaluate_json(index_dir, tmp_path, capsys, tiny_run):
    _, npz = tiny_run
    assert main(["embed", "--baseline", "pixels", "--npz", str(npz), "--out", str(tmp_path / "px.npz")]) == 0
    capsys.readouterr()
    assert main(["retrieve", "--index", str(index_dir), "--evaluate", "--split", "test", "--json",
                 "--baseline-embeddings", str(tmp_path / "px.npz")]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("model", "raw pixels"):
        overall = result[key]["overall"]
        assert set(overall) == {"precision@1", "precision@5", "precision@10", "mAP@10", "queries"}
        assert overall["queries"] == 40 and 0 <= overall["mAP@10"] <= 1
        assert len(result[key]["per_class"]) == 4
    assert main(["retrieve", "--index", str(index_dir), "--evaluate", "--split", "test", "--json",
                 "--k", "20", "--baseline-embeddings", str(tmp_path / "px.npz")]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("model", "raw pixels"):  # --k sets the depth searched and scored
        assert set(result[key]["overall"]) == {"precision@1", "precision@5", "precision@10",
                                               "precision@20", "mAP@20", "queries"}


@pytest.mark.parametrize("argv, pattern", [
    (["--split", "test", "--ids", "0,999"], r"--ids 999 is out of range: the test split has 40"),
    (["--image", "{tmp}/missing.png"], r"cannot read --image .*missing.png"),
    (["--image", "{tmp}/broken.png"], r"cannot read --image .*broken.png"),
    ([], r"give query cells with --image"),
    (["--split", "test", "--ids", "a,b"], r"--ids .a. is neither a file of the test split nor a position in it"),
    (["--split", "train", "--ids", "0", "--k", "96"], r"--k 96 must be smaller than the 96 gallery cells"),
    (["--split", "test", "--ids", "0", "--montage", "{tmp}/m.txt"], r"give a picture file name"),
    (["--split", "test", "--ids", "0", "--montage", "{tmp}/exists.png"], r"--montage .*exists.png exists; set --overwrite"),
])
def test_retrieve_bad_input(index_dir, tmp_path, capsys, argv, pattern):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "exists.png").write_bytes(b"keep")
    capsys.readouterr()
    code = main(["retrieve", "--index", str(index_dir)] + [a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    import re

    assert re.search(pattern, err), err
    assert (tmp_path / "exists.png").read_bytes() == b"keep"


def test_index_bad_input(index_dir, tmp_path, capsys):
    capsys.readouterr()
    assert main(["retrieve", "--index", str(tmp_path / "nowhere"), "--split", "test", "--ids", "0"]) == 2
    assert "no such folder" in capsys.readouterr().err
    (index_dir / "index.faiss").write_bytes(b"junk")
    assert main(["retrieve", "--index", str(index_dir), "--split", "test", "--ids", "0"]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert main(["index", "--embeddings", str(tmp_path / "emb.npz"), "--out", str(tmp_path / "idx")]) == 2
    assert "index.faiss exists; set --overwrite" in capsys.readouterr().err


def test_too_few_neighbours_are_explained_by_the_index_kind():
    """A flat index is exact: it falls short only when the gallery is small (raising nprobe
    would not help); an IVF index falls short when its probed lists are small."""
    from ssl_blood.features.retrieval import shortfall

    rng = np.random.default_rng(0)
    flat = CellIndex.build(rng.normal(size=(6, 8)).astype(np.float32), use_gpu=False, kind="flat")
    answers = [{"found": 5}, {"found": 10}]
    note = shortfall(flat, answers, 10)
    assert note.startswith("1 of 2 queries got fewer than 10 neighbours")
    assert "gallery holds 6 cells" in note and "nprobe" not in note
    ivf = CellIndex.build(rng.normal(size=(400, 8)).astype(np.float32), use_gpu=False, kind="ivf",
                          nlist=40, nprobe=1)
    assert "larger `nprobe`" in shortfall(ivf, answers, 10)
    assert shortfall(flat, [{"found": 10}], 10) is None


def test_retrieve_names_folder_cells_by_their_files(tiny_run, tmp_path, capsys):
    """A folder's cells are queried by relative path (as picks.csv names them), and answered
    with the query's path."""
    from tests.helpers import write_png

    run, npz = tiny_run
    arrays = np.load(npz)
    for i, image in enumerate(arrays["test_images"][:12]):
        write_png(tmp_path / "slide" / f"cell_{i:02d}.png", image)
    folder = ["--image-dir", str(tmp_path / "slide"), "--size", "16", "--cache-dir", "none"]
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), *folder, "--out", str(tmp_path / "e.npz")]) == 0
    assert main(["index", "--embeddings", str(tmp_path / "e.npz"), "--out", str(tmp_path / "idx")]) == 0
    capsys.readouterr()
    assert main(["retrieve", "--index", str(tmp_path / "idx"), "--split", "train", "--ids",
                 "cell_03.png,cell_07.png", "--k", "3", "--json", "--montage", str(tmp_path / "m.png")]) == 0
    answers = json.loads(capsys.readouterr().out)
    assert [(a["query"]["path"], a["query"]["id"]) for a in answers] == [("cell_03.png", 3), ("cell_07.png", 7)]
    assert 3 not in [n["id"] for n in answers[0]["neighbours"]]  # a cell is not its own neighbour
