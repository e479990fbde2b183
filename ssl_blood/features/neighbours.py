"""The neighbour service: who a cell's nearest cells are, and how they vote.

One owner for three rules every neighbour-based result shares, so kNN evaluation, the training
monitor, few-shot kNN, qc's label suspects, select's typicality, the IG neighbourhood analysis
and retrieval agree by construction:
- a cell is never its own neighbour when queries come from the gallery's own split (by id);
- k is clamped to what the gallery can give, or refused where the caller asked for exactly k;
- the weighted vote is DINO's: each neighbour votes for its class with exp(similarity / T),
  with the named defaults KNN_K = 20 and KNN_TEMPERATURE = 0.07 (Caron et al. 2021).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ssl_blood.errors import UserError
from ssl_blood.features.index import CellIndex

KNN_K = 20
KNN_TEMPERATURE = 0.07


def neighbours(index: CellIndex, features: np.ndarray, k: int,
               exclude_ids: Sequence[int] | np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, gallery positions), each (Q, k), best first, -1 / -inf where fewer than
    k were found. With `exclude_ids` (queries from the gallery's own split) a query never gets
    the gallery cell with its own id back."""
    if exclude_ids is None:
        return index.search(features, k)
    if k >= index.ntotal:
        raise UserError(f"`k` {k} must be smaller than the {index.ntotal} gallery cells when the "
                        f"queries come from the gallery's own split (a cell is not its own "
                        f"neighbour); use a smaller k", param="k")
    similarity, position = index.search(features, k + 1)
    own = np.asarray(exclude_ids, dtype=np.int64)[:, None]
    keep = (position >= 0) & (index.gallery_ids[np.maximum(position, 0)] != own)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept ones first, ranks preserved
    rows = np.arange(len(position))[:, None]
    kept = keep[rows, order]
    return (np.where(kept, similarity[rows, order], -np.inf).astype(np.float32),
            np.where(kept, position[rows, order], -1))


def clamped_k(index: CellIndex, k: int, excluding_self: bool) -> int:
    """`k`, at most what the gallery can give (one fewer when a query's own cell is excluded)."""
    return max(1, min(k, index.ntotal - int(excluding_self)))


def weighted_vote(similarity: np.ndarray, position: np.ndarray, gallery_labels: np.ndarray,
                  num_classes: int, temperature: float = KNN_TEMPERATURE) -> np.ndarray:
    """Class shares (Q, C), rows summing to 1 (0 where no labelled neighbour was found): each
    found, labelled neighbour votes for its class with weight exp(similarity / T)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"`temperature` {temperature} must be a number > 0", param="temperature")
    labels = gallery_labels[np.maximum(position, 0)]
    usable = (position >= 0) & (labels >= 0)
    # subtracting each row's max leaves the normalised votes unchanged and avoids overflow
    top = np.where(usable, similarity, -np.inf).max(1, keepdims=True)
    top[~np.isfinite(top)] = 0.0  # a query with no usable neighbour: all its weights are 0 anyway
    weights = np.where(usable, np.exp((similarity - top) / temperature), 0.0)
    votes = np.zeros((len(similarity), num_classes), dtype=np.float64)
    np.add.at(votes, (np.arange(len(similarity))[:, None], np.maximum(labels, 0)), weights)
    return votes / np.maximum(votes.sum(1, keepdims=True), 1e-300)


def knn_scores(gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray,
               num_classes: int, k: int = KNN_K, temperature: float = KNN_TEMPERATURE,
               index: CellIndex | None = None, exclude_ids: np.ndarray | None = None,
               gallery_ids: np.ndarray | None = None) -> np.ndarray:
    """Class scores (Q, C) of DINO's weighted kNN over the k nearest gallery vectors (cosine,
    through CellIndex; the vote of `features.neighbours`). With `exclude_ids` (queries from the
    gallery's own split) a query never votes for itself."""
    if k < 1:
        raise UserError(f"kNN needs `k` >= 1 (got {k})", param="k")
    index = index or CellIndex.build(gallery, labels=gallery_labels, ids=gallery_ids,
                                     use_gpu=False)
    similarity, position = neighbours(index, queries, clamped_k(index, k, exclude_ids is not None),
                                      exclude_ids)
    return weighted_vote(similarity, position, index.gallery_labels, num_classes,
                         temperature).astype(np.float32)


def knn_accuracy(gallery: np.ndarray, gallery_labels: np.ndarray, queries: np.ndarray,
                 query_labels: np.ndarray, num_classes: int, k: int = KNN_K,
                 temperature: float = KNN_TEMPERATURE) -> float:
    scores = knn_scores(gallery, gallery_labels, queries, num_classes, k, temperature)
    return float((scores.argmax(1) == query_labels).mean())
