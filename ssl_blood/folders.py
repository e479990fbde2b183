"""Cell images from files: image folders (three layouts) and CSV manifests.

A folder or manifest first becomes a `Catalogue` (one row per image: path, label or -1, split,
metadata), cheap to rebuild because it only lists and stats files. The images are then decoded
once, in parallel, to uint8 (N, 3, size, size) and kept in a memory-mappable `.npy` under the
cache folder, keyed by the file list, sizes, modification times and the image size; a second
command on the same data maps that file and starts in seconds. The catalogue is ordered by
split, so each split is one contiguous slice of the cache (no copy, even for millions of cells).

Folder layouts (`layout="auto"` tries them in this order):
  splits   DIR/{train,val,test}/<class>/...   labelled splits, one ImageFolder per split
  classes  DIR/<class>/...                    one labelled pool, split by a seeded stratified
                                              split (`split_fractions`, `split_seed`)
  flat     images anywhere under DIR          unlabelled, all in train
A folder named `unlabeled` (or `unlabelled`) beside the class folders adds its images to train
with label -1: they serve pretraining and are skipped by every labelled evaluation.

Pixel values: 8-bit images as they are; 16-bit (and other integer) images are scaled by their
bit depth (value * 255 / 65535 for 16 bit), so relative stain intensities between images are
kept; floating-point images are scaled by their own range (values in [0, 1] by 255).
Grayscale images are repeated to three channels, alpha is dropped, non-square images are
centre-cropped to a square and resized with antialiasing.
"""

from __future__ import annotations

import concurrent.futures as futures
import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ssl_blood import ui
from ssl_blood.errors import UserError
from ssl_blood.runs import atomic_path, sha256_bytes, write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
SPLITS = ("train", "val", "test")
UNLABELED = ("unlabeled", "unlabelled")
LAYOUTS = ("auto", "splits", "classes", "flat")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)
CACHE_FORMAT = 1
ENV_CACHE_DIR = "SSL_BLOOD_CACHE_DIR"


@dataclass
class Catalogue:
    """Every image of a source: absolute path, label (-1 unknown), split; ordered by split."""

    paths: list[str]
    labels: np.ndarray
    splits: np.ndarray
    class_names: tuple[str, ...]
    layout: str
    metadata: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def ordered_by_split(self) -> "Catalogue":
        order = np.argsort([SPLITS.index(s) for s in self.splits], kind="stable")
        return Catalogue([self.paths[i] for i in order], self.labels[order], self.splits[order],
                         self.class_names, self.layout,
                         {k: [v[i] for i in order] for k, v in self.metadata.items()})

    def subset(self, keep: np.ndarray) -> "Catalogue":
        rows = np.flatnonzero(keep)
        return Catalogue([self.paths[i] for i in rows], self.labels[rows], self.splits[rows],
                         self.class_names, self.layout,
                         {k: [v[i] for i in rows] for k, v in self.metadata.items()})


# ----------------------------------------------------------------------------- folders


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p))


def _top_level(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, sub-folders) directly inside `folder`, hidden entries ignored."""
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    return [p for p in entries if _is_image(p)], [p for p in entries if p.is_dir()]


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


def folder_catalogue(root: str | Path, layout: str = "auto",
                     fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0) -> Catalogue:
    """List an image folder (see the module docstring for the layouts)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"`image_dir` {root}: no such folder; give a folder of cell images",
                        param="image_dir")
    if layout not in LAYOUTS:
        raise UserError(f"`layout` '{layout}' is not one of {', '.join(LAYOUTS)}", param="layout")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "flat":
        paths = _images_under(root)
        if not paths:
            raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}; point "
                            f"`image_dir` at a folder of cell crops", param="image_dir")
        return Catalogue([str(p) for p in paths], np.full(len(paths), -1, dtype=np.int64),
                         np.full(len(paths), "train"), (), layout)
    if layout == "splits":
        return _splits_catalogue(root)
    classes, unlabeled = _class_folders(root, "labelled pool")
    if not classes:
        raise UserError(f"{root} has no class folders with images; see the layouts in "
                        f"docs/user-guide.md", param="image_dir")
    names = tuple(sorted(classes))
    paths = [p for name in names for p in classes[name]] + unlabeled
    labels = np.array([i for i, name in enumerate(names) for _ in classes[name]]
                      + [-1] * len(unlabeled), dtype=np.int64)
    splits = stratified_split(labels, fractions, seed)
    return Catalogue([str(p) for p in paths], labels, splits, names, layout).ordered_by_split()


def _splits_catalogue(root: Path) -> Catalogue:
    per_split = {}
    for split in SPLITS:
        if (root / split).is_dir():
            per_split[split] = _class_folders(root / split, split)
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


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if (len(values) != 3 or any(not np.isfinite(f) or f < 0 for f in values)
            or abs(sum(values) - 1) > 1e-6 or values[0] <= 0):
        raise UserError(f"`split_fractions` {','.join(map(str, fractions))} must be three "
                        f"non-negative numbers train,val,test summing to 1 with train > 0, e.g. "
                        f"0.7,0.1,0.2", param="split_fractions")
    return values  # type: ignore[return-value]


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
    """Split names per item: within each class a seeded shuffle, then val and test take
    round(fraction * n) items (train keeps at least one); unlabelled items go to train."""
    _, f_val, f_test = check_fractions(fractions)
    splits = np.full(len(labels), "train", dtype="<U5")
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        members = members[np.random.default_rng([seed, int(c)]).permutation(len(members))]
        n = len(members)
        n_test = min(int(round(f_test * n)), n - 1)
        n_val = min(int(round(f_val * n)), n - 1 - n_test)
        splits[members[:n_val]] = "val"
        splits[members[n_val:n_val + n_test]] = "test"
    return splits


# ----------------------------------------------------------------------------- manifests


def manifest_catalogue(csv_path: str | Path, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                       seed: int = 0, skip_missing: bool = False) -> Catalogue:
    """A CSV with a `path` column (relative to the CSV's folder, or absolute), optional `label`
    (class name; empty = unlabelled) and `split` (train/val/test); other columns are kept as
    per-cell metadata. Without a split column, labelled rows are split as a class folder is."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"`manifest` {csv_path}: no such file; give a CSV with a 'path' column",
                        param="manifest")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read `manifest` {csv_path} as CSV ({exc}); save it as UTF-8 CSV",
                        param="manifest") from None
    columns = list(rows[0]) if rows else []
    if "path" not in columns:
        raise UserError(f"`manifest` {csv_path} has no 'path' column (it has "
                        f"{', '.join(columns) or 'no rows'}); name the image column 'path'",
                        param="manifest")
    base = csv_path.resolve().parent
    paths = [str((base / r["path"].strip()).resolve()) for r in rows]
    _check_manifest_paths(csv_path, [r["path"].strip() for r in rows], paths)
    present = np.array([Path(p).is_file() for p in paths])
    if not present.all():
        missing = [rows[i]["path"] for i in np.flatnonzero(~present)]
        message = (f"{len(missing)} of {len(rows)} files named in {csv_path} do not exist "
                   f"(first: {', '.join(missing[:3])})")
        if not skip_missing:
            raise UserError(f"{message}; fix the paths or pass `skip_missing` to go on without "
                            f"them", param="manifest")
        ui.note(f"{message}; skipped")
    names_col = [(r.get("label") or "").strip() for r in rows]
    class_names = tuple(sorted({n for n in names_col if n}))
    labels = np.array([class_names.index(n) if n else -1 for n in names_col], dtype=np.int64)
    splits = _manifest_splits(csv_path, rows, labels, fractions, seed)
    extra = [c for c in columns if c not in ("path", "label", "split")]
    metadata = {c: [(r.get(c) or "").strip() for r in rows] for c in extra}
    catalogue = Catalogue(paths, labels, splits, class_names, "manifest", metadata)
    return catalogue.subset(present).ordered_by_split()


def _check_manifest_paths(csv_path: Path, given: list[str], resolved: list[str]) -> None:
    if not given:
        raise UserError(f"`manifest` {csv_path} has no rows; list one image per row",
                        param="manifest")
    empty = [i + 2 for i, g in enumerate(given) if not g]
    if empty:
        raise UserError(f"`manifest` {csv_path}: row {empty[0]} has an empty path ({len(empty)} "
                        f"such rows); fill or delete them", param="manifest")
    seen: dict[str, int] = {}
    for i, p in enumerate(resolved):
        if p in seen:
            raise UserError(f"`manifest` {csv_path}: '{given[i]}' is listed twice (rows "
                            f"{seen[p] + 2} and {i + 2}); each image may appear once",
                            param="manifest")
        seen[p] = i


def _manifest_splits(csv_path: Path, rows: list[dict], labels: np.ndarray,
                     fractions: Sequence[float], seed: int) -> np.ndarray:
    if not rows or "split" not in rows[0]:
        return stratified_split(labels, fractions, seed)
    given = np.array([(r.get("split") or "").strip().lower() for r in rows])
    bad = sorted(set(given) - set(SPLITS))
    if bad:
        raise UserError(f"manifest {csv_path}: unknown split name '{bad[0]}' "
                        f"({int(np.isin(given, bad).sum())} rows); use train, val or test",
                        param="manifest")
    if "train" not in set(given):
        raise UserError(f"`manifest` {csv_path} assigns no row to 'train'; pretraining needs "
                        f"training images", param="manifest")
    train_classes = set(labels[(given == "train") & (labels >= 0)].tolist())
    missing = sorted(set(labels[labels >= 0].tolist()) - train_classes)
    if missing:
        raise UserError(f"`manifest` {csv_path}: class {missing[0]} has labelled rows in val/test "
                        f"but none in train; every class needs training images",
                        param="manifest")
    return given


# ----------------------------------------------------------------------------- decoding


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    """Bit-depth scaling for integers, own range for floats (see the module docstring)."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.integer):
        top = np.iinfo(array.dtype).max
        return np.clip(np.rint(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    array = np.nan_to_num(array.astype(np.float64))
    low, high = float(array.min()), float(array.max())
    if low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip(np.rint((array - low) * scale), 0, 255).astype(np.uint8)


def _to_hwc(array: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, C) or planar (C, H, W) -> (H, W, 3)."""
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] > 4:
        array = array.transpose(1, 2, 0)
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    if array.ndim == 3 and array.shape[-1] == 1:
        return np.repeat(array, 3, axis=2)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        return array[..., :3]
    raise ValueError(f"unsupported image shape {array.shape}")


def _read_pixels(path: str) -> np.ndarray:
    """The image's pixels as (H, W, 3) uint8, bit depth respected."""
    from PIL import Image

    if path.lower().endswith((".tif", ".tiff")):
        import tifffile

        try:
            return _scale_to_uint8(_to_hwc(np.asarray(tifffile.imread(path, key=0))))
        except Exception:  # not every TIFF is tifffile's (e.g. JPEG-in-TIFF): try PIL
            pass
    with Image.open(path) as img:
        if img.mode in ("RGB", "L", "RGBA", "P", "LA", "CMYK", "YCbCr", "1", "PA", "LAB", "HSV"):
            return np.asarray(img.convert("RGB"))
        return _scale_to_uint8(_to_hwc(np.asarray(img)))  # I;16*, I, F: keep the depth


def read_cell_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """One image file as a (3, size, size) uint8 array: centre-cropped square, resized."""
    from PIL import Image

    try:
        pixels = _read_pixels(str(path))
        h, w = pixels.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        img = Image.fromarray(np.ascontiguousarray(pixels[top:top + side, left:left + side]))
        if side != size:
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read `image` {path} ({exc}); give a valid png/jpg/tif/bmp file",
                        param="image") from None


def _decode_into(out: np.ndarray, paths: Sequence[str], size: int, what: str) -> np.ndarray:
    """Decode every path into `out[i]` with a thread per core (PIL and the resize release the
    GIL); returns a mask of the images that could be read."""
    ok = np.zeros(len(paths), dtype=bool)

    def one(i: int) -> None:
        try:
            out[i] = read_cell_image(paths[i], size)
            ok[i] = True
        except UserError:
            pass

    with futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for _ in ui.bar(pool.map(one, range(len(paths)), chunksize=64), total=len(paths),
                        desc=f"decoding {what}", unit="img"):
            pass
    return ok


def default_cache_dir() -> Path:
    """`$SSL_BLOOD_CACHE_DIR`, else `$XDG_CACHE_HOME/ssl-blood`, else ~/.cache/ssl-blood."""
    if os.environ.get(ENV_CACHE_DIR):
        return Path(os.environ[ENV_CACHE_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ssl-blood"


def cache_key(catalogue: Catalogue, size: int) -> str:
    """Digest of the ordered file list with each file's size and modification time."""
    stats = []
    for p in catalogue.paths:
        st = os.stat(p)
        stats.append([p, st.st_size, st.st_mtime_ns])
    return sha256_bytes(json.dumps({"format": CACHE_FORMAT, "size": size, "files": stats}).encode())


@dataclass
class DecodedImages:
    images: np.ndarray  # (N, 3, size, size) uint8, memory-mapped from `file` when cached
    readable: np.ndarray  # (len(catalogue),) bool: which catalogue rows decoded
    file: Path | None  # the cache .npy, if there is one


def decode_catalogue(catalogue: Catalogue, size: int, cache_dir: str | Path | None,
                     what: str) -> DecodedImages:
    """The catalogue's images, from the cache when it holds them, else decoded (and cached)."""
    folder = default_cache_dir() if cache_dir is None else (Path(cache_dir) if cache_dir else None)
    key = cache_key(catalogue, size)
    if folder is not None:
        cached = _load_cached(folder, key)
        if cached is not None:
            return cached
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            ui.note(f"cache folder {folder} is not writable ({exc.strerror}); decoding without "
                    f"a cache (set --cache-dir to a writable folder to start faster next time)")
            folder = None
    shape = (len(catalogue), 3, size, size)
    if folder is None:
        images = np.empty(shape, dtype=np.uint8)
        ok = _decode_into(images, catalogue.paths, size, what)
        return DecodedImages(images[ok] if not ok.all() else images, ok, None)
    return _decode_to_cache(catalogue, size, folder, key, what)


def _decode_to_cache(catalogue: Catalogue, size: int, folder: Path, key: str,
                     what: str) -> DecodedImages:
    target = folder / f"{key[:40]}.npy"
    shape = (len(catalogue), 3, size, size)
    with atomic_path(target) as tmp:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        ok = _decode_into(images, catalogue.paths, size, what)
        if not ok.all():  # unreadable files leave holes: keep only the decoded rows
            rows = np.flatnonzero(ok)
            with atomic_path(tmp) as compact_path:
                compact = np.lib.format.open_memmap(compact_path, mode="w+", dtype=np.uint8,
                                                    shape=(len(rows),) + shape[1:])
                for start in range(0, len(rows), 4096):
                    compact[start:start + 4096] = images[rows[start:start + 4096]]
                compact.flush()
                del compact
        else:
            images.flush()
        del images
    write_json({"format": CACHE_FORMAT, "key": key, "readable": ok.astype(int).tolist(),
                "size": size}, target.with_suffix(".json"))
    return _load_cached(folder, key)  # type: ignore[return-value]


def _load_cached(folder: Path, key: str) -> DecodedImages | None:
    target = folder / f"{key[:40]}.npy"
    meta_path = target.with_suffix(".json")
    if not target.is_file() or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(target, mmap_mode="c")  # copy-on-write: torch wants writable
    except (OSError, ValueError, json.JSONDecodeError):
        return None  # a damaged cache entry is decoded again
    readable = np.asarray(meta.get("readable", []), dtype=bool)
    if meta.get("key") != key or int(readable.sum()) != len(images):
        return None
    return DecodedImages(images, readable, target)
