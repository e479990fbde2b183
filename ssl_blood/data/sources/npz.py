"""A MedMNIST-format .npz: `{train,val,test}_images` uint8 (N, H, W) or (N, H, W, 3) and
optional `{split}_labels` (N,) or (N, 1); class names from medmnist's INFO when the file is
named like a medmnist flag, else from a `class_names` array, else `class i`."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssl_blood.data.cells import SPLITS, CellData
from ssl_blood.data.sources import SIZE_RANGE, DataSource, register
from ssl_blood.errors import UserError


@register
@dataclass(frozen=True)
class NpzSource(DataSource):
    """Cells held as arrays in one .npz file (`path`)."""

    size: int = 0  # 0: the file's own size

    kind = "npz"
    param = "npz"
    metavar = "FILE"
    help = "any MedMNIST-format .npz"
    rank = 1

    @classmethod
    def resolve(cls, value: str, size: int | None, **options: Any) -> "NpzSource":
        return cls(str(Path(value).expanduser().resolve()), size or 0)

    def npz_file(self) -> Path:
        path = Path(self.path)
        if not path.is_file():
            raise UserError(f"`npz` {path}: no such file; give the path of a MedMNIST-format "
                            f".npz", param="npz")
        return path

    def medmnist_flag(self) -> str:
        return Path(self.path).stem.split("_")[0]

    def _open(self):
        path = self.npz_file()
        try:
            return path, np.load(path, allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise UserError(f"cannot read {path} as .npz ({exc}); the file is truncated or not "
                            f"an npz: re-create or re-download it", param=self.param) from None

    def splits(self) -> tuple[str, ...]:
        path, arrays = self._open()
        with arrays:
            return tuple(s for s in SPLITS if f"{s}_images" in arrays.files)

    def _load(self, split: str) -> CellData:
        path, arrays = self._open()
        with arrays:
            return self._split_from_arrays(path, arrays, split)

    def _split_from_arrays(self, path: Path, arrays, split: str) -> CellData:
        key = f"{split}_images"
        try:
            images = arrays[key]
            labels = arrays[f"{split}_labels"] if f"{split}_labels" in arrays.files else None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise UserError(f"cannot read '{key}' from {path} ({exc}); the file is truncated: "
                            f"re-create or re-download it", param=self.param) from None
        images = images_to_nchw(images, f"{path}:{key}")
        labels = labels_to_vector(labels, len(images), f"{path}:{split}_labels")
        if self.size and images.shape[-1] != self.size:
            raise UserError(f"`size` {self.size} does not match {path}, whose images are "
                            f"{images.shape[-1]} px; leave `size` out or resize the file",
                            param="size")
        names = self._class_names(arrays, labels)
        if labels.max(initial=-1) >= len(names):
            raise UserError(f"{path}: label {labels.max()} but only {len(names)} class names",
                            param=self.param)
        return CellData(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels),
                        torch.arange(len(images)), split, names, self)

    def _class_names(self, arrays, labels: np.ndarray) -> tuple[str, ...]:
        from ssl_blood.data.sources.bloodmnist import medmnist_info

        info = medmnist_info().INFO
        flag = self.medmnist_flag()
        if flag in info:
            return tuple(name.split("(")[0].strip() for _, name in
                         sorted(info[flag]["label"].items(), key=lambda kv: int(kv[0])))
        if "class_names" in arrays.files:
            return tuple(str(n) for n in arrays["class_names"])
        return tuple(f"class {i}" for i in range(int(labels.max(initial=-1)) + 1))


def images_to_nchw(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) square images as (N, C, H, W), or a UserError saying why not."""
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


def labels_to_vector(labels: np.ndarray | None, n: int, where: str) -> np.ndarray:
    """Integer class labels (N,) or (N, 1) as int64 (N,), -1 for unknown; None: all unknown."""
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
