import hashlib
import shutil

import numpy as np
import pytest
import torch

from ssl_blood.data import (DataSource, available_splits, channel_stats, load_split,
                            resolve_source, stratified_indices)
from ssl_blood.errors import UserError
from tests.helpers import make_npz

BLOODMNIST_MD5 = "7053d0359d879ad8a5505303e11de1dc"


def test_bloodmnist_from_shared_root(data_root):
    source = resolve_source(str(data_root))
    sizes = {s: len(load_split(source, s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 11959, "val": 1712, "test": 3421}
    train = load_split(source, "train")
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 28, 28)
    assert train.labels.dtype == torch.int64 and set(train.labels.unique().tolist()) == set(range(8))
    assert train.class_names[3] == "immature granulocytes" and len(train.class_names) == 8
    assert torch.equal(train.ids, torch.arange(11959))
    assert available_splits(source) == ("train", "val", "test")


def test_data_root_from_environment(data_root, monkeypatch):
    monkeypatch.setenv("SSL_BLOOD_DATA_ROOT", str(data_root))
    assert resolve_source().path == str(data_root.resolve())


def test_limit_is_stratified_and_keeps_ids(data_root):
    source = resolve_source(str(data_root))
    full = load_split(source, "test")
    subset = load_split(source, "test", limit=400, seed=1)
    assert len(subset) == 400
    full_share = np.bincount(full.labels, minlength=8) / len(full)
    sub_share = np.bincount(subset.labels, minlength=8) / 400
    assert np.abs(full_share - sub_share).max() < 0.01
    assert torch.equal(full.images[subset.ids], subset.images)  # ids point into the full split


def test_stratified_indices_small_limits():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    idx = stratified_indices(labels, 10, seed=0)
    assert len(idx) == 10 and len(set(idx)) == 10
    assert set(labels[idx]) == {0, 1, 2}  # every class kept while the limit allows
    assert np.array_equal(idx, stratified_indices(labels, 10, seed=0))
    assert len(stratified_indices(labels, 2, seed=0)) == 2
    assert len(stratified_indices(labels, 500)) == 100


def test_wrong_md5_is_refused(data_root, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    blob = (data_root / "bloodmnist.npz").read_bytes()
    (root / "bloodmnist.npz").write_bytes(blob[: len(blob) // 2])  # truncated download
    with pytest.raises(UserError, match="MD5.*download it again"):
        load_split(resolve_source(str(root)), "train")
    assert hashlib.md5(blob).hexdigest() == BLOODMNIST_MD5


def test_missing_file_offline_says_where_to_put_it(tmp_path, monkeypatch):
    import medmnist

    def offline(*args, **kwargs):
        raise RuntimeError("Automatic download failed!")

    monkeypatch.setattr(medmnist, "BloodMNIST", offline)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        load_split(resolve_source(str(tmp_path / "empty")), "train")
    message = str(err.value)
    assert "download failed" in message and str(tmp_path / "empty") in message
    assert "zenodo" in message and "\n" not in message


def test_mistyped_data_root_is_not_created(tmp_path, monkeypatch):
    import medmnist

    monkeypatch.setattr(medmnist, "BloodMNIST", lambda **kw: pytest.fail("must not download"))
    with pytest.raises(UserError, match="no such folder"):
        load_split(resolve_source(str(tmp_path / "typo")), "train")
    assert not (tmp_path / "typo").exists()


def test_other_sizes_need_their_file(tmp_path, monkeypatch):
    import medmnist

    monkeypatch.setattr(medmnist, "BloodMNIST", lambda **kw: (_ for _ in ()).throw(RuntimeError()))
    with pytest.raises(UserError, match="bloodmnist_64.npz"):
        load_split(resolve_source(str(tmp_path), size=64), "train")
    with pytest.raises(UserError, match="not a BloodMNIST size"):
        resolve_source(str(tmp_path), size=50)
    for size in (8, 300):
        with pytest.raises(UserError, match="outside 16-256"):
            resolve_source(str(tmp_path), size=size)


def test_synthetic_npz_rgb_and_grayscale(tmp_path):
    rgb = load_split(resolve_source(npz=str(make_npz(tmp_path / "a.npz"))), "val")
    assert rgb.images.shape == (24, 3, 16, 16) and rgb.class_names == tuple(f"class {i}" for i in range(4))
    gray = load_split(resolve_source(npz=str(make_npz(tmp_path / "g.npz", channels=1, classes=5))), "train")
    assert gray.images.shape == (64, 1, 16, 16) and gray.num_classes == 5


def test_npz_class_names_and_medmnist_names(tmp_path):
    arrays = dict(np.load(make_npz(tmp_path / "x.npz")))
    np.savez(tmp_path / "named.npz", class_names=np.array(["a", "b", "c", "d"]), **arrays)
    assert load_split(resolve_source(npz=str(tmp_path / "named.npz")), "train").class_names == ("a", "b", "c", "d")
    shutil.copy(tmp_path / "x.npz", tmp_path / "pathmnist.npz")  # a medmnist flag: names from INFO
    names = load_split(resolve_source(npz=str(tmp_path / "pathmnist.npz")), "train").class_names
    assert names[0] == "adipose"


@pytest.mark.parametrize("mutate, pattern", [
    (lambda a: a.update(train_images=a["train_images"].astype(np.float32)), "dtype float32.*uint8"),
    (lambda a: a.update(train_images=a["train_images"][:, :, :8]), "square"),
    (lambda a: a.update(train_images=a["train_images"][..., :2]), r"expected \(N, H, W\)"),
    (lambda a: a.update(train_labels=a["train_labels"][:10]), "10 labels for 64 images"),
    (lambda a: a.update(train_labels=np.zeros((64, 3), np.int64)), "multi-label"),
    (lambda a: a.pop("train_images"), "no 'train' split"),
])
def test_malformed_npz_is_refused(tmp_path, mutate, pattern):
    arrays = dict(np.load(make_npz(tmp_path / "ok.npz")))
    mutate(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UserError, match=pattern):
        load_split(resolve_source(npz=str(tmp_path / "bad.npz")), "train")


def test_truncated_or_missing_npz(tmp_path):
    blob = make_npz(tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(UserError, match="truncated"):
        load_split(resolve_source(npz=str(tmp_path / "cut.npz")), "train")
    with pytest.raises(UserError, match="no such file"):
        load_split(resolve_source(npz=str(tmp_path / "nope.npz")), "train")


def test_channel_stats():
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 1] = 255
    mean, std = channel_stats(images)
    assert mean == pytest.approx([0, 1, 0]) and std[0] == pytest.approx(1e-3)


def test_channel_stats_in_chunks_equal_one_pass():
    assert channel_stats(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))[0] == [0.0] * 3
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    x = images.double().div(255).transpose(0, 1).reshape(3, -1)
    mean, std = channel_stats(images, max_values=7 * 3 * 64)  # chunks of 7 images
    assert mean == pytest.approx(x.mean(1).tolist(), abs=1e-6)
    assert std == pytest.approx(x.std(1).tolist(), abs=1e-6)


def test_datasource_roundtrip():
    from ssl_blood.data.sources.npz import NpzSource

    source = NpzSource("/x/cells.npz", 16)
    assert DataSource.from_dict(source.to_dict()) == source and source.name == "cells"
    old = DataSource.from_dict({"kind": "image-dir", "path": "/x/smears", "size": 28})  # format 1
    assert old.layout == "auto" and old.split_fractions == (0.7, 0.1, 0.2)
    with pytest.raises(UserError, match="only one of"):
        resolve_source("a", npz="b")


def test_a_fifth_source_is_one_registered_class(tmp_path, capsys):
    """A new source kind: one class; the CLI's data flags, embedding and the recorded form
    pick it up with no other change."""
    from dataclasses import dataclass

    from ssl_blood.cli import main
    from ssl_blood.data import CellData
    from ssl_blood.data import sources
    from ssl_blood.features.embeddings import Embeddings

    @sources.register
    @dataclass(frozen=True)
    class NoiseSource(sources.DataSource):
        kind = "noise"
        param = "noise_seed"
        metavar = "SEED"
        help = "random cells (a test source)"

        @classmethod
        def resolve(cls, value, size, **options):
            return cls(str(value), size or 16)

        def splits(self):
            return ("train", "test")

        def _load(self, split):
            rng = np.random.default_rng([int(self.path), len(split)])
            images = torch.from_numpy(rng.integers(0, 255, (12, 3, self.size, self.size), dtype=np.uint8))
            return CellData(images, torch.from_numpy(np.arange(12) % 2), torch.arange(12), split,
                            ("a", "b"), self)

    try:
        out = tmp_path / "e.npz"
        assert main(["embed", "--baseline", "pixels", "--noise-seed", "7", "--out", str(out)]) == 0
        emb = Embeddings.load(out)
        assert emb.embedder.source == {"kind": "noise", "path": "7", "size": 16}
        assert DataSource.from_dict(emb.embedder.source) == NoiseSource("7", 16)
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(["embed", "--help"])
        assert "--noise-seed SEED" in capsys.readouterr().out
    finally:
        sources._SOURCES.pop("noise")
