"""A folder of cell images in one of three layouts (`layout="auto"` tries them in this order):

  splits   DIR/{train,val,test}/<class>/...   labelled splits, one ImageFolder per split
  classes  DIR/<class>/...                    one labelled pool, split by a seeded stratified
                                              split (`split_fractions`, `split_seed`)
  flat     images anywhere under DIR          unlabelled, all in train

A folder named `unlabeled` (or `unlabelled`) beside the class folders adds its images to train
with label -1: they serve pretraining and are skipped by every labelled evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_blood.data.catalogue import Catalogue, stratified_split
from ssl_blood.data.cells import SPLITS
from ssl_blood.data.decode import IMAGE_SUFFIXES, is_image_file
from ssl_blood.data.sources import FileSource, register
from ssl_blood.errors import UserError

UNLABELED = ("unlabeled", "unlabelled")


@register
@dataclass(frozen=True)
class ImageDirSource(FileSource):
    """Cells as image files in a folder (`path`)."""

    kind = "image-dir"
    param = "image_dir"
    metavar = "DIR"
    help = ("folder of cell images: DIR/{train,val,test}/CLASS/..., DIR/CLASS/..., or loose images "
            "(unlabelled); an 'unlabeled' folder beside class folders adds unlabelled training images")
    rank = 2

    @property
    def name(self) -> str:
        return Path(self.path).name

    def list_files(self) -> Catalogue:
        root = Path(self.path)
        if not root.is_dir():
            raise UserError(f"`image_dir` {root}: no such folder; give a folder of cell images",
                            param="image_dir")
        layout = detect_layout(root) if self.layout == "auto" else self.layout
        if layout == "flat":
            return _flat_catalogue(root)
        if layout == "splits":
            return _splits_catalogue(root)
        return _classes_catalogue(root, self.split_fractions, self.split_seed)


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def _top_level(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, sub-folders) directly inside `folder`, hidden entries ignored."""
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    return [p for p in entries if is_image_file(p)], [p for p in entries if p.is_dir()]


def detect_layout(root: Path) -> str:
    """Which of the three layouts `root` has (see the module docstring)."""
    images, folders = _top_level(root)
    names = {f.name for f in folders}
    if folders and images:
        raise UserError(
            f"`image_dir` {root} holds both {len(images)} image(s) and {len(folders)} sub-folder(s) "
            f"at its top level; move the loose images into a class folder or into "
            f"{root / 'unlabeled'}, or use `layout` 'flat' to treat every image as unlabelled",
            param="image_dir")
    if "train" in names and names <= set(SPLITS):
        return "splits"
    return "classes" if folders else "flat"


def _flat_catalogue(root: Path) -> Catalogue:
    paths = _images_under(root)
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}; point "
                        f"`image_dir` at a folder of cell crops", param="image_dir")
    return Catalogue([str(p) for p in paths], np.full(len(paths), -1, dtype=np.int64),
                     np.full(len(paths), "train"), (), "flat")


def _class_folders(folder: Path, where: str) -> tuple[dict[str, list[Path]], list[Path]]:
    """Class name -> images of each class folder, and the images of an `unlabeled` folder."""
    loose, subfolders = _top_level(folder)
    if loose:
        raise UserError(f"{folder} holds {len(loose)} loose image(s) (e.g. {loose[0].name}) beside "
                        f"its class folders; move them into a class folder or into "
                        f"{folder / 'unlabeled'}", param="image_dir")
    classes, unlabeled = {}, []
    for sub in subfolders:
        files = _images_under(sub)
        if sub.name.lower() in UNLABELED:
            unlabeled += files
            continue
        if not files:
            raise UserError(f"class folder {sub} ({where}) holds no images "
                            f"({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder",
                            param="image_dir")
        classes[sub.name] = files
    return classes, unlabeled


def _classes_catalogue(root: Path, fractions, seed: int) -> Catalogue:
    classes, unlabeled = _class_folders(root, "labelled pool")
    if not classes:
        raise UserError(f"{root} has no class folders with images; see the layouts in "
                        f"docs/user-guide.md", param="image_dir")
    names = tuple(sorted(classes))
    paths = [p for name in names for p in classes[name]] + unlabeled
    labels = np.array([i for i, name in enumerate(names) for _ in classes[name]]
                      + [-1] * len(unlabeled), dtype=np.int64)
    splits = stratified_split(labels, fractions, seed)
    return Catalogue([str(p) for p in paths], labels, splits, names, "classes").ordered_by_split()


def _splits_catalogue(root: Path) -> Catalogue:
    per_split = {split: _class_folders(root / split, split)
                 for split in SPLITS if (root / split).is_dir()}
    train_classes = set(per_split["train"][0])
    for split, (classes, unlabeled) in per_split.items():
        extra = sorted(set(classes) - train_classes)
        if extra:
            raise UserError(f"class '{extra[0]}' exists in {root / split} but not in "
                            f"{root / 'train'}; every class needs training images (add them or "
                            f"remove the folder)", param="image_dir")
        if unlabeled and split != "train":
            raise UserError(f"{root / split} has an unlabeled folder; unlabelled images belong "
                            f"in {root / 'train' / 'unlabeled'}", param="image_dir")
    names = tuple(sorted(train_classes))
    if not names:
        raise UserError(f"{root / 'train'} has no class folders; see the layouts in "
                        f"docs/user-guide.md", param="image_dir")
    paths, labels, splits = [], [], []
    for split, (classes, unlabeled) in per_split.items():
        for c, name in enumerate(names):
            files = classes.get(name, [])
            paths += files
            labels += [c] * len(files)
            splits += [split] * len(files)
        paths += unlabeled
        labels += [-1] * len(unlabeled)
        splits += [split] * len(unlabeled)
    return Catalogue([str(p) for p in paths], np.array(labels, dtype=np.int64), np.array(splits),
                     names, "splits")
