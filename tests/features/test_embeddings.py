import numpy as np
import pytest
import torch

from ssl_blood.cli import main
from ssl_blood.data import load_split, resolve_source
from ssl_blood.features.embeddings import Embedder, EmbedderSpec, Embeddings, embed_checkpoint, embed_splits
from ssl_blood.errors import UserError
from ssl_blood.files import sha256_file


def test_checkpoint_embeddings_file(tiny_run, tmp_path):
    run, npz = tiny_run
    embedder = Embedder.from_checkpoint(run / "checkpoint.pt", "cpu")
    emb = embed_splits(embedder, resolve_source(npz=str(npz)), ["train", "val", "test"])
    assert emb.features.shape == (96 + 32 + 40, 256) and emb.features.dtype == np.float32
    assert emb.splits() == ["train", "val", "test"] and (emb.labels >= 0).all()
    assert np.allclose(np.linalg.norm(emb.features_l2, axis=1), 1, atol=1e-5)
    emb.save(tmp_path / "e.npz")
    with np.load(tmp_path / "e.npz") as f:  # the features are stored once; l2 is derived
        assert set(f.files) == {"features", "labels", "split", "ids", "class_names", "embedder", "subset"}
    assert emb.identity == f"sha256:{sha256_file(run / 'checkpoint.pt')}"
    loaded = Embeddings.load(tmp_path / "e.npz")
    assert np.array_equal(loaded.features, emb.features) and loaded.embedder == emb.embedder
    assert loaded.subset == {}
    x, y, ids = loaded.select("test")
    assert len(x) == 40 and np.array_equal(ids, np.arange(40))


def test_features_match_the_backbone(tiny_run):
    from ssl_blood.model.augment import eval_preprocess
    from ssl_blood.model.checkpoint import load_backbone

    run, npz = tiny_run
    trained = load_backbone(run / "checkpoint.pt")
    images = load_split(resolve_source(npz=str(npz)), "val").images[:5]
    with torch.no_grad():
        expected = trained.model(eval_preprocess(images, trained.dataset["mean"], trained.dataset["std"], 16))
    embedder = Embedder.from_checkpoint(run / "checkpoint.pt", "cpu")
    assert embedder.spec.precision == "fp32"  # as the run trained
    np.testing.assert_allclose(embedder(images), expected.numpy(), atol=1e-5)


def test_bf16_features_are_close_to_fp32(tiny_run):
    from dataclasses import replace

    run, npz = tiny_run
    embedder = Embedder.from_checkpoint(run / "checkpoint.pt", "cpu")
    images = load_split(resolve_source(npz=str(npz)), "val").images
    fp32 = embedder(images)
    bf16 = Embedder(replace(embedder.spec, precision="bf16", channels_last=True), embedder.model,
                    embedder.device)(images)
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert bf16.dtype == np.float32 and cosine.min() > 0.99


def test_baselines(tiny_run):
    _, npz = tiny_run
    source = resolve_source(npz=str(npz))
    train = load_split(source, "train")
    pixels = Embedder.baseline("pixels", train)
    feats = pixels(train.images)
    assert feats.shape == (96, 3 * 16 * 16)
    assert np.abs(feats.mean(0)).max() < 1e-4 and np.allclose(feats.std(0, ddof=1), 1, atol=1e-3)
    a = Embedder.baseline("random-init", train, "cnn6", seed=3, device="cpu")
    b = Embedder.from_spec(EmbedderSpec.from_dict(a.spec.to_dict()), "cpu")
    assert a(train.images).shape == (96, 256) and np.allclose(a(train.images), b(train.images))
    assert a.identity.startswith("random-init:cnn6:s1:seed3:")
    assert pixels.identity.startswith("pixels:") and pixels.identity != "pixels"
    other = Embedder.baseline("pixels", load_split(source, "train", limit=40))  # other statistics
    assert other.identity != pixels.identity
    with pytest.raises(UserError, match="unknown `baseline`"):
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
    with pytest.raises(UserError, match=r"are \(3, 28, 28\) .*made for \(3, 16, 16\)"):
        Embedder.from_checkpoint(run / "checkpoint.pt", "cpu")(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))


def test_embed_cli(tiny_run, tmp_path, capsys):
    run, npz = tiny_run
    out = tmp_path / "emb.npz"
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out),
                 "--splits", "train,test", "--limit", "20", "--device", "cpu"]) == 0
    emb = Embeddings.load(out)
    assert emb.splits() == ["train", "test"] and len(emb.labels) == 40
    assert emb.subset == {"limit": 20, "seed": 0}  # a subset can never pass for the full split
    assert main(["embed", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(out)]) == 2
    assert "exists; set --overwrite to replace it" in capsys.readouterr().err
    assert main(["embed", "--baseline", "pixels", "--npz", str(npz), "--out", str(tmp_path / "p.npz"),
                 "--splits", "train,holdout"]) == 2
    assert "no 'holdout' split" in capsys.readouterr().err
    assert main(["embed", "--baseline", "random-init", "--backbone", "cnn6", "--npz", str(npz),
                 "--out", str(tmp_path / "r.npz")]) == 0
    assert Embeddings.load(tmp_path / "r.npz").embedder.kind == "random-init"


def test_float16_storage_and_table_exports(tiny_embeddings, tmp_path):
    import pandas as pd

    emb = Embeddings.load(tiny_embeddings)
    emb.save(tmp_path / "half.npz", dtype="float16")
    half = Embeddings.load(tmp_path / "half.npz")
    assert half.features.dtype == np.float32 and (tmp_path / "half.npz").stat().st_size < tiny_embeddings.stat().st_size
    assert np.abs(half.features - emb.features).max() <= 1e-2 * np.abs(emb.features).max()
    emb.export(tmp_path / "e.csv", "csv")
    table = pd.read_csv(tmp_path / "e.csv")
    assert list(table.columns[:4]) == ["id", "split", "label", "class_name"]
    assert table.shape == (len(emb.features), 4 + emb.dim)
    assert table["class_name"].iloc[0] == emb.class_names[emb.labels[0]]
    np.testing.assert_allclose(table[[f"f{i}" for i in range(emb.dim)]].to_numpy(), emb.features, rtol=1e-5)
    emb.export(tmp_path / "e.parquet", "parquet")
    assert pd.read_parquet(tmp_path / "e.parquet").shape == table.shape


def test_metadata_travels_into_the_embeddings(tmp_path):
    from tests.helpers import write_png

    rng = np.random.default_rng(0)
    rows = ["path,label,patient"]
    for i in range(30):
        write_png(tmp_path / f"c{i}.png", rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
        rows.append(f"c{i}.png,{'ab'[i % 2]},P{i % 3}")
    (tmp_path / "cells.csv").write_text("\n".join(rows) + "\n")
    source = resolve_source(manifest=str(tmp_path / "cells.csv"), size=20)
    emb = embed_splits(Embedder.baseline("pixels", load_split(source, "train")), source, ["train", "test"])
    emb.save(tmp_path / "e.npz")
    back = Embeddings.load(tmp_path / "e.npz")
    assert set(back.metadata) == {"path", "patient"}
    test = back.split == "test"
    assert all(p.startswith("c") for p in back.metadata["path"][test])


@pytest.mark.parametrize("edit, pattern", [
    (lambda a: a.update(labels=a["labels"][:-1]), "labels has"),
    (lambda a: a.update(labels=a["labels"] + 100), "labels outside"),
    (lambda a: a.update(features=a["features"][:, :, None]), "features of shape"),
    (lambda a: a.update(embedder=np.asarray('{"kind": "magic"}')), "damaged|not one"),
    (lambda a: a.update(ids=np.zeros_like(a["ids"])), "repeated ids"),
    (lambda a: a.update(labels=a["labels"].astype(float)), "must be integers"),
    (lambda a: a.pop("split"), "lacks"),
])
def test_hand_edited_embeddings_are_refused(tiny_embeddings, tmp_path, edit, pattern):
    arrays = dict(np.load(tiny_embeddings))
    edit(arrays)
    np.savez(tmp_path / "edited.npz", **arrays)
    with pytest.raises(UserError, match=pattern):
        Embeddings.load(tmp_path / "edited.npz")


def test_a_checkpoint_embeds_a_lab_s_own_classes(tiny_run, tmp_path):
    """Transfer: a backbone pretrained on 4 classes embeds labelled data of 3 other classes."""
    from tests.helpers import make_npz

    run, _ = tiny_run
    other = make_npz(tmp_path / "other.npz", classes=3, class_names=("blast", "lymph", "eos"))
    emb = embed_checkpoint(run / "checkpoint.pt", resolve_source(npz=str(other)))
    assert emb.class_names == ("blast", "lymph", "eos") and set(emb.labels.tolist()) == {0, 1, 2}
    assert np.isfinite(emb.features).all() and emb.embedder.source["path"] == str(other)


def test_bad_embeddings_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        Embeddings.load(tmp_path / "none.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(UserError, match="not an ssl-blood embeddings file"):
        Embeddings.load(tmp_path / "other.npz")
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(UserError, match="truncated"):
        Embeddings.load(tmp_path / "cut.npz")
