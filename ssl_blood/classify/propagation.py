"""Label spreading on the kNN graph of the frozen embeddings: the unlabelled cells of a lab's
own folder lend their structure to its few labels.

Label spreading (Zhou et al., NIPS 2004): F <- alpha S F + (1 - alpha) Y on the symmetrically
normalised kNN affinity S (cosine similarity cubed, as Iscen et al., CVPR 2019, weight their
graph), seeded with the labelled cells. The graph comes from faiss through the neighbour service
(one graph per k for every cross-validation fold and setting; scikit-learn's LabelSpreading
builds its own with NearestNeighbors for each fit, without faiss). The classifier then takes
the most confident spread labels as pseudo-labels beside the real ones (see classifier.py).
"""

from __future__ import annotations

import numpy as np

from ssl_blood.features.embeddings import l2_normalize

GRAPH_KS = (10, 30)
ALPHAS = (0.5, 0.9, 0.99)
ITERATIONS = 30


def neighbour_table(features: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, positions) of every cell's k nearest other cells (cosine)."""
    from ssl_blood.features.index import CellIndex
    from ssl_blood.features.neighbours import neighbours

    x = np.ascontiguousarray(l2_normalize(features), dtype=np.float32)
    n = len(x)
    index = CellIndex.build(x, ids=np.arange(n), use_gpu=False)
    return neighbours(index, x, min(k, n - 1), exclude_ids=np.arange(n))


def affinity(similarity: np.ndarray, position: np.ndarray, k: int):
    """S = D^-1/2 W D^-1/2 of the symmetrised kNN graph on the first k neighbours."""
    from scipy import sparse

    n = len(position)
    sims, pos = similarity[:, :k], position[:, :k]
    keep = pos >= 0
    rows = np.repeat(np.arange(n), keep.sum(1))
    weights = np.clip(sims[keep], 0, None) ** 3
    w = sparse.csr_matrix((weights, (rows, pos[keep])), shape=(n, n))
    w = w + w.T
    degree = np.asarray(w.sum(1)).ravel()
    scale = sparse.diags(1 / np.sqrt(np.maximum(degree, 1e-12)))
    return (scale @ w @ scale).tocsr()


def spread(graph, seeds: np.ndarray, seed_labels: np.ndarray, num_classes: int, alpha: float,
           iterations: int = ITERATIONS) -> np.ndarray:
    """Class scores (N, C), rows summing to 1 (uniform where nothing reached), spread from the
    seed rows with their labels."""
    y = np.zeros((graph.shape[0], num_classes), dtype=np.float64)
    y[seeds, seed_labels] = 1.0
    f = y.copy()
    for _ in range(iterations):
        f = alpha * (graph @ f) + (1 - alpha) * y
    total = f.sum(1, keepdims=True)
    return np.where(total > 0, f / np.where(total > 0, total, 1), 1.0 / num_classes)


def pseudo_labels(scores: np.ndarray, candidates: np.ndarray, per_class: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels) of the most confident candidates of each class: per_class[c] of those
    whose spread label is c, highest score first (class-balanced as the labels are)."""
    label = scores.argmax(1)
    confidence = scores.max(1)
    rows, labels = [], []
    for c, n in enumerate(per_class):
        mine = candidates[label[candidates] == c]
        take = mine[np.argsort(-confidence[mine], kind="stable")[:int(n)]]
        rows.append(take)
        labels.append(np.full(len(take), c))
    return np.concatenate(rows).astype(np.int64), np.concatenate(labels).astype(np.int64)
