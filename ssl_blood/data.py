"""Cell images in, `CellData` out: BloodMNIST, any MedMNIST-format .npz, image folders, manifests.

Everything downstream sees one shape of data, whatever the source: a uint8 tensor (N, C, H, W)
(in memory, or memory-mapped from the decode cache for folders and manifests), int64 labels (-1
where unknown), each image's position within its split (`ids`), the class names, and per-cell
metadata (file path, manifest columns). Commands never branch on the source kind. BloodMNIST
goes through medmnist's file layout (`bloodmnist.npz` or `bloodmnist_{64,128,224}.npz` in a root
folder) and its INFO table (class names, MD5).
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ssl_blood import ui
from ssl_blood.errors import UserError
from ssl_blood.runs import file_digest
from ssl_blood.folders import (DEFAULT_FRACTIONS, LAYOUTS, SPLITS, Catalogue, DecodedImages,
                               check_fractions, decode_catalogue, folder_catalogue,
                               manifest_catalogue)

ENV_DATA_ROOT = "SSL_BLOOD_DATA_ROOT"
BLOODMNIST_SIZES = (28, 64, 128, 224)
SIZE_RANGE = (16, 256)
SOURCE_KINDS = ("bloodmnist", "npz", "image-dir", "manifest")
DEFAULT_FOLDER_SIZE = 64  # at most; smaller images keep their own size


@dataclass(frozen=True)
class DataSource:
    """Where cell images come from; recorded in configs, checkpoints and embeddings.

    kind: "bloodmnist" (path = medmnist root folder), "npz" (a MedMNIST-format file),
    "image-dir" (a folder in one of the layouts of `ssl_blood.folders`) or "manifest" (a CSV).
    size: image side in pixels. The rest applies to folders and manifests: the layout, how an
    unsplit labelled pool is split (fractions train,val,test and seed), whether missing manifest
    files are skipped, and the decode cache folder (None: the user cache; "": no cache).
    """

    kind: str
    path: str
    size: int = 28
    layout: str = "auto"
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    split_seed: int = 0
    skip_missing: bool = False
    cache_dir: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["split_fractions"] = list(self.split_fractions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DataSource":
        try:
            return cls(kind=str(d["kind"]), path=str(d["path"]), size=int(d["size"]),
                       layout=str(d.get("layout", "auto")),
                       split_fractions=tuple(float(f) for f in d.get("split_fractions", DEFAULT_FRACTIONS)),
                       split_seed=int(d.get("split_seed", 0)),
                       skip_missing=bool(d.get("skip_missing", False)), cache_dir=d.get("cache_dir"))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"the recorded data source {d!r} is damaged ({exc}); give the data "
                            f"again (`data_root`, `npz`, `image_dir` or `manifest`)") from None

    @property
    def name(self) -> str:
        if self.kind == "bloodmnist":
            return "bloodmnist" if self.size == 28 else f"bloodmnist_{self.size}"
        return Path(self.path).stem if self.kind in ("npz", "manifest") else Path(self.path).name

    @property
    def from_files(self) -> bool:
        return self.kind in ("image-dir", "manifest")


@lru_cache(maxsize=1)
def medmnist_info():
    """medmnist's `info` module (INFO: class names, MD5s, URLs; DEFAULT_ROOT), read from
    medmnist/info.py without importing the package, whose __init__ loads its torch datasets and
    evaluator: about 1.5 s added to every command that only needs the table."""
    package = importlib.util.find_spec("medmnist")
    if package is None or package.origin is None:
        import medmnist.info as info  # an unusual install: the plain import

        return info
    spec = importlib.util.spec_from_file_location("ssl_blood._medmnist_info",
                                                  Path(package.origin).with_name("info.py"))
    info = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(info)  # type: ignore[union-attr]
    return info


def default_data_root() -> str:
    """`SSL_BLOOD_DATA_ROOT` if set, else medmnist's default root (~/.medmnist)."""
    return os.environ.get(ENV_DATA_ROOT) or medmnist_info().DEFAULT_ROOT


def resolve_source(data_root: str | None = None, npz: str | None = None,
                   image_dir: str | None = None, size: int | None = None, *,
                   manifest: str | None = None, layout: str = "auto",
                   split_fractions: Sequence[float] = DEFAULT_FRACTIONS, split_seed: int = 0,
                   skip_missing: bool = False, cache_dir: str | None = None) -> DataSource:
    """Turn the mutually exclusive data_root / npz / image_dir / manifest into a DataSource.

    For folders and manifests `size` defaults to the images' own side (median of a sample),
    at most 64 px.
    """
    if sum(x is not None for x in (data_root, npz, image_dir, manifest)) > 1:
        raise UserError("give only one of `data_root`, `npz`, `image_dir` and `manifest`", param="data_root")
    if size is not None and not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]:
        raise UserError(f"`size` {size} is outside {SIZE_RANGE[0]}-{SIZE_RANGE[1]} px; choose a "
                        f"size in that range", param="size")
    if layout not in LAYOUTS:
        raise UserError(f"`layout` '{layout}' is not one of {', '.join(LAYOUTS)}", param="layout")
    fractions = check_fractions(split_fractions)
    if npz is not None:
        return DataSource("npz", str(Path(npz).expanduser().resolve()), size or 0)
    if image_dir is not None or manifest is not None:
        kind, path = ("image-dir", image_dir) if image_dir is not None else ("manifest", manifest)
        path = str(Path(path).expanduser().resolve())
        source = DataSource(kind, path, size or 0, layout, fractions, split_seed, skip_missing,
                            cache_dir)
        if not size:
            source = DataSource(kind, path, _typical_size(_catalogue(source)), layout, fractions,
                                split_seed, skip_missing, cache_dir)
            ui.note(f"images will be {source.size} px (their typical side, at most "
                    f"{DEFAULT_FOLDER_SIZE}); pass `size` to choose another")
        return source
    size = size or 28
    if size not in BLOODMNIST_SIZES:
        raise UserError(f"`size` {size} is not a BloodMNIST size; use one of {BLOODMNIST_SIZES}",
                        param="size")
    root = data_root if data_root is not None else default_data_root()
    return DataSource("bloodmnist", str(Path(root).expanduser().resolve()), size)


def _typical_size(catalogue: Catalogue, sample: int = 64) -> int:
    """Median short side of a sample of the images (headers only), clipped to 16..64."""
    from PIL import Image

    rng = np.random.default_rng(0)
    picks = rng.choice(len(catalogue), min(sample, len(catalogue)), replace=False)
    sides = []
    for i in picks:
        try:
            with Image.open(catalogue.paths[i]) as img:
                sides.append(min(img.size))
        except (OSError, ValueError):
            continue
    side = int(np.median(sides)) if sides else DEFAULT_FOLDER_SIZE
    return int(np.clip(side, SIZE_RANGE[0], DEFAULT_FOLDER_SIZE))


@dataclass
class CellData:
    """One split of cell images, ready to move to a device.

    images: (N, C, H, W) uint8; labels: (N,) int64, -1 where unknown; ids: (N,) int64, each
    image's position within its split of the source (stable under `limit`); metadata: per-cell
    strings (file path and manifest columns for file sources). `image_file` and `row_offset`
    say where the images lie in the decode cache, for streaming.
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    split: str
    class_names: tuple[str, ...]
    source: DataSource
    metadata: dict[str, np.ndarray] = field(default_factory=dict)
    image_file: Path | None = None
    row_offset: int = 0

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
        """Every cell has a label."""
        return len(self) > 0 and bool((self.labels >= 0).all())

    @property
    def has_labels(self) -> bool:
        """At least one cell has a label."""
        return bool((self.labels >= 0).any())

    def labelled(self) -> "CellData":
        """The cells with a label (unlabelled ones serve pretraining only)."""
        return self if self.is_labeled else self.subset(np.flatnonzero(self.labels.numpy() >= 0))

    def subset(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> "CellData":
        index = np.asarray(index, dtype=np.int64)
        rows = torch.as_tensor(index)
        contiguous = len(index) > 0 and bool((np.diff(index) == 1).all())
        offset = self.row_offset + int(index[0]) if contiguous else 0
        return CellData(self.images[rows], self.labels[rows], self.ids[rows], self.split,
                        self.class_names, self.source, {k: v[index] for k, v in self.metadata.items()},
                        self.image_file if contiguous else None, offset)


# ----------------------------------------------------------------------------- loading


def load_split(source: DataSource, split: str, limit: int | None = None, seed: int = 0) -> CellData:
    """Load one split; with `limit`, a stratified subset of at most `limit` images."""
    if source.from_files:
        data = _files_split(source, split)
    else:
        data = _load_npz_split(source, split)
    if limit is not None:
        if limit < 1:
            raise UserError(f"`limit` {limit} must be a positive number of images", param="limit")
        data = data.subset(stratified_indices(data.labels.numpy(), limit, seed))
    return data


def available_splits(source: DataSource) -> tuple[str, ...]:
    """The splits a source holds, in train/val/test order."""
    if source.from_files:
        present = set(_catalogue(source).splits.tolist())
        return tuple(s for s in SPLITS if s in present)
    path, arrays = _open_npz(source)
    with arrays:
        return tuple(s for s in SPLITS if f"{s}_images" in arrays.files)


def stratified_indices(labels: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a subset of `limit` items with the class proportions of `labels`.

    Largest-remainder allocation, at least one item per class while `limit` allows; unlabeled
    data (-1) is sampled like a class.
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


def channel_stats(images: torch.Tensor, max_values: int = 1 << 27) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (unbiased) of uint8 images (N, C, H, W), in [0, 1] units. Up to
    `max_values` values (BloodMNIST's 28 million) in one float32 pass; beyond, in chunks with
    float64 sums, so a memory-mapped dataset is never loaded whole."""
    c = images.shape[1]
    if images.numel() <= max_values:
        x = images.float().div_(255).transpose(0, 1).reshape(c, -1)
        return x.mean(1).tolist(), x.std(1).clamp_min(1e-3).tolist()
    chunk = max(1, max_values // max(1, images[0].numel()))
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255).transpose(0, 1).reshape(c, -1)
        total += x.sum(1)
        squares += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = ((squares - count * mean * mean) / max(count - 1, 1)).clamp_min(0).sqrt()
    return mean.float().tolist(), std.float().clamp_min(1e-3).tolist()


# ----------------------------------------------------------------------------- folders, manifests


def _catalogue(source: DataSource) -> Catalogue:
    if source.kind == "image-dir":
        return folder_catalogue(source.path, source.layout, source.split_fractions, source.split_seed)
    return manifest_catalogue(source.path, source.split_fractions, source.split_seed,
                              source.skip_missing)


_decoded_in_memory: dict[str, DecodedImages] = {}  # uncached decodes, reused by later splits


def _decoded(source: DataSource, catalogue: Catalogue) -> DecodedImages:
    from ssl_blood.folders import cache_key

    key = cache_key(catalogue, source.size)
    if key in _decoded_in_memory:
        return _decoded_in_memory[key]
    decoded = decode_catalogue(catalogue, source.size, source.cache_dir, source.name)
    skipped = int((~decoded.readable).sum())
    if skipped:
        ui.note(f"skipped {skipped} unreadable image(s) of {len(catalogue)} in {source.path}")
    if not decoded.readable.any():
        raise UserError(f"none of the {len(catalogue)} images of {source.path} could be read; "
                        f"check that they are valid png/jpg/tif/bmp files", param=_param(source))
    if decoded.file is None:
        _decoded_in_memory.clear()
        _decoded_in_memory[key] = decoded
    return decoded


def _param(source: DataSource) -> str:
    return {"image-dir": "image_dir", "manifest": "manifest", "npz": "npz"}.get(source.kind, "data_root")


def _files_split(source: DataSource, split: str) -> CellData:
    catalogue = _catalogue(source)
    if split not in SPLITS or split not in set(catalogue.splits.tolist()):
        have = ", ".join(s for s in SPLITS if s in set(catalogue.splits.tolist()))
        raise UserError(f"{source.path} has no '{split}' split (it has {have}); see the folder "
                        f"layouts in docs/user-guide.md", param="split")
    decoded = _decoded(source, catalogue)
    kept = catalogue.subset(decoded.readable)
    rows = np.flatnonzero(kept.splits == split)
    start, stop = int(rows[0]), int(rows[-1]) + 1  # contiguous: the catalogue is split-ordered
    root = Path(source.path) if source.kind == "image-dir" else Path(source.path).parent
    paths = np.array([os.path.relpath(p, root) for p in kept.paths[start:stop]])
    metadata = {"path": paths, **{k: np.array(v[start:stop]) for k, v in kept.metadata.items()}}
    return CellData(torch.from_numpy(decoded.images[start:stop]),
                    torch.from_numpy(kept.labels[start:stop].copy()), torch.arange(stop - start),
                    split, kept.class_names, source, metadata, decoded.file, start)


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
        raise UserError(f"`npz` {path}: no such file; give the path of a MedMNIST-format .npz",
                        param="npz")
    return path


def _download_bloodmnist(source: DataSource) -> None:
    """Fetch the file through medmnist; offline, say where to put it. A root that does not
    exist is refused rather than created (a mistyped path stays a mistake, not a folder)."""
    from medmnist import BloodMNIST

    INFO = medmnist_info().INFO
    root = Path(source.path)
    if not root.is_dir():
        raise UserError(f"`data_root` {root}: no such folder; give the folder holding "
                        f"bloodmnist.npz (or create it to let medmnist download there)",
                        param="data_root")
    flag = "" if source.size == 28 else f"_{source.size}"
    path = bloodmnist_file(source)
    try:
        BloodMNIST(split="train", root=source.path, download=True, size=source.size)
    except Exception:  # medmnist wraps every failure in a bare RuntimeError
        url = INFO["bloodmnist"][f"url{flag}"]
        raise UserError(
            f"{path.name} is not in {source.path} and the download failed; download {url} "
            f"and put it there, or point `data_root` / {ENV_DATA_ROOT} at a folder that has it",
            param="data_root") from None
    if not path.exists():
        raise UserError(f"medmnist did not leave {path.name} in {source.path}; download it by hand",
                        param="data_root")


def _verify_bloodmnist_md5(path: Path, size: int) -> None:
    INFO = medmnist_info().INFO
    expected = INFO["bloodmnist"]["MD5" if size == 28 else f"MD5_{size}"]
    actual = file_digest(path, "md5")
    if actual != expected:
        raise UserError(
            f"{path} has MD5 {actual}, not medmnist's {expected} (truncated or altered); "
            f"delete it and download it again", param="data_root")


def _open_npz(source: DataSource) -> tuple[Path, "np.lib.npyio.NpzFile"]:
    path = _npz_path(source)
    try:
        return path, np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise UserError(f"cannot read {path} as .npz ({exc}); the file is truncated or not an "
                        f"npz: re-create or re-download it", param=_param(source)) from None


def _load_npz_split(source: DataSource, split: str) -> CellData:
    path, arrays = _open_npz(source)
    with arrays:
        return _split_from_arrays(source, path, arrays, split)


def _split_from_arrays(source: DataSource, path: Path, arrays, split: str) -> CellData:
    key = f"{split}_images"
    if key not in arrays.files:
        have = ", ".join(sorted(arrays.files)) or "nothing"
        raise UserError(f"{path} has no '{key}' array (it has {have}); a MedMNIST-format npz "
                        f"holds {{train,val,test}}_{{images,labels}}", param="split")
    try:
        images = arrays[key]
        labels = arrays[f"{split}_labels"] if f"{split}_labels" in arrays.files else None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise UserError(f"cannot read '{key}' from {path} ({exc}); the file is truncated: "
                        f"re-create or re-download it", param=_param(source)) from None
    images = _images_to_nchw(images, f"{path}:{key}")
    labels = _labels_to_vector(labels, len(images), f"{path}:{split}_labels")
    if source.kind == "npz" and source.size and images.shape[-1] != source.size:
        raise UserError(f"`size` {source.size} does not match {path}, whose images are "
                        f"{images.shape[-1]} px; leave `size` out or resize the file", param="size")
    names = _class_names(source, arrays, labels)
    if labels.max(initial=-1) >= len(names):
        raise UserError(f"{path}: label {labels.max()} but only {len(names)} class names",
                        param=_param(source))
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
    if not SIZE_RANGE[0] <= images.shape[-1] <= SIZE_RANGE[1]:
        raise UserError(f"{where} holds {images.shape[-1]} px images; ssl-blood works at "
                        f"{SIZE_RANGE[0]}-{SIZE_RANGE[1]} px: resize the file")
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
    INFO = medmnist_info().INFO
    flag = Path(source.path).stem.split("_")[0] if source.kind == "npz" else "bloodmnist"
    if flag in INFO:
        return tuple(name.split("(")[0].strip() for _, name in
                     sorted(INFO[flag]["label"].items(), key=lambda kv: int(kv[0])))
    if "class_names" in arrays.files:
        return tuple(str(n) for n in arrays["class_names"])
    return tuple(f"class {i}" for i in range(int(labels.max(initial=-1)) + 1))
