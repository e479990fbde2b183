import json

import numpy as np
import pytest

from ssl_blood.errors import UserError
from ssl_blood.features.index import CellIndex, default_nlist, faiss_gpus


def clustered(n=2000, dim=32, clusters=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32), labels


META = {"identity": "abc", "class_names": [], "embedder": {}, "gallery_split": "train"}


def brute_force(gallery, queries, k):
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q @ g.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, 1), order


def test_exact_search_equals_numpy_brute_force():
    gallery, labels = clustered()
    queries = clustered(50, seed=1)[0]
    sims, pos = CellIndex.build(gallery, labels=labels, use_gpu=False).search(queries, 10)
    ref_sims, ref_pos = brute_force(gallery, queries, 10)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (pos == ref_pos).mean() > 0.99  # ties may swap order
    assert sims.dtype == np.float32 and pos.dtype == np.int64


def test_ivf_padding_is_masked():
    """An IVF search whose probed lists hold fewer than k vectors pads with -1: kept as -1 and
    -inf, never as a real neighbour."""
    gallery, _ = clustered(400, clusters=20)
    index = CellIndex.build(gallery, kind="ivf", nlist=40, nprobe=1, use_gpu=False)
    sims, pos = index.search(gallery[:20], 100)
    assert (pos < 0).any()
    assert np.isneginf(sims[pos < 0]).all() and np.isfinite(sims[pos >= 0]).all()
    assert ((pos >= 0).sum(1) < 100).all()


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "hnsw", "auto"])
def test_every_kind_finds_near_duplicates(kind, tmp_path):
    gallery, labels = clustered(3000)
    index = CellIndex.build(gallery, labels=labels, kind=kind, use_gpu=False, nprobe=32)
    assert index.kind == ("flat" if kind == "auto" else kind)
    _, pos = index.search(gallery[:50] + 1e-4, 1)
    assert (pos[:, 0] == np.arange(50)).mean() > 0.95
    index.save(tmp_path / kind)
    assert CellIndex.load(tmp_path / kind, use_gpu=False).search(gallery[:3], 2)[1].shape == (3, 2)


def test_auto_kind_by_size():
    from ssl_blood.features.index import AUTO_FLAT_BELOW, choose_kind

    assert choose_kind(AUTO_FLAT_BELOW - 1) == "flat"
    assert choose_kind(AUTO_FLAT_BELOW) == "hnsw"  # fastest at recall >= 0.95 on a CPU
    assert choose_kind(AUTO_FLAT_BELOW, on_gpu=True) == "ivf"  # faiss has no GPU HNSW


def test_k_larger_than_gallery_is_clamped():
    index = CellIndex.build(np.eye(3, dtype=np.float32), use_gpu=False)
    sims, pos = index.search(np.eye(3, dtype=np.float32), 10)
    assert pos.shape == (3, 3) and (pos[:, 0] == [0, 1, 2]).all()


def test_save_load_roundtrip_keeps_metadata(tmp_path):
    gallery, labels = clustered(300)
    ids = np.arange(300) * 3
    index = CellIndex.build(gallery, labels=labels, ids=ids, use_gpu=False,
                            meta={"identity": "abc123", "class_names": [str(c) for c in range(20)],
                                  "embedder": {}, "gallery_split": "train"})
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["dim"] == 32 and meta["kind"] == "flat" and meta["gallery_ids"][1] == 3
    loaded = CellIndex.load(tmp_path / "idx", expected_identity="abc123", expected_dim=32, use_gpu=False)
    queries = gallery[:5]
    assert np.array_equal(loaded.search(queries, 4)[1], index.search(queries, 4)[1])
    assert np.array_equal(loaded.gallery_labels, labels) and np.array_equal(loaded.gallery_ids, ids)


def test_mismatches_are_refused(tmp_path):
    gallery, _ = clustered(100)
    CellIndex.build(gallery, use_gpu=False, meta=META).save(tmp_path / "idx")
    with pytest.raises(UserError, match="built from abc, not def"):
        CellIndex.load(tmp_path / "idx", expected_identity="def")
    with pytest.raises(UserError, match="32-d vectors but the embeddings are 64-d"):
        CellIndex.load(tmp_path / "idx", expected_dim=64)
    index = CellIndex.load(tmp_path / "idx", use_gpu=False)
    with pytest.raises(UserError, match="dimension 16 but the index holds 32-d"):
        index.search(np.zeros((1, 16), np.float32), 3)


def test_missing_or_corrupt_index_directory(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        CellIndex.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an ssl-blood index"):
        CellIndex.load(tmp_path / "empty")
    CellIndex.build(clustered(50)[0], use_gpu=False, meta=META).save(tmp_path / "idx")
    (tmp_path / "idx" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt"):
        CellIndex.load(tmp_path / "idx")


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_ivf_recall_on_a_clustered_gallery(kind):
    gallery, _ = clustered(5000, dim=32, clusters=50)
    queries = clustered(200, dim=32, clusters=50, seed=1)[0]
    index = CellIndex.build(gallery, kind=kind, use_gpu=False, nprobe=16 if kind == "ivf" else 32)
    assert index.meta["nlist"] == default_nlist(5000) and index.meta["kind"] == kind
    _, pos = index.search(queries, 10)
    _, exact = brute_force(gallery, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(pos, exact)])
    assert recall > (0.9 if kind == "ivf" else 0.5), recall


def test_ivf_bad_parameters():
    with pytest.raises(UserError, match="`nlist` 500 must be between 1 and the 100"):
        CellIndex.build(clustered(100)[0], kind="ivf", nlist=500)
    with pytest.raises(UserError, match="`pq_m` 5 must divide the dimension 32"):
        CellIndex.build(clustered(1000)[0], kind="ivfpq", nlist=8, pq_m=5)
    with pytest.raises(UserError, match="`nprobe` 50 must be between 1 and nlist 8"):
        CellIndex.build(clustered(1000)[0], kind="ivf", nlist=8, nprobe=50)
    with pytest.raises(UserError, match="unknown index `kind`"):
        CellIndex.build(clustered(10)[0], kind="lsh")


@pytest.mark.parametrize("edit, pattern", [
    (lambda m: m.update(gallery_ids=m["gallery_ids"][:-1]), "gallery ids or labels do not match"),
    (lambda m: m.update(gallery_labels=[99] * len(m["gallery_labels"])), "gallery labels outside"),
    (lambda m: m.pop("identity"), "'identity' missing"),
    (lambda m: m.update(dim="32"), "'dim' missing or not a int"),
    (lambda m: m.update(ntotal=5), "holds 100 x 32 vectors"),
])
def test_hand_edited_meta_is_refused(tmp_path, edit, pattern):
    gallery, labels = clustered(100, clusters=2)
    CellIndex.build(gallery, labels=labels, use_gpu=False,
                    meta={**META, "class_names": ["a", "b"]}).save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    edit(meta)
    (tmp_path / "idx" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=pattern):
        CellIndex.load(tmp_path / "idx", use_gpu=False)


@pytest.mark.skipif(faiss_gpus() == 0, reason="the installed faiss has no GPU support (faiss-cpu)")
def test_gpu_index_matches_cpu(tmp_path):
    gallery, labels = clustered()
    queries = clustered(50, seed=1)[0]
    gpu = CellIndex.build(gallery, labels=labels, use_gpu=True)
    assert gpu.on_gpu
    np.testing.assert_allclose(gpu.search(queries, 10)[0], brute_force(gallery, queries, 10)[0], atol=1e-3)
    gpu.save(tmp_path / "idx")  # moved back to the CPU to be written
    assert CellIndex.load(tmp_path / "idx", use_gpu=False).ntotal == len(gallery)


def test_gpu_request_without_gpu_faiss_is_a_clear_error():
    if faiss_gpus() > 0:
        pytest.skip("this faiss has GPUs")
    with pytest.raises(UserError, match="no GPU support"):
        CellIndex.build(clustered(10)[0], use_gpu=True)
