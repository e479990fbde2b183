"""Image files to uint8 pixels, decoded once into a memory-mapped cache.

Pixel values: 8-bit images as they are; 16-bit (and other integer) images are scaled by their
bit depth (value * 255 / 65535 for 16 bit), so relative stain intensities between images are
kept; floating-point images are scaled by their own range (values in [0, 1] by 255).
Grayscale images are repeated to three channels, alpha is dropped, non-square images are
centre-cropped to a square and resized with antialiasing.

The cache: the images of a catalogue are decoded in parallel to uint8 (N, 3, size, size) and kept
in a memory-mappable `.npy` under the cache folder; a second command on the same files maps it
and starts in seconds. Staleness rule: an entry is used only while every file keeps its path,
size, modification time, inode and inode change time (ctime). ctime changes whenever a file's
content or metadata is written and no tool can set it back, so a file replaced by `cp -p`,
`rsync -a` or an unzip that keep the modification time is decoded again; so is anything merely
`touch`ed. An entry whose array does not hold exactly the readable images at the requested size
is ignored and decoded again.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ssl_blood import ui
from ssl_blood.data.catalogue import Catalogue
from ssl_blood.errors import UserError
from ssl_blood.files import atomic_path, sha256_bytes, write_json, write_text

CACHE_FORMAT = 2  # 2: ctime and inode in the key, unreadable files listed
ENV_CACHE_DIR = "SSL_BLOOD_CACHE_DIR"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


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
    """Digest of the ordered file list with each file's size, mtime, inode and ctime (see the
    module docstring for why ctime)."""
    stats = []
    for p in catalogue.paths:
        st = os.stat(p)
        stats.append([p, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns])
    return sha256_bytes(json.dumps({"format": CACHE_FORMAT, "size": size, "files": stats}).encode())


@dataclass
class DecodedImages:
    images: np.ndarray  # (N, 3, size, size) uint8, memory-mapped from `file` when cached
    readable: np.ndarray  # (len(catalogue),) bool: which catalogue rows decoded
    file: Path | None  # the cache .npy, if there is one
    unreadable_list: Path | None = None  # the cache's list of files that could not be read


def cache_folder(cache_dir: str | Path | None) -> Path | None:
    """The cache folder to use: None means the default, "" means no cache."""
    return default_cache_dir() if cache_dir is None else (Path(cache_dir) if cache_dir else None)


def decode_catalogue(catalogue: Catalogue, size: int, cache_dir: str | Path | None,
                     what: str) -> DecodedImages:
    """The catalogue's images, from the cache when it holds them, else decoded (and cached)."""
    folder = cache_folder(cache_dir)
    key = cache_key(catalogue, size)
    if folder is not None:
        cached = _load_cached(folder, key, size)
        if cached is not None:
            return cached
        folder = _writable(folder)
    shape = (len(catalogue), 3, size, size)
    if folder is None:
        images = np.empty(shape, dtype=np.uint8)
        ok = _decode_into(images, catalogue.paths, size, what)
        return DecodedImages(images[ok] if not ok.all() else images, ok, None)
    return _decode_to_cache(catalogue, size, folder, key, what)


def _writable(folder: Path) -> Path | None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return folder
    except OSError as exc:
        ui.note(f"cache folder {folder} is not writable ({exc.strerror}); decoding without "
                f"a cache (set `cache_dir` to a writable folder to start faster next time)")
        return None


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
    if not ok.all():
        write_text(target.with_suffix(".unreadable.txt"),
                   "".join(catalogue.paths[i] + "\n" for i in np.flatnonzero(~ok)))
    write_json({"format": CACHE_FORMAT, "key": key, "readable": ok.astype(int).tolist(),
                "size": size}, target.with_suffix(".json"))
    return _load_cached(folder, key, size)  # type: ignore[return-value]


def _load_cached(folder: Path, key: str, size: int) -> DecodedImages | None:
    """The cache entry of `key`, or None when there is none or it does not hold exactly the
    readable images at `size` (a damaged or foreign entry is decoded again)."""
    target = folder / f"{key[:40]}.npy"
    meta_path = target.with_suffix(".json")
    if not target.is_file() or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(target, mmap_mode="c")  # copy-on-write: torch wants writable
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    readable = np.asarray(meta.get("readable", []), dtype=bool)
    expected = (int(readable.sum()), 3, size, size)
    if meta.get("key") != key or images.shape != expected or images.dtype != np.uint8:
        return None
    listed = target.with_suffix(".unreadable.txt")
    return DecodedImages(images, readable, target, listed if listed.is_file() else None)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def image_side(path: str) -> int | None:
    """The short side of an image from its header, or None when it cannot be read (broken,
    or a decompression bomb PIL refuses to open)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return min(img.size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
