"""UMAP maps of an embedding and the numbers behind them for immature granulocytes (IG).

IG (promyelocytes, myelocytes, metamyelocytes) are transitional cells between myeloblasts and
mature neutrophils, often confused with neutrophils and monocytes. The map shows where they
lie; the numbers say it without the distortion of a 2-D projection: the class make-up of IG
cells' nearest neighbours in the full embedding space (against every other class), per-class
silhouettes, centroid distances, IG sub-clusters (k-means, k chosen by silhouette) with
representative cells, and the IG rows of a linear probe's confusion matrix when one is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ssl_blood.features.embeddings import Embeddings, l2_normalize
from ssl_blood.errors import UserError
from ssl_blood.features.index import CellIndex
from ssl_blood.files import write_json

IG = "immature granulocytes"
UMAP_NEIGHBOURS, UMAP_MIN_DIST = 15, 0.1
SUBCLUSTER_KS = range(2, 7)


def fit_umap(features: np.ndarray, seed: int = 0, n_neighbors: int = UMAP_NEIGHBOURS,
             min_dist: float = UMAP_MIN_DIST) -> tuple[np.ndarray, dict[str, Any]]:
    """2-D UMAP with the cosine metric; returns coordinates and the parameters used. The
    neighbour graph comes from an exact faiss search (umap-learn's `precomputed_knn`): below
    4,096 cells umap-learn would otherwise compute every pairwise distance in Python-called
    numba, minutes for a 3,421-cell split."""
    import warnings

    import umap

    n = len(features)
    if n <= n_neighbors:
        raise UserError(f"UMAP needs more than n_neighbors={n_neighbors} cells, the split has "
                        f"{n}; embed more cells (a larger limit or another split)", param="split")
    index = CellIndex.build(features, use_gpu=False)
    similarity, position = index.search(features, n_neighbors)
    position[:, 0] = np.arange(n)  # each cell is its own first neighbour, at distance 0
    distance = np.clip(1 - similarity, 0, 2).astype(np.float32)
    distance[:, 0] = 0
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist,
                        metric="cosine", random_state=seed, n_jobs=1,  # seeded: one thread anyway
                        precomputed_knn=(position.astype(np.int64), distance, None))
    with warnings.catch_warnings():  # "no search index: transform() unavailable", not used here
        warnings.simplefilter("ignore")
        coords = reducer.fit_transform(features).astype(np.float32)
    return coords, {"n_neighbors": n_neighbors, "min_dist": min_dist, "metric": "cosine",
                    "random_state": seed, "neighbour_graph": "exact (faiss)",
                    "umap_learn": umap.__version__}


def _find_class(class_names: Sequence[str], name: str) -> int | None:
    lowered = [c.lower() for c in class_names]
    if name.lower() in lowered:
        return lowered.index(name.lower())
    matches = [i for i, c in enumerate(lowered) if c.startswith(name.lower())]
    return matches[0] if len(matches) == 1 else None


def has_class(class_names: Sequence[str], name: str) -> bool:
    """Whether `name` is a class (exactly or as an unambiguous prefix)."""
    return _find_class(class_names, name) is not None


def class_index(class_names: Sequence[str], name: str) -> int:
    """Position of a class by exact or unambiguous prefix match ("immature" finds IG)."""
    found = _find_class(class_names, name)
    if found is None:
        raise UserError(f"`highlight` '{name}' is not a class of these embeddings; choose one of "
                        f"{', '.join(class_names) or '(none: the data is unlabelled)'}",
                        param="highlight")
    return found


# ----------------------------------------------------------------------------- numbers


def neighbour_composition(features: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                          k: int = 20) -> dict[str, dict[str, float]]:
    """For each class, the share of each class among its cells' k nearest neighbours (cosine,
    full embedding space, the cell itself excluded). Each row sums to one."""
    from ssl_blood.features.neighbours import neighbours

    k = min(k, len(features) - 1)
    index = CellIndex.build(features, labels=labels, ids=np.arange(len(features)), use_gpu=False)
    _, position = neighbours(index, features, k, exclude_ids=np.arange(len(features)))
    neighbour_labels = np.where(position >= 0, labels[np.maximum(position, 0)], -1)
    result = {}
    for c, name in enumerate(class_names):
        rows = neighbour_labels[labels == c]
        rows = rows[rows >= 0]
        if len(rows):
            counts = np.bincount(rows.ravel(), minlength=len(class_names))
            result[name] = {other: float(counts[j] / counts.sum()) for j, other in enumerate(class_names)}
    return result


def silhouette_by_class(features: np.ndarray, labels: np.ndarray,
                        class_names: Sequence[str]) -> dict[str, float]:
    """Mean cosine silhouette of each class's cells (1: tight and apart, <0: mixed in)."""
    from sklearn.metrics import silhouette_samples

    scores = silhouette_samples(features, labels, metric="cosine")
    return {name: float(scores[labels == c].mean()) for c, name in enumerate(class_names)
            if (labels == c).any()}


def centroid_distances(features: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                       target: int) -> list[dict[str, Any]]:
    """Cosine distance from the target class's centroid to every other class's, nearest first."""
    normed = l2_normalize(features)
    centroids = {c: l2_normalize(normed[labels == c].mean(0, keepdims=True))[0]
                 for c in range(len(class_names)) if (labels == c).any()}
    rows = [{"class": class_names[c], "cosine_distance": float(1 - centroids[target] @ v)}
            for c, v in centroids.items() if c != target]
    return sorted(rows, key=lambda r: r["cosine_distance"])


def subclusters(features: np.ndarray, seed: int = 0, ks: Sequence[int] = SUBCLUSTER_KS,
                per_cluster: int = 8) -> dict[str, Any]:
    """k-means on L2-normalised features for each k, keep the k with the highest mean cosine
    silhouette (the stated criterion), and the cells nearest each centre as representatives."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    normed = l2_normalize(features)
    ks = [k for k in ks if 2 <= k < len(normed)]
    if not ks:
        raise UserError(f"{len(normed)} cells are too few to look for sub-clusters; embed more "
                        f"cells", param="split")
    fits, scores = {}, {}
    for k in ks:
        fits[k] = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(normed)
        scores[k] = float(silhouette_score(normed, fits[k].labels_, metric="cosine"))
    best = max(ks, key=lambda k: (scores[k], -k))  # ties: fewer clusters
    assignment = fits[best].labels_
    representatives = []
    for c, centre in enumerate(fits[best].cluster_centers_):
        members = np.flatnonzero(assignment == c)
        order = np.argsort(-(normed[members] @ centre))
        representatives.append(members[order[:per_cluster]].tolist())
    return {"k": best, "criterion": f"highest mean cosine silhouette of k-means (10 restarts) "
                                     f"over k = {ks[0]}..{ks[-1]}",
            "silhouette_by_k": {str(k): v for k, v in scores.items()},
            "sizes": np.bincount(assignment, minlength=best).tolist(),
            "assignment": assignment.tolist(), "representatives": representatives}


def confusion_rows(probe: dict[str, Any], target: str) -> dict[str, Any]:
    """The target class's row (true target, predicted as) and column (predicted target) of a
    linear probe's test confusion matrix."""
    names = probe["class_names"]
    t = names.index(target)
    cm = np.asarray(probe["confusion_matrix"])
    row, col = cm[t], cm[:, t]
    return {"true_as": {n: int(v) for n, v in zip(names, row)},
            "recall": float(row[t] / max(row.sum(), 1)),
            "predicted_from": {n: int(v) for n, v in zip(names, col)},
            "precision": float(col[t] / max(col.sum(), 1))}


def analyse(features: np.ndarray, labels: np.ndarray, class_names: Sequence[str], target: int,
            seed: int = 0, k: int = 20, probe: dict | None = None) -> dict[str, Any]:
    """Every number of the IG analysis for one embedding of one split."""
    if (labels < 0).all():
        raise UserError("the class analysis needs labelled cells; these embeddings have none",
                        param="embeddings")
    features, labels = features[labels >= 0], labels[labels >= 0]
    composition = neighbour_composition(features, labels, class_names, k)
    name = class_names[target]
    result = {
        "target": name, "cells": int((labels == target).sum()), "k": k,
        "neighbour_composition": composition,
        "same_class_neighbour_share": {c: comp[c] for c, comp in composition.items()},
        "silhouette": silhouette_by_class(features, labels, class_names),
        "nearest_classes": centroid_distances(features, labels, class_names, target),
        "subclusters": subclusters(features[labels == target], seed),
    }
    if probe is not None:
        result["linear_probe_confusion"] = confusion_rows(probe, name)
    return result


# ----------------------------------------------------------------------------- the command


def umap_report(emb: Embeddings, out_dir: str | Path, split: str | None = None, highlight: str = IG,
                compare: Embeddings | None = None, seed: int = 0,
                probe: dict | None = None) -> dict[str, Any]:
    """Write umap.png/.svg, ig_subclusters.png, ig_neighbours.png and ig_analysis.json. The map
    of `emb` reuses the coordinates the embeddings file holds for the split, if any."""
    split = split or emb.default_split()
    from ssl_blood.analysis.plots import cell_grid, neighbour_composition_png, umap_panels_png

    out = Path(out_dir)
    target = class_index(emb.class_names, highlight)
    for e in [emb] + ([compare] if compare is not None else []):
        _, y, _ = e.select(split)
        if not (y == target).any():
            raise UserError(f"the {split} split has no '{emb.class_names[target]}' cells to "
                            f"highlight; choose another split or class", param="highlight")
    images = emb.split_images(split)  # for thumbnails; None when the data is not reachable
    maps, analyses = [], {}
    from ssl_blood import ui

    everything = [emb] + ([compare] if compare is not None else [])
    for e in ui.bar(everything, desc="UMAP and class analysis", unit="embedding"):
        title = e.name if e.name not in analyses else f"{e.name} (compared)"
        x, y, ids = e.select(split)
        stored = e.coords[e.mask(split)] if e.coords is not None else None
        if stored is not None and np.isfinite(stored).all():
            coords, params = stored, {**e.umap_params, "stored": True}
        else:
            coords, params = fit_umap(x, seed)
        analysis = analyse(x, y, e.class_names, target, seed, probe=probe if e is emb else None)
        analysis.update({"embeddings": e.name, "split": split, "umap": params})
        analyses[title] = analysis
        # one thumbnail per sub-cluster: its most central cell, at that cell's map position
        target_rows = np.flatnonzero(y == target)
        central = [target_rows[group[0]] for group in analysis["subclusters"]["representatives"]]
        thumbnails = [] if images is None else [(coords[r], images[ids[r]]) for r in central]
        maps.append({"title": title, "coords": coords, "labels": y, "thumbnails": thumbnails})
    files = umap_panels_png(maps, emb.class_names, target, out / "umap.png")
    files.append(neighbour_composition_png({n: a["neighbour_composition"] for n, a in analyses.items()},
                                           emb.class_names, target, out / "ig_neighbours.png"))
    if images is not None:
        groups = analyses[emb.name]["subclusters"]
        _, y, ids = emb.select(split)
        target_ids = ids[y == target]
        files.append(cell_grid(
            [[images[target_ids[i]] for i in group] for group in groups["representatives"]],
            out / "ig_subclusters.png",
            title=f"{emb.class_names[target]}: {groups['k']} sub-clusters of {emb.name}; each row "
                  f"the cells nearest one centre",
            row_titles=[f"sub-cluster {c + 1} ({n} cells)" for c, n in enumerate(groups["sizes"])]))
    result = {"highlight": emb.class_names[target], "split": split, "seed": seed,
              "subset": emb.subset or None, "analyses": analyses, "files": [str(f) for f in files]}
    write_json(result, out / "ig_analysis.json")
    return result
