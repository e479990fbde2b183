"""`Catalogue`: every image file of a folder or manifest, listed before anything is decoded.

One row per image: absolute path, label or -1, split, metadata; ordered by split, so each split
is one contiguous slice of the decode cache. Listing only stats files: a source builds its
catalogue once per command (`FileSource.catalogue`). Unsplit labelled pools are split here,
seeded and stratified per class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ssl_blood.data.cells import SPLITS
from ssl_blood.errors import UserError

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


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
        return self._rows(order)

    def subset(self, keep: np.ndarray) -> "Catalogue":
        return self._rows(np.flatnonzero(keep))

    def _rows(self, rows: np.ndarray) -> "Catalogue":
        return Catalogue([self.paths[i] for i in rows], self.labels[rows], self.splits[rows],
                         self.class_names, self.layout,
                         {k: [v[i] for i in rows] for k, v in self.metadata.items()})

    def present_splits(self) -> tuple[str, ...]:
        present = set(self.splits.tolist())
        return tuple(s for s in SPLITS if s in present)


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
