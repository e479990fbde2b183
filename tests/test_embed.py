import numpy as np
import pytest
import torch

from ssl_blood.cli import main
from ssl_blood.data import load_split, resolve_source
from ssl_blood.embed import Embedder, Embeddings, embed_splits
from ssl_blood.errors import UserError


def test_checkpoint_embeddings_file(tiny_run, tmp_path):
    run, npz = tiny_run
    embedder = Embedder.from_checkpoint(run / "checkpoint.pt", "cpu")
    emb = embed_splits(embedder, resolve_source(npz=str(npz)), ["train", "val", "test"])
    assert emb.features.shape == (96 + 32 + 40, 256) and emb.features.dtype == np.float32
    assert emb.splits() == ["train", "val", "test"] and (emb.labels >= 0).all()
    assert np.allclose(np.linalg.norm(emb.features_l2, axis=1), 1, atol=1e-5)
    emb.save(tmp_path / "e.npz")
    with np.load(tmp_path / "e.npz") as f:
        assert {"features", "features_l2", "labels", "split", "ids", "class_names",
                "checkpoint_sha256", "backbone", "image_size"} <= set(f.files)
        assert str(f["checkpoint_sha256"]) == embedder.spec["sha256"] and len(str(f["checkpoint_sha256"])) == 64
    loaded = Embeddings.load(tmp_path / "e.npz")
    assert np.array_equal(loaded.features, emb.features) and loaded.embedder == emb.embedder
    x, y, ids = loaded.select("test")
    assert len(x) == 40 and np.array_equal(ids, np.arange(40))


def test_features_match_the_backbone(tiny_run):
    from ssl_blood.augment import eval_preprocess
    from ssl_blood.checkpoint import load_backbone

    run, npz = tiny_run
    trained = load_backbone(run / "checkpoint.pt")
    images = load_split(resolve_source(npz=str(npz)), "val").images[:5]
    with torch.no_grad():
        expected = trained.model(eval_preprocess(images, trained.dataset["mean"], trained.dataset["std"], 16))
    got = Embedder.from_checkpoint(run / "checkpoint.pt", "cpu")(images)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)


def test_baselines(tiny_run):
    _, npz = tiny_run
    source = resolve_source(npz=str(npz))
    train = load_split(source, "train")
    pixels = Embedder.baseline("pixels", train)
    feats = pixels(train.images)
    assert feats.shape == (96, 3 * 16 * 16)
    assert np.abs(feats.mean(0)).max() < 1e-4 and np.allclose(feats.std(0, ddof=1), 1, atol=1e-3)
    a = Embedder.baseline("random-init", train, "cnn6", seed=3, device="cpu")(train.images)
    b = Embedder.from_spec(Embedder.baseline("random-init", train, "cnn6", seed=3).spec, "cpu")(train.images)
    assert a.shape == (96, 256) and np.allclose(a, b)
    with pytest.raises(UserError, match="unknown --baseline"):
        Embedder.baseline("imagenet", train)


def test_changed_checkpoint_is_detected(tiny_run, tmp_path):
    run, _ = tiny_run
    copy = tmp_path / "checkpoint.pt"
    copy.write_bytes((run / "checkpoint.pt").read_bytes())
    spec = Embedder.from_checkpoint(copy, "cpu").spec
    copy.write_bytes(copy.read_bytes() + b"x")
    with pytest.raises(UserError, match="changed since"):
        Embedder.from_spec(spec)
    copy.unlink()
    with pytest.raises(UserError, match="is gone"):
        Embedder.from_spec(spec)


def test_wrong_image_size_refused(tiny_run):
    run, _ = tiny_run
    with pytest.raises(UserError, match="do not match the 3x16x16"):
        Embedder.from_checkpoint(run / "checkpoint.pt", "cpu")(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


def test_embed_cli(tiny_run, tmp_path, capsys):
    run, npz = tiny_run
    out = tmp_path / "emb.npz"
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out),
                 "--splits", "train,test", "--limit", "20", "--device", "cpu"]) == 0
    emb = Embeddings.load(out)
    assert emb.splits() == ["train", "test"] and len(emb.labels) == 40
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out)]) == 2
    assert "exists; add --overwrite" in capsys.readouterr().err
    assert main(["embed", "--baseline", "pixels", "--npz", str(npz), "--out", str(tmp_path / "p.npz"),
                 "--splits", "train,holdout"]) == 2
    assert "no 'holdout' split" in capsys.readouterr().err
    assert main(["embed", "--baseline", "random-init", "--backbone", "cnn6", "--npz", str(npz),
                 "--out", str(tmp_path / "r.npz")]) == 0
    assert Embeddings.load(tmp_path / "r.npz").embedder["kind"] == "random-init"


def test_bad_embeddings_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        Embeddings.load(tmp_path / "none.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(UserError, match="not an ssl-blood embeddings file"):
        Embeddings.load(tmp_path / "other.npz")
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(UserError, match="truncated"):
        Embeddings.load(tmp_path / "cut.npz")
