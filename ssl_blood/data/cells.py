"""`CellData`: the one shape every source becomes, and what is computed on it alone.

A uint8 tensor (N, C, H, W) (in memory, or memory-mapped from the decode cache), int64 labels
(-1 where unknown), each cell's position within its split (`ids`, the index into the split),
the class names, and per-cell metadata strings. For folders and manifests `metadata["path"]`
holds each cell's file path relative to the folder or manifest: that is the cell's name, the
one people see and write in CSV files (`cell_names`), stable whatever other cells the source
holds. Commands never branch on the source kind.
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from ssl_blood.data.sources import DataSource

SPLITS = ("train", "val", "test")


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
    source: "DataSource"
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

    @property
    def cell_names(self) -> np.ndarray:
        """What a person calls each cell: its relative file path, else its id in the split."""
        return cell_names(self.metadata, self.ids.numpy())

    def labelled(self) -> "CellData":
        """The cells with a label (unlabelled ones serve pretraining only)."""
        return self if self.is_labeled else self.subset(np.flatnonzero(self.labels.numpy() >= 0))

    def with_labels(self, labels: np.ndarray, class_names: Sequence[str]) -> "CellData":
        """The same cells with other labels (a labels file given by a person)."""
        return CellData(self.images, torch.as_tensor(np.asarray(labels, dtype=np.int64)), self.ids,
                        self.split, tuple(class_names), self.source, self.metadata,
                        self.image_file, self.row_offset)

    def with_images(self, images: torch.Tensor | np.ndarray) -> "CellData":
        """The same cells with other pixels (e.g. under a stain or scanner shift): labels, ids
        and names kept; no decode cache lies behind them."""
        images = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if tuple(images.shape) != tuple(self.images.shape):
            raise ValueError(f"`images` of shape {tuple(images.shape)}: the cells' are {tuple(self.images.shape)}")
        return dataclasses.replace(self, images=images, image_file=None, row_offset=0)

    def labelled_only_at(self, rows: np.ndarray | Sequence[int]) -> "CellData":
        """Every cell, its label kept only at `rows` (the others unlabelled): a few labels among
        cells that stay, as heads that learn from unlabelled cells need them."""
        labels = np.full(len(self), -1, dtype=np.int64)
        labels[rows] = self.labels.numpy()[rows]
        return self.with_labels(labels, self.class_names)

    def subset(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> "CellData":
        index = np.asarray(index, dtype=np.int64)
        rows = torch.as_tensor(index)
        contiguous = len(index) > 0 and bool((np.diff(index) == 1).all())
        offset = self.row_offset + int(index[0]) if contiguous else 0
        return CellData(self.images[rows], self.labels[rows], self.ids[rows], self.split,
                        self.class_names, self.source, {k: v[index] for k, v in self.metadata.items()},
                        self.image_file if contiguous else None, offset)


def cell_names(metadata: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Relative file paths where the cells have them, else their ids as text."""
    if "path" in metadata:
        return np.asarray(metadata["path"], dtype=str)
    return np.asarray([str(int(i)) for i in ids], dtype=str)


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
