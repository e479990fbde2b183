"""Cell images in, `CellData` out: BloodMNIST, any MedMNIST-format .npz, or a folder of images.

Everything downstream sees one shape of data: a uint8 tensor (N, C, H, W) that can live on the
training device, int64 labels (-1 where unknown), the position of each image within its split
(`ids`), and the class names. BloodMNIST goes through medmnist's file layout (`bloodmnist.npz`
or `bloodmnist_{64,128,224}.npz` in a root folder) and its INFO table (class names, MD5).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence
import sys
import zipfile

import numpy as np
import torch
from PIL import Image

from ssl_blood.errors import UserError

ENV_DATA_ROOT = "SSL_BLOOD_DATA_ROOT"
SPLITS = ("train", "val", "test")
BLOODMNIST_SIZES = (28, 64, 128, 224)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


@dataclass(frozen=True)
class DataSource:
    """Where cell images come from; recorded in configs, checkpoints and embeddings.

    kind: "bloodmnist" (path = medmnist root folder), "npz" (path = a MedMNIST-format file)
    or "image-dir" (path = a folder searched recursively; every image is in the train split).
    size: image side in pixels (the BloodMNIST file to use, or the size folder images are
    resized to; for an .npz the size its arrays have).
    """

    kind: str
    path: str
    size: int = 28

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataSource":
        return cls(kind=d["kind"], path=d["path"], size=int(d["size"]))

    @property
    def name(self) -> str:
        if self.kind == "bloodmnist":
            return "bloodmnist" if self.size == 28 else f"bloodmnist_{self.size}"
        return Path(self.path).stem if self.kind == "npz" else Path(self.path).name


def default_data_root() -> str:
    """`SSL_BLOOD_DATA_ROOT` if set, else medmnist's default root (~/.medmnist)."""
    from medmnist.info import DEFAULT_ROOT

    return os.environ.get(ENV_DATA_ROOT) or DEFAULT_ROOT


def resolve_source(
    data_root: str | None = None,
    npz: str | None = None,
    image_dir: str | None = None,
    size: int | None = None,
) -> DataSource:
    """Turn the mutually exclusive `--data-root/--npz/--image-dir` options into a DataSource."""
    if sum(x is not None for x in (data_root, npz, image_dir)) > 1:
        raise UserError("give only one of --data-root, --npz and --image-dir")
    if npz is not None:
        return DataSource("npz", str(Path(npz).expanduser().resolve()), size or 0)
    if image_dir is not None:
        return DataSource("image-dir", str(Path(image_dir).expanduser().resolve()), size or 28)
    size = size or 28
    if size not in BLOODMNIST_SIZES:
        raise UserError(f"--size {size} is not a BloodMNIST size; use one of {BLOODMNIST_SIZES}")
    root = data_root if data_root is not None else default_data_root()
    return DataSource("bloodmnist", str(Path(root).expanduser().resolve()), size)


@dataclass
class CellData:
    """One split of cell images, ready to move to a device.

    images: (N, C, H, W) uint8; labels: (N,) int64, -1 where unknown; ids: (N,) int64, each
    image's position within its split of the source (stable under `--limit`).
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    split: str
    class_names: tuple[str, ...]
    source: DataSource

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_labeled(self) -> bool:
        return len(self) > 0 and bool((self.labels >= 0).all())

    def subset(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> "CellData":
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return CellData(self.images[index], self.labels[index], self.ids[index], self.split,
                        self.class_names, self.source)


# ----------------------------------------------------------------------------- loading


def load_split(source: DataSource, split: str, limit: int | None = None, seed: int = 0) -> CellData:
    """Load one split; with `limit`, a stratified subset of at most `limit` images."""
    if source.kind == "image-dir":
        data = _load_image_dir(source, split)
    else:
        data = _load_npz_split(source, split)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit {limit} must be a positive number of images")
        data = data.subset(stratified_indices(data.labels.numpy(), limit, seed))
    return data


def load_splits(source: DataSource, splits: Iterable[str], limit: int | None = None,
                seed: int = 0) -> dict[str, CellData]:
    """Load several splits (each subset separately with `limit`)."""
    return {split: load_split(source, split, limit, seed) for split in splits}


def available_splits(source: DataSource) -> tuple[str, ...]:
    """The splits a source holds: train/val/test for npz files, only train for image folders."""
    if source.kind == "image-dir":
        return ("train",)
    path, arrays = _open_npz(source)
    with arrays:
        return tuple(s for s in SPLITS if f"{s}_images" in arrays.files)


def stratified_indices(labels: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a subset of `limit` items with the class proportions of `labels`.

    Largest-remainder allocation, at least one item per class while `limit` allows; unlabeled
    data (-1) is sampled uniformly.
    """
    n = len(labels)
    if limit >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) == 1:
        return np.sort(rng.choice(n, size=limit, replace=False))
    quota = counts * limit / n
    take = np.floor(quota).astype(int)
    if limit >= len(classes):
        take = np.maximum(take, 1)
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    for c in order:  # hand out what flooring left over, largest remainder first
        if take.sum() >= limit:
            break
        if take[c] < counts[c]:
            take[c] += 1
    while take.sum() > limit:  # the at-least-one rule may overshoot: trim the largest class
        take[np.argmax(take)] -= 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
              for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, C, H, W), in [0, 1] units."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()


# ----------------------------------------------------------------------------- npz files


def bloodmnist_file(source: DataSource) -> Path:
    flag = "bloodmnist" if source.size == 28 else f"bloodmnist_{source.size}"
    return Path(source.path) / f"{flag}.npz"


def _npz_path(source: DataSource) -> Path:
    if source.kind == "bloodmnist":
        path = bloodmnist_file(source)
        if not path.exists():
            _download_bloodmnist(source)
        _verify_bloodmnist_md5(path, source.size)
        return path
    path = Path(source.path)
    if not path.is_file():
        raise UserError(f"--npz {path}: no such file; give the path of a MedMNIST-format .npz")
    return path


def _download_bloodmnist(source: DataSource) -> None:
    """Fetch the file through medmnist; offline, say where to put it."""
    from medmnist import BloodMNIST
    from medmnist.info import INFO

    flag = "" if source.size == 28 else f"_{source.size}"
    path = bloodmnist_file(source)
    try:
        Path(source.path).mkdir(parents=True, exist_ok=True)
        BloodMNIST(split="train", root=source.path, download=True, size=source.size)
    except Exception:  # medmnist wraps every failure in a bare RuntimeError
        url = INFO["bloodmnist"][f"url{flag}"]
        raise UserError(
            f"{path.name} is not in {source.path} and the download failed; download {url} "
            f"and put it there, or point --data-root / {ENV_DATA_ROOT} at a folder that has it"
        ) from None
    if not path.exists():
        raise UserError(f"medmnist did not leave {path.name} in {source.path}; download it by hand")


def _verify_bloodmnist_md5(path: Path, size: int) -> None:
    from medmnist.info import INFO

    expected = INFO["bloodmnist"]["MD5" if size == 28 else f"MD5_{size}"]
    stat = path.stat()
    actual = _md5(str(path), stat.st_size, stat.st_mtime_ns)
    if actual != expected:
        raise UserError(
            f"{path} has MD5 {actual}, not medmnist's {expected} (truncated or altered); "
            f"delete it and download it again"
        )


@lru_cache(maxsize=8)
def _md5(path: str, size: int, mtime_ns: int) -> str:  # size/mtime key the cache
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open_npz(source: DataSource) -> tuple[Path, "np.lib.npyio.NpzFile"]:
    path = _npz_path(source)
    try:
        return path, np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise UserError(f"cannot read {path} as .npz ({exc}); the file is truncated or not an "
                        f"npz: re-create or re-download it") from None


def _load_npz_split(source: DataSource, split: str) -> CellData:
    path, arrays = _open_npz(source)
    with arrays:
        return _split_from_arrays(source, path, arrays, split)


def _split_from_arrays(source: DataSource, path: Path, arrays, split: str) -> CellData:
    key = f"{split}_images"
    if key not in arrays.files:
        have = ", ".join(sorted(arrays.files)) or "nothing"
        raise UserError(f"{path} has no '{key}' array (it has {have}); a MedMNIST-format npz "
                        f"holds {{train,val,test}}_{{images,labels}}")
    try:
        images = arrays[key]
        labels = arrays[f"{split}_labels"] if f"{split}_labels" in arrays.files else None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise UserError(f"cannot read '{key}' from {path} ({exc}); the file is truncated: "
                        f"re-create or re-download it") from None
    images = _images_to_nchw(images, f"{path}:{key}")
    labels = _labels_to_vector(labels, len(images), f"{path}:{split}_labels")
    if source.kind == "npz" and source.size and images.shape[-1] != source.size:
        raise UserError(f"--size {source.size} does not match {path}, whose images are "
                        f"{images.shape[-1]} px; drop --size or resize the file")
    names = _class_names(source, arrays, labels)
    if labels.max(initial=-1) >= len(names):
        raise UserError(f"{path}: label {labels.max()} but only {len(names)} class names")
    return CellData(
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels),
        ids=torch.arange(len(images)),
        split=split,
        class_names=names,
        source=source,
    )


def _images_to_nchw(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise UserError(f"{where} has dtype {images.dtype}; images must be uint8 (0-255): "
                        f"convert with (x * 255).round().astype('uint8')")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise UserError(f"{where} has shape {images.shape}; expected (N, H, W) grayscale or "
                        f"(N, H, W, 3) RGB")
    if images.shape[-1] != images.shape[-2] or len(images) == 0:
        raise UserError(f"{where} has shape {images.shape}; expected a non-empty stack of "
                        f"square images")
    return images


def _labels_to_vector(labels: np.ndarray | None, n: int, where: str) -> np.ndarray:
    if labels is None:
        return np.full(n, -1, dtype=np.int64)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{where} has shape {labels.shape} and dtype {labels.dtype}; expected "
                        f"(N,) or (N, 1) integer class labels (multi-label data is not supported)")
    if len(labels) != n:
        raise UserError(f"{where} has {len(labels)} labels for {n} images; they must match")
    if labels.min(initial=0) < -1:
        raise UserError(f"{where} holds label {labels.min()}; labels are 0..C-1, or -1 for unknown")
    return labels.astype(np.int64)


def _class_names(source: DataSource, arrays, labels: np.ndarray) -> tuple[str, ...]:
    """BloodMNIST (and any medmnist-named file) from medmnist's INFO; else from the file."""
    from medmnist.info import INFO

    flag = Path(source.path).stem.split("_")[0] if source.kind == "npz" else "bloodmnist"
    if flag in INFO:
        return tuple(name.split("(")[0].strip() for _, name in
                     sorted(INFO[flag]["label"].items(), key=lambda kv: int(kv[0])))
    if "class_names" in arrays.files:
        return tuple(str(n) for n in arrays["class_names"])
    return tuple(f"class {i}" for i in range(int(labels.max(initial=-1)) + 1))


# ----------------------------------------------------------------------------- image folders


def _load_image_dir(source: DataSource, split: str) -> CellData:
    root = Path(source.path)
    if split != "train":
        raise UserError(f"an image folder has only the 'train' split, not '{split}'")
    if not root.is_dir():
        raise UserError(f"--image-dir {root}: no such folder; give a folder of cell images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}; "
                        f"point --image-dir at a folder of cell crops")
    images, skipped = [], 0
    for path in files:
        try:
            images.append(read_cell_image(path, source.size, channels=3))
        except UserError:
            skipped += 1
    if skipped:
        print(f"ssl-blood: skipped {skipped} unreadable image(s) of {len(files)} under {root}",
              file=sys.stderr)
    if not images:
        raise UserError(f"none of the {len(files)} images under {root} could be read; check "
                        f"that they are valid png/jpg/tif files")
    n = len(images)
    return CellData(torch.from_numpy(np.stack(images)), torch.full((n,), -1, dtype=torch.long),
                    torch.arange(n), "train", (), source)


def read_cell_image(path: str | os.PathLike, size: int, channels: int = 3) -> np.ndarray:
    """One image file as a (C, size, size) uint8 array.

    Grayscale, palette and RGBA images are converted (alpha dropped), a non-square image is
    centre-cropped to a square (as MedMNIST was made) and resized with antialiasing.
    """
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if channels == 3 else "L")
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side))
            img = img.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {path} ({exc}); give a valid png/jpg/tif file") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()
