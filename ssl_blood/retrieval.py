"""Nearest-neighbour cell retrieval on a CellIndex: queries, answers, and how good they are.

A query is an image file or a cell of a dataset split; it is embedded with the embedder the
index records (same checkpoint, same preprocessing), then searched. Quality is precision@k and
mAP@10 of every query of a split against the gallery, overall and per class.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ssl_blood.data import DataSource, read_cell_image, load_split
from ssl_blood.embed import Embedder
from ssl_blood.errors import UserError
from ssl_blood.index import CellIndex

IG = "immature granulocytes"


def embedder_for(index: CellIndex, device: str = "auto") -> Embedder:
    """The embedder recorded in the index (checks the checkpoint's hash)."""
    return Embedder.from_spec(index.meta["embedder"], device)


def images_from_files(paths: Sequence[str], embedder: Embedder) -> torch.Tensor:
    """Query image files as uint8 (N, C, H, W) at the embedder's image size; see
    `data.read_cell_image` for how other sizes, grayscale and RGBA are converted."""
    return torch.from_numpy(np.stack([read_cell_image(p, embedder.image_size, embedder.channels)
                                      for p in paths]))


def images_from_split(source: DataSource, split: str, ids: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
    """Cells `ids` (positions within the split) with their labels."""
    data = load_split(source, split)
    bad = [i for i in ids if not 0 <= i < len(data)]
    if bad:
        raise UserError(f"--ids {bad[0]} is out of range: the {split} split has {len(data)} cells "
                        f"(ids 0..{len(data) - 1})")
    index = torch.as_tensor(list(ids), dtype=torch.long)
    return data.images[index], data.labels[index].numpy()


def neighbours(index: CellIndex, features: np.ndarray, k: int,
               exclude_ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, gallery positions), each (Q, k); with `exclude_ids` a query never gets
    the gallery cell with its own id back (a query from the gallery split)."""
    if exclude_ids is None:
        return index.search(features, k)
    similarity, position = index.search(features, k + 1)
    keep = index.gallery_ids[position] != np.asarray(exclude_ids)[:, None]
    # drop the self-match where present, else the last neighbour
    keep[keep.all(1), -1] = False
    rows = len(features)
    return similarity[keep].reshape(rows, k), position[keep].reshape(rows, k)


def describe(index: CellIndex, similarity: np.ndarray, position: np.ndarray,
             queries: Sequence[dict]) -> list[dict[str, Any]]:
    """JSON-able answers: per query its description and the ranked neighbours."""
    names = index.meta.get("class_names", [])

    def label_name(label: int) -> str | None:
        return names[label] if 0 <= label < len(names) else None

    answers = []
    for q, sims, pos in zip(queries, similarity, position):
        answers.append({"query": q, "neighbours": [
            {"rank": r + 1, "id": int(index.gallery_ids[p]), "split": index.meta.get("gallery_split"),
             "label": int(index.gallery_labels[p]), "class": label_name(int(index.gallery_labels[p])),
             "similarity": round(float(s), 6)}
            for r, (s, p) in enumerate(zip(sims, pos))]})
    return answers


# ----------------------------------------------------------------------------- quality


def retrieval_metrics(query_labels: np.ndarray, neighbour_labels: np.ndarray,
                      gallery_labels: np.ndarray, class_names: Sequence[str],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """precision@k (share of the top k with the query's class) and mAP@10 (AP@10 =
    sum_i P@i * rel_i / min(R, 10), R = gallery cells of the query's class), overall and per class."""
    kmax = neighbour_labels.shape[1]
    relevant = neighbour_labels == query_labels[:, None]  # (Q, k)
    gallery_counts = np.bincount(gallery_labels[gallery_labels >= 0], minlength=len(class_names))
    depth = min(10, kmax)
    hits = relevant[:, :depth]
    precision_at_i = np.cumsum(hits, 1) / np.arange(1, depth + 1)
    denominators = np.minimum(gallery_counts[query_labels], depth).clip(min=1)
    average_precision = (precision_at_i * hits).sum(1) / denominators

    def summary(mask: np.ndarray) -> dict[str, float]:
        out = {f"precision@{k}": float(relevant[mask, :k].mean()) for k in ks if k <= kmax}
        out[f"mAP@{depth}"] = float(average_precision[mask].mean())
        out["queries"] = int(mask.sum())
        return out

    result = {"overall": summary(np.ones(len(query_labels), dtype=bool)), "per_class": {}}
    for c, name in enumerate(class_names):
        mask = query_labels == c
        if mask.any():
            result["per_class"][name] = summary(mask)
    if IG in result["per_class"]:
        result["immature_granulocytes"] = result["per_class"][IG]
    return result


def evaluate_index(index: CellIndex, query_features: np.ndarray, query_labels: np.ndarray,
                   k: int = 10, exclude_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Retrieval quality of labelled queries against the index's labelled gallery."""
    if (index.gallery_labels < 0).any() or (query_labels < 0).any():
        raise UserError("retrieval evaluation needs labelled gallery and query cells; this "
                        "data has unknown labels")
    _, position = neighbours(index, query_features, k, exclude_ids)
    return retrieval_metrics(query_labels, index.gallery_labels[position], index.gallery_labels,
                             index.meta.get("class_names", []))
