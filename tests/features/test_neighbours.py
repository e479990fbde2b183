"""The neighbour service: self-exclusion by id, k clamping and the weighted vote, shared by kNN
evaluation, qc and retrieval."""

import numpy as np
import pytest

from ssl_blood.errors import UserError
from ssl_blood.features.index import CellIndex
from ssl_blood.features.neighbours import KNN_TEMPERATURE, clamped_k, neighbours, weighted_vote


def test_a_cell_is_never_its_own_neighbour_even_with_a_duplicate():
    x = np.eye(4, dtype=np.float32)
    x = np.concatenate([x, x[:1]])  # cell 4 is an exact copy of cell 0
    index = CellIndex.build(x, labels=np.array([0, 1, 2, 3, 0]), ids=np.array([10, 11, 12, 13, 14]),
                            use_gpu=False, kind="flat")
    _, position = neighbours(index, x[:1], 2, exclude_ids=[10])
    assert index.gallery_ids[position[0, 0]] == 14 and 10 not in index.gallery_ids[position[0]]
    with pytest.raises(UserError, match="`k` 5 must be smaller than the 5 gallery cells"):
        neighbours(index, x[:1], 5, exclude_ids=[10])
    assert clamped_k(index, 20, excluding_self=True) == 4 and clamped_k(index, 3, False) == 3


def test_weighted_vote_ignores_missing_and_unlabelled_neighbours():
    similarity = np.array([[0.9, 0.8, 0.7], [0.5, -np.inf, -np.inf]], dtype=np.float32)
    position = np.array([[0, 1, 2], [2, -1, -1]])
    labels = np.array([1, 0, -1])
    share = weighted_vote(similarity, position, labels, 2)
    w = np.exp(np.array([0.9, 0.8]) / KNN_TEMPERATURE)
    assert share[0] == pytest.approx([w[1] / w.sum(), w[0] / w.sum()])
    assert share[1].sum() == 0  # its only neighbour is unlabelled
    with pytest.raises(UserError, match="`temperature` 0"):
        weighted_vote(similarity, position, labels, 2, temperature=0)


def test_knn_evaluation_and_qc_suspects_vote_alike():
    """kNN's class scores and qc's neighbourhood confidence are one computation."""
    from ssl_blood.evaluation.frozen import knn_scores

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    index = CellIndex.build(x, labels=y, use_gpu=False, kind="flat")
    scores = knn_scores(x, y, x, 3, k=10, index=index, exclude_ids=np.arange(60))
    similarity, position = neighbours(index, x, 10, exclude_ids=np.arange(60))
    assert np.allclose(scores, weighted_vote(similarity, position, y, 3), atol=1e-6)
