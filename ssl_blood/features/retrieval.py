"""Nearest-neighbour cell retrieval on a CellIndex: queries, answers, and how good they are.

A query is an image file or a cell of a dataset split; it is embedded with the embedder the
index records (same checkpoint, same preprocessing), then searched. Quality is precision@k and
mAP@10 of every query of a split against the gallery, overall and per class. Places an
approximate index could not fill (position -1) count as misses, never as neighbours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ssl_blood.data import DataSource, load_split
from ssl_blood.features.embeddings import Embedder, Embeddings, EmbedderSpec
from ssl_blood.errors import UserError
from ssl_blood.data.decode import read_cell_image
from ssl_blood.features.index import CellIndex
from ssl_blood.features.neighbours import neighbours


def embedder_for(index: CellIndex, device: str = "auto") -> Embedder:
    """The embedder recorded in the index (checks the checkpoint's hash)."""
    return Embedder.from_spec(EmbedderSpec.from_dict(index.meta["embedder"]), device)


def gallery_source(index: CellIndex) -> DataSource:
    """The data the gallery cells were embedded from."""
    return EmbedderSpec.from_dict(index.meta["embedder"]).data_source()


def images_from_files(paths: Sequence[str], embedder: Embedder) -> torch.Tensor:
    """Query image files as uint8 (N, C, H, W) at the embedder's image size and channels; see
    `folders.read_cell_image` for how other sizes, bit depths and colour modes are converted."""
    images = np.stack([read_cell_image(p, embedder.image_size) for p in paths])
    if embedder.channels == 1:  # a grayscale model: luminance of the RGB image
        luma = np.tensordot(np.array([0.299, 0.587, 0.114]), images.astype(np.float32), ([0], [1]))
        images = np.rint(luma)[:, None].astype(np.uint8)
    return torch.from_numpy(images)


def cell_positions(source: DataSource, split: str, cells: Sequence[str]) -> list[int]:
    """Positions within the split of `cells`, each a file's relative path (folders, manifests)
    or a position."""
    data = load_split(source, split)
    names = {str(n): i for i, n in enumerate(data.cell_names)} if "path" in data.metadata else {}
    out = []
    for cell in cells:
        if cell in names:
            out.append(names[cell])
        elif cell.lstrip("-").isdigit():
            out.append(int(cell))
        else:
            raise UserError(f"`ids` '{cell}' is neither a file of the {split} split nor a position in "
                            f"it; give relative paths as in picks.csv, or positions", param="ids")
    return out


def images_from_split(source: DataSource, split: str, ids: Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
    """Cells `ids` (positions within the split) with their labels."""
    data = load_split(source, split)
    bad = [i for i in ids if not 0 <= i < len(data)]
    if bad:
        raise UserError(f"`ids` {bad[0]} is out of range: the {split} split has {len(data)} cells "
                        f"(ids 0..{len(data) - 1})", param="ids")
    index = torch.as_tensor(list(ids), dtype=torch.long)
    return data.images[index], data.labels[index].numpy()


def shortfall(index: CellIndex, answers: Sequence[dict], k: int) -> str | None:
    """Why some queries got fewer than `k` neighbours, with the fix; None when none did. An
    exact (flat) index only falls short when the gallery is too small; an IVF index also when
    `nprobe` lists hold too few cells."""
    short = [a for a in answers if a["found"] < k]
    if not short:
        return None
    cause = (f"the {index.kind} index searched too few lists: rebuild it with a larger `nprobe`"
             if index.kind.startswith("ivf") else
             f"the gallery holds {index.ntotal} cells: ask for a smaller `k` or index more cells")
    return f"{len(short)} of {len(answers)} queries got fewer than {k} neighbours ({cause})"


def describe(index: CellIndex, similarity: np.ndarray, position: np.ndarray,
             queries: Sequence[dict], metadata: dict[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
    """JSON-able answers: per query its description, how many neighbours were found, and the
    ranked neighbours (with their metadata, e.g. file path, when given per gallery cell)."""
    names = index.meta.get("class_names", [])

    def label_name(label: int) -> str | None:
        return names[label] if 0 <= label < len(names) else None

    answers = []
    for q, sims, pos in zip(queries, similarity, position):
        found = [(s, p) for s, p in zip(sims, pos) if p >= 0]
        answers.append({"query": q, "found": len(found), "neighbours": [
            {"rank": r + 1, "id": int(index.gallery_ids[p]), "split": index.meta.get("gallery_split"),
             "label": int(index.gallery_labels[p]), "class": label_name(int(index.gallery_labels[p])),
             "similarity": round(float(s), 6),
             **({"metadata": {k: str(v[p]) for k, v in metadata.items()}} if metadata else {})}
            for r, (s, p) in enumerate(found)]})
    return answers


def gallery_metadata(index: CellIndex) -> dict[str, np.ndarray]:
    """Per-gallery-cell metadata (file path, manifest columns) from the embeddings file the
    index was built from, aligned with the index's gallery; empty when unavailable."""
    path = index.meta.get("embeddings_file")
    if not path or not Path(path).is_file():
        return {}
    emb = Embeddings.load(path)
    if emb.identity != index.meta["identity"] or not emb.metadata:
        return {}
    mask = emb.split == index.meta["gallery_split"]
    by_id = {int(i): row for row, i in enumerate(emb.ids[mask])}
    rows = [by_id.get(int(i)) for i in index.gallery_ids]
    if any(r is None for r in rows):
        return {}
    return {k: v[mask][rows] for k, v in emb.metadata.items()}


# ----------------------------------------------------------------------------- quality


def retrieval_metrics(query_labels: np.ndarray, neighbour_labels: np.ndarray,
                      gallery_labels: np.ndarray, class_names: Sequence[str],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
    """precision@k for each of `ks` up to the depth searched, and at that depth K (the number of
    neighbour columns: share of the top k with the query's class), and mAP@K (AP@K =
    sum_i P@i * rel_i / min(R, K), R = gallery cells of the query's class), overall and per
    class. A neighbour label of -2 marks a place the index could not fill: never relevant."""
    kmax = neighbour_labels.shape[1]
    ks = sorted({k for k in ks if k <= kmax} | {kmax})
    relevant = neighbour_labels == query_labels[:, None]  # (Q, k)
    gallery_counts = np.bincount(gallery_labels[gallery_labels >= 0], minlength=len(class_names))
    depth = kmax
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
    return result


def neighbour_labels(index: CellIndex, position: np.ndarray) -> np.ndarray:
    """Labels of the neighbours, -2 where the index found none (matches no class, not even
    the unknown label -1)."""
    return np.where(position >= 0, index.gallery_labels[np.maximum(position, 0)], -2)


def evaluate_index(index: CellIndex, query_features: np.ndarray, query_labels: np.ndarray,
                   k: int = 10, exclude_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Retrieval quality of labelled queries against the index's labelled gallery."""
    if (index.gallery_labels < 0).any() or (query_labels < 0).any():
        raise UserError("retrieval evaluation needs labelled gallery and query cells; this "
                        "data has unknown labels", param="split")
    _, position = neighbours(index, query_features, k, exclude_ids)
    result = retrieval_metrics(query_labels, neighbour_labels(index, position),
                               index.gallery_labels, index.meta.get("class_names", []))
    result["unfilled"] = int((position < 0).sum())  # neighbour places the index left empty
    return result


def evaluate_embeddings(emb: Embeddings, gallery_split: str, query_split: str,
                        k: int = 10) -> dict[str, Any]:
    """The same evaluation for an embeddings file (e.g. a baseline), with an exact index."""
    index = CellIndex.from_embeddings(emb, gallery_split, kind="flat", use_gpu=False)
    qx, qy, qids = emb.select(query_split)
    exclude = qids if query_split == gallery_split else None
    return evaluate_index(index, qx, qy, k, exclude)


def montage_rows(gallery_images: np.ndarray, query_images: Sequence[np.ndarray],
                 captions: Sequence[str], answers: Sequence[dict]) -> list[dict[str, Any]]:
    """Rows for `plots.retrieval_montage`: each query with its found neighbours' images
    (`gallery_images` indexed by gallery id), labels and similarities."""
    return [{"query": image, "caption": caption,
             "neighbours": [gallery_images[n["id"]] for n in answer["neighbours"]],
             "labels": [n["label"] for n in answer["neighbours"]],
             "similarities": [n["similarity"] for n in answer["neighbours"]]}
            for image, caption, answer in zip(query_images, captions, answers)]
