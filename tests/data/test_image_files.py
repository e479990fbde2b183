"""Your own cells: image folders in three layouts, CSV manifests, any size, the decode cache,
16-bit TIFFs, and every bad input."""

import os

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from ssl_blood.data import decode as folders
from ssl_blood.data import available_splits, load_split, resolve_source
from ssl_blood.errors import UserError
from ssl_blood.data.catalogue import stratified_split
from ssl_blood.data.decode import read_cell_image
from tests.helpers import (bloodmnist_folder, bloodmnist_manifest, bloodmnist_subset,
                           class_names_of_bloodmnist, write_png)

PER_SPLIT = {"train": 48, "val": 16, "test": 24}


@pytest.fixture(scope="module")
def subset(data_root):
    return bloodmnist_subset(data_root, PER_SPLIT)


def by_name(data):
    """{file name: (label, image bytes)} of a split loaded from files."""
    return {os.path.basename(p): (int(l), img.numpy().tobytes())
            for p, l, img in zip(data.metadata["path"], data.labels, data.images)}


def test_split_folders_match_the_npz(subset, tmp_path, data_root):
    root = bloodmnist_folder(tmp_path / "cells", subset, "splits")
    source = resolve_source(image_dir=str(root), size=28)
    npz = resolve_source(str(data_root))
    assert available_splits(source) == ("train", "val", "test")
    names = class_names_of_bloodmnist()
    for split, (images, labels, ids) in subset.items():
        data = load_split(source, split)
        assert data.class_names == names  # sorted folder names, which are medmnist's names
        files = by_name(data)
        full = load_split(npz, split)
        for i, label in zip(ids, labels):
            got_label, got_bytes = files[f"{i:05d}.png"]
            assert got_label == label
            assert got_bytes == full.images[i].numpy().tobytes()  # pixel-identical at 28 px


def test_same_images_give_the_same_features(subset, tmp_path, data_root, tiny_run):
    from ssl_blood.features.embeddings import Embedder

    root = bloodmnist_folder(tmp_path / "cells", {"test": subset["test"]}, "splits")
    folder_test = load_split(resolve_source(image_dir=str(root), size=28), "test")
    npz_test = load_split(resolve_source(str(data_root)), "test")
    ids = [int(os.path.basename(p)[:5]) for p in folder_test.metadata["path"]]
    embedder = Embedder.baseline("random-init", load_split(resolve_source(str(data_root)), "train", 500),
                                 "cnn6", device="cpu")
    assert np.allclose(embedder(folder_test.images), embedder(npz_test.images[ids]), atol=1e-6)


def test_class_folders_split_stratified_seeded_and_recorded(subset, tmp_path):
    root = bloodmnist_folder(tmp_path / "pool", subset, "classes")
    source = resolve_source(image_dir=str(root), size=28, split_fractions=(0.6, 0.2, 0.2), split_seed=3)
    parts = {s: load_split(source, s) for s in ("train", "val", "test")}
    total = sum(len(p) for p in parts.values())
    assert total == sum(PER_SPLIT.values())
    assert abs(len(parts["val"]) / total - 0.2) < 0.05 and abs(len(parts["test"]) / total - 0.2) < 0.05
    for name in class_names_of_bloodmnist():  # every class in every split (stratified)
        c = parts["train"].class_names.index(name)
        assert all((p.labels == c).any() for p in parts.values())
    again = {s: set(load_split(source, s).metadata["path"]) for s in parts}  # same split every time
    assert again == {s: set(p.metadata["path"]) for s, p in parts.items()}
    other = resolve_source(image_dir=str(root), size=28, split_fractions=(0.6, 0.2, 0.2), split_seed=4)
    assert set(load_split(other, "test").metadata["path"]) != again["test"]
    assert resolve_source(image_dir=str(root), size=28).split_fractions == (0.7, 0.1, 0.2)


def test_stratified_split_keeps_a_training_image_per_class():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 1 + [-1] * 5)
    splits = stratified_split(labels, (0.5, 0.25, 0.25), seed=0)
    for c in (0, 1, 2):
        assert (splits[labels == c] == "train").any()
    assert (splits[labels == -1] == "train").all()


def test_unlabeled_folder_joins_train_with_label_minus_one(subset, tmp_path):
    root = bloodmnist_folder(tmp_path / "cells", subset, "splits")
    images = subset["train"][0][:5]
    for i, image in enumerate(images):
        write_png(root / "train" / "unlabeled" / f"u{i}.png", image)
    train = load_split(resolve_source(image_dir=str(root), size=28), "train")
    assert int((train.labels == -1).sum()) == 5 and len(train) == PER_SPLIT["train"] + 5
    assert "unlabeled" not in train.class_names and train.has_labels and not train.is_labeled
    assert len(train.labelled()) == PER_SPLIT["train"]


def test_flat_bloodmnist_folder_is_one_unlabelled_train_split(subset, tmp_path):
    root = bloodmnist_folder(tmp_path / "flat", subset, "flat")
    source = resolve_source(image_dir=str(root), size=28)
    assert available_splits(source) == ("train",)
    data = load_split(source, "train")
    assert len(data) == sum(PER_SPLIT.values()) and not data.has_labels and data.class_names == ()


def test_flat_folder_is_unlabelled_train(loose_folder, capsys):
    cells = load_split(resolve_source(image_dir=str(loose_folder), size=20), "train")
    assert cells.images.shape == (9, 3, 20, 20) and cells.images.dtype == torch.uint8
    assert (cells.labels == -1).all() and not cells.has_labels
    assert "skipped 1 unreadable image(s) of 10" in capsys.readouterr().err
    assert available_splits(cells.source) == ("train",)
    with pytest.raises(UserError, match="no 'test' split"):
        load_split(cells.source, "test")


def test_folder_at_64_px_any_size_and_default_size(subset, tmp_path):
    root = bloodmnist_folder(tmp_path / "big", {"train": subset["train"]}, "splits", size=64)
    assert load_split(resolve_source(image_dir=str(root)), "train").image_size == 64  # own size
    assert load_split(resolve_source(image_dir=str(root), size=37), "train").image_size == 37
    assert resolve_source(image_dir=str(bloodmnist_folder(tmp_path / "small", {"train": subset["train"]},
                                                          "splits"))).size == 28


def test_manifest_with_splits_and_metadata(subset, tmp_path):
    csv_path = bloodmnist_manifest(tmp_path / "export", subset)
    source = resolve_source(manifest=str(csv_path), size=28)
    test = load_split(source, "test")
    assert len(test) == PER_SPLIT["test"] and set(test.metadata) == {"path", "patient"}
    names = class_names_of_bloodmnist()
    for path, label, patient in zip(test.metadata["path"], test.labels, test.metadata["patient"]):
        i = int(path[-9:-4])
        assert names[label] == names[subset["test"][1][list(subset["test"][2]).index(i)]]
        assert patient == f"P{i % 7}"


def test_manifest_without_split_or_some_labels(subset, tmp_path):
    csv_path = bloodmnist_manifest(tmp_path / "export", subset, extra=False)
    lines = csv_path.read_text().splitlines()
    rows = [l.rsplit(",", 1)[0] for l in lines]  # drop the split column
    rows = [rows[0]] + [r if i % 3 else r.split(",")[0] + "," for i, r in enumerate(rows[1:])]
    csv_path.write_text("\n".join(rows) + "\n")
    source = resolve_source(manifest=str(csv_path), size=28)
    train = load_split(source, "train")
    total = sum(len(load_split(source, s)) for s in ("train", "val", "test"))
    assert total == sum(PER_SPLIT.values())
    unlabelled = int((train.labels == -1).sum())
    assert unlabelled == len(range(0, len(lines) - 1, 3))  # every third row had no label: train


def test_decode_cache_is_used_and_invalidated(subset, tmp_path, monkeypatch):
    root = bloodmnist_folder(tmp_path / "cells", {"train": subset["train"]}, "splits")
    def source():  # a new source each time: one source object decodes once and keeps it
        return resolve_source(image_dir=str(root), size=28, cache_dir=str(tmp_path / "cache"))

    first = load_split(source(), "train")
    assert first.image_file is not None and first.image_file.parent == tmp_path / "cache"
    real = folders.read_cell_image
    monkeypatch.setattr(folders, "read_cell_image", lambda *a: pytest.fail("decoded again"))
    second = load_split(source(), "train")
    assert torch.equal(first.images, second.images)
    changed = sorted(root.rglob("*.png"))[0]
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))  # a different modification time
    monkeypatch.setattr(folders, "read_cell_image", real)
    third = load_split(source(), "train")
    assert third.image_file != first.image_file
    row = list(third.metadata["path"]).index(os.path.relpath(changed, root))
    assert third.images[row].sum() == 0


def test_memory_mapped_rows_line_up_with_the_cache_file(subset, tmp_path):
    root = bloodmnist_folder(tmp_path / "cells", subset, "splits")
    val = load_split(resolve_source(image_dir=str(root), size=28, cache_dir=str(tmp_path / "c")), "val")
    whole = np.load(val.image_file)
    assert np.array_equal(whole[val.row_offset:val.row_offset + len(val)], val.images.numpy())


def test_unwritable_cache_falls_back_with_a_warning(subset, tmp_path, capsys):
    root = bloodmnist_folder(tmp_path / "cells", {"train": subset["train"]}, "splits")
    (tmp_path / "not-a-folder").write_text("x")
    data = load_split(resolve_source(image_dir=str(root), size=28,
                                     cache_dir=str(tmp_path / "not-a-folder" / "c")), "train")
    assert len(data) == PER_SPLIT["train"] and data.image_file is None
    assert "not writable" in capsys.readouterr().err


def test_16_bit_tiff_is_scaled_by_bit_depth(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    tifffile.imwrite(tmp_path / "gray16.tif", ramp)
    tifffile.imwrite(tmp_path / "rgb16.tif", np.stack([ramp, ramp // 2, ramp // 4], -1))
    gray = read_cell_image(tmp_path / "gray16.tif", 32)
    assert gray.shape == (3, 32, 32) and gray.max() == 255 and gray.min() == 0
    assert 0.45 < (gray[0] > 127).mean() < 0.55  # a ramp, not clipped to white
    rgb = read_cell_image(tmp_path / "rgb16.tif", 32)
    assert abs(int(rgb[1].max()) - 128) <= 1 and abs(int(rgb[2].max()) - 64) <= 1
    twelve_bit = (ramp // 16).astype(np.uint16)  # a 12-bit camera in a 16-bit file: kept dark
    tifffile.imwrite(tmp_path / "twelve.tif", twelve_bit)
    assert read_cell_image(tmp_path / "twelve.tif", 32).max() == 16
    Image.fromarray(ramp).save(tmp_path / "gray16.png")  # 16-bit PNG through PIL
    assert abs(int(read_cell_image(tmp_path / "gray16.png", 32).max()) - 255) <= 1


def test_read_cell_image_converts_modes(tmp_path):
    Image.new("RGBA", (60, 40), (255, 0, 0, 128)).save(tmp_path / "a.png")
    array = read_cell_image(tmp_path / "a.png", 28)
    assert array.shape == (3, 28, 28) and array[0].min() == 255 and array[1].max() == 0
    Image.new("L", (30, 30), 90).save(tmp_path / "g.bmp")
    assert (read_cell_image(tmp_path / "g.bmp", 16) == 90).all()


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("damage, pattern", [
    ("loose", r"holds both 1 image\(s\) and 3 sub-folder\(s\)"),
    ("loose_in_train", r"loose image\(s\).*beside its class folders"),
    ("test_only_class", r"class 'blast' exists in .*test but not in .*train"),
    ("empty_class", r"class folder .*holds no images"),
    ("unlabeled_in_test", r"unlabelled images belong in"),
])
def test_bad_folders(subset, tmp_path, damage, pattern):
    root = bloodmnist_folder(tmp_path / "cells", subset, "splits")
    image = subset["train"][0][0]
    if damage == "loose":
        write_png(root / "stray.png", image)
    elif damage == "loose_in_train":
        write_png(root / "train" / "stray.png", image)
    elif damage == "test_only_class":
        write_png(root / "test" / "blast" / "b.png", image)
    elif damage == "empty_class":
        (root / "train" / "empty class").mkdir()
    else:
        write_png(root / "test" / "unlabeled" / "u.png", image)
    with pytest.raises(UserError, match=pattern):
        load_split(resolve_source(image_dir=str(root), size=28), "train")


def test_layout_flat_overrides_detection(subset, tmp_path):
    root = bloodmnist_folder(tmp_path / "cells", {"train": subset["train"]}, "splits")
    write_png(root / "stray.png", subset["train"][0][0])
    data = load_split(resolve_source(image_dir=str(root), size=28, layout="flat"), "train")
    assert len(data) == PER_SPLIT["train"] + 1 and not data.has_labels


def test_corrupt_image_in_a_class_folder_is_skipped_and_counted(subset, tmp_path, capsys):
    root = bloodmnist_folder(tmp_path / "cells", {"train": subset["train"]}, "splits")
    (root / "train" / "basophil" / "zz-broken.png").write_bytes(b"garbage")
    data = load_split(resolve_source(image_dir=str(root), size=28), "train")
    assert len(data) == PER_SPLIT["train"]
    assert f"skipped 1 unreadable image(s) of {PER_SPLIT['train'] + 1}" in capsys.readouterr().err


@pytest.mark.parametrize("edit, pattern", [
    (lambda rows: rows + ["img/missing1.png,basophil,train", "img/missing2.png,basophil,train"],
     r"2 of \d+ files named in .* do not exist \(first: img/missing1.png, img/missing2.png\)"),
    (lambda rows: rows + [rows[1]], r"is listed twice"),
    (lambda rows: [rows[0]] + [r.replace(",train", ",training") for r in rows[1:]], r"unknown split name 'training'"),
    (lambda rows: [rows[0]] + [r.replace(",train", ",test") for r in rows[1:]], r"assigns no row to 'train'"),
    (lambda rows: ["file,label,split"] + rows[1:], r"no 'path' column"),
    (lambda rows: rows + [",basophil,train"], r"empty path"),
    (lambda rows: rows + ["basophil"], r"line \d+ has 1 cells but the header has 3 columns"),
    (lambda rows: rows[:2] + ["img/x.png,basophil,train,extra"] + rows[2:], r"line 3 has 4 cells"),
    (lambda rows: rows[:1], r"has a header but no rows"),
])
def test_bad_manifests(subset, tmp_path, edit, pattern):
    csv_path = bloodmnist_manifest(tmp_path / "export", subset, extra=False)
    csv_path.write_text("\n".join(edit(csv_path.read_text().splitlines())) + "\n")
    with pytest.raises(UserError, match=pattern):
        load_split(resolve_source(manifest=str(csv_path), size=28), "train")


def test_skip_missing_goes_on(subset, tmp_path, capsys):
    csv_path = bloodmnist_manifest(tmp_path / "export", subset, extra=False)
    csv_path.write_text(csv_path.read_text() + "img/missing.png,basophil,train\n")
    data = load_split(resolve_source(manifest=str(csv_path), size=28, skip_missing=True), "train")
    assert len(data) == PER_SPLIT["train"] and "1 of" in capsys.readouterr().err


def test_bad_split_fractions(tmp_path):
    for bad in ((0.5, 0.5), (0.7, 0.2, 0.2), (0.0, 0.5, 0.5), (0.8, -0.1, 0.3)):
        with pytest.raises(UserError, match="split_fractions"):
            resolve_source(image_dir=str(tmp_path), size=28, split_fractions=bad)


def test_an_image_too_large_for_pil_is_skipped_when_sizing_and_decoding(subset, tmp_path, monkeypatch, capsys):
    """A decompression bomb (PIL refuses images beyond 2 x MAX_IMAGE_PIXELS; here the limit is
    lowered so a 200-px image counts) neither crashes size detection nor decoding."""
    from PIL import Image as PILImage

    root = bloodmnist_folder(tmp_path / "cells", {"train": subset["train"]}, "splits")
    write_png(root / "train" / "basophil" / "zz-huge.png", np.zeros((200, 200, 3), np.uint8))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)
    source = resolve_source(image_dir=str(root), cache_dir="")
    assert source.size == 28
    data = load_split(source, "train")
    assert len(data) == PER_SPLIT["train"]
    assert "zz-huge.png" in capsys.readouterr().err


def test_cache_notices_content_changed_behind_the_same_size_and_mtime(tmp_path):
    """`cp -p` / `rsync -a` / unzip of fixed-size BMPs: same byte size, same mtime, new pixels.
    The cache key includes the inode change time, which every such rewrite updates."""
    root = tmp_path / "cells" / "blast"
    root.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 10 * i, np.uint8)).save(root / f"{i}.bmp")
    target = root / "0.bmp"
    before = target.stat()

    def load():
        source = resolve_source(image_dir=str(tmp_path / "cells"), size=20, layout="classes",
                                split_fractions=(1.0, 0.0, 0.0), cache_dir=str(tmp_path / "cache"))
        data = load_split(source, "train")
        return data.images[list(data.metadata["path"]).index("blast/0.bmp")]

    assert int(load().max()) == 0
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(target)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    assert int(load().min()) == 200


def test_a_cache_entry_of_the_wrong_image_size_is_decoded_again(subset, tmp_path):
    root = bloodmnist_folder(tmp_path / "cells", {"train": subset["train"]}, "splits")

    def source():
        return resolve_source(image_dir=str(root), size=28, cache_dir=str(tmp_path / "cache"))

    first = load_split(source(), "train")
    expected, cache_file = first.images.clone(), first.image_file
    del first  # its images are mapped from the file about to be replaced
    np.save(cache_file, np.zeros((len(expected), 3, 16, 16), np.uint8))  # right count, wrong size
    again = load_split(source(), "train")
    assert again.images.shape[-1] == 28 and torch.equal(again.images, expected)


def test_pretraining_on_a_folder_notes_unreadable_images_once_and_keeps_their_list(subset, tmp_path, capsys):
    from ssl_blood.cli import main

    root = bloodmnist_folder(tmp_path / "cells", subset, "splits")
    for i in range(7):
        (root / "train" / "basophil" / f"broken-{i}.png").write_bytes(b"not a png")
    capsys.readouterr()
    assert main(["pretrain", "--image-dir", str(root), "--size", "28", "--backbone", "cnn6",
                 "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--cache-dir", "",
                 "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err.count("unreadable image") == 1, err
    note = next(line for line in err.splitlines() if "unreadable image" in line)
    assert "skipped 7 unreadable image(s)" in note and note.count("broken-") == 5
    listed = (tmp_path / "run" / "unreadable_images.txt").read_text().splitlines()
    assert sorted(os.path.basename(p) for p in listed) == [f"broken-{i}.png" for i in range(7)]
